"""The CUDA importance kernels (csrc/cuda/importance.cu), group_size == 1 path, run on the CPU.

importance.cu is compiled with g++ against a small CUDA shim (MINITRON_CUDA_EMULATE): every CTA runs its
threads as OS threads, ``__syncthreads`` is a barrier, ``__shared__`` arrays are statics (one CTA at a time),
atomics take a lock. That is the real CUDA execution model minus warp-synchronous tricks, which the
group_size == 1 path does not use (the grouped and block-influence kernels use warp shuffles: GPU only).

It checks the launch plan (unit blocks of 16-byte words, sequence chunks), the 16-byte and element load
paths, masks, every aggregation, the warps' shared-memory combination and the non-finite counter against the
Python reference backend. No GPU needed; speed and the memory model are for tests/gpu/test_cuda_ops.py.
"""
from __future__ import annotations

import ctypes
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from minitron.ops.importance import AGGREGATIONS, _imp_reference

ROOT = Path(__file__).resolve().parents[2]
GXX = shutil.which("g++")
pytestmark = pytest.mark.skipif(GXX is None, reason="g++ not found")

SHIM_RUNTIME = r"""
#pragma once
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>
struct dim3 {
  unsigned x = 1, y = 1, z = 1;
  dim3(unsigned a = 1, unsigned b = 1, unsigned c = 1) : x(a), y(b), z(c) {}
};
struct uint4 { unsigned x, y, z, w; };
typedef int cudaError_t;
typedef void* cudaStream_t;
constexpr cudaError_t cudaSuccess = 0;
constexpr cudaError_t cudaErrorInvalidValue = 1;
inline const char* cudaGetErrorString(cudaError_t) { return "emulated"; }
inline cudaError_t cudaGetLastError() { return cudaSuccess; }
static thread_local dim3 threadIdx, blockIdx;
static dim3 gridDim, blockDim;
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(x)
#define __shared__ static
template <class T> inline T __ldg(const T* p) { return *p; }
inline float __uint_as_float(unsigned u) { float f; std::memcpy(&f, &u, 4); return f; }
inline unsigned __float_as_uint(float f) { unsigned u; std::memcpy(&u, &f, 4); return u; }
namespace minitron_emu {
static std::barrier<>* bar = nullptr;
static std::mutex atomic_lock;
inline void launch(dim3 grid, dim3 block, const std::function<void()>& body) {
  gridDim = grid;
  blockDim = block;
  const unsigned n = block.x * block.y * block.z;
  for (unsigned bz = 0; bz < grid.z; ++bz)
    for (unsigned by = 0; by < grid.y; ++by)
      for (unsigned bx = 0; bx < grid.x; ++bx) {
        std::barrier<> b(n);
        bar = &b;
        std::vector<std::thread> ts;
        for (unsigned t = 0; t < n; ++t)
          ts.emplace_back([&, t] {
            blockIdx = dim3(bx, by, bz);
            threadIdx = dim3(t % block.x, (t / block.x) % block.y, t / (block.x * block.y));
            body();
            bar->arrive_and_drop();  // a finished thread no longer holds the others at a barrier
          });
        for (auto& th : ts) th.join();
      }
}
}  // namespace minitron_emu
inline void __syncthreads() { minitron_emu::bar->arrive_and_wait(); }
inline unsigned long long atomicAdd(unsigned long long* p, unsigned long long v) {
  std::lock_guard<std::mutex> g(minitron_emu::atomic_lock); auto o = *p; *p += v; return o;
}
inline double atomicAdd(double* p, double v) {
  std::lock_guard<std::mutex> g(minitron_emu::atomic_lock); auto o = *p; *p += v; return o;
}
inline float __shfl_xor_sync(unsigned, float, int) { std::abort(); }  // warp shuffles: not emulated
"""

SHIM_BF16 = r"""
#pragma once
#include <cstring>
struct __nv_bfloat16 { unsigned short x = 0; };
inline float __bfloat162float(__nv_bfloat16 h) {
  unsigned u = unsigned(h.x) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
"""

SHIM_FP16 = r"""
#pragma once
#include <cstring>
struct __half { unsigned short x = 0; };
inline float __half2float(__half h) { _Float16 f; std::memcpy(&f, &h.x, 2); return static_cast<float>(f); }
inline __half __ushort_as_half(unsigned short s) { __half h; h.x = s; return h; }
"""

DRIVER = r"""
#include "cuda/importance.cu"
#include <vector>
using namespace minitron::cuda;
// x: [B, S, U] with element strides sxb, sxs (channel stride 1); mask: uint8 [B, S] contiguous or null.
extern "C" __attribute__((visibility("default"))) int emu_importance(
    const void* x, int dtype, int64_t B, int64_t S, int64_t U, int64_t sxb, int64_t sxs, const uint8_t* mask,
    float* state, int64_t* count, int seq_agg, int batch_agg, int num_sms, int64_t* nch_out) {
  ImportanceLaunch a;
  a.x = x; a.dtype = dtype; a.B = B; a.S = S; a.U = U; a.G = 1; a.sxb = sxb; a.sxs = sxs;
  a.mask = mask; a.smb = S; a.sms = 1; a.state = state; a.count = count;
  a.seq_agg = seq_agg; a.batch_agg = batch_agg;
  const int es = dtype == kElemF32 ? 4 : 2;
  importance_plan(B, S, U, 1, es, num_sms, &a.nch, &a.chunk);
  std::vector<float> partial(importance_workspace_floats(B, a.nch, U));
  std::vector<int64_t> stats(importance_workspace_int64s(B));
  a.partial = partial.data(); a.stats = stats.data();
  *nch_out = a.nch;
  return importance_update(a, nullptr);
}
"""

CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


@pytest.fixture(scope="module")
def emu(tmp_path_factory):
    d = tmp_path_factory.mktemp("importance_emu")
    (d / "cuda_runtime.h").write_text(SHIM_RUNTIME)
    (d / "cuda_bf16.h").write_text(SHIM_BF16)
    (d / "cuda_fp16.h").write_text(SHIM_FP16)
    (d / "driver.cpp").write_text(DRIVER)
    lib = d / "libimportance_emu.so"
    # private symbols (-fvisibility=hidden -fno-gnu-unique): the other emulation library loaded in the same
    # process (tests/gpu/test_slicing_emulated.py) must never bind to this one's shim globals, or vice versa
    cmd = [GXX, "-O1", "-std=c++20", "-shared", "-fPIC", "-fvisibility=hidden", "-fno-gnu-unique", "-pthread",
           "-DMINITRON_CUDA_EMULATE", "-I", str(d), "-I", str(ROOT / "csrc"), str(d / "driver.cpp"), "-o", str(lib)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0 and "_Float16" in proc.stderr:
        pytest.skip("this g++ has no _Float16")
    assert proc.returncode == 0, proc.stderr[-4000:]
    fn = ctypes.CDLL(str(lib)).emu_importance
    fn.restype = ctypes.c_int
    return fn


def _run(emu, x: torch.Tensor, mask, seq_agg: int, batch_agg: int, state, count, num_sms: int = 1) -> int:
    assert x.stride(2) == 1
    m = mask.to(torch.uint8).contiguous() if mask is not None else None
    nch = ctypes.c_int64(0)
    rc = emu(ctypes.c_void_p(x.data_ptr()), CODES[x.dtype], *[ctypes.c_int64(v) for v in (*x.shape, *x.stride()[:2])],
             ctypes.c_void_p(m.data_ptr() if m is not None else 0), ctypes.c_void_p(state.data_ptr()),
             ctypes.c_void_p(count.data_ptr()), seq_agg, batch_agg, num_sms, ctypes.byref(nch))
    assert rc == 0
    return nch.value


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("units,aligned", [(264, True), (131, False)])
def test_emulated_g1_matches_reference(emu, dtype, units, aligned):
    g = torch.Generator().manual_seed(units)
    base = torch.randn(3, 150, units + 8, generator=g).to(dtype)
    x = base[..., :units] if aligned else base[..., 1:units + 1]  # 16-byte loads / element loads
    mask = torch.rand(3, 150, generator=g) < 0.8
    mask[1] = False  # a sample with no counted token
    x = x.clone() if aligned else x
    x[0, 3, 5] = float("nan")
    x[2, 149, units - 1] = float("inf")
    x[1, 7, 2] = float("inf")  # masked sample: not counted
    bad = int((~torch.isfinite(x) & mask.unsqueeze(-1)).sum())
    assert bad >= 1
    for seq_agg in AGGREGATIONS.values():
        for batch_agg in (AGGREGATIONS["l2"], AGGREGATIONS["var"]):
            state, count = torch.zeros(2, units), torch.tensor([3, 0], dtype=torch.int64)
            ref_state, ref_count = state.clone(), count.clone()
            _run(emu, x, mask, seq_agg, batch_agg, state, count, num_sms=4)  # several sequence chunks
            _imp_reference(ref_state, ref_count, x, mask, 1, seq_agg, batch_agg)
            assert count.tolist() == ref_count.tolist() == [5, bad]
            torch.testing.assert_close(state, ref_state, rtol=2e-5, atol=1e-5, equal_nan=True)


def test_emulated_plan_splits_sequence(emu):
    x = torch.randn(2, 400, 256).to(torch.bfloat16)
    state, count = torch.zeros(2, 256), torch.zeros(2, dtype=torch.int64)
    nch = _run(emu, x, None, AGGREGATIONS["mean"], AGGREGATIONS["sum"], state, count, num_sms=8)
    assert nch == 6  # 1 unit block (256 bf16 units) x 2 samples, target 64 blocks, chunks >= 64 tokens
    ref_state, ref_count = torch.zeros(2, 256), torch.zeros(2, dtype=torch.int64)
    _imp_reference(ref_state, ref_count, x, None, 1, AGGREGATIONS["mean"], AGGREGATIONS["sum"])
    torch.testing.assert_close(state, ref_state, rtol=2e-5, atol=1e-5)
