// CUDA kernels of the grouped (segment) importance reduction. Launch sequence and data layout:
// csrc/cuda/grouped_importance.cuh. Per-unit math: csrc/common/importance_math.h and
// csrc/common/grouped_importance_math.h (the functions the CPU kernel runs).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "common/grouped_importance_math.h"
#include "common/importance_math.h"
#include "cuda/grouped_importance.cuh"

// Launches go through MINITRON_GI_LAUNCH so that tests/gpu/test_grouped_importance_emulated.py can run these
// kernels on the CPU (MINITRON_CUDA_EMULATE: every CTA's threads as OS threads, __syncthreads as a barrier).
#ifdef MINITRON_CUDA_EMULATE
#define MINITRON_GI_LAUNCH(kernel, grid, block, stream, ...) \
  ::minitron_emu::launch(dim3(grid), dim3(block), [&] { kernel(__VA_ARGS__); })
#else
#define MINITRON_GI_LAUNCH(kernel, grid, block, stream, ...) kernel<<<grid, block, 0, stream>>>(__VA_ARGS__)
#endif

namespace minitron {
namespace cuda {
namespace {

namespace imp = ::minitron::importance;
namespace gim = ::minitron::grouped_importance;

__device__ __forceinline__ float gi_to_float(float v) { return v; }
__device__ __forceinline__ float gi_to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float gi_to_float(__half v) { return __half2float(v); }

__device__ __forceinline__ unsigned gi_nonfinite(float v) {
  return imp::nonfinite_bits(__float_as_uint(v)) ? 1u : 0u;
}

// Row weight as float (1 without weights); the dtype switch is uniform over the grid.
__device__ __forceinline__ float gi_weight(const void* w, int wdtype, int64_t swr, int64_t r) {
  if (w == nullptr) return 1.0f;
  if (wdtype == kGiBF16) return __bfloat162float(static_cast<const __nv_bfloat16*>(w)[r * swr]);
  if (wdtype == kGiF16) return __half2float(static_cast<const __half*>(w)[r * swr]);
  return static_cast<const float*>(w)[r * swr];
}

struct GiArgs {
  const void* x;
  int64_t U, G, sxr;
  const void* w;
  int wdtype;
  int64_t swr;
  const int64_t* off;
  int64_t samples, groups;
  float* partial;
  int64_t* count;
};

// ---------------------------------------------------------------------------------------------
// 1a. sequence stage, group_size == 1
// ---------------------------------------------------------------------------------------------
template <typename T, int AGG>
__global__ void __launch_bounds__(kGiThreads) gi_seq_g1_kernel(GiArgs p) {
  constexpr int V = kGiUnitsPerLane;
  const int lane = threadIdx.x & 31;
  const int q = threadIdx.x >> 5;  // row lane
  const int64_t j = blockIdx.x;
  const int64_t ub = static_cast<int64_t>(blockIdx.y) * kGiUnitsPerBlockG1;
  const int64_t r_begin = p.off[j], r_end = p.off[j + 1];
  if (r_end <= r_begin) return;  // empty segment: uniform over the block
  const T* x = static_cast<const T*>(p.x);
  float K[V], a1[V], a2[V];
  bool ok[V];
#pragma unroll
  for (int v = 0; v < V; ++v) {
    ok[v] = ub + lane + 32 * v < p.U;
    K[v] = a1[v] = a2[v] = 0.0f;
  }
  if (AGG == imp::kVar) {
    const float wf = fabsf(gi_weight(p.w, p.wdtype, p.swr, r_begin));
#pragma unroll
    for (int v = 0; v < V; ++v)
      if (ok[v]) K[v] = gim::weighted_abs(fabsf(gi_to_float(x[r_begin * p.sxr + ub + lane + 32 * v])), wf);
  }
  unsigned nf = 0;
  for (int64_t r = r_begin + q; r < r_end; r += kGiRowLanes) {
    const float wr = gi_weight(p.w, p.wdtype, p.swr, r);
    const T* row = x + r * p.sxr + ub + lane;
#pragma unroll
    for (int v = 0; v < V; ++v) {
      if (!ok[v]) continue;
      const float y = gi_to_float(row[32 * v]) * wr;
      nf += gi_nonfinite(y);
      imp::seq_accumulate<AGG>(fabsf(y), K[v], a1[v], a2[v]);
    }
  }
  if (nf != 0)
    atomicAdd(reinterpret_cast<unsigned long long*>(p.count + p.groups + j / p.samples),
              static_cast<unsigned long long>(nf));
  __shared__ float sh1[kGiRowLanes][kGiUnitsPerBlockG1];
  __shared__ float sh2[kGiRowLanes][kGiUnitsPerBlockG1];
#pragma unroll
  for (int v = 0; v < V; ++v) {
    sh1[q][lane + 32 * v] = a1[v];
    sh2[q][lane + 32 * v] = a2[v];
  }
  __syncthreads();
  const int i = threadIdx.x;
  if (i < kGiUnitsPerBlockG1 && ub + i < p.U) {
    float r1 = sh1[0][i], r2 = sh2[0][i];
    for (int w = 1; w < kGiRowLanes; ++w) imp::seq_combine<AGG>(r1, r2, sh1[w][i], sh2[w][i]);
    float* out = p.partial + j * 2 * p.U + ub + i;
    out[0] = r1;
    out[p.U] = r2;
  }
}

// ---------------------------------------------------------------------------------------------
// 1b. sequence stage, group_size > 1: a thread owns one unit (G channels)
// ---------------------------------------------------------------------------------------------
template <typename T>
__device__ __forceinline__ float gi_unit_sumsq(const T* __restrict__ g, int64_t G, float w, unsigned* nf) {
  float ss = 0.0f;
  for (int64_t k = 0; k < G; ++k) {
    const float y = gi_to_float(g[k]) * w;
    if (nf != nullptr) *nf += gi_nonfinite(y);
    ss = imp::sumsq_step(ss, y);
  }
  return ss;
}

template <typename T, int AGG>
__global__ void __launch_bounds__(kGiThreads) gi_seq_grouped_kernel(GiArgs p) {
  const int lane = threadIdx.x & 31;
  const int q = threadIdx.x >> 5;
  const int64_t j = blockIdx.x;
  const int64_t u = static_cast<int64_t>(blockIdx.y) * kGiUnitsPerBlockGrouped + lane;
  const int64_t r_begin = p.off[j], r_end = p.off[j + 1];
  if (r_end <= r_begin) return;
  const T* x = static_cast<const T*>(p.x);
  const bool ok = u < p.U;
  float K = 0.0f, a1 = 0.0f, a2 = 0.0f;
  unsigned nf = 0;
  if (AGG == imp::kVar && ok)
    K = imp::magnitude_from_sumsq(
        gi_unit_sumsq(x + r_begin * p.sxr + u * p.G, p.G, gi_weight(p.w, p.wdtype, p.swr, r_begin), nullptr));
  if (ok) {
    for (int64_t r = r_begin + q; r < r_end; r += kGiRowLanes) {
      const float wr = gi_weight(p.w, p.wdtype, p.swr, r);
      const float m = imp::magnitude_from_sumsq(gi_unit_sumsq(x + r * p.sxr + u * p.G, p.G, wr, &nf));
      imp::seq_accumulate<AGG>(m, K, a1, a2);
    }
  }
  if (nf != 0)
    atomicAdd(reinterpret_cast<unsigned long long*>(p.count + p.groups + j / p.samples),
              static_cast<unsigned long long>(nf));
  __shared__ float sh1[kGiRowLanes][kGiUnitsPerBlockGrouped];
  __shared__ float sh2[kGiRowLanes][kGiUnitsPerBlockGrouped];
  sh1[q][lane] = a1;
  sh2[q][lane] = a2;
  __syncthreads();
  if (threadIdx.x < kGiUnitsPerBlockGrouped && ok) {
    float r1 = sh1[0][lane], r2 = sh2[0][lane];
    for (int w = 1; w < kGiRowLanes; ++w) imp::seq_combine<AGG>(r1, r2, sh1[w][lane], sh2[w][lane]);
    float* out = p.partial + j * 2 * p.U + u;
    out[0] = r1;
    out[p.U] = r2;
  }
}

// ---------------------------------------------------------------------------------------------
// 2. batch stage: one thread per unit of one group, the group's segments in sample order
// ---------------------------------------------------------------------------------------------
__global__ void __launch_bounds__(kGiThreads) gi_batch_kernel(const float* __restrict__ partial,
                                                               const int64_t* __restrict__ off, float* state,
                                                               const int64_t* __restrict__ count, int64_t U,
                                                               int64_t samples, int seq_agg, int batch_agg) {
  const int64_t u = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t g = blockIdx.y;
  if (u >= U) return;
  float* st = state + g * 2 * U;
  float A = st[u], Bs = st[U + u];
  int64_t n = count[g];
  for (int64_t b = 0; b < samples; ++b) {
    const int64_t j = g * samples + b;
    const int64_t rows = off[j + 1] - off[j];
    if (rows <= 0) continue;
    const float* pj = partial + j * 2 * U + u;
    const float v = gim::finalize_segment(seq_agg, pj[0], pj[U], rows);
    gim::fold_segment(batch_agg, v, static_cast<float>(n), A, Bs);
    ++n;
  }
  st[u] = A;
  st[U + u] = Bs;
}

// 3. count[0][g] += non-empty segments, count[2][g] += rows (after the batch stage read count[0])
__global__ void __launch_bounds__(kGiThreads) gi_count_kernel(const int64_t* __restrict__ off, int64_t* count,
                                                               int64_t groups, int64_t samples) {
  const int64_t g = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (g >= groups) return;
  int64_t segs = 0;
  for (int64_t b = 0; b < samples; ++b) segs += off[g * samples + b + 1] > off[g * samples + b] ? 1 : 0;
  count[g] += segs;
  count[2 * groups + g] += off[(g + 1) * samples] - off[g * samples];
}

template <typename T, int AGG>
void gi_launch_seq(const GiArgs& p, int64_t J, cudaStream_t stream) {
  const dim3 block(kGiThreads);
  const dim3 grid(static_cast<unsigned>(J), static_cast<unsigned>(grouped_importance_unit_blocks(p.U, p.G)));
  if (p.G == 1) {
    constexpr auto k = &gi_seq_g1_kernel<T, AGG>;
    MINITRON_GI_LAUNCH(k, grid, block, stream, p);
  } else {
    constexpr auto k = &gi_seq_grouped_kernel<T, AGG>;
    MINITRON_GI_LAUNCH(k, grid, block, stream, p);
  }
}

template <typename T>
void gi_launch_seq_agg(const GiArgs& p, int64_t J, int agg, cudaStream_t stream) {
  switch (agg) {
    case imp::kMean:
      gi_launch_seq<T, imp::kMean>(p, J, stream);
      break;
    case imp::kL2:
      gi_launch_seq<T, imp::kL2>(p, J, stream);
      break;
    case imp::kSum:
      gi_launch_seq<T, imp::kSum>(p, J, stream);
      break;
    case imp::kMax:
      gi_launch_seq<T, imp::kMax>(p, J, stream);
      break;
    default:
      gi_launch_seq<T, imp::kVar>(p, J, stream);
      break;
  }
}

}  // namespace

cudaError_t grouped_importance_update(const GroupedImportanceLaunch& a, cudaStream_t stream) {
  if (a.J <= 0 || a.N <= 0 || a.U <= 0) return cudaSuccess;
  if (a.groups <= 0 || a.samples <= 0 || a.J != a.groups * a.samples || a.groups > kGiMaxGridY ||
      a.J > 0x7fffffffLL || grouped_importance_unit_blocks(a.U, a.G) > kGiMaxGridY)
    return cudaErrorInvalidValue;
  GiArgs p;
  p.x = a.x;
  p.U = a.U;
  p.G = a.G;
  p.sxr = a.sxr;
  p.w = a.w;
  p.wdtype = a.wdtype;
  p.swr = a.swr;
  p.off = a.offsets;
  p.samples = a.samples;
  p.groups = a.groups;
  p.partial = a.partial;
  p.count = a.count;
  if (a.dtype == kGiBF16)
    gi_launch_seq_agg<__nv_bfloat16>(p, a.J, a.seq_agg, stream);
  else if (a.dtype == kGiF16)
    gi_launch_seq_agg<__half>(p, a.J, a.seq_agg, stream);
  else
    gi_launch_seq_agg<float>(p, a.J, a.seq_agg, stream);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  const dim3 bgrid(static_cast<unsigned>((a.U + kGiThreads - 1) / kGiThreads), static_cast<unsigned>(a.groups));
  MINITRON_GI_LAUNCH(gi_batch_kernel, bgrid, dim3(kGiThreads), stream, a.partial, a.offsets, a.state, a.count, a.U,
                     a.samples, a.seq_agg, a.batch_agg);
  err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  const dim3 cgrid(static_cast<unsigned>((a.groups + kGiThreads - 1) / kGiThreads));
  MINITRON_GI_LAUNCH(gi_count_kernel, cgrid, dim3(kGiThreads), stream, a.offsets, a.count, a.groups, a.samples);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace minitron
