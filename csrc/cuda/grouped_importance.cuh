// Raw-pointer launcher of the CUDA grouped (segment) importance kernels (csrc/cuda/grouped_importance.cu).
// This header needs only the CUDA runtime: the torch glue that calls it (csrc/cuda/grouped_importance_torch.cpp)
// is built against a CUDA torch, the kernels are not.
//
// Rows x [N, U*G] are sorted into J = groups * samples segments by offsets [J + 1] (device memory), each row
// optionally scaled by weights [N] (csrc/common/grouped_importance_math.h). Three launches on `stream`, no host
// synchronisation:
//   1. grid (segments, unit blocks), kGiThreads threads = kGiRowLanes row lanes x 32 unit lanes: each block
//      streams the rows of one segment (row lane q takes every kGiRowLanes-th row), group_size == 1: a thread
//      owns kGiUnitsPerLane units 32 apart (coalesced loads across the warp); group_size > 1: a thread owns one
//      unit and sums (w * x)^2 over its G channels. The row lanes' accumulators combine in shared memory
//      (no warp shuffles, so tests/gpu/test_grouped_importance_emulated.py runs this code on the CPU);
//      non-finite values of w * x are added to count[1][group] atomically (only by threads that saw one).
//                                                                          -> partial [J, 2, U]
//   2. grid (unit blocks, groups), one thread per unit: the group's non-empty segments in sample order,
//      finalise and fold into state [groups, 2, U].
//   3. per group: count[0][g] += non-empty segments, count[2][g] += rows (after launch 2 read count[0]).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace minitron {
namespace cuda {

enum GiElemType : int { kGiF32 = 0, kGiBF16 = 1, kGiF16 = 2 };

constexpr int kGiThreads = 256;
constexpr int kGiRowLanes = kGiThreads / 32;  // 8 row lanes (warps)
constexpr int kGiUnitsPerLane = 4;            // group_size == 1: units per thread
constexpr int64_t kGiUnitsPerBlockG1 = 32 * kGiUnitsPerLane;
constexpr int64_t kGiUnitsPerBlockGrouped = 32;
constexpr int64_t kGiMaxGridY = 65535;

struct GroupedImportanceLaunch {
  const void* x = nullptr;  // [N, U * G], channel stride 1
  int dtype = kGiF32;       // GiElemType
  int64_t N = 0, U = 0, G = 1;
  int64_t sxr = 0;             // element stride of x rows
  const void* w = nullptr;     // [N] weights (nullptr: none)
  int wdtype = kGiF32;
  int64_t swr = 0;             // element stride of weights
  const int64_t* offsets = nullptr;  // [J + 1], device
  int64_t J = 0, groups = 1, samples = 0;  // J = groups * samples
  float* state = nullptr;    // [groups, 2, U], contiguous
  int64_t* count = nullptr;  // [3, groups], contiguous
  int seq_agg = 0, batch_agg = 1;
  float* partial = nullptr;  // workspace: grouped_importance_workspace_floats(J, U)
};

inline int64_t grouped_importance_workspace_floats(int64_t J, int64_t U) { return J * 2 * U; }

inline int64_t grouped_importance_unit_blocks(int64_t U, int64_t G) {
  const int64_t per = G == 1 ? kGiUnitsPerBlockG1 : kGiUnitsPerBlockGrouped;
  return (U + per - 1) / per;
}

cudaError_t grouped_importance_update(const GroupedImportanceLaunch& a, cudaStream_t stream);

}  // namespace cuda
}  // namespace minitron
