// Kronecker-product LoRA GEMM (eq. 9 of the paper): the shape description shared by the CPU and
// CUDA kernels. Torch-free.
//
//   dW = sum_t A_t kron (U_t V_t),  A [T, a1, a2], U [T, b1, r], V [T, r, b2]
//   y  = x W^T + bias + scale * x dW^T,   d_out = a1 * b1, d_in = a2 * b2
//
// dW is never built. With X_m = x_m viewed [a2, b2] (row-major, so x index = p * b2 + q) and the
// rank index j = t * r + s running over all T*r (term, rank) pairs:
//
//   tmat[m, p, j] = sum_q X_m[p, q] V[t, s, q]                 ("t", [M, a2, T*r])
//   smat[m, i, j] = sum_p A[t, i, p] tmat[m, p, j]              ("s", [M, a1, T*r])
//   y[m, i * b1 + k] += scale * sum_j smat[m, i, j] U[t, k, s]
//
// Backward, with dy [M, d_out] viewed [M, a1, b1]:
//   ds[m, i, j] = scale * sum_k dy[m, i, k] U[t, k, s]
//   dU[t, k, s] = scale * sum_{m, i} dy[m, i, k] smat[m, i, j]
//   dA[t, i, p] = sum_{m, s} ds[m, i, (t, s)] tmat[m, p, (t, s)]
//   dt[m, p, j] = sum_i A[t, i, p] ds[m, i, j]
//   dV[t, s, q] = sum_{m, p} dt[m, p, j] X_m[p, q]
//   dx[m, p * b2 + q] += sum_j dt[m, p, j] V[t, s, q]
#pragma once

#ifndef ELR_EXT_NVRTC  // NVRTC: cuda_common.cuh, included first, supplies the fixed-width types
#include <cstdint>
#endif

namespace elr {

struct KronShape {
  int64_t M = 0;   // tokens (all leading dims of x flattened)
  int64_t T = 0;   // Kronecker terms
  int64_t a1 = 0;  // A_t is [a1, a2]
  int64_t a2 = 0;
  int64_t b1 = 0;  // U_t is [b1, r]
  int64_t b2 = 0;  // V_t is [r, b2]
  int64_t r = 0;

  int64_t d_in() const { return a2 * b2; }
  int64_t d_out() const { return a1 * b1; }
  int64_t rank_cols() const { return T * r; }  // columns j of tmat / smat
};

}  // namespace elr
