// FDN (eq. 8) for CUDA tensors: checks, output/workspace allocation and the launch of the kernels
// in csrc/kernels/fdn.cuh. Implements the elr_ext_native::fdn_forward / fdn_backward schemas of
// csrc/ops.cpp.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <torch/library.h>

#include <array>
#include <cmath>
#include <limits>
#include <optional>
#include <tuple>

#include "aten_wrapper_util.h"
#include "cuda/cuda_type.h"
#include "fdn_args.h"
#include "kernels/fdn.cuh"

namespace elr {
namespace {

// The CUDA-only checks; the shape/dtype/device checks shared with the CPU wrapper are in fdn_args.h
// (an unsupported dtype is reported by AT_DISPATCH).
void check_cuda_input(const at::Tensor& z) {
  // bf16 runs on every arch: the kernels only convert it (cuda_bf16.h emulates that below sm_80).
  TORCH_CHECK(z.is_cuda(), "fdn: z must be a CUDA tensor, got ", z.device());
}

// The kernels index blocks by (n, group) and (n, channel) in a 32-bit grid dimension, and the
// elements of a group in 32-bit arithmetic.
void check_grid_limits(const FdnShape& s) {
  TORCH_CHECK(s.N * s.C <= std::numeric_limits<int32_t>::max(), "fdn: N * C = ", s.N * s.C,
              " exceeds the CUDA kernels' limit of 2^31 - 1");
  TORCH_CHECK(s.group_size() <= int64_t(std::numeric_limits<uint32_t>::max()), "fdn: a group of C / G * H * W = ",
              s.group_size(), " elements exceeds the CUDA kernels' limit of 2^32 - 1");
}

at::Tensor workspace(size_t bytes, const at::Tensor& like) {
  return at::empty({static_cast<int64_t>(bytes)}, like.options().dtype(at::kByte));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> fdn_forward_cuda_op(const at::Tensor& z_in, const at::Tensor& gamma_in,
                                                                  const at::Tensor& beta_in, int64_t num_groups,
                                                                  double eps, int64_t activation) {
  check_cuda_input(z_in);
  const FdnShape s = fdn_make_shape(z_in, gamma_in, beta_in, num_groups, eps, activation);
  check_grid_limits(s);
  const c10::cuda::CUDAGuard guard(z_in.device());
  const at::Tensor z = fdn_contiguous(z_in, s, false);
  const at::Tensor gamma = fdn_contiguous(gamma_in, s, true);
  const at::Tensor beta = fdn_contiguous(beta_in, s, true);

  at::Tensor out = at::empty(z.sizes(), z.options().memory_format(fdn_memory_format(s.layout)));
  const auto stat_options = z.options().dtype(accumulation_dtype(z.scalar_type()));
  if (s.numel() == 0) {  // H * W == 0: statistics of an empty group, as of a constant one
    return {out, at::zeros({s.N, s.G}, stat_options), at::full({s.N, s.G}, 1.0 / std::sqrt(eps), stat_options)};
  }
  at::Tensor mean = at::empty({s.N, s.G}, stat_options);
  at::Tensor rstd = at::empty({s.N, s.G}, stat_options);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "fdn_forward_cuda", [&] {
    using T = typename CudaType<scalar_t>::type;
    using A = acc_t<T>;
    const at::Tensor ws = workspace(fdn_forward_workspace_bytes<T>(s), z);
    fdn_forward_cuda<T>(s, cptr<T>(z), cptr<T>(gamma), cptr<T>(beta), mptr<T>(out), mptr<A>(mean), mptr<A>(rstd),
                        ws.mutable_data_ptr(), stream);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {out, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> fdn_backward_cuda_op(
    const at::Tensor& grad_out_in, const at::Tensor& z_in, const at::Tensor& gamma_in,
    const std::optional<at::Tensor>& beta_opt, const at::Tensor& mean_in, const at::Tensor& rstd_in,
    int64_t num_groups, int64_t activation, std::array<bool, 3> output_mask) {
  check_cuda_input(z_in);
  const bool has_beta = beta_opt.has_value() && beta_opt->defined();
  // eps only enters the forward; gamma stands in for an absent beta in the shape checks.
  const FdnShape s = fdn_make_shape(z_in, gamma_in, has_beta ? *beta_opt : gamma_in, num_groups, /*eps=*/0.0,
                                    activation);
  fdn_check_backward(grad_out_in, z_in, mean_in, rstd_in, has_beta, s);
  check_grid_limits(s);
  const c10::cuda::CUDAGuard guard(z_in.device());

  const auto full_options = z_in.options().memory_format(fdn_memory_format(s.layout));
  const auto affine_sizes = gamma_in.sizes();
  const auto affine_options = s.affine_broadcast ? z_in.options() : full_options;
  at::Tensor dz = output_mask[0] ? at::empty(z_in.sizes(), full_options) : at::Tensor();
  at::Tensor dgamma = output_mask[1] ? at::empty(affine_sizes, affine_options) : at::Tensor();
  at::Tensor dbeta = output_mask[2] ? at::empty(affine_sizes, affine_options) : at::Tensor();
  if (s.numel() == 0) {  // H * W == 0: broadcast dgamma/dbeta are sums over no pixels
    if (dgamma.defined()) dgamma.zero_();
    if (dbeta.defined()) dbeta.zero_();
    return {dz, dgamma, dbeta};
  }
  if (!dz.defined() && !dgamma.defined() && !dbeta.defined()) return {dz, dgamma, dbeta};

  const at::Tensor grad_out = fdn_contiguous(grad_out_in, s, false);
  const at::Tensor z = fdn_contiguous(z_in, s, false);
  const at::Tensor gamma = fdn_contiguous(gamma_in, s, true);
  const bool need_beta = s.act != FdnActivation::None;  // only SiLU's derivative reads it
  const at::Tensor beta = need_beta ? fdn_contiguous(*beta_opt, s, true) : at::Tensor();
  const at::Tensor mean = mean_in.contiguous();
  const at::Tensor rstd = rstd_in.contiguous();
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "fdn_backward_cuda", [&] {
    using T = typename CudaType<scalar_t>::type;
    using A = acc_t<T>;
    const at::Tensor ws = workspace(fdn_backward_workspace_bytes<T>(s), z);
    fdn_backward_cuda<T>(s, cptr<T>(grad_out), cptr<T>(z), cptr<T>(gamma), cptr<T>(beta), cptr<A>(mean),
                         cptr<A>(rstd), mptr<T>(dz), mptr<T>(dgamma), mptr<T>(dbeta), ws.mutable_data_ptr(), stream);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {dz, dgamma, dbeta};
}

}  // namespace
}  // namespace elr

TORCH_LIBRARY_IMPL(elr_ext_native, CUDA, m) {
  m.impl("fdn_forward", &elr::fdn_forward_cuda_op);
  m.impl("fdn_backward", &elr::fdn_backward_cuda_op);
}
