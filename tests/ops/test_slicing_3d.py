"""gather_slices / compact_ on 3-D tensors and with two cut dims per tensor (mixture-of-experts weights).

Every backend of the machine (``cpp``; ``triton`` under TRITON_INTERPRET=1, set by tests/conftest.py when there
is no GPU; ``reference``) against chains of ``torch.index_select`` with the sorted, block-expanded indices.
The CUDA kernel's 3-D paths are checked on the CPU by tests/gpu/test_slicing_emulated.py and compiled by
tests/test_cuda_compile.py.
"""
from __future__ import annotations

import importlib.util

import pytest
import torch

from minitron import _ext
from minitron.ops import compact_, gather_slices, gather_slices_reference
from minitron.ops import slicing as S
from minitron.ops._dispatch import triton_unavailable

HAS_CPP = _ext.has_native_op("_gather_slices_native")
HAS_TRITON = importlib.util.find_spec("triton") is not None and triton_unavailable("cpu") is None
needs_cpp = pytest.mark.skipif(not HAS_CPP, reason="extension with _gather_slices_native not built")
BACKENDS = [
    pytest.param("cpp", marks=needs_cpp),
    pytest.param("triton", marks=pytest.mark.skipif(not HAS_TRITON, reason="triton interpreter unavailable")),
    "reference",
]
HERE = ["reference"] + (["cpp"] if HAS_CPP else []) + (["triton"] if HAS_TRITON else [])


def _rand(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    if dtype.is_floating_point:
        return torch.randn(shape, generator=g).to(dtype)
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=g).bool()
    return torch.randint(-100, 100, shape, generator=g).to(dtype)


def _units(n_units, k, seed=0, dtype=torch.int64):
    """k distinct unit numbers in random (unsorted) order."""
    g = torch.Generator().manual_seed(seed)
    return torch.randperm(n_units, generator=g)[:k].to(dtype)


def _chain(t, cuts):
    """index_select chain: cuts = [(index, dim, block), ...]."""
    for idx, dim, block in cuts:
        rows = torch.sort(idx.to(torch.int64)).values
        rows = (rows[:, None] * block + torch.arange(block)).reshape(-1)
        t = t.index_select(dim, rows)
    return t


def _same(out, exp):
    assert out.shape == exp.shape and out.dtype == exp.dtype, (out.shape, exp.shape, out.dtype, exp.dtype)
    assert torch.equal(out, exp)


def _layouts3(shape, dtype, seed=0):
    """(name, tensor) pairs of one logical 3-D shape in several memory layouts."""
    a, b, c = shape
    out = [("contiguous", _rand(shape, dtype, seed))]
    out.append(("permuted-201", _rand((c, a, b), dtype, seed + 1).permute(1, 2, 0)))  # inner dim is 1
    out.append(("permuted-120", _rand((b, c, a), dtype, seed + 2).permute(2, 0, 1)))  # inner dim is 0
    out.append(("transposed-12", _rand((a, c, b), dtype, seed + 3).transpose(1, 2)))
    out.append(("sliced", _rand((a + 2, b, c + 5), dtype, seed + 4)[1:1 + a, :, 2:2 + c]))  # non-dense
    out.append(("step", _rand((a, 2 * b, c), dtype, seed + 5)[:, ::2]))
    return out


# (dims, blocks) of the cases; shape (4 * 2, 6 * 3, 5 * 4) units of (2, 3, 4)
SHAPE = (8, 18, 20)
BLOCKS = (2, 3, 4)
CUT_DIMS = [(0,), (1,), (2,), (0, 1), (0, 2), (1, 2), (2, 0)]


def _cuts_for(dims, seed, blocks=BLOCKS, shape=SHAPE, k=None):
    cuts = []
    for n, d in enumerate(dims):
        units = shape[d] // blocks[d]
        cuts.append((_units(units, max(1, units * 2 // 3) if k is None else k, seed=seed + 7 * n), d, blocks[d]))
    return cuts


def _call(tensors, cut_lists, backend):
    """gather_slices with the public per-tensor forms: one cut -> plain entries, two -> pairs."""
    indices, dims, blocks = [], [], []
    for cuts in cut_lists:
        if len(cuts) == 1:
            indices.append(cuts[0][0])
            dims.append(cuts[0][1])
            blocks.append(cuts[0][2])
        else:
            indices.append(tuple(c[0] for c in cuts))
            dims.append(tuple(c[1] for c in cuts))
            blocks.append(tuple(c[2] for c in cuts))
    return gather_slices(tensors, indices, dims, block=blocks, backend=backend)


# ----------------------------------------------------------------------------------------------
# equality with index_select chains
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.int32, torch.int8])
@pytest.mark.parametrize("dims", CUT_DIMS, ids=lambda d: "-".join(map(str, d)))
def test_3d_matches_index_select_chain(backend, dtype, dims):
    layouts = _layouts3(SHAPE, dtype, seed=len(dims))
    if backend == "triton" and dtype not in (torch.bfloat16, torch.float64):
        layouts = layouts[:2]  # interpreter time
    for name, t in layouts:
        cuts = _cuts_for(dims, seed=sum(dims))
        (out,) = _call([t], [cuts], backend)
        _same(out, _chain(t, cuts))
        assert not out.requires_grad, name


@pytest.mark.parametrize("backend", BACKENDS)
def test_two_dims_on_2d(backend):
    """Rows and columns of a matrix (row-/column-major, sliced) in one call, blocks per dim."""
    base = _rand((24, 30), torch.float32, 1)
    for t in (base, _rand((30, 24), torch.float32, 2).t(), _rand((26, 40), torch.float32, 3)[1:25, 5:35]):
        cuts = [(torch.tensor([5, 0, 2]), 0, 4), (torch.tensor([9, 1, 4, 3]), 1, 3)]
        (out,) = _call([t], [cuts], backend)
        _same(out, _chain(t, cuts))
        cuts = cuts[::-1]  # dims given as (1, 0)
        (out,) = _call([t], [cuts], backend)
        _same(out, _chain(t, cuts))


@pytest.mark.parametrize("backend", BACKENDS)
def test_mixed_call_one_and_two_cuts(backend):
    """1-D, 2-D and 3-D tensors, one or two cuts each, several dtypes, in one call."""
    specs = [
        (_rand((8, 18, 20), torch.bfloat16, 1), _cuts_for((0, 1), 1)),
        (_rand((20, 18), torch.bfloat16, 2), [(_units(6, 4, 2), 1, 3)]),
        (_rand((8, 18, 20), torch.float32, 3).permute(2, 0, 1), [(_units(4, 3, 3), 1, 2), (_units(5, 2, 4), 0, 4)]),
        (_rand((40,), torch.int8, 4), [(_units(40, 9, 5), 0, 1)]),
        (_rand((8, 18, 20), torch.bfloat16, 5), _cuts_for((2,), 6)),
    ]
    outs = _call([t for t, _ in specs], [c for _, c in specs], backend)
    for o, (t, cuts) in zip(outs, specs):
        _same(o, _chain(t, cuts))


@pytest.mark.parametrize("backend", BACKENDS)
def test_moe_experts_and_neurons(backend):
    """The mixture-of-experts use: fused gate_up [E, 2I, H] by experts (dim 0) and neurons (dim 1 as
    cat(keep, I + keep)), down [E, H, I] by experts and neurons (dim 2), hidden channels as a third call."""
    E, I, H = 8, 12, 16
    gu, dn = _rand((E, 2 * I, H), torch.bfloat16, 1), _rand((E, H, I), torch.bfloat16, 2)
    ke, kn, kh = _units(E, 5, 3), _units(I, 9, 4), _units(H, 10, 5)
    rows = torch.cat([kn, I + kn])
    a, b = gather_slices([gu, dn], [(ke, rows), (ke, kn)], [(0, 1), (0, 2)], backend=backend)
    es, ns = ke.sort().values, kn.sort().values
    _same(a, gu[es][:, torch.cat([ns, I + ns])])
    _same(b, dn[es][:, :, ns])
    a2, b2 = gather_slices([a, b], kh, [2, 1], backend=backend)
    hs = kh.sort().values
    _same(a2, gu[es][:, torch.cat([ns, I + ns])][:, :, hs])
    _same(b2, dn[es][:, hs][:, :, ns])


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_indices_3d(backend):
    t = _rand(SHAPE, torch.float32)
    empty = torch.zeros(0, dtype=torch.int64)
    one = torch.tensor([1])
    outs = gather_slices([t, t, t, t], [empty, (empty, one), (one, empty), (empty, empty)], [0, (1, 2), (0, 2), (0, 1)],
                         block=[2, (3, 4), (2, 4), 1], backend=backend)
    assert [tuple(o.shape) for o in outs] == [(0, 18, 20), (8, 0, 4), (2, 18, 0), (0, 0, 20)]
    # everything kept along both dims
    full = (torch.arange(4).flip(0), torch.arange(5))
    (o,) = gather_slices([t], [full], [(0, 2)], block=[(2, 4)], backend=backend)
    _same(o, t)


@pytest.mark.parametrize("backend", BACKENDS)
def test_output_layout_follows_input_3d(backend):
    """Outputs are dense in the input's dim order (by decreasing stride)."""
    c = _rand((6, 8, 10), torch.float32)
    p = _rand((10, 6, 8), torch.float32, 1).permute(1, 2, 0)  # memory order (2, 0, 1)
    s = _rand((7, 8, 13), torch.float32, 2)[1:, :, 2:12]  # non-dense, row-major order
    idx = torch.tensor([3, 0])
    oc, op, os_ = gather_slices([c, p, s], [(idx, idx), (idx, idx), (idx, idx)], [(0, 2)] * 3, backend=backend)
    assert oc.is_contiguous() and os_.is_contiguous()
    assert op.permute(2, 0, 1).is_contiguous() and not op.is_contiguous()
    for o, t in ((oc, c), (op, p), (os_, s)):
        _same(o, _chain(t, [(idx, 0, 1), (idx, 2, 1)]))
    # expanded input (zero stride): read fine; output dense in the stride order (the broadcast dim innermost,
    # as a 2-D expanded row gives a column-major result)
    e = _rand((1, 8, 10), torch.float32, 3).expand(6, 8, 10)
    (oe,) = gather_slices([e], [(idx, idx)], [(0, 1)], backend=backend)
    _same(oe, _chain(e, [(idx, 0, 1), (idx, 1, 1)]))
    assert oe.permute(1, 2, 0).is_contiguous()


def test_reference_function_two_cuts():
    t = _rand(SHAPE, torch.float64)
    cuts = _cuts_for((0, 2), 3)
    (r,) = gather_slices_reference([t], [(cuts[0][0], cuts[1][0])], [(0, 2)], block=[(2, 4)])
    _same(r, _chain(t, cuts))


@needs_cpp
@pytest.mark.parametrize("strategy", ["runs", "compress", "pos", "generic"])
@pytest.mark.parametrize("isa", ["avx512", "avx2", "scalar"])
@pytest.mark.parametrize("dtype", [torch.int8, torch.bfloat16, torch.float32, torch.float64])
def test_cpp_strategies_3d(monkeypatch, strategy, isa, dtype):
    """Inner selections of 3-D tensors through every C++ line strategy (expert down_proj neurons)."""
    monkeypatch.setenv("MINITRON_SLICING_STRATEGY", strategy)
    monkeypatch.setenv("MINITRON_CPU_ISA", isa)
    t = _rand((5, 7, 203), dtype, 1)
    for block, k in ((1, 150), (7, 20)):
        cuts = [(_units(5, 3, 2), 0, 1), (_units(203 // block, k, 3), 2, block)]
        for x in (t, _rand((5, 7, 210), dtype, 2)[:, :, 3:206]):
            (o,) = _call([x], [cuts], "cpp")
            _same(o, _chain(x, cuts))
            (o,) = _call([x], [cuts[1:]], "cpp")
            _same(o, _chain(x, cuts[1:]))


@needs_cpp
@pytest.mark.parametrize("item_bytes", ["64", "4096"])
def test_cpp_parallel_items_3d(monkeypatch, item_bytes):
    """Many tiny work items on all threads (group/line boundaries inside items), streaming stores on."""
    monkeypatch.setenv("MINITRON_SLICING_ITEM_BYTES", item_bytes)
    monkeypatch.setenv("MINITRON_SLICING_NT", "1")
    old = torch.get_num_threads()
    torch.set_num_threads(max(2, old))
    try:
        t = _rand((9, 40, 64), torch.bfloat16, 4)
        for dims in CUT_DIMS:
            cuts = _cuts_for(dims, 5, blocks=(1, 2, 4), shape=t.shape)
            for x in (t, t.permute(1, 0, 2).contiguous().permute(1, 0, 2)):
                (o,) = _call([x], [cuts], "cpp")
                _same(o, _chain(x, cuts))
    finally:
        torch.set_num_threads(old)


@needs_cpp
def test_cpp_large_moe_shapes():
    """Outputs above the serial threshold: a scaled-down expert pair through the threaded path."""
    E, I, H = 16, 96, 256
    gu, dn = _rand((E, 2 * I, H), torch.bfloat16, 1), _rand((E, H, I), torch.bfloat16, 2)
    ke, kn = _units(E, 8, 3), _units(I, 72, 4)
    a, b = gather_slices([gu, dn], [(ke, torch.cat([kn, I + kn])), (ke, kn)], [(0, 1), (0, 2)], backend="cpp")
    es, ns = ke.sort().values, kn.sort().values
    _same(a, gu[es][:, torch.cat([ns, I + ns])])
    _same(b, dn[es][:, :, ns])


# ----------------------------------------------------------------------------------------------
# compact_ on 3-D tensors
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dim", [0, 1, 2])
def test_compact_3d(backend, dim, monkeypatch):
    if backend == "triton":
        monkeypatch.setenv("MINITRON_COMPACT_SCRATCH_BYTES", "500")  # several slabs
    layouts = [(n, t) for n, t in _layouts3((8, 6, 10), torch.float32, seed=dim)
               if n in ("contiguous", "permuted-201", "permuted-120", "transposed-12")]
    for name, t in layouts:
        units = t.shape[dim] // 2
        for idx in (_units(units, units - 1, seed=dim), torch.arange(1, units), torch.tensor([units - 1])):
            x = torch.empty_strided(t.shape, t.stride(), dtype=t.dtype)  # a fresh copy, same strides
            x.copy_(t)
            exp = _chain(x, [(idx, dim, 2)]).clone()
            ptr = x.untyped_storage().data_ptr()
            v = compact_(x, idx, dim, block=2, backend=backend)
            _same(v, exp)
            assert v.untyped_storage().data_ptr() == ptr, name
            assert S._dim_order(v.shape, v.stride()) == S._dim_order(t.shape, t.stride()) or v.numel() == 0, name


@pytest.mark.parametrize("backend", ["reference"] + (["cpp"] if HAS_CPP else []))
def test_compact_3d_leaves_rest_of_storage(backend):
    big = _rand((12, 6, 10), torch.float32, 1)
    before = big.clone()
    view = big[2:9]  # 7 x 6 x 10, a slice along the outermost dim
    v = compact_(view, torch.tensor([2, 0]), 1, block=2, backend=backend)
    _same(v, _chain(before[2:9], [(torch.tensor([2, 0]), 1, 2)]))
    assert torch.equal(big[:2], before[:2]) and torch.equal(big[9:], before[9:])


def test_compact_3d_refuses_unmergeable():
    t = _rand((6, 8, 12), torch.float32)[:, 1:7, 2:10]  # neither pair of neighbouring dims mergeable
    before = t.clone()
    with pytest.raises(ValueError, match="3-D tensor.*mergeable"):
        compact_(t, torch.tensor([1]), 0, backend="reference")
    with pytest.raises(ValueError, match="3-D tensor.*mergeable"):
        compact_(t, torch.tensor([1]), 2, backend="reference")
    assert torch.equal(t, before)
    # merging only the two outer dims works for a cut of the inner dim of a row-sliced tensor
    u = _rand((6, 8, 12), torch.float32)[:, :, 2:10]
    exp = _chain(u, [(torch.tensor([3, 1]), 2, 1)]).clone()
    _same(compact_(u, torch.tensor([3, 1]), 2, backend="reference"), exp)


# ----------------------------------------------------------------------------------------------
# argument validation
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case,exc,match", [
    ("dup-second", ValueError, r"indices\[0\]\[1\] has duplicate"),
    ("range-second", ValueError, r"indices\[0\]\[1\] has entries outside"),
    ("range-first", ValueError, r"indices\[0\]\[0\] has entries outside"),
    ("same-dim", ValueError, r"dims\[0\] cuts dim 1 twice"),
    ("dim-out-of-range", ValueError, r"dims\[0\]\[1\]"),
    ("block-pair-not-dividing", ValueError, r"block\[0\]\[1\]=7 does not divide"),
    ("index-not-pair", ValueError, r"indices\[0\] must be a tuple of 2"),
    ("index-pair-for-one-dim", ValueError, r"indices\[0\] is a tuple of 2"),
    ("three-dims", ValueError, r"dims\[0\] must be an int or a pair"),
    ("pair-len-mismatch", ValueError, r"indices\[0\] has 1 index tensors but dims\[0\] has 2"),
    ("block-pair-len", ValueError, r"block\[0\] has 3 entries"),
    ("float-second-index", TypeError, r"indices\[0\]\[1\] must have dtype"),
    ("dims-flat-for-one-tensor", ValueError, r"dims has 2 entries but tensors has 1.*dims=\[\(0, 1\)\]"),
    ("4d", ValueError, r"tensors\[0\] must be 1-D, 2-D or 3-D"),
])
def test_bad_two_cut_arguments(case, exc, match):
    t = _rand((4, 6, 8), torch.float32)
    a, b = torch.tensor([1, 0]), torch.tensor([2, 5])
    indices, dims, block = [(a, b)], [(0, 1)], 1
    if case == "dup-second":
        indices = [(a, torch.tensor([2, 2]))]
    elif case == "range-second":
        indices = [(a, torch.tensor([6]))]
    elif case == "range-first":
        indices, block = [(torch.tensor([2]), b)], [(2, 1)]
    elif case == "same-dim":
        dims = [(1, 1)]
    elif case == "dim-out-of-range":
        dims = [(0, 3)]
    elif case == "block-pair-not-dividing":
        block = [(1, 7)]
    elif case == "index-not-pair":
        indices = [a]
    elif case == "index-pair-for-one-dim":
        dims = [0]
    elif case == "three-dims":
        dims, indices = [(0, 1, 2)], [(a, b, a)]
    elif case == "pair-len-mismatch":
        indices = [(a,)]
    elif case == "block-pair-len":
        block = [(1, 1, 1)]
    elif case == "float-second-index":
        indices = [(a, b.float())]
    elif case == "dims-flat-for-one-tensor":
        dims = (0, 1)
    elif case == "4d":
        t = t.reshape(2, 2, 6, 8)
    before = t.clone()
    for backend in HERE:
        with pytest.raises(exc, match=match):
            gather_slices([t], indices, dims, block=block, backend=backend)
    assert torch.equal(t, before)


def test_op_level_second_cut_arguments():
    """The custom op's own checks of dims2/blocks2 and the packed indices."""
    t = _rand((4, 6, 8), torch.float32)
    a, b = torch.tensor([1, 0]), torch.tensor([2, 5])
    op = torch.ops.minitron.gather_slices
    (o,) = op([t], [a, b], [0], [1], "reference", [1], [1])
    _same(o, _chain(t, [(a, 0, 1), (b, 1, 1)]))
    with pytest.raises(ValueError, match="indices has 1 entries"):
        op([t], [a], [0], [1], "reference", [1], [1])
    with pytest.raises(ValueError, match="given together"):
        op([t], [a, b], [0], [1], "reference", [1], None)
    (o,) = op([t], [a], [0], [1], "reference", [-1], [1])  # explicit "no second cut"
    _same(o, _chain(t, [(a, 0, 1)]))


# ----------------------------------------------------------------------------------------------
# torch.library integration
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck_3d_two_cuts(backend):
    x = _rand((4, 6, 8), torch.float32)
    xb = _rand((6, 8), torch.bfloat16)
    p = _rand((8, 4, 6), torch.float32).permute(1, 2, 0)
    i1, i2, i3 = torch.tensor([2, 0]), torch.tensor([1, 4, 3]), torch.tensor([1])
    # tensors: x cut (0, 2); xb cut 1 only; p cut (1, 0) with blocks (2, 1)
    torch.library.opcheck(torch.ops.minitron.gather_slices.default,
                          ([x, xb, p], [i1, i2, i3, i2, i1], [0, 1, 1], [1, 1, 2], backend, [2, -1, 0], [1, 1, 1]))
    torch.library.opcheck(torch.ops.minitron.gather_slices.default, ([x, p], [i1, i3], [2, 1], [2, 3], backend))
    torch.library.opcheck(torch.ops.minitron.compact_.default, (x.clone(), i2, 2, 1, backend))
    torch.library.opcheck(torch.ops.minitron.compact_.default, (p.clone(memory_format=torch.preserve_format), i1, 2,
                                                                 2, backend))


@needs_cpp
def test_torch_compile_fullgraph_two_cuts():
    def f(gu, dn, c, e, n, h):
        a, b, m = gather_slices([gu, dn, dn[0]], [(e, n), (e, h), h], [(0, 1), (0, 2), 1], backend="cpp")
        v = compact_(c, h, 2, backend="cpp")
        return a * 2, b, v + 1, m

    gu, dn = _rand((6, 10, 8), torch.float32, 1), _rand((6, 8, 5), torch.float32, 2)
    c = _rand((3, 4, 5), torch.float32, 3)
    e, n, h = torch.tensor([4, 1]), torch.tensor([7, 2, 3]), torch.tensor([3, 0])
    c_eager = c.clone()
    want = f(gu, dn, c_eager, e, n, h)
    got = torch.compile(f, fullgraph=True)(gu, dn, c, e, n, h)
    for g_, w in zip(got, want):
        _same(g_, w)
    _same(want[0], _chain(gu, [(e, 0, 1), (n, 1, 1)]) * 2)
    _same(want[3], _chain(dn[0], [(h, 1, 1)]))


# ----------------------------------------------------------------------------------------------
# property test
# ----------------------------------------------------------------------------------------------

try:
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st
except ImportError:  # pragma: no cover
    given = None

if given is not None:

    @st.composite
    def _case3(draw):
        nd = draw(st.sampled_from([2, 3, 3]))
        dims = draw(st.lists(st.integers(0, nd - 1), min_size=1, max_size=2, unique=True))
        blocks = [draw(st.sampled_from([1, 1, 2, 3])) for _ in range(nd)]
        units = [draw(st.integers(1, 6)) for _ in range(nd)]
        shape = tuple(u * b for u, b in zip(units, blocks))
        dtype = draw(st.sampled_from([torch.float32, torch.bfloat16, torch.int8, torch.float64]))
        seed = draw(st.integers(0, 1000))
        perm = draw(st.permutations(list(range(nd))))
        base = _rand(tuple(shape[p] for p in perm), dtype, seed)
        inv = [perm.index(d) for d in range(nd)]
        t = base.permute(inv)
        if draw(st.booleans()):  # a non-dense slice of a bigger tensor
            big = _rand(tuple(2 * s for s in shape), dtype, seed + 1)
            t = big[tuple(slice(0, s) for s in shape)]
        cuts = [(torch.tensor(draw(st.lists(st.integers(0, units[d] - 1), unique=True, max_size=units[d])),
                              dtype=torch.int64), d, blocks[d]) for d in dims]
        return t, cuts

    @given(case=_case3(), backend=st.sampled_from(["reference"] + (["cpp"] if HAS_CPP else [])))
    @settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    def test_property_3d_two_cuts(case, backend):
        t, cuts = case
        (o,) = _call([t], [cuts], backend)
        _same(o, _chain(t, cuts))
        assert S._dim_order(o.shape, o.stride()) == S._dim_order(t.shape, t.stride()) or o.numel() == 0 \
            or any(s <= 1 for s in o.shape)
