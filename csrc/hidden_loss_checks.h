// Device-independent argument checks of the native hidden-state loss op (minitron::_hidden_state_loss_fwd_native),
// shared by its CPU implementation (csrc/cpu/hidden_loss.cpp) and its CUDA glue (csrc/cuda/hidden_loss_torch.cpp).
// Each caller adds its own device check; ``op`` names the caller in the messages.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

#include "common/hidden_loss_math.h"

namespace minitron {

inline void check_hidden_loss_native_args(const at::Tensor& student, const at::Tensor& teacher,
                                          const at::Tensor& weight, int64_t loss_kind, const char* op) {
  TORCH_CHECK(student.dim() == 2 && teacher.dim() == 2, op, ": student and teacher must be 2-D [N, D], got ",
              student.sizes(), " and ", teacher.sizes());
  TORCH_CHECK(student.sizes() == teacher.sizes(), op, ": student ", student.sizes(), " and teacher ", teacher.sizes(),
              " differ in shape");
  TORCH_CHECK(student.scalar_type() == teacher.scalar_type(), op, ": student (", student.scalar_type(),
              ") and teacher (", teacher.scalar_type(), ") differ in dtype");
  const auto dt = student.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kBFloat16 || dt == at::kHalf, op,
              ": dtype must be float32, bfloat16 or float16, got ", dt);
  const int64_t n = student.size(0), d = student.size(1);
  TORCH_CHECK(d >= 1, op, ": the hidden dimension must be >= 1");
  for (const at::Tensor* x : {&student, &teacher}) {
    TORCH_CHECK(d == 1 || x->stride(1) == 1, op, ": inputs must have stride(1) == 1");
    TORCH_CHECK(n <= 1 || x->stride(0) >= d, op, ": inputs must have stride(0) >= D");
  }
  TORCH_CHECK(weight.scalar_type() == at::kFloat && weight.dim() == 1 && weight.size(0) == n && weight.is_contiguous(),
              op, ": weight must be a contiguous float32 [N] tensor");
  TORCH_CHECK(loss_kind == hidden::kCosine || loss_kind == hidden::kMse, op, ": loss must be 0 (cosine) or 1 (mse), got ", loss_kind);
}

}  // namespace minitron
