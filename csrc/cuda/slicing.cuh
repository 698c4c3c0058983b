// CUDA launchers of the structured slicing ops (raw pointers; no torch headers, so this header and
// slicing.cu build with the CUDA toolkit alone). The torch glue is csrc/cuda/slicing_torch.cpp.
//
// One launch copies the kept data of many tensors (the 7 matrices of a transformer layer: one launch).
// Each tensor is described by a GatherDesc in device memory (canonical [lines, elements] form of
// csrc/common/slicing_math.h, strides in elements); virtual CTA c works on the descriptor t with
// cta_start[t] <= c < cta_start[t + 1] (binary search in the table, which is uploaded asynchronously
// with the call: no host synchronisation). Two work shapes, chosen per descriptor:
//
//   * outer selection (whole lines kept: rows of a row-major matrix, head blocks of rows): a CTA copies
//     one chunk of kChunkBytes of one output line; its source line is looked up once per CTA. With unit
//     strides and 16-byte aligned lines every thread moves up to kRowUnroll 16-byte vectors, all loads
//     issued before the stores (bytes in flight), no per-element index arithmetic.
//   * inner selection (the same positions of every line kept: columns, head blocks of columns): a CTA
//     owns a tile of kTileLines lines x (kThreads * vec) output positions, vec = 16 / element size.
//     Each thread computes the source positions of its vec consecutive outputs ONCE (no divisions in the
//     line loop), then walks the tile's lines: reads coalesce along the line (sorted index: neighbouring
//     threads read neighbouring sources), writes are one 16-byte vector per thread and line; when the vec
//     sources are contiguous and aligned (kept runs: heads, long runs of kept columns) the read is one
//     vector too. No transpose, no shared memory.
//
// Non-unit strides and misaligned tensors take element-wise paths with the same work shapes.
//
// 3-D tensors and two cut dims: a descriptor's output lines are groups of `lines_per_group` lines
// (canonical axes G, L, I of csrc/common/slicing_math.h); output line o reads source line
// select_source(gidx, o / lines_per_group) * sg + select_source(lidx, o % lines_per_group) * so, and any
// of gidx / lidx / iidx may be null (axis not cut). The source line is computed once per CTA (outer work
// shape) or once per line of the tile (inner work shape).
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

namespace minitron {
namespace slicing_cuda {

constexpr int kThreads = 256;
constexpr int64_t kChunkBytes = 16384;  // per CTA and output line, outer selection (= kThreads * 16 * 4)
constexpr int kRowUnroll = 4;           // 16-byte vectors per thread in flight, outer selection
constexpr int64_t kTileLines = 16;      // lines per CTA, inner selection

struct GatherDesc {
  const char* src;      // source data pointer
  char* dst;            // destination data pointer (its line 0 receives output line `line0`)
  const int64_t* gidx;  // sorted kept units of the group axis, device memory (nullptr: not cut)
  const int64_t* lidx;  // ... of the line axis (nullptr: not cut)
  const int64_t* iidx;  // ... of the inner axis (nullptr: not cut; then select_inner == 0)
  int64_t gblock, lblock, iblock;  // positions per unit of each axis
  int64_t out_lines;    // output lines handled by this descriptor
  int64_t lines_per_group;  // output lines per group (>= 1; all output lines of a 1-D/2-D tensor)
  int64_t out_inner;    // elements per output line
  int64_t sg, so, si;   // source strides (elements), canonical: group, line, element
  int64_t dsg, dso, dsi;  // destination strides (elements), canonical
  int64_t line0;        // first output line handled (destination line of output line o: o - line0 in group 0)
  int64_t chunks_per_line;  // outer: chunks of kChunkBytes per line; inner: column tiles per line block
  int64_t cta_start;        // first virtual CTA of this descriptor
  int32_t es;               // element size in bytes: 1, 2, 4 or 8
  int32_t select_inner;     // 1: positions inside every line are selected (iidx); 0: whole lines are copied
  int32_t grouped;          // 1: the lines handled span more than one group (3-D); 0: group 0 only (no division)
};

// Virtual CTAs a descriptor needs (fills chunks_per_line and grouped; cta_start is left to the caller).
inline int64_t gather_ctas(GatherDesc& d) {
  d.grouped = d.line0 + d.out_lines > d.lines_per_group ? 1 : 0;
  if (d.out_inner <= 0 || d.out_lines <= 0) {
    d.chunks_per_line = 0;
    return 0;
  }
  if (d.select_inner) {
    const int64_t cols = static_cast<int64_t>(kThreads) * (16 / d.es);  // output positions per tile
    d.chunks_per_line = (d.out_inner + cols - 1) / cols;
    return ((d.out_lines + kTileLines - 1) / kTileLines) * d.chunks_per_line;
  }
  const int64_t chunk = kChunkBytes / d.es;
  d.chunks_per_line = (d.out_inner + chunk - 1) / chunk;
  return d.out_lines * d.chunks_per_line;
}

// Copies for every descriptor (n of them, `descs` in device memory, sorted by cta_start);
// total_ctas = sum of gather_ctas over them. Returns the launch status.
cudaError_t launch_gather_slices(const GatherDesc* descs, int n, int64_t total_ctas, cudaStream_t stream);

}  // namespace slicing_cuda
}  // namespace minitron
