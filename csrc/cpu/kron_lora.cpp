// Kronecker LoRA GEMM (eq. 9) and kron_delta for CPU tensors: checks (csrc/kron_lora_args.h),
// output allocation, the base product through the BLAS, and the fused kernels of
// csrc/kernels/kron_lora.h. Implements the elr_ext_native::kron_lora_forward / kron_lora_backward /
// kron_delta / kron_delta_backward schemas of csrc/ops.cpp with the semantics of the CUDA wrapper
// (csrc/cuda/kron_lora.cu): same outputs, same masks, same rounding of tmat / smat.
//
// The base product and the Kronecker term accumulate into one output: y = addmm(bias, x, W^T) (or
// bias alone, or nothing) and then the kernel adds scale * x dW^T into y in place; dx the same way
// from grad_y W. dW itself is never built on this path, and no output-sized temporary is made.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <optional>
#include <tuple>

#include "aten_wrapper_util.h"
#include "kernels/kron_lora.h"
#include "kron_lora_args.h"

namespace elr {
namespace {

// ---- Ops ----------------------------------------------------------------------------------------------
std::tuple<at::Tensor, at::Tensor, at::Tensor> kron_lora_forward_cpu_op(
    const at::Tensor& x_in, const at::Tensor& A_in, const at::Tensor& U_in, const at::Tensor& V_in,
    const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias, double scale,
    bool save_intermediates) {
  const KronForwardInputs in = kron_forward_inputs(x_in, A_in, U_in, V_in, weight, bias);
  const KronShape& s = in.s;
  const at::Tensor &x = in.x, &A = in.A, &U = in.U, &V = in.V;

  // The base product first; the Kronecker term is then added onto it in place.
  KronForwardOutputs out = kron_forward_outputs(s, x, weight, bias, save_intermediates);
  at::Tensor &y = out.y, &tmat = out.tmat, &smat = out.smat;
  const bool accumulate = out.accumulate;
  if (s.M == 0) return {y, tmat, smat};

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "kron_lora_forward_cpu", [&] {
    kron_lora_forward_cpu<scalar_t>(s, cptr<scalar_t>(x), cptr<scalar_t>(A), cptr<scalar_t>(U), cptr<scalar_t>(V),
                                    mptr<scalar_t>(y), accumulate, scale, mptr<scalar_t>(tmat), mptr<scalar_t>(smat),
                                    AtenParallelFor{s.M * (s.d_in() + s.d_out())});
  });
  return {y, tmat, smat};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> kron_lora_backward_cpu_op(
    const at::Tensor& grad_y_in, const at::Tensor& x_in, const at::Tensor& A_in, const at::Tensor& U_in,
    const at::Tensor& V_in, const at::Tensor& tmat_in, const at::Tensor& smat_in,
    const std::optional<at::Tensor>& weight, double scale, std::array<bool, 6> output_mask) {
  const KronBackwardInputs in = kron_backward_inputs(grad_y_in, x_in, A_in, U_in, V_in, tmat_in, smat_in, weight);
  const KronShape& s = in.s;
  const at::Tensor &gy = in.grad_y, &x = in.x, &A = in.A, &U = in.U, &V = in.V;
  // dx starts as the base gradient; the Kronecker part is added in place.
  KronBackwardOutputs g = kron_backward_outputs(s, gy, x, weight, output_mask);
  at::Tensor &dx = g.dx, &dA = g.dA, &dU = g.dU, &dV = g.dV, &dweight = g.dweight, &dbias = g.dbias;
  const bool accumulate_dx = g.accumulate_dx;
  if (!dx.defined() && !dA.defined() && !dU.defined() && !dV.defined()) return {dx, dA, dU, dV, dweight, dbias};
  // (M == 0: the kernel zeroes dA, dU, dV, the sums over no tokens.)
  const at::Tensor tmat = kron_saved_intermediate(tmat_in), smat = kron_saved_intermediate(smat_in);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "kron_lora_backward_cpu", [&] {
    kron_lora_backward_cpu<scalar_t>(s, cptr<scalar_t>(gy), cptr<scalar_t>(x), cptr<scalar_t>(A), cptr<scalar_t>(U),
                                     cptr<scalar_t>(V), cptr<scalar_t>(tmat), cptr<scalar_t>(smat), scale,
                                     mptr<scalar_t>(dx), accumulate_dx, mptr<scalar_t>(dA), mptr<scalar_t>(dU),
                                     mptr<scalar_t>(dV), AtenParallelFor{s.M * (s.d_in() + s.d_out())});
  });
  return {dx, dA, dU, dV, dweight, dbias};
}

at::Tensor kron_delta_cpu_op(const at::Tensor& A_in, const at::Tensor& U_in, const at::Tensor& V_in) {
  constexpr const char* op = "kron_delta";
  const KronShape s = kron_make_factor_shape(op, A_in, U_in, V_in);
  const at::Tensor A = A_in.contiguous(), U = U_in.contiguous(), V = V_in.contiguous();
  at::Tensor dW = at::empty({s.d_out(), s.d_in()}, A.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, A.scalar_type(), "kron_delta_cpu", [&] {
    kron_delta_cpu<scalar_t>(s, cptr<scalar_t>(A), cptr<scalar_t>(U), cptr<scalar_t>(V), mptr<scalar_t>(dW),
                             AtenParallelFor{s.d_out() * s.d_in()});
  });
  return dW;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> kron_delta_backward_cpu_op(const at::Tensor& grad_in,
                                                                         const at::Tensor& A_in,
                                                                         const at::Tensor& U_in,
                                                                         const at::Tensor& V_in,
                                                                         std::array<bool, 3> output_mask) {
  constexpr const char* op = "kron_delta_backward";
  const KronShape s = kron_make_factor_shape(op, A_in, U_in, V_in);
  kron_check_delta_grad(op, s, grad_in, A_in);
  const at::Tensor grad = grad_in.contiguous();
  const at::Tensor A = A_in.contiguous(), U = U_in.contiguous(), V = V_in.contiguous();
  KronDeltaGrads g = kron_delta_grad_outputs(s, A, output_mask);
  at::Tensor &dA = g.dA, &dU = g.dU, &dV = g.dV;
  if (!g.any()) return {dA, dU, dV};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, A.scalar_type(), "kron_delta_backward_cpu", [&] {
    kron_delta_backward_cpu<scalar_t>(s, cptr<scalar_t>(grad), cptr<scalar_t>(A), cptr<scalar_t>(U),
                                      cptr<scalar_t>(V), mptr<scalar_t>(dA), mptr<scalar_t>(dU), mptr<scalar_t>(dV),
                                      AtenParallelFor{s.d_out() * s.d_in()});
  });
  return {dA, dU, dV};
}

}  // namespace
}  // namespace elr

TORCH_LIBRARY_IMPL(elr_ext_native, CPU, m) {
  m.impl("kron_lora_forward", &elr::kron_lora_forward_cpu_op);
  m.impl("kron_lora_backward", &elr::kron_lora_backward_cpu_op);
  m.impl("kron_delta", &elr::kron_delta_cpu_op);
  m.impl("kron_delta_backward", &elr::kron_delta_backward_cpu_op);
}
