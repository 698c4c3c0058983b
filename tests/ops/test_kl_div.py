"""Public KL-divergence ops against the fp64 torch oracle, on every backend available here."""
from __future__ import annotations

import math
import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from minitron.ops import (BackendUnavailableError, FusedLinearKLDivLoss, KLDivLoss, fused_linear_kl_div,
                          fused_linear_kl_div_reference, kl_div, kl_div_reference)
from minitron.ops._dispatch import op_backends

MODES = ["forward", "reverse", "jsd"]
REDUCTIONS = ["mean", "sum", "none"]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
ALL_BACKENDS = ["cpp", "triton", "reference"]


def _backend_or_skip(backend: str) -> str:
    try:
        op_backends("kl_div").select(backend, "cpu", torch.float32)
    except BackendUnavailableError as exc:
        if backend == "cpp" and os.environ.get("CI"):
            pytest.fail(f"the C++ backend must be built in CI: {exc}")
        pytest.skip(str(exc))
    return backend


@pytest.fixture(params=ALL_BACKENDS)
def backend(request) -> str:
    return _backend_or_skip(request.param)


def _tol(dtype: torch.dtype) -> dict:
    # loss: accumulated in fp32 from exactly-representable inputs; grad: rounded to the input dtype.
    return {torch.float32: dict(rtol=2e-4, atol=1e-5), torch.bfloat16: dict(rtol=2e-2, atol=1e-3),
            torch.float16: dict(rtol=5e-3, atol=2e-4)}[dtype]


def _oracle(s: torch.Tensor, t: torch.Tensor, **kw):
    s64 = s.detach().to(torch.float64).requires_grad_(True)
    loss = kl_div_reference(s64, t.detach().to(torch.float64), **kw)
    (grad,) = torch.autograd.grad(loss.sum(), s64) if loss.numel() else (torch.zeros_like(s64),)
    return loss.detach(), grad


def _ours(s: torch.Tensor, t: torch.Tensor, **kw):
    s = s.detach().clone().requires_grad_(True) if s.is_leaf else s
    loss = kl_div(s, t, **kw)
    loss.sum().backward()
    return loss.detach(), s.grad


def _check(s, t, dtype=torch.float32, grad_atol_scale=True, **kw):
    s = s.to(dtype)
    t = t.to(dtype)
    ref_loss, ref_grad = _oracle(s, t, **{k: v for k, v in kw.items() if k != "backend"})
    leaf = s.detach().clone().requires_grad_(True)
    loss = kl_div(leaf, t, **kw)
    loss.sum().backward()
    tol = _tol(dtype)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss.double(), ref_loss, rtol=tol["rtol"], atol=tol["atol"], equal_nan=True)
    assert leaf.grad.dtype == dtype
    got = leaf.grad.double()
    # The gradient of an infinite loss is undefined: compare it only where the loss is finite.
    if kw.get("reduction") == "none":
        finite = torch.isfinite(ref_loss).unsqueeze(-1).expand_as(ref_grad)
    else:
        finite = torch.full_like(ref_grad, bool(torch.isfinite(ref_loss).all()), dtype=torch.bool)
    got, ref_grad = got[finite], ref_grad[finite]
    gscale = float(ref_grad.abs().nan_to_num(0.0, 0.0, 0.0).max()) if (grad_atol_scale and ref_grad.numel()) else 1.0
    # fp32 rounding of log-probabilities grows with the logits' magnitude (x 1/T, x T^2 loss scale).
    temp = kw.get("temperature", 1.0)
    mag = float(torch.cat([s.flatten(), t.flatten()]).float().abs().nan_to_num(0.0, 0.0, 0.0).max()) \
        if s.numel() else 0.0
    floor = 2e-7 * (1.0 + mag / temp) * (temp if kw.get("scale_by_t2", True) else 1.0 / temp)
    torch.testing.assert_close(got, ref_grad, rtol=tol["rtol"], atol=tol["atol"] * max(gscale, 1e-3) + floor,
                               equal_nan=True)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_modes_reductions_dtypes(backend, mode, reduction, dtype):
    g = torch.Generator().manual_seed(0)
    v = 1000 if backend != "triton" else 123
    s = torch.randn(3, 5, v, generator=g) * 3
    t = torch.randn(3, 5, v, generator=g) * 3
    mask = torch.rand(3, 5, generator=g) > 0.3
    _check(s, t, dtype, mode=mode, reduction=reduction, mask=mask, beta=0.3, backend=backend)


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
@pytest.mark.parametrize("scale_by_t2", [True, False])
@pytest.mark.parametrize("mode", MODES)
def test_temperature(backend, temperature, scale_by_t2, mode):
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(4, 77, generator=g) * 4, torch.randn(4, 77, generator=g) * 4
    _check(s, t, mode=mode, temperature=temperature, scale_by_t2=scale_by_t2, backend=backend)


@pytest.mark.parametrize("vocab", [1, 7, 1000, 32001])
@pytest.mark.parametrize("mode", MODES)
def test_vocab_sizes(backend, vocab, mode):
    if backend == "triton" and vocab > 1000:
        rows = 1
    else:
        rows = 3
    g = torch.Generator().manual_seed(vocab)
    s, t = torch.randn(rows, vocab, generator=g) * 2, torch.randn(rows, vocab, generator=g) * 2
    _check(s, t, mode=mode, reduction="none", backend=backend)


@pytest.mark.parametrize("mode", MODES)
def test_llama3_vocab_cpp(mode):
    _backend_or_skip("cpp")
    g = torch.Generator().manual_seed(7)
    s, t = torch.randn(3, 128256, generator=g) * 5, torch.randn(3, 128256, generator=g) * 5
    _check(s, t, mode=mode, reduction="mean", backend="cpp")
    _check(s, t, torch.bfloat16, mode=mode, reduction="sum", backend="cpp")


@pytest.mark.parametrize("shape", [(50,), (4, 50), (2, 3, 50), (2, 2, 3, 50)], ids=str)
def test_leading_shapes(backend, shape):
    g = torch.Generator().manual_seed(3)
    s, t = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    mask = torch.rand(shape[:-1], generator=g) > 0.5
    for reduction in REDUCTIONS:
        _check(s, t, reduction=reduction, mask=mask, backend=backend)
    out = kl_div(s, t, reduction="none", backend=backend)
    assert out.shape == shape[:-1]


def test_all_masked_is_zero_with_zero_grad(backend):
    s = torch.randn(4, 9, requires_grad=True)
    t = torch.randn(4, 9)
    mask = torch.zeros(4, dtype=torch.bool)
    for reduction in REDUCTIONS:
        s.grad = None
        loss = kl_div(s, t, mask=mask, reduction=reduction, backend=backend)
        loss.sum().backward()
        assert torch.all(loss == 0) and not torch.isnan(loss).any()
        assert torch.all(s.grad == 0)


def test_masked_tokens_ignore_garbage(backend):
    s = torch.randn(3, 11)
    t = torch.randn(3, 11)
    s[1] = float("nan")
    t[2, 3] = float("inf")
    mask = torch.tensor([True, False, False])
    loss = kl_div(s, t, mask=mask, reduction="none", backend=backend)
    assert torch.isfinite(loss).all() and loss[1] == 0 and loss[2] == 0
    ref = kl_div_reference(s[:1], t[:1], reduction="none")
    torch.testing.assert_close(loss[:1], ref, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("mode", MODES)
def test_neg_inf_entries(backend, mode):
    g = torch.Generator().manual_seed(11)
    s, t = torch.randn(6, 40, generator=g), torch.randn(6, 40, generator=g)
    ninf = float("-inf")
    s[0, :5] = ninf
    t[0, :5] = ninf  # both masked: contributes nothing
    t[1, 10:20] = ninf  # teacher-only masked vocabulary
    s[2, 3] = ninf
    t[2, 3] = ninf
    s[3, 30:] = ninf  # student-only masked (finite for reverse, inf for forward)
    _check(s, t, mode=mode, reduction="none", beta=0.5, backend=backend)


def test_infinite_loss_matches_reference(backend):
    s = torch.randn(2, 10)
    t = torch.randn(2, 10)
    s[0, 4] = float("-inf")  # teacher has mass where the student has none: KL(P||Q) = inf
    loss = kl_div(s, t, mode="forward", reduction="none", backend=backend)
    ref = kl_div_reference(s, t, mode="forward", reduction="none")
    assert math.isinf(float(loss[0])) and float(loss[0]) > 0 and math.isinf(float(ref[0]))
    torch.testing.assert_close(loss[1], ref[1], rtol=1e-4, atol=1e-6)
    # reverse: the student puts no mass on token 4, so it is finite
    lr = kl_div(s, t, mode="reverse", reduction="none", backend=backend)
    torch.testing.assert_close(lr, kl_div_reference(s, t, mode="reverse", reduction="none"), rtol=1e-4, atol=1e-6)


def test_nan_gives_nan_for_that_token(backend):
    s = torch.randn(3, 12)
    t = torch.randn(3, 12)
    s[1, 5] = float("nan")
    loss = kl_div(s, t, reduction="none", backend=backend)
    assert torch.isnan(loss[1]) and torch.isfinite(loss[0]) and torch.isfinite(loss[2])


def test_non_contiguous(backend):
    g = torch.Generator().manual_seed(5)
    base_s = torch.randn(6, 2 * 33, generator=g)
    base_t = torch.randn(33, 6, generator=g)
    s = base_s[:, ::2]  # stride along V != 1
    t = base_t.t()  # transposed
    _check(s, t, reduction="mean", backend=backend)
    wide = torch.randn(5, 80, generator=g)
    _check(wide[:, 3:70], torch.randn(5, 67, generator=g), reduction="sum", backend=backend)  # row stride 80


def test_empty_inputs(backend):
    s = torch.randn(0, 17, requires_grad=True)
    t = torch.randn(0, 17)
    for reduction in REDUCTIONS:
        loss = kl_div(s, t, reduction=reduction, backend=backend)
        loss.sum().backward()
        assert loss.numel() == (0 if reduction == "none" else 1)
        if reduction != "none":
            assert float(loss) == 0.0
    assert s.grad.shape == s.shape


def test_jsd_beta_limits(backend):
    g = torch.Generator().manual_seed(9)
    s, t = torch.randn(4, 31, generator=g), torch.randn(4, 31, generator=g)
    fwd = kl_div(s, t, mode="forward", reduction="none", backend=backend)
    rev = kl_div(s, t, mode="reverse", reduction="none", backend=backend)
    # TRL / Liger convention: beta = 0 is the forward KL(P || Q), beta = 1 the reverse KL(Q || P)
    torch.testing.assert_close(kl_div(s, t, mode="jsd", beta=0.0, reduction="none", backend=backend), fwd,
                               rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(kl_div(s, t, mode="jsd", beta=1.0, reduction="none", backend=backend), rev,
                               rtol=1e-5, atol=1e-6)
    mid = kl_div(s, t, mode="jsd", beta=0.5, reduction="none", backend=backend)
    assert torch.all(mid >= 0) and torch.all(mid <= math.log(2) + 1e-6)


def test_grad_scaled_by_upstream(backend):
    g = torch.Generator().manual_seed(2)
    s = torch.randn(3, 4, 21, generator=g)
    t = torch.randn(3, 4, 21, generator=g)
    w = torch.rand(3, 4, generator=g)
    a = s.clone().requires_grad_(True)
    (kl_div(a, t, reduction="none", backend=backend) * w).sum().backward()
    b = s.clone().requires_grad_(True)
    (kl_div_reference(b, t, reduction="none") * w).sum().backward()
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-6)
    c = s.clone().requires_grad_(True)
    (0.25 * kl_div(c, t, backend=backend)).backward()
    d = s.clone().requires_grad_(True)
    (0.25 * kl_div_reference(d, t)).backward()
    torch.testing.assert_close(c.grad, d.grad, rtol=1e-4, atol=1e-7)


def test_teacher_gets_no_grad(backend):
    s = torch.randn(2, 5, requires_grad=True)
    t = torch.randn(2, 5, requires_grad=True)
    kl_div(s, t, backend=backend).backward()
    assert t.grad is None and s.grad is not None


def test_module_wrapper(backend):
    s, t = torch.randn(2, 3, 9), torch.randn(2, 3, 9)
    mod = KLDivLoss(mode="jsd", beta=0.2, temperature=1.5, backend=backend)
    torch.testing.assert_close(mod(s, t), kl_div_reference(s, t, mode="jsd", beta=0.2, temperature=1.5),
                               rtol=1e-4, atol=1e-6)
    assert "jsd" in repr(mod)


@settings(max_examples=25, deadline=None)
@given(n=st.integers(0, 6), v=st.integers(1, 300), mode=st.sampled_from(MODES),
       temperature=st.floats(0.25, 4.0), beta=st.floats(0.0, 1.0), scale=st.floats(0.1, 20.0),
       seed=st.integers(0, 2**16))
def test_property_random(n, v, mode, temperature, beta, scale, seed):
    backend = "cpp" if "cpp" in _available() else "reference"
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(n, v, generator=g) * scale
    t = torch.randn(n, v, generator=g) * scale
    mask = torch.rand(n, generator=g) > 0.2
    _check(s, t, mode=mode, temperature=temperature, beta=beta, reduction="mean", mask=mask, backend=backend)
    # Divergences are non-negative and zero for identical inputs.
    loss = kl_div(s, s.clone(), mode=mode, beta=beta, reduction="none", backend=backend)
    assert torch.all(loss.abs() <= 1e-4 * max(1.0, scale))


def _available() -> list[str]:
    out = []
    for b in ALL_BACKENDS:
        try:
            op_backends("kl_div").select(b, "cpu", torch.float32)
            out.append(b)
        except BackendUnavailableError:
            pass
    return out


def test_gradcheck_reference_fp64():
    g = torch.Generator().manual_seed(4)
    for mode in MODES:
        s = torch.randn(3, 6, generator=g, dtype=torch.float64, requires_grad=True)
        t = torch.randn(3, 6, generator=g, dtype=torch.float64)
        mask = torch.tensor([True, False, True])
        assert torch.autograd.gradcheck(
            lambda x: kl_div_reference(x, t, mode=mode, beta=0.4, temperature=1.7, mask=mask), (s,))
        assert torch.autograd.gradcheck(lambda x: kl_div(x.float(), t.float(), mode=mode, beta=0.4,
                                                          backend="reference").double(), (s,), eps=1e-3,
                                        atol=1e-3, rtol=1e-2)


@pytest.mark.parametrize(
    "kwargs, exc, word",
    [
        (dict(student=torch.randn(2, 5), teacher=torch.randn(2, 6)), ValueError, "vocab"),
        (dict(student=torch.randn(2, 5), teacher=torch.randn(3, 5)), ValueError, "shape"),
        (dict(student=torch.randn(2, 5), teacher=torch.randn(2, 5, dtype=torch.float64)), TypeError, "teacher_logits"),
        (dict(student=torch.randn(2, 5).half(), teacher=torch.randn(2, 5)), TypeError, "same dtype"),
        (dict(student=torch.randint(0, 3, (2, 5)), teacher=torch.randn(2, 5)), TypeError, "student_logits"),
        (dict(student=[1.0], teacher=torch.randn(2, 5)), TypeError, "student_logits"),
        (dict(mask=torch.ones(3, dtype=torch.bool)), ValueError, "mask"),
        (dict(mask=torch.ones(2)), TypeError, "mask"),
        (dict(temperature=0.0), ValueError, "temperature"),
        (dict(temperature=float("inf")), ValueError, "temperature"),
        (dict(temperature=-1.0), ValueError, "temperature"),
        (dict(beta=1.5), ValueError, "beta"),
        (dict(beta=-0.1), ValueError, "beta"),
        (dict(mode="kl"), ValueError, "mode"),
        (dict(reduction="avg"), ValueError, "reduction"),
        (dict(backend="magic"), ValueError, "backend"),
        (dict(student=torch.randn(2, 0), teacher=torch.randn(2, 0)), ValueError, "vocabulary"),
    ],
)
def test_bad_input(kwargs, exc, word):
    args = dict(student=torch.randn(2, 5), teacher=torch.randn(2, 5))
    args.update(kwargs)
    s, t = args.pop("student"), args.pop("teacher")
    with pytest.raises(exc, match=word):
        kl_div(s, t, **args)


def test_no_backend_error_lists_reasons():
    with pytest.raises(BackendUnavailableError) as info:
        op_backends("kl_div").select("auto", "meta", torch.float32)
    assert "reference" in str(info.value)


# ---------------------------------------------------------------------------------------------- custom-op rules


def test_opcheck(backend):
    weight = torch.full((4,), 0.25)
    for mode in (0, 1, 2):
        s, t = torch.randn(4, 13), torch.randn(4, 13)
        torch.library.opcheck(torch.ops.minitron.kl_div_fwd.default, (s.requires_grad_(True), t, weight, mode, 1.5,
                                                                       0.5, 2.25, backend),
                              test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))


def test_torch_compile_fullgraph(backend):
    torch._dynamo.reset()

    def f(s, t, m):
        return kl_div(s, t, mode="forward", mask=m, backend=backend) * 2.0

    cf = torch.compile(f, fullgraph=True, backend="aot_eager")
    g = torch.Generator().manual_seed(6)
    s = torch.randn(3, 5, 29, generator=g)
    t = torch.randn(3, 5, 29, generator=g)
    m = torch.rand(3, 5, generator=g) > 0.4
    a = s.clone().requires_grad_(True)
    out = cf(a, t, m)
    out.backward()
    b = s.clone().requires_grad_(True)
    ref = 2.0 * kl_div_reference(b, t, mask=m)
    ref.backward()
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-7)


@pytest.mark.slow
def test_torch_compile_inductor():
    _backend_or_skip("cpp")
    torch._dynamo.reset()
    cf = torch.compile(lambda s, t: kl_div(s, t, backend="cpp"), fullgraph=True)
    s = torch.randn(4, 33, requires_grad=True)
    t = torch.randn(4, 33)
    out = cf(s, t)
    out.backward()
    ref_s = s.detach().clone().requires_grad_(True)
    kl_div_reference(ref_s, t).backward()
    torch.testing.assert_close(out, kl_div_reference(s.detach(), t), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(s.grad, ref_s.grad, rtol=1e-4, atol=1e-7)


# ---------------------------------------------------------------------------------------------- fused linear


def _fused_case(seed, n=(2, 9), hs=16, ht=24, v=101, dtype=torch.float32, bias=True):
    g = torch.Generator().manual_seed(seed)
    sh = torch.randn(*n, hs, generator=g).to(dtype)
    sw = (torch.randn(v, hs, generator=g) / hs ** 0.5).to(dtype)
    th = torch.randn(*n, ht, generator=g).to(dtype)
    tw = (torch.randn(v, ht, generator=g) / ht ** 0.5).to(dtype)
    sb = (torch.randn(v, generator=g) * 0.1).to(dtype) if bias else None
    tb = (torch.randn(v, generator=g) * 0.1).to(dtype) if bias else None
    return sh, sw, th, tw, sb, tb


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("chunk_size", [None, 1, 4, 1000])
def test_fused_linear_matches_unfused(backend, mode, reduction, chunk_size):
    sh, sw, th, tw, sb, tb = _fused_case(0)
    mask = torch.rand(sh.shape[:-1], generator=torch.Generator().manual_seed(1)) > 0.3
    leaves = [x.clone().requires_grad_(True) for x in (sh, sw, sb)]
    out = fused_linear_kl_div(leaves[0], leaves[1], th, tw, student_bias=leaves[2], teacher_bias=tb, mode=mode,
                              temperature=1.3, beta=0.4, reduction=reduction, mask=mask, chunk_size=chunk_size,
                              backend=backend)
    (out * 0.7).backward()
    refs = [x.double().clone().requires_grad_(True) for x in (sh, sw, sb)]
    ref = fused_linear_kl_div_reference(refs[0], refs[1], th.double(), tw.double(), student_bias=refs[2],
                                        teacher_bias=tb.double(), mode=mode, temperature=1.3, beta=0.4,
                                        reduction=reduction, mask=mask)
    (ref * 0.7).backward()
    torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-5)
    for a, b in zip(leaves, refs):
        torch.testing.assert_close(a.grad.double(), b.grad, rtol=1e-3, atol=1e-5)


def test_fused_linear_no_bias_none_reduction_bf16(backend):
    sh, sw, th, tw, _, _ = _fused_case(3, n=(7,), bias=False, dtype=torch.bfloat16)
    a = sh.clone().requires_grad_(True)
    w = sw.clone().requires_grad_(True)
    out = fused_linear_kl_div(a, w, th, tw, reduction="none", chunk_size=3, backend=backend)
    assert out.shape == (7,) and out.dtype == torch.float32
    out.sum().backward()
    assert a.grad.dtype == torch.bfloat16 and w.grad.dtype == torch.bfloat16
    ref = fused_linear_kl_div_reference(sh.float(), sw.float(), th.float(), tw.float(), reduction="none")
    torch.testing.assert_close(out, ref, rtol=5e-2, atol=5e-3)
    with pytest.raises(RuntimeError, match="uniform"):
        a.grad = None
        out2 = fused_linear_kl_div(a, w, th, tw, reduction="none", backend=backend)
        (out2 * torch.arange(7.0)).sum().backward()


def test_fused_linear_all_masked_and_empty(backend):
    sh, sw, th, tw, sb, tb = _fused_case(5, n=(4,))
    a = sh.clone().requires_grad_(True)
    out = fused_linear_kl_div(a, sw, th, tw, mask=torch.zeros(4, dtype=torch.bool), backend=backend)
    out.backward()
    assert float(out) == 0.0 and torch.all(a.grad == 0)
    e = torch.randn(0, 16, requires_grad=True)
    out = fused_linear_kl_div(e, sw, torch.randn(0, 24), tw, backend=backend)
    out.backward()
    assert float(out) == 0.0 and e.grad.shape == (0, 16)


def test_fused_linear_module(backend):
    sh, sw, th, tw, sb, tb = _fused_case(8)
    mod = FusedLinearKLDivLoss(mode="reverse", chunk_size=5, backend=backend)
    torch.testing.assert_close(mod(sh, sw, th, tw, sb, tb),
                               fused_linear_kl_div_reference(sh, sw, th, tw, student_bias=sb, teacher_bias=tb,
                                                             mode="reverse"), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "change, exc, word",
    [
        (dict(sw=torch.randn(101, 15)), ValueError, "student_weight"),
        (dict(tw=torch.randn(100, 24)), ValueError, "vocabulary"),
        (dict(th=torch.randn(2, 8, 24)), ValueError, "tokens"),
        (dict(sb=torch.randn(100)), ValueError, "student_bias"),
        (dict(sw=torch.randn(101, 16).double()), TypeError, "student_weight"),
        (dict(sh=torch.randint(0, 2, (2, 9, 16))), TypeError, "student_hidden"),
        (dict(chunk_size=0), ValueError, "chunk_size"),
        (dict(mask=torch.ones(2, 8, dtype=torch.bool)), ValueError, "mask"),
    ],
)
def test_fused_linear_bad_input(change, exc, word):
    sh, sw, th, tw, sb, tb = _fused_case(0)
    args = dict(sh=sh, sw=sw, th=th, tw=tw, sb=sb, chunk_size=None, mask=None)
    args.update(change)
    with pytest.raises(exc, match=word):
        fused_linear_kl_div(args["sh"], args["sw"], args["th"], args["tw"], student_bias=args["sb"],
                            chunk_size=args["chunk_size"], mask=args["mask"])


def test_fused_linear_opcheck_and_compile():
    sh, sw, th, tw, sb, tb = _fused_case(2, n=(6,))
    weight = torch.full((6,), 1 / 6)
    torch.library.opcheck(torch.ops.minitron.fused_linear_kl_div_fwd.default,
                          (sh.requires_grad_(True), sw.requires_grad_(True), th, tw, sb, tb, weight, 0, 1.0, 0.5, 1.0,
                           4, "reference"),
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))
    torch._dynamo.reset()
    cf = torch.compile(lambda a, w: fused_linear_kl_div(a, w, th, tw, chunk_size=4, backend="reference"),
                       fullgraph=True, backend="aot_eager")
    a = sh.detach().clone().requires_grad_(True)
    out = cf(a, sw.detach())
    out.backward()
    torch.testing.assert_close(out, fused_linear_kl_div_reference(sh.detach(), sw.detach(), th, tw), rtol=1e-4,
                               atol=1e-5)
    assert a.grad is not None and torch.isfinite(a.grad).all()


# ---------------------------------------------------------------------------------------------- loss only


@pytest.mark.parametrize("mode", ["forward", "reverse", "jsd"])
def test_loss_only_when_no_gradient_can_flow(backend, mode):
    """Under torch.no_grad (or for a student that does not require grad) the op skips the gradient: same
    loss, no [N, V] gradient output."""
    g = torch.Generator().manual_seed(40)
    v = 1000 if backend != "triton" else 123
    s = torch.randn(6, 5, v, generator=g) * 2
    t = torch.randn(6, 5, v, generator=g) * 2
    mask = torch.rand(6, 5, generator=g) > 0.3
    a = s.clone().requires_grad_(True)
    with_grad = kl_div(a, t, mode=mode, mask=mask, beta=0.3, backend=backend)
    with torch.no_grad():
        no_grad = kl_div(a, t, mode=mode, mask=mask, beta=0.3, backend=backend)
    plain = kl_div(s, t, mode=mode, mask=mask, beta=0.3, backend=backend)
    torch.testing.assert_close(no_grad, with_grad.detach(), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(plain, with_grad.detach(), rtol=1e-6, atol=1e-7)
    assert not no_grad.requires_grad and not plain.requires_grad
    w = torch.full((30,), 1.0 / 30)
    loss, grad = torch.ops.minitron.kl_div_fwd(s.reshape(30, v), t.reshape(30, v), w, {"forward": 0, "reverse": 1, "jsd": 2}[mode], 1.0, 0.3,
                                               1.0, backend, False)
    assert grad.shape == (0, v)
    ref, _ = torch.ops.minitron.kl_div_fwd(s.reshape(30, v), t.reshape(30, v), w, {"forward": 0, "reverse": 1, "jsd": 2}[mode], 1.0, 0.3, 1.0,
                                           backend, True)
    torch.testing.assert_close(loss, ref, rtol=1e-6, atol=1e-7)


def test_opcheck_loss_only(backend):
    weight = torch.full((4,), 0.25)
    for mode in (0, 1, 2):
        s, t = torch.randn(4, 13), torch.randn(4, 13)
        torch.library.opcheck(torch.ops.minitron.kl_div_fwd.default, (s, t, weight, mode, 1.5, 0.5, 2.25, backend,
                                                                       False),
                              test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))


def test_fused_linear_loss_only_under_no_grad():
    backend = "cpp" if "cpp" in _available() else "reference"
    g = torch.Generator().manual_seed(41)
    sh = torch.randn(37, 16, generator=g, requires_grad=True)
    sw = (torch.randn(301, 16, generator=g) / 4).requires_grad_(True)
    th, tw = torch.randn(37, 24, generator=g), torch.randn(301, 24, generator=g) / 4
    with_grad = fused_linear_kl_div(sh, sw, th, tw, mode="jsd", chunk_size=8, backend=backend)
    with torch.no_grad():
        no_grad = fused_linear_kl_div(sh, sw, th, tw, mode="jsd", chunk_size=8, backend=backend)
    torch.testing.assert_close(no_grad, with_grad.detach(), rtol=1e-5, atol=1e-6)
    w = torch.full((37,), 1.0 / 37)
    out = torch.ops.minitron.fused_linear_kl_div_fwd(sh.detach(), sw.detach(), th, tw, None, None, w, 2, 1.0, 0.5,
                                                     1.0, 8, backend, False)
    assert [tuple(x.shape) for x in out[1:]] == [(0, 16), (0, 16), (0,)]
    torch.library.opcheck(torch.ops.minitron.fused_linear_kl_div_fwd.default,
                          (sh.detach(), sw.detach(), th, tw, None, None, w, 2, 1.0, 0.5, 1.0, 8, backend, False),
                          test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("beta,same_as", [(1e-50, "forward"), (1e-300, "forward"), (1.0 - 1e-12, "reverse")])
def test_jsd_beta_rounding_to_an_end_is_that_kl(backend, beta, same_as):
    """The kernels use a float32 beta: one that rounds to 0 or 1 must give that KL, not NaN (hypothesis found
    beta=1.9e-91 giving NaN)."""
    g = torch.Generator().manual_seed(42)
    s, t = torch.randn(3, 77, generator=g) * 3, torch.randn(3, 77, generator=g) * 3
    a, b = s.clone().requires_grad_(True), s.clone().requires_grad_(True)
    jsd = kl_div(a, t, mode="jsd", beta=beta, reduction="none", backend=backend)
    kl = kl_div(b, t, mode=same_as, reduction="none", backend=backend)
    assert torch.isfinite(jsd).all()
    torch.testing.assert_close(jsd, kl, rtol=1e-5, atol=1e-6)
    jsd.sum().backward()
    kl.sum().backward()
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-6)


def test_jsd_gradient_accurate_for_peaked_distributions():
    """JSD's gradient Q_k (g_k - G) for a peaked Q cancels down to the rounding of G; the kernels keep G in
    double (kl_math.h JsdPartial). Before: 2e-5 absolute error on a 4.8e-4 gradient (fp32 torch: 4e-7)."""
    backends = [b for b in ("cpp", "triton") if b in _available()]
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 106, generator=g) * 6, torch.randn(2, 106, generator=g) * 6
    for beta in (1e-30, 1e-3, 0.1, 0.5, 0.9, 1.0 - 1e-3, 1.0 - 1e-7):
        ref_s = s.double().requires_grad_(True)
        kl_div_reference(ref_s, t.double(), mode="jsd", beta=beta, temperature=0.5).backward()
        scale = ref_s.grad.abs().max().item()
        for backend in backends:
            a = s.clone().requires_grad_(True)
            kl_div(a, t, mode="jsd", beta=beta, temperature=0.5, backend=backend).backward()
            err = (a.grad.double() - ref_s.grad).abs().max().item()
            assert err <= 1e-4 * scale + 1e-9, (backend, beta, err, scale)


def test_backward_through_a_loss_only_call_raises():
    """Calling the op directly with need_grad=False on a student that requires grad: a clear error in
    backward, not a silently wrong or mis-shaped gradient."""
    backend = "cpp" if "cpp" in _available() else "reference"
    s = torch.randn(4, 13, requires_grad=True)
    loss, _ = torch.ops.minitron.kl_div_fwd(s, torch.randn(4, 13), torch.full((4,), 0.25), 0, 1.0, 0.5, 1.0, backend,
                                            False)
    with pytest.raises(RuntimeError, match="need_grad=False"):
        loss.sum().backward()
    h, w = torch.randn(5, 8, requires_grad=True), torch.randn(11, 8, requires_grad=True)
    loss, *_ = torch.ops.minitron.fused_linear_kl_div_fwd(h, w, torch.randn(5, 8), torch.randn(11, 8), None, None,
                                                          torch.full((5,), 0.2), 0, 1.0, 0.5, 1.0, 4, backend, False)
    with pytest.raises(RuntimeError, match="need_grad=False"):
        loss.sum().backward()
