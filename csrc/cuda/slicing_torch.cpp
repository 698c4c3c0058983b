// Torch glue of the CUDA slicing kernels (built only against a CUDA torch): implements
// torch.ops.minitron._gather_slices_native (tensors of up to 3 dims, up to two cut dims each) and
// _compact_native (1-D/2-D) for the CUDA dispatch key.
// The schemas are defined in csrc/cpu/slicing.cpp. Arguments are validated in Python
// (minitron/ops/slicing.py); the checks here guard memory accesses only. Index values are not
// re-checked here (that would need a device-to-host copy); the Python layer checked them.
//
// compact_ on the GPU: output lines are produced in slabs of at most MINITRON_COMPACT_SCRATCH_BYTES
// (default 64 MiB, at least one line): gather the slab into a scratch buffer, then copy it to its
// final place. Slabs go in increasing order; a slab's destination never reaches the source of a
// later line (sorted index), so the extra memory is the scratch, not the tensor.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "common/slicing_math.h"
#include "cuda/slicing.cuh"

namespace minitron {
namespace slicing_cuda {
namespace {

using slicing::Layout;

bool col_major_of(const at::Tensor& t) {
  return t.dim() == 2 && slicing::is_col_major(t.size(0), t.size(1), t.stride(0), t.stride(1));
}

Layout layout_of(const at::Tensor& t, bool col_major) {
  return slicing::make_layout(static_cast<int>(t.dim()), t.sizes().data(), t.strides().data(), col_major);
}

struct Cut {
  int64_t dim;
  const at::Tensor* idx;
  int64_t block;
};

void check_cut(const at::Tensor& t, const Cut& c, const char* what) {
  TORCH_CHECK(c.dim >= 0 && c.dim < t.dim(), what, ": dim out of range");
  TORCH_CHECK(c.block >= 1 && t.size(c.dim) % c.block == 0, what, ": block must divide the size along dim");
  const at::Tensor& idx = *c.idx;
  TORCH_CHECK(idx.dim() == 1 && idx.scalar_type() == at::kLong && idx.is_contiguous() && idx.device() == t.device(),
              what, ": index must be a contiguous 1-D int64 tensor on the tensor's device");
  TORCH_CHECK(idx.numel() <= t.size(c.dim) / c.block, what, ": index has more entries than units");
}

void check_tensor(const at::Tensor& t, const char* what) {
  TORCH_CHECK(t.is_cuda(), what, ": CUDA tensor expected");
  TORCH_CHECK(t.dim() >= 1 && t.dim() <= 3, what, ": tensor must be 1-D, 2-D or 3-D");
  const int64_t es = static_cast<int64_t>(t.element_size());
  TORCH_CHECK(es == 1 || es == 2 || es == 4 || es == 8, what, ": unsupported element size ", es);
}

// Descriptor for output lines [line0, line0 + n_lines) of `src` cut by `cuts` (canonical axes of
// csrc/common/slicing_math.h, in the source's memory order), written to `dst` with canonical destination
// strides (dsg, dso, dsi).
GatherDesc describe(const at::Tensor& src, const Cut* cuts, int ncuts, void* dst, int64_t dsg, int64_t dso,
                    int64_t dsi, int64_t line0, int64_t n_lines) {
  const int nd = static_cast<int>(src.dim());
  int order[3];
  slicing::dim_order(nd, src.sizes().data(), src.strides().data(), order);
  const slicing::Axes ax = slicing::axes_of(nd, order);
  const int64_t* sz = src.sizes().data();
  const int64_t* st = src.strides().data();
  int64_t out[3] = {1, 1, 1};
  for (int d = 0; d < nd; ++d) out[d] = sz[d];
  GatherDesc d{};
  d.gblock = d.lblock = d.iblock = 1;
  for (int c = 0; c < ncuts; ++c) {
    const int64_t* p = cuts[c].idx->data_ptr<int64_t>();
    out[cuts[c].dim] = cuts[c].idx->numel() * cuts[c].block;
    if (cuts[c].dim == ax.g) {
      d.gidx = p;
      d.gblock = cuts[c].block;
    } else if (cuts[c].dim == ax.l) {
      d.lidx = p;
      d.lblock = cuts[c].block;
    } else {
      d.iidx = p;
      d.iblock = cuts[c].block;
    }
  }
  const int64_t src_inner = sz[ax.i];
  d.src = static_cast<const char*>(src.data_ptr());
  d.dst = static_cast<char*>(dst);
  d.out_lines = n_lines;
  d.lines_per_group = std::max<int64_t>(1, slicing::extent_of(out, ax.l));
  d.out_inner = out[ax.i];
  d.sg = slicing::stride_of(st, ax.g);
  d.si = src_inner <= 1 ? 1 : st[ax.i];
  d.so = slicing::extent_of(sz, ax.l) <= 1 ? src_inner * d.si : slicing::stride_of(st, ax.l);
  d.dsg = dsg;
  d.dso = dso;
  d.dsi = dsi;
  d.line0 = line0;
  d.es = static_cast<int32_t>(src.element_size());
  d.select_inner = d.iidx != nullptr ? 1 : 0;
  return d;
}

// Uploads the descriptors and launches one gather over all of them (on the current stream).
void launch(std::vector<GatherDesc>& descs, const at::Device& device) {
  int64_t total = 0;
  std::vector<GatherDesc> live;
  live.reserve(descs.size());
  for (GatherDesc& d : descs) {
    const int64_t n = gather_ctas(d);
    if (n == 0) continue;
    d.cta_start = total;
    total += n;
    live.push_back(d);
  }
  if (total == 0) return;
  const int64_t bytes = static_cast<int64_t>(live.size() * sizeof(GatherDesc));
  // Pinned staging buffer + asynchronous copy on the current stream: no host/device synchronisation per
  // call. The caching host allocator keeps the pinned block until the copy has run; the device buffer is
  // freed stream-ordered after the kernel.
  at::Tensor host = at::empty({bytes}, at::TensorOptions().dtype(at::kByte).device(at::kCPU).pinned_memory(true));
  std::memcpy(host.data_ptr(), live.data(), static_cast<size_t>(bytes));
  at::Tensor dev = host.to(at::TensorOptions().device(device), /*non_blocking=*/true);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device.index()).stream();
  C10_CUDA_CHECK(launch_gather_slices(reinterpret_cast<const GatherDesc*>(dev.data_ptr()),
                                      static_cast<int>(live.size()), total, stream));
}

// dims2 / blocks2: the second cut of each tensor (dims2[i] == -1: none; empty: no tensor has one); the second
// cuts' indices follow the n first ones in `indices` (schema in csrc/cpu/slicing.cpp).
void gather_slices_cuda(at::TensorList tensors, at::TensorList indices, at::IntArrayRef dims,
                        at::IntArrayRef blocks, at::TensorList outs, at::IntArrayRef dims2, at::IntArrayRef blocks2) {
  const size_t n = tensors.size();
  const bool two = !dims2.empty();
  size_t m = 0;
  if (two) {
    TORCH_CHECK(dims2.size() == n && blocks2.size() == n,
                "_gather_slices_native: dims2 and blocks2 must be empty or have one entry per tensor");
    for (size_t i = 0; i < n; ++i) m += dims2[i] != -1 ? 1 : 0;
  }
  TORCH_CHECK(indices.size() == n + m && dims.size() == n && blocks.size() == n && outs.size() == n,
              "_gather_slices_native: tensors, indices (plus one per second cut), dims, blocks and outs must have ",
              "the same length");
  if (n == 0) return;
  const c10::cuda::CUDAGuard guard(tensors[0].device());
  std::vector<GatherDesc> descs;
  descs.reserve(n);
  size_t next2 = n;
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& t = tensors[i];
    const at::Tensor& o = outs[i];
    check_tensor(t, "_gather_slices_native");
    Cut cuts[2] = {Cut{dims[i], &indices[i], blocks[i]}, Cut{-1, nullptr, 1}};
    const int ncuts = two && dims2[i] != -1 ? 2 : 1;
    if (ncuts == 2) cuts[1] = Cut{dims2[i], &indices[next2++], blocks2[i]};
    for (int c = 0; c < ncuts; ++c) check_cut(t, cuts[c], "_gather_slices_native");
    TORCH_CHECK(ncuts == 1 || cuts[0].dim != cuts[1].dim, "_gather_slices_native: the two cut dims must differ");
    TORCH_CHECK(t.device() == tensors[0].device() && o.device() == t.device(),
                "_gather_slices_native: all tensors and outs must be on one device");
    TORCH_CHECK(o.scalar_type() == t.scalar_type() && o.dim() == t.dim(),
                "_gather_slices_native: out[", i, "] must match the tensor's dtype and rank");
    for (int64_t d = 0; d < t.dim(); ++d) {
      int64_t want = t.size(d);
      for (int c = 0; c < ncuts; ++c)
        if (d == cuts[c].dim) want = cuts[c].idx->numel() * cuts[c].block;
      TORCH_CHECK(o.size(d) == want, "_gather_slices_native: out[", i, "] has wrong size");
    }
    if (o.numel() == 0) continue;
    // Destination strides in the source's canonical axes.
    const int nd = static_cast<int>(t.dim());
    int order[3];
    slicing::dim_order(nd, t.sizes().data(), t.strides().data(), order);
    const slicing::Axes ax = slicing::axes_of(nd, order);
    const int64_t* osz = o.sizes().data();
    const int64_t* ost = o.strides().data();
    const int64_t dsi = osz[ax.i] <= 1 ? 1 : ost[ax.i];
    const int64_t dso = slicing::extent_of(osz, ax.l) <= 1 ? osz[ax.i] * dsi : slicing::stride_of(ost, ax.l);
    const int64_t lines = slicing::extent_of(osz, ax.g) * slicing::extent_of(osz, ax.l);
    descs.push_back(describe(t, cuts, ncuts, o.data_ptr(), slicing::stride_of(ost, ax.g), dso, dsi, 0, lines));
  }
  launch(descs, tensors[0].device());
}

int64_t scratch_bytes() {
  const char* s = std::getenv("MINITRON_COMPACT_SCRATCH_BYTES");
  if (s != nullptr && *s != '\0') {
    const long long v = std::atoll(s);
    if (v > 0) return static_cast<int64_t>(v);
  }
  return int64_t(64) << 20;
}

void compact_cuda(const at::Tensor& tensor, const at::Tensor& index, int64_t dim, int64_t block,
                  at::IntArrayRef new_strides) {
  check_tensor(tensor, "_compact_native");
  TORCH_CHECK(tensor.dim() <= 2, "_compact_native: tensor must be 1-D or 2-D (the Python layer compacts a 3-D ",
              "tensor as a 2-D view)");
  const Cut cut{dim, &index, block};
  check_cut(tensor, cut, "_compact_native");
  TORCH_CHECK(static_cast<int64_t>(new_strides.size()) == tensor.dim(), "_compact_native: new_strides has wrong length");
  const c10::cuda::CUDAGuard guard(tensor.device());
  const bool cm = col_major_of(tensor);
  const Layout L = layout_of(tensor, cm);
  TORCH_CHECK(slicing::is_non_overlapping(L), "_compact_native: tensor has overlapping memory");
  const int64_t k = index.numel() * block;
  const bool select_inner = dim == L.inner_dim;
  const int64_t out_lines = select_inner ? L.outer : k;
  const int64_t out_inner = select_inner ? k : L.inner;
  if (out_lines == 0 || out_inner == 0) return;
  std::vector<int64_t> new_sizes(tensor.sizes().begin(), tensor.sizes().end());
  new_sizes[dim] = k;
  // Same rule as the CPU kernel: keep the strides, or pack an inner selection of a dense tensor.
  const Layout D = slicing::make_layout(static_cast<int>(tensor.dim()), new_sizes.data(), new_strides.data(), cm);
  const Layout same = slicing::make_layout(static_cast<int>(tensor.dim()), new_sizes.data(), tensor.strides().data(), cm);
  const bool keep = D.so == same.so && D.si == same.si;
  const bool packed = select_inner && slicing::is_dense(L) && D.si == 1 && D.so == out_inner;
  TORCH_CHECK(keep || packed, "_compact_native: new_strides must be the tensor's strides or the packed strides");
  at::Tensor view = tensor.as_strided(new_sizes, new_strides, tensor.storage_offset());
  const int64_t line_bytes = out_inner * static_cast<int64_t>(tensor.element_size());
  const int64_t per_slab = std::max<int64_t>(1, scratch_bytes() / line_bytes);
  for (int64_t l0 = 0; l0 < out_lines; l0 += per_slab) {
    const int64_t n = std::min(per_slab, out_lines - l0);
    at::Tensor scratch = at::empty({n, out_inner}, tensor.options());
    std::vector<GatherDesc> descs{describe(tensor, &cut, 1, scratch.data_ptr(), 0, out_inner, 1, l0, n)};
    launch(descs, tensor.device());
    if (L.outer_dim < 0) view.copy_(scratch.reshape({-1}));
    else if (L.outer_dim == 0) view.narrow(0, l0, n).copy_(scratch);
    else view.narrow(1, l0, n).copy_(scratch.t());
  }
}

}  // namespace
}  // namespace slicing_cuda
}  // namespace minitron

TORCH_LIBRARY_IMPL(minitron, CUDA, m) {
  m.impl("_gather_slices_native", &minitron::slicing_cuda::gather_slices_cuda);
  m.impl("_compact_native", &minitron::slicing_cuda::compact_cuda);
}
