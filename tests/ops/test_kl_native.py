"""The raw native op ``torch.ops.minitron._kl_div_fwd_native`` (CPU C++ kernel) against an fp64 oracle.

The oracle is written here in plain torch (log_softmax in float64, the divergence with zero-probability
terms masked, the gradient by autograd), independent of ``minitron.ops.kl_div``. Every test runs on each
CPU code path: MINITRON_CPU_ISA=avx512 / avx2 / scalar (the kernel reads it per call; a path the CPU
lacks is skipped). The scalar path runs kl_math.h's per-element online-softmax update, i.e. the
arithmetic of the CUDA kernel.
"""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from minitron import _ext

OP = "_kl_div_fwd_native"
pytestmark = pytest.mark.skipif(not _ext.has_native_op(OP), reason=f"extension without {OP} (build it)")

ISAS = ["avx512", "avx2", "scalar"]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# (mode, beta): JSD at the interior betas, and at 0 / 1 where it equals forward / reverse KL (TRL convention).
MODES = [(0, 0.5), (1, 0.5), (2, 0.5), (2, 0.3), (2, 0.0), (2, 1.0)]
NEG_INF = float("-inf")


def _op(*args):
    return getattr(torch.ops.minitron, OP)(*args)


@pytest.fixture(params=ISAS)
def isa(request, monkeypatch):
    monkeypatch.setenv("MINITRON_CPU_ISA", request.param)
    got = _ext.build_info().get("cpu_isa")
    if got is not None and got != request.param:
        pytest.skip(f"this CPU cannot run the {request.param} path (capped to {got})")
    return request.param


@pytest.fixture
def two_threads():
    """Row splitting across threads needs N < threads: make sure there are 2."""
    old = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(old)


# ------------------------------------------------------------------------------------------------
# fp64 oracle
# ------------------------------------------------------------------------------------------------
def _kl(lx: torch.Tensor, ly: torch.Tensor) -> torch.Tensor:
    """sum_k X_k (log X_k - log Y_k) over the last axis, terms with X_k == 0 exactly 0 (NaN-free grads)."""
    pos = lx > NEG_INF
    diff = torch.where(pos, lx - ly, torch.zeros_like(lx))
    return (lx.exp() * diff).sum(-1)


def divergence(a: torch.Tensor, b: torch.Tensor, mode: int, beta: float) -> torch.Tensor:
    """D per row for student logits a and teacher logits b (already divided by the temperature)."""
    la = torch.log_softmax(a, -1)  # log Q
    lb = torch.log_softmax(b, -1)  # log P
    if mode == 0 or (mode == 2 and beta == 0.0):
        return _kl(lb, la)
    if mode == 1 or (mode == 2 and beta == 1.0):
        return _kl(la, lb)
    both = (la == NEG_INF) & (lb == NEG_INF)
    zero = torch.zeros_like(la)
    lm = torch.logaddexp(torch.where(both, zero, lb) + math.log(beta),  # M = beta P + (1 - beta) Q
                         torch.where(both, zero, la) + math.log1p(-beta))
    lm = torch.where(both, torch.full_like(lm, NEG_INF), lm)
    return beta * _kl(lb, lm) + (1.0 - beta) * _kl(la, lm)


def reference(student, teacher, weight, mode, inv_t, beta, scale):
    """(loss [N] f64, grad [N, V] f64); rows with weight 0 are 0; grads of non-finite rows are NaN."""
    s = student.detach().double().requires_grad_(True)
    t = teacher.detach().double()
    w = weight.double()
    d = divergence(s * inv_t, t * inv_t, mode, beta)
    loss = torch.where(w == 0, torch.zeros_like(d), w * scale * d)
    finite = torch.isfinite(loss)
    if finite.any():
        (grad,) = torch.autograd.grad(loss[finite].sum(), s)
    else:
        grad = torch.zeros_like(s)
    grad = grad.detach().clone()
    grad[~finite] = float("nan")
    return loss.detach(), grad


# ------------------------------------------------------------------------------------------------
# comparison
# ------------------------------------------------------------------------------------------------
GRAD_RTOL = {torch.float32: 1e-4, torch.bfloat16: 8e-3, torch.float16: 1e-3}


def mismatches(student, teacher, weight, loss, grad, ref_loss, ref_grad, inv_t=1.0, scale=1.0) -> list[str]:
    """Why (loss, grad) differ from the oracle beyond the per-dtype tolerances ([] when they agree).

    loss: accumulated in fp32 from exactly representable inputs, so the same tolerance for every
    dtype: fp32 rounding of log-sum-exps of size ~ max|logit| / T. grad: rounded to the input dtype
    (relative GRAD_RTOL, plus an absolute floor relative to the row's largest entry for cancellation
    in Q - P and for fp16 subnormals). NaN must match NaN, +inf must match +inf; gradients are
    compared on rows with a finite loss only.
    """
    why = []
    dtype = grad.dtype
    if loss.dtype != torch.float32 or loss.shape != ref_loss.shape:
        return [f"loss dtype/shape {loss.dtype}/{tuple(loss.shape)}"]
    if grad.shape != ref_grad.shape or dtype != student.dtype or not grad.is_contiguous():
        return [f"grad dtype/shape/layout {dtype}/{tuple(grad.shape)}"]
    lv = loss.double()
    mag = float(torch.cat([student.flatten(), teacher.flatten()]).double().nan_to_num(0, 0, 0).abs().max()) if \
        student.numel() else 0.0
    w = weight.double().abs()
    ltol = 1e-5 + w * abs(scale) * 2e-7 * (8.0 + mag * inv_t) * 4 + 1e-4 * ref_loss.abs().nan_to_num(0, 0, 0)
    same_nan = torch.isnan(lv) == torch.isnan(ref_loss)
    same_inf = (lv == math.inf) == (ref_loss == math.inf)
    fin = torch.isfinite(ref_loss)
    if not bool(same_nan.all()):
        why.append(f"NaN pattern: got {lv.tolist()} want {ref_loss.tolist()}")
    if not bool(same_inf.all()):
        why.append(f"+inf pattern: got {lv.tolist()} want {ref_loss.tolist()}")
    bad = fin & ~((lv - ref_loss).abs() <= ltol)
    if bool(bad.any()):
        i = int(bad.nonzero()[0])
        why.append(f"loss[{i}] = {lv[i].item()!r}, want {ref_loss[i].item()!r} (tol {ltol[i].item():.3g})")
    zero_rows = weight == 0
    if bool(zero_rows.any()):
        if not bool((loss[zero_rows] == 0).all()) or not bool((grad[zero_rows] == 0).all()):
            why.append("rows with weight 0 must give loss 0 and an all-zero gradient")
    rows = fin & ~zero_rows
    if bool(rows.any()):
        g = grad.double()[rows]
        r = ref_grad[rows]
        if not bool(torch.isfinite(g).all()):
            why.append("non-finite gradient in a row with a finite loss")
        rowmax = r.abs().amax(-1, keepdim=True)
        # reverse KL / JSD: coef * Q_k * (log-ratio - D), whose difference carries the fp32 rounding of
        # log-probabilities of size ~ max|logit| / T
        q = torch.softmax(student.double()[rows].nan_to_num(0.0, 0.0, NEG_INF) * inv_t, -1)
        coef = (w[rows] * abs(scale) * inv_t).unsqueeze(-1)
        lp_err = coef * q * 2e-7 * (8.0 + mag * inv_t) * 4
        gtol = GRAD_RTOL[dtype] * r.abs() + 2e-5 * rowmax + lp_err + (1e-7 if dtype == torch.float16 else 1e-12)
        err = (g - r).abs()
        if not bool((err <= gtol).all()):
            k = int((err - gtol).argmax())
            why.append(f"grad: max excess at flat index {k}: got {g.flatten()[k].item()!r}, "
                       f"want {r.flatten()[k].item()!r} (tol {gtol.flatten()[k].item():.3g})")
    return why


def check(student, teacher, weight, mode, inv_t=1.0, beta=0.5, scale=1.0):
    loss, grad = _op(student, teacher, weight, mode, inv_t, beta, scale)
    ref_loss, ref_grad = reference(student, teacher, weight, mode, inv_t, beta, scale)
    why = mismatches(student, teacher, weight, loss, grad, ref_loss, ref_grad, inv_t, scale)
    assert not why, f"mode={mode} beta={beta} inv_t={inv_t} scale={scale} {student.dtype} " \
                    f"{tuple(student.shape)}: " + "; ".join(why)
    return loss, grad


def logits(n, v, dtype=torch.float32, std=3.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, v, generator=g, dtype=torch.float64) * std).to(dtype)


def weights(n, seed=0):
    g = torch.Generator().manual_seed(seed + 1000)
    w = torch.rand(n, generator=g) + 0.5
    if n >= 3:
        w[1] = 0.0
    return w


# ------------------------------------------------------------------------------------------------
# tests
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("mode,beta", MODES)
def test_modes_and_dtypes(isa, dtype, mode, beta):
    # V = 2500: three 1024-entry chunks, the last with a partial vector
    for n, v in [(3, 1000), (2, 2500)]:
        s, t = logits(n, v, dtype, seed=v), logits(n, v, dtype, seed=v + 1)
        check(s, t, weights(n), mode, inv_t=0.5, beta=beta, scale=1.5)


@pytest.mark.parametrize("n,v", [(n, v) for n in (0, 1, 3, 65) for v in (1, 7, 1000, 32001) if n * v < 65 * 32001])
def test_shapes(isa, two_threads, n, v):
    s, t = logits(n, v, seed=n * 7 + v), logits(n, v, seed=n * 7 + v + 1)
    for mode, beta in [(0, 0.5), (1, 0.5), (2, 0.3)]:
        loss, grad = check(s, t, weights(n), mode, inv_t=1.0, beta=beta, scale=1.0)
        assert loss.shape == (n,) and grad.shape == (n, v)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("n", [1, 2])
def test_llama3_vocab(isa, two_threads, dtype, n):
    """V = 128256 (Llama-3); n = 1 splits the row across the two threads, n = 2 runs a row per thread."""
    v = 128256
    s, t = logits(n, v, dtype, seed=11), logits(n, v, dtype, seed=12)
    w = torch.tensor([0.5, 2.0, 1.0][:n])
    for mode, beta in [(0, 0.5), (1, 0.5), (2, 0.5)]:
        check(s, t, w, mode, inv_t=1.0, beta=beta, scale=0.7)


@pytest.mark.parametrize("inv_t", [2.0, 1.0, 0.5])
@pytest.mark.parametrize("mode,beta", [(0, 0.5), (1, 0.5), (2, 0.3)])
def test_temperature_and_scale(isa, inv_t, mode, beta):
    s, t = logits(4, 777, seed=3), logits(4, 777, seed=4)
    w = torch.tensor([1.0, 0.25, 3.0, 1.0])
    loss, grad = check(s, t, w, mode, inv_t=inv_t, beta=beta, scale=2.5)
    # scale and weight enter linearly
    loss1, grad1 = _op(s, t, torch.ones(4), mode, inv_t, beta, 1.0)
    torch.testing.assert_close(loss, loss1 * w * 2.5, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(grad, grad1 * (w * 2.5)[:, None], rtol=1e-5, atol=1e-6 * float(grad.abs().max()))


def test_split_rows_match_unsplit(isa, two_threads):
    """A single row split over threads gives (nearly) what the same row gives among others."""
    s, t = logits(3, 40000, seed=5), logits(3, 40000, seed=6)
    w = torch.ones(3)
    for mode, beta in [(0, 0.5), (1, 0.5), (2, 0.5)]:
        full_loss, full_grad = _op(s, t, w, mode, 1.0, beta, 1.0)
        one_loss, one_grad = _op(s[1:2], t[1:2], w[1:2], mode, 1.0, beta, 1.0)
        torch.testing.assert_close(one_loss, full_loss[1:2], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(one_grad, full_grad[1:2], rtol=1e-4, atol=1e-5 * float(full_grad.abs().max()))


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
def test_strided_rows(isa, dtype):
    n, v = 5, 1100
    big_s = logits(n, v + 37, dtype, seed=8)
    big_t = logits(n, 2 * v + 3, dtype, seed=9)
    s, t = big_s[:, 5:5 + v], big_t[:, v:2 * v]
    assert s.stride(0) == v + 37 and t.stride(0) == 2 * v + 3 and not s.is_contiguous()
    w = weights(n)
    for mode, beta in [(0, 0.5), (1, 0.5), (2, 0.3)]:
        loss, grad = check(s, t, w, mode, inv_t=1.0, beta=beta, scale=1.0)
        loss_c, grad_c = _op(s.contiguous(), t.contiguous(), w, mode, 1.0, beta, 1.0)
        assert torch.equal(loss, loss_c) and torch.equal(grad, grad_c)
    assert torch.equal(big_s[:, 5:5 + v], s)  # inputs untouched


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("mode,beta", MODES)
def test_neg_inf_entries(isa, dtype, mode, beta):
    """-inf logits: zero-probability terms are 0; the loss is +inf exactly where the math says so."""
    n, v = 6, 1500
    s, t = logits(n, v, dtype, seed=21), logits(n, v, dtype, seed=22)
    g = torch.Generator().manual_seed(23)
    mask_s = torch.rand(n, v, generator=g) < 0.2
    mask_t = torch.rand(n, v, generator=g) < 0.2
    s[0][mask_s[0]] = NEG_INF          # row 0: student -inf where the teacher has mass
    t[1][mask_t[1]] = NEG_INF          # row 1: teacher -inf where the student has mass
    s[2][mask_s[2]] = NEG_INF          # row 2: both -inf on the same entries
    t[2][mask_s[2]] = NEG_INF
    s[3, 1024:] = NEG_INF              # row 3: whole chunks of -inf in both
    t[3, 1024:] = NEG_INF
    s[4, :1200] = NEG_INF              # row 4: student -inf on the first chunk(s) only, teacher too
    t[4, :1200] = NEG_INF
    s[5, :5] = NEG_INF                 # row 5: a few -inf in both, also in the last (partial) vector
    t[5, :5] = NEG_INF
    s[5, -3:] = NEG_INF
    t[5, -3:] = NEG_INF
    w = torch.ones(n)
    loss, grad = check(s, t, w, mode, inv_t=1.0, beta=beta, scale=1.0)
    fwd = mode == 0 or (mode == 2 and beta == 0.0)
    rev = mode == 1 or (mode == 2 and beta == 1.0)
    assert (loss[0].item() == math.inf) == fwd
    assert (loss[1].item() == math.inf) == rev
    assert torch.isfinite(loss[2:]).all()
    assert torch.isfinite(grad[2:]).all()
    if fwd:  # the gradient of the infinite row is still finite: coef * (Q - P)
        assert torch.isfinite(grad[0]).all()
    assert (grad[2][mask_s[2]] == 0).all() and (grad[3, 1024:] == 0).all()


@pytest.mark.parametrize("mode,beta", MODES)
def test_degenerate_rows(isa, mode, beta):
    """All -inf student rows and NaN rows give NaN loss (no crash); an all -inf teacher row (no target) and
    weight-0 rows give exact zeros."""
    n, v = 7, 300
    s, t = logits(n, v, seed=31), logits(n, v, seed=32)
    s[0] = NEG_INF                  # whole student -inf
    t[1] = NEG_INF                  # whole teacher -inf
    s[2, 17] = float("nan")         # NaN in the student
    t[3, 299] = float("nan")        # NaN in the teacher (last, partial vector)
    s[4] = float("nan")             # NaN row with weight 0 -> 0
    t[4, 3] = float("inf")
    w = torch.tensor([1.0, 1.0, 1.0, 1.0, 0.0, 1.0, 0.0])
    loss, grad = _op(s, t, w, mode, 1.0, beta, 1.0)
    assert torch.isnan(loss[[0, 2, 3]]).all(), loss
    assert loss[1].item() == 0.0 and (grad[1] == 0).all(), loss
    assert loss[4].item() == 0.0 and loss[6].item() == 0.0
    assert (grad[4] == 0).all() and (grad[6] == 0).all()
    check(s[4:], t[4:], w[4:], mode, beta=beta)


def test_v1_and_constant_rows(isa):
    """V = 1 and identical inputs: D = 0 (up to rounding) and an exactly zero gradient."""
    s = logits(4, 1, seed=41)
    t = logits(4, 1, seed=42)
    for mode, beta in MODES:
        loss, grad = _op(s, t, torch.ones(4), mode, 1.0, beta, 1.0)
        assert loss.abs().max() < 1e-6 and torch.equal(grad, torch.zeros(4, 1))
    x = logits(3, 5000, seed=43)
    for mode, beta in MODES:
        loss, grad = _op(x, x, torch.ones(3), mode, 1.0, beta, 1.0)
        assert loss.abs().max() < 1e-5 and grad.abs().max() < 1e-7


def test_isas_agree():
    """The three code paths give nearly the same numbers (no reference involved)."""
    import os

    s, t = logits(4, 4099, seed=51), logits(4, 4099, seed=52)
    w = weights(4)
    outs = {}
    old = os.environ.get("MINITRON_CPU_ISA")
    try:
        for isa_name in ISAS:
            os.environ["MINITRON_CPU_ISA"] = isa_name
            outs[isa_name] = [_op(s, t, w, m, 0.8, b, 1.0) for m, b in MODES]
    finally:
        if old is None:
            os.environ.pop("MINITRON_CPU_ISA", None)
        else:
            os.environ["MINITRON_CPU_ISA"] = old
    for isa_name in ISAS[1:]:
        for (l0, g0), (l1, g1) in zip(outs["scalar"], outs[isa_name]):
            torch.testing.assert_close(l1, l0, rtol=1e-5, atol=2e-6)
            torch.testing.assert_close(g1, g0, rtol=1e-4, atol=2e-9)


def test_bad_arguments():
    s, t, w = logits(2, 10), logits(2, 10), torch.ones(2)
    bad = [
        (s[0], t[0], w[:1], 0, 1.0, 0.5, 1.0),                     # 1-D
        (s, t[:, :9], w, 0, 1.0, 0.5, 1.0),                         # shape mismatch
        (s, t.double(), w, 0, 1.0, 0.5, 1.0),                       # dtype mismatch
        (s.double(), t.double(), w, 0, 1.0, 0.5, 1.0),              # unsupported dtype
        (s.t().contiguous().t(), t, w, 0, 1.0, 0.5, 1.0),           # stride(1) != 1
        (s, t, w.double(), 0, 1.0, 0.5, 1.0),                       # weight dtype
        (s, t, torch.ones(3), 0, 1.0, 0.5, 1.0),                    # weight size
        (s, t, w, 3, 1.0, 0.5, 1.0),                                # mode
        (s, t, w, 0, 0.0, 0.5, 1.0),                                # inv_temperature
        (s, t, w, 0, float("inf"), 0.5, 1.0),
        (s, t, w, 2, 1.0, 1.5, 1.0),                                # beta
        (logits(2, 0), logits(2, 0), w, 0, 1.0, 0.5, 1.0),          # V = 0
    ]
    for args in bad:
        with pytest.raises(RuntimeError):
            _op(*args)


def test_mismatch_detector_can_fail():
    """The comparison used above rejects wrong answers: a 2% gradient error, a swapped mode, a bad loss."""
    s, t, w = logits(3, 2000, seed=61), logits(3, 2000, seed=62), weights(3)
    loss, grad = _op(s, t, w, 0, 1.0, 0.5, 1.0)
    ref_loss, ref_grad = reference(s, t, w, 0, 1.0, 0.5, 1.0)
    assert not mismatches(s, t, w, loss, grad, ref_loss, ref_grad)
    g2 = grad.clone()
    k = int(g2[0].abs().argmax())
    g2[0, k] *= 1.02
    assert mismatches(s, t, w, loss, g2, ref_loss, ref_grad)
    l2 = loss.clone()
    l2[2] += 1e-3
    assert mismatches(s, t, w, l2, grad, ref_loss, ref_grad)
    rev_loss, rev_grad = reference(s, t, w, 1, 1.0, 0.5, 1.0)
    assert mismatches(s, t, w, loss, grad, rev_loss, rev_grad)
    nan_loss = loss.clone()
    nan_loss[0] = float("nan")
    assert mismatches(s, t, w, nan_loss, grad, ref_loss, ref_grad)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    n=st.integers(0, 5),
    v=st.integers(1, 3000),
    mode_beta=st.sampled_from(MODES + [(2, 0.9), (2, 0.05)]),
    dtype=st.sampled_from(DTYPES),
    std=st.sampled_from([0.1, 1.0, 4.0, 20.0]),
    inv_t=st.sampled_from([0.25, 1.0, 3.0]),
    isa_name=st.sampled_from(ISAS),
    neg_inf_frac=st.sampled_from([0.0, 0.0, 0.1, 0.7]),
    seed=st.integers(0, 2**16),
)
def test_property_random(n, v, mode_beta, dtype, std, inv_t, isa_name, neg_inf_frac, seed):
    import os

    mode, beta = mode_beta
    s, t = logits(n, v, dtype, std=std, seed=seed), logits(n, v, dtype, std=std, seed=seed + 1)
    if neg_inf_frac and n:
        g = torch.Generator().manual_seed(seed + 2)
        s[torch.rand(n, v, generator=g) < neg_inf_frac] = NEG_INF
        t[torch.rand(n, v, generator=g) < neg_inf_frac] = NEG_INF
        s[:, 0] = 0.0  # keep at least one finite entry per row
        t[:, 0] = 0.0
    w = torch.rand(n, generator=torch.Generator().manual_seed(seed + 3)) * 2
    old = os.environ.get("MINITRON_CPU_ISA")
    os.environ["MINITRON_CPU_ISA"] = isa_name
    try:
        check(s, t, w, mode, inv_t=inv_t, beta=beta, scale=1.0)
    finally:
        if old is None:
            os.environ.pop("MINITRON_CPU_ISA", None)
        else:
            os.environ["MINITRON_CPU_ISA"] = old


@pytest.mark.parametrize("mode,beta", MODES)
@pytest.mark.parametrize("n,v", [(1, 5000), (7, 1025), (3, 32001)])
def test_loss_only_equals_loss_with_gradient(isa, two_threads, mode, beta, n, v):
    """need_grad=False skips the gradient passes: the same loss bit for bit (the loss comes from the
    passes that still run), an empty [0, V] gradient, on the row-split (n < threads) and row paths."""
    g = torch.Generator().manual_seed(n * 131 + v)
    s = torch.randn(n, v, generator=g) * 3
    t = torch.randn(n, v, generator=g) * 3
    s[0, :40] = NEG_INF
    t[-1, 7] = NEG_INF
    w = torch.rand(n, generator=g) + 0.5
    if n > 2:
        w[1] = 0.0
    loss_g, grad = _op(s, t, w, mode, 1.3, beta, 0.7, True)
    loss_o, empty = _op(s, t, w, mode, 1.3, beta, 0.7, False)
    assert grad.shape == (n, v) and empty.shape == (0, v) and empty.dtype == s.dtype
    torch.testing.assert_close(loss_o, loss_g, rtol=0, atol=0, equal_nan=True)
