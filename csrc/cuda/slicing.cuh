// CUDA launchers of the structured slicing ops (raw pointers; no torch headers, so this header and
// slicing.cu build with the CUDA toolkit alone). The torch glue is csrc/cuda/slicing_torch.cpp.
//
// One launch copies the kept data of many tensors. Each tensor is described by a GatherDesc in
// device memory (canonical [lines, elements] form of csrc/common/slicing_math.h, strides in
// elements); virtual CTA c works on descriptor t with cta_start[t] <= c < cta_start[t + 1], copying
// chunk (c - cta_start) % chunks_per_line of output line (c - cta_start) / chunks_per_line.
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

namespace minitron {
namespace slicing_cuda {

constexpr int kThreads = 256;
constexpr int64_t kChunkElems = 4096;  // output elements per virtual CTA (a multiple of 16)

struct GatherDesc {
  const char* src;     // source data pointer
  char* dst;           // destination data pointer (its line 0 receives output line `line0`)
  const int64_t* idx;  // sorted unit numbers, device memory
  int64_t out_lines;   // output lines handled by this descriptor
  int64_t out_inner;   // elements per output line
  int64_t so, si;      // source strides (elements), canonical
  int64_t dso, dsi;    // destination strides (elements), canonical
  int64_t block;       // positions per unit
  int64_t line0;       // first output line handled
  int64_t chunks_per_line;
  int64_t cta_start;   // first virtual CTA of this descriptor
  int32_t es;          // element size in bytes: 1, 2, 4 or 8
  int32_t select_inner;  // 0: lines are selected; 1: positions inside every line are selected
};

// Virtual CTAs a descriptor needs (fills chunks_per_line; cta_start is left to the caller).
inline int64_t gather_ctas(GatherDesc& d) {
  d.chunks_per_line = d.out_inner > 0 ? (d.out_inner + kChunkElems - 1) / kChunkElems : 0;
  return d.out_lines * d.chunks_per_line;
}

// Copies for every descriptor (n of them, `descs` in device memory, sorted by cta_start);
// total_ctas = sum of gather_ctas over them. Returns the launch status.
cudaError_t launch_gather_slices(const GatherDesc* descs, int n, int64_t total_ctas, cudaStream_t stream);

}  // namespace slicing_cuda
}  // namespace minitron
