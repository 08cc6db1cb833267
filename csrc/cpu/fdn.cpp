// ATen wrapper of the FDN CPU kernels (csrc/kernels/fdn.h): checks (csrc/fdn_args.h), allocates,
// picks the dtype and calls. Schemas: csrc/ops.cpp.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <array>
#include <optional>
#include <tuple>

#include "aten_wrapper_util.h"
#include "fdn_args.h"
#include "kernels/fdn.h"

namespace elr {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> fdn_forward_cpu_op(const at::Tensor& z, const at::Tensor& gamma,
                                                                  const at::Tensor& beta, int64_t num_groups,
                                                                  double eps, int64_t activation) {
  const FdnShape s = fdn_make_shape(z, gamma, beta, num_groups, eps, activation);
  const at::Tensor zc = fdn_contiguous(z, s, false);
  const at::Tensor gc = fdn_contiguous(gamma, s, true);
  const at::Tensor bc = fdn_contiguous(beta, s, true);
  at::Tensor out = at::empty(z.sizes(), z.options().memory_format(fdn_memory_format(s.layout)));
  const auto stat_options = z.options().dtype(accumulation_dtype(z.scalar_type()));
  at::Tensor mean = at::empty({s.N, s.G}, stat_options);
  at::Tensor rstd = at::empty({s.N, s.G}, stat_options);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "fdn_forward_cpu", [&] {
    using acc = acc_t<scalar_t>;
    fdn_forward_cpu<scalar_t>(s, zc.const_data_ptr<scalar_t>(), gc.const_data_ptr<scalar_t>(),
                              bc.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(),
                              mean.mutable_data_ptr<acc>(), rstd.mutable_data_ptr<acc>(), AtenParallelFor{s.numel()});
  });
  return {out, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> fdn_backward_cpu_op(
    const at::Tensor& grad_out, const at::Tensor& z, const at::Tensor& gamma, const std::optional<at::Tensor>& beta,
    const at::Tensor& mean, const at::Tensor& rstd, int64_t num_groups, int64_t activation,
    std::array<bool, 3> output_mask) {
  const bool has_beta = beta.has_value() && beta->defined();
  // eps only enters the forward; beta stands in for gamma in the shape checks when it is absent.
  const FdnShape s = fdn_make_shape(z, gamma, has_beta ? *beta : gamma, num_groups, 0.0, activation);
  fdn_check_backward(grad_out, z, mean, rstd, has_beta, s);
  const bool need_beta = s.act != FdnActivation::None;
  const at::Tensor dyc = fdn_contiguous(grad_out, s, false);
  const at::Tensor zc = fdn_contiguous(z, s, false);
  const at::Tensor gc = fdn_contiguous(gamma, s, true);
  const at::Tensor bc = need_beta ? fdn_contiguous(*beta, s, true) : at::Tensor();
  const at::Tensor mean_c = mean.contiguous(), rstd_c = rstd.contiguous();
  const auto full_options = z.options().memory_format(fdn_memory_format(s.layout));
  auto affine_grad = [&]() {
    return s.affine_broadcast ? at::empty(gamma.sizes(), z.options()) : at::empty(gamma.sizes(), full_options);
  };
  at::Tensor dz = output_mask[0] ? at::empty(z.sizes(), full_options) : at::Tensor();
  at::Tensor dgamma = output_mask[1] ? affine_grad() : at::Tensor();
  at::Tensor dbeta = output_mask[2] ? affine_grad() : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "fdn_backward_cpu", [&] {
    using acc = acc_t<scalar_t>;
    auto ptr = [](at::Tensor& t) { return t.defined() ? t.mutable_data_ptr<scalar_t>() : nullptr; };
    fdn_backward_cpu<scalar_t>(s, dyc.const_data_ptr<scalar_t>(), zc.const_data_ptr<scalar_t>(),
                               gc.const_data_ptr<scalar_t>(), need_beta ? bc.const_data_ptr<scalar_t>() : nullptr,
                               mean_c.const_data_ptr<acc>(), rstd_c.const_data_ptr<acc>(), ptr(dz), ptr(dgamma),
                               ptr(dbeta), AtenParallelFor{s.numel()});
  });
  return {dz, dgamma, dbeta};
}

}  // namespace
}  // namespace elr

TORCH_LIBRARY_IMPL(elr_ext_native, CPU, m) {
  m.impl("fdn_forward", &elr::fdn_forward_cpu_op);
  m.impl("fdn_backward", &elr::fdn_backward_cpu_op);
}
