// Torch glue of the CUDA KL-divergence kernel: argument checks, output/workspace allocation on the
// inputs' device, current stream; the kernel itself is csrc/cuda/kl_div.cu (no torch there).
// The op schemas (minitron::_kl_div_fwd_native and the vocab-parallel _kl_div_stats_native,
// _kl_div_jsd_sums_native, _kl_div_vp_fwd_native) are defined once, in csrc/cpu/kl_div.cpp.
// Built only against a CUDA torch (setup.py with CUDA / FORCE_CUDA=1).
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <optional>
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


KlDivArgs vp_args(const at::Tensor& student, const at::Tensor& teacher, const at::Tensor& weight, int64_t mode,
                  double inv_temperature, double beta, const char* op) {
  TORCH_CHECK(student.is_cuda() && teacher.is_cuda() && weight.is_cuda(), op,
              " (CUDA): student, teacher and weight must all be CUDA tensors");
  TORCH_CHECK(teacher.device() == student.device() && weight.device() == student.device(), op,
              ": student, teacher and weight must be on the same device");
  const auto dt = student.scalar_type();
  const int64_t n = student.size(0), v = student.size(1);
  KlDivArgs args;
  args.student = student.data_ptr();
  args.teacher = teacher.data_ptr();
  args.student_stride = n > 1 ? student.stride(0) : v;
  args.teacher_stride = n > 1 ? teacher.stride(0) : v;
  args.weight = weight.data_ptr<float>();
  args.loss = nullptr;
  args.grad = nullptr;
  args.n = n;
  args.v = v;
  args.mode = static_cast<int>(mode);
  args.inv_temperature = static_cast<float>(inv_temperature);
  args.beta = beta;
  args.scale = 1.f;
  args.dtype = dt == at::kFloat ? KlDtype::kFloat32 : (dt == at::kBFloat16 ? KlDtype::kBFloat16 : KlDtype::kFloat16);
  return args;
}

void check_stats(const at::Tensor& stats, const at::Tensor& student, const char* op) {
  TORCH_CHECK(stats.scalar_type() == at::kFloat && stats.dim() == 2 && stats.size(0) == student.size(0) &&
                  stats.size(1) == 5 && stats.is_contiguous() && stats.device() == student.device(),
              op, ": stats must be a contiguous float32 [N, 5] tensor on the logits' device");
}

at::Tensor kl_div_stats_cuda(const at::Tensor& student, const at::Tensor& teacher, const at::Tensor& weight,
                             int64_t mode, double inv_temperature) {
  minitron::check_kl_div_native_args(student, teacher, weight, mode, inv_temperature, 0.5);
  const c10::cuda::CUDAGuard guard(student.device());
  KlDivArgs args = vp_args(student, teacher, weight, mode, inv_temperature, 0.5, "_kl_div_stats_native");
  at::Tensor out = at::empty({student.size(0), 5}, student.options().dtype(at::kFloat));
  if (student.size(0) == 0) return out;
  const cudaError_t err = kl_div_vp_stats(args, out.data_ptr<float>(), at::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "_kl_div_stats_native (CUDA): kernel launch failed: ", cudaGetErrorString(err));
  return out;
}

at::Tensor kl_div_jsd_sums_cuda(const at::Tensor& student, const at::Tensor& teacher, const at::Tensor& weight,
                                const at::Tensor& stats, double inv_temperature, double beta) {
  minitron::check_kl_div_native_args(student, teacher, weight, 2, inv_temperature, beta);
  check_stats(stats, student, "_kl_div_jsd_sums_native");
  const float beta_f = static_cast<float>(beta);
  TORCH_CHECK(beta_f > 0.f && beta_f < 1.f, "_kl_div_jsd_sums_native: beta must be strictly between 0 and 1 in "
              "float32 (the ends are forward / reverse KL), got ", beta);
  const c10::cuda::CUDAGuard guard(student.device());
  KlDivArgs args = vp_args(student, teacher, weight, 2, inv_temperature, beta, "_kl_div_jsd_sums_native");
  at::Tensor out = at::empty({student.size(0), 3}, student.options().dtype(at::kDouble));
  if (student.size(0) == 0) return out;
  const cudaError_t err = kl_div_vp_jsd_sums(args, stats.data_ptr<float>(), out.data_ptr<double>(),
                                             at::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "_kl_div_jsd_sums_native (CUDA): kernel launch failed: ", cudaGetErrorString(err));
  return out;
}

std::tuple<at::Tensor, at::Tensor> kl_div_vp_fwd_cuda(const at::Tensor& student, const at::Tensor& teacher,
                                                      const at::Tensor& weight, const at::Tensor& stats,
                                                      const std::optional<at::Tensor>& jsd_sums, int64_t mode,
                                                      double inv_temperature, double beta, double scale,
                                                      bool need_grad) {
  minitron::check_kl_div_native_args(student, teacher, weight, mode, inv_temperature, beta);
  check_stats(stats, student, "_kl_div_vp_fwd_native");
  const int64_t n = student.size(0), v = student.size(1);
  const float beta_f = static_cast<float>(beta);
  const bool jsd = mode == 2 && beta_f > 0.f && beta_f < 1.f;
  const double* sums = nullptr;
  if (jsd) {
    TORCH_CHECK(jsd_sums.has_value() && jsd_sums->scalar_type() == at::kDouble && jsd_sums->dim() == 2 &&
                    jsd_sums->size(0) == n && jsd_sums->size(1) == 3 && jsd_sums->is_contiguous() &&
                    jsd_sums->device() == student.device(),
                "_kl_div_vp_fwd_native: the JSD needs jsd_sums, a contiguous float64 [N, 3] tensor on the logits' "
                "device");
    sums = jsd_sums->data_ptr<double>();
  }
  const c10::cuda::CUDAGuard guard(student.device());
  KlDivArgs args = vp_args(student, teacher, weight, mode, inv_temperature, beta, "_kl_div_vp_fwd_native");
  at::Tensor loss = at::empty({n}, student.options().dtype(at::kFloat));
  at::Tensor grad = at::empty({need_grad ? n : 0, v}, student.options());
  if (n == 0) return std::make_tuple(loss, grad);
  args.loss = loss.data_ptr<float>();
  args.grad = need_grad ? grad.data_ptr() : nullptr;
  args.scale = static_cast<float>(scale);
  const cudaError_t err = kl_div_vp_forward(args, stats.data_ptr<float>(), sums, at::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "_kl_div_vp_fwd_native (CUDA): kernel launch failed: ", cudaGetErrorString(err));
  return std::make_tuple(loss, grad);
}

}  // namespace
}  // namespace cuda
}  // namespace minitron

TORCH_LIBRARY_IMPL(minitron, CUDA, m) {
  m.impl("_kl_div_fwd_native", &minitron::cuda::kl_div_fwd_cuda);
  m.impl("_kl_div_stats_native", &minitron::cuda::kl_div_stats_cuda);
  m.impl("_kl_div_jsd_sums_native", &minitron::cuda::kl_div_jsd_sums_cuda);
  m.impl("_kl_div_vp_fwd_native", &minitron::cuda::kl_div_vp_fwd_cuda);
}
