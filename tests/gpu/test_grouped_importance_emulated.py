"""The CUDA grouped importance kernels (csrc/cuda/grouped_importance.cu) run on the CPU.

grouped_importance.cu is compiled with g++ against the CUDA shim of tests/gpu/test_importance_emulated.py
(MINITRON_CUDA_EMULATE: every CTA runs its threads as OS threads, ``__syncthreads`` is a barrier,
``__shared__`` arrays are statics, atomics take a lock). The grouped kernels use no warp-synchronous code, so
both paths (group_size 1 and > 1), every aggregation, weights, empty segments and groups, the row lanes'
shared-memory combination and the non-finite counter are checked against the Python reference backend.
No GPU needed; speed and the memory model are for a GPU run (tools/gpu_check.sh).
"""
from __future__ import annotations

import ctypes
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from minitron.ops.grouped_importance import _gi_reference
from minitron.ops.importance import AGGREGATIONS
from tests.gpu.test_importance_emulated import SHIM_BF16, SHIM_FP16, SHIM_RUNTIME

ROOT = Path(__file__).resolve().parents[2]
GXX = shutil.which("g++")
pytestmark = pytest.mark.skipif(GXX is None, reason="g++ not found")

DRIVER = r"""
#include "cuda/grouped_importance.cu"
#include <vector>
using namespace minitron::cuda;
extern "C" __attribute__((visibility("default"))) int emu_grouped_importance(
    const void* x, int dtype, int64_t N, int64_t U, int64_t G, int64_t sxr, const void* w, int wdtype, int64_t swr,
    const int64_t* offsets, int64_t J, int64_t groups, float* state, int64_t* count, int seq_agg, int batch_agg) {
  GroupedImportanceLaunch a;
  a.x = x; a.dtype = dtype; a.N = N; a.U = U; a.G = G; a.sxr = sxr; a.w = w; a.wdtype = wdtype; a.swr = swr;
  a.offsets = offsets; a.J = J; a.groups = groups; a.samples = J / groups; a.state = state; a.count = count;
  a.seq_agg = seq_agg; a.batch_agg = batch_agg;
  std::vector<float> partial(grouped_importance_workspace_floats(J, U), -12345.0f);
  a.partial = partial.data();
  return grouped_importance_update(a, nullptr);
}
"""

CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


@pytest.fixture(scope="module")
def emu(tmp_path_factory):
    d = tmp_path_factory.mktemp("grouped_importance_emu")
    (d / "cuda_runtime.h").write_text(SHIM_RUNTIME)
    (d / "cuda_bf16.h").write_text(SHIM_BF16)
    (d / "cuda_fp16.h").write_text(SHIM_FP16)
    (d / "driver.cpp").write_text(DRIVER)
    lib = d / "libgrouped_importance_emu.so"
    cmd = [GXX, "-O1", "-std=c++20", "-shared", "-fPIC", "-fvisibility=hidden", "-fno-gnu-unique", "-pthread",
           "-DMINITRON_CUDA_EMULATE", "-I", str(d), "-I", str(ROOT / "csrc"), str(d / "driver.cpp"), "-o", str(lib)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0 and "_Float16" in proc.stderr:
        pytest.skip("this g++ has no _Float16")
    assert proc.returncode == 0, proc.stderr[-4000:]
    fn = ctypes.CDLL(str(lib)).emu_grouped_importance
    fn.restype = ctypes.c_int
    return fn


def _run(emu, x, offsets, w, group_size, seq_agg, batch_agg, state, count) -> None:
    assert x.stride(1) == 1
    i64 = ctypes.c_int64
    rc = emu(ctypes.c_void_p(x.data_ptr()), CODES[x.dtype], i64(x.shape[0]), i64(state.shape[2]), i64(group_size),
             i64(x.stride(0)), ctypes.c_void_p(w.data_ptr() if w is not None else 0),
             CODES[w.dtype] if w is not None else 0, i64(w.stride(0) if w is not None else 0),
             ctypes.c_void_p(offsets.data_ptr()), i64(offsets.shape[0] - 1), i64(state.shape[0]),
             ctypes.c_void_p(state.data_ptr()), ctypes.c_void_p(count.data_ptr()), seq_agg, batch_agg)
    assert rc == 0


def _case(groups, samples, channels, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, 20, (groups * samples,), generator=g)
    lengths[::4] = 0
    lengths[samples:2 * samples] = 0  # group 1 gets no rows
    offsets = torch.zeros(groups * samples + 1, dtype=torch.int64)
    offsets[1:] = lengths.cumsum(0)
    n = int(offsets[-1])
    base = torch.randn(n, channels + 3, generator=g).to(dtype)
    x = base[:, 1:channels + 1]  # strided rows, channel stride 1
    w = (torch.rand(2 * n, generator=g) + 0.2).to(dtype)[::2]  # strided weights
    return x, offsets, w


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("units,group_size", [(131, 1), (7, 5)])
def test_emulated_matches_reference(emu, dtype, units, group_size):
    groups, samples = 3, 3
    x, offsets, w = _case(groups, samples, units * group_size, dtype, seed=units + group_size)
    r = int(offsets[samples * 2]) + 1  # a row of group 2
    assert int(offsets[-1]) > r
    x[r, 0] = float("nan")
    x[r, 1] = float("inf")
    batch_cases = ((AGGREGATIONS["l2"], w), (AGGREGATIONS["var"], None), (AGGREGATIONS["max"], w))
    for seq_agg in AGGREGATIONS.values():
        # fp32: every (seq, batch) pair; the half types differ only in the loads: one batch case per seq_agg
        for batch_agg, weights in batch_cases if dtype == torch.float32 else batch_cases[seq_agg % 3:][:1]:
            state = torch.rand(groups, 2, units)  # prior state: the update must fold into it
            state[:, 1] = state[:, 1] * 0.1
            count = torch.tensor([[2, 0, 1], [0, 0, 0], [10, 0, 7]], dtype=torch.int64)
            ref_state, ref_count = state.clone(), count.clone()
            _run(emu, x, offsets, weights, group_size, seq_agg, batch_agg, state, count)
            _gi_reference(ref_state, ref_count, x, offsets, weights, group_size, seq_agg, batch_agg)
            assert count.tolist() == ref_count.tolist()
            assert count[1].tolist() == [0, 0, 2]
            # NaN vs inf may differ where a non-finite value went through Welford (kernels) vs Chan (reference); the
            # accumulator reports those groups as non-finite anyway: the same entries are non-finite, the rest close
            fin = torch.isfinite(ref_state)
            assert torch.equal(torch.isfinite(state), fin), (seq_agg, batch_agg)
            torch.testing.assert_close(state[fin], ref_state[fin], rtol=2e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------- on a real GPU


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("units,group_size", [(131, 1), (2048, 1), (7, 64)])
def test_cuda_backends_match_reference(backend, dtype, units, group_size):
    from minitron.ops import BackendUnavailableError
    from minitron.ops._dispatch import op_backends
    from minitron.ops.grouped_importance import GroupedImportanceAccumulator

    try:
        op_backends("grouped_importance_update").select(backend, "cuda", dtype)
    except BackendUnavailableError as exc:
        pytest.skip(str(exc))
    x, offsets, w = _case(4, 3, units * group_size, dtype, seed=units)
    x, offsets, w = x.cuda(), offsets.cuda(), w.cuda()
    for seq_agg, batch_agg in [("mean", "l2"), ("var", "var"), ("max", "max"), ("l2", "sum")]:
        kw = dict(group_size=group_size, seq_agg=seq_agg, batch_agg=batch_agg, device="cuda")
        got = GroupedImportanceAccumulator(4, units, backend=backend, **kw)
        ref = GroupedImportanceAccumulator(4, units, backend="reference", **kw)
        for acc in (got, ref):
            acc.update(x, offsets, w)
            acc.update(x, offsets)
        assert torch.equal(got.count, ref.count)
        torch.testing.assert_close(got.value(), ref.value(), rtol=1e-4, atol=1e-5)
