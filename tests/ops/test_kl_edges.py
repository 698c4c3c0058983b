"""Numerics of the KL op family at the edges (issue 16): all -inf rows and large temperatures, on every backend
available here (C++ on each CPU ISA path, Triton under the interpreter, the torch reference)."""
from __future__ import annotations

import pytest
import torch

from minitron import _ext
from minitron.ops import (BackendUnavailableError, FusedLinearKLDivLoss, KLDivLoss, fused_linear_kl_div, kl_div,
                          kl_div_reference)
from minitron.ops.kl import MAX_TEMPERATURE
from minitron.ops._dispatch import op_backends

NINF = float("-inf")
MODES = [("forward", 0.5), ("reverse", 0.5), ("jsd", 0.5), ("jsd", 0.2), ("jsd", 0.0), ("jsd", 1.0)]
MODE_IDS = ["fwd", "rev", "jsd.5", "jsd.2", "jsd0", "jsd1"]


def _backends() -> list[tuple[str, str | None]]:
    """(backend, forced CPU ISA or None)."""
    out: list[tuple[str, str | None]] = []
    for b in ("cpp", "triton", "reference"):
        try:
            op_backends("kl_div").select(b, "cpu", torch.float32)
        except BackendUnavailableError:
            continue
        if b == "cpp":
            out += [("cpp", isa) for isa in ("avx512", "avx2", "scalar")]
        else:
            out.append((b, None))
    return out


@pytest.fixture(params=_backends(), ids=lambda p: p[0] if p[1] is None else f"{p[0]}-{p[1]}")
def backend(request, monkeypatch) -> str:
    name, isa = request.param
    if isa is not None:
        monkeypatch.setenv("MINITRON_CPU_ISA", isa)
        got = _ext.build_info().get("cpu_isa")
        if got is not None and got != isa:
            pytest.skip(f"this CPU cannot run the {isa} path")
    return name


# ------------------------------------------------------------------------------------------------
# all -inf rows
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode,beta", MODES, ids=MODE_IDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_all_neg_inf_teacher_row_counts_like_a_masked_token(backend, mode, beta, reduction):
    """A teacher row entirely -inf has no target distribution: 0 loss and a zero gradient (still counted in
    the mean's denominator), the same on every backend and in the reference; the other rows are unaffected."""
    g = torch.Generator().manual_seed(1)
    v = 2500  # several CPU chunks (1024) and Triton blocks
    s, t = torch.randn(5, v, generator=g) * 2, torch.randn(5, v, generator=g) * 2
    t[1] = NINF
    t[3, :1500] = NINF  # partly -inf in both: an ordinary row
    s[3, :1500] = NINF
    a = s.clone().requires_grad_(True)
    loss = kl_div(a, t, mode=mode, beta=beta, reduction=reduction, backend=backend)
    loss.sum().backward()
    r = s.double().requires_grad_(True)
    ref = kl_div_reference(r, t.double(), mode=mode, beta=beta, reduction=reduction)
    ref.sum().backward()
    assert torch.isfinite(ref).all() and torch.isfinite(r.grad).all()
    assert torch.isfinite(loss).all() and torch.isfinite(a.grad).all()
    assert (a.grad[1] == 0).all() and (r.grad[1] == 0).all()
    torch.testing.assert_close(loss.double(), ref.detach(), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(a.grad.double(), r.grad, rtol=1e-4, atol=1e-6)
    if reduction == "none":
        assert loss[1].item() == 0.0
    if reduction == "mean":  # the row is in the denominator: mean = sum of the 4 others / 5
        total = kl_div(s, t, mode=mode, beta=beta, reduction="sum", backend=backend)
        torch.testing.assert_close(loss, total / 5, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("mode,beta", MODES, ids=MODE_IDS)
def test_all_neg_inf_student_row_is_nan(backend, mode, beta):
    g = torch.Generator().manual_seed(2)
    s, t = torch.randn(3, 300, generator=g), torch.randn(3, 300, generator=g)
    s[0] = NINF
    loss = kl_div(s, t, mode=mode, beta=beta, reduction="none", backend=backend)
    ref = kl_div_reference(s, t, mode=mode, beta=beta, reduction="none")
    assert torch.isnan(loss[0]) and torch.isnan(ref[0])
    assert torch.isfinite(loss[1:]).all()
    # both rows -inf: still NaN (the student has no distribution either)
    t2 = t.clone()
    t2[0] = NINF
    assert torch.isnan(kl_div(s, t2, mode=mode, beta=beta, reduction="none", backend=backend)[0])


def test_masked_all_neg_inf_rows_are_zero(backend):
    s, t = torch.randn(3, 50), torch.randn(3, 50)
    s[0] = NINF
    t[0] = NINF
    mask = torch.tensor([False, True, True])
    loss = kl_div(s, t, mask=mask, reduction="none", backend=backend)
    assert loss[0].item() == 0.0 and torch.isfinite(loss).all()


# ------------------------------------------------------------------------------------------------
# large temperatures: fp32 accuracy up to MAX_TEMPERATURE, refused above
# ------------------------------------------------------------------------------------------------
def _rel_errors(backend: str, mode: str, beta: float, temperature: float) -> tuple[float, float, float, float]:
    """(ours loss, torch fp32 loss, ours grad, torch fp32 grad) relative errors against fp64."""
    g = torch.Generator().manual_seed(3)
    s = torch.randn(6, 4000, generator=g) * 3
    t = torch.randn(6, 4000, generator=g) * 3 + 0.5 * s
    r = s.double().requires_grad_(True)
    ref = kl_div_reference(r, t.double(), mode=mode, beta=beta, temperature=temperature, reduction="none")
    ref.sum().backward()
    a = s.clone().requires_grad_(True)
    ours = kl_div(a, t, mode=mode, beta=beta, temperature=temperature, reduction="none", backend=backend)
    ours.sum().backward()
    b = s.clone().requires_grad_(True)
    lq = torch.log_softmax(b / temperature, -1)
    lp = torch.log_softmax(t / temperature, -1)
    if mode == "forward":
        base = torch.nn.functional.kl_div(lq, lp, reduction="none", log_target=True).sum(-1)
    elif mode == "reverse":
        base = torch.nn.functional.kl_div(lp, lq, reduction="none", log_target=True).sum(-1)
    else:
        lm = torch.logsumexp(torch.stack([lp + torch.log(torch.tensor(beta)), lq + torch.log1p(torch.tensor(-beta))]),
                             0)
        base = beta * torch.nn.functional.kl_div(lm, lp, reduction="none", log_target=True).sum(-1) + \
            (1 - beta) * torch.nn.functional.kl_div(lm, lq, reduction="none", log_target=True).sum(-1)
    base = base * temperature ** 2
    base.sum().backward()

    def rel(x: torch.Tensor, y: torch.Tensor) -> float:
        return float((x.double() - y).abs().max() / y.abs().max())

    return rel(ours.detach(), ref.detach()), rel(base.detach(), ref.detach()), rel(a.grad, r.grad), \
        rel(b.grad, r.grad)


@pytest.mark.parametrize("temperature", [10.0, 30.0, 100.0])
@pytest.mark.parametrize("mode,beta", [("forward", 0.5), ("reverse", 0.5), ("jsd", 0.5), ("jsd", 0.1)],
                         ids=["fwd", "rev", "jsd.5", "jsd.1"])
def test_large_temperature_keeps_fp32_accuracy(backend, mode, beta, temperature):
    """Up to MAX_TEMPERATURE the loss and gradient errors stay within 2x the plain-torch fp32 ones (+1e-6)."""
    if backend == "reference":
        pytest.skip("the reference backend is the torch fp32 expression")
    lo, lt, go, gt = _rel_errors(backend, mode, beta, temperature)
    print(f"{backend} {mode} beta={beta} T={temperature}: loss rel err {lo:.2e} (torch fp32 {lt:.2e}), "
          f"grad {go:.2e} (torch fp32 {gt:.2e})")
    assert lo <= 2 * lt + 1e-6, (lo, lt)
    assert go <= 2 * gt + 1e-6, (go, gt)


def test_temperature_above_the_bound_is_refused():
    s, t = torch.randn(2, 10), torch.randn(2, 10)
    h, w = torch.randn(2, 4), torch.randn(10, 4)
    too_hot = MAX_TEMPERATURE * 1.01
    calls = [lambda: kl_div(s, t, temperature=too_hot), lambda: kl_div_reference(s, t, temperature=too_hot),
             lambda: fused_linear_kl_div(h, w, h, w, temperature=too_hot),
             lambda: KLDivLoss(temperature=too_hot), lambda: FusedLinearKLDivLoss(temperature=1e6)]
    for call in calls:
        with pytest.raises(ValueError, match="temperature must be <="):
            call()
    assert torch.isfinite(kl_div(s, t, temperature=MAX_TEMPERATURE))


@pytest.mark.parametrize("mode,beta", MODES, ids=MODE_IDS)
def test_nan_in_either_input_is_nan_everywhere(backend, mode, beta):
    s, t = torch.randn(3, 40), torch.randn(3, 40)
    s[0, 3] = float("nan")
    t[1, 7] = float("nan")
    for fn in (lambda: kl_div(s, t, mode=mode, beta=beta, reduction="none", backend=backend),
               lambda: kl_div_reference(s, t, mode=mode, beta=beta, reduction="none")):
        loss = fn()
        assert torch.isnan(loss[:2]).all() and torch.isfinite(loss[2]), loss
