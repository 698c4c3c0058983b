// Torch glue of the fused hidden-state loss CUDA kernel: argument checks, output allocation on the inputs'
// device, current stream; the kernel itself is csrc/cuda/hidden_loss.cu (no torch there). The op schema
// (minitron::_hidden_state_loss_fwd_native) is defined once, in csrc/cpu/hidden_loss.cpp. Built only against a
// CUDA torch.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cstdint>
#include <tuple>

#include "cuda/hidden_loss.cuh"
#include "hidden_loss_checks.h"

namespace minitron {
namespace cuda {
namespace {

std::tuple<at::Tensor, at::Tensor> hidden_state_loss_fwd_cuda(const at::Tensor& student, const at::Tensor& teacher,
                                                              const at::Tensor& weight, int64_t loss_kind,
                                                              bool need_grad) {
  const char* op = "_hidden_state_loss_fwd_native (CUDA)";
  check_hidden_loss_native_args(student, teacher, weight, loss_kind, op);
  const auto dt = student.scalar_type();
  const int64_t n = student.size(0), d = student.size(1);
  for (const at::Tensor* x : {&teacher, &weight}) {
    TORCH_CHECK(x->is_cuda() && x->device() == student.device(), op,
                ": all tensors must be on the student's CUDA device");
  }
  const c10::cuda::CUDAGuard guard(student.device());
  at::Tensor loss = at::empty({n}, student.options().dtype(at::kFloat));
  at::Tensor grad = at::empty({need_grad ? n : 0, d}, student.options());
  if (n == 0) return std::make_tuple(loss, grad);

  HiddenLossArgs args;
  args.student = student.data_ptr();
  args.teacher = teacher.data_ptr();
  args.student_stride = n > 1 ? student.stride(0) : d;
  args.teacher_stride = n > 1 ? teacher.stride(0) : d;
  args.weight = weight.data_ptr<float>();
  args.loss = loss.data_ptr<float>();
  args.grad = need_grad ? grad.data_ptr() : nullptr;
  args.n = n;
  args.d = d;
  args.loss_kind = static_cast<int>(loss_kind);
  args.dtype = dt == at::kFloat ? HiddenDtype::kFloat32
                                : (dt == at::kBFloat16 ? HiddenDtype::kBFloat16 : HiddenDtype::kFloat16);
  const cudaError_t err = hidden_state_loss_forward(args, at::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, op, ": kernel launch failed: ", cudaGetErrorString(err));
  return std::make_tuple(loss, grad);
}

}  // namespace
}  // namespace cuda
}  // namespace minitron

TORCH_LIBRARY_IMPL(minitron, CUDA, m) {
  m.impl("_hidden_state_loss_fwd_native", &minitron::cuda::hidden_state_loss_fwd_cuda);
}
