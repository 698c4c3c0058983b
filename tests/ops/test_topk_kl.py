"""Sparse (top-k teacher) KL ops against the dense fp64 torch oracle, on every backend available here.

The C++ backend runs on each CPU code path (MINITRON_CPU_ISA=avx512 / avx2 / scalar; a path the CPU lacks
is skipped), Triton under the interpreter (tests/conftest.py), and the torch reference backend.
"""
from __future__ import annotations

import math
import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from minitron import _ext
from minitron.ops import (BackendUnavailableError, FusedLinearTopKKLDivLoss, TopKKLDivLoss, fused_linear_topk_kl_div,
                          fused_linear_topk_kl_div_reference, topk_kl_div, topk_kl_div_reference)
from minitron.ops._dispatch import op_backends

# The Triton interpreter evaluates both sides of tl.where (e.g. -inf - -inf on masked lanes) in numpy.
pytestmark = pytest.mark.filterwarnings("ignore:(invalid value|divide by zero) encountered:RuntimeWarning")

ALL_BACKENDS = ["cpp", "triton", "reference"]
ISAS = ["avx512", "avx2", "scalar"]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _backend_or_skip(backend: str) -> str:
    try:
        op_backends("topk_kl_div").select(backend, "cpu", torch.float32)
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


def _teacher(lead: tuple, v: int, k: int, gen: torch.Generator, scale: float = 3.0, shuffle: bool = True):
    """Top-k log-probabilities of a random teacher (in shuffled order) and their indices."""
    t = torch.randn(*lead, v, generator=gen) * scale
    lp, idx = torch.log_softmax(t, -1).topk(k, dim=-1)
    if shuffle:
        perm = torch.randperm(k, generator=gen)
        lp, idx = lp[..., perm], idx[..., perm]
    return idx, lp


def _oracle(s: torch.Tensor, idx, lp, **kw):
    s64 = s.detach().to(torch.float64).requires_grad_(True)
    loss = topk_kl_div_reference(s64, idx, lp.double(), **kw)
    (grad,) = torch.autograd.grad(loss.sum(), s64) if loss.numel() else (torch.zeros_like(s64),)
    return loss.detach(), grad


def _ours(s: torch.Tensor, idx, lp, **kw):
    leaf = s.detach().clone().requires_grad_(True)
    loss = topk_kl_div(leaf, idx, lp, **kw)
    loss.sum().backward()
    return loss.detach(), leaf.grad


def _fp32_expression(s, idx, lp, **kw):
    leaf = s.detach().float().clone().requires_grad_(True)
    loss = topk_kl_div_reference(leaf, idx, lp, **kw)
    loss.sum().backward()
    return loss.detach(), leaf.grad


def _tol(dtype):
    return {torch.float32: dict(rtol=2e-4, atol=1e-5), torch.bfloat16: dict(rtol=2e-2, atol=2e-3),
            torch.float16: dict(rtol=5e-3, atol=5e-4)}[dtype]


def _check(s, idx, lp, dtype=torch.float32, **kw):
    s = s.to(dtype)
    ref_loss, ref_grad = _oracle(s, idx, lp, **{k: v for k, v in kw.items() if k != "backend"})
    loss, grad = _ours(s, idx, lp, **kw)
    assert loss.dtype == torch.float32 and grad.dtype == dtype
    tol = _tol(dtype)
    torch.testing.assert_close(loss.double(), ref_loss, equal_nan=True, **tol)
    finite = torch.isfinite(ref_loss).all()
    if bool(finite):
        gscale = float(ref_grad.abs().max()) if ref_grad.numel() else 1.0
        torch.testing.assert_close(grad.double(), ref_grad, rtol=tol["rtol"], atol=tol["atol"] * max(gscale, 1e-3))
    return loss, grad


# ---------------------------------------------------------------------------------------------- accuracy


@pytest.mark.parametrize("k", [1, 7, 64])
@pytest.mark.parametrize("tail", [True, False])
@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_matches_oracle(backend, k, tail, reduction):
    g = torch.Generator().manual_seed(k + 3 * tail)
    lead, v = (3, 5), 301  # vocabulary not a multiple of any block / vector width
    s = torch.randn(*lead, v, generator=g) * 2
    idx, lp = _teacher(lead, v, k, g)
    _check(s, idx, lp, tail=tail, reduction=reduction, backend=backend)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("tail", [True, False])
def test_dtypes(backend, dtype, tail):
    g = torch.Generator().manual_seed(11)
    s = torch.randn(6, 517, generator=g)
    idx, lp = _teacher((6,), 517, 7, g)
    _check(s, idx, lp, dtype=dtype, tail=tail, reduction="sum", backend=backend)


@pytest.mark.parametrize("k", [1, 7, 64])
@pytest.mark.parametrize("tail", [True, False])
def test_cpp_each_isa(isa, k, tail):
    g = torch.Generator().manual_seed(5 + k)
    for v in (k, 67, 1000, 4099):  # V == k (empty complement), short rows, partial vectors
        if v < k:
            continue
        s = torch.randn(4, v, generator=g) * 4
        idx, lp = _teacher((4,), v, k, g)
        for temperature in (1.0, 2.5):
            _check(s, idx, lp, tail=tail, temperature=temperature, reduction="none", backend="cpp")


@pytest.mark.parametrize("tail", [True, False])
def test_fp32_error_at_most_twice_the_torch_expression(backend, tail):
    """fp32 error vs float64 at most 2x that of the plain-torch fp32 expression (+1e-6 floor)."""
    g = torch.Generator().manual_seed(21)
    for v, k, scale in ((1000, 64, 8.0), (5000, 7, 3.0), (300, 1, 1.0)):
        s = torch.randn(8, v, generator=g) * scale
        # a teacher close to the student: small divergences, where rounding shows most
        t = s + 0.3 * torch.randn(8, v, generator=g)
        lp, idx = torch.log_softmax(t, -1).topk(k, -1)
        ref_loss, ref_grad = _oracle(s, idx, lp, tail=tail, reduction="none", temperature=1.5)
        e_loss, e_grad = _fp32_expression(s, idx, lp, tail=tail, reduction="none", temperature=1.5)
        loss, grad = _ours(s, idx, lp, tail=tail, reduction="none", temperature=1.5, backend=backend)
        err = (loss.double() - ref_loss).abs().max().item()
        err_expr = (e_loss.double() - ref_loss).abs().max().item()
        assert err <= 2 * err_expr + 1e-6, (v, k, err, err_expr)
        gerr = (grad.double() - ref_grad).abs().max().item()
        gerr_expr = (e_grad.double() - ref_grad).abs().max().item()
        assert gerr <= 2 * gerr_expr + 1e-6, (v, k, gerr, gerr_expr)


def test_student_concentrated_on_the_k_entries_keeps_the_tail_accurate(backend):
    """q_tail tiny (1e-9): summed over the complement it stays accurate; 1 - sum q_k would be pure rounding."""
    v, k = 200, 4
    s = torch.full((2, v), -20.0)
    s[:, :k] = 2.0
    idx = torch.arange(k).expand(2, k).contiguous()
    lp = torch.log(torch.tensor([0.4, 0.3, 0.2, 0.05])).expand(2, k).contiguous()  # p_tail = 0.05
    _check(s, idx, lp, tail=True, reduction="none", backend=backend)


def test_temperature_and_scale(backend):
    g = torch.Generator().manual_seed(2)
    s = torch.randn(5, 333, generator=g) * 3
    idx, lp = _teacher((5,), 333, 9, g)
    for temperature in (0.5, 2.0):
        for scale_by_t2 in (True, False):
            _check(s, idx, lp, temperature=temperature, scale_by_t2=scale_by_t2, backend=backend)


# ---------------------------------------------------------------------------------------------- tokens


def test_mask_and_labels(backend):
    g = torch.Generator().manual_seed(3)
    s = torch.randn(4, 6, 97, generator=g)
    idx, lp = _teacher((4, 6), 97, 7, g)
    mask = torch.rand(4, 6, generator=g) > 0.4
    for reduction in ("mean", "none"):
        loss, grad = _check(s, idx, lp, mask=mask, reduction=reduction, backend=backend)
        assert bool((grad[~mask] == 0).all())
        labels = torch.where(mask, torch.zeros(4, 6, dtype=torch.long), torch.full((4, 6), -100))
        loss2, _ = _check(s, idx, lp, labels=labels, reduction=reduction, backend=backend)
        torch.testing.assert_close(loss, loss2)
        loss3, _ = _check(s, idx, lp, labels=torch.where(mask, 0, 7), ignore_index=7, reduction=reduction,
                          backend=backend)
        torch.testing.assert_close(loss, loss3)


def test_all_masked_is_zero_with_zero_grad(backend):
    s = torch.randn(3, 50)
    idx, lp = _teacher((3,), 50, 5, torch.Generator().manual_seed(0))
    loss, grad = _ours(s, idx, lp, mask=torch.zeros(3, dtype=torch.bool), backend=backend)
    assert float(loss) == 0.0 and bool((grad == 0).all())


def test_neg_inf_student_logits(backend):
    g = torch.Generator().manual_seed(4)
    s = torch.randn(4, 129, generator=g)
    idx, lp = _teacher((4,), 129, 7, g)
    off = torch.ones(129, dtype=torch.bool)
    off[idx[0]] = False
    off[:64] = False
    s[0, off] = float("-inf")           # off the index set: zero probability, finite loss
    s[1, :] = float("-inf")             # all but the index set -inf: q_tail = 0
    s[1, idx[1]] = torch.randn(7, generator=g)
    s[2, idx[2, 0]] = float("-inf")     # an index the teacher gives mass to: loss = +inf
    for tail in (True, False):
        loss, _ = _check(s, idx, lp, tail=tail, reduction="none", backend=backend)
        assert math.isinf(loss[2]) and loss[2] > 0
        assert math.isfinite(loss[0]) and math.isfinite(loss[3])
        assert math.isinf(loss[1]) == tail  # the teacher's tail mass meets a student tail of 0
    # -inf teacher log-probabilities are zero-probability entries
    lp2 = lp.clone()
    lp2[:, -1] = float("-inf")
    _check(s[3:], idx[3:], lp2[3:], tail=True, reduction="none", backend=backend)
    _check(s[3:], idx[3:], lp2[3:], tail=False, reduction="none", backend=backend)


def test_non_contiguous(backend):
    g = torch.Generator().manual_seed(7)
    base = torch.randn(130, 6, generator=g)
    s = base.t()  # [6, 130], stride(-1) != 1
    idx, lp = _teacher((12,), 130, 7, g)
    idx, lp = idx[::2], lp[::2]  # non-contiguous teacher tensors
    _check(s, idx, lp, backend=backend, reduction="none")
    wide = torch.randn(6, 300, generator=g)[:, 10:140]  # row stride > V
    _check(wide, idx, lp, backend=backend, reduction="sum")
    _check(s, idx.to(torch.int32), lp, backend=backend, reduction="sum")


def test_empty(backend):
    s = torch.randn(0, 31, requires_grad=True)
    idx = torch.zeros(0, 4, dtype=torch.long)
    lp = torch.zeros(0, 4)
    for reduction in ("mean", "sum"):
        out = topk_kl_div(s, idx, lp, reduction=reduction, backend=backend)
        assert float(out.detach()) == 0.0
        out.backward()
    assert topk_kl_div(s, idx, lp, reduction="none", backend=backend).shape == (0,)


def test_grad_scaled_by_upstream(backend):
    g = torch.Generator().manual_seed(8)
    s = torch.randn(5, 77, generator=g)
    idx, lp = _teacher((5,), 77, 6, g)
    up = torch.randn(5, generator=g)
    a = s.clone().requires_grad_(True)
    (topk_kl_div(a, idx, lp, reduction="none", backend=backend) * up).sum().backward()
    b = s.double().requires_grad_(True)
    (topk_kl_div_reference(b, idx, lp.double(), reduction="none") * up.double()).sum().backward()
    torch.testing.assert_close(a.grad.double(), b.grad, rtol=1e-4, atol=1e-6)


def test_module(backend):
    g = torch.Generator().manual_seed(9)
    s = torch.randn(2, 3, 64, generator=g)
    idx, lp = _teacher((2, 3), 64, 5, g)
    m = TopKKLDivLoss(temperature=2.0, tail=False, backend=backend)
    assert "tail=False" in repr(m)
    torch.testing.assert_close(m(s, idx, lp), topk_kl_div_reference(s, idx, lp, temperature=2.0, tail=False),
                               rtol=1e-4, atol=1e-6)


def test_loss_only_under_no_grad(backend):
    g = torch.Generator().manual_seed(10)
    s = torch.randn(4, 90, generator=g, requires_grad=True)
    idx, lp = _teacher((4,), 90, 8, g)
    with torch.no_grad():
        out = topk_kl_div(s, idx, lp, backend=backend)
    assert not out.requires_grad
    torch.testing.assert_close(out, topk_kl_div_reference(s.detach(), idx, lp), rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------------------------------------- properties


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(n=st.integers(1, 4), v=st.integers(1, 300), kfrac=st.floats(0.0, 1.0), tail=st.booleans(),
       temperature=st.sampled_from([0.7, 1.0, 2.0]), seed=st.integers(0, 2**16))
def test_property_random(n, v, kfrac, tail, temperature, seed):
    _backend_or_skip("cpp")
    k = max(1, min(v, int(round(kfrac * min(v, 64)))))
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(n, v, generator=g) * 3
    idx, lp = _teacher((n,), v, k, g)
    loss, _ = _check(s, idx, lp, tail=tail, temperature=temperature, reduction="none", backend="cpp")
    assert bool((loss >= -1e-5).all())  # a KL over k (+1) buckets, or one against a sub-normalised q: >= 0


@settings(max_examples=15, deadline=None)
@given(n=st.integers(1, 3), v=st.integers(2, 200), k=st.integers(1, 16), seed=st.integers(0, 2**16))
def test_property_teacher_is_student_gives_zero(n, v, k, seed):
    """With tail=True and the teacher's top-k taken from the student itself, D = 0 and the gradient is 0."""
    _backend_or_skip("cpp")
    k = min(k, v)
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(n, v, generator=g) * 2
    lp, idx = torch.log_softmax(s, -1).topk(k, -1)
    loss, grad = _ours(s, idx, lp, tail=True, reduction="none", backend="cpp", scale_by_t2=False)
    assert float(loss.abs().max()) < 1e-5
    assert float(grad.abs().max()) < 1e-5


def test_gradcheck_reference_fp64():
    """The dense oracle passes gradcheck, and the closed-form gradients of the fused op (reference backend, fp64,
    with and without the CE term) equal its autograd gradients. (The op itself is not gradchecked: its backward
    scales the saved gradient in place, so a graph is differentiated once, and gradcheck runs backward twice.)"""
    g = torch.Generator().manual_seed(12)
    s = torch.randn(3, 13, generator=g, dtype=torch.float64, requires_grad=True)
    idx, lp = _teacher((3,), 13, 4, g)
    w = torch.tensor([0.5, 0.0, 2.0])
    labels, cw = torch.tensor([3, 4, 12]), torch.tensor([0.3, 1.0, 0.0])
    up = torch.tensor([1.0, -0.5, 2.0], dtype=torch.float64)
    for tail in (True, False):
        assert torch.autograd.gradcheck(
            lambda x: topk_kl_div_reference(x, idx, lp.double(), tail=tail, temperature=1.7, reduction="none"), (s,))
        for with_ce in (False, True):
            lab, c = (labels, cw) if with_ce else (torch.empty(0, dtype=torch.long), torch.empty(0))
            x = s.detach().clone().requires_grad_(True)
            out = torch.ops.minitron.topk_kl_div_fwd(x, idx, lp, w, lab, c, 1.7, tail, "reference")[0]
            (out * up).sum().backward()
            y = s.detach().clone().requires_grad_(True)
            d = topk_kl_div_reference(y, idx, lp.double(), tail=tail, temperature=1.7, reduction="none",
                                      scale_by_t2=False) * w.double()
            if with_ce:
                d = d + cw.double() * torch.nn.functional.cross_entropy(y, labels, reduction="none")
            (d * up).sum().backward()
            torch.testing.assert_close(out.double(), d.detach(), rtol=1e-6, atol=1e-6)
            torch.testing.assert_close(x.grad, y.grad, rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------------------------------------- bad input


def _bad_cases():
    s = torch.randn(2, 3, 20)
    idx = torch.stack([torch.randperm(20)[:4] for _ in range(6)]).reshape(2, 3, 4)
    lp = torch.log(torch.full((2, 3, 4), 0.2))
    dup = idx.clone()
    dup[1, 2, 1] = dup[1, 2, 0]
    pos = lp.clone()
    pos[0, 0, 0] = 0.5
    nan = lp.clone()
    nan[0, 1, 2] = float("nan")
    heavy = torch.log(torch.full((2, 3, 4), 0.3))
    return s, idx, lp, [
        (dict(teacher_indices=idx.float()), TypeError, "teacher_indices"),
        (dict(teacher_indices=idx.to(torch.int16)), TypeError, "teacher_indices"),
        (dict(teacher_indices=idx + 20), ValueError, "teacher_indices"),
        (dict(teacher_indices=idx - 25), ValueError, "teacher_indices"),
        (dict(teacher_indices=dup), ValueError, "distinct"),
        (dict(teacher_logprobs=pos), ValueError, "teacher_logprobs"),
        (dict(teacher_logprobs=nan), ValueError, "NaN"),
        (dict(teacher_logprobs=heavy), ValueError, "sum to"),
        (dict(teacher_logprobs=lp[..., :3]), ValueError, "teacher_logprobs shape"),
        (dict(teacher_indices=idx[:1], teacher_logprobs=lp[:1]), ValueError, "teacher_indices/teacher_logprobs"),
        (dict(student_logits=s[..., :3]), ValueError, "larger than the vocabulary"),
        (dict(student_logits=s.long()), TypeError, "student_logits"),
        (dict(teacher_logprobs=lp.long()), TypeError, "teacher_logprobs"),
        (dict(mask=torch.ones(2, 3, dtype=torch.bool), labels=torch.zeros(2, 3, dtype=torch.long)), ValueError,
         "not both"),
        (dict(mask=torch.ones(2, 4, dtype=torch.bool)), ValueError, "mask"),
        (dict(labels=torch.zeros(2, 3)), TypeError, "labels"),
        (dict(temperature=0.0), ValueError, "temperature"),
        (dict(reduction="avg"), ValueError, "reduction"),
    ]


@pytest.mark.parametrize("case", range(18))
def test_bad_input(case):
    s, idx, lp, cases = _bad_cases()
    change, exc, word = cases[case]
    kw = dict(student_logits=s, teacher_indices=idx, teacher_logprobs=lp)
    kw.update(change)
    args = (kw.pop("student_logits"), kw.pop("teacher_indices"), kw.pop("teacher_logprobs"))
    with pytest.raises(exc, match=word):
        topk_kl_div(*args, backend="reference", **kw)


def test_bad_backend():
    s = torch.randn(2, 10)
    idx, lp = _teacher((2,), 10, 3, torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="backend"):
        topk_kl_div(s, idx, lp, backend="nope")
    with pytest.raises(BackendUnavailableError, match="cuda"):
        topk_kl_div(s, idx, lp, backend="cuda")


# ---------------------------------------------------------------------------------------------- custom-op rules


def test_opcheck(backend):
    g = torch.Generator().manual_seed(13)
    s = torch.randn(4, 37, generator=g)
    idx, lp = _teacher((4,), 37, 5, g)
    w = torch.full((4,), 0.25)
    el, ew = torch.empty(0, dtype=torch.long), torch.empty(0)
    labels, cw = torch.tensor([1, 2, 3, 36]), torch.full((4,), 0.5)
    for tail, (lab, c) in ((True, (el, ew)), (False, (labels, cw))):
        torch.library.opcheck(torch.ops.minitron.topk_kl_div_fwd.default,
                              (s.clone().requires_grad_(True), idx, lp, w, lab, c, 1.5, tail, backend),
                              test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))


def test_torch_compile_fullgraph(backend):
    torch._dynamo.reset()

    def f(s, idx, lp, m):
        return topk_kl_div(s, idx, lp, mask=m, temperature=2.0, backend=backend) * 2.0

    cf = torch.compile(f, fullgraph=True, backend="aot_eager")
    g = torch.Generator().manual_seed(14)
    s = torch.randn(3, 5, 41, generator=g)
    idx, lp = _teacher((3, 5), 41, 6, g)
    m = torch.rand(3, 5, generator=g) > 0.4
    a = s.clone().requires_grad_(True)
    out = cf(a, idx, lp, m)
    out.backward()
    b = s.clone().requires_grad_(True)
    ref = 2.0 * topk_kl_div_reference(b, idx, lp, mask=m, temperature=2.0)
    ref.backward()
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-7)


# ---------------------------------------------------------------------------------------------- fused linear


def _fused_inputs(seed: int, lead=(3, 5), h=24, v=203, k=7, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(*lead, h, generator=g).to(dtype)
    weight = (torch.randn(v, h, generator=g) / math.sqrt(h) * 2).to(dtype)
    bias = (0.1 * torch.randn(v, generator=g)).to(dtype)
    idx, lp = _teacher(lead, v, k, g)
    labels = torch.randint(0, v, lead, generator=g)
    labels.view(-1)[::4] = -100
    return hidden, weight, bias, idx, lp, labels


def _fused_check(backend, hidden, weight, bias, idx, lp, dtype=torch.float32, **kw):
    leaves = [x.detach().clone().requires_grad_(True) if x is not None else None for x in (hidden, weight, bias)]
    out = fused_linear_topk_kl_div(leaves[0], leaves[1], idx, lp, student_bias=leaves[2], backend=backend, **kw)
    out.sum().backward()
    refs = [x.detach().double().requires_grad_(True) if x is not None else None for x in (hidden, weight, bias)]
    kw.pop("chunk_size", None)
    ref = fused_linear_topk_kl_div_reference(refs[0], refs[1], idx, lp.double(), student_bias=refs[2], **kw)
    ref.sum().backward()
    # 16-bit: the logits themselves are rounded (GEMM in the input dtype), unlike the fp64 oracle's
    tol = _tol(dtype) if dtype == torch.float32 else dict(rtol=5e-2, atol=2e-2)
    torch.testing.assert_close(out.double(), ref.detach(), **tol)
    for a, b in zip(leaves, refs):
        if a is not None:
            assert a.grad.dtype == dtype
            scale = float(b.grad.abs().max())
            torch.testing.assert_close(a.grad.double(), b.grad, rtol=tol["rtol"], atol=tol["atol"] * max(scale, 1e-3))


@pytest.mark.parametrize("chunk_size", [None, 4])
@pytest.mark.parametrize("tail", [True, False])
def test_fused_linear_matches_reference(backend, chunk_size, tail):
    hidden, weight, bias, idx, lp, labels = _fused_inputs(15)
    for temperature in (1.0, 2.0):
        _fused_check(backend, hidden, weight, bias, idx, lp, labels=labels, ce_weight=0.3, kl_weight=0.7,
                     temperature=temperature, tail=tail, chunk_size=chunk_size)
    mask = torch.rand(3, 5, generator=torch.Generator().manual_seed(1)) > 0.3
    _fused_check(backend, hidden, weight, None, idx, lp, mask=mask, tail=tail, chunk_size=chunk_size)
    _fused_check(backend, hidden, weight, bias, idx, lp, mask=mask, labels=labels, ce_weight=1.0, kl_weight=0.0,
                 tail=tail, chunk_size=chunk_size, reduction="sum")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_fused_linear_16bit_none_reduction(backend, dtype):
    hidden, weight, bias, idx, lp, labels = _fused_inputs(16, dtype=dtype)
    _fused_check(backend, hidden, weight, bias, idx, lp, dtype=dtype, labels=labels, ce_weight=0.5, reduction="none",
                 chunk_size=6)


def test_fused_linear_module_empty_and_no_grad(backend):
    hidden, weight, bias, idx, lp, labels = _fused_inputs(17)
    m = FusedLinearTopKKLDivLoss(temperature=1.5, ce_weight=0.2, backend=backend, chunk_size=5)
    assert "ce_weight=0.2" in repr(m)
    with torch.no_grad():
        out = m(hidden, weight, idx, lp, bias, labels)
    ref = fused_linear_topk_kl_div_reference(hidden, weight, idx, lp, student_bias=bias, labels=labels, ce_weight=0.2,
                                             temperature=1.5)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-6)
    h0 = torch.randn(0, 24, requires_grad=True)
    out0 = fused_linear_topk_kl_div(h0, weight, idx.reshape(-1, 7)[:0], lp.reshape(-1, 7)[:0], backend=backend)
    assert float(out0.detach()) == 0.0
    out0.backward()
    assert h0.grad.shape == (0, 24)


def test_fused_linear_bad_input():
    hidden, weight, bias, idx, lp, labels = _fused_inputs(18)
    with pytest.raises(ValueError, match="ce_weight > 0 needs labels"):
        fused_linear_topk_kl_div(hidden, weight, idx, lp, ce_weight=1.0)
    with pytest.raises(ValueError, match="labels must be in"):
        fused_linear_topk_kl_div(hidden, weight, idx, lp, labels=labels + 1000, ce_weight=1.0)
    with pytest.raises(ValueError, match="student_hidden"):
        fused_linear_topk_kl_div(hidden[..., :5], weight, idx, lp)
    with pytest.raises(ValueError, match="teacher_indices"):
        fused_linear_topk_kl_div(hidden, weight, idx + 500, lp)
    with pytest.raises(ValueError, match="chunk_size"):
        fused_linear_topk_kl_div(hidden, weight, idx, lp, chunk_size=0)
    with pytest.raises(ValueError, match="kl_weight"):
        fused_linear_topk_kl_div(hidden, weight, idx, lp, kl_weight=-1.0)


def test_fused_linear_opcheck_and_compile():
    backend = _backend_or_skip("cpp")
    hidden, weight, bias, idx, lp, labels = _fused_inputs(19, lead=(6,), v=61, h=8)
    n = 6
    w = torch.full((n,), 1.0 / n)
    lab = labels.clamp(min=0)
    cw = torch.full((n,), 0.1)
    torch.library.opcheck(torch.ops.minitron.fused_linear_topk_kl_div_fwd.default,
                          (hidden.requires_grad_(True), weight.requires_grad_(True), bias, idx, lp, w, lab, cw, 1.5,
                           True, 4, backend),
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))
    torch._dynamo.reset()
    cf = torch.compile(lambda a, wt: fused_linear_topk_kl_div(a, wt, idx, lp, labels=labels, ce_weight=0.5,
                                                              chunk_size=4, backend=backend),
                       fullgraph=True, backend="aot_eager")
    a = hidden.detach().clone().requires_grad_(True)
    wt = weight.detach().clone().requires_grad_(True)
    out = cf(a, wt)
    out.backward()
    a2 = hidden.detach().clone().requires_grad_(True)
    w2 = weight.detach().clone().requires_grad_(True)
    ref = fused_linear_topk_kl_div_reference(a2, w2, idx, lp, labels=labels, ce_weight=0.5)
    ref.backward()
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(a.grad, a2.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(wt.grad, w2.grad, rtol=1e-4, atol=1e-6)
