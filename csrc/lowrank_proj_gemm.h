// The fused low-rank projections (eq. 2, docs/method.md) as a sequence of ATen GEMMs, shared by the
// CPU wrapper (csrc/cpu/lowrank_proj.cpp, the BLAS / oneDNN behind at::mm) and the CUDA wrapper
// (csrc/cuda/lowrank_proj.cu, cuBLAS / cuBLASLt behind at::mm). The op is GEMMs and nothing else, so
// there is no custom kernel. The FLOPs are those of K unfused low-rank layers; what the fusion
// saves is K - 1 passes over x and larger, more efficient GEMMs (h and dB as one GEMM over all
// projections, dx as one GEMM with inner dimension R), no K-term accumulation of dx, and the
// per-layer Python and autograd overhead.
//
//   forward:  h = x [B_1; ...; B_K]^T                        one GEMM, [M, R] (see lowrank_stack_downs)
//             y_j = h_j A_j^T (+ b_j)                          one GEMM each, the bias fused (addmm)
//   backward: dA_j = dy_j^T h_j;  db_j = sum_m dy_j
//             dh_j = dy_j A_j   (into h-shaped dh)             one GEMM each
//             dB = dh^T x                                      one GEMM, [R, in]
//             dx = dh [B_1; ...; B_K]                          one GEMM (see lowrank_stack_downs)
//
// Rounding: GEMMs accumulate in fp32 for fp16/bf16 (fp64 for fp64); h and dh are stored in x's dtype,
// rounded exactly as the unfused product (two nn.Linear) rounds its rank-space activations.
// h_j / dh_j are column blocks of h / dh (row stride R): the BLAS takes them as they are, no copy.
#pragma once

#include <ATen/ATen.h>

#include <tuple>
#include <vector>

#include "lowrank_proj_args.h"

namespace elr {

// The downs lie back to back in one buffer (slices of one stacked parameter): [B_1; ...; B_K] is
// then a view, free to use as one matrix.
inline bool lowrank_downs_adjacent(at::TensorList downs) {
  const at::Tensor& first = downs[0];
  int64_t offset = first.storage_offset();
  for (const at::Tensor& B : downs) {
    if (!B.is_contiguous() || !B.storage().is_alias_of(first.storage()) || B.storage_offset() != offset) return false;
    offset += B.numel();
  }
  return true;
}

// Whether the products with [B_1; ...; B_K] (h and dx) run as one GEMM over the stacked downs or
// as one GEMM per down. Stacking separate downs costs a copy of R x in elements, which pays off
// once there are enough tokens (measured on a CPU, fp32, SD's attention
// shapes: one GEMM wins from M >= R / 2; below, at SD's 8x8 level, the copy costs ~10% of a
// call). fp16/bf16 always stack: per-down GEMMs would round dx to the input dtype K times.
inline bool lowrank_stack_downs(at::TensorList downs, const LowRankShape& s, const at::Tensor& x) {
  if (downs.size() == 1 || lowrank_downs_adjacent(downs)) return true;
  const bool reduced_precision = x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16;
  return reduced_precision || 2 * s.M >= s.R;
}

// [B_1; ...; B_K] as one [R, in] matrix: a view when adjacent, else a copy.
inline at::Tensor lowrank_stacked_downs(at::TensorList downs, const LowRankShape& s) {
  if (downs.size() == 1) return downs[0];
  return lowrank_downs_adjacent(downs) ? downs[0].as_strided({s.R, s.d_in}, {s.d_in, 1}) : at::cat(downs, 0);
}

inline at::Tensor lowrank_block(const at::Tensor& t, const LowRankShape& s, size_t j) {
  return s.K() == 1 ? t : t.narrow(1, s.offsets[j], s.ranks[j]);
}

inline std::tuple<std::vector<at::Tensor>, at::Tensor> lowrank_proj_forward_gemm(const LowRankShape& s,
                                                                                 const at::Tensor& x,
                                                                                 at::TensorList downs,
                                                                                 at::TensorList ups,
                                                                                 at::TensorList biases) {
  at::Tensor h = at::empty({s.M, s.R}, x.options());
  if (lowrank_stack_downs(downs, s, x)) {
    at::mm_out(h, x, lowrank_stacked_downs(downs, s).t());
  } else {
    for (size_t j = 0; j < downs.size(); ++j) {
      at::Tensor h_j = lowrank_block(h, s, j);
      at::mm_out(h_j, x, downs[j].t());
    }
  }
  std::vector<at::Tensor> ys;
  ys.reserve(downs.size());
  for (size_t j = 0; j < downs.size(); ++j) {
    const at::Tensor h_j = lowrank_block(h, s, j);
    ys.push_back(biases[j].numel() > 0 ? at::addmm(biases[j], h_j, ups[j].t()) : at::mm(h_j, ups[j].t()));
  }
  return {std::move(ys), h};
}

// Returns (dx [M, in], dB [R, in] stacked, [dA_j], [db_j]); an entry not asked for is empty.
inline std::tuple<at::Tensor, at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>>
lowrank_proj_backward_gemm(const LowRankShape& s, at::TensorList grad_ys, const at::Tensor& x, const at::Tensor& h,
                           at::TensorList downs, at::TensorList ups, bool needs_x, bool needs_downs,
                           const std::vector<bool>& needs_ups, const std::vector<bool>& needs_biases) {
  const auto absent = [&] { return at::empty({0}, x.options()); };
  std::vector<at::Tensor> dups, dbiases;
  for (size_t j = 0; j < downs.size(); ++j) {
    dups.push_back(needs_ups[j] ? at::mm(grad_ys[j].t(), lowrank_block(h, s, j)) : absent());
    dbiases.push_back(needs_biases[j] ? grad_ys[j].sum(0) : absent());
  }
  at::Tensor dx = absent(), ddown = absent();
  if (needs_x || needs_downs) {
    at::Tensor dh;
    if (s.K() == 1) {
      dh = at::mm(grad_ys[0], ups[0]);
    } else {
      dh = at::empty({s.M, s.R}, x.options());
      for (size_t j = 0; j < downs.size(); ++j) {
        at::Tensor dh_j = lowrank_block(dh, s, j);
        at::mm_out(dh_j, grad_ys[j], ups[j]);
      }
    }
    if (needs_downs) ddown = at::mm(dh.t(), x);
    if (needs_x && lowrank_stack_downs(downs, s, x)) {
      dx = at::mm(dh, lowrank_stacked_downs(downs, s));
    } else if (needs_x) {  // dx = sum_j dh_j B_j, accumulated in place
      dx = at::mm(lowrank_block(dh, s, 0), downs[0]);
      for (size_t j = 1; j < downs.size(); ++j) dx.addmm_(lowrank_block(dh, s, j), downs[j]);
    }
  }
  return {dx, ddown, std::move(dups), std::move(dbiases)};
}

}  // namespace elr
