// Torch glue of the CUDA importance-reduction and block-influence kernels: validates the tensors,
// allocates the workspace on the current stream and calls the raw-pointer launchers of
// csrc/cuda/importance.cu. Registers the CUDA implementations of the private ops defined in
// csrc/cpu/importance.cpp (TORCH_LIBRARY_FRAGMENT). Built only against a CUDA torch.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <optional>

#include "common/importance_math.h"
#include "cuda/importance.cuh"
#include "importance_checks.h"

namespace minitron {
namespace cuda {
namespace {

int elem_type(const at::Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat:
      return kElemF32;
    case at::kBFloat16:
      return kElemBF16;
    case at::kHalf:
      return kElemF16;
    default:
      TORCH_CHECK_TYPE(false, name, " must be float32, bfloat16 or float16, got ", t.scalar_type());
  }
  return kElemF32;
}

void check_same_device(const at::Tensor& ref, const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_cuda() && t.device() == ref.device(), name, " must be on ", ref.device(), ", got ", t.device());
}

const uint8_t* mask_ptr(const std::optional<at::Tensor>& mask) {
  return mask.has_value() ? reinterpret_cast<const uint8_t*>(mask->data_ptr<bool>()) : nullptr;
}

void importance_update_cuda(const at::Tensor& state, const at::Tensor& count, const at::Tensor& x_in,
                            const std::optional<at::Tensor>& mask, int64_t group_size, int64_t seq_agg,
                            int64_t batch_agg) {
  check_importance_update_args(state, count, x_in, mask, group_size, seq_agg, batch_agg);
  TORCH_CHECK(x_in.is_cuda(), "x must be a CUDA tensor");
  check_same_device(x_in, state, "state");
  check_same_device(x_in, count, "count");
  if (mask.has_value()) check_same_device(x_in, *mask, "mask");
  const int64_t U = state.size(1);
  const int64_t B = x_in.size(0), S = x_in.size(1);
  const int dt = elem_type(x_in, "x");
  TORCH_CHECK_VALUE(B <= kMaxGridYZ, "importance (cuda): batch must be <= ", kMaxGridYZ, ", got ", B,
                    " (split the batch)");
  if (B == 0 || S == 0 || U == 0) return;
  c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.stride(2) == 1 ? x_in : x_in.contiguous();

  ImportanceLaunch a;
  importance_plan(B, S, U, group_size, static_cast<int>(x.element_size()),
                  at::cuda::getCurrentDeviceProperties()->multiProcessorCount, &a.nch, &a.chunk);
  at::Tensor partial = at::empty({importance_workspace_floats(B, a.nch, U)}, x.options().dtype(at::kFloat));
  at::Tensor stats = at::empty({importance_workspace_int64s(B)}, x.options().dtype(at::kLong));
  a.x = x.data_ptr();
  a.dtype = dt;
  a.B = B;
  a.S = S;
  a.U = U;
  a.G = group_size;
  a.sxb = x.stride(0);
  a.sxs = x.stride(1);
  a.mask = mask_ptr(mask);
  a.smb = mask.has_value() ? mask->stride(0) : 0;
  a.sms = mask.has_value() ? mask->stride(1) : 0;
  a.state = state.data_ptr<float>();
  a.count = count.data_ptr<int64_t>();
  a.seq_agg = static_cast<int>(seq_agg);
  a.batch_agg = static_cast<int>(batch_agg);
  a.partial = partial.data_ptr<float>();
  a.stats = stats.data_ptr<int64_t>();
  const cudaError_t err = importance_update(a, at::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "importance_update (cuda) failed: ", cudaGetErrorString(err));
}

void block_influence_update_cuda(const at::Tensor& state, const at::Tensor& count, const at::Tensor& h_in_,
                                 const at::Tensor& h_out_, const std::optional<at::Tensor>& mask, int64_t layer) {
  check_block_influence_args(state, count, h_in_, h_out_, mask, layer);
  TORCH_CHECK(h_in_.is_cuda(), "h_in must be a CUDA tensor");
  check_same_device(h_in_, h_out_, "h_out");
  check_same_device(h_in_, state, "state");
  check_same_device(h_in_, count, "count");
  if (mask.has_value()) check_same_device(h_in_, *mask, "mask");
  const int dt = elem_type(h_in_, "h_in");
  const int64_t B = h_in_.size(0), S = h_in_.size(1), H = h_in_.size(2);
  if (B == 0 || S == 0) return;
  c10::cuda::CUDAGuard guard(h_in_.device());
  const at::Tensor ha = h_in_.stride(2) == 1 ? h_in_ : h_in_.contiguous();
  const at::Tensor hb = h_out_.stride(2) == 1 ? h_out_ : h_out_.contiguous();
  BlockInfluenceLaunch a;
  a.a = ha.data_ptr();
  a.b = hb.data_ptr();
  a.dtype = dt;
  a.B = B;
  a.S = S;
  a.H = H;
  a.sab = ha.stride(0);
  a.sas = ha.stride(1);
  a.sbb = hb.stride(0);
  a.sbs = hb.stride(1);
  a.mask = mask_ptr(mask);
  a.smb = mask.has_value() ? mask->stride(0) : 0;
  a.sms = mask.has_value() ? mask->stride(1) : 0;
  a.state = state.data_ptr<double>();
  a.count = count.data_ptr<int64_t>();
  a.num_layers = state.size(0);
  a.layer = layer;
  a.num_sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const cudaError_t err = block_influence_update(a, at::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "block_influence_update (cuda) failed: ", cudaGetErrorString(err));
}

}  // namespace
}  // namespace cuda
}  // namespace minitron

TORCH_LIBRARY_IMPL(minitron, CUDA, m) {
  m.impl("_importance_update_native", &minitron::cuda::importance_update_cuda);
  m.impl("_block_influence_update_native", &minitron::cuda::block_influence_update_cuda);
}
