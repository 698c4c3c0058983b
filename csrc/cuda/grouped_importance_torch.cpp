// Torch glue of the CUDA grouped importance kernels: validates the tensors, allocates the workspace on the
// current stream and calls the raw-pointer launcher of csrc/cuda/grouped_importance.cu. Registers the CUDA
// implementation of the private op defined in csrc/cpu/grouped_importance.cpp (TORCH_LIBRARY_FRAGMENT). Built
// only against a CUDA torch. The offsets' values are validated by the Python op (minitron/ops/
// grouped_importance.py) before it calls this; reading them here would synchronise the stream.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <optional>

#define MINITRON_GROUPED_IMPORTANCE_CHECKS 1
#include "common/grouped_importance_math.h"
#include "cuda/grouped_importance.cuh"

namespace minitron {
namespace cuda {
namespace {

int gi_elem_type(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kBFloat16:
      return kGiBF16;
    case at::kHalf:
      return kGiF16;
    default:
      return kGiF32;
  }
}

void gi_same_device(const at::Tensor& ref, const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_cuda() && t.device() == ref.device(), name, " must be on ", ref.device(), ", got ", t.device());
}

void grouped_importance_update_cuda(const at::Tensor& state, const at::Tensor& count, const at::Tensor& x_in,
                                    const at::Tensor& offsets_in, const std::optional<at::Tensor>& weights,
                                    int64_t group_size, int64_t seq_agg, int64_t batch_agg) {
  check_grouped_importance_args(state, count, x_in, offsets_in, weights, group_size, seq_agg, batch_agg);
  TORCH_CHECK(x_in.is_cuda(), "x must be a CUDA tensor");
  gi_same_device(x_in, state, "state");
  gi_same_device(x_in, count, "count");
  gi_same_device(x_in, offsets_in, "offsets");
  if (weights.has_value()) gi_same_device(x_in, *weights, "weights");
  const int64_t groups = state.size(0), U = state.size(2);
  const int64_t N = x_in.size(0);
  const int64_t J = offsets_in.size(0) - 1;
  if (J == 0 || N == 0 || U == 0) return;
  TORCH_CHECK_VALUE(groups <= kGiMaxGridY, "grouped importance (cuda): groups must be <= ", kGiMaxGridY);
  c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.stride(1) == 1 ? x_in : x_in.contiguous();
  const at::Tensor offsets = offsets_in.contiguous();
  at::Tensor partial = at::empty({grouped_importance_workspace_floats(J, U)}, x.options().dtype(at::kFloat));
  GroupedImportanceLaunch a;
  a.x = x.data_ptr();
  a.dtype = gi_elem_type(x);
  a.N = N;
  a.U = U;
  a.G = group_size;
  a.sxr = x.stride(0);
  a.w = weights.has_value() ? weights->data_ptr() : nullptr;
  a.wdtype = weights.has_value() ? gi_elem_type(*weights) : kGiF32;
  a.swr = weights.has_value() ? weights->stride(0) : 0;
  a.offsets = offsets.data_ptr<int64_t>();
  a.J = J;
  a.groups = groups;
  a.samples = J / groups;
  a.state = state.data_ptr<float>();
  a.count = count.data_ptr<int64_t>();
  a.seq_agg = static_cast<int>(seq_agg);
  a.batch_agg = static_cast<int>(batch_agg);
  a.partial = partial.data_ptr<float>();
  const cudaError_t err = grouped_importance_update(a, at::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "grouped_importance_update (cuda) failed: ", cudaGetErrorString(err));
}

}  // namespace
}  // namespace cuda
}  // namespace minitron

TORCH_LIBRARY_IMPL(minitron, CUDA, m) {
  m.impl("_grouped_importance_update_native", &minitron::cuda::grouped_importance_update_cuda);
}
