// CUDA kernels of the fused importance reduction and of the block-influence metric.
// Launch sequence and data layout: csrc/cuda/importance.cuh. Per-unit math: importance_math.h
// (the same functions the CPU kernels run, so the CPU tests exercise this arithmetic).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "common/importance_math.h"
#include "cuda/importance.cuh"

// Kernel launches go through MINITRON_LAUNCH so that tests/gpu/test_importance_emulated.py can run the
// group_size == 1 path on the CPU (MINITRON_CUDA_EMULATE: every CTA's threads as OS threads, __syncthreads
// as a barrier). Kernel names with template arguments are bound to a pointer first (commas in macros).
#ifdef MINITRON_CUDA_EMULATE
#define MINITRON_LAUNCH(kernel, grid, block, stream, ...) \
  ::minitron_emu::launch(dim3(grid), dim3(block), [&] { kernel(__VA_ARGS__); })
#else
#define MINITRON_LAUNCH(kernel, grid, block, stream, ...) kernel<<<grid, block, 0, stream>>>(__VA_ARGS__)
#endif

namespace minitron {
namespace cuda {
namespace {

namespace imp = ::minitron::importance;

constexpr int kWarps = kImpThreads / 32;

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }

__device__ __forceinline__ unsigned is_nonfinite(float v) { return imp::nonfinite_bits(__float_as_uint(v)) ? 1u : 0u; }

// Adds a thread's count of non-finite values to the 64-bit counter (only threads that saw one: no atomics
// in the common, all-finite case).
__device__ __forceinline__ void add_nonfinite(int64_t* counter, unsigned n) {
  if (n != 0) atomicAdd(reinterpret_cast<unsigned long long*>(counter), static_cast<unsigned long long>(n));
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;
}

// ---------------------------------------------------------------------------------------------
// 1. per-sample mask statistics: stats[b] = counted tokens, stats[B + b] = first counted token (S if none)
// ---------------------------------------------------------------------------------------------
__global__ void __launch_bounds__(kImpThreads) mask_stats_kernel(const uint8_t* __restrict__ mask, int64_t B,
                                                                  int64_t S, int64_t smb, int64_t sms,
                                                                  int64_t* __restrict__ stats) {
  const int64_t b = blockIdx.x;
  long long cnt = 0;
  long long first = S;
  for (int64_t s = threadIdx.x; s < S; s += blockDim.x) {
    if (mask == nullptr || mask[b * smb + s * sms]) {
      ++cnt;
      first = first < s ? first : s;
    }
  }
  __shared__ long long sh_cnt[kImpThreads];
  __shared__ long long sh_first[kImpThreads];
  sh_cnt[threadIdx.x] = cnt;
  sh_first[threadIdx.x] = first;
  __syncthreads();
  for (int off = kImpThreads / 2; off > 0; off >>= 1) {
    if (threadIdx.x < off) {
      sh_cnt[threadIdx.x] += sh_cnt[threadIdx.x + off];
      const long long o = sh_first[threadIdx.x + off];
      if (o < sh_first[threadIdx.x]) sh_first[threadIdx.x] = o;
    }
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    stats[b] = sh_cnt[0];
    stats[B + b] = sh_first[0];
  }
}

struct SeqArgs {
  const void* x;
  int64_t B, S, U, G, sxb, sxs;
  const uint8_t* mask;
  int64_t smb, sms;
  const int64_t* stats;
  float* partial;
  int64_t nch, chunk;
  int64_t* nonfinite;  // &count[1]
};

// ---------------------------------------------------------------------------------------------
// 2a. sequence stage, group_size == 1: a thread owns V = 16 / sizeof(T) consecutive units (one 16-byte
//     load per token when VEC), a warp 32 * V units, the block's warps every kWarps-th token of the chunk
// ---------------------------------------------------------------------------------------------
template <typename T>
struct Vec16 {
  static constexpr int V = 16 / static_cast<int>(sizeof(T));
};

// The V values of one 16-byte word as floats.
__device__ __forceinline__ void unpack16(const uint4& w, float (&out)[4], float) {
  out[0] = __uint_as_float(w.x);
  out[1] = __uint_as_float(w.y);
  out[2] = __uint_as_float(w.z);
  out[3] = __uint_as_float(w.w);
}
__device__ __forceinline__ void unpack16(const uint4& w, float (&out)[8], __nv_bfloat16) {
  const unsigned u[4] = {w.x, w.y, w.z, w.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    out[2 * i] = __uint_as_float(u[i] << 16);
    out[2 * i + 1] = __uint_as_float(u[i] & 0xffff0000u);
  }
}
__device__ __forceinline__ void unpack16(const uint4& w, float (&out)[8], __half) {
  const unsigned u[4] = {w.x, w.y, w.z, w.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    out[2 * i] = __half2float(__ushort_as_half(static_cast<unsigned short>(u[i] & 0xffffu)));
    out[2 * i + 1] = __half2float(__ushort_as_half(static_cast<unsigned short>(u[i] >> 16)));
  }
}

// |x| of the V units [u0, u0 + V) of token row `row` (units >= U read as 0 and not counted).
template <typename T, bool VEC>
__device__ __forceinline__ void load_abs_v(const T* __restrict__ row, int64_t u0, int64_t U,
                                           float (&m)[Vec16<T>::V]) {
  constexpr int V = Vec16<T>::V;
  if (VEC) {
    unpack16(__ldg(reinterpret_cast<const uint4*>(row + u0)), m, T());
#pragma unroll
    for (int v = 0; v < V; ++v) m[v] = fabsf(m[v]);
  } else {
#pragma unroll
    for (int v = 0; v < V; ++v) m[v] = u0 + v < U ? fabsf(to_float(row[u0 + v])) : 0.0f;
  }
}

template <typename T, int AGG, bool VEC>
__global__ void __launch_bounds__(kImpThreads) seq_g1_kernel(SeqArgs p) {
  constexpr int V = Vec16<T>::V;
  constexpr int kUnroll = 4;  // tokens per thread with loads in flight together
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int64_t ub = static_cast<int64_t>(blockIdx.x) * (32 * V);  // first unit of the block
  const int64_t u0 = ub + lane * V;
  const int64_t c = blockIdx.y;
  const int64_t b = blockIdx.z;
  if (p.stats[b] == 0) return;  // uniform over the block
  const T* xb = static_cast<const T*>(p.x) + b * p.sxb;
  const int nv = u0 < p.U ? (p.U - u0 < V ? static_cast<int>(p.U - u0) : V) : 0;  // units of this thread
  float K[V], a1[V], a2[V];
#pragma unroll
  for (int v = 0; v < V; ++v) K[v] = a1[v] = a2[v] = 0.0f;
  unsigned nf = 0;
  if (AGG == imp::kVar && nv > 0) load_abs_v<T, VEC>(xb + p.stats[p.B + b] * p.sxs, u0, p.U, K);
  const int64_t s_begin = c * p.chunk;
  const int64_t s_end = s_begin + p.chunk < p.S ? s_begin + p.chunk : p.S;
  if (nv > 0) {
    for (int64_t s0 = s_begin + warp; s0 < s_end; s0 += kWarps * kUnroll) {
      float m[kUnroll][V];
      bool use[kUnroll];
#pragma unroll
      for (int q = 0; q < kUnroll; ++q) {  // every load first
        const int64_t s = s0 + q * kWarps;
        use[q] = s < s_end && (p.mask == nullptr || p.mask[b * p.smb + s * p.sms]);
        if (use[q]) load_abs_v<T, VEC>(xb + s * p.sxs, u0, p.U, m[q]);
      }
#pragma unroll
      for (int q = 0; q < kUnroll; ++q) {
        if (!use[q]) continue;
#pragma unroll
        for (int v = 0; v < V; ++v) {
          nf += v < nv ? is_nonfinite(m[q][v]) : 0u;
          imp::seq_accumulate<AGG>(m[q][v], K[v], a1[v], a2[v]);
        }
      }
    }
  }
  add_nonfinite(p.nonfinite, nf);
  // combine the warps' accumulators: unit ub + i is finished by thread i (32 * V <= kImpThreads)
  __shared__ float sh1[kWarps][32 * V];
  __shared__ float sh2[kWarps][32 * V];
#pragma unroll
  for (int v = 0; v < V; ++v) {
    sh1[warp][lane * V + v] = a1[v];
    sh2[warp][lane * V + v] = a2[v];
  }
  __syncthreads();
  const int i = threadIdx.x;
  if (i < 32 * V && ub + i < p.U) {
    float r1 = sh1[0][i], r2 = sh2[0][i];
    for (int w = 1; w < kWarps; ++w) imp::seq_combine<AGG>(r1, r2, sh1[w][i], sh2[w][i]);
    float* out = p.partial + ((b * p.nch + c) * 2) * p.U + ub + i;
    out[0] = r1;
    out[p.U] = r2;
  }
}

// Magnitude of unit row `g` (G channels) computed by one warp; every lane gets the result. Each lane adds
// its non-finite channel values to *nf.
template <typename T>
__device__ __forceinline__ float warp_group_magnitude(const T* __restrict__ g, int64_t G, int lane, unsigned* nf) {
  float ss = 0.0f;
  for (int64_t k = lane; k < G; k += 32) {
    const float v = to_float(g[k]);
    *nf += is_nonfinite(v);
    ss = imp::sumsq_step(ss, v);
  }
  return imp::magnitude_from_sumsq(warp_sum(ss));
}

// ---------------------------------------------------------------------------------------------
// 2b. sequence stage, group_size > 1: one unit per block, warp = token phase, lanes = channels
// ---------------------------------------------------------------------------------------------
template <typename T, int AGG>
__global__ void __launch_bounds__(kImpThreads) seq_grouped_kernel(SeqArgs p) {
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int64_t u = blockIdx.x;
  const int64_t c = blockIdx.y;
  const int64_t b = blockIdx.z;
  if (p.stats[b] == 0) return;  // uniform over the block
  const T* xu = static_cast<const T*>(p.x) + b * p.sxb + u * p.G;
  float K = 0.0f, a1 = 0.0f, a2 = 0.0f;
  unsigned nf = 0, nf_shift = 0;  // the shift row is counted where its token is streamed, not here
  if (AGG == imp::kVar) K = warp_group_magnitude(xu + p.stats[p.B + b] * p.sxs, p.G, lane, &nf_shift);
  const int64_t s_begin = c * p.chunk;
  const int64_t s_end = s_begin + p.chunk < p.S ? s_begin + p.chunk : p.S;
  for (int64_t s = s_begin + warp; s < s_end; s += kWarps) {
    if (p.mask != nullptr && !p.mask[b * p.smb + s * p.sms]) continue;  // uniform over the warp
    const float m = warp_group_magnitude(xu + s * p.sxs, p.G, lane, &nf);
    imp::seq_accumulate<AGG>(m, K, a1, a2);
  }
  add_nonfinite(p.nonfinite, nf);
  __shared__ float sh1[kWarps];
  __shared__ float sh2[kWarps];
  if (lane == 0) {
    sh1[warp] = a1;
    sh2[warp] = a2;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    for (int w = 1; w < kWarps; ++w) imp::seq_combine<AGG>(a1, a2, sh1[w], sh2[w]);
    float* out = p.partial + ((b * p.nch + c) * 2) * p.U + u;
    out[0] = a1;
    out[p.U] = a2;
  }
}

// ---------------------------------------------------------------------------------------------
// 3. batch stage: one thread per unit, samples in order
// ---------------------------------------------------------------------------------------------
__global__ void __launch_bounds__(kImpThreads) batch_kernel(const float* __restrict__ partial,
                                                             const int64_t* __restrict__ stats, float* state,
                                                             const int64_t* __restrict__ count, int64_t B,
                                                             int64_t U, int64_t nch, int seq_agg, int batch_agg) {
  const int64_t u = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (u >= U) return;
  float A = state[u], Bs = state[U + u];
  int64_t n = count[0];
  for (int64_t b = 0; b < B; ++b) {
    const int64_t nb = stats[b];
    if (nb == 0) continue;
    const float* pb = partial + (b * nch * 2) * U + u;
    float a1 = pb[0], a2 = pb[U];
    for (int64_t c = 1; c < nch; ++c) {
      if (seq_agg == imp::kMax)
        imp::seq_combine<imp::kMax>(a1, a2, pb[c * 2 * U], pb[c * 2 * U + U]);
      else
        imp::seq_combine<imp::kSum>(a1, a2, pb[c * 2 * U], pb[c * 2 * U + U]);
    }
    const float v = imp::seq_finalize(seq_agg, a1, a2, static_cast<float>(nb));
    imp::batch_update(batch_agg, v, static_cast<float>(n), A, Bs);
    ++n;
  }
  state[u] = A;
  state[U + u] = Bs;
}

// 4. count += samples with a counted token (after the batch stage has read the old count)
__global__ void count_kernel(const int64_t* __restrict__ stats, int64_t B, int64_t* count) {
  if (blockIdx.x == 0 && threadIdx.x == 0) {
    int64_t added = 0;
    for (int64_t b = 0; b < B; ++b) added += stats[b] > 0 ? 1 : 0;
    count[0] += added;
  }
}

template <typename T, int AGG>
void launch_seq(const SeqArgs& s, cudaStream_t stream) {
  const dim3 block(kImpThreads);
  if (s.G == 1) {
    constexpr int64_t per_block = 32 * Vec16<T>::V;
    const dim3 grid(static_cast<unsigned>((s.U + per_block - 1) / per_block), static_cast<unsigned>(s.nch),
                    static_cast<unsigned>(s.B));
    // 16-byte loads: data pointer, row and sample strides 16-byte aligned and whole words of units
    const bool vec = (reinterpret_cast<uintptr_t>(s.x) & 15) == 0 && s.U % Vec16<T>::V == 0 &&
                     (s.sxs * static_cast<int64_t>(sizeof(T))) % 16 == 0 &&
                     (s.sxb * static_cast<int64_t>(sizeof(T))) % 16 == 0;
    constexpr auto kv = &seq_g1_kernel<T, AGG, true>;
    constexpr auto ks = &seq_g1_kernel<T, AGG, false>;
    if (vec)
      MINITRON_LAUNCH(kv, grid, block, stream, s);
    else
      MINITRON_LAUNCH(ks, grid, block, stream, s);
  } else {
    const dim3 grid(static_cast<unsigned>(s.U), static_cast<unsigned>(s.nch), static_cast<unsigned>(s.B));
    constexpr auto kg = &seq_grouped_kernel<T, AGG>;
    MINITRON_LAUNCH(kg, grid, block, stream, s);
  }
}

template <typename T>
void launch_seq_agg(const SeqArgs& s, int agg, cudaStream_t stream) {
  switch (agg) {
    case imp::kMean:
      launch_seq<T, imp::kMean>(s, stream);
      break;
    case imp::kL2:
      launch_seq<T, imp::kL2>(s, stream);
      break;
    case imp::kSum:
      launch_seq<T, imp::kSum>(s, stream);
      break;
    case imp::kMax:
      launch_seq<T, imp::kMax>(s, stream);
      break;
    default:
      launch_seq<T, imp::kVar>(s, stream);
      break;
  }
}

// ---------------------------------------------------------------------------------------------
// block influence: a warp per token (grid-stride over tokens), per-block partials via atomics
// ---------------------------------------------------------------------------------------------
template <typename T>
__global__ void __launch_bounds__(kImpThreads) block_influence_kernel(BlockInfluenceLaunch p) {
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int64_t T_ = p.B * p.S;
  const T* A = static_cast<const T*>(p.a);
  const T* Bp = static_cast<const T*>(p.b);
  float acc = 0.0f;
  long long n = 0;
  unsigned nf = 0;
  for (int64_t t = static_cast<int64_t>(blockIdx.x) * kWarps + warp; t < T_;
       t += static_cast<int64_t>(gridDim.x) * kWarps) {
    const int64_t bi = t / p.S, si = t % p.S;
    if (p.mask != nullptr && !p.mask[bi * p.smb + si * p.sms]) continue;  // uniform over the warp
    const T* ra = A + bi * p.sab + si * p.sas;
    const T* rb = Bp + bi * p.sbb + si * p.sbs;
    float dot = 0.0f, na = 0.0f, nb = 0.0f;
    for (int64_t k = lane; k < p.H; k += 32) {
      const float va = to_float(ra[k]), vb = to_float(rb[k]);
      nf += is_nonfinite(va) + is_nonfinite(vb);
      dot += va * vb;
      na += va * va;
      nb += vb * vb;
    }
    dot = warp_sum(dot);
    na = warp_sum(na);
    nb = warp_sum(nb);
    acc += imp::one_minus_cos(dot, na, nb);
    ++n;
  }
  add_nonfinite(p.count + p.num_layers + p.layer, nf);
  __shared__ float sh_acc[kWarps];
  __shared__ long long sh_n[kWarps];
  if (lane == 0) {
    sh_acc[warp] = acc;
    sh_n[warp] = n;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    double total = 0.0;
    unsigned long long cnt = 0;
    for (int w = 0; w < kWarps; ++w) {
      total += static_cast<double>(sh_acc[w]);
      cnt += static_cast<unsigned long long>(sh_n[w]);
    }
    if (cnt > 0) {
      atomicAdd(p.state + p.layer, total);
      atomicAdd(reinterpret_cast<unsigned long long*>(p.count + p.layer), cnt);
    }
  }
}

}  // namespace

cudaError_t importance_update(const ImportanceLaunch& a, cudaStream_t stream) {
  if (a.B == 0 || a.S == 0 || a.U == 0) return cudaSuccess;
  if (a.B > kMaxGridYZ || a.nch > kMaxGridYZ || a.nch < 1 || a.G < 1) return cudaErrorInvalidValue;
  MINITRON_LAUNCH(mask_stats_kernel, static_cast<unsigned>(a.B), kImpThreads, stream, a.mask, a.B, a.S, a.smb,
                  a.sms, a.stats);
  SeqArgs s{a.x,   a.B,   a.S,     a.U,       a.G,   a.sxb,   a.sxs,      a.mask,
            a.smb, a.sms, a.stats, a.partial, a.nch, a.chunk, a.count + 1};
  switch (a.dtype) {
    case kElemBF16:
      launch_seq_agg<__nv_bfloat16>(s, a.seq_agg, stream);
      break;
    case kElemF16:
      launch_seq_agg<__half>(s, a.seq_agg, stream);
      break;
    case kElemF32:
      launch_seq_agg<float>(s, a.seq_agg, stream);
      break;
    default:
      return cudaErrorInvalidValue;
  }
  const unsigned ublocks = static_cast<unsigned>((a.U + kImpThreads - 1) / kImpThreads);
  MINITRON_LAUNCH(batch_kernel, ublocks, kImpThreads, stream, a.partial, a.stats, a.state, a.count, a.B, a.U, a.nch,
                                                    a.seq_agg, a.batch_agg);
  MINITRON_LAUNCH(count_kernel, 1, 32, stream, a.stats, a.B, a.count);
  return cudaGetLastError();
}

cudaError_t block_influence_update(const BlockInfluenceLaunch& a, cudaStream_t stream) {
  const int64_t T = a.B * a.S;
  if (T == 0) return cudaSuccess;
  int64_t blocks = (T + kWarps - 1) / kWarps;
  const int64_t most = 8 * static_cast<int64_t>(a.num_sms > 0 ? a.num_sms : 1);
  blocks = blocks < most ? blocks : most;
  switch (a.dtype) {
    case kElemBF16:
      MINITRON_LAUNCH(block_influence_kernel<__nv_bfloat16>, static_cast<unsigned>(blocks), kImpThreads, stream, a);
      break;
    case kElemF16:
      MINITRON_LAUNCH(block_influence_kernel<__half>, static_cast<unsigned>(blocks), kImpThreads, stream, a);
      break;
    case kElemF32:
      MINITRON_LAUNCH(block_influence_kernel<float>, static_cast<unsigned>(blocks), kImpThreads, stream, a);
      break;
    default:
      return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace minitron
