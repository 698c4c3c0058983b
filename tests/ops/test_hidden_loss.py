"""Fused hidden-state losses (cosine, MSE) against the fp64 plain-torch oracle, on every backend available here.

The C++ backend runs on each CPU code path (MINITRON_CPU_ISA=avx512 / avx2 / scalar; a path the CPU lacks is
skipped), Triton under the interpreter (tests/conftest.py), and the torch reference backend. fp32 accuracy is
held to the plain-torch fp32 expression's own error: ours may be at most about twice that (plus a few ulps).
"""
from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from minitron import _ext
from minitron.ops._dispatch import BackendUnavailableError, op_backends
from minitron.ops.hidden_loss import (HIDDEN_LOSSES, HiddenStateLoss, hidden_state_loss,
                                      hidden_state_loss_reference)

# The Triton interpreter evaluates both sides of tl.where in numpy (e.g. 1 / 0 on masked lanes).
pytestmark = pytest.mark.filterwarnings("ignore:(invalid value|divide by zero) encountered:RuntimeWarning")

ALL_BACKENDS = ["cpp", "triton", "reference"]
ISAS = ["avx512", "avx2", "scalar"]
LOSSES = list(HIDDEN_LOSSES)
REDUCTIONS = ["mean", "sum", "none"]


def _backend_or_skip(backend: str) -> str:
    try:
        op_backends("hidden_state_loss").select(backend, "cpu", torch.float32)
    except BackendUnavailableError as exc:
        if backend == "cpp" and os.environ.get("CI"):
            pytest.fail(f"the C++ backend must be built in CI: {exc}")
        pytest.skip(str(exc))
    return backend


@pytest.fixture(params=ALL_BACKENDS)
def backend(request) -> str:
    return _backend_or_skip(request.param)


@pytest.fixture(params=ISAS)
def isa(request, monkeypatch):
    _backend_or_skip("cpp")
    monkeypatch.setenv("MINITRON_CPU_ISA", request.param)
    got = _ext.build_info().get("cpu_isa")
    if got is not None and got != request.param:
        pytest.skip(f"this CPU cannot run the {request.param} path (capped to {got})")
    return request.param


def _inputs(lead: tuple, d: int, seed: int, dtype=torch.float32, related: bool = True):
    """Student / teacher hidden states; ``related``: the student is a noisy copy of the teacher (cos ~ 0.9, the
    regime of distillation, where 1 - cos is small and rounding matters most)."""
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(*lead, d, generator=g) * 2.0
    s = t + 0.4 * torch.randn(*lead, d, generator=g) if related else torch.randn(*lead, d, generator=g)
    return s.to(dtype), t.to(dtype)


def _run(s: torch.Tensor, t: torch.Tensor, mask, loss: str, reduction: str, backend: str):
    """Value and student gradient (of ``out.sum()``) of :func:`hidden_state_loss`."""
    a = s.detach().clone().requires_grad_(True)
    out = hidden_state_loss(a, t, mask, loss=loss, reduction=reduction, backend=backend)
    out.sum().backward()
    return out.detach(), a.grad


def _oracle(s: torch.Tensor, t: torch.Tensor, mask, loss: str, reduction: str, dtype=torch.float64):
    """Value and gradient of the plain-torch expression evaluated in ``dtype`` (fp64: the truth)."""
    a = s.detach().to(dtype).requires_grad_(True)
    out = hidden_state_loss_reference(a, t.to(dtype), mask, loss=loss, reduction=reduction)
    out.sum().backward()
    return out.detach(), a.grad


def _err(x: torch.Tensor, ref: torch.Tensor) -> float:
    return float((x.double() - ref.double()).abs().max()) if x.numel() else 0.0


def _ulps(ref: torch.Tensor, n: float = 4.0) -> float:
    """A floor of ``n`` fp32 ulps of the reference's magnitude (for when the plain expression happens to be exact)."""
    return n * 1.2e-7 * (float(ref.abs().max()) if ref.numel() else 0.0)


# ----------------------------------------------------------------------------------------------
# values and gradients
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("shape", [((3, 5), 64), ((2, 7), 33), ((4,), 2), ((1, 3), 100), ((2, 3), 1031)])
def test_fp32_matches_fp64_within_twice_plain_torch_error(backend, loss, reduction, shape):
    lead, d = shape
    if backend == "triton" and d > 200 and reduction != "mean":
        pytest.skip("interpreter time: one large shape per loss is enough")
    s, t = _inputs(lead, d, seed=d)
    mask = torch.rand(*lead, generator=torch.Generator().manual_seed(1)) > 0.3
    mask.view(-1)[0] = True
    truth_v, truth_g = _oracle(s, t, mask, loss, reduction)
    plain_v, plain_g = _oracle(s, t, mask, loss, reduction, dtype=torch.float32)
    v, g = _run(s, t, mask, loss, reduction, backend)
    assert v.dtype == torch.float32 and v.shape == truth_v.shape
    assert g.dtype == torch.float32 and g.shape == s.shape
    assert _err(v, truth_v) <= 2 * _err(plain_v, truth_v) + _ulps(truth_v), (_err(v, truth_v), _err(plain_v, truth_v))
    assert _err(g, truth_g) <= 2 * _err(plain_g, truth_g) + _ulps(truth_g), (_err(g, truth_g), _err(plain_g, truth_g))


@pytest.mark.parametrize("loss", LOSSES)
def test_cpu_paths(isa, loss):
    """Every ISA path of the C++ kernel, on row lengths around the vector widths (tails)."""
    for d in (2, 7, 8, 15, 16, 31, 32, 33, 100, 4099):
        s, t = _inputs((3,), d, seed=d)
        mask = torch.tensor([True, False, True])
        truth_v, truth_g = _oracle(s, t, mask, loss, "none")
        plain_v, plain_g = _oracle(s, t, mask, loss, "none", dtype=torch.float32)
        v, g = _run(s, t, mask, loss, "none", "cpp")
        assert _err(v, truth_v) <= 2 * _err(plain_v, truth_v) + _ulps(truth_v), (isa, d)
        assert _err(g, truth_g) <= 2 * _err(plain_g, truth_g) + _ulps(truth_g), (isa, d)
        assert torch.all(g[1] == 0)


@pytest.mark.parametrize("loss", LOSSES)
def test_one_dimensional_rows(backend, loss):
    """D = 1: cos is +-1, the cosine gradient is 0 up to rounding (its two terms cancel)."""
    s, t = _inputs((6,), 1, seed=22)
    v, g = _run(s, t, None, loss, "none", backend)
    ref_v, ref_g = _oracle(s, t, None, loss, "none")
    torch.testing.assert_close(v.double(), ref_v, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(g.double(), ref_g, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision(backend, loss, dtype):
    s, t = _inputs((4, 6), 96, seed=3, dtype=dtype)
    mask = torch.rand(4, 6, generator=torch.Generator().manual_seed(2)) > 0.2
    truth_v, truth_g = _oracle(s, t, mask, loss, "none")  # the truth of the rounded inputs
    v, g = _run(s, t, mask, loss, "none", backend)
    assert g.dtype == dtype and v.dtype == torch.float32
    # fp32 accumulation: the loss is fp32-accurate; the gradient is rounded once to the storage dtype
    assert _err(v, truth_v) <= 1e-5 * max(1.0, float(truth_v.abs().max()))
    eps = torch.finfo(dtype).eps
    assert _err(g, truth_g) <= eps * float(truth_g.abs().max()) + 1e-7


@pytest.mark.parametrize("loss", LOSSES)
def test_large_gradient_streams(loss):
    """A gradient above 32 MiB takes the C++ kernel's non-temporal store path."""
    _backend_or_skip("cpp")
    s, t = _inputs((2048,), 4112, seed=5)  # 33.7 MB fp32; D not a multiple of 32
    mask = torch.rand(2048, generator=torch.Generator().manual_seed(3)) > 0.1
    truth_v, truth_g = _oracle(s, t, mask, loss, "mean")
    v, g = _run(s, t, mask, loss, "mean", "cpp")
    assert _err(v, truth_v) <= 1e-6 * max(1.0, float(truth_v.abs()))
    assert _err(g, truth_g) <= 1e-5 * float(truth_g.abs().max())
    assert torch.all(g[~mask] == 0)


def test_triton_multi_block_rows():
    """Rows longer than the Triton block (several chunks per row), both losses, with a skipped row."""
    _backend_or_skip("triton")
    from minitron.kernels.hidden_loss import hidden_state_loss_fwd

    s, t = _inputs((3,), 70, seed=9)
    w = torch.tensor([0.5, 0.0, 2.0])
    for code, name in ((0, "cosine"), (1, "mse")):
        loss, grad = hidden_state_loss_fwd(s, t, w, code, block_d=16)
        ref_l, ref_g = torch.ops.minitron.hidden_state_loss_fwd(s, t, w, code, "reference")
        torch.testing.assert_close(loss, ref_l, rtol=1e-5, atol=1e-6, msg=name)
        torch.testing.assert_close(grad, ref_g, rtol=1e-5, atol=1e-7, msg=name)
        assert torch.all(grad[1] == 0) and loss[1] == 0


def test_matches_torch_functional():
    """The definitions are those of torch's own expressions (cosine_similarity, mse_loss)."""
    s, t = _inputs((5, 4), 48, seed=11, dtype=torch.float32)
    s64, t64 = s.double(), t.double()
    torch.testing.assert_close(hidden_state_loss_reference(s64, t64, loss="cosine"),
                               (1 - F.cosine_similarity(s64, t64, dim=-1)).mean())
    torch.testing.assert_close(hidden_state_loss_reference(s64, t64, loss="mse"), F.mse_loss(s64, t64))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(n=st.integers(0, 6), d=st.integers(1, 300), loss=st.sampled_from(LOSSES),
       reduction=st.sampled_from(REDUCTIONS), scale=st.sampled_from([1e-3, 1.0, 1e3]),
       cos_target=st.floats(-0.99, 0.999), masked=st.booleans(), seed=st.integers(0, 2 ** 16))
def test_property_cpp_matches_fp64(n, d, loss, reduction, scale, cos_target, masked, seed):
    """Random sizes, scales and student/teacher angles: the C++ kernel stays within fp32 rounding of fp64."""
    _backend_or_skip("cpp")
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(n, d, generator=g, dtype=torch.float64)
    noise = torch.randn(n, d, generator=g, dtype=torch.float64)
    s = (cos_target * t + (1 - cos_target ** 2) ** 0.5 * noise) * scale
    s, t = s.float(), (t * scale).float()
    mask = torch.rand(n, generator=g) > 0.3 if masked else None
    truth_v, truth_g = _oracle(s, t, mask, loss, reduction)
    v, gr = _run(s, t, mask, loss, reduction, "cpp")
    vscale = max(float(truth_v.abs().max()) if truth_v.numel() else 0.0, 1e-30)
    gscale = max(float(truth_g.abs().max()) if truth_g.numel() else 0.0, 1e-30)
    if loss == "cosine" and n > 0:
        # the cosine gradient's two terms are each ~ w / |s| per entry and cancel when s is (anti)parallel to t
        # (always for D = 1): its rounding error is relative to that size, not to the (small) result
        counted = torch.ones(n, dtype=torch.bool) if mask is None else mask
        w = 1.0 / max(int(counted.sum()), 1) if reduction == "mean" else 1.0
        gscale = max(gscale, float((2 * w / s.double().norm(dim=-1).clamp(min=1e-30)).max()))
    assert _err(v, truth_v) <= 2e-5 * vscale + 1e-6 * (scale * scale if loss == "mse" else 1.0)
    assert _err(gr, truth_g) <= 2e-5 * gscale


# ----------------------------------------------------------------------------------------------
# masks, edge inputs
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("loss", LOSSES)
def test_integer_mask_equals_bool_mask(backend, loss):
    s, t = _inputs((3, 4), 20, seed=4)
    mb = torch.rand(3, 4, generator=torch.Generator().manual_seed(5)) > 0.5
    mb[0, 0] = True
    vb, gb = _run(s, t, mb, loss, "mean", backend)
    vi, gi = _run(s, t, mb.to(torch.int32) * 3, loss, "mean", backend)
    torch.testing.assert_close(vi, vb)
    torch.testing.assert_close(gi, gb)
    # masked tokens contribute neither loss nor count: the mean equals the mean over the counted tokens only
    v_sel, _ = _run(s[mb], t[mb], None, loss, "mean", backend)
    torch.testing.assert_close(vb, v_sel, rtol=1e-6, atol=1e-7)
    assert torch.all(gb[~mb] == 0)


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_all_masked(backend, loss, reduction):
    s, t = _inputs((2, 3), 16, seed=6)
    s[0, 0, 0] = float("nan")  # a masked token's contents never matter
    mask = torch.zeros(2, 3, dtype=torch.bool)
    v, g = _run(s, t, mask, loss, reduction, backend)
    assert torch.all(v == 0) and torch.all(g == 0)
    assert v.shape == (() if reduction != "none" else (2, 3))


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_empty(backend, loss, reduction):
    for lead in ((0,), (2, 0)):
        s, t = torch.zeros(*lead, 8), torch.zeros(*lead, 8)
        v, g = _run(s, t, None, loss, reduction, backend)
        assert g.shape == s.shape
        assert v.shape == (() if reduction != "none" else lead)
        assert torch.all(v == 0)


def test_zero_vectors_cosine(backend):
    t = torch.randn(4, 12, generator=torch.Generator().manual_seed(7))
    s = torch.randn(4, 12, generator=torch.Generator().manual_seed(8))
    s[0] = 0
    t[0] = 0  # both zero -> 0
    s[1] = 0  # student zero -> 1
    t[2] = 0  # teacher zero -> 1
    v, g = _run(s, t, None, "cosine", "none", backend)
    assert v[0] == 0 and v[1] == 1 and v[2] == 1
    assert torch.all(g[:3] == 0)
    assert 0 <= float(v[3]) <= 2 and torch.any(g[3] != 0)
    ref_v, _ = _oracle(s, t, None, "cosine", "none")
    torch.testing.assert_close(v.double(), ref_v, rtol=1e-6, atol=1e-6)


def test_parallel_and_antiparallel_cosine(backend):
    t = torch.randn(2, 40, generator=torch.Generator().manual_seed(9))
    s = torch.stack([3 * t[0], -0.5 * t[1]])
    v, g = _run(s, t, None, "cosine", "none", backend)
    assert 0 <= float(v[0]) <= 1e-6 and 2 - 1e-6 <= float(v[1]) <= 2  # clamped cos stays in [-1, 1]
    assert float(g.abs().max()) <= 1e-6  # the gradient vanishes at both extremes


@pytest.mark.parametrize("loss", LOSSES)
def test_nonfinite_counted_token_is_nan(backend, loss):
    s, t = _inputs((3,), 24, seed=10)
    s[0, 5] = float("nan")
    t[1, 2] = float("inf")
    v, g = _run(s, t, torch.tensor([True, True, True]), loss, "none", backend)
    assert torch.isnan(v[0]) and torch.isfinite(v[2])
    if loss == "cosine":  # NaN for the token, loss and gradient row
        assert torch.isnan(v[1]) and torch.all(torch.isnan(g[:2]))
    else:  # the arithmetic: (s - inf)^2 = inf
        assert v[1] == float("inf")
    v, g = _run(s, t, torch.tensor([False, False, True]), loss, "none", backend)
    assert torch.all(torch.isfinite(v)) and torch.all(g[:2] == 0)


@pytest.mark.parametrize("loss", LOSSES)
def test_non_contiguous(backend, loss):
    base_s, base_t = _inputs((6, 4), 40, seed=12)
    mask = torch.rand(4, 6, generator=torch.Generator().manual_seed(13)) > 0.3
    cases = [
        (base_s.transpose(0, 1), base_t.transpose(0, 1), mask),  # rows strided, unit stride along D
        (base_s[..., ::2].transpose(0, 1), base_t[..., 1::2].transpose(0, 1), mask),  # non-unit stride along D
        (base_s.transpose(0, 1)[:, :, 3:35], base_t.transpose(0, 1)[:, :, 5:37], mask),  # offset row views
    ]
    for s, t, m in cases:
        assert not s.is_contiguous()
        v, g = _run(s, t, m, loss, "sum", backend)
        vc, gc = _run(s.contiguous(), t.contiguous(), m, loss, "sum", backend)
        ref_v, ref_g = _oracle(s, t, m, loss, "sum")
        torch.testing.assert_close(v, vc)
        torch.testing.assert_close(g, gc)
        torch.testing.assert_close(v.double(), ref_v, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(g.double(), ref_g, rtol=1e-4, atol=1e-6)


def test_teacher_gets_no_gradient_and_grad_flows_through_projection(backend):
    """The teacher is a constant; the student's gradient flows back through a learned projection."""
    g = torch.Generator().manual_seed(14)
    h = torch.randn(2, 5, 24, generator=g)
    proj = torch.nn.Linear(24, 32)
    t = torch.randn(2, 5, 32, generator=g).requires_grad_(True)
    out = hidden_state_loss(proj(h), t, loss="cosine", backend=backend)
    out.backward()
    assert t.grad is None
    w_grad = proj.weight.grad.clone()
    proj.zero_grad()
    ref = hidden_state_loss_reference(proj(h), t.detach(), loss="cosine")
    ref.backward()
    torch.testing.assert_close(w_grad, proj.weight.grad, rtol=1e-4, atol=1e-6)


def test_upstream_gradient_scales(backend):
    s, t = _inputs((3, 4), 10, seed=15)
    a = s.clone().requires_grad_(True)
    (hidden_state_loss(a, t, loss="mse", reduction="none", backend=backend) * torch.arange(12.0).view(3, 4)).sum() \
        .backward()
    b = s.double().requires_grad_(True)
    (hidden_state_loss_reference(b, t.double(), loss="mse", reduction="none")
     * torch.arange(12.0, dtype=torch.float64).view(3, 4)).sum().backward()
    torch.testing.assert_close(a.grad.double(), b.grad, rtol=1e-5, atol=1e-7)
    a.grad = None
    (3.0 * hidden_state_loss(a, t, loss="cosine", backend=backend)).backward()
    b.grad = None
    (3.0 * hidden_state_loss_reference(b, t.double(), loss="cosine")).backward()
    torch.testing.assert_close(a.grad.double(), b.grad, rtol=1e-5, atol=1e-7)


def test_no_grad_computes_loss_only(backend):
    s, t = _inputs((3,), 16, seed=16)
    with torch.no_grad():
        v = hidden_state_loss(s, t, backend=backend)
    loss, grad = torch.ops.minitron.hidden_state_loss_fwd(s, t, torch.full((3,), 1 / 3), 0, backend, False)
    assert grad.shape == (0, 16)
    torch.testing.assert_close(v, loss.sum())


# ----------------------------------------------------------------------------------------------
# op machinery: opcheck, torch.compile, module
# ----------------------------------------------------------------------------------------------


def test_opcheck(backend):
    s, t = _inputs((5,), 19, seed=17)
    w = torch.tensor([0.2, 0.0, 1.0, 0.5, 0.3])
    for code in (0, 1):
        torch.library.opcheck(torch.ops.minitron.hidden_state_loss_fwd.default,
                              (s.clone().requires_grad_(True), t, w, code, backend),
                              test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))


@pytest.mark.parametrize("loss", LOSSES)
def test_torch_compile_fullgraph(backend, loss):
    torch._dynamo.reset()

    def f(s, t, m):
        return hidden_state_loss(s, t, m, loss=loss, backend=backend) * 2.0

    cf = torch.compile(f, fullgraph=True, backend="aot_eager")
    s, t = _inputs((3, 5), 21, seed=18)
    m = torch.rand(3, 5, generator=torch.Generator().manual_seed(19)) > 0.4
    m[0, 0] = True
    a = s.clone().requires_grad_(True)
    out = cf(a, t, m)
    out.backward()
    b = s.clone().requires_grad_(True)
    f(b, t, m).backward()
    torch.testing.assert_close(out, f(s, t, m))
    torch.testing.assert_close(a.grad, b.grad)


def test_module():
    mod = HiddenStateLoss(loss="mse", reduction="sum", backend="reference")
    assert "mse" in repr(mod) and "sum" in repr(mod)
    s, t = _inputs((2, 3), 8, seed=20)
    m = torch.tensor([[True, False, True], [True, True, False]])
    torch.testing.assert_close(mod(s, t, m), hidden_state_loss(s, t, m, loss="mse", reduction="sum",
                                                               backend="reference"))
    with pytest.raises(ValueError, match="loss"):
        HiddenStateLoss(loss="l1")
    with pytest.raises(ValueError, match="reduction"):
        HiddenStateLoss(reduction="batchmean")


def test_auto_backend_on_cpu_is_cpp():
    _backend_or_skip("cpp")
    assert op_backends("hidden_state_loss").select("auto", "cpu", torch.float32).name == "cpp"
    assert op_backends("hidden_state_loss").describe("cpu") == "cpp"


# ----------------------------------------------------------------------------------------------
# bad input: a clear error naming the argument, before any work
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("call, exc, match", [
    (lambda s, t: hidden_state_loss([1.0], t), TypeError, "student"),
    (lambda s, t: hidden_state_loss(s, "t"), TypeError, "teacher"),
    (lambda s, t: hidden_state_loss(s.long(), t), TypeError, "student"),
    (lambda s, t: hidden_state_loss(s.double(), t.double()), TypeError, "student"),
    (lambda s, t: hidden_state_loss(s, t.half()), TypeError, "teacher dtype"),
    (lambda s, t: hidden_state_loss(s, t[:, :, :7]), ValueError, "teacher shape"),
    (lambda s, t: hidden_state_loss(s, t[:1]), ValueError, "teacher shape"),
    (lambda s, t: hidden_state_loss(s[..., :0], t[..., :0]), ValueError, "D = 0"),
    (lambda s, t: hidden_state_loss(torch.tensor(1.0), torch.tensor(1.0)), ValueError, "student"),
    (lambda s, t: hidden_state_loss(s, t, torch.ones(2, 3)), TypeError, "mask"),
    (lambda s, t: hidden_state_loss(s, t, torch.ones(3, 2, dtype=torch.bool)), ValueError, "mask"),
    (lambda s, t: hidden_state_loss(s, t, [[True] * 3] * 2), TypeError, "mask"),
    (lambda s, t: hidden_state_loss(s, t, loss="l1"), ValueError, "loss"),
    (lambda s, t: hidden_state_loss(s, t, reduction="batchmean"), ValueError, "reduction"),
    (lambda s, t: hidden_state_loss(s, t, backend="numpy"), ValueError, "backend"),
    (lambda s, t: hidden_state_loss_reference(s, t[..., :3]), ValueError, "teacher shape"),
])
def test_bad_inputs(call, exc, match):
    s, t = _inputs((2, 3), 8, seed=21)
    with pytest.raises(exc, match=match):
        call(s, t)


def test_triton_refused_on_cpu_without_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    reason = op_backends("hidden_state_loss").backends["triton"].rejection("cpu", torch.float32)
    assert reason is not None
    with pytest.raises(BackendUnavailableError):
        hidden_state_loss(torch.randn(2, 4), torch.randn(2, 4), backend="triton")


# ----------------------------------------------------------------------------------------------
# CUDA tensors (skipped without a GPU): the CUDA C++ and compiled Triton backends
# ----------------------------------------------------------------------------------------------


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("gpu_backend", ["cuda", "triton"])
@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_backends(gpu_backend, loss, dtype):
    try:
        op_backends("hidden_state_loss").select(gpu_backend, "cuda", dtype)
    except BackendUnavailableError as exc:
        pytest.skip(str(exc))
    for lead, d in (((4, 33), 4096), ((3,), 1031), ((2, 5), 7)):
        s, t = _inputs(lead, d, seed=d, dtype=dtype)
        mask = torch.rand(*lead, generator=torch.Generator().manual_seed(23)) > 0.3
        s[(0,) * len(lead)] = 0  # a zero student row (if counted: loss 1, gradient 0)
        truth_v, truth_g = _oracle(s, t, mask, loss, "none")
        sc, tc, mc = s.cuda(), t.cuda(), mask.cuda()
        v, g = _run(sc, tc, mc, loss, "none", gpu_backend)
        assert g.dtype == dtype and g.device.type == "cuda"
        v, g = v.cpu(), g.cpu()
        if dtype == torch.float32:
            plain_v, plain_g = _oracle(s, t, mask, loss, "none", dtype=torch.float32)
            assert _err(v, truth_v) <= 2 * _err(plain_v, truth_v) + _ulps(truth_v)
            assert _err(g, truth_g) <= 2 * _err(plain_g, truth_g) + _ulps(truth_g)
        else:
            assert _err(v, truth_v) <= 1e-5 * max(1.0, float(truth_v.abs().max()))
            assert _err(g, truth_g) <= torch.finfo(dtype).eps * float(truth_g.abs().max()) + 1e-7
        assert torch.all(g[~mask] == 0)
