// Grouped (segment) importance reduction: the pieces shared by the CPU kernel
// (csrc/cpu/grouped_importance.cpp), the CUDA kernels (csrc/cuda/grouped_importance.cu) and mirrored by the
// Triton kernels (minitron/kernels/grouped_importance.py). The Python reference
// (minitron/ops/grouped_importance.py) defines the result.
//
// Rows x [N, U*G] arrive sorted into J = groups * samples segments by offsets [J + 1]; segment
// j = g * samples + b holds rows offsets[j] <= r < offsets[j + 1] (the tokens of sample b routed to group g),
// each row optionally scaled by a weight w[r] (the router weight). Per segment and unit the sequence stage
// of csrc/common/importance_math.h runs over the segment's rows with magnitudes of w[r] * x[r, :]; an empty
// segment does not count; the batch stage folds the counted segments of group g, in sample order, into the
// state of group g (state [groups, 2, U], count [3, groups]: counted segments, non-finite values of w * x,
// routed rows).
//
// Long segments are split into chunks of at most `chunk` rows (chunk depends on the shape only, so results
// do not depend on the thread/block count); chunks of one segment share the var shift K (the magnitude at
// the segment's first row) and combine with seq_combine.
#pragma once

#include <stdint.h>

#include "common/importance_math.h"
#include "common/macros.h"

namespace minitron {
namespace grouped_importance {

namespace imp = ::minitron::importance;

// Row chunking: at most this many chunks in total (fewer when rows are few), at least kMinChunkRows rows each.
constexpr int64_t kTargetChunks = 256;
constexpr int64_t kMinChunkRows = 64;

// Rows per chunk for N routed rows.
MINITRON_HD int64_t chunk_rows(int64_t n_rows) {
  const int64_t c = (n_rows + kTargetChunks - 1) / kTargetChunks;
  return c < kMinChunkRows ? kMinChunkRows : c;
}

// Number of chunks of a segment of `len` rows (0 for an empty segment: it does not count).
MINITRON_HD int64_t segment_chunks(int64_t len, int64_t chunk) { return (len + chunk - 1) / chunk; }

// The weighted magnitude contribution of one channel value: w * x (its absolute value for group_size 1,
// its square summed over the unit's channels otherwise). |w * x| == |w| * |x| exactly in IEEE arithmetic.
template <class V>
MINITRON_HD V weighted_abs(V abs_x, V abs_w) {
  return abs_x * abs_w;
}

// Fold the sequence aggregate v of one more counted segment of a group into the group's unit state; `n_prev`
// counted segments of that group before this one (same as the dense op's batch stage).
MINITRON_HD void fold_segment(int batch_agg, float v, float n_prev, float& A, float& B) {
  imp::batch_update(batch_agg, v, n_prev, A, B);
}

// The sequence aggregate of a segment from its combined accumulators and its row count (>= 1).
MINITRON_HD float finalize_segment(int seq_agg, float a1, float a2, int64_t rows) {
  return imp::seq_finalize(seq_agg, a1, a2, static_cast<float>(rows));
}

}  // namespace grouped_importance
}  // namespace minitron

// ---------------------------------------------------------------------------------------------
// Device-independent argument checks of minitron::_grouped_importance_update_native, shared by the CPU
// implementation and the CUDA glue (host C++ compilers only: never seen by nvcc).
// ---------------------------------------------------------------------------------------------
#if !defined(__CUDACC__) && !defined(__HIPCC__) && defined(MINITRON_GROUPED_IMPORTANCE_CHECKS)
#include <ATen/ATen.h>

#include <optional>

namespace minitron {

inline void check_grouped_float(const at::Tensor& t, const char* name) {
  const auto dt = t.scalar_type();
  TORCH_CHECK_TYPE(dt == at::kFloat || dt == at::kBFloat16 || dt == at::kHalf, name,
                   " must be float32, bfloat16 or float16, got ", dt);
}

// state fp32 [groups, 2, units] contiguous, count int64 [3, groups] contiguous, x [N, units * group_size],
// offsets int64 [groups * samples + 1], weights None or [N] float.
inline void check_grouped_importance_args(const at::Tensor& state, const at::Tensor& count, const at::Tensor& x,
                                          const at::Tensor& offsets, const std::optional<at::Tensor>& weights,
                                          int64_t group_size, int64_t seq_agg, int64_t batch_agg) {
  TORCH_CHECK_VALUE(x.dim() == 2, "x must be [rows, units * group_size], got ", x.dim(), " dims");
  TORCH_CHECK_VALUE(group_size >= 1, "group_size must be >= 1, got ", group_size);
  for (const auto& [agg, name] : {std::pair<int64_t, const char*>{seq_agg, "seq_agg"}, {batch_agg, "batch_agg"}}) {
    TORCH_CHECK_VALUE(agg >= 0 && agg < importance::kNumAggs, name, " must be an aggregation code in [0, ",
                      importance::kNumAggs, "), got ", agg);
  }
  TORCH_CHECK_TYPE(state.scalar_type() == at::kFloat, "state must be float32");
  TORCH_CHECK_VALUE(state.dim() == 3 && state.size(1) == 2 && state.size(0) >= 1 && state.is_contiguous(),
                    "state must be a contiguous [groups, 2, units] tensor");
  const int64_t groups = state.size(0);
  TORCH_CHECK_TYPE(count.scalar_type() == at::kLong && count.dim() == 2 && count.size(0) == 3 &&
                       count.size(1) == groups && count.is_contiguous(),
                   "count must be a contiguous int64 [3, groups] tensor (segments, non-finite values, rows)");
  TORCH_CHECK_VALUE(x.size(1) == state.size(2) * group_size, "x has ", x.size(1),
                    " channels, expected units * group_size = ", state.size(2), " * ", group_size);
  check_grouped_float(x, "x");
  TORCH_CHECK_TYPE(offsets.scalar_type() == at::kLong, "offsets must be int64, got ", offsets.scalar_type());
  TORCH_CHECK_VALUE(offsets.dim() == 1 && offsets.size(0) >= 1 && (offsets.size(0) - 1) % groups == 0,
                    "offsets must be 1-D with groups * samples + 1 entries (groups = ", groups, "), got shape ",
                    offsets.sizes());
  TORCH_CHECK_VALUE(offsets.device() == x.device(), "offsets must be on the device of x");
  if (weights.has_value()) {
    check_grouped_float(*weights, "weights");
    TORCH_CHECK_VALUE(weights->dim() == 1 && weights->size(0) == x.size(0), "weights must be [rows of x] = [",
                      x.size(0), "], got ", weights->sizes());
    TORCH_CHECK_VALUE(weights->device() == x.device(), "weights must be on the device of x");
  }
}

}  // namespace minitron
#endif
