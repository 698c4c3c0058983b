"""Fused importance reduction and block influence against the float64 torch oracles, on every backend
available here (C++ on CPU, Triton under the interpreter, the torch reference)."""
from __future__ import annotations

import io
import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from minitron import _ext
from minitron.ops import (BackendUnavailableError, BlockInfluence, ImportanceAccumulator, block_influence_reference,
                          importance_reference)
from minitron.ops._dispatch import op_backends
from minitron.ops.importance import AGGREGATIONS, NonFiniteActivationError

AGGS = list(AGGREGATIONS)
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
ALL_BACKENDS = ["cpp", "triton", "reference"]
ISAS = ["scalar", "avx2", "avx512"]


def _backend_or_skip(backend: str, op: str = "importance_update") -> str:
    try:
        op_backends(op).select(backend, "cpu", torch.float32)
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


@pytest.fixture(params=ISAS)
def isa(request, monkeypatch, cpp) -> str:
    monkeypatch.setenv("MINITRON_CPU_ISA", request.param)
    reported = _ext.build_info().get("cpu_isa")  # detect_isa() as the kernels see it now
    assert ISAS.index(reported) <= ISAS.index(request.param)
    if request.param == "scalar":
        assert reported == "scalar"
    return request.param


def _ragged_mask(b: int, s: int, seed: int = 0) -> torch.Tensor:
    """Right-padded mask with random lengths in [0, s] (sample 0 empty when b > 1)."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, s + 1, (b,), generator=g)
    if b > 1:
        lengths[0] = 0
        lengths[-1] = s
    return torch.arange(s).unsqueeze(0) < lengths.unsqueeze(1)


def _run(units, xs, masks=None, backend="cpp", **kw) -> ImportanceAccumulator:
    acc = ImportanceAccumulator(units, backend=backend, **kw)
    masks = masks if masks is not None else [None] * len(xs)
    for x, m in zip(xs, masks):
        acc.update(x, m)
    return acc


def _close(got: torch.Tensor, ref: torch.Tensor, rtol: float = 2e-4, atol_rel: float = 2e-5) -> None:
    assert got.dtype == torch.float32 and got.shape == ref.shape
    scale = float(ref.abs().nan_to_num(0.0, 0.0, 0.0).max()) if ref.numel() else 0.0
    torch.testing.assert_close(got.double(), ref.double(), rtol=rtol, atol=atol_rel * max(scale, 1e-6),
                               equal_nan=True)


def _check(units, xs, masks=None, backend="cpp", group_size=1, seq_agg="mean", batch_agg="l2", **tol):
    acc = _run(units, xs, masks, backend, group_size=group_size, seq_agg=seq_agg, batch_agg=batch_agg)
    ref = importance_reference(xs, masks, group_size, seq_agg, batch_agg)
    _close(acc.value(), ref, **tol)
    n_ref = sum(int((m.any(1) if m is not None else torch.ones(x.shape[0], dtype=torch.bool)).sum())
                for x, m in zip(xs, masks if masks is not None else [None] * len(xs)) if x.shape[1] > 0)
    assert acc.num_samples == n_ref
    return acc


# ----------------------------------------------------------------------------------------------
# correctness against the oracle
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seq_agg", AGGS)
@pytest.mark.parametrize("batch_agg", AGGS)
def test_all_aggregations(backend, seq_agg, batch_agg):
    torch.manual_seed(1)
    xs = [torch.randn(3, 11, 13), torch.randn(2, 5, 13) * 3]
    masks = [_ragged_mask(3, 11), None]
    _check(13, xs, masks, backend, seq_agg=seq_agg, batch_agg=batch_agg)


@pytest.mark.parametrize("seq_agg", AGGS)
@pytest.mark.parametrize("batch_agg", ["l2", "var"])
def test_heads_aggregations(backend, seq_agg, batch_agg):
    torch.manual_seed(2)
    xs = [torch.randn(2, 7, 3 * 8), torch.randn(3, 4, 3 * 8)]
    masks = [_ragged_mask(2, 7, seed=3), torch.tensor([[1, 1, 0, 0], [0, 0, 0, 0], [1, 0, 1, 1]], dtype=torch.bool)]
    _check(3, xs, masks, backend, group_size=8, seq_agg=seq_agg, batch_agg=batch_agg)


@pytest.mark.parametrize("units", [1, 3, 123])
@pytest.mark.parametrize("seq", [1, 97])
@pytest.mark.parametrize("group_size", [1, 64, 96])
def test_odd_shapes_cpp(cpp, units, seq, group_size):
    torch.manual_seed(units * seq + group_size)
    xs = [torch.randn(3, seq, units * group_size)]
    masks = [_ragged_mask(3, seq, seed=seq)]
    for seq_agg, batch_agg in [("mean", "l2"), ("var", "max"), ("max", "var")]:
        _check(units, xs, masks, cpp, group_size=group_size, seq_agg=seq_agg, batch_agg=batch_agg)
        _check(units, xs, None, cpp, group_size=group_size, seq_agg=seq_agg, batch_agg=batch_agg)


@pytest.mark.parametrize("units,seq,group_size", [(1, 1, 1), (3, 9, 64), (123, 5, 1), (5, 3, 96), (2, 1, 3)])
def test_odd_shapes_triton(units, seq, group_size):
    _backend_or_skip("triton")
    torch.manual_seed(7)
    xs = [torch.randn(2, seq, units * group_size)]
    for seq_agg, batch_agg in [("mean", "l2"), ("var", "var"), ("max", "sum")]:
        _check(units, xs, [_ragged_mask(2, seq, 1)], "triton", group_size=group_size, seq_agg=seq_agg,
               batch_agg=batch_agg)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("group_size", [1, 4])
def test_dtypes(backend, dtype, group_size):
    torch.manual_seed(4)
    xs = [(torch.randn(3, 9, 5 * group_size) * 4).to(dtype), torch.randn(2, 6, 5 * group_size).to(dtype)]
    masks = [_ragged_mask(3, 9), None]
    # the oracle sees the same rounded inputs: only the fp32 accumulation differs
    for seq_agg, batch_agg in [("mean", "l2"), ("var", "mean"), ("l2", "max")]:
        _check(5, xs, masks, backend, group_size=group_size, seq_agg=seq_agg, batch_agg=batch_agg)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("group_size", [1, 2, 16, 33])
def test_isa_paths(isa, dtype, group_size):
    """Every vector path (forced through MINITRON_CPU_ISA) against the oracle, with vector tails."""
    torch.manual_seed(5)
    units = 37
    xs = [(torch.randn(4, 29, units * group_size) * 2).to(dtype)]
    masks = [_ragged_mask(4, 29, seed=9)]
    for seq_agg in AGGS:
        _check(units, xs, masks, "cpp", group_size=group_size, seq_agg=seq_agg, batch_agg="l2")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_conversion_every_bit_pattern(isa, dtype):
    """|x| of every 16-bit pattern (subnormals, +-0, +-inf, NaN) through each ISA's loader, exactly."""
    bits = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16)
    x = bits.view(dtype).reshape(1, 1, -1)
    acc = _run(x.shape[-1], [x], None, "cpp", seq_agg="sum", batch_agg="sum")
    torch.testing.assert_close(acc.value(allow_nonfinite=True), x.reshape(-1).float().abs(), rtol=0, atol=0,
                               equal_nan=True)
    assert acc.num_nonfinite == int((~torch.isfinite(x)).sum())  # 2 infs + the NaN patterns


def test_masks(backend):
    torch.manual_seed(6)
    x = torch.randn(4, 10, 6)
    # ragged, one sample empty
    _check(6, [x], [_ragged_mask(4, 10)], backend)
    # every token masked: nothing counts
    acc = _check(6, [x], [torch.zeros(4, 10, dtype=torch.bool)], backend, seq_agg="var", batch_agg="mean")
    assert acc.num_samples == 0 and torch.equal(acc.value(), torch.zeros(6))
    # integer (HF attention_mask style) masks are accepted
    im = _ragged_mask(4, 10).to(torch.int64)
    acc = _run(6, [x], [im], backend)
    _close(acc.value(), importance_reference([x], [im.bool()]))
    # a masked token's value never matters, even NaN/inf
    m = _ragged_mask(4, 10, seed=2)
    xn = x.clone()
    xn[~m] = float("nan")
    xn[0, 0, 0] = float("inf") if not m[0, 0] else xn[0, 0, 0]
    for seq_agg in AGGS:
        _check(6, [xn], [m], backend, seq_agg=seq_agg, batch_agg="var")


def test_nan_propagates(backend):
    x = torch.randn(2, 5, 4)
    x[1, 2, 3] = float("nan")
    for seq_agg in AGGS:
        for batch_agg in ("l2", "max"):
            acc = _run(4, [x], None, backend, seq_agg=seq_agg, batch_agg=batch_agg)
            with pytest.raises(NonFiniteActivationError, match=r"x held 1 non-finite value"):
                acc.value()
            v = acc.value(allow_nonfinite=True)
            assert torch.isnan(v[3]) and torch.isfinite(v[:3]).all(), (seq_agg, batch_agg, v)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("group_size", [1, 3])
def test_nonfinite_counted_masked_ignored(backend, dtype, group_size):
    """NaN, +inf and -inf at counted positions are counted exactly (in every aggregation, over several
    chunks and units); the same values at masked positions never count; the score stays reportable."""
    torch.manual_seed(40)
    b, s, units = 3, 300, 5  # 300 tokens: several sequence chunks in the C++ kernel
    x = torch.randn(b, s, units * group_size).to(dtype)
    m = torch.ones(b, s, dtype=torch.bool)
    m[0, 250:] = False
    m[2, :] = False  # a sample with no counted token: nothing of it counts
    bad_at = [(0, 0, 0, float("nan")), (0, 200, 2, float("inf")), (1, 299, units * group_size - 1, -float("inf")),
              (1, 150, 1, float("nan")), (1, 151, 1, float("nan"))]
    for i, j, k, v in bad_at:
        x[i, j, k] = v
    x[0, 260, 0] = float("nan")  # masked
    x[0, 299, 3] = float("inf")  # masked
    x[2, 5, :] = -float("inf")  # masked (whole sample)
    for seq_agg in AGGS:
        acc = _run(units, [x, x[:, :7]], [m, m[:, :7]], backend, group_size=group_size, seq_agg=seq_agg,
                   batch_agg="var")
        assert acc.num_nonfinite == len(bad_at) + 1, seq_agg  # + x[0, 0, 0] again in the second batch
        with pytest.raises(NonFiniteActivationError, match=f"x held {len(bad_at) + 1} non-finite"):
            acc.value()
        clean = x.clone()
        for i, j, k, _ in bad_at:
            clean[i, j, k] = 0.0
        ok = _run(units, [clean], [m], backend, group_size=group_size, seq_agg=seq_agg, batch_agg="l2")
        assert ok.num_nonfinite == 0
        _close(ok.value(), importance_reference([clean], [m], group_size, seq_agg, "l2"))


def test_nonfinite_state_merge_resume(backend):
    x = torch.randn(2, 4, 6)
    x[1, 3, 5] = float("inf")
    a = _run(6, [x], None, backend, seq_agg="mean", batch_agg="var")
    b = _run(6, [x, x], None, backend, seq_agg="mean", batch_agg="var")
    assert (a.num_nonfinite, b.num_nonfinite) == (1, 2)
    assert a.merge(b).num_nonfinite == 3
    sd = a.state_dict()
    assert sd["nonfinite"] == 3 and sd["count"] == 6
    resumed = ImportanceAccumulator(6, seq_agg="mean", batch_agg="var", backend=backend)
    resumed.load_state_dict(sd)
    assert resumed.num_nonfinite == 3 and resumed.num_samples == 6
    # a version-1 state dict (no "nonfinite") loads with a zero counter
    old = {k: v for k, v in sd.items() if k != "nonfinite"}
    resumed.load_state_dict(dict(old, version=1))
    assert resumed.num_nonfinite == 0 and resumed.num_samples == 6
    with pytest.raises(ValueError, match="nonfinite"):
        resumed.load_state_dict(dict(sd, nonfinite=-1))
    resumed.reset()
    assert resumed.num_nonfinite == 0


def test_noncontiguous(backend):
    torch.manual_seed(8)
    base = torch.randn(9, 3, 2 * 12)
    views = [
        base.transpose(0, 1),  # [3, 9, 24]: batch/seq strides swapped
        base.transpose(0, 1)[:, ::2],  # strided sequence
        base.transpose(0, 1)[..., ::2],  # strided channels (copied by the kernels)
        torch.randn(3, 12, 9).transpose(1, 2),  # channel stride != 1
    ]
    for x in views:
        assert not x.is_contiguous()
        b, s, c = x.shape
        mask = _ragged_mask(b, s, seed=s).t().contiguous().t()  # [B, S] with strides (1, B)
        assert not mask.is_contiguous()
        for seq_agg, batch_agg in [("mean", "l2"), ("var", "var"), ("max", "mean")]:
            _check(c, [x], [mask], backend, seq_agg=seq_agg, batch_agg=batch_agg)
            _check(c // 3, [x], None, backend, group_size=3, seq_agg=seq_agg, batch_agg=batch_agg)


@pytest.mark.parametrize("seq_agg", AGGS)
def test_sequence_chunks_cpp(cpp, seq_agg):
    """Few samples x few unit blocks: the C++ kernel splits the sequence; chunks must recombine."""
    torch.manual_seed(9)
    x = torch.randn(1, 1000, 600) + 0.5
    m = torch.ones(1, 1000, dtype=torch.bool)
    m[0, :130] = False  # the first counted token lies in the second chunk
    _check(600, [x], [m], cpp, seq_agg=seq_agg, batch_agg="sum")
    x2 = torch.randn(2, 700, 4 * 32)
    _check(4, [x2], None, cpp, group_size=32, seq_agg=seq_agg, batch_agg="mean")


@pytest.mark.parametrize("units", [4096 + 17, 3 * 4096 + 1])
def test_many_unit_blocks_cpp(cpp, units):
    """More units than one C++ work item holds: balanced unit blocks with vector tails."""
    torch.manual_seed(units)
    x = torch.randn(2, 9, units)
    m = _ragged_mask(2, 9, seed=5)
    for seq_agg in ("mean", "var", "max"):
        _check(units, [x], [m], cpp, seq_agg=seq_agg, batch_agg="l2")


def test_variance_is_stable(backend):
    """Large mean, tiny spread: the shifted (sequence) and Welford (batch) updates keep the variance."""
    torch.manual_seed(10)
    x = 1000.0 + 0.05 * torch.randn(6, 50, 8)
    acc = _check(8, [x], None, backend, seq_agg="var", batch_agg="mean", rtol=2e-3)
    assert acc.value().min() > 0
    # per-sample offsets: the batch-variance of means ~ 1e-2 around 1000
    xs = [1000.0 + 0.1 * torch.randn(1, 1, 1) + 0.01 * torch.randn(1, 20, 8) for _ in range(30)]
    _check(8, xs, None, backend, seq_agg="mean", batch_agg="var", rtol=2e-2)


def test_empty_inputs(backend):
    acc = ImportanceAccumulator(4, backend=backend)
    acc.update(torch.zeros(0, 5, 4))
    acc.update(torch.zeros(3, 0, 4))
    assert acc.num_samples == 0 and torch.equal(acc.value(), torch.zeros(4))


# ----------------------------------------------------------------------------------------------
# streaming, merging, resuming
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("batch_agg", AGGS)
@pytest.mark.parametrize("seq_agg", ["mean", "var", "max"])
def test_many_updates_equal_one(backend, seq_agg, batch_agg):
    torch.manual_seed(11)
    x = torch.randn(12, 8, 7)
    m = _ragged_mask(12, 8, seed=4)
    one = _run(7, [x], [m], backend, seq_agg=seq_agg, batch_agg=batch_agg)
    many = _run(7, list(x.split(1)) + [x[:0]], list(m.split(1)) + [m[:0]], backend, seq_agg=seq_agg,
                batch_agg=batch_agg)
    assert one.num_samples == many.num_samples == int(m.any(1).sum())
    _close(many.value(), one.value())


@pytest.mark.parametrize("batch_agg", AGGS)
def test_merge_equals_one_accumulator(backend, batch_agg):
    torch.manual_seed(12)
    xs = [torch.randn(3, 6, 2 * 5) for _ in range(5)]
    ms = [_ragged_mask(3, 6, seed=i) for i in range(5)]
    kw = dict(group_size=2, seq_agg="mean", batch_agg=batch_agg)
    whole = _run(5, xs, ms, backend, **kw)
    a = _run(5, xs[:2], ms[:2], backend, **kw)
    b = _run(5, xs[2:], ms[2:], backend, **kw)
    empty = ImportanceAccumulator(5, backend=backend, **kw)
    assert a.merge(b).merge(empty) is a
    assert a.num_samples == whole.num_samples
    _close(a.value(), whole.value())
    # merging into an empty accumulator copies
    _close(ImportanceAccumulator(5, backend=backend, **kw).merge(whole).value(), whole.value())


@pytest.mark.parametrize("batch_agg", AGGS)
def test_resume_from_state_dict(backend, batch_agg):
    torch.manual_seed(13)
    xs = [torch.randn(2, 5, 6) for _ in range(4)]
    kw = dict(seq_agg="var", batch_agg=batch_agg)
    whole = _run(6, xs, None, backend, **kw)
    first = _run(6, xs[:2], None, backend, **kw)
    buf = io.BytesIO()
    torch.save(first.state_dict(), buf)
    buf.seek(0)
    resumed = ImportanceAccumulator(6, backend=backend, **kw)
    resumed.load_state_dict(torch.load(buf))
    assert resumed.num_samples == first.num_samples
    for x in xs[2:]:
        resumed.update(x)
    assert resumed.num_samples == whole.num_samples
    _close(resumed.value(), whole.value())
    resumed.reset()
    assert resumed.num_samples == 0 and torch.equal(resumed.value(), torch.zeros(6))


def test_state_dict_mismatch():
    acc = ImportanceAccumulator(4, seq_agg="mean", batch_agg="l2")
    sd = acc.state_dict()
    with pytest.raises(ValueError, match="configuration"):
        ImportanceAccumulator(4, seq_agg="max", batch_agg="l2").load_state_dict(sd)
    with pytest.raises(ValueError, match="configuration"):
        ImportanceAccumulator(5).load_state_dict(sd)
    with pytest.raises(ValueError, match="missing"):
        acc.load_state_dict({"state": sd["state"]})
    with pytest.raises(TypeError, match="state_dict"):
        acc.load_state_dict([1, 2])
    bad = dict(sd, count=-1)
    with pytest.raises(ValueError, match="count"):
        acc.load_state_dict(bad)


# ----------------------------------------------------------------------------------------------
# property tests
# ----------------------------------------------------------------------------------------------


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(b=st.integers(1, 4), s=st.integers(1, 40), units=st.integers(1, 40), group=st.sampled_from([1, 2, 5, 16]),
       seq_agg=st.sampled_from(AGGS), batch_agg=st.sampled_from(AGGS), density=st.floats(0.0, 1.0),
       dtype=st.sampled_from(DTYPES), scale=st.sampled_from([1e-3, 1.0, 50.0]), seed=st.integers(0, 2**16))
def test_property_cpp_matches_oracle(cpp, b, s, units, group, seq_agg, batch_agg, density, dtype, scale, seed):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(b, s, units * group, generator=g) * scale).to(dtype)
    m = torch.rand(b, s, generator=g) < density
    _check(units, [x, x[:, : max(1, s // 2)]], [m, None], cpp, group_size=group, seq_agg=seq_agg,
           batch_agg=batch_agg, rtol=5e-4)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(sizes=st.lists(st.integers(0, 4), min_size=1, max_size=5), batch_agg=st.sampled_from(AGGS),
       seq_agg=st.sampled_from(AGGS), seed=st.integers(0, 2**16))
def test_property_order_and_split_invariance(cpp, sizes, batch_agg, seq_agg, seed):
    """Any split of the samples into updates and accumulators gives the same scores."""
    g = torch.Generator().manual_seed(seed)
    n = sum(sizes)
    x = torch.randn(n, 6, 9, generator=g)
    m = torch.rand(n, 6, generator=g) < 0.7
    kw = dict(seq_agg=seq_agg, batch_agg=batch_agg)
    whole = _run(9, [x], [m], cpp, **kw)
    parts, i = [], 0
    for k in sizes:
        parts.append(_run(9, [x[i:i + k]], [m[i:i + k]], cpp, **kw))
        i += k
    merged = parts[0]
    for p in parts[1:]:
        merged.merge(p)
    assert merged.num_samples == whole.num_samples
    _close(merged.value(), whole.value(), rtol=5e-4)


# ----------------------------------------------------------------------------------------------
# custom-op machinery
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("with_mask", [False, True])
def test_opcheck_importance(backend, with_mask):
    torch.manual_seed(14)
    x = torch.randn(2, 5, 6)
    mask = _ragged_mask(2, 5) if with_mask else None
    for g, sa, ba in [(1, "mean", "l2"), (3, "var", "var")]:
        state = torch.zeros(2, 6 // g)
        count = torch.zeros(2, dtype=torch.int64)
        torch.library.opcheck(torch.ops.minitron.importance_update.default,
                              (state, count, x, mask, g, sa, ba, backend))


def test_opcheck_block_influence(backend):
    torch.manual_seed(15)
    a, b = torch.randn(2, 5, 8), torch.randn(2, 5, 8)
    for mask in (None, _ragged_mask(2, 5)):
        state = torch.zeros(3, dtype=torch.float64)
        count = torch.zeros(2, 3, dtype=torch.int64)
        torch.library.opcheck(torch.ops.minitron.block_influence_update.default,
                              (state, count, a, b, mask, 1, backend))


def test_torch_compile_fullgraph(cpp):
    torch._dynamo.reset()
    torch.manual_seed(16)
    acc = ImportanceAccumulator(6, group_size=2, seq_agg="mean", batch_agg="l2", backend=cpp)
    bi = BlockInfluence(2, backend=cpp)

    @torch.compile(fullgraph=True)
    def step(x: torch.Tensor, mask: torch.Tensor) -> None:
        h = x * 2.0  # some surrounding computation in the same graph
        acc.update(h, mask)
        bi.update(1, x, h + 1.0, mask)

    xs = [torch.randn(3, 7, 12) for _ in range(3)]
    ms = [_ragged_mask(3, 7, seed=i) for i in range(3)]
    for x, m in zip(xs, ms):
        step(x, m)
    ref = importance_reference([2.0 * x for x in xs], ms, 2, "mean", "l2")
    _close(acc.value(), ref)
    assert acc.num_samples == sum(int(m.any(1).sum()) for m in ms)
    ref_bi = block_influence_reference(xs, [2.0 * x + 1.0 for x in xs], ms)
    torch.testing.assert_close(bi.value()[1], ref_bi, rtol=1e-5, atol=1e-6)
    assert torch.isnan(bi.value()[0])


def test_dispatch():
    reasons = op_backends("importance_update")
    with pytest.raises(BackendUnavailableError, match="cuda"):
        reasons.select("cuda", "cpu", torch.float32)
    try:
        picked = reasons.select("auto", "cpu", torch.float32).name
    except BackendUnavailableError as exc:
        assert "reference" in str(exc)  # never silently the reference
    else:
        assert picked == "cpp"
    with pytest.raises(ValueError, match="backend"):
        ImportanceAccumulator(3, backend="gpu")
    with pytest.raises(BackendUnavailableError):
        ImportanceAccumulator(3, backend="cuda").update(torch.randn(1, 2, 3))


# ----------------------------------------------------------------------------------------------
# bad input
# ----------------------------------------------------------------------------------------------


def test_bad_constructor_arguments():
    with pytest.raises(ValueError, match="num_units"):
        ImportanceAccumulator(0)
    with pytest.raises(TypeError, match="num_units"):
        ImportanceAccumulator(3.0)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="num_units"):
        ImportanceAccumulator(True)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="group_size"):
        ImportanceAccumulator(3, group_size=0)
    with pytest.raises(ValueError, match="seq_agg"):
        ImportanceAccumulator(3, seq_agg="median")
    with pytest.raises(TypeError, match="batch_agg"):
        ImportanceAccumulator(3, batch_agg=1)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="device"):
        ImportanceAccumulator(3, device=0.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="num_layers"):
        BlockInfluence(0)


def test_bad_update_arguments(backend):
    acc = ImportanceAccumulator(4, group_size=2, backend=backend)
    with pytest.raises(TypeError, match="x"):
        acc.update([[1.0]])  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="x must have dtype"):
        acc.update(torch.ones(1, 2, 8, dtype=torch.float64))
    with pytest.raises(TypeError, match="x must have dtype"):
        acc.update(torch.ones(1, 2, 8, dtype=torch.int32))
    with pytest.raises(ValueError, match="x must be 3-D"):
        acc.update(torch.ones(2, 8))
    with pytest.raises(ValueError, match="channels"):
        acc.update(torch.ones(1, 2, 4))
    with pytest.raises(ValueError, match="x is on meta"):
        acc.update(torch.ones(1, 2, 8, device="meta"))
    with pytest.raises(ValueError, match="mask must have shape"):
        acc.update(torch.ones(1, 2, 8), torch.ones(2, 1, dtype=torch.bool))
    with pytest.raises(TypeError, match="mask must have dtype"):
        acc.update(torch.ones(1, 2, 8), torch.ones(1, 2))
    with pytest.raises(TypeError, match="mask"):
        acc.update(torch.ones(1, 2, 8), [[True, False]])  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="other"):
        acc.merge("acc")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="configuration"):
        acc.merge(ImportanceAccumulator(4, group_size=1))
    assert acc.num_samples == 0  # nothing was counted by the failed calls


def test_native_op_checks(cpp):
    op = torch.ops.minitron._importance_update_native
    state, count = torch.zeros(2, 4), torch.zeros(2, dtype=torch.int64)
    with pytest.raises(ValueError, match="channels"):
        op(state, count, torch.ones(1, 2, 5), None, 1, 0, 1)
    with pytest.raises(ValueError, match="seq_agg"):
        op(state, count, torch.ones(1, 2, 4), None, 1, 9, 1)
    with pytest.raises(TypeError, match="state"):
        op(state.double(), count, torch.ones(1, 2, 4), None, 1, 0, 1)
    with pytest.raises(ValueError, match="mask"):
        op(state, count, torch.ones(1, 2, 4), torch.ones(2, 2, dtype=torch.bool), 1, 0, 1)
    with pytest.raises(TypeError, match=r"count must be a contiguous int64 \[2\]"):
        op(state, torch.zeros(1, dtype=torch.int64), torch.ones(1, 2, 4), None, 1, 0, 1)
    assert not count.any() and not state.any()
    bi = torch.ops.minitron._block_influence_update_native
    with pytest.raises(TypeError, match=r"count must be a contiguous int64 \[2, num_layers\]"):
        bi(torch.zeros(3, dtype=torch.float64), torch.zeros(3, dtype=torch.int64), torch.ones(1, 2, 4),
           torch.ones(1, 2, 4), None, 0)


# ----------------------------------------------------------------------------------------------
# block influence
# ----------------------------------------------------------------------------------------------


@pytest.fixture(params=ALL_BACKENDS)
def bi_backend(request) -> str:
    return _backend_or_skip(request.param, "block_influence_update")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden", [1, 7, 64, 97])
def test_block_influence_matches_reference(bi_backend, dtype, hidden):
    torch.manual_seed(hidden)
    hs_in = [torch.randn(3, 9, hidden).to(dtype), torch.randn(2, 4, hidden).to(dtype)]
    hs_out = [(h.float() + 0.7 * torch.randn_like(h.float())).to(dtype) for h in hs_in]
    masks = [_ragged_mask(3, 9, seed=hidden), None]
    bi = BlockInfluence(3, backend=bi_backend)
    for a, b, m in zip(hs_in, hs_out, masks):
        bi.update(2, a, b, m)
    v = bi.value()
    assert v.dtype == torch.float32 and v.shape == (3,)
    assert torch.isnan(v[:2]).all()
    torch.testing.assert_close(v[2], block_influence_reference(hs_in, hs_out, masks), rtol=2e-5, atol=2e-6)
    assert bi.num_tokens.tolist() == [0, 0, int(masks[0].sum()) + 8]


def test_block_influence_special_vectors(bi_backend):
    a = torch.randn(1, 6, 16)
    b = a.clone()
    b[0, 1] = -a[0, 1]  # opposite: 2
    b[0, 2] = 0.0  # one zero vector: 1
    a[0, 3] = 0.0  # both zero: 0
    b[0, 3] = 0.0
    b[0, 4] = 3.0 * a[0, 4]  # same direction: 0
    a[0, 5] = 0.0  # zero input, nonzero output: 1
    expect = torch.tensor([0.0, 2.0, 1.0, 0.0, 0.0, 1.0])
    for i in range(6):
        bi = BlockInfluence(1, backend=bi_backend)
        bi.update(0, a[:, i:i + 1], b[:, i:i + 1])
        torch.testing.assert_close(bi.value()[0], expect[i], rtol=0, atol=1e-6)
    # NaN in a counted token -> counted and reported (NaN if asked for anyway); in a masked token -> ignored
    an = a.clone()
    an[0, 0, 0] = float("nan")
    bi = BlockInfluence(1, backend=bi_backend)
    bi.update(0, an, b)
    with pytest.raises(NonFiniteActivationError, match=r"\{0: 1\}"):
        bi.value()
    assert torch.isnan(bi.value(allow_nonfinite=True)[0])
    bi = BlockInfluence(1, backend=bi_backend)
    m = torch.ones(1, 6, dtype=torch.bool)
    m[0, 0] = False
    bi.update(0, an, b, m)
    torch.testing.assert_close(bi.value()[0], expect[1:].mean(), rtol=0, atol=1e-6)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(b=st.integers(1, 3), s=st.integers(1, 20), hidden=st.integers(1, 80), dtype=st.sampled_from(DTYPES),
       density=st.floats(0.0, 1.0), noise=st.sampled_from([0.0, 1e-3, 1.0, 100.0]), seed=st.integers(0, 2**16))
def test_property_block_influence_cpp(cpp, b, s, hidden, dtype, density, noise, seed):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(b, s, hidden, generator=g).to(dtype)
    out = (a.float() + noise * torch.randn(b, s, hidden, generator=g)).to(dtype)
    m = torch.rand(b, s, generator=g) < density
    bi = BlockInfluence(1, backend=cpp)
    bi.update(0, a, out, m)
    ref = block_influence_reference(a, out, m)
    torch.testing.assert_close(bi.value()[0], ref, rtol=2e-5, atol=5e-6, equal_nan=True)
    assert int(bi.num_tokens[0]) == int(m.sum())


def test_block_influence_isa_paths(isa):
    torch.manual_seed(17)
    for dtype in DTYPES:
        a = torch.randn(2, 33, 53).to(dtype)
        b = (a.float() + torch.randn(2, 33, 53)).to(dtype)
        bi = BlockInfluence(1, backend="cpp")
        bi.update(0, a, b)
        torch.testing.assert_close(bi.value()[0], block_influence_reference(a, b), rtol=2e-5, atol=2e-6)


def test_block_influence_noncontiguous_merge_resume(bi_backend):
    torch.manual_seed(18)
    base = torch.randn(8, 3, 2 * 10)
    a = base.transpose(0, 1)[..., ::2]  # [3, 8, 10], channel stride 2
    b = torch.randn(3, 10, 8).transpose(1, 2)  # channel stride != 1
    m = _ragged_mask(8, 3, seed=2).t()  # non-contiguous [3, 8]
    whole = BlockInfluence(2, backend=bi_backend)
    whole.update(0, a, b, m)
    whole.update(1, b, a)
    ref0 = block_influence_reference(a, b, m)
    torch.testing.assert_close(whole.value()[0], ref0, rtol=2e-5, atol=2e-6)
    p1, p2 = BlockInfluence(2, backend=bi_backend), BlockInfluence(2, backend=bi_backend)
    p1.update(0, a[:2], b[:2], m[:2])
    p2.update(0, a[2:], b[2:], m[2:])
    p2.update(1, b, a)
    sd = p1.merge(p2).state_dict()
    resumed = BlockInfluence(2, backend=bi_backend)
    resumed.load_state_dict(sd)
    torch.testing.assert_close(resumed.value(), whole.value(), rtol=1e-6, atol=1e-7)
    assert resumed.num_tokens.tolist() == whole.num_tokens.tolist()
    resumed.reset()
    assert torch.isnan(resumed.value()).all()


def test_block_influence_bad_input():
    bi = BlockInfluence(2)
    x = torch.randn(1, 2, 4)
    with pytest.raises(ValueError, match="layer_idx"):
        bi.update(2, x, x)
    with pytest.raises(TypeError, match="layer_idx"):
        bi.update(1.0, x, x)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="same shape"):
        bi.update(0, x, torch.randn(1, 2, 5))
    with pytest.raises(TypeError, match="same dtype"):
        bi.update(0, x, x.half())
    with pytest.raises(TypeError, match="h_out"):
        bi.update(0, x, None)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="mask"):
        bi.update(0, x, x, torch.ones(2, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="num_layers"):
        bi.merge(BlockInfluence(3))
    with pytest.raises(ValueError, match="num_layers"):
        BlockInfluence(3).load_state_dict(bi.state_dict())


@pytest.mark.parametrize("dtype", DTYPES)
def test_block_influence_nonfinite(bi_backend, dtype):
    """NaN/+inf/-inf in h_in or h_out at counted tokens are counted per block; masked tokens never count."""
    torch.manual_seed(41)
    a = torch.randn(2, 40, 70).to(dtype)
    b = torch.randn(2, 40, 70).to(dtype)
    m = torch.ones(2, 40, dtype=torch.bool)
    m[1, 30:] = False
    a[0, 3, 5] = float("nan")
    b[0, 3, 6] = float("inf")  # same token, both inputs
    b[1, 10, 69] = -float("inf")
    a[1, 35, :] = float("nan")  # masked
    b[1, 39, 0] = float("inf")  # masked
    bi = BlockInfluence(3, backend=bi_backend)
    bi.update(1, a, b, m)
    bi.update(2, a[:, 11:], b[:, 11:], m[:, 11:])  # only the masked ones remain
    assert bi.num_nonfinite.tolist() == [0, 3, 0]
    assert bi.num_tokens.tolist() == [0, 70, 48]
    with pytest.raises(NonFiniteActivationError, match=r"1 block\(s\) \(\{block: values\} = \{1: 3\}\)"):
        bi.value()
    v = bi.value(allow_nonfinite=True)
    assert torch.isnan(v[0]) and torch.isnan(v[1]) and torch.isfinite(v[2])
    other = BlockInfluence(3, backend=bi_backend)
    other.update(1, a[:1], b[:1])
    sd = bi.merge(other).state_dict()
    assert sd["nonfinite"].tolist() == [0, 5, 0] and sd["count"].tolist() == [0, 110, 48]
    resumed = BlockInfluence(3)
    resumed.load_state_dict(sd)
    assert resumed.num_nonfinite.tolist() == [0, 5, 0]
    resumed.load_state_dict({k: v for k, v in sd.items() if k != "nonfinite"})  # version 1
    assert resumed.num_nonfinite.tolist() == [0, 0, 0]
    torch.testing.assert_close(resumed.value(), bi.value(allow_nonfinite=True), equal_nan=True)  # no raise now
