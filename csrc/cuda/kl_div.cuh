// Launcher of the fused KL-divergence CUDA kernel (csrc/cuda/kl_div.cu). Plain CUDA runtime types only,
// so the kernel builds with nvcc without torch; the torch glue is csrc/cuda/kl_div_torch.cpp.
//
// Contract (same as the CPU op _kl_div_fwd_native, see csrc/common/kl_math.h for the math):
//   student, teacher  [n, v] rows with unit element stride, row strides in elements (>= v when n > 1),
//                     dtype float32 / bfloat16 / float16 (both the same)
//   weight            [n] float32; rows with weight 0 get loss 0 and an all-zero gradient row
//   loss              [n] float32 out: weight * scale * D
//   grad              [n, v] contiguous out, input dtype: weight * scale * dD/d student; nullptr: loss only
//   mode              0 forward KL(P||Q), 1 reverse KL(Q||P), 2 JSD(beta) (beta 0 / 1 are run as 0 / 1: forward / reverse KL)
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

namespace minitron {
namespace cuda {

enum class KlDtype : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

struct KlDivArgs {
  const void* student;
  const void* teacher;
  int64_t student_stride;  // elements between rows
  int64_t teacher_stride;
  const float* weight;
  float* loss;
  void* grad;
  int64_t n;
  int64_t v;
  int mode;
  float inv_temperature;  // > 0
  double beta;            // JSD weight in [0, 1] (host only: the JSD constants are formed from it in double)
  float scale;
  KlDtype dtype;
};

// Device workspace the launch needs (0 when every row fits one block); sm_count = multiprocessors.
size_t kl_div_workspace_bytes(int64_t n, int64_t v, int sm_count);

// Enqueue the kernel(s) on `stream`. `workspace` must hold kl_div_workspace_bytes(n, v, sm_count)
// bytes (it may be null when that is 0). Returns the launch error, if any (cudaGetLastError).
cudaError_t kl_div_forward(const KlDivArgs& args, void* workspace, size_t workspace_bytes, int sm_count,
                           cudaStream_t stream);

// Vocab-parallel pieces (one rank's [n, v] slice of the vocabulary; the statistics are combined across ranks
// between the calls, see minitron/ops/kl.py). `args.loss` / `args.grad` are only used by kl_div_vp_forward.
//   kl_div_vp_stats     stats_out [n, 5] float32: the slice's KlState (ma, sa, mb, sb, c) per row;
//                       rows with weight 0 get the empty state (-inf, 0, -inf, 0, 0)
//   kl_div_vp_jsd_sums  (mode 2, 0 < beta < 1) given the global stats [n, 5]: sums_out [n, 3] float64, the
//                       slice's (JSD loss terms, sum Q g, sum Q); zeros for skipped / all -inf teacher rows
//   kl_div_vp_forward   given the global stats (and, mode 2, the global sums): loss [n] (the whole row's) and,
//                       when args.grad is set, the slice's gradient [n, v]
cudaError_t kl_div_vp_stats(const KlDivArgs& args, float* stats_out, cudaStream_t stream);
cudaError_t kl_div_vp_jsd_sums(const KlDivArgs& args, const float* stats, double* sums_out, cudaStream_t stream);
cudaError_t kl_div_vp_forward(const KlDivArgs& args, const float* stats, const double* jsd_sums,
                              cudaStream_t stream);

}  // namespace cuda
}  // namespace minitron
