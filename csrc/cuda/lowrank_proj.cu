// Fused low-rank projections (eq. 2, docs/method.md) for CUDA tensors: the checks of
// csrc/lowrank_proj_args.h, then the GEMM sequence of csrc/lowrank_proj_gemm.h, here on cuBLAS /
// cuBLASLt through at::mm and at::addmm (fp16/bf16 inputs accumulate in fp32 there; the bias of
// y_j = h_j A_j^T + b_j goes to cuBLASLt's bias epilogue where ATen can use it). No custom CUDA
// kernel: the op is GEMMs only, and a fused bias/split epilogue would save nothing cuBLASLt does
// not already fuse, so there is nothing for tests/cuda_sim to run. Implements the
// elr_ext_native::lowrank_proj_forward / lowrank_proj_backward schemas of csrc/ops.cpp with the
// semantics of the CPU wrapper.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <tuple>
#include <vector>

#include "lowrank_proj_args.h"
#include "lowrank_proj_gemm.h"

namespace elr {
namespace {

std::tuple<std::vector<at::Tensor>, at::Tensor> lowrank_proj_forward_cuda_op(const at::Tensor& x,
                                                                            at::TensorList downs,
                                                                            at::TensorList ups,
                                                                            at::TensorList biases) {
  const LowRankShape s = lowrank_forward_shape(x, downs, ups, biases, at::kCUDA);
  const c10::cuda::CUDAGuard guard(x.device());
  return lowrank_proj_forward_gemm(s, x, downs, ups, biases);
}

std::tuple<at::Tensor, at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>> lowrank_proj_backward_cuda_op(
    at::TensorList grad_ys, const at::Tensor& x, const at::Tensor& h, at::TensorList downs, at::TensorList ups,
    bool needs_x, bool needs_downs, c10::List<bool> needs_ups, c10::List<bool> needs_biases) {
  const LowRankShape s =
      lowrank_backward_shape(grad_ys, x, h, downs, ups, needs_ups.size(), needs_biases.size(), at::kCUDA);
  const c10::cuda::CUDAGuard guard(x.device());
  return lowrank_proj_backward_gemm(s, grad_ys, x, h, downs, ups, needs_x, needs_downs, needs_ups.vec(),
                                    needs_biases.vec());
}

}  // namespace
}  // namespace elr

TORCH_LIBRARY_IMPL(elr_ext_native, CUDA, m) {
  m.impl("lowrank_proj_forward", &elr::lowrank_proj_forward_cuda_op);
  m.impl("lowrank_proj_backward", &elr::lowrank_proj_backward_cuda_op);
}
