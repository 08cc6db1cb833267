// Fused low-rank projections (eq. 2, docs/method.md) for CPU tensors: the checks of csrc/lowrank_proj_args.h,
// then the GEMM sequence of csrc/lowrank_proj_gemm.h on the BLAS behind at::mm (no custom kernel:
// the op is GEMMs only). Implements the elr_ext_native::lowrank_proj_forward / lowrank_proj_backward
// schemas of csrc/ops.cpp with the semantics of the CUDA wrapper (csrc/cuda/lowrank_proj.cu).
#include <ATen/ATen.h>
#include <torch/library.h>

#include <tuple>
#include <vector>

#include "lowrank_proj_args.h"
#include "lowrank_proj_gemm.h"

namespace elr {
namespace {

std::tuple<std::vector<at::Tensor>, at::Tensor> lowrank_proj_forward_cpu_op(const at::Tensor& x,
                                                                           at::TensorList downs,
                                                                           at::TensorList ups,
                                                                           at::TensorList biases) {
  const LowRankShape s = lowrank_forward_shape(x, downs, ups, biases, at::kCPU);
  return lowrank_proj_forward_gemm(s, x, downs, ups, biases);
}

std::tuple<at::Tensor, at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>> lowrank_proj_backward_cpu_op(
    at::TensorList grad_ys, const at::Tensor& x, const at::Tensor& h, at::TensorList downs, at::TensorList ups,
    bool needs_x, bool needs_downs, c10::List<bool> needs_ups, c10::List<bool> needs_biases) {
  const LowRankShape s =
      lowrank_backward_shape(grad_ys, x, h, downs, ups, needs_ups.size(), needs_biases.size(), at::kCPU);
  return lowrank_proj_backward_gemm(s, grad_ys, x, h, downs, ups, needs_x, needs_downs, needs_ups.vec(),
                                    needs_biases.vec());
}

}  // namespace
}  // namespace elr

TORCH_LIBRARY_IMPL(elr_ext_native, CPU, m) {
  m.impl("lowrank_proj_forward", &elr::lowrank_proj_forward_cpu_op);
  m.impl("lowrank_proj_backward", &elr::lowrank_proj_backward_cpu_op);
}
