// Torch glue of the sparse (top-k teacher) KL CUDA kernel: argument checks, output/workspace allocation on the
// inputs' device, current stream; the kernel itself is csrc/cuda/topk_kl.cu (no torch there). The op schema
// (minitron::_topk_kl_div_fwd_native) is defined once, in csrc/cpu/topk_kl.cpp. Built only against a CUDA torch.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cstdint>
#include <tuple>

#include "cuda/topk_kl.cuh"
#include "topk_kl_checks.h"

namespace minitron {
namespace cuda {
namespace {

std::tuple<at::Tensor, at::Tensor> topk_kl_div_fwd_cuda(const at::Tensor& student, const at::Tensor& indices,
                                                        const at::Tensor& logprobs, const at::Tensor& weight,
                                                        const at::Tensor& labels, const at::Tensor& ce_weight,
                                                        double inv_temperature, bool tail, bool need_grad) {
  minitron::check_topk_kl_native_args(student, indices, logprobs, weight, labels, ce_weight, inv_temperature);
  for (const at::Tensor* x : {&indices, &logprobs, &weight}) {
    TORCH_CHECK(x->is_cuda() && x->device() == student.device(),
                "_topk_kl_div_fwd_native (CUDA): all tensors must be on the student's CUDA device");
  }
  const bool ce = labels.numel() > 0;
  if (ce) {
    TORCH_CHECK(labels.device() == student.device() && ce_weight.device() == student.device(),
                "_topk_kl_div_fwd_native (CUDA): labels and ce_weight must be on the student's device");
  }
  const int64_t n = student.size(0), v = student.size(1), k = indices.size(1);
  const c10::cuda::CUDAGuard guard(student.device());
  at::Tensor loss = at::empty({n}, student.options().dtype(at::kFloat));
  at::Tensor grad = at::empty({need_grad ? n : 0, v}, student.options());
  if (n == 0) return std::make_tuple(loss, grad);
  const auto dt = student.scalar_type();

  TopkKlArgs args;
  args.student = student.data_ptr();
  args.student_stride = n > 1 ? student.stride(0) : v;
  args.indices = indices.data_ptr<int64_t>();
  args.logprobs = logprobs.data_ptr<float>();
  args.weight = weight.data_ptr<float>();
  args.labels = ce ? labels.data_ptr<int64_t>() : nullptr;
  args.ce_weight = ce ? ce_weight.data_ptr<float>() : nullptr;
  args.loss = loss.data_ptr<float>();
  args.grad = need_grad ? grad.data_ptr() : nullptr;
  args.n = n;
  args.v = v;
  args.k = k;
  args.inv_temperature = static_cast<float>(inv_temperature);
  args.tail = tail;
  args.dtype = dt == at::kFloat ? TopkDtype::kFloat32 : (dt == at::kBFloat16 ? TopkDtype::kBFloat16 : TopkDtype::kFloat16);
  at::Tensor workspace =
      at::empty({static_cast<int64_t>(topk_kl_workspace_bytes(n, k))}, student.options().dtype(at::kByte));
  const cudaError_t err = topk_kl_forward(args, workspace.data_ptr(), at::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "_topk_kl_div_fwd_native (CUDA): kernel launch failed: ", cudaGetErrorString(err));
  return std::make_tuple(loss, grad);
}

}  // namespace
}  // namespace cuda
}  // namespace minitron

TORCH_LIBRARY_IMPL(minitron, CUDA, m) { m.impl("_topk_kl_div_fwd_native", &minitron::cuda::topk_kl_div_fwd_cuda); }
