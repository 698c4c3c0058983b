"""Tests of minitron.ops.slicing: gather_slices, compact_ and their backends.

Backends tested here: ``cpp`` (needs the extension: set MINITRON_EXT or build it), ``triton`` under
the interpreter (TRITON_INTERPRET=1 is set by tests/conftest.py when there is no GPU; small shapes) and
``reference``. The oracle is ``torch.index_select`` with the sorted, block-expanded index.
"""
from __future__ import annotations

import os
import importlib.util  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from minitron import _ext  # noqa: E402
from minitron.ops import BackendUnavailableError, compact_, gather_slices, gather_slices_reference  # noqa: E402
from minitron.ops import slicing as S  # noqa: E402
from minitron.ops._dispatch import triton_unavailable  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
HAS_CPP = _ext.has_native_op("_gather_slices_native") and _ext.has_native_op("_compact_native")
HAS_TRITON = importlib.util.find_spec("triton") is not None and triton_unavailable("cpu") is None

needs_cpp = pytest.mark.skipif(not HAS_CPP, reason="extension with _gather_slices_native not built")
BACKENDS = [
    pytest.param("cpp", marks=needs_cpp),
    pytest.param("triton", marks=pytest.mark.skipif(not HAS_TRITON, reason="triton interpreter unavailable")),
    "reference",
]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _rand(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    if dtype.is_floating_point:
        return torch.randn(shape, generator=g).to(dtype)
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=g).bool()
    info = torch.iinfo(dtype)
    return torch.randint(max(info.min, -1000), min(info.max, 1000), shape, generator=g).to(dtype)


def _units(n_units, k, seed=0, dtype=torch.int64):
    """k distinct unit numbers in random (unsorted) order."""
    g = torch.Generator().manual_seed(seed)
    return torch.randperm(n_units, generator=g)[:k].to(dtype)


def _expected(t, idx, dim, block):
    rows = torch.sort(idx.to(torch.int64)).values
    rows = (rows[:, None] * block + torch.arange(block)).reshape(-1)
    return t.index_select(dim, rows)


def _assert_same(out, exp):
    assert out.shape == exp.shape and out.dtype == exp.dtype
    assert torch.equal(out, exp)


def _layouts(shape, dtype, seed=0):
    """(name, tensor) pairs of one logical shape in several memory layouts."""
    n0, n1 = shape
    base = _rand((n0, n1), dtype, seed)
    out = [("contiguous", base)]
    out.append(("transposed", _rand((n1, n0), dtype, seed + 1).t()))
    big = _rand((n0, n1 + 7), dtype, seed + 2)
    out.append(("sliced-cols", big[:, 3:3 + n1]))  # rows not packed (row stride n1 + 7)
    big2 = _rand((n0, 2 * n1), dtype, seed + 3)
    out.append(("step-cols", big2[:, ::2]))  # inner stride 2
    big3 = _rand((n1, n0 + 4), dtype, seed + 4).t()
    out.append(("transposed-sliced", big3[1:1 + n0]))  # column-major, columns not packed
    return out


# ----------------------------------------------------------------------------------------------
# gather_slices: equality with index_select
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("dim", [0, 1])
@pytest.mark.parametrize("block", [1, 64, 96])
def test_gather_matches_index_select(backend, dtype, dim, block):
    small = backend == "triton"  # the interpreter runs every program in Python
    units = 3 if small else 5
    other = 13 if small else 37
    shape = (units * block, other) if dim == 0 else (other, units * block)
    idx = _units(units, 2 if small else 3, seed=block + dim)
    layouts = _layouts(shape, dtype, seed=block)
    if small and (block != 1 or dtype != torch.float32):
        layouts = [lay for lay in layouts if lay[0] in ("contiguous", "transposed-sliced", "step-cols")]
    for name, t in layouts:
        (out,) = gather_slices([t], [idx], [dim], block=block, backend=backend)
        _assert_same(out, _expected(t, idx, dim, block))
        assert not out.requires_grad


@pytest.mark.parametrize("backend", BACKENDS)
def test_gather_layout_follows_input(backend):
    t = _rand((48, 40), torch.float32)
    idx = torch.tensor([3, 0, 5])
    (a,) = gather_slices([t], idx, 0, block=8, backend=backend)
    (b,) = gather_slices([t.t()], idx, 1, block=8, backend=backend)
    assert a.is_contiguous()
    assert b.t().is_contiguous() and b.stride() == (1, 40)
    _assert_same(b, _expected(t.t(), idx, 1, 8))


@pytest.mark.parametrize("backend", BACKENDS)
def test_gather_many_tensors_mixed(backend):
    small = backend == "triton"
    specs = [  # (shape, dtype, dim, block, k)
        ((24, 33), torch.float32, 0, 8, 2),
        ((17, 64), torch.bfloat16, 1, 16, 3),
        ((96,), torch.float16, 0, 32, 2),
        ((45, 9), torch.float32, 0, 1, 20),
        ((11, 30), torch.float16, 1, 1, 7),
        ((6, 40), torch.bfloat16, 1, 4, 0),  # empty index
    ]
    if not small:
        specs.append(((256, 300), torch.float32, 1, 3, 60))
    tensors, indices, dims, blocks = [], [], [], []
    for s, (shape, dtype, dim, block, k) in enumerate(specs):
        t = _rand(shape, dtype, seed=s)
        if s == 1:
            t = _rand(shape[::-1], dtype, seed=s).t()
        tensors.append(t)
        indices.append(_units(shape[dim] // block, k, seed=s, dtype=torch.int32 if s % 2 else torch.int64))
        dims.append(dim)
        blocks.append(block)
    outs = gather_slices(tensors, indices, dims, block=blocks, backend=backend)
    refs = gather_slices_reference(tensors, indices, dims, block=blocks)
    assert len(outs) == len(specs)
    for o, r, t, i, d, b in zip(outs, refs, tensors, indices, dims, blocks):
        _assert_same(o, r)
        _assert_same(o, _expected(t, i, d, b))


@pytest.mark.parametrize("backend", BACKENDS)
def test_gather_empty_and_edge_cases(backend):
    t = _rand((12, 10), torch.float32)
    empty = torch.zeros(0, dtype=torch.int64)
    outs = gather_slices([t, t, t[:, 0]], empty, [0, 1, 0], backend=backend)
    assert [tuple(o.shape) for o in outs] == [(0, 10), (12, 0), (0,)]
    assert gather_slices([], [], [], backend=backend) == []
    # everything kept, single unit, size-1 dims, 1-D strided
    full = torch.arange(6)
    _assert_same(gather_slices([t], full, 0, block=2, backend=backend)[0], t)
    _assert_same(gather_slices([t[:1]], torch.tensor([0]), 0, backend=backend)[0], t[:1])
    col = t[:, 4:5]
    _assert_same(gather_slices([col], torch.tensor([7, 2]), 0, backend=backend)[0], col[[2, 7]])
    v = t[:, 3]  # stride 10
    _assert_same(gather_slices([v], torch.tensor([9, 0, 4]), 0, backend=backend)[0], v[[0, 4, 9]])


@pytest.mark.parametrize("backend", BACKENDS)
def test_gather_does_not_modify_inputs(backend):
    t = _rand((32, 24), torch.bfloat16)
    idx = torch.tensor([3, 1], dtype=torch.int32)
    t0, i0 = t.clone(), idx.clone()
    gather_slices([t], [idx], [1], block=4, backend=backend)
    assert torch.equal(t, t0) and torch.equal(idx, i0)


def test_gather_extra_dtypes():
    backends = ["reference"] + (["cpp"] if HAS_CPP else []) + (["triton"] if HAS_TRITON else [])
    for dtype in (torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64, torch.float64, torch.bool):
        t = _rand((20, 18), dtype)
        for dim in (0, 1):
            idx = torch.tensor([5, 0, 2])
            for backend in backends:
                (o,) = gather_slices([t.t() if dim else t], idx, dim, block=2, backend=backend)
                _assert_same(o, _expected(t.t() if dim else t, idx, dim, 2))


def test_gather_requires_grad_input():
    t = torch.randn(16, 8, requires_grad=True)
    (o,) = gather_slices([t], torch.tensor([1, 0]), 0, block=4, backend="reference")
    assert not o.requires_grad
    _assert_same(o, t.detach()[:8])


# ----------------------------------------------------------------------------------------------
# C++ kernel strategies, ISA levels, threads, streaming stores
# ----------------------------------------------------------------------------------------------


@needs_cpp
@pytest.mark.parametrize("strategy", ["runs", "compress", "pos", "generic"])
@pytest.mark.parametrize("isa", ["avx512", "avx2", "scalar"])
@pytest.mark.parametrize("dtype", [torch.int8, torch.bfloat16, torch.float32, torch.float64])
def test_cpp_strategies(monkeypatch, strategy, isa, dtype):
    monkeypatch.setenv("MINITRON_SLICING_STRATEGY", strategy)
    monkeypatch.setenv("MINITRON_CPU_ISA", isa)
    for block, units, k in ((1, 203, 150), (3, 70, 33), (16, 9, 4)):
        n = units * block
        t = _rand((29, n), dtype, seed=block)
        sliced = _rand((29, n + 5), dtype, seed=block)[:, 2:2 + n]
        idx = _units(units, k, seed=block)
        for dim, x in ((1, t), (0, t.t()), (1, sliced), (0, sliced.t()), (1, t[:, None, :].expand(29, 2, n)[:, 1])):
            (o,) = gather_slices([x], idx, dim, block=block, backend="cpp")
            _assert_same(o, _expected(x, idx, dim, block))
            (o,) = gather_slices([x.t()], idx, 1 - dim, block=block, backend="cpp")
            _assert_same(o, _expected(x.t(), idx, 1 - dim, block))
        y = t.clone()
        v = compact_(y, idx, 1, block=block, backend="cpp")
        _assert_same(v, _expected(t, idx, 1, block))


@needs_cpp
@pytest.mark.parametrize("nt", ["0", "1"])
def test_cpp_large_parallel(monkeypatch, nt):
    """Outputs above the serial threshold (several work items, all threads), both store kinds."""
    monkeypatch.setenv("MINITRON_SLICING_NT", nt)
    t = _rand((1031, 1100), torch.float32)
    for dim, k in ((0, 700), (1, 800)):
        idx = _units(t.shape[dim], k, seed=dim)
        a, b = gather_slices([t, t.t()], idx, [dim, 1 - dim], backend="cpp")
        _assert_same(a, _expected(t, idx, dim, 1))
        _assert_same(b, _expected(t.t(), idx, 1 - dim, 1))
        y = t.clone()
        _assert_same(compact_(y, idx, dim, backend="cpp"), _expected(t, idx, dim, 1))


@needs_cpp
@pytest.mark.parametrize("item_bytes", ["64", "1000", "4096"])
def test_cpp_compact_tiny_items_parallel(monkeypatch, item_bytes):
    """Tiny work items force many concurrent items with dependencies (in-place ordering)."""
    monkeypatch.setenv("MINITRON_SLICING_ITEM_BYTES", item_bytes)
    old = torch.get_num_threads()
    torch.set_num_threads(max(2, old))
    try:
        for seed in range(2):
            for units, block in ((300, 1), (40, 3), (25, 16)):
                for pattern in ("random", "drop-first", "every-other", "second-half"):
                    idx = _units(units, (2 * units) // 3, seed=seed) if pattern == "random" else PATTERNS[pattern](units)
                    for dim in (0, 1):
                        shape = [37, 37]
                        shape[dim] = units * block
                        base = _rand(tuple(shape), torch.float32, seed)
                        for t in (base.clone(), base.t().contiguous().t(), base.clone()[:, :]):
                            _check_compact(t, idx, dim, block, "cpp")
                        (o,) = gather_slices([base], idx, dim, block=block, backend="cpp")
                        _assert_same(o, _expected(base, idx, dim, block))
    finally:
        torch.set_num_threads(old)


@needs_cpp
def test_cpp_threads_one_and_many():
    t = _rand((600, 900), torch.bfloat16)
    idx = _units(300, 170, seed=3)
    old = torch.get_num_threads()
    try:
        for n in (1, max(2, old)):
            torch.set_num_threads(n)
            (o,) = gather_slices([t], idx, 1, block=3, backend="cpp")
            _assert_same(o, _expected(t, idx, 1, 3))
    finally:
        torch.set_num_threads(old)


# ----------------------------------------------------------------------------------------------
# compact_
# ----------------------------------------------------------------------------------------------

PATTERNS = {
    "random": lambda u: _units(u, max(1, (2 * u) // 3), seed=u),
    "drop-first": lambda u: torch.arange(1, u),
    "drop-last": lambda u: torch.arange(0, u - 1),
    "first-half": lambda u: torch.arange(0, u // 2),
    "second-half": lambda u: torch.arange(u // 2, u),
    "every-other": lambda u: torch.arange(1, u, 2),
    "single-last": lambda u: torch.tensor([u - 1]),
    "all": lambda u: torch.arange(u).flip(0),
    "empty": lambda u: torch.zeros(0, dtype=torch.int64),
}


def _check_compact(t, idx, dim, block, backend):
    exp = _expected(t, idx, dim, block).clone()
    storage_ptr = t.untyped_storage().data_ptr()
    nbytes = t.untyped_storage().nbytes()
    ptr = t.data_ptr()
    v = compact_(t, idx, dim, block=block, backend=backend)
    _assert_same(v, exp)
    assert v.untyped_storage().data_ptr() == storage_ptr and v.untyped_storage().nbytes() == nbytes
    assert v.storage_offset() == t.storage_offset()
    if v.numel():  # data_ptr() of an empty tensor is 0
        assert v.data_ptr() == ptr
    return v


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("pattern", sorted(PATTERNS))
@pytest.mark.parametrize("dim", [0, 1])
@pytest.mark.parametrize("block", [1, 64, 96])
def test_compact_in_place(monkeypatch, backend, pattern, dim, block):
    if backend == "triton":
        monkeypatch.setenv("MINITRON_COMPACT_SCRATCH_BYTES", "3000")  # several slabs
        if block != 1 and pattern not in ("random", "drop-first", "every-other"):
            pytest.skip("interpreter time")
    units = 6
    other = 11 if backend == "triton" else 29
    shape = (units * block, other) if dim == 0 else (other, units * block)
    idx = PATTERNS[pattern](units)
    for name, t in _layouts(shape, torch.float32, seed=block + dim):
        if backend == "triton" and block != 1 and name not in ("contiguous", "transposed-sliced"):
            continue
        v = _check_compact(t, idx, dim, block, backend)
        cm = t.dim() == 2 and t.stride(0) < t.stride(1)
        dense = t.is_contiguous() or t.t().is_contiguous()
        inner_dim = 0 if cm else 1
        if dense and dim == inner_dim and v.numel():
            assert v.is_contiguous() or v.t().is_contiguous(), (name, v.stride())
        elif v.numel():
            assert v.stride() == t.stride()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_compact_dtypes_1d_and_unsorted(backend, dtype):
    t = _rand((3 * 40,), dtype)
    _check_compact(t, torch.tensor([2, 0], dtype=torch.int32), 0, 40, backend)
    v = _rand((2 * 60,), dtype)[::2]  # strided 1-D keeps its stride
    out = _check_compact(v, torch.tensor([50, 3, 17, 4]), 0, 1, backend)
    assert out.stride() == (2,)
    m = _rand((40, 30), dtype)
    _check_compact(m, torch.tensor([7, 1, 4, 2]), 1, 3, backend)
    _check_compact(_rand((40, 30), dtype), torch.tensor([7, 1, 4, 2]), 0, 5, backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_compact_slice_leaves_rest_of_storage(backend):
    """Compacting a view writes only the view's own elements."""
    big = _rand((30, 50), torch.float32)
    before = big.clone()
    view = big[2:26, 10:40]  # 24 x 30, rows of stride 50
    exp = _expected(view, torch.tensor([9, 0, 4, 5]), 1, 3)
    v = compact_(view, torch.tensor([9, 0, 4, 5]), 1, block=3, backend=backend)
    _assert_same(v, exp)
    outside = torch.ones_like(big, dtype=torch.bool)
    outside[2:26, 10:40] = False
    assert torch.equal(big[outside], before[outside])
    # rows of the view
    big = _rand((30, 50), torch.float32)
    before = big.clone()
    view = big[3:27, 5:45]
    exp = _expected(view, torch.tensor([5, 1, 2]), 0, 4)
    v = compact_(view, torch.tensor([5, 1, 2]), 0, block=4, backend=backend)
    _assert_same(v, exp)
    outside = torch.ones_like(big, dtype=torch.bool)
    outside[3:27, 5:45] = False
    assert torch.equal(big[outside], before[outside])


@needs_cpp
def test_compact_allocates_no_matrix_copy():
    """compact_ (cpp) allocates nothing near the matrix size; the reference backend does (so the
    measurement can see it)."""
    from torch.profiler import ProfilerActivity, profile

    def max_alloc(fn):
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            fn()
        return max([e.cpu_memory_usage for e in prof.events()] + [0])

    n = 512
    nbytes = n * n * 4
    for dim in (0, 1):
        idx = torch.arange(0, n, 2)
        x = torch.randn(n, n)
        assert max_alloc(lambda: compact_(x, idx, dim, backend="cpp")) < nbytes // 16
        y = torch.randn(n, n)
        assert max_alloc(lambda: compact_(y, idx, dim, backend="reference")) >= nbytes // 2


def test_compact_parameter_data_swap():
    lin = torch.nn.Linear(64, 48)
    w = lin.weight.detach().clone()
    idx = torch.tensor([5, 0, 3])
    backend = "cpp" if HAS_CPP else "reference"
    lin.weight.data = compact_(lin.weight.data, idx, 0, block=8, backend=backend)
    _assert_same(lin.weight.data, _expected(w, idx, 0, 8))
    assert lin.weight.shape == (24, 64)
    # directly on the Parameter (under no_grad inside compact_)
    lin2 = torch.nn.Linear(64, 48)
    w2 = lin2.weight.detach().clone()
    v = compact_(lin2.weight, idx, 1, block=8, backend=backend)
    assert not v.requires_grad
    _assert_same(v, _expected(w2, idx, 1, 8))


# ----------------------------------------------------------------------------------------------
# argument validation
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("op", ["gather", "compact"])
@pytest.mark.parametrize("case,exc,name", [
    ("duplicate", ValueError, "ind(ex|ices)"),
    ("negative", ValueError, "ind(ex|ices)"),
    ("too-large", ValueError, "ind(ex|ices)"),
    ("block-not-dividing", ValueError, "block"),
    ("block-zero", ValueError, "block"),
    ("dim-2", ValueError, "dim"),
    ("dim-3-on-3d", ValueError, "dim"),
    ("dim-negative", ValueError, "dim"),
    ("dim1-on-1d", ValueError, "dim"),
    ("4d-tensor", ValueError, "tensor"),
    ("2d-index", ValueError, "ind(ex|ices)"),
    ("float-index", TypeError, "ind(ex|ices)"),
    ("list-index", TypeError, "ind(ex|ices)"),
    ("complex-tensor", TypeError, "tensor"),
    ("float-dim", TypeError, "dim"),
])
def test_bad_arguments(op, case, exc, name):
    t = _rand((12, 8), torch.float32)
    idx = torch.tensor([1, 3])
    dim, block = 0, 1
    if case == "duplicate":
        idx = torch.tensor([3, 1, 3])
    elif case == "negative":
        idx = torch.tensor([-1, 2])
    elif case == "too-large":
        idx, block = torch.tensor([0, 3]), 4  # 12 // 4 = 3 units
    elif case == "block-not-dividing":
        block = 5
    elif case == "block-zero":
        block = 0
    elif case == "dim-2":
        dim = 2
    elif case == "dim-3-on-3d":
        t, dim = t.reshape(3, 4, 8), 3
    elif case == "dim-negative":
        dim = -1
    elif case == "dim1-on-1d":
        t, dim = t[:, 0], 1
    elif case == "4d-tensor":
        t = t.reshape(3, 4, 2, 4)
    elif case == "2d-index":
        idx = idx.reshape(1, 2)
    elif case == "float-index":
        idx = idx.float()
    elif case == "list-index":
        idx = [1, 3]
    elif case == "complex-tensor":
        t = t.to(torch.complex64)
    elif case == "float-dim":
        dim = 0.0
    before = t.clone() if isinstance(t, torch.Tensor) else None
    with pytest.raises(exc, match=name):
        if op == "gather":
            gather_slices([t], [idx], [dim], block=block, backend="reference")
        else:
            compact_(t, idx, dim, block=block, backend="reference")
    if before is not None:
        assert torch.equal(t, before), "a rejected call must not modify the tensor"
    if HAS_CPP and op == "compact" and exc is ValueError:  # also through the native backend
        with pytest.raises(exc, match=name):
            compact_(t, idx, dim, block=block, backend="cpp")
        assert torch.equal(t, before)


def test_bad_argument_lists():
    t = _rand((12, 8), torch.float32)
    idx = torch.tensor([1])
    with pytest.raises(ValueError, match="indices"):
        gather_slices([t, t], [idx], [0, 0], backend="reference")
    with pytest.raises(ValueError, match="dims"):
        gather_slices([t, t], idx, [0], backend="reference")
    with pytest.raises(ValueError, match="block"):
        gather_slices([t, t], idx, 0, block=[1, 2, 3], backend="reference")
    with pytest.raises(TypeError, match="tensors"):
        gather_slices(t, idx, 0, backend="reference")
    with pytest.raises(TypeError, match=r"tensors\[1\]"):
        gather_slices([t, "x"], idx, 0, backend="reference")
    with pytest.raises(ValueError, match=r"indices\[1\]"):
        gather_slices([t, t], [idx, torch.tensor([2, 2])], 0, backend="reference")
    with pytest.raises(ValueError, match=r"dims\[1\]"):
        gather_slices([t, t[:, 0]], idx, [1, 1], backend="reference")
    with pytest.raises(ValueError, match="backend"):
        gather_slices([t], idx, 0, backend="nope")


def test_compact_rejects_overlapping():
    t = torch.randn(1, 8).expand(6, 8)
    with pytest.raises(ValueError, match="tensor"):
        compact_(t, torch.tensor([1]), 0, backend="reference")


def test_backend_selection():
    t = _rand((8, 8), torch.float32)
    with pytest.raises(BackendUnavailableError):
        gather_slices([t], torch.tensor([1]), 0, backend="cuda")
    if HAS_CPP:
        assert S._gather_backends.select("auto", "cpu", torch.float32).name == "cpp"
        assert S._compact_backends.select("auto", "cpu", torch.bfloat16).name == "cpp"


# ----------------------------------------------------------------------------------------------
# property tests
# ----------------------------------------------------------------------------------------------

try:
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st
except ImportError:  # pragma: no cover
    given = None

if given is not None:

    @st.composite
    def _slicing_case(draw):
        dim = draw(st.sampled_from([0, 1]))
        block = draw(st.sampled_from([1, 1, 2, 3, 8]))
        units = draw(st.integers(1, 12))
        other = draw(st.integers(1, 9))
        dtype = draw(st.sampled_from(DTYPES + [torch.int8, torch.float64]))
        layout = draw(st.sampled_from(["contiguous", "transposed", "sliced", "step", "1d"]))
        shape = [other, other]
        shape[dim] = units * block
        if layout == "1d":
            dim, shape = 0, [units * block]
        keep = draw(st.lists(st.integers(0, units - 1), unique=True, max_size=units))
        seed = draw(st.integers(0, 1000))
        base = _rand(tuple(shape), dtype, seed)
        if layout == "transposed" and len(shape) == 2:
            t = _rand(tuple(shape[::-1]), dtype, seed).t()
        elif layout == "sliced" and len(shape) == 2:
            t = _rand((shape[0] + 2, shape[1] + 3), dtype, seed)[1:1 + shape[0], 2:2 + shape[1]]
        elif layout == "step":
            t = _rand(tuple(s * 2 for s in shape), dtype, seed)[(slice(None, None, 2),) * len(shape)]
        else:
            t = base
        return t, torch.tensor(keep, dtype=torch.int64), dim, block

    _backends_here = ["reference"] + (["cpp"] if HAS_CPP else [])

    @given(case=_slicing_case(), backend=st.sampled_from(_backends_here))
    @settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    def test_property_gather(case, backend):
        t, idx, dim, block = case
        (o,) = gather_slices([t], idx, dim, block=block, backend=backend)
        _assert_same(o, _expected(t, idx, dim, block))

    @given(case=_slicing_case(), backend=st.sampled_from(_backends_here))
    @settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    def test_property_compact(case, backend):
        t, idx, dim, block = case
        _check_compact(t, idx, dim, block, backend)

    @given(cases=st.lists(_slicing_case(), min_size=1, max_size=5))
    @settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    def test_property_gather_many(cases):
        tensors = [c[0] for c in cases]
        outs = gather_slices(tensors, [c[1] for c in cases], [c[2] for c in cases], block=[c[3] for c in cases],
                             backend="cpp" if HAS_CPP else "reference")
        for o, (t, idx, dim, block) in zip(outs, cases):
            _assert_same(o, _expected(t, idx, dim, block))


# ----------------------------------------------------------------------------------------------
# torch.library integration
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend):
    x = _rand((40, 48), torch.float32)
    xb = _rand((24, 16), torch.bfloat16)
    idx = torch.tensor([4, 1, 2])
    torch.library.opcheck(torch.ops.minitron.gather_slices.default,
                          ([x, x.t(), xb, x[:, 0], xb[:, ::2]], [idx, idx, idx, idx, torch.tensor([1])],
                           [0, 1, 1, 0, 1], [8, 8, 2, 2, 1], backend))
    for t, dim, block in ((x, 1, 8), (x.t(), 1, 8), (x[:, 5:45], 0, 4), (xb, 0, 4)):
        torch.library.opcheck(torch.ops.minitron.compact_.default, (t.clone(), idx, dim, block, backend))


@needs_cpp
def test_torch_compile_fullgraph():
    def f(a, b, c, i):
        outs = gather_slices([a, b.t()], [i, i], [0, 1], block=8, backend="cpp")
        v = compact_(c, i, 1, block=8, backend="cpp")
        return outs[0] * 2, outs[1], v + 1

    a, b = _rand((64, 40), torch.float32), _rand((48, 64), torch.float32, 1)
    c = _rand((30, 50), torch.float32, 2)[:, 1:49]  # non-dense: compact keeps strides
    idx = torch.tensor([5, 1, 3])
    c_eager = c.clone()
    want = f(a, b, c_eager, idx)
    got = torch.compile(f, fullgraph=True)(a, b, c, idx)
    for g, w in zip(got, want):
        _assert_same(g, w)
    _assert_same(got[2], _expected(_rand((30, 50), torch.float32, 2)[:, 1:49], idx, 1, 8) + 1)


# ----------------------------------------------------------------------------------------------
# CUDA sources compile (nothing CUDA runs here)
# ----------------------------------------------------------------------------------------------


@pytest.mark.skipif(shutil.which("nvcc") is None and not Path("/usr/local/cuda/bin/nvcc").exists(),
                    reason="nvcc not installed")
def test_cuda_kernel_compiles(tmp_path):
    nvcc = shutil.which("nvcc") or "/usr/local/cuda/bin/nvcc"
    cmd = [nvcc, "-std=c++17", "-I", str(ROOT / "csrc"), "-c", str(ROOT / "csrc/cuda/slicing.cu"),
           "-gencode", "arch=compute_80,code=sm_80", "-gencode", "arch=compute_90,code=sm_90",
           "-o", str(tmp_path / "slicing.o")]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr


# ----------------------------------------------------------------------------------------------
# host path: index cache, layering
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_index_cache_follows_changes(backend):
    """The same unmodified index tensor is prepared once; an in-place change, another size or a new tensor at
    the same address is checked again (the cache can never serve a stale or unchecked index)."""
    S._INDEX_CACHE.clear()
    t = _rand((12, 5), torch.float32, seed=3)
    idx = torch.tensor([7, 1, 4])
    _assert_same(gather_slices([t], idx, 0, backend=backend)[0], _expected(t, idx, 0, 1))
    assert id(idx) in S._INDEX_CACHE
    prepared = S._INDEX_CACHE[id(idx)][-1]
    _assert_same(gather_slices([t], idx, 0, backend=backend)[0], _expected(t, idx, 0, 1))
    assert S._INDEX_CACHE[id(idx)][-1] is prepared  # reused
    idx[0] = 11  # in place: version bump -> checked and sorted again
    _assert_same(gather_slices([t], idx, 0, backend=backend)[0], _expected(t, idx, 0, 1))
    idx[1] = 11  # now a duplicate: must raise although the tensor was cached before
    with pytest.raises(ValueError, match="duplicate"):
        gather_slices([t], idx, 0, backend=backend)
    idx[1] = 2
    with pytest.raises(ValueError, match="outside"):  # fine for 12 rows, not for 6 units of 2
        gather_slices([t], idx, 0, block=2, backend=backend)
    # compact_ shares the cache and bumps the compacted tensor's version like the custom op would
    w = t.clone()
    v0 = w._version
    out = compact_(w, idx, 0, backend=backend)
    _assert_same(out, _expected(t, idx, 0, 1))
    assert w._version > v0


def test_index_cache_bounded():
    S._INDEX_CACHE.clear()
    t = _rand((4, 3), torch.float32)
    keep = [torch.tensor([i % 4]) for i in range(S._INDEX_CACHE_MAX + 10)]
    for i in keep:
        gather_slices([t], i, 0, backend="reference")
    assert len(S._INDEX_CACHE) <= S._INDEX_CACHE_MAX


def test_kernels_do_not_import_ops():
    """Layering: minitron.kernels.* never imports minitron.ops.* (no import cycle)."""
    code = ("import sys, minitron.kernels.slicing, minitron.kernels.importance; "
            "bad = [m for m in sys.modules if m.startswith('minitron.ops')]; "
            "assert not bad, bad")
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([os.sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_one_layout_rule_for_kernels_and_ops():
    """The Triton kernels and the op layer share one layout helper (torch-only, importable without Triton)."""
    from minitron.kernels import _layout as L

    assert S._layout is L.layout and S._col_major is L.col_major
    base = torch.zeros(64)
    cases = {((5,), (1,), False): (1, 5, 5, 1, -1, 0), ((4, 6), (6, 1), False): (4, 6, 6, 1, 0, 1),
             ((4, 6), (1, 4), True): (6, 4, 4, 1, 1, 0), ((1, 6), (1, 1), False): (1, 6, 6, 1, 0, 1),
             ((4, 1), (1, 1), False): (4, 1, 1, 1, 0, 1)}
    for (shape, strides, cm), want in cases.items():
        assert L.col_major(base.as_strided(shape, strides)) == cm, (shape, strides)
        assert L.layout(shape, strides, cm) == want, (shape, strides, cm)


@pytest.mark.skipif(not HAS_TRITON, reason="triton interpreter unavailable")
@pytest.mark.parametrize("dim", [0, 1])
def test_triton_tiles_cross_boundaries(dim):
    """Lines wider than one column tile (BLOCK_C <= 1024), line counts that are not multiples of BLOCK_L,
    strided and column-major inputs, and one call mixing element sizes (one launch per size)."""
    from minitron.kernels import slicing as K

    shape = (37, 1100) if dim == 0 else (9, 2100)
    t = _rand(shape, torch.float32, seed=11)
    idx = _units(shape[dim], shape[dim] * 2 // 3, seed=12)
    strided = _rand((shape[0], 2 * shape[1]), torch.float32, seed=13)[:, ::2]
    col = _rand(shape[::-1], torch.bfloat16, seed=14).t()
    small = _rand((5, 7), torch.int8, seed=15)
    outs = gather_slices([t, strided, col, small], [idx, idx, idx, torch.tensor([4, 0])], [dim, dim, dim, 0],
                         backend="triton")
    for o, src, i, d in zip(outs, [t, strided, col, small], [idx, idx, idx, torch.tensor([4, 0])], [dim] * 3 + [0]):
        _assert_same(o, _expected(src, i, d, 1))
    block_l, block_c = K._tile(1100)
    assert block_c == 1024 and block_l * block_c == K._TILE
