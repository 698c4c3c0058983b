"""minitron.integrations.liger against Liger-Kernel's losses (Triton interpreter on CPU) and torch.nn.KLDivLoss.

Liger comparisons are skipped when liger_kernel is not installed (CI does not have it).
"""
from __future__ import annotations

import pytest
import torch

from minitron.integrations import liger as ml
from tests.integrations.conftest import require_new_jsd

# Liger's kernels, run by the Triton interpreter, compute inf - inf in masked lanes (numpy warns; results are fine).
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered in subtract:RuntimeWarning")

BETAS = (0.0, 0.1, 0.5, 0.9, 1.0)


def _rows(n: int, v: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    s = 2.0 * torch.randn(n, v, generator=g)
    t = 0.6 * s + 2.0 * torch.randn(n, v, generator=g)
    labels = torch.randint(0, v, (n,), generator=g)
    labels[::3] = -100
    return s, t, labels


def _grad_of(fn, *leaves):
    xs = [x.clone().requires_grad_(True) for x in leaves]
    out = fn(*xs)
    out.backward()
    return out.detach(), [x.grad for x in xs]


def _close(a, b, what, rtol=2e-5):
    scale = b.abs().max().item()
    torch.testing.assert_close(a.float(), b.float(), rtol=rtol, atol=rtol * scale + 1e-9, msg=lambda m: f"{what}: {m}")


@pytest.fixture(scope="module")
def liger():
    return pytest.importorskip("liger_kernel.transformers")


@pytest.mark.parametrize("with_labels", [False, True])
@pytest.mark.parametrize("beta", BETAS)
def test_jsd_matches_liger(liger, beta: float, with_labels: bool) -> None:
    require_new_jsd(beta)
    s, t, labels = _rows(9, 1000, seed=int(10 * beta))
    lab = labels if with_labels else None
    # Gradients w.r.t. the logits, through the log_softmax both losses expect in front of them.
    ref, ref_g = _grad_of(lambda x: liger.LigerJSD(beta=beta)(x.log_softmax(-1), t.log_softmax(-1), lab), s)
    ours, our_g = _grad_of(lambda x: ml.JSD(beta=beta)(x.log_softmax(-1), t.log_softmax(-1), lab), s)
    raw, raw_g = _grad_of(lambda x: ml.JSD(beta=beta)(x, t, lab), s)  # logits straight in: same thing
    assert ref.item() > 1e-3
    _close(ours, ref, f"beta={beta} value")
    _close(our_g[0], ref_g[0], f"beta={beta} logit gradient", rtol=1e-4)
    _close(raw, ref, f"beta={beta} value (raw logits)")
    _close(raw_g[0], ref_g[0], f"beta={beta} logit gradient (raw logits)", rtol=1e-4)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("beta", [0.0, 0.1, 0.5, 1.0])
def test_fused_linear_jsd_matches_liger(liger, beta: float, temperature: float) -> None:
    require_new_jsd(beta)
    g = torch.Generator().manual_seed(int(10 * beta))
    n, hs, ht, v = 10, 16, 24, 1003
    h_s, h_t = torch.randn(n, hs, generator=g), torch.randn(n, ht, generator=g)
    w_s, w_t = torch.randn(v, hs, generator=g) * 0.6, torch.randn(v, ht, generator=g) * 0.6
    labels = torch.randint(0, v, (n,), generator=g)
    labels[1::4] = -100
    ref, ref_g = _grad_of(lambda a, b: liger.LigerFusedLinearJSD(jsd_beta=beta, temperature=temperature)(
        a, b, h_t, w_t, labels), h_s, w_s)
    ours, our_g = _grad_of(lambda a, b: ml.FusedLinearJSD(jsd_beta=beta, temperature=temperature)(
        a, b, h_t, w_t, labels), h_s, w_s)
    assert ref.item() > 1e-3
    _close(ours, ref, f"beta={beta} T={temperature} value", rtol=1e-4)
    for name, a, b in zip(("input", "weight"), our_g, ref_g):
        _close(a, b, f"beta={beta} T={temperature} {name} gradient", rtol=1e-3)


@pytest.mark.filterwarnings("ignore:reduction. 'mean' divides the total loss:UserWarning")  # torch's own advice
@pytest.mark.parametrize("log_target", [False, True])
@pytest.mark.parametrize("reduction", ["batchmean", "sum", "mean", "none"])
def test_kl_div_loss_matches_torch(reduction: str, log_target: bool) -> None:
    s, t, _ = _rows(7, 513, seed=4)
    target = t.log_softmax(-1) if log_target else t.softmax(-1)
    target_ref = target
    if not log_target:
        target = target.clone()
        target[0, :5] = 0.0  # zero teacher probabilities are legal
        target = target / target.sum(-1, keepdim=True)  # (ours renormalises the target; torch takes it as is)
        target_ref = target
    torch_loss = torch.nn.KLDivLoss(reduction=reduction, log_target=log_target)

    def ref_fn(x):
        out = torch_loss(x.log_softmax(-1), target_ref)
        return out.sum(-1).sum() if reduction == "none" else out  # torch's "none" is elementwise

    def our_fn(x):
        out = ml.KLDivLoss(reduction=reduction, log_target=log_target)(x.log_softmax(-1), target)
        return out.sum() if reduction == "none" else out

    ref, ref_g = _grad_of(ref_fn, s)
    ours, our_g = _grad_of(our_fn, s)
    _close(ours, ref, f"{reduction} value")
    _close(our_g[0], ref_g[0], f"{reduction} gradient", rtol=1e-4)


def test_kl_div_loss_none_is_per_row() -> None:
    s, t, _ = _rows(5, 64, seed=1)
    ours = ml.kl_div_loss(s.log_softmax(-1), t.softmax(-1), reduction="none")
    ref = torch.nn.functional.kl_div(s.log_softmax(-1), t.softmax(-1), reduction="none").sum(-1)
    assert ours.shape == (5,)
    _close(ours, ref, "per-row KL")


def test_liger_modules_reject_bad_arguments() -> None:
    with pytest.raises(ValueError, match="beta"):
        ml.JSD(beta=2.0)
    with pytest.raises(ValueError, match="reduction"):
        ml.KLDivLoss(reduction="avg")
    s, t, labels = _rows(4, 10, seed=0)
    with pytest.raises(ValueError, match="shift_labels"):
        ml.JSD()(s, t, labels[:2])
