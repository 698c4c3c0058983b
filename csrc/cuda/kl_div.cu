// Fused KL divergence (forward KL, reverse KL, generalised JSD) over large vocabularies: CUDA kernel.
//
// Same op as csrc/cpu/kl_div.cpp, same per-element and per-row arithmetic (csrc/common/kl_math.h):
//   - each thread feeds its strided share of a row to kl_state_update (online softmax of both inputs
//     plus the forward/reverse cross sum), the block merges the per-thread states with kl_state_merge
//     (warp shuffles, then one warp over the per-warp states), every thread finalises the same row;
//   - a second pass over the row (L2-hot) writes the gradient; JSD first reduces sum_j Q_j g_j and the
//     loss (block sum) and writes the gradient in a third pass.
// Large N: one block per row (kl_fused_kernel). Small N: each row is split over `splits` blocks; the
// per-segment states go through a workspace and a second kernel (kl_split_grad_kernel) merges them,
// in the same order in every block, before writing its segment (JSD: a third kernel).
// fp32 / bf16 / fp16 inputs are converted to fp32 when loaded (16-byte vector loads when the rows are
// aligned) and the gradient is rounded to nearest even into the input dtype.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "common/kl_math.h"
#include "cuda/kl_div.cuh"
#include "cuda/elem_convert.cuh"

namespace minitron {
namespace cuda {
namespace {

using kl::JsdConsts;
using kl::JsdPartial;
using kl::KlRow;
using kl::KlState;
using kl::kForward;
using kl::kJsd;
using kl::kReverse;
using kl::StdMath;

constexpr int kBlock = 512;
constexpr int kWarps = kBlock / 32;
constexpr int64_t kSplitMinSegment = 4096;  // entries per block at least, when rows are split
constexpr int kMaxSplits = 256;

// ------------------------------------------------------------------------------------------------
// element conversion: cuda/elem_convert.cuh
// ------------------------------------------------------------------------------------------------

// 16 bytes of elements, for vector loads/stores.
template <class T>
struct alignas(16) Pack {
  static constexpr int kN = 16 / static_cast<int>(sizeof(T));
  T x[kN];
};

__device__ __forceinline__ bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

// f(a_i, b_i) for every i in [c0, c1) of a row, the block's threads striding over it; a = s * inv_t,
// b = t * inv_t. vec: s + c0 and t + c0 are 16-byte aligned.
template <class T, class F>
__device__ __forceinline__ void for_each(const T* __restrict__ s, const T* __restrict__ t, int64_t c0, int64_t c1,
                                         float it, bool vec, F&& f) {
  constexpr int kN = Pack<T>::kN;
  int64_t i0 = c0;
  if (vec) {
    const int64_t nvec = (c1 - c0) / kN;
    for (int64_t j = threadIdx.x; j < nvec; j += kBlock) {
      const int64_t i = c0 + j * kN;
      const Pack<T> ps = *reinterpret_cast<const Pack<T>*>(s + i);
      const Pack<T> pt = *reinterpret_cast<const Pack<T>*>(t + i);
#pragma unroll
      for (int u = 0; u < kN; ++u) f(to_float(ps.x[u]) * it, to_float(pt.x[u]) * it);
    }
    i0 = c0 + nvec * kN;
  }
  for (int64_t i = i0 + threadIdx.x; i < c1; i += kBlock) f(to_float(s[i]) * it, to_float(t[i]) * it);
}

// g_i = f(a_i, b_i) for every i in [c0, c1). vec: s + c0, t + c0 and g + c0 are 16-byte aligned.
template <class T, class F>
__device__ __forceinline__ void map_row(const T* __restrict__ s, const T* __restrict__ t, T* __restrict__ g,
                                        int64_t c0, int64_t c1, float it, bool vec, F&& f) {
  constexpr int kN = Pack<T>::kN;
  int64_t i0 = c0;
  if (vec) {
    const int64_t nvec = (c1 - c0) / kN;
    for (int64_t j = threadIdx.x; j < nvec; j += kBlock) {
      const int64_t i = c0 + j * kN;
      const Pack<T> ps = *reinterpret_cast<const Pack<T>*>(s + i);
      const Pack<T> pt = *reinterpret_cast<const Pack<T>*>(t + i);
      Pack<T> pg;
#pragma unroll
      for (int u = 0; u < kN; ++u) pg.x[u] = from_float<T>(f(to_float(ps.x[u]) * it, to_float(pt.x[u]) * it));
      *reinterpret_cast<Pack<T>*>(g + i) = pg;
    }
    i0 = c0 + nvec * kN;
  }
  for (int64_t i = i0 + threadIdx.x; i < c1; i += kBlock) {
    g[i] = from_float<T>(f(to_float(s[i]) * it, to_float(t[i]) * it));
  }
}

template <class T>
__device__ __forceinline__ void zero_fill(T* g, int64_t c0, int64_t c1) {
  const T z = from_float<T>(0.f);
  for (int64_t i = c0 + threadIdx.x; i < c1; i += kBlock) g[i] = z;
}

// ------------------------------------------------------------------------------------------------
// block reductions (every thread returns the same value)
// ------------------------------------------------------------------------------------------------
template <int MODE>
__device__ __forceinline__ KlState warp_merge(KlState st) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    KlState o;
    o.ma = __shfl_xor_sync(0xffffffffu, st.ma, off);
    o.sa = __shfl_xor_sync(0xffffffffu, st.sa, off);
    o.mb = __shfl_xor_sync(0xffffffffu, st.mb, off);
    o.sb = __shfl_xor_sync(0xffffffffu, st.sb, off);
    o.c = __shfl_xor_sync(0xffffffffu, st.c, off);
    st = kl::kl_state_merge<MODE, StdMath>(st, o);  // lanes may differ by rounding: lane 0's is used
  }
  return st;
}

template <int MODE>
__device__ __forceinline__ KlState block_merge(KlState st, KlState* smem) {
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  st = warp_merge<MODE>(st);
  if (lane == 0) smem[warp] = st;
  __syncthreads();
  if (warp == 0) {
    KlState x = lane < kWarps ? smem[lane] : kl::kl_state_init();
    x = warp_merge<MODE>(x);
    if (lane == 0) smem[0] = x;
  }
  __syncthreads();
  st = smem[0];
  __syncthreads();  // smem may be reused
  return st;
}

__device__ __forceinline__ JsdPartial block_sum(JsdPartial v, JsdPartial* smem) {
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    v.loss += __shfl_xor_sync(0xffffffffu, v.loss, off);
    v.qg += __shfl_xor_sync(0xffffffffu, v.qg, off);
    v.q += __shfl_xor_sync(0xffffffffu, v.q, off);
  }
  if (lane == 0) smem[warp] = v;
  __syncthreads();
  if (warp == 0) {
    JsdPartial x = lane < kWarps ? smem[lane] : JsdPartial{0.f, 0.0, 0.0};
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) {
      x.loss += __shfl_xor_sync(0xffffffffu, x.loss, off);
      x.qg += __shfl_xor_sync(0xffffffffu, x.qg, off);
      x.q += __shfl_xor_sync(0xffffffffu, x.q, off);
    }
    if (lane == 0) smem[0] = x;
  }
  __syncthreads();
  v = smem[0];
  __syncthreads();
  return v;
}

// ------------------------------------------------------------------------------------------------
// per-row pieces shared by the fused and the split kernels
// ------------------------------------------------------------------------------------------------
template <class T, int MODE>
__device__ __forceinline__ KlState segment_state(const T* s, const T* t, int64_t c0, int64_t c1, float it, bool vec) {
  KlState st = kl::kl_state_init();
  for_each(s, t, c0, c1, it, vec, [&](float a, float b) { kl::kl_state_update<MODE, StdMath>(st, a, b); });
  return st;
}

// forward / reverse gradient of [c0, c1)
template <class T, int MODE>
__device__ __forceinline__ void segment_grad(const T* s, const T* t, T* g, int64_t c0, int64_t c1, float it, bool vec,
                                             const KlRow& row, float coef) {
  const float lr0 = row.lse_diff;
  map_row(s, t, g, c0, c1, it, vec, [&](float a, float b) {
    const float q = kl::kl_prob<StdMath>(a, row.lse_a);
    if (MODE == kForward) return kl::kl_forward_grad(q, kl::kl_prob<StdMath>(b, row.lse_b), coef);
    return kl::kl_reverse_grad(q, (a - b) - lr0, row.div, coef);
  });
}

template <class T>
__device__ __forceinline__ JsdPartial segment_jsd_sums(const T* s, const T* t, int64_t c0, int64_t c1, float it,
                                                       bool vec, const KlRow& row, const JsdConsts& k) {
  const float d0 = row.lse_diff;
  JsdPartial acc{0.f, 0.0, 0.0};
  for_each(s, t, c0, c1, it, vec, [&](float a, float b) {
    const float q = kl::kl_prob<StdMath>(a, row.lse_a);
    const float p = kl::kl_prob<StdMath>(b, row.lse_b);
    float loss, gk;
    kl::jsd_element<StdMath>(p, q, (b - a) + d0, k, loss, gk);
    acc.loss += loss;
    acc.qg += static_cast<double>(q) * static_cast<double>(gk);  // exact product, double sum (kl_math.h)
    acc.q += static_cast<double>(q);
  });
  return acc;
}

template <class T>
__device__ __forceinline__ void segment_jsd_grad(const T* s, const T* t, T* g, int64_t c0, int64_t c1, float it,
                                                 bool vec, const KlRow& row, const JsdConsts& k,
                                                 const kl::JsdCentre& centre, float coef) {
  const float d0 = row.lse_diff;
  map_row(s, t, g, c0, c1, it, vec, [&](float a, float b) {
    const float q = kl::kl_prob<StdMath>(a, row.lse_a);
    const float p = kl::kl_prob<StdMath>(b, row.lse_b);
    float loss, gk;
    kl::jsd_element<StdMath>(p, q, (b - a) + d0, k, loss, gk);
    return kl::jsd_grad(q, gk, centre, coef);
  });
}

template <class T>
__device__ __forceinline__ void row_ptrs(const KlDivArgs& a, int64_t row, const T*& s, const T*& t, T*& g) {
  s = static_cast<const T*>(a.student) + row * a.student_stride;
  t = static_cast<const T*>(a.teacher) + row * a.teacher_stride;
  g = a.grad != nullptr ? static_cast<T*>(a.grad) + row * a.v : nullptr;  // null: loss only
}

// 16-byte alignment of the gradient row (a loss-only call has none to write)
template <class T>
__device__ __forceinline__ bool grad_aligned16(const T* g) {
  return g == nullptr || aligned16(g);
}

// ------------------------------------------------------------------------------------------------
// kernels
// ------------------------------------------------------------------------------------------------

// One block per row.
template <class T, int MODE>
__global__ void __launch_bounds__(kBlock) kl_fused_kernel(const KlDivArgs a, const JsdConsts k) {
  __shared__ KlState sm_state[kWarps];
  __shared__ JsdPartial sm_sum[kWarps];
  const int64_t row = blockIdx.x;
  const T* s;
  const T* t;
  T* g;
  row_ptrs(a, row, s, t, g);
  const float w = a.weight[row];
  if (w == 0.f) {  // skipped row (uniform branch): loss 0, zero gradient, inputs not read
    if (g != nullptr) zero_fill(g, 0, a.v);
    if (threadIdx.x == 0) a.loss[row] = 0.f;
    return;
  }
  const bool vec = aligned16(s) && aligned16(t) && grad_aligned16(g);
  const float it = a.inv_temperature;
  const KlState st = block_merge<MODE>(segment_state<T, MODE>(s, t, 0, a.v, it, vec), sm_state);
  const KlRow row_stats = kl::kl_finalize<MODE, StdMath>(st);
  if (row_stats.empty) {  // all -inf teacher (uniform branch): like a masked token (kl_math.h)
    if (g != nullptr) zero_fill(g, 0, a.v);
    if (threadIdx.x == 0) a.loss[row] = 0.f;
    return;
  }
  const float ws = w * a.scale;
  const float coef = ws * it;
  if (MODE != kJsd) {
    if (threadIdx.x == 0) a.loss[row] = ws * row_stats.div;
    if (g != nullptr) segment_grad<T, MODE>(s, t, g, 0, a.v, it, vec, row_stats, coef);
  } else {
    const JsdPartial tot = block_sum(segment_jsd_sums(s, t, 0, a.v, it, vec, row_stats, k), sm_sum);
    if (threadIdx.x == 0) a.loss[row] = ws * tot.loss;
    if (g != nullptr) segment_jsd_grad(s, t, g, 0, a.v, it, vec, row_stats, k, kl::jsd_centre(tot.qg, tot.q), coef);
  }
}

// Split rows, step 1: the online-softmax state of segment blockIdx.x of row blockIdx.y.
template <class T, int MODE>
__global__ void __launch_bounds__(kBlock) kl_split_stats_kernel(const KlDivArgs a, int splits, int64_t seg,
                                                                 KlState* __restrict__ states) {
  __shared__ KlState sm_state[kWarps];
  const int64_t row = blockIdx.y;
  const int64_t c0 = blockIdx.x * seg;
  const int64_t c1 = c0 + seg < a.v ? c0 + seg : a.v;
  if (a.weight[row] == 0.f) return;
  const T* s;
  const T* t;
  T* g;
  row_ptrs(a, row, s, t, g);
  const bool vec = aligned16(s + c0) && aligned16(t + c0);
  const KlState st = block_merge<MODE>(segment_state<T, MODE>(s, t, c0, c1, a.inv_temperature, vec), sm_state);
  if (threadIdx.x == 0) states[row * splits + blockIdx.x] = st;
}

// The row's state: the segment states merged in segment order (identical in every block).
template <int MODE>
__device__ __forceinline__ KlRow merged_row(const KlState* states, int64_t row, int splits) {
  KlState st = kl::kl_state_init();
  for (int j = 0; j < splits; ++j) st = kl::kl_state_merge<MODE, StdMath>(st, states[row * splits + j]);
  return kl::kl_finalize<MODE, StdMath>(st);
}

// Split rows, step 2: forward/reverse: loss and the segment's gradient; JSD: the segment's sums.
template <class T, int MODE>
__global__ void __launch_bounds__(kBlock) kl_split_grad_kernel(const KlDivArgs a, const JsdConsts k, int splits,
                                                                int64_t seg, const KlState* __restrict__ states,
                                                                JsdPartial* __restrict__ sums) {
  __shared__ JsdPartial sm_sum[kWarps];
  const int64_t row = blockIdx.y;
  const int64_t c0 = blockIdx.x * seg;
  const int64_t c1 = c0 + seg < a.v ? c0 + seg : a.v;
  const T* s;
  const T* t;
  T* g;
  row_ptrs(a, row, s, t, g);
  const float w = a.weight[row];
  if (w == 0.f) {
    if (g != nullptr) zero_fill(g, c0, c1);
    if (blockIdx.x == 0 && threadIdx.x == 0) a.loss[row] = 0.f;
    return;
  }
  const bool vec = aligned16(s + c0) && aligned16(t + c0) && (g == nullptr || aligned16(g + c0));
  const float it = a.inv_temperature;
  const KlRow row_stats = merged_row<MODE>(states, row, splits);
  if (row_stats.empty) {  // all -inf teacher: like a masked token (kl_math.h)
    if (g != nullptr) zero_fill(g, c0, c1);
    if (blockIdx.x == 0 && threadIdx.x == 0) a.loss[row] = 0.f;
    return;
  }
  const float ws = w * a.scale;
  if (MODE != kJsd) {
    if (blockIdx.x == 0 && threadIdx.x == 0) a.loss[row] = ws * row_stats.div;
    if (g != nullptr) segment_grad<T, MODE>(s, t, g, c0, c1, it, vec, row_stats, ws * it);
  } else {
    const JsdPartial part = block_sum(segment_jsd_sums(s, t, c0, c1, it, vec, row_stats, k), sm_sum);
    if (threadIdx.x == 0) sums[row * splits + blockIdx.x] = part;
  }
}

// Split rows, step 3 (JSD): loss and the segment's gradient.
template <class T>
__global__ void __launch_bounds__(kBlock) kl_split_jsd_grad_kernel(const KlDivArgs a, const JsdConsts k, int splits,
                                                                    int64_t seg, const KlState* __restrict__ states,
                                                                    const JsdPartial* __restrict__ sums) {
  const int64_t row = blockIdx.y;
  const int64_t c0 = blockIdx.x * seg;
  const int64_t c1 = c0 + seg < a.v ? c0 + seg : a.v;
  const float w = a.weight[row];
  if (w == 0.f) return;  // zeroed by step 2
  const T* s;
  const T* t;
  T* g;
  row_ptrs(a, row, s, t, g);
  const bool vec = aligned16(s + c0) && aligned16(t + c0) && (g == nullptr || aligned16(g + c0));
  const KlRow row_stats = merged_row<kJsd>(states, row, splits);
  if (row_stats.empty) return;  // zeroed by step 2
  JsdPartial tot{0.f, 0.0, 0.0};
  for (int j = 0; j < splits; ++j) {
    tot.loss += sums[row * splits + j].loss;
    tot.qg += sums[row * splits + j].qg;
    tot.q += sums[row * splits + j].q;
  }
  const float ws = w * a.scale;
  if (blockIdx.x == 0 && threadIdx.x == 0) a.loss[row] = ws * tot.loss;
  if (g != nullptr) {
    segment_jsd_grad(s, t, g, c0, c1, a.inv_temperature, vec, row_stats, k, kl::jsd_centre(tot.qg, tot.q),
                     ws * a.inv_temperature);
  }
}


// ------------------------------------------------------------------------------------------------
// vocab-parallel pieces (one block per row of one rank's [n, v_local] slice; see kl_div.cuh)
// ------------------------------------------------------------------------------------------------
__device__ __forceinline__ KlState state_at(const float* __restrict__ stats, int64_t row) {
  const float* p = stats + row * 5;
  KlState st;
  st.ma = p[0];
  st.sa = p[1];
  st.mb = p[2];
  st.sb = p[3];
  st.c = p[4];
  return st;
}

template <class T, int MODE>
__global__ void __launch_bounds__(kBlock) kl_vp_stats_kernel(const KlDivArgs a, float* __restrict__ out) {
  __shared__ KlState sm_state[kWarps];
  const int64_t row = blockIdx.x;
  KlState st = kl::kl_state_init();
  if (a.weight[row] != 0.f) {  // uniform branch
    const T* s;
    const T* t;
    T* g;
    row_ptrs(a, row, s, t, g);
    const bool vec = aligned16(s) && aligned16(t);
    st = block_merge<MODE>(segment_state<T, MODE>(s, t, 0, a.v, a.inv_temperature, vec), sm_state);
  }
  if (threadIdx.x == 0) {
    float* o = out + row * 5;
    o[0] = st.ma;
    o[1] = st.sa;
    o[2] = st.mb;
    o[3] = st.sb;
    o[4] = st.c;
  }
}

template <class T>
__global__ void __launch_bounds__(kBlock) kl_vp_jsd_sums_kernel(const KlDivArgs a, const JsdConsts k,
                                                                 const float* __restrict__ stats,
                                                                 double* __restrict__ out) {
  __shared__ JsdPartial sm_sum[kWarps];
  const int64_t row = blockIdx.x;
  const KlRow row_stats = kl::kl_finalize<kJsd, StdMath>(state_at(stats, row));
  JsdPartial tot{0.f, 0.0, 0.0};
  if (a.weight[row] != 0.f && !row_stats.empty) {  // uniform branch
    const T* s;
    const T* t;
    T* g;
    row_ptrs(a, row, s, t, g);
    const bool vec = aligned16(s) && aligned16(t);
    tot = block_sum(segment_jsd_sums(s, t, 0, a.v, a.inv_temperature, vec, row_stats, k), sm_sum);
  }
  if (threadIdx.x == 0) {
    out[row * 3] = tot.loss;
    out[row * 3 + 1] = tot.qg;
    out[row * 3 + 2] = tot.q;
  }
}

template <class T, int MODE>
__global__ void __launch_bounds__(kBlock) kl_vp_fwd_kernel(const KlDivArgs a, const JsdConsts k,
                                                            const float* __restrict__ stats,
                                                            const double* __restrict__ sums) {
  const int64_t row = blockIdx.x;
  const T* s;
  const T* t;
  T* g;
  row_ptrs(a, row, s, t, g);
  const float w = a.weight[row];
  const KlRow row_stats = kl::kl_finalize<MODE, StdMath>(state_at(stats, row));
  if (w == 0.f || row_stats.empty) {  // skipped row / all -inf teacher (uniform branch)
    if (g != nullptr) zero_fill(g, 0, a.v);
    if (threadIdx.x == 0) a.loss[row] = 0.f;
    return;
  }
  const bool vec = aligned16(s) && aligned16(t) && grad_aligned16(g);
  const float it = a.inv_temperature;
  const float ws = w * a.scale;
  if (MODE != kJsd) {
    if (threadIdx.x == 0) a.loss[row] = ws * row_stats.div;
    if (g != nullptr) segment_grad<T, MODE>(s, t, g, 0, a.v, it, vec, row_stats, ws * it);
  } else {
    const double* sm = sums + row * 3;
    if (threadIdx.x == 0) a.loss[row] = isnan(row_stats.lse_a) ? row_stats.lse_a : ws * static_cast<float>(sm[0]);
    if (g != nullptr) segment_jsd_grad(s, t, g, 0, a.v, it, vec, row_stats, k, kl::jsd_centre(sm[1], sm[2]), ws * it);
  }
}

// ------------------------------------------------------------------------------------------------
// host side
// ------------------------------------------------------------------------------------------------
struct Plan {
  int splits;   // blocks per row
  int64_t seg;  // entries per block (multiple of 8: keeps 16-byte alignment of segment starts)
};

Plan plan_for(int64_t n, int64_t v, int sm_count) {
  Plan p{1, v};
  const int64_t target = 2 * static_cast<int64_t>(sm_count > 0 ? sm_count : 1);
  if (n <= 0 || n >= target || v < 2 * kSplitMinSegment || n > 65535) return p;
  int64_t splits = (target + n - 1) / n;
  const int64_t by_size = v / kSplitMinSegment;
  if (splits > by_size) splits = by_size;
  if (splits > kMaxSplits) splits = kMaxSplits;
  if (splits < 2) return p;
  int64_t seg = (v + splits - 1) / splits;
  seg = (seg + 7) / 8 * 8;
  splits = (v + seg - 1) / seg;
  p.splits = static_cast<int>(splits);
  p.seg = seg;
  return p;
}

// Workspace layout: the segment states, then (at an offset aligned for the doubles in JsdPartial) the sums.
size_t sums_offset(const Plan& p, int64_t n) {
  const size_t states = static_cast<size_t>(n) * static_cast<size_t>(p.splits) * sizeof(KlState);
  return (states + 15) / 16 * 16;
}

size_t workspace_for(const Plan& p, int64_t n) {
  if (p.splits <= 1) return 0;
  return sums_offset(p, n) + static_cast<size_t>(n) * static_cast<size_t>(p.splits) * sizeof(JsdPartial);
}

template <class T, int MODE>
cudaError_t launch(const KlDivArgs& a, const JsdConsts& k, const Plan& p, void* workspace, cudaStream_t stream) {
  if (p.splits <= 1) {
    kl_fused_kernel<T, MODE><<<static_cast<unsigned>(a.n), kBlock, 0, stream>>>(a, k);
    return cudaGetLastError();
  }
  KlState* states = static_cast<KlState*>(workspace);
  JsdPartial* sums = reinterpret_cast<JsdPartial*>(static_cast<char*>(workspace) + sums_offset(p, a.n));
  const dim3 grid(static_cast<unsigned>(p.splits), static_cast<unsigned>(a.n));
  kl_split_stats_kernel<T, MODE><<<grid, kBlock, 0, stream>>>(a, p.splits, p.seg, states);
  kl_split_grad_kernel<T, MODE><<<grid, kBlock, 0, stream>>>(a, k, p.splits, p.seg, states, sums);
  if (MODE == kJsd) kl_split_jsd_grad_kernel<T><<<grid, kBlock, 0, stream>>>(a, k, p.splits, p.seg, states, sums);
  return cudaGetLastError();
}

template <class T>
cudaError_t launch_mode(const KlDivArgs& a, int mode, const JsdConsts& k, const Plan& p, void* workspace,
                        cudaStream_t stream) {
  switch (mode) {
    case kForward:
      return launch<T, kForward>(a, k, p, workspace, stream);
    case kReverse:
      return launch<T, kReverse>(a, k, p, workspace, stream);
    default:
      return launch<T, kJsd>(a, k, p, workspace, stream);
  }
}

}  // namespace

size_t kl_div_workspace_bytes(int64_t n, int64_t v, int sm_count) {
  return workspace_for(plan_for(n, v, sm_count), n);
}

cudaError_t kl_div_forward(const KlDivArgs& args, void* workspace, size_t workspace_bytes, int sm_count,
                           cudaStream_t stream) {
  if (args.n <= 0) return cudaSuccess;
  if (args.v <= 0 || args.mode < 0 || args.mode > 2 || !(args.inv_temperature > 0.f)) return cudaErrorInvalidValue;
  int mode = args.mode;
  const float beta_f = static_cast<float>(args.beta);  // a beta that rounds to 0 / 1 in float32 is that end
  if (mode == kJsd && beta_f == 0.f) mode = kForward;  // JSD_0 = KL(P || Q) (TRL convention)
  if (mode == kJsd && beta_f == 1.f) mode = kReverse;  // JSD_1 = KL(Q || P)
  if (mode == kJsd && !(beta_f > 0.f && beta_f < 1.f)) return cudaErrorInvalidValue;
  const Plan p = plan_for(args.n, args.v, sm_count);
  if (workspace_bytes < workspace_for(p, args.n) || (p.splits > 1 && workspace == nullptr)) {
    return cudaErrorInvalidValue;
  }
  const JsdConsts k = kl::jsd_consts(mode == kJsd ? args.beta : 0.5);
  switch (args.dtype) {
    case KlDtype::kFloat32:
      return launch_mode<float>(args, mode, k, p, workspace, stream);
    case KlDtype::kBFloat16:
      return launch_mode<__nv_bfloat16>(args, mode, k, p, workspace, stream);
    case KlDtype::kFloat16:
      return launch_mode<__half>(args, mode, k, p, workspace, stream);
  }
  return cudaErrorInvalidValue;
}

namespace {

// The effective mode (a JSD beta that rounds to 0 / 1 in float32 is forward / reverse KL); -1 when invalid.
int vp_mode(const KlDivArgs& a) {
  if (a.v <= 0 || a.mode < 0 || a.mode > 2 || !(a.inv_temperature > 0.f)) return -1;
  int mode = a.mode;
  const float beta_f = static_cast<float>(a.beta);
  if (mode == kJsd && beta_f == 0.f) mode = kForward;
  if (mode == kJsd && beta_f == 1.f) mode = kReverse;
  if (mode == kJsd && !(beta_f > 0.f && beta_f < 1.f)) return -1;
  return mode;
}

template <class T>
cudaError_t vp_stats_t(const KlDivArgs& a, int mode, float* out, cudaStream_t stream) {
  const unsigned grid = static_cast<unsigned>(a.n);
  if (mode == kForward) {
    kl_vp_stats_kernel<T, kForward><<<grid, kBlock, 0, stream>>>(a, out);
  } else if (mode == kReverse) {
    kl_vp_stats_kernel<T, kReverse><<<grid, kBlock, 0, stream>>>(a, out);
  } else {
    kl_vp_stats_kernel<T, kJsd><<<grid, kBlock, 0, stream>>>(a, out);
  }
  return cudaGetLastError();
}

template <class T>
cudaError_t vp_fwd_t(const KlDivArgs& a, int mode, const JsdConsts& k, const float* stats, const double* sums,
                     cudaStream_t stream) {
  const unsigned grid = static_cast<unsigned>(a.n);
  if (mode == kForward) {
    kl_vp_fwd_kernel<T, kForward><<<grid, kBlock, 0, stream>>>(a, k, stats, sums);
  } else if (mode == kReverse) {
    kl_vp_fwd_kernel<T, kReverse><<<grid, kBlock, 0, stream>>>(a, k, stats, sums);
  } else {
    kl_vp_fwd_kernel<T, kJsd><<<grid, kBlock, 0, stream>>>(a, k, stats, sums);
  }
  return cudaGetLastError();
}

}  // namespace

cudaError_t kl_div_vp_stats(const KlDivArgs& args, float* stats_out, cudaStream_t stream) {
  if (args.n <= 0) return cudaSuccess;
  const int mode = vp_mode(args);
  if (mode < 0 || stats_out == nullptr) return cudaErrorInvalidValue;
  switch (args.dtype) {
    case KlDtype::kFloat32:
      return vp_stats_t<float>(args, mode, stats_out, stream);
    case KlDtype::kBFloat16:
      return vp_stats_t<__nv_bfloat16>(args, mode, stats_out, stream);
    case KlDtype::kFloat16:
      return vp_stats_t<__half>(args, mode, stats_out, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t kl_div_vp_jsd_sums(const KlDivArgs& args, const float* stats, double* sums_out, cudaStream_t stream) {
  if (args.n <= 0) return cudaSuccess;
  if (vp_mode(args) != kJsd || stats == nullptr || sums_out == nullptr) return cudaErrorInvalidValue;
  const JsdConsts k = kl::jsd_consts(args.beta);
  const unsigned grid = static_cast<unsigned>(args.n);
  switch (args.dtype) {
    case KlDtype::kFloat32:
      kl_vp_jsd_sums_kernel<float><<<grid, kBlock, 0, stream>>>(args, k, stats, sums_out);
      return cudaGetLastError();
    case KlDtype::kBFloat16:
      kl_vp_jsd_sums_kernel<__nv_bfloat16><<<grid, kBlock, 0, stream>>>(args, k, stats, sums_out);
      return cudaGetLastError();
    case KlDtype::kFloat16:
      kl_vp_jsd_sums_kernel<__half><<<grid, kBlock, 0, stream>>>(args, k, stats, sums_out);
      return cudaGetLastError();
  }
  return cudaErrorInvalidValue;
}

cudaError_t kl_div_vp_forward(const KlDivArgs& args, const float* stats, const double* jsd_sums,
                              cudaStream_t stream) {
  if (args.n <= 0) return cudaSuccess;
  const int mode = vp_mode(args);
  if (mode < 0 || stats == nullptr || (mode == kJsd && jsd_sums == nullptr)) return cudaErrorInvalidValue;
  const JsdConsts k = kl::jsd_consts(mode == kJsd ? args.beta : 0.5);
  switch (args.dtype) {
    case KlDtype::kFloat32:
      return vp_fwd_t<float>(args, mode, k, stats, jsd_sums, stream);
    case KlDtype::kBFloat16:
      return vp_fwd_t<__nv_bfloat16>(args, mode, k, stats, jsd_sums, stream);
    case KlDtype::kFloat16:
      return vp_fwd_t<__half>(args, mode, k, stats, jsd_sums, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace minitron
