// CUDA kernel of the structured slicing ops: a multi-tensor gather of kept lines / positions.
// In-place compaction on the GPU reuses it (slicing_torch.cpp stages bounded slabs of the result).
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

// Elements [j0, j1) of output line `o` (global output line g), element type T.
template <typename T>
__device__ __forceinline__ void copy_chunk(const GatherDesc& d, int64_t o, int64_t g, int64_t j0, int64_t j1) {
  const int64_t sline = d.select_inner ? g : slicing::source_of(d.idx, g, d.block);
  const T* sl = reinterpret_cast<const T*>(d.src) + sline * d.so;
  T* dl = reinterpret_cast<T*>(d.dst) + o * d.dso;
  constexpr int64_t kVec = 16 / static_cast<int64_t>(sizeof(T));  // elements per 16-byte vector
  const bool unit_stride = d.si == 1 && d.dsi == 1;
  const bool aligned = ((reinterpret_cast<uintptr_t>(sl) | reinterpret_cast<uintptr_t>(dl)) & 15) == 0;
  if (unit_stride && aligned && (!d.select_inner || d.block % kVec == 0)) {
    // 16-byte vectors; j0 is a multiple of kChunkElems, hence of kVec. With inner selection every
    // vector lies inside one unit (block is a multiple of kVec), so its source is contiguous too.
    const int64_t nvec = (j1 - j0) / kVec;
    for (int64_t v = threadIdx.x; v < nvec; v += blockDim.x) {
      const int64_t j = j0 + v * kVec;
      const int64_t sj = d.select_inner ? slicing::source_of(d.idx, j, d.block) : j;
      *reinterpret_cast<uint4*>(dl + j) = __ldg(reinterpret_cast<const uint4*>(sl + sj));
    }
    for (int64_t j = j0 + nvec * kVec + threadIdx.x; j < j1; j += blockDim.x) {
      const int64_t sj = d.select_inner ? slicing::source_of(d.idx, j, d.block) : j;
      dl[j] = sl[sj];
    }
    return;
  }
  for (int64_t j = j0 + threadIdx.x; j < j1; j += blockDim.x) {
    const int64_t sj = d.select_inner ? slicing::source_of(d.idx, j, d.block) : j;
    dl[j * d.dsi] = sl[sj * d.si];
  }
}

__global__ void __launch_bounds__(kThreads) gather_slices_kernel(const GatherDesc* __restrict__ descs, int n,
                                                                 int64_t total_ctas) {
  for (int64_t cta = blockIdx.x; cta < total_ctas; cta += gridDim.x) {
    const GatherDesc& d = descs[find_desc(descs, n, cta)];
    const int64_t local = cta - d.cta_start;
    const int64_t o = local / d.chunks_per_line;
    const int64_t c = local - o * d.chunks_per_line;
    const int64_t j0 = c * kChunkElems;
    const int64_t j1 = j0 + kChunkElems < d.out_inner ? j0 + kChunkElems : d.out_inner;
    const int64_t g = d.line0 + o;
    switch (d.es) {
      case 1: copy_chunk<uint8_t>(d, o, g, j0, j1); break;
      case 2: copy_chunk<uint16_t>(d, o, g, j0, j1); break;
      case 4: copy_chunk<uint32_t>(d, o, g, j0, j1); break;
      default: copy_chunk<uint64_t>(d, o, g, j0, j1); break;
    }
  }
}

}  // namespace

cudaError_t launch_gather_slices(const GatherDesc* descs, int n, int64_t total_ctas, cudaStream_t stream) {
  if (n <= 0 || total_ctas <= 0) return cudaSuccess;
  const int64_t max_grid = int64_t(1) << 20;  // the kernel strides over the remaining CTAs
  const unsigned grid = static_cast<unsigned>(total_ctas < max_grid ? total_ctas : max_grid);
  gather_slices_kernel<<<grid, kThreads, 0, stream>>>(descs, n, total_ctas);
  return cudaGetLastError();
}

}  // namespace slicing_cuda
}  // namespace minitron
