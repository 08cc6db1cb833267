// ATen-side argument handling for FDN, shared by the CPU (csrc/cpu/fdn.cpp) and CUDA
// (csrc/cuda/fdn.cu) wrappers: one place that checks inputs, picks the memory layout and makes
// the tensors contiguous in it. The Python API (elr_ext/ops/fdn.py) validates user input with
// friendlier messages first; these checks guard direct torch.ops calls.
#pragma once

#include <ATen/ATen.h>

#include "aten_wrapper_util.h"
#include "kernels/fdn_common.h"

namespace elr {

// The layout the kernels will use for z (and every full-size tensor of the call).
inline FdnLayout fdn_pick_layout(const at::Tensor& z) {
  if (z.is_contiguous()) return FdnLayout::NCHW;
  if (z.is_contiguous(at::MemoryFormat::ChannelsLast)) return FdnLayout::NHWC;
  return FdnLayout::NCHW;  // arbitrary strides: copied to NCHW
}

inline at::MemoryFormat fdn_memory_format(FdnLayout layout) {
  return layout == FdnLayout::NHWC ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
}

inline FdnShape fdn_make_shape(const at::Tensor& z, const at::Tensor& gamma, const at::Tensor& beta,
                               int64_t num_groups, double eps, int64_t activation) {
  TORCH_CHECK(z.dim() == 4, "fdn: z must be 4-D [N, C, H, W], got ", z.dim(), "-D");
  TORCH_CHECK(z.size(0) > 0, "fdn: z must have a non-empty batch, got N=0");
  TORCH_CHECK(num_groups >= 1 && z.size(1) % num_groups == 0,
              "fdn: num_groups=", num_groups, " must divide C=", z.size(1));
  TORCH_CHECK(activation == 0 || activation == 1, "fdn: activation code must be 0 (none) or 1 (silu)");
  const auto N = z.size(0), C = z.size(1);
  const bool broadcast = gamma.sizes() == at::IntArrayRef({N, C, 1, 1}) && z.size(2) * z.size(3) != 1;
  for (const at::Tensor* t : {&gamma, &beta}) {
    const char* name = t == &gamma ? "gamma" : "beta";
    TORCH_CHECK(t->sizes() == z.sizes() || t->sizes() == at::IntArrayRef({N, C, 1, 1}), "fdn: ", name,
                " must have shape ", z.sizes(), " or [", N, ", ", C, ", 1, 1], got ", t->sizes());
    TORCH_CHECK(t->scalar_type() == z.scalar_type(), "fdn: ", name, " dtype ", t->scalar_type(),
                " differs from z dtype ", z.scalar_type());
    TORCH_CHECK(t->device() == z.device(), "fdn: ", name, " is on ", t->device(), " but z is on ", z.device());
  }
  TORCH_CHECK(gamma.sizes() == beta.sizes(), "fdn: gamma ", gamma.sizes(), " and beta ", beta.sizes(),
              " must have the same shape");
  FdnShape s;
  s.N = N;
  s.C = C;
  s.HW = z.size(2) * z.size(3);
  s.G = num_groups;
  s.layout = fdn_pick_layout(z);
  s.affine_broadcast = broadcast;
  s.act = activation == 1 ? FdnActivation::SiLU : FdnActivation::None;
  s.eps = eps;
  return s;
}

// A full-size tensor (z, out, grad_out, full gamma/beta) contiguous in the call's layout, or an
// affine tensor as [N, C] contiguous when the call broadcasts it.
inline at::Tensor fdn_contiguous(const at::Tensor& t, const FdnShape& s, bool affine) {
  if (affine && s.affine_broadcast) return t.reshape({s.N, s.C}).contiguous();
  return t.contiguous(fdn_memory_format(s.layout));
}

// fdn_backward's other inputs: grad_out like z, mean/rstd [N, G] in the statistics dtype, and beta
// present when the activation needs the pre-activation (SiLU).
inline void fdn_check_backward(const at::Tensor& grad_out, const at::Tensor& z, const at::Tensor& mean,
                               const at::Tensor& rstd, bool has_beta, const FdnShape& s) {
  TORCH_CHECK(grad_out.sizes() == z.sizes(), "fdn_backward: grad_out must have z's shape ", z.sizes(), ", got ",
              grad_out.sizes());
  TORCH_CHECK(grad_out.scalar_type() == z.scalar_type(), "fdn_backward: grad_out dtype ", grad_out.scalar_type(),
              " differs from z dtype ", z.scalar_type());
  TORCH_CHECK(grad_out.device() == z.device(), "fdn_backward: grad_out is on ", grad_out.device(), " but z is on ",
              z.device());
  const auto stat_dtype = accumulation_dtype(z.scalar_type());
  for (const at::Tensor* t : {&mean, &rstd}) {
    const char* name = t == &mean ? "mean" : "rstd";
    TORCH_CHECK(t->sizes() == at::IntArrayRef({s.N, s.G}), "fdn_backward: ", name, " must have shape [", s.N, ", ",
                s.G, "], got ", t->sizes());
    TORCH_CHECK(t->scalar_type() == stat_dtype, "fdn_backward: ", name, " must be ", stat_dtype, " for z dtype ",
                z.scalar_type(), ", got ", t->scalar_type());
    TORCH_CHECK(t->device() == z.device(), "fdn_backward: ", name, " is on ", t->device(), " but z is on ",
                z.device());
  }
  TORCH_CHECK(has_beta || s.act == FdnActivation::None,
              "fdn_backward: beta is required when the activation is silu (activation=1)");
}

}  // namespace elr
