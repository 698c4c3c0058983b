"""Triton fused KL-divergence kernels (minitron.kernels.kl_div) vs a float64 torch reference.

Runs on CUDA tensors with compiled Triton on a GPU, and on CPU tensors under the Triton interpreter otherwise
(TRITON_INTERPRET=1, set by tests/conftest.py before triton is imported, only when there is no GPU).
"""
import os
import math  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

from minitron.kernels.kl_div import kl_div_fwd  # noqa: E402

if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
    pytest.skip("needs TRITON_INTERPRET=1 (set before triton import) or a GPU",
                allow_module_level=True)

# The interpreter evaluates both sides of tl.where (e.g. -inf - -inf on masked lanes) in numpy.
pytestmark = pytest.mark.filterwarnings(
    "ignore:(invalid value|divide by zero) encountered:RuntimeWarning")

DEVICE = "cpu" if os.environ.get("TRITON_INTERPRET") == "1" else "cuda"
INF = math.inf

# (mode, beta): forward, reverse, JSD with beta 0 / 0.5 / 1
MODES = [(0, 0.5), (1, 0.5), (2, 0.0), (2, 0.5), (2, 1.0)]
MODE_IDS = ["fwd", "rev", "jsd0", "jsd.5", "jsd1"]

# loss: rtol, atol; grad: rtol, atol relative to max |grad| of the row set
TOL = {
    torch.float32: dict(loss=(1e-4, 1e-5), grad=(1e-4, 1e-5)),
    torch.bfloat16: dict(loss=(1e-4, 1e-5), grad=(1e-2, 2e-3)),
    torch.float16: dict(loss=(1e-4, 1e-5), grad=(2e-3, 2e-4)),
}


# ----------------------------------------------------------------------------- reference
def _kl_terms(log_x: torch.Tensor, log_y: torch.Tensor) -> torch.Tensor:
    """x * (log x - log y) elementwise, 0 where x == 0 (NaN-free autograd through the mask)."""
    mask = log_x > -INF
    lx = torch.where(mask, log_x, torch.zeros_like(log_x))
    ly = torch.where(mask, log_y, torch.zeros_like(log_y))
    return torch.where(mask, lx.exp() * (lx - ly), torch.zeros_like(lx))


def reference(student, teacher, weight, mode, inv_t, beta, scale):
    """float64 loss [N] and grad [N, V] (autograd) following the backend contract."""
    s = student.detach().double().clone().requires_grad_(True)
    log_q = torch.log_softmax(s * inv_t, dim=-1)
    log_p = torch.log_softmax(teacher.double() * inv_t, dim=-1)
    if mode == 0 or (mode == 2 and beta == 0.0):  # JSD ends: TRL convention, beta=0 forward, beta=1 reverse
        d = _kl_terms(log_p, log_q).sum(-1)
    elif mode == 1 or (mode == 2 and beta == 1.0):
        d = _kl_terms(log_q, log_p).sum(-1)
    else:
        m = beta * log_p.exp() + (1 - beta) * log_q.exp()
        pos = m > 0
        log_m = torch.where(pos, torch.log(torch.where(pos, m, torch.ones_like(m))),
                            torch.full_like(m, -INF))
        d = beta * _kl_terms(log_p, log_m).sum(-1) + (1 - beta) * _kl_terms(log_q, log_m).sum(-1)
    if s.shape[0] > 0:
        (g,) = torch.autograd.grad(d.sum(), s)
    else:
        g = torch.zeros_like(s)
    w = weight.double()
    loss = (w * scale * d).detach()
    grad = g * (w * scale)[:, None]
    skip = w == 0
    loss[skip] = 0.0
    grad[skip] = 0.0
    return loss, grad


# ----------------------------------------------------------------------------- helpers
def make(n, v, dtype=torch.float32, seed=0, spread=3.0, row_stride=None, zero_w=True):
    gen = torch.Generator().manual_seed(seed)
    stride = v if row_stride is None else row_stride
    base_s = torch.randn(n, stride, generator=gen) * spread
    base_t = torch.randn(n, stride, generator=gen) * spread + 0.3 * base_s  # correlated
    student = base_s.to(dtype).to(DEVICE)[:, :v]  # slice on the device: row stride kept
    teacher = base_t.to(dtype).to(DEVICE)[:, :v]
    weight = torch.rand(n, generator=gen) + 0.5
    if zero_w and n >= 2:
        weight[1] = 0.0
    return student, teacher, weight.to(DEVICE)


def check(student, teacher, weight, mode, inv_t=1.0, beta=0.5, scale=1.0, block_v=None,
          check_grad=True):
    loss, grad = kl_div_fwd(student, teacher, weight, mode, inv_t, beta, scale, block_v=block_v)
    n, v = student.shape
    assert loss.shape == (n,) and loss.dtype == torch.float32
    assert grad.shape == (n, v) and grad.dtype == student.dtype and grad.is_contiguous()
    ref_loss, ref_grad = reference(student.cpu(), teacher.cpu(), weight.cpu(), mode, inv_t, beta,
                                   scale)
    tol = TOL[student.dtype]
    rl, al = tol["loss"]
    torch.testing.assert_close(loss.cpu().double(), ref_loss, rtol=rl, atol=al, equal_nan=True)
    if check_grad:
        rg, ag = tol["grad"]
        finite = ref_grad[torch.isfinite(ref_grad)]
        gmax = finite.abs().max().item() if finite.numel() else 0.0
        # fp32 rounding of logit differences / D of size L (|a - b| up to L) is unavoidable: it
        # bounds the grad_k error by ~eps * L * (Q_k + P_k) * |w * scale * inv_t| even for an
        # exact-math kernel (torch fp32 autograd shows the same).
        a = student.cpu().double() * inv_t
        b = teacher.cpu().double() * inv_t
        diff = (a - b).abs()
        big = torch.where(torch.isfinite(diff), diff, torch.zeros_like(diff)).amax(-1, keepdim=True)
        mass = torch.softmax(a, -1).nan_to_num(0.0) + torch.softmax(b, -1).nan_to_num(0.0)
        coef = (weight.cpu().double() * scale * inv_t).abs()[:, None]
        slack = 16 * 2.0**-23 * (1.0 + big) * mass * coef
        got = grad.cpu().double()
        ok = ((got - ref_grad).abs() <= ag * gmax + rg * ref_grad.abs() + slack)
        ok |= (got.isnan() & ref_grad.isnan()) | (got == ref_grad)
        bad = ~ok
        assert not bad.any(), (
            f"{int(bad.sum())} grad mismatches, e.g. got {got[bad][:4].tolist()} "
            f"want {ref_grad[bad][:4].tolist()} (max |ref| {gmax:.3g})")
    return loss, grad


# ----------------------------------------------------------------------------- tests
@pytest.mark.parametrize("mode,beta", MODES, ids=MODE_IDS)
@pytest.mark.parametrize("inv_t", [0.5, 1.0, 2.0])
@pytest.mark.parametrize("v,block_v", [(1, None), (7, None), (1000, None), (1000, 128)])
def test_matches_reference(mode, beta, inv_t, v, block_v):
    student, teacher, weight = make(3, v, seed=v + int(10 * inv_t))
    check(student, teacher, weight, mode, inv_t, beta, scale=0.7, block_v=block_v)


@pytest.mark.parametrize("mode,beta", MODES, ids=MODE_IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16],
                         ids=["fp32", "bf16", "fp16"])
def test_dtypes(mode, beta, dtype):
    student, teacher, weight = make(3, 1000, dtype=dtype, seed=1)
    check(student, teacher, weight, mode, 1.5, beta, scale=2.0, block_v=256)


@pytest.mark.parametrize("mode,beta", MODES, ids=MODE_IDS)
def test_large_vocab(mode, beta):
    student, teacher, weight = make(2, 32001, seed=2, spread=4.0, zero_w=False)
    check(student, teacher, weight, mode, 1.0, beta, scale=1.0)


def test_large_vocab_bf16_temperature():
    student, teacher, weight = make(1, 32001, dtype=torch.bfloat16, seed=3, zero_w=False)
    check(student, teacher, weight, 2, 0.5, 0.3, scale=0.25)


@pytest.mark.parametrize("mode,beta", MODES, ids=MODE_IDS)
def test_empty_and_single_row(mode, beta):
    student, teacher, weight = make(0, 17)
    loss, grad = kl_div_fwd(student, teacher, weight, mode, 1.0, beta, 1.0)
    assert loss.shape == (0,) and grad.shape == (0, 17)
    student, teacher, weight = make(1, 17, seed=4)
    check(student, teacher, weight, mode, 1.0, beta, scale=3.0)


def test_identical_inputs_give_zero():
    student, _, weight = make(3, 300, seed=5, zero_w=False)
    for mode, beta in MODES:
        loss, grad = kl_div_fwd(student, student.clone(), weight, mode, 1.3, beta, 1.0)
        assert loss.abs().max().item() < 1e-5
        assert grad.abs().max().item() < 1e-6


def test_zero_weight_rows_skipped_even_with_nan():
    student, teacher, weight = make(3, 50, seed=6)
    student[1, 3] = float("nan")
    teacher[1, :] = -INF
    for mode, beta in MODES:
        loss, grad = check(student, teacher, weight, mode, 1.0, beta, 1.0)
        assert loss[1].item() == 0.0
        assert torch.count_nonzero(grad[1]).item() == 0
        assert torch.isfinite(loss[[0, 2]]).all()


@pytest.mark.parametrize("mode,beta", MODES, ids=MODE_IDS)
def test_neg_inf_shared_mask(mode, beta):
    """-inf at the same positions in both (vocab padding); includes a fully -inf first chunk."""
    student, teacher, weight = make(3, 300, seed=7, zero_w=False)
    gen = torch.Generator().manual_seed(8)
    mask = (torch.rand(3, 300, generator=gen) < 0.3).to(DEVICE)
    mask[:, :64] = True  # first chunk of 64 entirely -inf
    mask[0, 128:192] = True  # and a middle chunk
    student = student.masked_fill(mask, -INF)
    teacher = teacher.masked_fill(mask, -INF)
    loss, grad = check(student, teacher, weight, mode, 1.7, beta, 0.5, block_v=64)
    assert torch.isfinite(loss).all()
    assert (grad[mask] == 0).all()


@pytest.mark.parametrize("mode,beta,which", [
    (0, 0.5, "teacher"), (1, 0.5, "student"), (2, 0.5, "teacher"), (2, 0.5, "student"),
    (2, 0.0, "teacher"), (2, 1.0, "student"),  # JSD ends: beta=0 forward, beta=1 reverse KL (TRL convention)
])
def test_neg_inf_one_side_finite(mode, beta, which):
    """-inf only where the outer distribution has no mass: finite loss, matches the reference."""
    student, teacher, weight = make(3, 200, seed=9)
    gen = torch.Generator().manual_seed(10)
    mask = (torch.rand(3, 200, generator=gen) < 0.25).to(DEVICE)
    mask[:, 64:128] = True
    if which == "teacher":
        teacher = teacher.masked_fill(mask, -INF)
    else:
        student = student.masked_fill(mask, -INF)
    loss, _ = check(student, teacher, weight, mode, 1.0, beta, 1.0, block_v=64)
    assert torch.isfinite(loss).all()


@pytest.mark.parametrize("mode,beta,which", [
    (0, 0.5, "student"), (1, 0.5, "teacher"), (2, 0.0, "student"), (2, 1.0, "teacher"),
])
def test_neg_inf_gives_pos_inf_loss(mode, beta, which):
    student, teacher, weight = make(3, 200, seed=11)
    target = student if which == "student" else teacher
    target[0, 5] = -INF  # single entry in the first chunk
    target[2, 150:] = -INF  # a trailing partial chunk
    loss, grad = kl_div_fwd(student, teacher, weight, mode, 1.0, beta, 1.0, block_v=64)
    assert loss[0].item() == INF and loss[2].item() == INF
    assert loss[1].item() == 0.0
    assert not torch.isnan(loss).any()
    if mode == 0:  # forward-KL gradient Q - P stays finite; compare with the reference
        check(student, teacher, weight, mode, 1.0, beta, 1.0, block_v=64)


@pytest.mark.parametrize("mode,beta", MODES, ids=MODE_IDS)
def test_nan_and_all_neg_inf_rows(mode, beta):
    student, teacher, weight = make(4, 150, seed=12, zero_w=False)
    student[0, 77] = float("nan")
    teacher[2, :] = -INF
    student[3, :] = -INF
    loss, grad = kl_div_fwd(student, teacher, weight, mode, 1.0, beta, 1.0, block_v=64)
    assert torch.isnan(loss[[0, 3]]).all()
    # an all -inf teacher row (no target distribution) counts like a masked token: 0, zero gradient
    assert loss[2].item() == 0.0 and (grad[2] == 0).all()
    good_loss, _ = check(student[1:2], teacher[1:2], weight[1:2], mode, 1.0, beta, 1.0, block_v=64)
    torch.testing.assert_close(loss[1:2], good_loss)  # other rows of the launch are unaffected


@pytest.mark.parametrize("mode,beta", MODES, ids=MODE_IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_strided_rows(mode, beta, dtype):
    student, _, weight = make(3, 333, dtype=dtype, seed=13, row_stride=400)
    _, teacher, _ = make(3, 333, dtype=dtype, seed=14, row_stride=512)
    assert student.stride(0) == 400 and teacher.stride(0) == 512 and not student.is_contiguous()
    check(student, teacher, weight, mode, 0.8, beta, 1.1, block_v=128)


def test_rejects_bad_input():
    student, teacher, weight = make(2, 10)
    with pytest.raises(ValueError, match="mode"):
        kl_div_fwd(student, teacher, weight, 3, 1.0, 0.5, 1.0)
    with pytest.raises(ValueError, match="stride"):
        kl_div_fwd(student.t().contiguous().t(), teacher, weight, 0, 1.0, 0.5, 1.0)
    with pytest.raises(TypeError):
        kl_div_fwd(student, teacher.half(), weight, 0, 1.0, 0.5, 1.0)


try:
    from hypothesis import given, settings, strategies as st
except ImportError:  # pragma: no cover
    given = None

if given is not None:

    @settings(max_examples=20, deadline=None, derandomize=True)
    @given(
        n=st.integers(1, 3),
        v=st.integers(1, 200),
        mode_beta=st.sampled_from(MODES + [(2, 0.2), (2, 0.9)]),
        inv_t=st.floats(0.25, 4.0),
        scale=st.sampled_from([-1.5, -0.3, 0.5, 1.0, 2.0]),
        block_v=st.sampled_from([16, 32, None]),
        seed=st.integers(0, 2**16),
    )
    def test_property_matches_reference(n, v, mode_beta, inv_t, scale, block_v, seed):
        mode, beta = mode_beta
        student, teacher, weight = make(n, v, seed=seed)
        loss, _ = check(student, teacher, weight, mode, inv_t, beta, scale, block_v=block_v)
        # divergences are non-negative: sign of the loss follows weight * scale
        assert (loss * math.copysign(1.0, scale) >= -1e-5).all()


@pytest.mark.parametrize("mode,beta", MODES, ids=MODE_IDS)
def test_loss_only_matches(mode, beta):
    """need_grad=False compiles the gradient passes out: same loss, empty [0, V] gradient."""
    student, teacher, weight = make(4, 300, seed=21)
    student[0, :64] = -INF
    loss, grad = kl_div_fwd(student, teacher, weight, mode, 1.2, beta, 0.9, block_v=64)
    loss_o, empty = kl_div_fwd(student, teacher, weight, mode, 1.2, beta, 0.9, block_v=64, need_grad=False)
    assert grad.shape == (4, 300) and empty.shape == (0, 300)
    torch.testing.assert_close(loss_o, loss, rtol=0, atol=0, equal_nan=True)
