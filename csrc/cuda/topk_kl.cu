// Sparse (top-k teacher) KL divergence (+ optional LM cross-entropy) over the full student vocabulary: CUDA
// kernel. Same op and per-row arithmetic as csrc/cpu/topk_kl.cpp (csrc/common/topk_kl_math.h):
//   one block per row; pass 1 block max of a = student * inv_T; pass 2 sum of exp(a - m) over the complement
//   of the row's sorted index set (membership by binary search in the L1-cached indices), plus logsumexp of
//   the raw logits when a CE term runs at T != 1; the O(k) part (topk_row_finish, in double) by one thread;
//   pass 3 writes the gradient c * exp(a - m) (+ CE softmax), then, after a barrier, the k index entries
//   and the label entry.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "common/topk_kl_math.h"
#include "cuda/topk_kl.cuh"
#include "cuda/elem_convert.cuh"

namespace minitron {
namespace cuda {
namespace {

constexpr int kBlock = 256;
constexpr int kWarps = kBlock / 32;


// block-wide max / sum (every thread gets the result)
__device__ float block_max(float x, float* red) {
  for (int o = 16; o > 0; o >>= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, o));
  const int lane = threadIdx.x & 31, wid = threadIdx.x >> 5;
  __syncthreads();
  if (lane == 0) red[wid] = x;
  __syncthreads();
  float r = red[0];
  for (int i = 1; i < kWarps; ++i) r = fmaxf(r, red[i]);
  return r;
}

__device__ double block_sum(double x, double* red) {
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  const int lane = threadIdx.x & 31, wid = threadIdx.x >> 5;
  __syncthreads();
  if (lane == 0) red[wid] = x;
  __syncthreads();
  double r = 0.0;
  for (int i = 0; i < kWarps; ++i) r += red[i];
  return r;
}

// whether j is one of the k sorted indices
__device__ __forceinline__ bool is_member(const int64_t* __restrict__ idx, int64_t k, int64_t j) {
  int64_t lo = 0, hi = k;
  while (lo < hi) {
    const int64_t mid = (lo + hi) >> 1;
    if (__ldg(idx + mid) < j) {
      lo = mid + 1;
    } else {
      hi = mid;
    }
  }
  return lo < k && __ldg(idx + lo) == j;
}

struct RowShared {
  float c, cc, lse1, kc, m;
};

template <class T>
__global__ void __launch_bounds__(kBlock) topk_kl_kernel(TopkKlArgs a, float* __restrict__ ws) {
  __shared__ float redf[kWarps];
  __shared__ double redd[kWarps];
  __shared__ RowShared sh;
  const int64_t row = blockIdx.x;
  const int64_t v = a.v, k = a.k;
  const float w = a.weight[row];
  const float cw = a.labels != nullptr ? a.ce_weight[row] : 0.f;
  T* g = a.grad != nullptr ? static_cast<T*>(a.grad) + row * v : nullptr;
  if (w == 0.f && cw == 0.f) {
    if (threadIdx.x == 0) a.loss[row] = 0.f;
    if (g != nullptr)
      for (int64_t j = threadIdx.x; j < v; j += kBlock) g[j] = from_float<T>(0.f);
    return;
  }
  const T* __restrict__ z = static_cast<const T*>(a.student) + row * a.student_stride;
  const int64_t* __restrict__ idx = a.indices + row * k;
  const float* __restrict__ lp = a.logprobs + row * k;
  float* ak = ws + row * 2 * k;
  float* gidx = ak + k;
  const float it = a.inv_temperature;
  const bool same_t = it == 1.f;
  const bool ce = cw != 0.f;

  float mx = -INFINITY;
  for (int64_t j = threadIdx.x; j < v; j += kBlock) mx = fmaxf(mx, to_float(z[j]));
  const float zmax = block_max(mx, redf);
  const float m = zmax * it;
  float ts = 0.f, s1 = 0.f;
  for (int64_t j = threadIdx.x; j < v; j += kBlock) {
    const float x = to_float(z[j]);
    if (!is_member(idx, k, j)) ts += __expf(x * it - m);
    if (ce && !same_t) s1 += __expf(x - zmax);
  }
  const double tail_sum = block_sum(static_cast<double>(ts), redd);
  const double sum1 = (ce && !same_t) ? block_sum(static_cast<double>(s1), redd) : 0.0;
  for (int64_t t = threadIdx.x; t < k; t += kBlock) ak[t] = to_float(z[idx[t]]) * it;
  __syncthreads();
  if (threadIdx.x == 0) {
    const topk::TopkRow r = topk::topk_row_finish(lp, ak, k, v, m, tail_sum, a.tail, gidx);
    double loss = w != 0.f ? static_cast<double>(w) * r.loss : 0.0;
    float lse1 = 0.f;
    if (ce) {
      const double l1 = same_t ? static_cast<double>(m) + r.log_total : static_cast<double>(zmax) + log(sum1);
      lse1 = static_cast<float>(l1);
      loss += static_cast<double>(cw) * (l1 - static_cast<double>(to_float(z[a.labels[row]])));
    }
    a.loss[row] = static_cast<float>(loss);
    sh.kc = w * it;
    sh.c = sh.kc * static_cast<float>(r.rest_coef);
    sh.cc = cw;
    if (ce && same_t) {
      sh.c += cw * static_cast<float>(exp(-r.log_total));
      sh.cc = 0.f;
    }
    sh.lse1 = lse1;
    sh.m = m;
  }
  __syncthreads();
  if (g == nullptr) return;
  const RowShared s = sh;
  for (int64_t j = threadIdx.x; j < v; j += kBlock) {
    const float x = to_float(z[j]);
    float gv = s.c * __expf(x * it - s.m);
    if (s.cc != 0.f) gv += s.cc * __expf(x - s.lse1);
    g[j] = from_float<T>(gv);
  }
  __syncthreads();  // the index entries below overwrite values written by other threads
  for (int64_t t = threadIdx.x; t < k; t += kBlock) {
    float gv = s.kc * gidx[t];
    if (ce) gv += cw * __expf(to_float(z[idx[t]]) - s.lse1);
    g[idx[t]] = from_float<T>(gv);
  }
  __syncthreads();
  if (threadIdx.x == 0 && ce) {
    const int64_t lab = a.labels[row];
    g[lab] = from_float<T>(to_float(g[lab]) - cw);
  }
}

}  // namespace

size_t topk_kl_workspace_bytes(int64_t n, int64_t k) { return static_cast<size_t>(2 * n * k) * sizeof(float); }

cudaError_t topk_kl_forward(const TopkKlArgs& args, void* workspace, cudaStream_t stream) {
  if (args.n == 0) return cudaSuccess;
  float* ws = static_cast<float*>(workspace);
  const dim3 grid(static_cast<unsigned>(args.n));
  switch (args.dtype) {
    case TopkDtype::kFloat32:
      topk_kl_kernel<float><<<grid, kBlock, 0, stream>>>(args, ws);
      break;
    case TopkDtype::kBFloat16:
      topk_kl_kernel<__nv_bfloat16><<<grid, kBlock, 0, stream>>>(args, ws);
      break;
    default:
      topk_kl_kernel<__half><<<grid, kBlock, 0, stream>>>(args, ws);
      break;
  }
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace minitron
