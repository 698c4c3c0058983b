"""fp32 accuracy of the KL op family, flash-attention style: against a float64 reference, our fp32 error is at
most 2x the error of the plain-torch fp32 expression (``F.kl_div(log_softmax ...)`` for forward / reverse KL,
TRL's ``generalized_jsd_loss`` for the JSD) plus a floor of 1e-6 of the magnitude, for the loss and the
student gradient.

Run ``python -m tests.ops.test_kl_accuracy [cpp] [triton]`` from the repository root for the table of errors (ours vs torch fp32, both vs float64) on
every case; the tests print each case's ratio (visible with ``pytest -s``) and record it in the test report
(``record_property``).
"""
from __future__ import annotations

import dataclasses
import os
import sys
from typing import Optional

import pytest
import torch
import torch.nn.functional as F

from minitron.ops import BackendUnavailableError, kl_div, kl_div_reference
from minitron.ops._dispatch import op_backends

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

FLOOR = 1e-6  # of the magnitude (|loss|, max |grad|)
FACTOR = 2.0
MODES = [("forward", 0.5), ("reverse", 0.5), ("jsd", 0.1), ("jsd", 0.5), ("jsd", 0.9)]
TEMPERATURES = [0.5, 1.0, 2.0]
REDUCTIONS = ["mean", "sum", "none"]


def _available(backend: str) -> bool:
    try:
        op_backends("kl_div").select(backend, "cpu", torch.float32)
        return True
    except BackendUnavailableError:
        return False


def _torch_fp32(s: torch.Tensor, t: torch.Tensor, mode: str, beta: float, temperature: float) -> torch.Tensor:
    """The plain-torch fp32 per-token divergence (times T**2) in the usual expression for each mode."""
    if mode == "jsd":
        from trl.experimental.gkd.gkd_trainer import GKDTrainer

        per_elem = GKDTrainer.generalized_jsd_loss(s, t, beta=beta, temperature=temperature, reduction="none")
        return per_elem.sum(-1) * temperature ** 2
    lq = F.log_softmax(s / temperature, dim=-1)
    lp = F.log_softmax(t / temperature, dim=-1)
    if mode == "forward":  # KL(P || Q): input = student log-probs, target = teacher
        per_elem = F.kl_div(lq, lp, reduction="none", log_target=True)
    else:
        per_elem = F.kl_div(lp, lq, reduction="none", log_target=True)
    return per_elem.sum(-1) * temperature ** 2


def _reduce(per_token: torch.Tensor, mask: Optional[torch.Tensor], reduction: str) -> torch.Tensor:
    if mask is not None:
        per_token = torch.where(mask, per_token, torch.zeros_like(per_token))
    if reduction == "none":
        return per_token
    if reduction == "sum":
        return per_token.sum()
    count = per_token.numel() if mask is None else mask.sum()
    return per_token.sum() / max(int(count), 1)


@dataclasses.dataclass
class Errors:
    case: str
    backend: str
    loss_ours: float
    loss_torch: float
    loss_mag: float
    grad_ours: float
    grad_torch: float
    grad_mag: float

    def bound(self, which: str) -> float:
        torch_err, mag = (self.loss_torch, self.loss_mag) if which == "loss" else (self.grad_torch, self.grad_mag)
        return FACTOR * torch_err + FLOOR * mag

    def ratio(self, which: str) -> float:
        ours = self.loss_ours if which == "loss" else self.grad_ours
        return ours / self.bound(which) if self.bound(which) > 0 else (0.0 if ours == 0 else float("inf"))

    def ok(self) -> bool:
        return self.loss_ours <= self.bound("loss") and self.grad_ours <= self.bound("grad")


def _max_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    return float((a.double() - ref).abs().max()) if a.numel() else 0.0


def measure(s: torch.Tensor, t: torch.Tensor, *, mode: str, beta: float, temperature: float, reduction: str,
            mask: Optional[torch.Tensor], backends: list[str], case: str = "") -> list[Errors]:
    """Errors of our fp32 op (per backend) and of the torch fp32 expression against the fp64 reference."""
    kw = dict(mode=mode, beta=beta, temperature=temperature, reduction=reduction, mask=mask)
    s64 = s.double().requires_grad_(True)
    ref = kl_div_reference(s64, t.double(), **kw)
    (ref_grad,) = torch.autograd.grad(ref.sum(), s64)
    ref = ref.detach()
    s32 = s.clone().requires_grad_(True)
    base = _reduce(_torch_fp32(s32, t, mode, beta, temperature), mask, reduction)
    (base_grad,) = torch.autograd.grad(base.sum(), s32)
    loss_torch, grad_torch = _max_err(base.detach(), ref), _max_err(base_grad, ref_grad)
    loss_mag = float(ref.abs().max()) if ref.numel() else 0.0
    grad_mag = float(ref_grad.abs().max()) if ref_grad.numel() else 0.0
    out = []
    for backend in backends:
        a = s.clone().requires_grad_(True)
        loss = kl_div(a, t, backend=backend, **kw)
        loss.sum().backward()
        out.append(Errors(case, backend, _max_err(loss.detach(), ref), loss_torch, loss_mag,
                          _max_err(a.grad, ref_grad), grad_torch, grad_mag))
    return out


def _inputs(n: int, v: int, seed: int, spread: float = 3.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(n, v, generator=g) * spread
    t = torch.randn(n, v, generator=g) * spread + 0.5 * s  # correlated, like a distillation pair
    mask = torch.rand(n, generator=g) < 0.7
    mask[0] = True
    return s, t, mask


def _seed(*key) -> int:
    return sum(map(ord, repr(key)))  # deterministic (hash() of a str is salted per process)


def _backends() -> list[str]:
    return [b for b in ("cpp", "triton") if _available(b)]


def _report(errs: list[Errors], record_property=None) -> None:
    for e in errs:
        line = (f"{e.case} [{e.backend}] loss err {e.loss_ours:.3g} (torch fp32 {e.loss_torch:.3g}, ratio to bound "
                f"{e.ratio('loss'):.2f}) grad err {e.grad_ours:.3g} (torch fp32 {e.grad_torch:.3g}, ratio to bound "
                f"{e.ratio('grad'):.2f})")
        print(line)
        if record_property is not None:
            record_property(f"{e.backend}:loss_ratio", round(e.ratio("loss"), 4))
            record_property(f"{e.backend}:grad_ratio", round(e.ratio("grad"), 4))


def _assert_ok(errs: list[Errors]) -> None:
    bad = [e for e in errs if not e.ok()]
    assert not bad, "\n".join(f"{e}: loss ratio {e.ratio('loss'):.3f}, grad ratio {e.ratio('grad'):.3f}" for e in bad)


# ------------------------------------------------------------------------------------------------
# the grid: every mode x temperature x reduction, with and without a mask
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode,beta", MODES, ids=[f"{m}{'' if m != 'jsd' else b}" for m, b in MODES])
@pytest.mark.parametrize("temperature", TEMPERATURES)
@pytest.mark.parametrize("masked", [False, True], ids=["all", "masked"])
def test_fp32_error_within_2x_torch(mode, beta, temperature, masked, record_property):
    pytest.importorskip("trl")
    backends = _backends()
    if not backends:
        pytest.skip("no kernel backend")
    s, t, mask = _inputs(24, 3000, seed=_seed(mode, beta, temperature))
    errs = []
    for reduction in REDUCTIONS:
        errs += measure(s, t, mode=mode, beta=beta, temperature=temperature, reduction=reduction,
                        mask=mask if masked else None, backends=backends,
                        case=f"{mode}{'' if mode != 'jsd' else beta} T={temperature} {reduction} "
                             f"{'masked' if masked else 'all'}")
    _report(errs, record_property)
    _assert_ok(errs)


# ------------------------------------------------------------------------------------------------
# the known near-the-line cases
# ------------------------------------------------------------------------------------------------
def test_summed_forward_kl_over_16k_rows(record_property):
    backends = [b for b in _backends() if b == "cpp"] or pytest.skip("no C++ backend")
    s, t, _ = _inputs(16384, 256, seed=1)
    errs = measure(s, t, mode="forward", beta=0.5, temperature=1.0, reduction="sum", mask=None, backends=backends,
                   case="forward T=1 sum 16384x256")
    _report(errs, record_property)
    _assert_ok(errs)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_reverse_kl_at_half_temperature(reduction, record_property):
    backends = _backends()
    if not backends:
        pytest.skip("no kernel backend")
    s, t, mask = _inputs(32, 5000, seed=2, spread=4.0)
    errs = measure(s, t, mode="reverse", beta=0.5, temperature=0.5, reduction=reduction, mask=mask,
                   backends=backends, case=f"reverse T=0.5 {reduction} spread 4")
    _report(errs, record_property)
    _assert_ok(errs)


def error_table(backends: Optional[list[str]] = None) -> list[Errors]:
    """Every case of the tests above (the grid with masks, and the near-the-line cases)."""
    backends = backends or _backends()
    rows: list[Errors] = []
    for mode, beta in MODES:
        for temperature in TEMPERATURES:
            s, t, mask = _inputs(24, 3000, seed=_seed(mode, beta, temperature))
            for masked in (False, True):
                for reduction in REDUCTIONS:
                    rows += measure(s, t, mode=mode, beta=beta, temperature=temperature, reduction=reduction,
                                    mask=mask if masked else None, backends=backends,
                                    case=f"{mode}{'' if mode != 'jsd' else beta} T={temperature} {reduction}"
                                         f"{' masked' if masked else ''}")
    s, t, _ = _inputs(16384, 256, seed=1)
    rows += measure(s, t, mode="forward", beta=0.5, temperature=1.0, reduction="sum", mask=None,
                    backends=[b for b in backends if b == "cpp"], case="forward T=1 sum 16384x256")
    s, t, mask = _inputs(32, 5000, seed=2, spread=4.0)
    for reduction in REDUCTIONS:
        rows += measure(s, t, mode="reverse", beta=0.5, temperature=0.5, reduction=reduction, mask=mask,
                        backends=backends, case=f"reverse T=0.5 {reduction} masked spread4")
    return rows


def main(argv: list[str]) -> int:
    backends = argv[1:] or None
    rows = error_table(backends)
    head = (f"{'case':38s} {'backend':8s} {'loss ours':>10s} {'loss torch':>10s} {'ratio':>6s} "
            f"{'grad ours':>10s} {'grad torch':>10s} {'ratio':>6s}")
    print(head)
    print("-" * len(head))
    for e in rows:
        print(f"{e.case:38s} {e.backend:8s} {e.loss_ours:10.3g} {e.loss_torch:10.3g} {e.ratio('loss'):6.2f} "
              f"{e.grad_ours:10.3g} {e.grad_torch:10.3g} {e.ratio('grad'):6.2f}")
    worst_l = max(rows, key=lambda e: e.ratio("loss"))
    worst_g = max(rows, key=lambda e: e.ratio("grad"))
    print(f"\nratio = our error / (2 x torch fp32 error + 1e-6 x magnitude); must be <= 1.\n"
          f"worst loss ratio {worst_l.ratio('loss'):.3f} ({worst_l.case}, {worst_l.backend}); "
          f"worst grad ratio {worst_g.ratio('grad'):.3f} ({worst_g.case}, {worst_g.backend})")
    return 0 if all(e.ok() for e in rows) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
