"""``vocab_size``: vocabularies padded to different widths, in both KL families, on every backend available here.

Columns ``>= vocab_size`` of either side are padding: they must carry no probability mass and get a zero gradient,
so every result must equal the plain-torch reference on the unpadded vocabulary (fp64), whatever the padding
holds (large values, +inf, NaN). Fused-linear forms: LM heads with different row counts.
"""
from __future__ import annotations

import os

import pytest
import torch

from minitron.ops._dispatch import BackendUnavailableError, op_backends
from minitron.ops.fused_linear_kl import FusedLinearKLDivLoss, fused_linear_kl_div, fused_linear_kl_div_reference
from minitron.ops.kl import KLDivLoss, kl_div, kl_div_reference
from minitron.ops.topk_kl import (FusedLinearTopKKLDivLoss, TopKKLDivLoss, fused_linear_topk_kl_div,
                                  fused_linear_topk_kl_div_reference, topk_kl_div, topk_kl_div_reference)

pytestmark = pytest.mark.filterwarnings("ignore:(invalid value|divide by zero|overflow) encountered:RuntimeWarning")

ALL_BACKENDS = ["cpp", "triton", "reference"]
V = 50  # the real vocabulary
VS, VT = 64, 57  # student / teacher widths (padded differently)


def _skip_unless(op: str, backend: str) -> str:
    try:
        op_backends(op).select(backend, "cpu", torch.float32)
    except BackendUnavailableError as exc:
        if backend == "cpp" and os.environ.get("CI"):
            pytest.fail(f"the C++ backend must be built in CI: {exc}")
        pytest.skip(str(exc))
    return backend


@pytest.fixture(params=ALL_BACKENDS)
def backend(request) -> str:
    _skip_unless("kl_div", request.param)
    return _skip_unless("topk_kl_div", request.param)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _padded_logits(lead: tuple, width: int, seed: int, pad: str = "large") -> torch.Tensor:
    """Logits of ``width`` columns whose columns ``>= V`` are padding holding ``pad`` values (they must not
    matter)."""
    x = torch.randn(*lead, width, generator=_gen(seed)) * 2.0
    if pad == "large":
        x[..., V:] = 30.0  # would dominate every softmax if it counted
    elif pad == "inf":
        x[..., V:] = float("inf")
    elif pad == "nan":
        x[..., V:] = float("nan")
    return x


def _grad_of(fn, x: torch.Tensor, *rest):
    a = x.detach().clone().requires_grad_(True)
    out = fn(a, *rest)
    out.sum().backward()
    return out.detach(), a.grad


# ----------------------------------------------------------------------------------------------
# kl_div (dense logits)
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode, temperature", [("forward", 1.0), ("reverse", 2.0), ("jsd", 1.5)])
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("pad", ["large", "inf", "nan"])
def test_kl_div_matches_unpadded_reference(backend, mode, temperature, reduction, pad):
    s = _padded_logits((3, 4), VS, 1, pad)
    t = _padded_logits((3, 4), VT, 2, pad)
    mask = torch.rand(3, 4, generator=_gen(3)) > 0.3
    kw = dict(mode=mode, temperature=temperature, beta=0.3, reduction=reduction, mask=mask)
    v, g = _grad_of(lambda a: kl_div(a, t, vocab_size=V, backend=backend, **kw), s)
    rv, rg = _grad_of(lambda a: kl_div_reference(a, t[..., :V].double(), **kw), s[..., :V].double())
    torch.testing.assert_close(v.double(), rv, rtol=2e-5, atol=1e-6)
    assert g.shape == s.shape
    torch.testing.assert_close(g[..., :V].double(), rg, rtol=2e-5, atol=1e-7)
    assert torch.all(g[..., V:] == 0)  # padding: exactly zero gradient


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_kl_div_half_precision_and_transforms(backend, dtype):
    s = _padded_logits((5,), VS, 4).to(dtype)
    t = _padded_logits((5,), VT, 5).to(dtype)
    kw = dict(mode="forward", temperature=2.0, student_logit_scale=0.5, teacher_softcap=20.0)
    v, g = _grad_of(lambda a: kl_div(a, t, vocab_size=V, backend=backend, **kw), s)
    rv, rg = _grad_of(lambda a: kl_div_reference(a, t[..., :V].double(), **kw), s[..., :V].double())
    torch.testing.assert_close(v.double(), rv, rtol=2e-2, atol=1e-3)
    torch.testing.assert_close(g[..., :V].double(), rg, rtol=2e-2, atol=1e-3)
    assert g.dtype == dtype and torch.all(g[..., V:] == 0)


def test_kl_div_vocab_size_equal_to_width_is_the_default(backend):
    s, t = _padded_logits((2, 3), V, 6), _padded_logits((2, 3), V, 7)
    v1, g1 = _grad_of(lambda a: kl_div(a, t, backend=backend), s)
    v2, g2 = _grad_of(lambda a: kl_div(a, t, vocab_size=V, backend=backend), s)
    assert torch.equal(v1, v2) and torch.equal(g1, g2)


def test_kl_div_non_contiguous_padded_rows(backend):
    base = _padded_logits((4, 3), VS, 8)
    s = base.transpose(0, 1)  # padded rows, then strided across the leading axes too
    t = _padded_logits((3, 4), VT, 9)
    v, g = _grad_of(lambda a: kl_div(a, t, vocab_size=V, backend=backend, reduction="sum"), s)
    rv, rg = _grad_of(lambda a: kl_div_reference(a, t[..., :V].double(), reduction="sum"), s[..., :V].double())
    torch.testing.assert_close(v.double(), rv, rtol=2e-5, atol=1e-6)
    torch.testing.assert_close(g[..., :V].double(), rg, rtol=2e-5, atol=1e-7)
    assert torch.all(g[..., V:] == 0)


def test_kl_div_module_and_reference_accept_vocab_size(backend):
    s, t = _padded_logits((2, 3), VS, 10), _padded_logits((2, 3), VT, 11)
    mod = KLDivLoss(mode="jsd", vocab_size=V, backend=backend)
    assert "vocab_size=50" in repr(mod)
    torch.testing.assert_close(mod(s, t), kl_div_reference(s[..., :V], t[..., :V], mode="jsd"), rtol=2e-5, atol=1e-6)
    torch.testing.assert_close(kl_div_reference(s, t, mode="jsd", vocab_size=V),
                               kl_div_reference(s[..., :V], t[..., :V], mode="jsd"))


def test_kl_div_compiles_with_vocab_size():
    backend = _skip_unless("kl_div", "cpp")
    torch._dynamo.reset()
    t = _padded_logits((3,), VT, 12)

    def f(a):
        return kl_div(a, t, vocab_size=V, backend=backend)

    cf = torch.compile(f, fullgraph=True, backend="aot_eager")
    s = _padded_logits((3,), VS, 13)
    v, g = _grad_of(cf, s)
    v2, g2 = _grad_of(f, s)
    torch.testing.assert_close(v, v2)
    torch.testing.assert_close(g, g2)


def test_liger_convention_differs():
    """Liger pads the narrower student with logit 0, which leaves probability mass on the padding; with vocab_size
    the padding has none (documented in docs/kl.md)."""
    s = torch.randn(4, V, generator=_gen(14))
    t = _padded_logits((4,), VT, 15, pad="none")
    t[..., V:] = -1e4  # a teacher that gives its padding (almost) no mass
    ours = kl_div_reference(s, t, vocab_size=V)
    liger_like = kl_div_reference(torch.nn.functional.pad(s, (0, VT - V), value=0.0), t)
    assert float(liger_like) > float(ours) + 1e-3


# ----------------------------------------------------------------------------------------------
# fused_linear_kl_div: LM heads with different row counts
# ----------------------------------------------------------------------------------------------


def _heads(seed: int, hs: int = 12, ht: int = 16, lead: tuple = (2, 5)):
    g = _gen(seed)
    sh = torch.randn(*lead, hs, generator=g)
    th = torch.randn(*lead, ht, generator=g)
    sw = torch.randn(VS, hs, generator=g) * 0.5
    tw = torch.randn(VT, ht, generator=g) * 0.5
    sb = torch.randn(VS, generator=g) * 0.1
    tb = torch.randn(VT, generator=g) * 0.1
    sw[V:] = 5.0  # padded rows: large logits that would matter if they counted
    tw[V:] = -5.0
    return sh, sw, sb, th, tw, tb


@pytest.mark.parametrize("mode", ["forward", "reverse", "jsd"])
def test_fused_linear_kl_matches_unpadded_reference(backend, mode):
    sh, sw, sb, th, tw, tb = _heads(20)
    mask = torch.rand(2, 5, generator=_gen(21)) > 0.3
    kw = dict(mode=mode, temperature=1.5, beta=0.4, mask=mask)
    leaves = [x.detach().clone().requires_grad_(True) for x in (sh, sw, sb)]
    out = fused_linear_kl_div(leaves[0], leaves[1], th, tw, student_bias=leaves[2], teacher_bias=tb, vocab_size=V,
                              backend=backend, chunk_size=3, **kw)
    out.backward()
    refs = [x.detach().double().requires_grad_(True) for x in (sh, sw[:V], sb[:V])]
    ref = fused_linear_kl_div_reference(refs[0], refs[1], th.double(), tw[:V].double(), student_bias=refs[2],
                                        teacher_bias=tb[:V].double(), **kw)
    ref.backward()
    torch.testing.assert_close(out.double(), ref, rtol=2e-5, atol=1e-6)
    torch.testing.assert_close(leaves[0].grad.double(), refs[0].grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(leaves[1].grad[:V].double(), refs[1].grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(leaves[2].grad[:V].double(), refs[2].grad, rtol=1e-4, atol=1e-6)
    assert torch.all(leaves[1].grad[V:] == 0) and torch.all(leaves[2].grad[V:] == 0)


def test_fused_linear_kl_module_and_reference(backend):
    sh, sw, sb, th, tw, tb = _heads(22)
    mod = FusedLinearKLDivLoss(vocab_size=V, backend=backend)
    want = fused_linear_kl_div_reference(sh, sw[:V], th, tw[:V])
    torch.testing.assert_close(mod(sh, sw, th, tw), want, rtol=2e-5, atol=1e-6)
    torch.testing.assert_close(fused_linear_kl_div_reference(sh, sw, th, tw, vocab_size=V), want)


# ----------------------------------------------------------------------------------------------
# top-k KL (a top-k store / served teacher), dense and fused-linear
# ----------------------------------------------------------------------------------------------


def _topk_teacher(lead: tuple, k: int, seed: int):
    t = torch.randn(*lead, V, generator=_gen(seed)) * 3.0
    lp, idx = torch.log_softmax(t, -1).topk(k, dim=-1)
    return idx, lp


@pytest.mark.parametrize("tail", [True, False])
@pytest.mark.parametrize("k", [5, V])
def test_topk_kl_matches_unpadded_reference(backend, tail, k):
    s = _padded_logits((3, 4), VS, 30)
    idx, lp = _topk_teacher((3, 4), k, 31)
    mask = torch.rand(3, 4, generator=_gen(32)) > 0.2
    kw = dict(temperature=2.0, tail=tail, mask=mask)
    v, g = _grad_of(lambda a: topk_kl_div(a, idx, lp, vocab_size=V, backend=backend, **kw), s)
    rv, rg = _grad_of(lambda a: topk_kl_div_reference(a, idx, lp.double(), **kw), s[..., :V].double())
    torch.testing.assert_close(v.double(), rv, rtol=2e-5, atol=1e-6)
    torch.testing.assert_close(g[..., :V].double(), rg, rtol=2e-5, atol=1e-7)
    assert torch.all(g[..., V:] == 0)
    mod = TopKKLDivLoss(temperature=2.0, tail=tail, vocab_size=V, backend=backend)
    torch.testing.assert_close(mod(s, idx, lp, mask=mask), v)
    torch.testing.assert_close(topk_kl_div_reference(s, idx, lp, vocab_size=V, **kw).double(), rv, rtol=1e-5,
                               atol=1e-6)


def test_fused_linear_topk_kl_with_ce_matches_unpadded_reference(backend):
    sh, sw, sb, _, _, _ = _heads(40)
    idx, lp = _topk_teacher((2, 5), 6, 41)
    labels = torch.randint(0, V, (2, 5), generator=_gen(42))
    labels[0, 0] = -100
    kw = dict(labels=labels, ce_weight=0.5, kl_weight=2.0, temperature=1.5)
    leaves = [x.detach().clone().requires_grad_(True) for x in (sh, sw, sb)]
    out = fused_linear_topk_kl_div(leaves[0], leaves[1], idx, lp, student_bias=leaves[2], vocab_size=V,
                                   backend=backend, chunk_size=4, **kw)
    out.backward()
    refs = [x.detach().double().requires_grad_(True) for x in (sh, sw[:V], sb[:V])]
    ref = fused_linear_topk_kl_div_reference(refs[0], refs[1], idx, lp.double(), student_bias=refs[2], **kw)
    ref.backward()
    torch.testing.assert_close(out.double(), ref, rtol=2e-5, atol=1e-6)
    torch.testing.assert_close(leaves[0].grad.double(), refs[0].grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(leaves[1].grad[:V].double(), refs[1].grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(leaves[2].grad[:V].double(), refs[2].grad, rtol=1e-4, atol=1e-6)
    assert torch.all(leaves[1].grad[V:] == 0) and torch.all(leaves[2].grad[V:] == 0)
    mod = FusedLinearTopKKLDivLoss(vocab_size=V, backend=backend, ce_weight=0.5, kl_weight=2.0, temperature=1.5)
    torch.testing.assert_close(mod(sh, sw, idx, lp, student_bias=sb, labels=labels), out.detach())
    torch.testing.assert_close(
        fused_linear_topk_kl_div_reference(sh, sw, idx, lp, student_bias=sb, vocab_size=V, **kw).double(), ref,
        rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------------------
# bad input: clear errors naming the argument
# ----------------------------------------------------------------------------------------------


def _bad_cases():
    s, t = _padded_logits((2, 3), VS, 50), _padded_logits((2, 3), VT, 51)
    idx, lp = _topk_teacher((2, 3), 4, 52)
    sh, sw, sb, th, tw, tb = _heads(53, lead=(2, 3))
    return [
        ("widths differ, no vocab_size", lambda: kl_div(s, t), ValueError, "vocab_size"),
        ("vocab_size > student width", lambda: kl_div(s, t, vocab_size=VS + 1), ValueError, "student_logits"),
        ("vocab_size > teacher width", lambda: kl_div(s, t, vocab_size=VT + 1), ValueError, "teacher_logits"),
        ("vocab_size 0", lambda: kl_div(s, t, vocab_size=0), ValueError, "vocab_size"),
        ("vocab_size float", lambda: kl_div(s, t, vocab_size=50.0), TypeError, "vocab_size"),
        ("vocab_size bool", lambda: kl_div(s, t, vocab_size=True), TypeError, "vocab_size"),
        ("leading shapes differ", lambda: kl_div(s, t[:1], vocab_size=V), ValueError, "before the vocabulary"),
        ("process_group", lambda: kl_div(s, t, vocab_size=V, process_group=object()), NotImplementedError,
         "vocab_size"),
        ("module process_group", lambda: KLDivLoss(vocab_size=V, process_group=object()), NotImplementedError,
         "vocab_size"),
        ("module bad vocab_size", lambda: KLDivLoss(vocab_size=-3), ValueError, "vocab_size"),
        ("reference bad vocab_size", lambda: kl_div_reference(s, t, vocab_size=VT + 1), ValueError, "teacher_logits"),
        ("heads differ, no vocab_size", lambda: fused_linear_kl_div(sh, sw, th, tw), ValueError, "vocab_size"),
        ("vocab_size > teacher head", lambda: fused_linear_kl_div(sh, sw, th, tw, vocab_size=VT + 1), ValueError,
         "teacher_weight"),
        ("fused reference", lambda: fused_linear_kl_div_reference(sh, sw, th, tw, vocab_size=VS + 1), ValueError,
         "student_weight"),
        ("fused module", lambda: FusedLinearKLDivLoss(vocab_size=0), ValueError, "vocab_size"),
        ("topk index in padding", lambda: topk_kl_div(s, torch.where(idx == idx[..., :1], V + 3, idx), lp,
                                                      vocab_size=V), ValueError, "vocab_size"),
        ("topk vocab_size > width", lambda: topk_kl_div(s, idx, lp, vocab_size=VS + 1), ValueError,
         "student_logits"),
        ("topk k > vocab_size", lambda: topk_kl_div(s, *_topk_teacher((2, 3), 5, 54), vocab_size=4), ValueError,
         "vocab_size"),
        ("topk module", lambda: TopKKLDivLoss(vocab_size=1.5), TypeError, "vocab_size"),
        ("fused topk index in padding", lambda: fused_linear_topk_kl_div(
            sh, sw, torch.where(idx == idx[..., :1], VS - 1, idx), lp, vocab_size=V), ValueError, "vocab_size"),
        ("fused topk label in padding", lambda: fused_linear_topk_kl_div(
            sh, sw, idx, lp, labels=torch.full((2, 3), V), ce_weight=1.0, vocab_size=V), ValueError, "labels"),
        ("fused topk vocab_size > head", lambda: fused_linear_topk_kl_div(sh, sw, idx, lp, vocab_size=VS + 1),
         ValueError, "student_weight"),
        ("fused topk module", lambda: FusedLinearTopKKLDivLoss(vocab_size=0), ValueError, "vocab_size"),
    ]


@pytest.mark.parametrize("case", range(len(_bad_cases())))
def test_bad_inputs(case):
    name, call, exc, match = _bad_cases()[case]
    with pytest.raises(exc, match=match):
        call()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("gpu_backend", ["cuda", "triton"])
def test_cuda_backends(gpu_backend):
    """Padded rows on CUDA tensors (CUDA C++ and compiled Triton honour the row stride of the padded width)."""
    for op in ("kl_div", "topk_kl_div"):
        try:
            op_backends(op).select(gpu_backend, "cuda", torch.float32)
        except BackendUnavailableError as exc:
            pytest.skip(str(exc))
    s = _padded_logits((3, 4), VS, 60, "nan").cuda()
    t = _padded_logits((3, 4), VT, 61, "large").cuda()
    for mode in ("forward", "reverse", "jsd"):
        v, g = _grad_of(lambda a: kl_div(a, t, mode=mode, vocab_size=V, backend=gpu_backend), s)
        rv, rg = _grad_of(lambda a: kl_div_reference(a, t[..., :V].double(), mode=mode), s[..., :V].double())
        torch.testing.assert_close(v.double(), rv, rtol=2e-5, atol=1e-6)
        torch.testing.assert_close(g[..., :V].double(), rg, rtol=2e-5, atol=1e-7)
        assert torch.all(g[..., V:] == 0)
    idx, lp = _topk_teacher((3, 4), 5, 62)
    idx, lp = idx.cuda(), lp.cuda()
    v, g = _grad_of(lambda a: topk_kl_div(a, idx, lp, vocab_size=V, backend=gpu_backend), s)
    rv, rg = _grad_of(lambda a: topk_kl_div_reference(a, idx, lp.double()), s[..., :V].double())
    torch.testing.assert_close(v.double(), rv, rtol=2e-5, atol=1e-6)
    torch.testing.assert_close(g[..., :V].double(), rg, rtol=2e-5, atol=1e-7)
    assert torch.all(g[..., V:] == 0)
