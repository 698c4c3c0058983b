"""Every op on CUDA tensors, through the CUDA C++ and the (compiled, not interpreted) Triton backends.

Skipped on machines without a GPU. On a GPU runner (``.github/workflows/ci.yml``, job ``gpu``) these are
the tests that run the real kernels; they compare against the plain-torch references computed in fp64.
"""
from __future__ import annotations

import itertools
import math

import pytest
import torch

from minitron.ops import (BlockInfluence, ImportanceAccumulator, block_influence_reference, compact_,
                          fused_linear_kl_div, fused_linear_kl_div_reference, gather_slices,
                          gather_slices_reference, importance_reference, kl_div, kl_div_reference)
from minitron.ops._dispatch import op_backends

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

DEV = "cuda"
AGGS = ("mean", "l2", "sum", "max", "var")
# loss / gradient tolerances per input dtype (fp32 accumulation everywhere)
TOL = {torch.float32: (2e-5, 2e-5), torch.bfloat16: (2e-2, 2e-2), torch.float16: (5e-3, 5e-3)}


def _backend(op: str, name: str) -> str:
    try:
        op_backends(op).select(name, DEV, torch.float32)
    except Exception as exc:  # noqa: BLE001 - report why the backend is missing
        pytest.fail(f"backend {name!r} of {op} must be available on a GPU runner: {exc}")
    return name


@pytest.fixture(params=["cuda", "triton"])
def kl_backend(request) -> str:
    return _backend("kl_div", request.param)


@pytest.fixture(params=["cuda", "triton"])
def imp_backend(request) -> str:
    return _backend("importance_update", request.param)


@pytest.fixture(params=["cuda", "triton"])
def slice_backend(request) -> str:
    return _backend("gather_slices", request.param)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator(device=DEV).manual_seed(seed)


# ---------------------------------------------------------------------------------------------- KL


def _kl_check(s, t, backend, dtype=torch.float32, **kw):
    s_c = s.to(dtype).detach().requires_grad_(True)
    t_c = t.to(dtype)
    loss = kl_div(s_c, t_c, backend=backend, **kw)
    ref_s = s_c.detach().double().requires_grad_(True)
    ref = kl_div_reference(ref_s, t_c.double(), **kw)
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(loss.double(), ref, rtol=rtol, atol=atol * max(1.0, ref.abs().max().item()))
    if not s_c.requires_grad or s_c.numel() == 0:
        return
    up = torch.randn_like(loss.double()) if loss.dim() else torch.tensor(1.0, device=DEV, dtype=torch.float64)
    (loss.double() * up).sum().backward()
    (ref * up).sum().backward()
    assert s_c.grad.dtype == dtype
    g, gr = s_c.grad.double(), ref_s.grad
    finite = torch.isfinite(gr)
    scale = max(gr[finite].abs().max().item(), 1e-3) if finite.any() else 1.0
    torch.testing.assert_close(g[finite], gr[finite], rtol=rtol, atol=atol * scale + 1e-6)


@pytest.mark.parametrize("mode", ["forward", "reverse", "jsd"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("vocab", [1, 123, 32001, 128256])
def test_kl_modes_dtypes_vocab(kl_backend, mode, dtype, vocab):
    g = _gen(1)
    n = 37 if vocab < 100000 else 9
    s = torch.randn(n, vocab, device=DEV, generator=g) * 3
    t = torch.randn(n, vocab, device=DEV, generator=g) * 3
    mask = torch.rand(n, device=DEV, generator=g) > 0.3
    for reduction in ("mean", "sum", "none"):
        _kl_check(s, t, kl_backend, dtype, mode=mode, beta=0.3, temperature=1.7, reduction=reduction, mask=mask)


@pytest.mark.parametrize("mode", ["forward", "reverse", "jsd"])
def test_kl_neg_inf_nan_masked(kl_backend, mode):
    g = _gen(2)
    s = torch.randn(6, 1025, device=DEV, generator=g)
    t = torch.randn(6, 1025, device=DEV, generator=g)
    s[0, :10] = -math.inf
    t[1, 5:500] = -math.inf
    s[2, 7] = t[2, 7] = -math.inf
    _kl_check(s, t, kl_backend, mode=mode, reduction="none")
    # NaN only poisons its own token
    s2 = s.clone()
    s2[3, 3] = math.nan
    out = kl_div(s2, t, mode=mode, reduction="none", backend=kl_backend)
    assert torch.isnan(out[3]) and not torch.isnan(out[torch.arange(6, device=DEV) != 3]).any()
    # all masked: zero loss, zero gradient
    a = s.detach().clone().requires_grad_(True)
    loss = kl_div(a, t, mode=mode, mask=torch.zeros(6, dtype=torch.bool, device=DEV), backend=kl_backend)
    loss.backward()
    assert loss.item() == 0.0 and not a.grad.any()


def test_kl_non_contiguous_leading_shapes_empty(kl_backend):
    g = _gen(3)
    wide = torch.randn(4, 5, 300, device=DEV, generator=g)
    t = torch.randn(4, 5, 257, device=DEV, generator=g)
    _kl_check(wide[..., 13:270], t, kl_backend, reduction="mean")
    _kl_check(torch.randn(257, 20, device=DEV, generator=g).t(), torch.randn(20, 257, device=DEV, generator=g),
              kl_backend, reduction="sum")
    for reduction in ("mean", "sum", "none"):
        e = torch.randn(0, 50, device=DEV, requires_grad=True)
        out = kl_div(e, torch.randn(0, 50, device=DEV), reduction=reduction, backend=kl_backend)
        out.sum().backward()
        assert out.shape == ((0,) if reduction == "none" else ())


@pytest.mark.parametrize("mode", [0, 1, 2])
def test_kl_loss_only(kl_backend, mode):
    """need_grad=False (what kl_div uses under torch.no_grad): same loss, no [N, V] gradient."""
    g = _gen(11)
    s = torch.randn(300, 32001, device=DEV, generator=g) * 2
    t = torch.randn(300, 32001, device=DEV, generator=g) * 2
    s[0, :100] = -math.inf
    w = torch.rand(300, device=DEV, generator=g)
    w[3] = 0.0
    for rows in (300, 2):  # one block per row, and split rows
        loss, grad = torch.ops.minitron.kl_div_fwd(s[:rows], t[:rows], w[:rows], mode, 1.3, 0.4, 0.8, kl_backend,
                                                   True)
        loss_o, empty = torch.ops.minitron.kl_div_fwd(s[:rows], t[:rows], w[:rows], mode, 1.3, 0.4, 0.8,
                                                      kl_backend, False)
        assert empty.shape == (0, 32001) and grad.shape == (rows, 32001)
        torch.testing.assert_close(loss_o, loss, rtol=1e-6, atol=1e-6, equal_nan=True)
    with torch.no_grad():
        a = s.clone().requires_grad_(True)
        torch.testing.assert_close(kl_div(a, t, backend=kl_backend), kl_div(s, t, backend=kl_backend))


def test_kl_opcheck_and_compile(kl_backend):
    w = torch.full((4,), 0.25, device=DEV)
    for mode in (0, 1, 2):
        s, t = torch.randn(4, 77, device=DEV), torch.randn(4, 77, device=DEV)
        torch.library.opcheck(torch.ops.minitron.kl_div_fwd.default,
                              (s.requires_grad_(True), t, w, mode, 1.5, 0.5, 2.25, kl_backend),
                              test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))
    torch._dynamo.reset()

    def f(s, t, m):
        return kl_div(s, t, mask=m, backend=kl_backend) * 2.0

    cf = torch.compile(f, fullgraph=True)
    g = _gen(4)
    s = torch.randn(3, 5, 1000, device=DEV, generator=g)
    t = torch.randn(3, 5, 1000, device=DEV, generator=g)
    m = torch.rand(3, 5, device=DEV, generator=g) > 0.4
    a, b = s.clone().requires_grad_(True), s.clone().requires_grad_(True)
    out = cf(a, t, m)
    out.backward()
    ref = f(b, t, m)
    ref.backward()
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(a.grad, b.grad)


@pytest.mark.parametrize("mode", ["forward", "jsd"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_linear_kl(kl_backend, mode, dtype):
    g = _gen(5)
    n, hs, ht, v = 301, 64, 96, 5003
    sh = torch.randn(n, hs, device=DEV, generator=g)
    sw = torch.randn(v, hs, device=DEV, generator=g) / 8
    sb = torch.randn(v, device=DEV, generator=g) / 4
    th = torch.randn(n, ht, device=DEV, generator=g)
    tw = torch.randn(v, ht, device=DEV, generator=g) / 8
    tb = torch.randn(v, device=DEV, generator=g) / 4
    mask = torch.rand(n, device=DEV, generator=g) > 0.2
    leaves = [x.to(dtype).requires_grad_(True) for x in (sh, sw, sb)]
    loss = fused_linear_kl_div(leaves[0], leaves[1], th.to(dtype), tw.to(dtype), student_bias=leaves[2],
                               teacher_bias=tb.to(dtype), mode=mode, temperature=2.0, mask=mask, chunk_size=64,
                               backend=kl_backend)
    loss.backward()
    refs = [x.detach().double().requires_grad_(True) for x in leaves]
    ref = fused_linear_kl_div_reference(refs[0], refs[1], th.to(dtype).double(), tw.to(dtype).double(),
                                        student_bias=refs[2], teacher_bias=tb.to(dtype).double(), mode=mode,
                                        temperature=2.0, mask=mask)
    ref.backward()
    # bf16 logits come from bf16 matmuls: compare at bf16 precision
    rtol = 2e-4 if dtype == torch.float32 else 5e-2
    torch.testing.assert_close(loss.double(), ref, rtol=rtol, atol=rtol)
    for x, r in zip(leaves, refs):
        scale = r.grad.abs().max().item()
        torch.testing.assert_close(x.grad.double(), r.grad, rtol=rtol, atol=rtol * scale)


# ---------------------------------------------------------------------------------------------- importance


def _ragged(batch: int, seq: int, g) -> torch.Tensor:
    lengths = torch.randint(0, seq + 1, (batch,), device=DEV, generator=g)
    lengths[0] = seq
    return torch.arange(seq, device=DEV)[None, :] < lengths[:, None]


@pytest.mark.parametrize("seq_agg,batch_agg", list(itertools.product(AGGS, AGGS)))
def test_importance_all_aggregations(imp_backend, seq_agg, batch_agg):
    g = _gen(6)
    xs = [torch.randn(3, 97, 123, device=DEV, generator=g) for _ in range(2)]
    masks = [_ragged(3, 97, g), None]
    acc = ImportanceAccumulator(123, seq_agg=seq_agg, batch_agg=batch_agg, device=DEV, backend=imp_backend)
    for x, m in zip(xs, masks):
        acc.update(x, m)
    ref = importance_reference([x.double() for x in xs], masks, seq_agg=seq_agg, batch_agg=batch_agg)
    torch.testing.assert_close(acc.value().double(), ref.double(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("group_size", [1, 64, 96])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_importance_groups_dtypes_noncontiguous(imp_backend, group_size, dtype):
    g = _gen(7)
    units = 3 if group_size > 1 else 123
    big = torch.randn(2, 30, units * group_size + 8, device=DEV, generator=g).to(dtype)
    x = big[:, 1:, 5:5 + units * group_size]  # non-contiguous
    mask = _ragged(2, 29, g)
    for seq_agg, batch_agg in (("mean", "l2"), ("var", "max")):
        acc = ImportanceAccumulator(units, group_size=group_size, seq_agg=seq_agg, batch_agg=batch_agg, device=DEV,
                                    backend=imp_backend)
        acc.update(x, mask)
        acc.update(x[:1, :1], None)
        ref = importance_reference([x.double(), x[:1, :1].double()], [mask, None], group_size=group_size,
                                   seq_agg=seq_agg, batch_agg=batch_agg)
        torch.testing.assert_close(acc.value().double(), ref.double(), rtol=1e-4, atol=1e-5)


def test_importance_opcheck(imp_backend):
    x = torch.randn(2, 5, 6, device=DEV)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 0, 0, 0, 0]], dtype=torch.bool, device=DEV)
    for m in (None, mask):
        for gsz, sa, ba in [(1, "mean", "l2"), (3, "var", "var")]:
            state = torch.zeros(2, 6 // gsz, device=DEV)
            count = torch.zeros(2, dtype=torch.int64, device=DEV)
            torch.library.opcheck(torch.ops.minitron.importance_update.default,
                                  (state, count, x, m, gsz, sa, ba, imp_backend))
        state = torch.zeros(3, dtype=torch.float64, device=DEV)
        count = torch.zeros(2, 3, dtype=torch.int64, device=DEV)
        torch.library.opcheck(torch.ops.minitron.block_influence_update.default,
                              (state, count, x, x.flip(-1), m, 1, imp_backend))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_block_influence(imp_backend, dtype):
    g = _gen(8)
    bi = BlockInfluence(2, device=DEV, backend=imp_backend)
    hin = torch.randn(3, 41, 200, device=DEV, generator=g).to(dtype)
    hout = (hin.float() + 0.5 * torch.randn(3, 41, 200, device=DEV, generator=g)).to(dtype)
    mask = _ragged(3, 41, g)
    bi.update(0, hin, hout, mask)
    bi.update(1, hin, hin, None)
    ref0 = block_influence_reference([hin.double()], [hout.double()], [mask])
    torch.testing.assert_close(bi.value()[0].double(), ref0.double().reshape(()), rtol=1e-4, atol=1e-5)
    assert abs(bi.value()[1].item()) < 1e-3


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("group_size", [1, 64])
def test_importance_nonfinite_counted(imp_backend, dtype, group_size):
    """NaN/+inf/-inf at counted positions are counted exactly by the fused pass; masked ones never."""
    from minitron.ops.importance import NonFiniteActivationError

    g = _gen(9)
    units = 5
    x = torch.randn(3, 300, units * group_size, device=DEV, generator=g).to(dtype)
    m = torch.ones(3, 300, dtype=torch.bool, device=DEV)
    m[0, 250:] = False
    m[2] = False
    x[0, 0, 0] = float("nan")
    x[0, 200, 2] = float("inf")
    x[1, 299, -1] = -float("inf")
    x[0, 260, 0] = float("nan")  # masked
    x[2, 5] = float("inf")  # masked sample
    for seq_agg in AGGS:
        acc = ImportanceAccumulator(units, group_size=group_size, seq_agg=seq_agg, batch_agg="var", device=DEV,
                                    backend=imp_backend)
        acc.update(x, m)
        assert acc.num_nonfinite == 3, seq_agg
        with pytest.raises(NonFiniteActivationError, match="x held 3 non-finite"):
            acc.value()
    bi = BlockInfluence(2, device=DEV, backend=imp_backend)
    bi.update(1, x, x.flip(-1), m)
    assert bi.num_nonfinite.tolist() == [0, 6]


# ---------------------------------------------------------------------------------------------- slicing


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_gather_slices_many_tensors(slice_backend, dtype):
    g = _gen(9)
    a = torch.randn(1025, 123, device=DEV, generator=g).to(dtype)
    b = torch.randn(123, 1025, device=DEV, generator=g).to(dtype)
    c = torch.randn(96 * 5, 70, device=DEV, generator=g).to(dtype)
    d = torch.randn(300, 40, device=DEV, generator=g).to(dtype).t()  # non-contiguous
    idx_a = torch.randperm(1025, device=DEV, generator=g)[:600]
    idx_b = torch.randperm(1025, device=DEV, generator=g)[:17].to(torch.int32)
    idx_c = torch.tensor([4, 0, 2], device=DEV)
    idx_d = torch.randperm(300, device=DEV, generator=g)[:250]
    args = ([a, b, c, d], [idx_a, idx_b, idx_c, idx_d], [0, 1, 0, 1])
    outs = gather_slices(*args, block=[1, 1, 96, 1], backend=slice_backend)
    refs = gather_slices_reference(*args, block=[1, 1, 96, 1])
    for o, r in zip(outs, refs):
        assert o.device.type == "cuda"
        torch.testing.assert_close(o, r, rtol=0, atol=0)


@pytest.mark.parametrize("dim,block", [(0, 1), (1, 1), (0, 64), (1, 64)])
def test_compact_in_place(slice_backend, dim, block):
    g = _gen(10)
    t = torch.randn(64 * 9, 64 * 7, device=DEV, generator=g)
    units = t.shape[dim] // block
    idx = torch.randperm(units, device=DEV, generator=g)[: units // 2 + 1]
    ref = gather_slices_reference([t], [idx], [dim], block=[block])[0]
    work = t.clone()
    ptr = work.data_ptr()
    out = compact_(work, idx, dim, block=block, backend=_backend("compact_", slice_backend))
    assert out.data_ptr() == ptr
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    view = t.clone()[:, 64:]  # non-contiguous input
    ref2 = gather_slices_reference([view], [idx[idx < view.shape[dim] // block]], [dim], block=[block])[0]
    out2 = compact_(view, idx[idx < view.shape[dim] // block], dim, block=block, backend=slice_backend)
    torch.testing.assert_close(out2, ref2, rtol=0, atol=0)


def test_slicing_opcheck(slice_backend):
    x = torch.randn(40, 48, device=DEV)
    xb = torch.randn(24, 16, device=DEV).to(torch.bfloat16)
    idx = torch.tensor([4, 1, 2], device=DEV)
    torch.library.opcheck(torch.ops.minitron.gather_slices.default,
                          ([x, x.t(), xb, x[:, 0], xb[:, ::2]], [idx, idx, idx, idx, torch.tensor([1], device=DEV)],
                           [0, 1, 1, 0, 1], [8, 8, 2, 2, 1], slice_backend))
    for t, dim, block in ((x, 1, 8), (x.t(), 1, 8), (x[:, 5:45], 0, 4), (xb, 0, 4)):
        torch.library.opcheck(torch.ops.minitron.compact_.default, (t.clone(), idx, dim, block, slice_backend))


def test_auto_dispatch_picks_cuda_cpp():
    """CUDA tensors go to the CUDA C++ kernels when they are built (never to the reference)."""
    for op in ("kl_div", "importance_update", "gather_slices", "compact_"):
        assert op_backends(op).select("auto", DEV, torch.float32).name == "cuda"
