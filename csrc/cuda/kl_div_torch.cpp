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

namespace minitron {
namespace cuda {
namespace {

std::tuple<at::Tensor, at::Tensor> kl_div_fwd_cuda(const at::Tensor& student, const at::Tensor& teacher,
                                                   const at::Tensor& weight, int64_t mode, double inv_temperature,
                                                   double beta, double scale) {
  TORCH_CHECK(student.dim() == 2 && teacher.dim() == 2,
              "_kl_div_fwd_native: student and teacher must be 2-D [N, V], got ", student.sizes(), " and ",
              teacher.sizes());
  TORCH_CHECK(student.sizes() == teacher.sizes(), "_kl_div_fwd_native: student ", student.sizes(), " and teacher ",
              teacher.sizes(), " differ in shape");
  TORCH_CHECK(student.scalar_type() == teacher.scalar_type(), "_kl_div_fwd_native: student (", student.scalar_type(),
              ") and teacher (", teacher.scalar_type(), ") differ in dtype");
  const auto dt = student.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kBFloat16 || dt == at::kHalf,
              "_kl_div_fwd_native: dtype must be float32, bfloat16 or float16, got ", dt);
  TORCH_CHECK(student.is_cuda() && teacher.is_cuda() && weight.is_cuda(),
              "_kl_div_fwd_native (CUDA): student, teacher and weight must all be CUDA tensors");
  TORCH_CHECK(teacher.device() == student.device() && weight.device() == student.device(),
              "_kl_div_fwd_native: student, teacher and weight must be on the same device");
  const int64_t n = student.size(0), v = student.size(1);
  TORCH_CHECK(v >= 1, "_kl_div_fwd_native: vocabulary size must be >= 1");
  for (const at::Tensor* x : {&student, &teacher}) {
    TORCH_CHECK(v == 1 || x->stride(1) == 1, "_kl_div_fwd_native: inputs must have stride(1) == 1");
    TORCH_CHECK(n <= 1 || x->stride(0) >= v, "_kl_div_fwd_native: inputs must have stride(0) >= V");
  }
  TORCH_CHECK(weight.scalar_type() == at::kFloat && weight.dim() == 1 && weight.size(0) == n && weight.is_contiguous(),
              "_kl_div_fwd_native: weight must be a contiguous float32 [N] tensor");
  TORCH_CHECK(mode >= 0 && mode <= 2, "_kl_div_fwd_native: mode must be 0 (forward), 1 (reverse) or 2 (jsd), got ",
              mode);
  TORCH_CHECK(std::isfinite(inv_temperature) && inv_temperature > 0,
              "_kl_div_fwd_native: inv_temperature must be finite and > 0, got ", inv_temperature);
  TORCH_CHECK(mode != 2 || (beta >= 0 && beta <= 1), "_kl_div_fwd_native: beta must be in [0, 1], got ", beta);

  const c10::cuda::CUDAGuard guard(student.device());
  at::Tensor loss = at::empty({n}, student.options().dtype(at::kFloat));
  at::Tensor grad = at::empty({n, v}, student.options());
  if (n == 0) return std::make_tuple(loss, grad);

  KlDivArgs args;
  args.student = student.data_ptr();
  args.teacher = teacher.data_ptr();
  args.student_stride = n > 1 ? student.stride(0) : v;
  args.teacher_stride = n > 1 ? teacher.stride(0) : v;
  args.weight = weight.data_ptr<float>();
  args.loss = loss.data_ptr<float>();
  args.grad = grad.data_ptr();
  args.n = n;
  args.v = v;
  args.mode = static_cast<int>(mode);
  args.inv_temperature = static_cast<float>(inv_temperature);
  args.beta = static_cast<float>(beta);
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
