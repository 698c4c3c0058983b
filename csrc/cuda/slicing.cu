// CUDA kernel of the structured slicing ops: a multi-tensor gather of kept lines / positions (work shapes
// in csrc/cuda/slicing.cuh). In-place compaction on the GPU reuses it (slicing_torch.cpp stages bounded
// slabs of the result).
#include "cuda/slicing.cuh"

#include "common/slicing_math.h"

namespace minitron {
namespace slicing_cuda {
namespace {

__device__ __forceinline__ int find_desc(const GatherDesc* descs, int n, int64_t cta) {
  int lo = 0, hi = n - 1;  // last descriptor with cta_start <= cta
  while (lo < hi) {
    const int mid = (lo + hi + 1) >> 1;
    if (descs[mid].cta_start <= cta) lo = mid;
    else hi = mid - 1;
  }
  return lo;
}

__device__ __forceinline__ bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15) == 0; }

// Element offsets of (global) output line o in the source and the destination.
__device__ __forceinline__ int64_t src_line(const GatherDesc& d, int64_t o) {
  const int64_t g = d.grouped ? o / d.lines_per_group : 0;
  const int64_t l = o - g * d.lines_per_group;
  return slicing::select_source(d.gidx, g, d.gblock) * d.sg + slicing::select_source(d.lidx, l, d.lblock) * d.so;
}

__device__ __forceinline__ int64_t dst_line(const GatherDesc& d, int64_t o) {
  const int64_t g = d.grouped ? o / d.lines_per_group : 0;
  return g * d.dsg + (o - g * d.lines_per_group - d.line0) * d.dso;
}

// Whole lines: elements [j0, j1) of global output line g; j0 is a multiple of the chunk, hence of the
// 16-byte vector.
template <typename T>
__device__ __forceinline__ void copy_line_chunk(const GatherDesc& d, int64_t g, int64_t j0, int64_t j1) {
  constexpr int64_t kVec = 16 / static_cast<int64_t>(sizeof(T));
  const T* sl = reinterpret_cast<const T*>(d.src) + src_line(d, g);  // once per CTA
  T* dl = reinterpret_cast<T*>(d.dst) + dst_line(d, g);
  if (d.si == 1 && d.dsi == 1 && aligned16(sl + j0) && aligned16(dl + j0)) {
    const int64_t nvec = (j1 - j0) / kVec;
    const uint4* s4 = reinterpret_cast<const uint4*>(sl + j0);
    uint4* d4 = reinterpret_cast<uint4*>(dl + j0);
    for (int64_t v0 = 0; v0 < nvec; v0 += static_cast<int64_t>(kThreads) * kRowUnroll) {
      uint4 r[kRowUnroll];
#pragma unroll
      for (int u = 0; u < kRowUnroll; ++u) {  // every load first: kRowUnroll vectors in flight per thread
        const int64_t v = v0 + u * kThreads + threadIdx.x;
        if (v < nvec) r[u] = __ldg(s4 + v);
      }
#pragma unroll
      for (int u = 0; u < kRowUnroll; ++u) {
        const int64_t v = v0 + u * kThreads + threadIdx.x;
        if (v < nvec) d4[v] = r[u];
      }
    }
    for (int64_t j = j0 + nvec * kVec + threadIdx.x; j < j1; j += kThreads) dl[j] = sl[j];
    return;
  }
  for (int64_t j = j0 + threadIdx.x; j < j1; j += kThreads) dl[j * d.dsi] = sl[j * d.si];
}

template <typename T>
union Pack {
  uint4 v;
  T e[16 / sizeof(T)];
};

// Inner selection: the tile of local output lines [kTileLines * lt, ...) and output positions
// [(ct * kThreads + thread) * vec, ... + vec) of this thread.
template <typename T>
__device__ __forceinline__ void copy_col_tile(const GatherDesc& d, int64_t lt, int64_t ct) {
  constexpr int kVec = 16 / static_cast<int>(sizeof(T));
  constexpr int kLinesInFlight = 4;
  const int64_t j = (ct * kThreads + threadIdx.x) * kVec;
  if (j >= d.out_inner) return;
  const int64_t l0 = lt * kTileLines;
  const int64_t l1 = l0 + kTileLines < d.out_lines ? l0 + kTileLines : d.out_lines;
  const int n = d.out_inner - j < kVec ? static_cast<int>(d.out_inner - j) : kVec;
  // Source positions of this thread's outputs, computed once for the whole tile (one division).
  int64_t pos[kVec];
  {
    int64_t u = j / d.iblock, r = j - (j / d.iblock) * d.iblock;
#pragma unroll
    for (int v = 0; v < kVec; ++v) {
      pos[v] = v < n ? d.iidx[u] * d.iblock + r : 0;
      if (++r == d.iblock) {
        r = 0;
        ++u;
      }
    }
  }
  const T* S = reinterpret_cast<const T*>(d.src);
  T* D = reinterpret_cast<T*>(d.dst);
  if (n == kVec && d.si == 1 && d.dsi == 1) {
    // Every line offset is a combination of the line and group strides: when both are multiples of 16 bytes
    // and the tile's first line is aligned, every line is.
    constexpr int64_t es = static_cast<int64_t>(sizeof(T));
    const bool src_vec = slicing::sources_contiguous(d.iidx, j, kVec, d.iblock) && ((d.so * es) & 15) == 0 &&
                         ((d.sg * es) & 15) == 0 && aligned16(S + src_line(d, d.line0 + l0) + pos[0]);
    const bool dst_vec = ((d.dso * es) & 15) == 0 && ((d.dsg * es) & 15) == 0 &&
                         aligned16(D + dst_line(d, d.line0 + l0) + j);
    for (int64_t l = l0; l < l1; l += kLinesInFlight) {
      Pack<T> p[kLinesInFlight];
#pragma unroll
      for (int q = 0; q < kLinesInFlight; ++q) {  // loads of several lines before any store
        if (l + q < l1) {
          const T* sl = S + src_line(d, d.line0 + l + q);
          if (src_vec) {
            p[q].v = __ldg(reinterpret_cast<const uint4*>(sl + pos[0]));
          } else {
#pragma unroll
            for (int v = 0; v < kVec; ++v) p[q].e[v] = sl[pos[v]];
          }
        }
      }
#pragma unroll
      for (int q = 0; q < kLinesInFlight; ++q) {
        if (l + q < l1) {
          T* dl = D + dst_line(d, d.line0 + l + q) + j;
          if (dst_vec) {
            *reinterpret_cast<uint4*>(dl) = p[q].v;
          } else {
#pragma unroll
            for (int v = 0; v < kVec; ++v) dl[v] = p[q].e[v];
          }
        }
      }
    }
    return;
  }
  for (int64_t l = l0; l < l1; ++l) {  // strided or tail: element by element
    const T* sl = S + src_line(d, d.line0 + l);
    T* dl = D + dst_line(d, d.line0 + l);
    for (int v = 0; v < n; ++v) dl[(j + v) * d.dsi] = sl[pos[v] * d.si];
  }
}

template <typename T>
__device__ __forceinline__ void run_cta(const GatherDesc& d, int64_t local) {
  const int64_t a = local / d.chunks_per_line;
  const int64_t c = local - a * d.chunks_per_line;
  if (d.select_inner) {
    copy_col_tile<T>(d, a, c);
  } else {
    const int64_t chunk = kChunkBytes / static_cast<int64_t>(sizeof(T));
    const int64_t j0 = c * chunk;
    const int64_t j1 = j0 + chunk < d.out_inner ? j0 + chunk : d.out_inner;
    copy_line_chunk<T>(d, d.line0 + a, j0, j1);
  }
}

__global__ void __launch_bounds__(kThreads) gather_slices_kernel(const GatherDesc* __restrict__ descs, int n,
                                                                 int64_t total_ctas) {
  for (int64_t cta = blockIdx.x; cta < total_ctas; cta += gridDim.x) {
    const GatherDesc d = descs[find_desc(descs, n, cta)];  // a register copy: no reloads after the stores
    const int64_t local = cta - d.cta_start;
    switch (d.es) {
      case 1: run_cta<uint8_t>(d, local); break;
      case 2: run_cta<uint16_t>(d, local); break;
      case 4: run_cta<uint32_t>(d, local); break;
      default: run_cta<uint64_t>(d, local); break;
    }
  }
}

}  // namespace

cudaError_t launch_gather_slices(const GatherDesc* descs, int n, int64_t total_ctas, cudaStream_t stream) {
  if (n <= 0 || total_ctas <= 0) return cudaSuccess;
  const int64_t max_grid = int64_t(1) << 20;  // the kernel strides over the remaining CTAs
  const unsigned grid = static_cast<unsigned>(total_ctas < max_grid ? total_ctas : max_grid);
#ifdef MINITRON_SLICING_EMULATE  // host emulation of the launch for the CPU tests (tests/gpu/test_slicing_emulated.py)
  (void)stream;
  for (unsigned bx = 0; bx < grid; ++bx) {  // threads of a CTA never cooperate: running them one by one is exact
    for (unsigned tx = 0; tx < static_cast<unsigned>(kThreads); ++tx) {
      blockIdx.x = bx;
      threadIdx.x = tx;
      gridDim.x = grid;
      gather_slices_kernel(descs, n, total_ctas);
    }
  }
#else
  gather_slices_kernel<<<grid, kThreads, 0, stream>>>(descs, n, total_ctas);
#endif
  return cudaGetLastError();
}

}  // namespace slicing_cuda
}  // namespace minitron
