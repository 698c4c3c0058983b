// Fused hidden-state distillation losses (cosine, MSE): CUDA kernel. Same op and per-token arithmetic as
// csrc/cpu/hidden_loss.cpp (csrc/common/hidden_loss_math.h):
//   one block per row (a grid-stride loop over rows); each thread sums its strided share of the row in fp32
//   (cosine: s.t, |s|^2, |t|^2; MSE: |s - t|^2, writing the gradient (2 w / D)(s - t) in the same loop), a warp
//   shuffle + shared-memory reduction gives every thread the row's sums, then (cosine) a second loop over the
//   row, L2-hot, writes the gradient cs * s + ct * t and sums |s/|s| - t/|t||^2 (a second block reduction), whose
//   half is the loss 1 - cos without cancellation. Rows with weight 0 are skipped (loss 0, gradient row 0).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "common/hidden_loss_math.h"
#include "cuda/elem_convert.cuh"
#include "cuda/hidden_loss.cuh"

namespace minitron {
namespace cuda {
namespace {

constexpr int kBlock = 256;
constexpr int kWarps = kBlock / 32;
constexpr int64_t kMaxGrid = 65535L * 16;

// block-wide sum of three values (every thread gets the result)
__device__ __forceinline__ void block_sum3(float& a, float& b, float& c, float (*red)[kWarps]) {
  for (int o = 16; o > 0; o >>= 1) {
    a += __shfl_xor_sync(0xffffffffu, a, o);
    b += __shfl_xor_sync(0xffffffffu, b, o);
    c += __shfl_xor_sync(0xffffffffu, c, o);
  }
  const int lane = threadIdx.x & 31, wid = threadIdx.x >> 5;
  __syncthreads();  // the previous row's readers are done with red
  if (lane == 0) {
    red[0][wid] = a;
    red[1][wid] = b;
    red[2][wid] = c;
  }
  __syncthreads();
  a = b = c = 0.f;
  for (int i = 0; i < kWarps; ++i) {
    a += red[0][i];
    b += red[1][i];
    c += red[2][i];
  }
}

template <class T, int MODE>
__global__ void __launch_bounds__(kBlock) hidden_loss_kernel(HiddenLossArgs a) {
  __shared__ float red[3][kWarps];
  const int64_t d = a.d;
  for (int64_t row = blockIdx.x; row < a.n; row += gridDim.x) {
    const float w = a.weight[row];
    T* g = a.grad != nullptr ? static_cast<T*>(a.grad) + row * d : nullptr;
    if (w == 0.f) {
      if (threadIdx.x == 0) a.loss[row] = 0.f;
      if (g != nullptr)
        for (int64_t j = threadIdx.x; j < d; j += kBlock) g[j] = from_float<T>(0.f);
      continue;  // uniform across the block: no barrier is skipped by part of it
    }
    const T* __restrict__ s = static_cast<const T*>(a.student) + row * a.student_stride;
    const T* __restrict__ t = static_cast<const T*>(a.teacher) + row * a.teacher_stride;
    float sa = 0.f, sb = 0.f, sc = 0.f;
    const float coef = hidden::hl_mse_coef(w, d);
    for (int64_t j = threadIdx.x; j < d; j += kBlock) {
      const float sv = to_float(s[j]), tv = to_float(t[j]);
      hidden::hl_accum<MODE>(sa, sb, sc, sv, tv);
      if (MODE == hidden::kMse && g != nullptr) g[j] = from_float<T>(hidden::hl_grad<MODE>(sv, tv, coef, 0.f));
    }
    block_sum3(sa, sb, sc, red);
    if (MODE == hidden::kMse) {
      if (threadIdx.x == 0) a.loss[row] = hidden::hl_mse_loss(sa, w, d);
      continue;
    }
    const hidden::HlRow r = hidden::hl_cosine_row(sa, sb, sc, w);
    if (!r.regular) {  // zero or non-finite vectors (uniform across the block)
      if (threadIdx.x == 0) a.loss[row] = r.loss;
      if (g != nullptr)
        for (int64_t j = threadIdx.x; j < d; j += kBlock) g[j] = from_float<T>(r.cs);
      continue;
    }
    // pass 2 (L2-hot row): the gradient and |s/|s| - t/|t||^2, whose half is the loss
    float e = 0.f, unused1 = 0.f, unused2 = 0.f;
    for (int64_t j = threadIdx.x; j < d; j += kBlock) {
      const float sv = to_float(s[j]), tv = to_float(t[j]);
      hidden::hl_cosine_dist(e, sv, tv, r.us, r.ut);
      if (g != nullptr) g[j] = from_float<T>(hidden::hl_grad<MODE>(sv, tv, r.cs, r.ct));
    }
    block_sum3(e, unused1, unused2, red);
    if (threadIdx.x == 0) a.loss[row] = hidden::hl_cosine_loss(e, w);
  }
}

template <class T>
void launch(const HiddenLossArgs& args, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(args.n < kMaxGrid ? args.n : kMaxGrid));
  if (args.loss_kind == hidden::kCosine) {
    hidden_loss_kernel<T, hidden::kCosine><<<grid, kBlock, 0, stream>>>(args);
  } else {
    hidden_loss_kernel<T, hidden::kMse><<<grid, kBlock, 0, stream>>>(args);
  }
}

}  // namespace

cudaError_t hidden_state_loss_forward(const HiddenLossArgs& args, cudaStream_t stream) {
  if (args.n == 0) return cudaSuccess;
  switch (args.dtype) {
    case HiddenDtype::kFloat32:
      launch<float>(args, stream);
      break;
    case HiddenDtype::kBFloat16:
      launch<__nv_bfloat16>(args, stream);
      break;
    default:
      launch<__half>(args, stream);
      break;
  }
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace minitron
