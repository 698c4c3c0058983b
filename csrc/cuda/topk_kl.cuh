// Launcher of the sparse (top-k teacher) KL CUDA kernel (csrc/cuda/topk_kl.cu). Plain CUDA runtime types
// only, so the kernel builds with nvcc without torch; the torch glue is csrc/cuda/topk_kl_torch.cpp.
//
// Contract (same as the CPU op _topk_kl_div_fwd_native, math in csrc/common/topk_kl_math.h):
//   student          [n, v] rows with unit element stride, row stride in elements (>= v when n > 1),
//                    dtype float32 / bfloat16 / float16
//   indices          [n, k] int64 contiguous, sorted ascending and distinct per row, in [0, v)
//   logprobs         [n, k] float32 contiguous (teacher log-probabilities at indices)
//   weight           [n] float32 KL coefficients; labels [n] int64 / ce_weight [n] float32 or nullptr (no CE)
//   loss             [n] float32 out: weight * D + ce_weight * CE (rows with both weights 0: 0, zero gradient)
//   grad             [n, v] contiguous out in the student dtype, or nullptr (loss only)
//   workspace        2 * n * k floats (kl_topk_workspace_bytes)
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

namespace minitron {
namespace cuda {

enum class TopkDtype : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

struct TopkKlArgs {
  const void* student;
  int64_t student_stride;  // elements between rows
  const int64_t* indices;
  const float* logprobs;
  const float* weight;
  const int64_t* labels;    // nullptr: no CE term
  const float* ce_weight;   // nullptr when labels is
  float* loss;
  void* grad;               // nullptr: loss only
  int64_t n;
  int64_t v;
  int64_t k;
  float inv_temperature;  // > 0
  bool tail;
  TopkDtype dtype;
};

size_t topk_kl_workspace_bytes(int64_t n, int64_t k);

// Enqueue the kernel on `stream`; `workspace` holds topk_kl_workspace_bytes(n, k) bytes. Returns the launch error.
cudaError_t topk_kl_forward(const TopkKlArgs& args, void* workspace, cudaStream_t stream);

}  // namespace cuda
}  // namespace minitron
