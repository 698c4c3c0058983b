// Device-independent argument checks of the native fused KL op (minitron::_kl_div_fwd_native), shared by
// its CPU implementation (csrc/cpu/kl_div.cpp) and its CUDA glue (csrc/cuda/kl_div_torch.cpp). Each caller
// adds its own device check.
#pragma once

#include <ATen/ATen.h>

#include <cmath>
#include <cstdint>

namespace minitron {

inline void check_kl_div_native_args(const at::Tensor& student, const at::Tensor& teacher, const at::Tensor& weight,
                                     int64_t mode, double inv_temperature, double beta) {
  TORCH_CHECK(student.dim() == 2 && teacher.dim() == 2,
              "_kl_div_fwd_native: student and teacher must be 2-D [N, V], got ", student.sizes(), " and ",
              teacher.sizes());
  TORCH_CHECK(student.sizes() == teacher.sizes(), "_kl_div_fwd_native: student ", student.sizes(), " and teacher ",
              teacher.sizes(), " differ in shape");
  TORCH_CHECK(student.scalar_type() == teacher.scalar_type(), "_kl_div_fwd_native: student (", student.scalar_type(),
              ") and teacher (", teacher.scalar_type(), ") differ in dtype");
  const auto dt = student.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kBFloat16 || dt == at::kHalf,
              "_kl_div_fwd_native: dtype must be float32, bfloat16 or float16, got ", dt);
  const int64_t n = student.size(0), v = student.size(1);
  TORCH_CHECK(v >= 1, "_kl_div_fwd_native: vocabulary size must be >= 1");
  for (const at::Tensor* x : {&student, &teacher}) {
    TORCH_CHECK(v == 1 || x->stride(1) == 1, "_kl_div_fwd_native: inputs must have stride(1) == 1");
    TORCH_CHECK(n <= 1 || x->stride(0) >= v, "_kl_div_fwd_native: inputs must have stride(0) >= V");
  }
  TORCH_CHECK(weight.scalar_type() == at::kFloat && weight.dim() == 1 && weight.size(0) == n && weight.is_contiguous(),
              "_kl_div_fwd_native: weight must be a contiguous float32 [N] tensor");
  TORCH_CHECK(mode >= 0 && mode <= 2, "_kl_div_fwd_native: mode must be 0 (forward), 1 (reverse) or 2 (jsd), got ",
              mode);
  TORCH_CHECK(std::isfinite(inv_temperature) && inv_temperature > 0,
              "_kl_div_fwd_native: inv_temperature must be finite and > 0, got ", inv_temperature);
  TORCH_CHECK(mode != 2 || (beta >= 0 && beta <= 1), "_kl_div_fwd_native: beta must be in [0, 1], got ", beta);

}

}  // namespace minitron
