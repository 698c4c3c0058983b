// Torch glue of the CUDA KL-divergence kernel: argument checks, output/workspace allocation on the
// inputs' device, current stream; the kernel itself is csrc/cuda/kl_div.cu (no torch there).
// The op schema (minitron::_kl_div_fwd_native) is defined once, in csrc/cpu/kl_div.cpp.
// Built only against a CUDA torch (setup.py with CUDA / FORCE_CUDA=1).
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <tuple>

#include "cuda/kl_div.cuh"
#include "kl_div_checks.h"

namespace minitron {
namespace cuda {
namespace {

std::tuple<at::Tensor, at::Tensor> kl_div_fwd_cuda(const at::Tensor& student, const at::Tensor& teacher,
                                                   const at::Tensor& weight, int64_t mode, double inv_temperature,
                                                   double beta, double scale, bool need_grad) {
  minitron::check_kl_div_native_args(student, teacher, weight, mode, inv_temperature, beta);
  const auto dt = student.scalar_type();
  TORCH_CHECK(student.is_cuda() && teacher.is_cuda() && weight.is_cuda(),
              "_kl_div_fwd_native (CUDA): student, teacher and weight must all be CUDA tensors");
  TORCH_CHECK(teacher.device() == student.device() && weight.device() == student.device(),
              "_kl_div_fwd_native: student, teacher and weight must be on the same device");
  const int64_t n = student.size(0), v = student.size(1);

  const c10::cuda::CUDAGuard guard(student.device());
  at::Tensor loss = at::empty({n}, student.options().dtype(at::kFloat));
  at::Tensor grad = at::empty({need_grad ? n : 0, v}, student.options());  // [0, v]: loss only
  if (n == 0) return std::make_tuple(loss, grad);

  KlDivArgs args;
  args.student = student.data_ptr();
  args.teacher = teacher.data_ptr();
  args.student_stride = n > 1 ? student.stride(0) : v;
  args.teacher_stride = n > 1 ? teacher.stride(0) : v;
  args.weight = weight.data_ptr<float>();
  args.loss = loss.data_ptr<float>();
  args.grad = need_grad ? grad.data_ptr() : nullptr;
  args.n = n;
  args.v = v;
  args.mode = static_cast<int>(mode);
  args.inv_temperature = static_cast<float>(inv_temperature);
  args.beta = beta;
  args.scale = static_cast<float>(scale);
  args.dtype = dt == at::kFloat ? KlDtype::kFloat32 : (dt == at::kBFloat16 ? KlDtype::kBFloat16 : KlDtype::kFloat16);

  const int sm_count = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const size_t ws_bytes = kl_div_workspace_bytes(n, v, sm_count);
  at::Tensor workspace;
  if (ws_bytes > 0) workspace = at::empty({static_cast<int64_t>(ws_bytes)}, student.options().dtype(at::kByte));
  const cudaError_t err = kl_div_forward(args, ws_bytes > 0 ? workspace.data_ptr() : nullptr, ws_bytes, sm_count,
                                         at::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "_kl_div_fwd_native (CUDA): kernel launch failed: ", cudaGetErrorString(err));
  return std::make_tuple(loss, grad);
}

}  // namespace
}  // namespace cuda
}  // namespace minitron

TORCH_LIBRARY_IMPL(minitron, CUDA, m) { m.impl("_kl_div_fwd_native", &minitron::cuda::kl_div_fwd_cuda); }
