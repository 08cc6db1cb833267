// ATen-side argument checks for the Kronecker LoRA ops (kron_lora_forward / kron_lora_backward /
// kron_delta / kron_delta_backward), shared by the CPU and CUDA wrappers: one place that turns the
// tensors into a KronShape and says, naming the argument, which shape, dtype or device it expected.
// The Python API validates user input with friendlier messages first; these checks guard direct
// torch.ops calls. Device-specific checks (CUDA tensor, bf16 support) stay in the wrappers.
#pragma once

#include <ATen/ATen.h>

#include <array>
#include <optional>

#include "kernels/kron_lora_common.h"

namespace elr {

inline bool kron_has(const std::optional<at::Tensor>& t) { return t.has_value() && t->defined(); }

// A saved tmat / smat counts as given when it has elements (the forward returns empty tensors when
// it did not save them; the backward then recomputes them).
inline bool kron_has_intermediate(const at::Tensor& t) { return t.defined() && t.numel() > 0; }

// `t` (argument `name`) has dtype and device of `like` (argument `like_name`).
inline void kron_check_like(const char* op, const char* name, const at::Tensor& t, const char* like_name,
                            const at::Tensor& like) {
  TORCH_CHECK(t.scalar_type() == like.scalar_type(), op, ": ", name, " must have ", like_name, "'s dtype ",
              like.scalar_type(), ", got ", t.scalar_type());
  TORCH_CHECK(t.device() == like.device(), op, ": ", name, " must be on ", like_name, "'s device ", like.device(),
              ", got ", t.device());
}

inline void kron_check_sizes(const char* op, const char* name, const at::Tensor& t, at::IntArrayRef expected,
                             const char* what) {
  TORCH_CHECK(t.sizes() == expected, op, ": ", name, " must have shape ", expected, " (", what, "), got ",
              t.sizes());
}

// The factors A [T, a1, a2], U [T, b1, r], V [T, r, b2]: all dimensions >= 1, the same T and r, one
// floating dtype and device (A's). Returns the shape with M = 0.
inline KronShape kron_make_factor_shape(const char* op, const at::Tensor& A, const at::Tensor& U,
                                        const at::Tensor& V) {
  TORCH_CHECK(A.dim() == 3, op, ": A must be 3-D [T, a1, a2], got ", A.dim(), "-D ", A.sizes());
  TORCH_CHECK(U.dim() == 3, op, ": U must be 3-D [T, b1, r], got ", U.dim(), "-D ", U.sizes());
  TORCH_CHECK(V.dim() == 3, op, ": V must be 3-D [T, r, b2], got ", V.dim(), "-D ", V.sizes());
  const auto st = A.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kDouble || st == at::kHalf || st == at::kBFloat16, op,
              ": A must be float32, float64, float16 or bfloat16, got ", st);
  kron_check_like(op, "U", U, "A", A);
  kron_check_like(op, "V", V, "A", A);
  KronShape s;
  s.T = A.size(0);
  s.a1 = A.size(1);
  s.a2 = A.size(2);
  s.b1 = U.size(1);
  s.r = U.size(2);
  s.b2 = V.size(2);
  TORCH_CHECK(s.T >= 1 && s.a1 >= 1 && s.a2 >= 1, op, ": A [T, a1, a2] must have no empty dimension, got ",
              A.sizes());
  TORCH_CHECK(s.b1 >= 1 && s.r >= 1, op, ": U [T, b1, r] must have no empty dimension, got ", U.sizes());
  kron_check_sizes(op, "U", U, {s.T, s.b1, s.r}, "[T, b1, r] with A's T");
  TORCH_CHECK(s.b2 >= 1, op, ": V [T, r, b2] must have no empty dimension, got ", V.sizes());
  kron_check_sizes(op, "V", V, {s.T, s.r, s.b2}, "[T, r, b2] with A's T and U's r");
  return s;
}

// kron_lora_*: x [M, d_in] with d_in = a2 * b2, the factors' dtype and device.
inline KronShape kron_make_shape(const char* op, const at::Tensor& x, const at::Tensor& A, const at::Tensor& U,
                                 const at::Tensor& V) {
  TORCH_CHECK(x.dim() == 2, op, ": x must be 2-D [M, d_in] (leading dimensions flattened), got ", x.dim(), "-D ",
              x.sizes());
  KronShape s = kron_make_factor_shape(op, A, U, V);
  kron_check_like(op, "A", A, "x", x);
  s.M = x.size(0);
  TORCH_CHECK(x.size(1) == s.d_in(), op, ": x must have d_in = a2 * b2 = ", s.a2, " * ", s.b2, " = ", s.d_in(),
              " columns (A ", A.sizes(), ", V ", V.sizes(), "), got x ", x.sizes());
  return s;
}

// The optional frozen base: weight [d_out, d_in], bias [d_out], x's dtype and device.
inline void kron_check_base(const char* op, const KronShape& s, const at::Tensor& x,
                            const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias) {
  if (kron_has(weight)) {
    kron_check_sizes(op, "weight", *weight, {s.d_out(), s.d_in()}, "[d_out, d_in] = [a1 * b1, a2 * b2]");
    kron_check_like(op, "weight", *weight, "x", x);
  }
  if (kron_has(bias)) {
    kron_check_sizes(op, "bias", *bias, {s.d_out()}, "[d_out] = [a1 * b1]");
    kron_check_like(op, "bias", *bias, "x", x);
  }
}

// kron_lora_backward's other inputs: grad_y [M, d_out]; tmat [M, a2, T*r] and smat [M, a1, T*r],
// each either empty (recomputed) or of that shape; all in x's dtype and on its device.
inline void kron_check_backward(const char* op, const KronShape& s, const at::Tensor& x, const at::Tensor& grad_y,
                                const at::Tensor& tmat, const at::Tensor& smat) {
  kron_check_sizes(op, "grad_y", grad_y, {s.M, s.d_out()}, "[M, d_out] = [M, a1 * b1]");
  kron_check_like(op, "grad_y", grad_y, "x", x);
  if (kron_has_intermediate(tmat)) {
    kron_check_sizes(op, "tmat", tmat, {s.M, s.a2, s.rank_cols()}, "[M, a2, T * r], or empty to recompute it");
    kron_check_like(op, "tmat", tmat, "x", x);
  }
  if (kron_has_intermediate(smat)) {
    kron_check_sizes(op, "smat", smat, {s.M, s.a1, s.rank_cols()}, "[M, a1, T * r], or empty to recompute it");
    kron_check_like(op, "smat", smat, "x", x);
  }
}

// kron_delta_backward's grad: [d_out, d_in] = [a1 * b1, a2 * b2], A's dtype and device.
inline void kron_check_delta_grad(const char* op, const KronShape& s, const at::Tensor& grad, const at::Tensor& A) {
  kron_check_sizes(op, "grad", grad, {s.d_out(), s.d_in()}, "[a1 * b1, a2 * b2], kron_delta's output");
  kron_check_like(op, "grad", grad, "A", A);
}

// kron_lora_forward's inputs after every shape / dtype / device check, contiguous.
struct KronForwardInputs {
  KronShape s;
  at::Tensor x, A, U, V;
};
inline KronForwardInputs kron_forward_inputs(const at::Tensor& x, const at::Tensor& A, const at::Tensor& U,
                                             const at::Tensor& V, const std::optional<at::Tensor>& weight,
                                             const std::optional<at::Tensor>& bias) {
  constexpr const char* op = "kron_lora_forward";
  KronForwardInputs in;
  in.s = kron_make_shape(op, x, A, U, V);
  kron_check_base(op, in.s, x, weight, bias);
  in.x = x.contiguous(), in.A = A.contiguous(), in.U = U.contiguous(), in.V = V.contiguous();
  return in;
}

// kron_lora_backward's inputs after every check, contiguous; tmat / smat (the forward's, or empty
// to recompute them) are left as given.
struct KronBackwardInputs {
  KronShape s;
  at::Tensor grad_y, x, A, U, V;
};
inline KronBackwardInputs kron_backward_inputs(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& A,
                                               const at::Tensor& U, const at::Tensor& V, const at::Tensor& tmat,
                                               const at::Tensor& smat, const std::optional<at::Tensor>& weight) {
  constexpr const char* op = "kron_lora_backward";
  KronBackwardInputs in;
  in.s = kron_make_shape(op, x, A, U, V);
  kron_check_base(op, in.s, x, weight, std::nullopt);
  kron_check_backward(op, in.s, x, grad_y, tmat, smat);
  in.grad_y = grad_y.contiguous(), in.x = x.contiguous();
  in.A = A.contiguous(), in.U = U.contiguous(), in.V = V.contiguous();
  return in;
}

// A saved tmat / smat made contiguous, or an undefined tensor when it was not saved.
inline at::Tensor kron_saved_intermediate(const at::Tensor& t) {
  return kron_has_intermediate(t) ? t.contiguous() : at::Tensor();
}

// The outputs of kron_lora_forward, allocated the same way by every wrapper. y starts as the base
// product (addmm(bias, x, W^T), or bias alone) that the kernel then adds the Kronecker term onto in
// place (accumulate), or uninitialised when there is no base (the kernel writes it). tmat / smat
// are [0, ...] when autograd does not keep them.
struct KronForwardOutputs {
  at::Tensor y, tmat, smat;
  bool accumulate;
};
inline KronForwardOutputs kron_forward_outputs(const KronShape& s, const at::Tensor& x,
                                               const std::optional<at::Tensor>& weight,
                                               const std::optional<at::Tensor>& bias, bool save_intermediates) {
  KronForwardOutputs out;
  out.accumulate = true;
  if (kron_has(weight)) {
    out.y = kron_has(bias) ? at::addmm(*bias, x, weight->t()) : at::mm(x, weight->t());
    if (!out.y.is_contiguous()) out.y = out.y.contiguous();
  } else if (kron_has(bias)) {
    // clone, not contiguous(): for M == 1 the expanded bias already counts as contiguous, and y
    // (written in place) would alias the caller's bias.
    out.y = bias->expand({s.M, s.d_out()}).clone(at::MemoryFormat::Contiguous);
  } else {
    out.y = at::empty({s.M, s.d_out()}, x.options());
    out.accumulate = false;
  }
  out.tmat = at::empty({save_intermediates ? s.M : 0, s.a2, s.rank_cols()}, x.options());
  out.smat = at::empty({save_intermediates ? s.M : 0, s.a1, s.rank_cols()}, x.options());
  return out;
}

// The gradients of kron_lora_backward that output_mask asks for (undefined otherwise). dx starts as
// the base gradient grad_y W (accumulate_dx) when there is a base weight; dweight and dbias are
// complete here (plain BLAS products); dA, dU, dV are left for the kernel.
struct KronBackwardOutputs {
  at::Tensor dx, dA, dU, dV, dweight, dbias;
  bool accumulate_dx;
};
inline KronBackwardOutputs kron_backward_outputs(const KronShape& s, const at::Tensor& grad_y, const at::Tensor& x,
                                                 const std::optional<at::Tensor>& weight,
                                                 const std::array<bool, 6>& output_mask) {
  const auto opts = x.options();
  KronBackwardOutputs g;
  g.accumulate_dx = false;
  if (output_mask[0]) {
    if (kron_has(weight)) {
      g.dx = at::mm(grad_y, *weight);
      if (!g.dx.is_contiguous()) g.dx = g.dx.contiguous();
      g.accumulate_dx = true;
    } else {
      g.dx = at::empty({s.M, s.d_in()}, opts);
    }
  }
  if (output_mask[1]) g.dA = at::empty({s.T, s.a1, s.a2}, opts);
  if (output_mask[2]) g.dU = at::empty({s.T, s.b1, s.r}, opts);
  if (output_mask[3]) g.dV = at::empty({s.T, s.r, s.b2}, opts);
  if (output_mask[4]) g.dweight = at::mm(grad_y.t(), x);
  if (output_mask[5]) g.dbias = grad_y.sum(0);
  return g;
}

// The gradients of kron_delta_backward that output_mask asks for (undefined otherwise), A's dtype
// and device.
struct KronDeltaGrads {
  at::Tensor dA, dU, dV;
  bool any() const { return dA.defined() || dU.defined() || dV.defined(); }
};
inline KronDeltaGrads kron_delta_grad_outputs(const KronShape& s, const at::Tensor& A,
                                              const std::array<bool, 3>& output_mask) {
  const auto opts = A.options();
  KronDeltaGrads g;
  if (output_mask[0]) g.dA = at::empty({s.T, s.a1, s.a2}, opts);
  if (output_mask[1]) g.dU = at::empty({s.T, s.b1, s.r}, opts);
  if (output_mask[2]) g.dV = at::empty({s.T, s.r, s.b2}, opts);
  return g;
}

}  // namespace elr
