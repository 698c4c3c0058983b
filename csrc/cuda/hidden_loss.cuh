// Launcher of the fused hidden-state loss CUDA kernel (csrc/cuda/hidden_loss.cu). Plain CUDA runtime types only,
// so the kernel builds with nvcc without torch; the torch glue is csrc/cuda/hidden_loss_torch.cpp.
//
// Contract (same as the CPU op _hidden_state_loss_fwd_native, math in csrc/common/hidden_loss_math.h):
//   student, teacher  [n, d] rows with unit element stride, row strides in elements (>= d when n > 1),
//                     one dtype: float32 / bfloat16 / float16
//   weight            [n] float32 per-token coefficients (0: row skipped, loss 0, gradient row 0)
//   loss              [n] float32 out: weight * l
//   grad              [n, d] contiguous out in the input dtype, or nullptr (loss only)
//   loss_kind         0 cosine (1 - cos), 1 MSE (mean over d of (s - t)^2)
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace minitron {
namespace cuda {

enum class HiddenDtype : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

struct HiddenLossArgs {
  const void* student;
  const void* teacher;
  int64_t student_stride;  // elements between rows
  int64_t teacher_stride;
  const float* weight;
  float* loss;
  void* grad;  // nullptr: loss only
  int64_t n;
  int64_t d;
  int loss_kind;
  HiddenDtype dtype;
};

// Enqueue the kernel on `stream`. Returns the launch error.
cudaError_t hidden_state_loss_forward(const HiddenLossArgs& args, cudaStream_t stream);

}  // namespace cuda
}  // namespace minitron
