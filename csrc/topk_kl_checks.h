// Device-independent argument checks of the native sparse KL op (minitron::_topk_kl_div_fwd_native), shared by
// its CPU implementation (csrc/cpu/topk_kl.cpp) and its CUDA glue (csrc/cuda/topk_kl_torch.cpp). Value checks
// (index range, distinctness, log-probability validity) are the Python wrapper's; these check shapes and dtypes.
#pragma once

#include <ATen/ATen.h>

#include <cmath>
#include <cstdint>

namespace minitron {

inline void check_topk_kl_native_args(const at::Tensor& student, const at::Tensor& indices, const at::Tensor& logprobs,
                                      const at::Tensor& weight, const at::Tensor& labels, const at::Tensor& ce_weight,
                                      double inv_temperature) {
  const char* op = "_topk_kl_div_fwd_native";
  TORCH_CHECK(student.dim() == 2, op, ": student must be 2-D [N, V], got ", student.sizes());
  const auto dt = student.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kBFloat16 || dt == at::kHalf, op,
              ": student dtype must be float32, bfloat16 or float16, got ", dt);
  const int64_t n = student.size(0), v = student.size(1);
  TORCH_CHECK(v >= 1, op, ": vocabulary size must be >= 1");
  TORCH_CHECK(v == 1 || student.stride(1) == 1, op, ": student must have stride(1) == 1");
  TORCH_CHECK(n <= 1 || student.stride(0) >= v, op, ": student must have stride(0) >= V");
  TORCH_CHECK(indices.dim() == 2 && indices.size(0) == n && indices.scalar_type() == at::kLong &&
                  indices.is_contiguous(),
              op, ": indices must be a contiguous int64 [N, k] tensor, got ", indices.sizes(), " ",
              indices.scalar_type());
  const int64_t k = indices.size(1);
  TORCH_CHECK(k >= 1 && k <= v, op, ": k must be in [1, V], got k=", k, " V=", v);
  TORCH_CHECK(logprobs.scalar_type() == at::kFloat && logprobs.sizes() == indices.sizes() && logprobs.is_contiguous(),
              op, ": teacher_logprobs must be a contiguous float32 tensor shaped like indices");
  TORCH_CHECK(weight.scalar_type() == at::kFloat && weight.dim() == 1 && weight.size(0) == n && weight.is_contiguous(),
              op, ": weight must be a contiguous float32 [N] tensor");
  TORCH_CHECK(labels.numel() == 0 || (labels.scalar_type() == at::kLong && labels.dim() == 1 && labels.size(0) == n &&
                                      labels.is_contiguous()),
              op, ": labels must be empty or a contiguous int64 [N] tensor");
  TORCH_CHECK(labels.numel() == 0 || (ce_weight.scalar_type() == at::kFloat && ce_weight.dim() == 1 &&
                                      ce_weight.size(0) == n && ce_weight.is_contiguous()),
              op, ": ce_weight must be a contiguous float32 [N] tensor when labels are given");
  TORCH_CHECK(std::isfinite(inv_temperature) && inv_temperature > 0, op,
              ": inv_temperature must be finite and > 0, got ", inv_temperature);
}

}  // namespace minitron
