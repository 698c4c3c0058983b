// Device-independent argument checks of the native importance ops (minitron::_importance_update_native and
// minitron::_block_influence_update_native), shared by their CPU implementations (csrc/cpu/importance.cpp)
// and their CUDA glue (csrc/cuda/importance_torch.cpp). Each caller adds its own device checks.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <optional>

#include "common/importance_math.h"

namespace minitron {

inline void check_importance_float(const at::Tensor& t, const char* name) {
  const auto dt = t.scalar_type();
  TORCH_CHECK_TYPE(dt == at::kFloat || dt == at::kBFloat16 || dt == at::kHalf, name,
                   " must be float32, bfloat16 or float16, got ", dt);
}

inline void check_importance_mask(const std::optional<at::Tensor>& mask, int64_t batch, int64_t seq) {
  if (!mask.has_value()) return;
  TORCH_CHECK_TYPE(mask->scalar_type() == at::kBool, "mask must be bool");
  TORCH_CHECK_VALUE(mask->dim() == 2 && mask->size(0) == batch && mask->size(1) == seq, "mask must be [batch, seq]");
}

// state fp32 [2, units] (contiguous), count int64 [2] (samples, non-finite values), x [batch, seq, units * group_size] (float dtypes).
inline void check_importance_update_args(const at::Tensor& state, const at::Tensor& count, const at::Tensor& x,
                                         const std::optional<at::Tensor>& mask, int64_t group_size, int64_t seq_agg,
                                         int64_t batch_agg) {
  TORCH_CHECK_VALUE(x.dim() == 3, "x must be [batch, seq, units * group_size], got ", x.dim(), " dims");
  TORCH_CHECK_VALUE(group_size >= 1, "group_size must be >= 1, got ", group_size);
  for (const auto& [agg, name] : {std::pair<int64_t, const char*>{seq_agg, "seq_agg"}, {batch_agg, "batch_agg"}}) {
    TORCH_CHECK_VALUE(agg >= 0 && agg < importance::kNumAggs, name, " must be an aggregation code in [0, ",
                      importance::kNumAggs, "), got ", agg);
  }
  TORCH_CHECK_TYPE(state.scalar_type() == at::kFloat, "state must be float32");
  TORCH_CHECK_VALUE(state.dim() == 2 && state.size(0) == 2 && state.is_contiguous(),
                    "state must be a contiguous [2, units] tensor");
  TORCH_CHECK_TYPE(count.scalar_type() == at::kLong && count.dim() == 1 && count.numel() == 2 && count.is_contiguous(),
                   "count must be a contiguous int64 [2] tensor (counted samples, non-finite values)");
  TORCH_CHECK_VALUE(x.size(2) == state.size(1) * group_size, "x has ", x.size(2),
                    " channels, expected units * group_size = ", state.size(1), " * ", group_size);
  check_importance_float(x, "x");
  check_importance_mask(mask, x.size(0), x.size(1));
}

// state fp64 [layers], count int64 [2, layers] (tokens; non-finite values) (both contiguous), h_in / h_out [batch, seq, hidden] alike.
inline void check_block_influence_args(const at::Tensor& state, const at::Tensor& count, const at::Tensor& h_in,
                                       const at::Tensor& h_out, const std::optional<at::Tensor>& mask, int64_t layer) {
  TORCH_CHECK_TYPE(state.scalar_type() == at::kDouble && state.dim() == 1 && state.is_contiguous(),
                   "state must be a contiguous float64 [num_layers] tensor");
  TORCH_CHECK_TYPE(count.scalar_type() == at::kLong && count.dim() == 2 && count.is_contiguous() &&
                       count.size(0) == 2 && count.size(1) == state.size(0),
                   "count must be a contiguous int64 [2, num_layers] tensor (counted tokens, non-finite values)");
  TORCH_CHECK_VALUE(layer >= 0 && layer < state.size(0), "layer_idx must be in [0, ", state.size(0), "), got ", layer);
  TORCH_CHECK_VALUE(h_in.dim() == 3, "h_in must be [batch, seq, hidden]");
  TORCH_CHECK_VALUE(h_in.sizes() == h_out.sizes(), "h_in and h_out must have the same shape");
  TORCH_CHECK_TYPE(h_in.scalar_type() == h_out.scalar_type(), "h_in and h_out must have the same dtype");
  check_importance_float(h_in, "h_in");
  check_importance_mask(mask, h_in.size(0), h_in.size(1));
}

}  // namespace minitron
