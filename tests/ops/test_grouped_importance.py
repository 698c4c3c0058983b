"""Grouped (segment) importance reduction against the float64 oracle, on every backend available here
(C++ on CPU, Triton under the interpreter, the torch reference), plus grouped_segments and the accumulator API."""
from __future__ import annotations

import io
import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from minitron.ops import BackendUnavailableError, ImportanceAccumulator
from minitron.ops._dispatch import op_backends
from minitron.ops.grouped_importance import (GroupedImportanceAccumulator, grouped_importance_reference,
                                             grouped_segments)
from minitron.ops.importance import AGGREGATIONS, NonFiniteActivationError

AGGS = list(AGGREGATIONS)
ALL_BACKENDS = ["cpp", "triton", "reference"]
OP = "grouped_importance_update"


def _backend_or_skip(backend: str) -> str:
    try:
        op_backends(OP).select(backend, "cpu", torch.float32)
    except BackendUnavailableError as exc:
        if backend == "cpp" and os.environ.get("CI"):
            pytest.fail(f"the C++ backend must be built in CI: {exc}")
        pytest.skip(str(exc))
    return backend


@pytest.fixture(params=ALL_BACKENDS)
def backend(request) -> str:
    return _backend_or_skip(request.param)


@pytest.fixture
def cpp() -> str:
    return _backend_or_skip("cpp")


def _offsets(lengths: list[int]) -> torch.Tensor:
    out = torch.zeros(len(lengths) + 1, dtype=torch.int64)
    out[1:] = torch.tensor(lengths, dtype=torch.int64).cumsum(0)
    return out


def _ragged(num_groups: int, num_samples: int, channels: int, seed: int, max_len: int = 9, empty_group: int = -1,
            dtype: torch.dtype = torch.float32, weights: bool = False):
    """Random rows/offsets with empty segments (every third) and optionally one empty group."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, max_len + 1, (num_groups * num_samples,), generator=g)
    lengths[::3] = 0
    if empty_group >= 0:
        lengths[empty_group * num_samples:(empty_group + 1) * num_samples] = 0
    offsets = _offsets(lengths.tolist())
    n = int(offsets[-1])
    x = (torch.randn(n, channels, generator=g) * 2.0).to(dtype)
    w = torch.rand(n, generator=g).to(dtype) + 0.1 if weights else None
    return x, offsets, w


def _routed(b: int, s: int, k: int, num_groups: int, channels: int, seed: int, mask=None):
    """Hidden rows gathered by grouped_segments from random top-k routing, with router weights."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.rand(b, s, num_groups, generator=g).argsort(-1)[..., :k]
    probs = torch.rand(b, s, k, generator=g).softmax(-1)
    h = torch.randn(b * s, channels, generator=g)
    tok, slot, offsets = grouped_segments(ids, num_groups, mask)
    return h[tok], offsets, probs.reshape(-1)[slot], ids


def _close(got: torch.Tensor, ref: torch.Tensor, rtol: float = 2e-4, atol_rel: float = 2e-5) -> None:
    assert got.dtype == torch.float32 and got.shape == ref.shape
    scale = float(ref.abs().nan_to_num(0.0, 0.0, 0.0).max()) if ref.numel() else 0.0
    torch.testing.assert_close(got.double(), ref.double(), rtol=rtol, atol=atol_rel * max(scale, 1e-6),
                               equal_nan=True)


def _check(num_groups, units, xs, offs, ws=None, backend="cpp", group_size=1, seq_agg="mean", batch_agg="l2",
           **tol) -> GroupedImportanceAccumulator:
    ws = ws if ws is not None else [None] * len(xs)
    acc = GroupedImportanceAccumulator(num_groups, units, group_size=group_size, seq_agg=seq_agg,
                                       batch_agg=batch_agg, backend=backend)
    for x, o, w in zip(xs, offs, ws):
        acc.update(x, o, w)
    ref, samples, rows = grouped_importance_reference(xs, offs, ws, num_groups=num_groups, group_size=group_size,
                                                      seq_agg=seq_agg, batch_agg=batch_agg, return_counts=True)
    _close(acc.value(), ref, **tol)
    assert torch.equal(acc.num_samples, samples)
    assert torch.equal(acc.num_rows, rows)
    assert int(acc.num_nonfinite.sum()) == 0
    return acc


# ----------------------------------------------------------------------------------------------
# grouped_segments
# ----------------------------------------------------------------------------------------------


def test_grouped_segments_layout():
    b, s, k, e = 3, 5, 2, 4
    ids = torch.rand(b, s, e, generator=torch.Generator().manual_seed(0)).argsort(-1)[..., :k]
    mask = torch.ones(b, s, dtype=torch.bool)
    mask[1, 3:] = False
    mask[2] = False
    tok, slot, offsets = grouped_segments(ids, e, mask)
    assert tok.dtype == slot.dtype == offsets.dtype == torch.int64
    assert offsets.shape == (e * b + 1,) and int(offsets[0]) == 0 and int(offsets[-1]) == tok.numel()
    assert tok.numel() == int(mask.sum()) * k
    flat = ids.reshape(-1)
    expect = []
    for gi in range(e):
        for bi in range(b):
            for si in range(s):
                for ki in range(k):
                    if mask[bi, si] and int(ids[bi, si, ki]) == gi:
                        expect.append((bi * s + si, (bi * s + si) * k + ki))
    assert list(zip(tok.tolist(), slot.tolist())) == expect
    assert torch.equal(flat[slot], torch.repeat_interleave(torch.arange(e), offsets.diff().view(e, b).sum(1)))
    for j in range(e * b):
        seg = tok[offsets[j]:offsets[j + 1]]
        assert bool(((seg // s) == j % b).all())
    assert int(offsets.diff().view(e, b)[:, 2].sum()) == 0  # fully masked sample routes nothing


def test_grouped_segments_bad_input():
    ids = torch.zeros(2, 3, 2, dtype=torch.int64)
    with pytest.raises(ValueError, match="topk_ids"):
        grouped_segments(ids + 4, 4)
    with pytest.raises(ValueError, match="topk_ids"):
        grouped_segments(ids - 1, 4)
    with pytest.raises(ValueError, match="topk_ids"):
        grouped_segments(ids[0], 4)
    with pytest.raises(TypeError, match="topk_ids"):
        grouped_segments(ids.float(), 4)
    with pytest.raises(ValueError, match="num_groups"):
        grouped_segments(ids, 0)
    with pytest.raises(ValueError, match="mask"):
        grouped_segments(ids, 4, torch.ones(2, 4, dtype=torch.bool))


# ----------------------------------------------------------------------------------------------
# correctness against the oracle
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seq_agg", AGGS)
@pytest.mark.parametrize("batch_agg", AGGS)
def test_all_aggregations(backend, seq_agg, batch_agg):
    if backend == "triton" and batch_agg not in ("l2", "var"):
        pytest.skip("the batch stage is shared by every seq_agg: two batch aggregations suffice under the interpreter")
    x1, o1, w1 = _ragged(4, 3, 13, seed=1, empty_group=2, weights=True)
    x2, o2, _ = _ragged(4, 2, 13, seed=2)
    _check(4, 13, [x1, x2], [o1, o2], [w1, None], backend, seq_agg=seq_agg, batch_agg=batch_agg)


@pytest.mark.parametrize("seq_agg", AGGS)
@pytest.mark.parametrize("batch_agg", ["l2", "var", "max"])
def test_group_size(backend, seq_agg, batch_agg):
    x, o, w = _ragged(3, 4, 5 * 8, seed=3, weights=True)
    _check(3, 5, [x], [o], [w], backend, group_size=8, seq_agg=seq_agg, batch_agg=batch_agg)


def test_routed_tokens(backend):
    mask = torch.ones(2, 9, dtype=torch.bool)
    mask[1, 5:] = False
    rows, offsets, w, _ = _routed(2, 9, 3, 6, 10, seed=4, mask=mask)
    acc = _check(6, 10, [rows], [offsets], [w], backend)
    assert int(acc.num_rows.sum()) == int(mask.sum()) * 3


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("group_size", [1, 4])
def test_half_dtypes(backend, dtype, group_size):
    x, o, w = _ragged(3, 3, 6 * group_size, seed=5, dtype=dtype, weights=True)
    for sa, ba in [("mean", "l2"), ("var", "var"), ("max", "max")]:
        _check(3, 6, [x], [o], [w], backend, group_size=group_size, seq_agg=sa, batch_agg=ba, rtol=1e-3)


def test_noncontiguous(backend):
    x, o, w = _ragged(3, 2, 24, seed=6, weights=True)
    xt = x.t().contiguous().t()  # column-major
    xs = torch.randn(x.shape[0], 48)[:, ::2]  # strided columns
    ww = torch.stack([w, w], 1)[:, 1]  # strided weights
    for xx in (xt, xs):
        for sa, ba in [("mean", "l2"), ("var", "sum")]:
            _check(3, 24, [xx], [o], [ww], backend, seq_agg=sa, batch_agg=ba)
            _check(3, 6, [xx], [o], [ww], backend, group_size=4, seq_agg=sa, batch_agg=ba)


def test_empty_inputs(backend):
    acc = GroupedImportanceAccumulator(3, 4, backend=backend)
    acc.update(torch.zeros(0, 4), torch.zeros(7, dtype=torch.int64))  # 2 samples, all segments empty
    acc.update(torch.zeros(0, 4), torch.zeros(1, dtype=torch.int64))  # no samples at all
    assert torch.equal(acc.value(), torch.zeros(3, 4))
    assert acc.num_samples.tolist() == [0, 0, 0] and acc.num_rows.tolist() == [0, 0, 0]
    # one group gets everything, the others nothing
    x = torch.randn(5, 4)
    acc.update(x, torch.tensor([0, 0, 0, 2, 5, 5, 5]))
    assert acc.num_samples.tolist() == [0, 2, 0] and acc.num_rows.tolist() == [0, 5, 0]
    v = acc.value()
    assert torch.equal(v[0], torch.zeros(4)) and torch.equal(v[2], torch.zeros(4))
    ref = grouped_importance_reference(x, torch.tensor([0, 0, 0, 2, 5, 5, 5]), num_groups=3)
    _close(v, ref)


@pytest.mark.parametrize("seq_agg", ["mean", "var", "max"])
@pytest.mark.parametrize("batch_agg", AGGS)
def test_dense_equivalence(backend, seq_agg, batch_agg):
    """num_groups == 1 with one segment per sample holding its unmasked tokens == ImportanceAccumulator."""
    torch.manual_seed(7)
    b, s, c = 4, 6, 12
    x = torch.randn(b, s, c)
    mask = torch.arange(s).unsqueeze(0) < torch.tensor([3, 0, 6, 1]).unsqueeze(1)
    rows = x[mask]
    offsets = _offsets(mask.sum(1).tolist())
    for gs in (1, 3):
        dense = ImportanceAccumulator(c // gs, group_size=gs, seq_agg=seq_agg, batch_agg=batch_agg, backend="cpp"
                                      if backend == "cpp" else "reference")
        dense.update(x, mask)
        grouped = GroupedImportanceAccumulator(1, c // gs, group_size=gs, seq_agg=seq_agg, batch_agg=batch_agg,
                                               backend=backend)
        grouped.update(rows, offsets)
        _close(grouped.value()[0], dense.value())
        assert int(grouped.num_samples[0]) == dense.num_samples == 3


ISAS = ["scalar", "avx2", "avx512"]


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("group_size", [1, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_long_segments_isas_cpp(cpp, monkeypatch, isa, group_size, dtype):
    """Segments longer than a row chunk (several chunks combined), odd unit counts (vector tails), every ISA."""
    monkeypatch.setenv("MINITRON_CPU_ISA", isa)
    lengths = [0, 300, 5, 131, 0, 64, 1, 70, 0, 0, 200, 3]  # 4 groups x 3 samples
    offsets = _offsets(lengths)
    g = torch.Generator().manual_seed(30)
    x = (torch.randn(int(offsets[-1]), 37 * group_size, generator=g) * 3).to(dtype)
    w = torch.rand(x.shape[0], generator=g) + 0.5
    for sa, ba in [("mean", "l2"), ("var", "var"), ("max", "mean"), ("l2", "sum"), ("sum", "max")]:
        _check(4, 37, [x], [offsets], [w], cpp, group_size=group_size, seq_agg=sa, batch_agg=ba, rtol=1e-3)


@pytest.mark.parametrize("units,group_size", [(4100, 1), (70, 2), (3, 1500)])
def test_many_unit_blocks_cpp(cpp, units, group_size):
    x, o, w = _ragged(2, 2, units * group_size, seed=31, max_len=5, weights=True)
    for sa, ba in [("mean", "l2"), ("var", "var")]:
        _check(2, units, [x], [o], [w], cpp, group_size=group_size, seq_agg=sa, batch_agg=ba)


@pytest.mark.parametrize("units,max_len", [(300, 120), (8200, 4)])
def test_parallel_paths_deterministic_cpp(cpp, units, max_len):
    """Large enough for the threaded phases (>= 2**18 elements); bitwise equal for 1 and 2 threads."""
    x, o, w = _ragged(8, 4, units, seed=33, max_len=max_len, weights=True)
    assert x.numel() >= 2**18
    prev = torch.get_num_threads()
    values = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            for sa, ba in [("mean", "l2"), ("var", "var")]:
                acc = _check(8, units, [x], [o], [w], cpp, seq_agg=sa, batch_agg=ba)
                values.append(acc.state.clone())
    finally:
        torch.set_num_threads(prev)
    assert torch.equal(values[0], values[2]) and torch.equal(values[1], values[3])


def test_native_op_checks(cpp):
    op = torch.ops.minitron._grouped_importance_update_native
    state, count = torch.zeros(2, 2, 4), torch.zeros(3, 2, dtype=torch.int64)
    x = torch.randn(5, 4)
    good = torch.tensor([0, 2, 2, 3, 5])
    op(state, count, x, good, None, 1, 0, 1)
    assert count.tolist() == [[1, 2], [0, 0], [2, 3]]
    cases = [
        ((state, count, x, torch.tensor([0, 3, 2, 3, 5]), None, 1, 0, 1), "non-decreasing"),
        ((state, count, x, torch.tensor([0, 2, 2, 3, 4]), None, 1, 0, 1), "offsets"),
        ((state, count, x, torch.tensor([0, 2, 5, 5]), None, 1, 0, 1), "offsets"),
        ((state, count, x, good.int(), None, 1, 0, 1), "offsets"),
        ((state, count, x, good, torch.ones(4), 1, 0, 1), "weights"),
        ((state, count, x, good, None, 1, 7, 1), "seq_agg"),
        ((state, count, x, good, None, 1, 0, -1), "batch_agg"),
        ((state, count, x, good, None, 3, 0, 1), "channels"),
        ((state, count, x.double(), good, None, 1, 0, 1), "x"),
        ((state[:, :1], count, x, good, None, 1, 0, 1), "state"),
        ((state, count[:2], x, good, None, 1, 0, 1), "count"),
    ]
    for args, pat in cases:
        before = (state.clone(), count.clone())
        with pytest.raises((RuntimeError, ValueError, TypeError), match=pat):
            op(*args)
        assert torch.equal(state, before[0]) and torch.equal(count, before[1])


# ----------------------------------------------------------------------------------------------
# non-finite values
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("group_size", [1, 3])
def test_nonfinite_counted(backend, dtype, group_size):
    x, o, w = _ragged(3, 3, 6 * group_size, seed=8, dtype=dtype, weights=True)
    lengths = o.diff().view(3, 3).sum(1)
    assert int(lengths[1]) > 1
    r = int(o[3]) + 1  # a row of group 1
    x[r, 0] = float("nan")
    x[r, 2] = float("inf")
    x[r, 3] = -float("inf")
    acc = GroupedImportanceAccumulator(3, 6, group_size=group_size, backend=backend)
    acc.update(x, o, w)
    assert acc.num_nonfinite.tolist() == [0, 3, 0]
    with pytest.raises(NonFiniteActivationError, match="1: 3"):
        acc.value()
    v = acc.value(allow_nonfinite=True)
    assert bool(torch.isfinite(v[0]).all()) and bool(torch.isfinite(v[2]).all())
    assert bool(torch.isnan(v[1, 0]))
    # a non-finite router weight makes the whole weighted row non-finite
    w2 = w.clone()
    w2[0] = float("inf")
    acc2 = GroupedImportanceAccumulator(3, 6, group_size=group_size, backend=backend)
    x2 = x.clone()
    x2[r] = 1.0
    acc2.update(x2, o, w2)
    g0 = int(torch.searchsorted(o, torch.tensor(0), right=True)) - 1
    expect = [0, 0, 0]
    expect[g0 // 3] = 6 * group_size
    assert acc2.num_nonfinite.tolist() == expect


# ----------------------------------------------------------------------------------------------
# streaming, merging, checkpointing
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("batch_agg", AGGS)
def test_merge_and_state_dict(backend, batch_agg):
    if backend == "triton" and batch_agg not in ("var", "max"):
        pytest.skip("merge/state_dict are backend-independent: the interpreter runs two aggregations")
    parts = [_ragged(4, 3, 7, seed=10 + i, empty_group=i, weights=True) for i in range(3)]
    kw = dict(seq_agg="mean", batch_agg=batch_agg, backend=backend)
    whole = GroupedImportanceAccumulator(4, 7, **kw)
    for x, o, w in parts:
        whole.update(x, o, w)
    a = GroupedImportanceAccumulator(4, 7, **kw)
    a.update(*parts[0])
    b = GroupedImportanceAccumulator(4, 7, **kw)
    b.update(*parts[1])
    b.update(*parts[2])
    a.merge(b)
    _close(a.value(), whole.value())
    assert torch.equal(a.count, whole.count)
    # resume
    buf = io.BytesIO()
    torch.save(GroupedImportanceAccumulator(4, 7, **kw).merge(a).state_dict(), buf)
    buf.seek(0)
    resumed = GroupedImportanceAccumulator(4, 7, **kw)
    resumed.load_state_dict(torch.load(buf))
    _close(resumed.value(), whole.value())
    assert torch.equal(resumed.num_rows, whole.num_rows)
    ref = grouped_importance_reference([p[0] for p in parts], [p[1] for p in parts], [p[2] for p in parts],
                                       num_groups=4, batch_agg=batch_agg)
    _close(whole.value(), ref)
    resumed.reset()
    assert int(resumed.count.sum()) == 0 and float(resumed.state.abs().sum()) == 0.0


def _dist_parts() -> list:
    """Seven deterministic updates; update 4 routes nothing to any group (all segments empty)."""
    parts = [_ragged(3, 1 + i % 3, 5, seed=40 + i, empty_group=i % 3, weights=True) for i in range(7)]
    parts[4] = (torch.zeros(0, 5), torch.zeros(3 * 2 + 1, dtype=torch.int64), None)
    return parts


DIST_CASES = [("mean", ba) for ba in AGGS] + [("var", "var"), ("max", "max")]


def _dist_accs(indices, backend, reduce: bool) -> dict:
    parts = _dist_parts()
    out = {}
    for sa, ba in DIST_CASES:
        acc = GroupedImportanceAccumulator(3, 5, seq_agg=sa, batch_agg=ba, backend=backend)
        for i in indices:
            acc.update(*parts[i])
        if reduce:
            acc.all_reduce()
        out[f"{sa}-{ba}"] = acc.value()
        out[f"{sa}-{ba}-n"] = acc.count.clone()
    return out


def _dist_worker(rank: int, store_file: str, backend: str, out_dir: str) -> None:
    import datetime
    import sys

    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store_file}", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=120))
    try:
        out = _dist_accs([0, 1, 2, 3, 5] if rank == 0 else [4, 6], backend, reduce=True)
        torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # as tests/ops/test_importance_distributed.py: no interpreter finalisation racing gloo threads


def test_all_reduce_two_processes_equals_one(tmp_path):
    import torch.distributed as dist
    import torch.multiprocessing as mp

    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    try:
        backend = _backend_or_skip("cpp")
    except pytest.skip.Exception:
        backend = "reference"
    mp.spawn(_dist_worker, args=(str(tmp_path / "store"), backend, str(tmp_path)), nprocs=2, join=True)
    expect = _dist_accs(range(7), backend, reduce=False)
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        for key, ref in expect.items():
            if key.endswith("-n"):
                assert torch.equal(got[key], ref), (rank, key)
            else:
                _close(got[key], ref, rtol=1e-5)


def test_all_reduce_needs_process_group():
    with pytest.raises(RuntimeError, match="process group"):
        GroupedImportanceAccumulator(3, 4).all_reduce()


def test_state_dict_mismatch():
    acc = GroupedImportanceAccumulator(3, 4, backend="reference")
    sd = acc.state_dict()
    with pytest.raises(ValueError, match="configuration"):
        GroupedImportanceAccumulator(2, 4).load_state_dict(sd)
    with pytest.raises(ValueError, match="missing"):
        acc.load_state_dict({k: v for k, v in sd.items() if k != "rows"})
    bad = dict(sd, state=torch.zeros(3, 4))
    with pytest.raises(ValueError, match="state"):
        acc.load_state_dict(bad)
    with pytest.raises(TypeError, match="other"):
        acc.merge(ImportanceAccumulator(4))
    with pytest.raises(ValueError, match="configuration"):
        acc.merge(GroupedImportanceAccumulator(3, 4, batch_agg="max"))


# ----------------------------------------------------------------------------------------------
# bad input
# ----------------------------------------------------------------------------------------------


def test_bad_constructor_arguments():
    with pytest.raises(ValueError, match="num_groups"):
        GroupedImportanceAccumulator(0, 4)
    with pytest.raises(ValueError, match="num_units"):
        GroupedImportanceAccumulator(2, 0)
    with pytest.raises(ValueError, match="group_size"):
        GroupedImportanceAccumulator(2, 4, group_size=0)
    with pytest.raises(ValueError, match="seq_agg"):
        GroupedImportanceAccumulator(2, 4, seq_agg="median")
    with pytest.raises(ValueError, match="batch_agg"):
        GroupedImportanceAccumulator(2, 4, batch_agg="min")
    with pytest.raises(ValueError, match="backend"):
        GroupedImportanceAccumulator(2, 4, backend="numpy")


def test_bad_update_arguments(backend):
    acc = GroupedImportanceAccumulator(2, 4, backend=backend)
    x = torch.randn(5, 4)
    good = torch.tensor([0, 2, 2, 3, 5])
    cases = [
        ((x, torch.tensor([0, 3, 2, 4, 5])), ValueError, "non-decreasing"),
        ((x, torch.tensor([0, 2, 2, 5])), ValueError, "num_groups"),
        ((x, torch.tensor([0, 2, 2, 3, 4])), ValueError, r"offsets\[-1\]"),
        ((x, torch.tensor([1, 2, 2, 3, 5])), ValueError, r"offsets\[0\]"),
        ((x, good.int()), TypeError, "offsets"),
        ((x, good.view(1, 5)), ValueError, "offsets"),
        ((x, torch.zeros(0, dtype=torch.int64)), ValueError, "offsets"),
        ((x, [0, 2, 2, 3, 5]), TypeError, "offsets"),
        ((x, good, torch.ones(4)), ValueError, "weights"),
        ((x, good, torch.ones(5, 1)), ValueError, "weights"),
        ((x, good, torch.ones(5, dtype=torch.int64)), TypeError, "weights"),
        ((torch.randn(5, 3), good), ValueError, "x"),
        ((torch.randn(1, 5, 4), good), ValueError, "x"),
        ((x.double(), good), TypeError, "x"),
    ]
    for args, exc, pat in cases:
        with pytest.raises(exc, match=pat):
            acc.update(*args)
    assert int(acc.count.sum()) == 0 and float(acc.state.abs().sum()) == 0.0


# ----------------------------------------------------------------------------------------------
# custom-op machinery
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("with_weights", [False, True])
def test_opcheck(backend, with_weights):
    x, o, w = _ragged(3, 2, 6, seed=12, weights=True)
    w = w if with_weights else None
    for gs, sa, ba in [(1, "mean", "l2"), (3, "var", "var")]:
        state = torch.zeros(3, 2, 6 // gs)
        count = torch.zeros(3, 3, dtype=torch.int64)
        torch.library.opcheck(torch.ops.minitron.grouped_importance_update.default,
                              (state, count, x, o, w, gs, sa, ba, backend))


@pytest.mark.parametrize("name", ["cpp", "reference"])
def test_torch_compile_fullgraph(name):
    backend = _backend_or_skip(name)
    torch._dynamo.reset()
    acc = GroupedImportanceAccumulator(4, 6, group_size=2, backend=backend)

    @torch.compile(fullgraph=True)
    def step(x: torch.Tensor, offsets: torch.Tensor, w: torch.Tensor) -> None:
        acc.update(x * 2.0, offsets, w)

    parts = [_ragged(4, 3, 12, seed=20 + i, weights=True) for i in range(3)]
    for x, o, w in parts:
        step(x, o, w)
    ref = grouped_importance_reference([2.0 * p[0] for p in parts], [p[1] for p in parts], [p[2] for p in parts],
                                       num_groups=4, group_size=2)
    _close(acc.value(), ref)


def test_dispatch():
    ops = op_backends(OP)
    assert ops.select("reference", "cpu").name == "reference"
    with pytest.raises(BackendUnavailableError):
        ops.select("cuda", "cpu")


# ----------------------------------------------------------------------------------------------
# property
# ----------------------------------------------------------------------------------------------


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(groups=st.integers(1, 5), samples=st.integers(1, 4), units=st.integers(1, 9), gs=st.sampled_from([1, 2, 5]),
       max_len=st.integers(0, 12), seq_agg=st.sampled_from(AGGS), batch_agg=st.sampled_from(AGGS),
       weights=st.booleans(), seed=st.integers(0, 10_000))
def test_property_matches_oracle(groups, samples, units, gs, max_len, seq_agg, batch_agg, weights, seed):
    be = "cpp" if op_backends(OP).backends.get("cpp") and not op_backends(OP).backends["cpp"].rejection(
        "cpu", torch.float32) else "reference"
    x, o, w = _ragged(groups, samples, units * gs, seed=seed, max_len=max_len, weights=weights)
    _check(groups, units, [x], [o], [w], be, group_size=gs, seq_agg=seq_agg, batch_agg=batch_agg, rtol=5e-4)
