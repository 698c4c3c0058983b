// Raw-pointer launchers of the CUDA importance-reduction and block-influence kernels
// (csrc/cuda/importance.cu). This header needs only the CUDA runtime: the torch glue that calls it
// (csrc/cuda/importance_torch.cpp) is built against a CUDA torch, the kernels are not.
//
// Importance (see csrc/common/importance_math.h for the math), four launches on `stream`:
//   1. per sample: counted tokens and first counted token            -> stats [2, B]
//   2. grid (unit blocks, sequence chunks, samples): stream the tokens, per-unit sequence
//      accumulators of each chunk                                     -> partial [B, nch, 2, U]
//      group_size == 1: a thread owns 16 bytes of units (4 fp32 / 8 bf16 or fp16 channels: one 16-byte
//      load per token when x is aligned), a warp 32 of those (512 contiguous bytes per token for 16-bit
//      inputs), the 8 warps of a block take every 8th token of the chunk, 4 tokens' loads in flight per
//      thread; the warps' accumulators combine in shared memory. The sequence is split into chunks until
//      there are ~8 blocks per multiprocessor (the partials are ~1-3% of the traffic).
//   3. per unit, samples in order: combine chunks, finalise, fold into state [2, U]
//   4. count[0] += samples with at least one counted token
// Non-finite values of x at counted positions are counted in stage 2 (threads that see one add to
// count[1] atomically; none do in the all-finite case).
// Block influence, one launch: warps per token, per-block partial sums added with atomics (float64
// sum and uint64 count; the summation order, hence the last bits, may vary between runs).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace minitron {
namespace cuda {

enum ElemType : int { kElemF32 = 0, kElemBF16 = 1, kElemF16 = 2 };

constexpr int kImpThreads = 256;   // threads per block (8 warps)
constexpr int kImpLanesG1 = 32;    // threads along the units when group_size == 1 (a warp)
// Units per block when group_size == 1: a warp of threads, each owning 16 bytes of channels.
inline int64_t importance_units_per_block_g1(int elem_bytes) { return kImpLanesG1 * (16 / elem_bytes); }
constexpr int64_t kImpMinChunk = 64;
constexpr int64_t kMaxGridYZ = 65535;

struct ImportanceLaunch {
  const void* x = nullptr;  // [B, S, U * G], channel stride 1
  int dtype = kElemF32;     // ElemType
  int64_t B = 0, S = 0, U = 0, G = 1;
  int64_t sxb = 0, sxs = 0;       // element strides of x along batch and sequence
  const uint8_t* mask = nullptr;  // bool [B, S] (nullptr: every token counts)
  int64_t smb = 0, sms = 0;       // element strides of mask
  float* state = nullptr;         // [2, U], contiguous
  int64_t* count = nullptr;       // [2]: counted samples, non-finite values at counted positions
  int seq_agg = 0, batch_agg = 1;  // importance::Agg codes
  // device workspace: sizes from importance_workspace_floats / importance_workspace_int64s
  float* partial = nullptr;
  int64_t* stats = nullptr;
  int64_t nch = 1, chunk = 0;  // from importance_plan
};

// Sequence chunking for a device with `num_sms` multiprocessors (host-only arithmetic): enough blocks
// to fill the device (~8 per multiprocessor), chunks of at least kImpMinChunk tokens, nch <= kMaxGridYZ.
inline void importance_plan(int64_t B, int64_t S, int64_t U, int64_t G, int elem_bytes, int num_sms, int64_t* nch,
                            int64_t* chunk) {
  const int64_t per_block = importance_units_per_block_g1(elem_bytes);
  const int64_t unit_blocks = G == 1 ? (U + per_block - 1) / per_block : U;
  const int64_t blocks = B * unit_blocks;
  const int64_t target = 8 * static_cast<int64_t>(num_sms > 0 ? num_sms : 1);
  int64_t n = 1;
  if (blocks > 0 && blocks < target) {
    n = (target + blocks - 1) / blocks;
    const int64_t most = S / kImpMinChunk > 1 ? S / kImpMinChunk : 1;
    n = n < most ? n : most;
  }
  n = n < kMaxGridYZ ? n : kMaxGridYZ;
  const int64_t c = S > 0 ? (S + n - 1) / n : 1;
  *chunk = c;
  *nch = S > 0 ? (S + c - 1) / c : 1;
}

inline int64_t importance_workspace_floats(int64_t B, int64_t nch, int64_t U) { return B * nch * 2 * U; }
inline int64_t importance_workspace_int64s(int64_t B) { return 2 * B; }

cudaError_t importance_update(const ImportanceLaunch& a, cudaStream_t stream);

struct BlockInfluenceLaunch {
  const void* a = nullptr;  // h_in  [B, S, H], channel stride 1
  const void* b = nullptr;  // h_out [B, S, H], channel stride 1
  int dtype = kElemF32;
  int64_t B = 0, S = 0, H = 0;
  int64_t sab = 0, sas = 0, sbb = 0, sbs = 0;  // element strides along batch and sequence
  const uint8_t* mask = nullptr;
  int64_t smb = 0, sms = 0;
  double* state = nullptr;   // [L]
  int64_t* count = nullptr;  // [2, L]: counted tokens; non-finite values of h_in and h_out at counted tokens
  int64_t num_layers = 0;    // L
  int64_t layer = 0;
  int num_sms = 1;
};

cudaError_t block_influence_update(const BlockInfluenceLaunch& a, cudaStream_t stream);

}  // namespace cuda
}  // namespace minitron
