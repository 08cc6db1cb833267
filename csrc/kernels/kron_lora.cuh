// Kronecker-product LoRA GEMM (eq. 9) CUDA kernels and their host launchers: torch-free (raw
// pointers, KronShape, a stream). The math and the index conventions are in kron_lora_common.h:
// rank column j = t * r + s, tmat [M, a2, T*r], smat [M, a1, T*r], x viewed [M*a2, b2] and
// y viewed [M*a1, b1] (both row-major, so the views are free). dW is never built on the linear path.
//
// Two paths, picked per shape by kron_fused_supported<T>():
//
// (1) Fused (small factors, T*r <= 128 and a1, a2 <= 32: the paper's case). One block owns a tile of
//     `bm` tokens and every column of them:
//       forward   kron_fused_forward_kernel:  tmat tile = X V_cat^T (long-K tile over b2, staged x
//                 and V chunks, 4x4 register micro-tiles, in-block split-K when the tile is small),
//                 smat tile = A-mixing in shared memory, then y tile (+)= scale * smat U_cat over b1
//                 (chunked, 4 x 128-bit micro-tiles, read-modify-write when accumulating onto the
//                 base product already in y). x is read once and y written once per token; V, U,
//                 A come from L2 / shared memory.
//       backward  kron_fused_backward_kernel: ds = scale * dy U_cat^T (on chip), tmat (saved, or
//                 recomputed exactly as the forward did), dA partial of the block, dt = A^T ds,
//                 dx (+)= dt V_cat; writes dt and, when the caller has no saved smat, the
//                 recomputed smat. The weight gradients dU = scale * smat^T dy and dV = dt^T x are
//                 plain GEMMs over the M*a1 (M*a2) rows of views that exist, with a small
//                 [T*r, b1] ([T*r, b2]) output: the caller runs them with cuBLAS, which splits
//                 such a long-K product over the whole GPU. The dA partials of the blocks are
//                 summed in a fixed order.
//     The token tile shrinks until every SM has kMinBlocksPerSm blocks (make_fused_plan takes the
//     caller's SM count), so the tiling, and with it the rounding of every sum, depends on the
//     shape and the SM count only. No float atomics anywhere: bitwise identical results run to run.
// (2) Batched GEMM (larger factors). The ATen wrapper runs the big products with cuBLAS on the
//     views [M*a2, b2] x [b2, T*r] and [M*a1, T*r] x [T*r, b1], and dA as one [a1, M*r] x
//     [M*r, a2] product per term; the kernels here do the A-mixing (kron_mix_forward: smat from
//     tmat; kron_mix_backward: dt from ds).
//
// kron_delta (conv weights, where building dW is acceptable): dW[(i*b1+k), (p*b2+q)] =
// sum_t A[t,i,p] B_t[k,q] with B_t = U_t V_t, and its backward; simple deterministic kernels.
//
// Precision. Sums accumulate in acc_t<T> (fp32 for fp32/fp16/bf16, fp64 for fp64). The rank-space
// intermediates are rounded to T exactly where the unfused eager path stores them (tmat after
// X V^T, smat after the mixing, dt after A^T ds; a no-op for fp32/fp64), and every later stage that
// reads a stored intermediate consumes the rounded values, so the tmat/smat a forward returns are
// the values it used and a backward that recomputes them gets the same bits. ds, and the dt that
// feeds dx, stay in acc_t on chip on the fused path; on the GEMM path they are T tensors between
// cuBLAS calls. bf16 needs only the conversions of cuda_bf16.h (no bf16 arithmetic), which every
// architecture from sm_70 on provides, so all dtypes run on every supported GPU.
//
// Shared memory. The rank-space tiles have an odd row stride (FusedPlan::ld) and A an odd term
// stride (FusedPlan::a_ld): the dA loop reads one column of rows that differ in p, and the mixing
// reads the same A entry of several terms, and with a stride that is a multiple of 32 words all of
// those land in one bank. tests/test_cuda_launch_plans.py computes the bank-conflict degree of each
// pattern from the index helpers below (tile_index, a_index, grad_a_coord).
//
// Performance intent (the design's expectation, not yet timed on a GPU): the fused kernels
// stream x / dy / y / dx with 128-bit accesses when the rows allow it, keep ds and the dt of dx
// on chip, and do 2*T*r*(d_in + d_out) + 2*T*r*a1*a2 FLOPs per token on the SIMT pipes against
// the base GEMM's 2*d_in*d_out on tensor cores (a tensor-core micro-kernel for fp16/bf16 would slot
// into long_k_tile / small_k_tile behind the fast-path macro). In the inner loops shared tiles are
// read as warp broadcasts or contiguous runs of 4 to 8 elements per thread; the strided shared
// accesses are the staging stores, once per staged element.
//
// Under NVRTC (ELR_EXT_NVRTC) only the device code and the plain-arithmetic planners are compiled:
// the host launchers, the grid table and the explicit instantiations need the runtime API.
#pragma once

#include "cuda_common.cuh"  // first: the std headers (or NVRTC's fixed-width types) and acc_t<T>
#include "kron_lora_common.h"

namespace elr {

#ifndef ELR_EXT_NVRTC
// ---- API ----------------------------------------------------------------------------------------
// Pointers are contiguous: x [M, a2*b2], y / dy [M, a1*b1], A [T, a1, a2], U [T, b1, r],
// V [T, r, b2], tmat [M, a2, T*r], smat [M, a1, T*r], dt [M, a2, T*r]. `workspace` holds at least
// the matching *_workspace_bytes bytes (any alignment from cudaMalloc / the caching allocator; the
// fused forward and the mixing kernels need none). Nothing is launched when M == 0 (the kron_delta
// launchers ignore M). Every launch is on `stream`. `sm_count` is the device's multiprocessor
// count (the tiling of the fused kernels depends on it; the caller queries it once per device).

// The fused path handles s when T*r <= 128, a1 <= 32, a2 <= 32 and a one-token tile fits the
// 48 KiB of shared memory every block may use without opt-in: (a1 + a2, each rounded up to a
// multiple of 4) * (T*r rounded up to 4, plus 1) + max(16 * (max(a1, a2) + T*r), 2048) +
// T * (a1*a2 rounded up to odd) accumulators of acc_t<T>,
// which holds for the paper's shapes (a1, a2, T <= 8, r <= 16) in every dtype but can fail for fp64
// or a large T*a1*a2. b1, b2 and M are unrestricted. Otherwise use the GEMM path. Templated on T
// because the budget depends on sizeof(acc_t<T>). Independent of the SM count.
template <typename T>
bool kron_fused_supported(const KronShape& s);

// y (+)= scale * kron term: accumulate = true adds onto y (the base x W^T + bias already there),
// false overwrites it. tmat / smat (nullable) receive the rank-space intermediates in T.
template <typename T>
void kron_lora_forward_fused_cuda(const KronShape& s, const T* x, const T* A, const T* U, const T* V, T* y,
                                  bool accumulate, double scale, T* tmat, T* smat, int sm_count,
                                  cudaStream_t stream);

// tmat: the forward's (nullable: recomputed from x when needed). dx (nullable) is accumulated onto
// when accumulate_dx (the base dy W already there), else overwritten. dA (nullable) gets the full
// gradient. smat_out (nullable) receives the forward's smat [M*a1, T*r] for the caller's dU GEMM;
// dt_out (nullable) receives dt [M*a2, T*r] rounded to T for the caller's dV GEMM. The workspace
// holds the dA partials of the token tiles: needed only when dA is requested (nullptr otherwise).
template <typename T>
size_t kron_lora_backward_fused_workspace_bytes(const KronShape& s, int sm_count);
template <typename T>
void kron_lora_backward_fused_cuda(const KronShape& s, const T* dy, const T* x, const T* A, const T* U, const T* V,
                                   const T* tmat, double scale, T* dx, bool accumulate_dx, T* dA, T* smat_out,
                                   T* dt_out, void* workspace, int sm_count, cudaStream_t stream);

// GEMM path, the A-mixing steps: smat[m,i,j] = sum_p A[t,i,p] tmat[m,p,j] (rounded to T);
// dt[m,p,j] = sum_i A[t,i,p] ds[m,i,j]. (dA is a cuBLAS product in the caller.)
template <typename T>
void kron_mix_forward_cuda(const KronShape& s, const T* A, const T* tmat, T* smat, cudaStream_t stream);
template <typename T>
void kron_mix_backward_cuda(const KronShape& s, const T* A, const T* ds, T* dt, cudaStream_t stream);

// dW [a1*b1, a2*b2] = sum_t A_t kron (U_t V_t), and its backward (dA, dU, dV each nullable).
template <typename T>
size_t kron_delta_workspace_bytes(const KronShape& s);
template <typename T>
void kron_delta_cuda(const KronShape& s, const T* A, const T* U, const T* V, T* dW, void* workspace,
                     cudaStream_t stream);
template <typename T>
size_t kron_delta_backward_workspace_bytes(const KronShape& s);
template <typename T>
void kron_delta_backward_cuda(const KronShape& s, const T* grad, const T* A, const T* U, const T* V, T* dA, T* dU,
                              T* dV, void* workspace, cudaStream_t stream);

// Every kernel the launchers above start, and the grid each gets (1-D, kron_detail::kThreads
// threads per block): the launchers take their grids from kron_grid, so a test can check the
// tiling at any shape and SM count without a GPU.
enum class KronKernel : int {
  kFusedForward,   // kron_lora_forward_fused_cuda
  kFusedBackward,  // kron_lora_backward_fused_cuda: the tile kernel
  kFusedGradASum,  //   and the fixed-order sum of its dA partials
  kMixForward,     // kron_mix_forward_cuda
  kMixBackward,    // kron_mix_backward_cuda
  kDeltaProduct,   // kron_delta_cuda / kron_delta_backward_cuda: B_t = U_t V_t
  kDeltaExpand,    // kron_delta_cuda: dW from A and B
  kDeltaGradA,     // kron_delta_backward_cuda
  kDeltaGradB,
  kDeltaGradU,
  kDeltaGradV,
  kCount
};
struct KronGrid {
  int64_t blocks = 0;     // 0: the kernel does not run for this shape (the fused path does not fit)
  size_t smem_bytes = 0;  // dynamic shared memory per block
};
inline const char* kron_kernel_name(KronKernel k);
template <typename T>
KronGrid kron_grid(KronKernel k, const KronShape& s, int sm_count);
#endif  // ELR_EXT_NVRTC

namespace kron_detail {

using namespace cuda_common;  // ceil_div, Convert, Pack, load_acc, kWarp ...

constexpr int kThreads = 256;      // every kernel here, 1-D blocks
constexpr int kWarps = kThreads / kWarp;
constexpr int kTM = 4;             // micro-tile rows of every register-tiled product
constexpr int kTN = 4;             // micro-tile columns of the long-K tile
constexpr int kMaxRankCols = 128;  // fused path: T*r
constexpr int kMaxFactor = 32;     // fused path: a1, a2
constexpr int kMaxTileRows = 64;   // fused path: bm * max(a1, a2), unless bm == 1
constexpr int kBK = 16;            // K chunk of the long-K tile (a multiple of every pack size)
constexpr int kStage2 = 2048;      // staged elements of the small-K (long-N) tile
constexpr int kMaxColGroups = 64;  // small-K tile: column groups per block
constexpr int kMinBlocksPerSm = 2;  // fused kernels: fewer tokens per block until every SM has this many
constexpr size_t kSharedBudget = 48 * 1024;  // dynamic shared memory without opt-in
constexpr int64_t kMaxGridX = int64_t(1) << 20;  // grid-stride kernels

__host__ __device__ __forceinline__ int round_up(int v, int m) { return (v + m - 1) / m * m; }
// KronShape::rank_cols() for device code (kron_lora_common.h is plain C++).
__host__ __device__ __forceinline__ int64_t rank_cols(const KronShape& s) { return s.T * s.r; }

// B(j, c) of a factor viewed as a [T*r, n] matrix, j = t * r + s:
//   V_cat[j, q] = V[t, s, q]: strides (r*b2, b2, 1)      U_cat[j, k] = U[t, k, s]: strides (b1*r, 1, r)
template <typename T>
struct FactorView {
  const T* p;
  int64_t stride_t, stride_s, stride_c;
  int r;
  __device__ __forceinline__ acc_t<T> at(int j, int64_t c) const {
    const int t = j / r, s = j - t * r;
    return to_acc(p[t * stride_t + s * stride_s + c * stride_c]);
  }
};
template <typename T>
__host__ __device__ FactorView<T> v_cat(const KronShape& s, const T* V) {
  return {V, s.r * s.b2, s.b2, 1, int(s.r)};
}
template <typename T>
__host__ __device__ FactorView<T> u_cat(const KronShape& s, const T* U) {
  return {U, s.b1 * s.r, 1, s.r, int(s.r)};
}

// ---- Fused path: the tiling of one launch (host-side, identical for forward and backward) -------
struct FusedPlan {
  int bm = 0;        // tokens per block; 0: the shape does not fit the fused kernels
  int rp = 0;        // T*r rounded up to kTN: the columns of every rank-space tile
  int ld = 0;        // row stride of the rank-space tiles: rp + 1 (odd, see the top of the file)
  int a_ld = 0;      // term stride of A in shared memory: a1*a2 rounded up to odd
  int rows_in = 0;   // bm*a2 rounded up to kTM: rows of the tmat / dt tile
  int rows_out = 0;  // bm*a1 rounded up to kTM: rows of the smat / ds tile
  // Element offsets (of acc_t<T>) into the dynamic shared memory, all multiples of 4.
  int off_t = 0, off_s = 0, off_stage = 0, off_a = 0;
  size_t smem_bytes = 0;
  int64_t blocks = 0;
};

// Word offsets in the shared tiles, used by the kernels and by the bank-conflict check.
__host__ __device__ __forceinline__ int tile_index(const FusedPlan& p, int row, int j) { return row * p.ld + j; }
__host__ __device__ __forceinline__ int a_index(const KronShape& s, const FusedPlan& p, int t, int i, int q) {
  return t * p.a_ld + i * int(s.a2) + q;
}
// The dA element [t, i, p] that thread step e of the fused dA loop owns (p fastest).
struct GradACoord {
  int t, i, p;
};
__host__ __device__ __forceinline__ GradACoord grad_a_coord(const KronShape& s, int e) {
  const int a1 = int(s.a1), a2 = int(s.a2);
  return {e / (a1 * a2), (e / a2) % a1, e % a2};
}
// Column groups of the small-K tile for a tile of rows_pad rows (thread tid owns rows
// (tid / cg) * kTM ... + 3 when tid < (rows_pad / kTM) * cg).
__host__ __device__ __forceinline__ int small_k_col_groups(int rows_pad) {
  return int(min64(kMaxColGroups, kThreads / (rows_pad / kTM)));
}

inline bool fused_shape_ok(const KronShape& s) {
  if (s.T < 1 || s.r < 1 || s.a1 < 1 || s.a2 < 1 || s.b1 < 1 || s.b2 < 1 || s.M < 0) return false;
  if (s.rank_cols() > kMaxRankCols || s.a1 > kMaxFactor || s.a2 > kMaxFactor) return false;
  return s.T * s.a1 * s.a2 <= int64_t(kSharedBudget);  // keeps the int arithmetic of the plan safe
}

template <typename T>
FusedPlan fused_plan_for(const KronShape& s, int bm) {
  FusedPlan p;
  p.bm = bm;
  p.rp = round_up(int(s.rank_cols()), kTN);
  p.ld = p.rp + 1;
  p.a_ld = int(s.a1 * s.a2) | 1;
  p.rows_in = round_up(bm * int(s.a2), kTM);
  p.rows_out = round_up(bm * int(s.a1), kTM);
  const int stage = bm > 0 ? int(max64(kBK * (max64(p.rows_in, p.rows_out) + p.rp), kStage2)) : 0;
  p.off_t = 0;
  p.off_s = round_up(p.rows_in * p.ld, 4);
  p.off_stage = p.off_s + round_up(p.rows_out * p.ld, 4);
  p.off_a = p.off_stage + stage;
  const int64_t total = p.off_a + round_up(int(s.T) * p.a_ld, 4);
  p.smem_bytes = size_t(total) * sizeof(acc_t<T>);
  p.blocks = bm > 0 ? ceil_div(s.M, bm) : 0;
  return p;
}

inline bool fused_threads_fit(const FusedPlan& p) {
  return (p.rows_in / kTM) * (p.rp / kTN) <= kThreads && (p.rows_out / kTM) * (p.rp / kTN) <= kThreads;
}
template <typename T>
bool fused_plan_fits(const FusedPlan& p) {
  return fused_threads_fit(p) && p.smem_bytes <= kSharedBudget;
}

// The largest token tile (up to kMaxTileRows rows) that still gives every one of the sm_count SMs
// kMinBlocksPerSm blocks when M allows it, and whose threads and shared memory fit; bm == 0 when
// even one token does not. Larger tiles amortise the per-block staging of U, V and A
// (T*r*(b1 + b2) + T*a1*a2 elements from L2); the block floor keeps every SM busy with two
// blocks to alternate between wherever M allows it (M >= kMinBlocksPerSm * SMs; below that every
// block has one token).
template <typename T>
FusedPlan make_fused_plan(const KronShape& s, int sm_count) {
  if (!fused_shape_ok(s)) return {};
  const int64_t amax = max64(s.a1, s.a2);
  const int64_t cap = max64(1, kMaxTileRows / amax);
  const int64_t wanted = max64(1, s.M / (int64_t(kMinBlocksPerSm) * max64(1, sm_count)));
  for (int bm = int(min64(cap, wanted)); bm >= 1; --bm) {
    const FusedPlan p = fused_plan_for<T>(s, bm);
    if (fused_plan_fits<T>(p)) return p;
  }
  return {};
}

// ---- Block-level building blocks of the fused kernels -------------------------------------------
// Long-K tile: out[row * out_ld + j] = finish(sum_{k < K} src[row * ld + k] * B(j, k)) for
// row < rows_pad, j < rp, where rows >= rows_valid and columns j >= R count as zero. `out` is shared.
// Threads: (rows_pad/4) x (rp/4) groups own a 4x4 micro-tile each; when that leaves threads over,
// ks groups of them split every K chunk (k = slice, slice + ks, ...) and their partial tiles are
// added in slice order (deterministic). kVecIO: 128-bit loads of src (ld, K multiples of the pack,
// src 16-byte aligned). Ends with a __syncthreads(): `out` is ready for every thread.
template <typename T, bool kVecIO, typename Finish>
__device__ __forceinline__ void long_k_tile(const T* __restrict__ src, int64_t ld, int rows_valid, int rows_pad,
                                            int64_t K, const FactorView<T>& b, int R, int rp, int out_ld,
                                            acc_t<T>* __restrict__ stage, acc_t<T>* __restrict__ out,
                                            Finish finish) {
  using A = acc_t<T>;
  constexpr int V = kVecIO ? kVec<T> : 1;
  const int tid = threadIdx.x;
  const int cg = rp / kTN, groups = (rows_pad / kTM) * cg;
  const int ks = int(min64(kBK, kThreads / groups));
  const int g = tid % groups, slice = tid / groups;
  const bool active = slice < ks;
  const int r0 = (g / cg) * kTM, c0 = (g % cg) * kTN;
  A* as = stage;                   // [kBK][rows_pad]: the src chunk, transposed
  A* bs = stage + kBK * rows_pad;  // [kBK][rp]
  const bool c_inner = b.stride_c == 1;

  A acc[kTM][kTN];
  ELR_UNROLL
  for (int i = 0; i < kTM; ++i) {
    ELR_UNROLL
    for (int j = 0; j < kTN; ++j) acc[i][j] = A(0);
  }
  for (int64_t k0 = 0; k0 < K; k0 += kBK) {
    // src chunk: V consecutive k of one row per thread step (coalesced along the row).
    constexpr int kPacksPerRow = kBK / V;
    for (int e = tid; e < rows_pad * kPacksPerRow; e += kThreads) {
      const int row = e / kPacksPerRow, kv = (e % kPacksPerRow) * V;
      A vals[V];
      if (row < rows_valid && k0 + kv < K) {
        if constexpr (kVecIO) {
          load_acc<T, V>(src + row * ld + k0 + kv, vals);
        } else {
          vals[0] = to_acc(src[row * ld + k0 + kv]);
        }
      } else {
        ELR_UNROLL
        for (int v = 0; v < V; ++v) vals[v] = A(0);
      }
      ELR_UNROLL
      for (int v = 0; v < V; ++v) as[(kv + v) * rows_pad + row] = vals[v];
    }
    // Factor chunk B(j, k0 .. k0 + kBK), walked in memory order.
    for (int e = tid; e < R * kBK; e += kThreads) {
      int j, kk;
      if (c_inner) {
        j = e / kBK;
        kk = e % kBK;
      } else {
        const int t = e / (kBK * b.r), rem = e - t * kBK * b.r;
        kk = rem / b.r;
        j = t * b.r + rem % b.r;
      }
      bs[kk * rp + j] = k0 + kk < K ? b.at(j, k0 + kk) : A(0);
    }
    for (int e = tid; e < (rp - R) * kBK; e += kThreads) bs[(e / (rp - R)) * rp + R + e % (rp - R)] = A(0);
    __syncthreads();
    if (active) {
      for (int kk = slice; kk < kBK; kk += ks) {
        A a[kTM], bv[kTN];
        ELR_UNROLL
        for (int i = 0; i < kTM; ++i) a[i] = as[kk * rows_pad + r0 + i];
        ELR_UNROLL
        for (int j = 0; j < kTN; ++j) bv[j] = bs[kk * rp + c0 + j];
        ELR_UNROLL
        for (int i = 0; i < kTM; ++i) {
          ELR_UNROLL
          for (int j = 0; j < kTN; ++j) acc[i][j] += a[i] * bv[j];
        }
      }
    }
    __syncthreads();
  }
  for (int sl = 0; sl < ks; ++sl) {
    if (active && slice == sl) {
      ELR_UNROLL
      for (int i = 0; i < kTM; ++i) {
        ELR_UNROLL
        for (int j = 0; j < kTN; ++j) {
          A* o = out + (r0 + i) * out_ld + c0 + j;
          A v = sl == 0 ? acc[i][j] : *o + acc[i][j];
          if (sl == ks - 1) v = finish(v);
          *o = v;
        }
      }
    }
    __syncthreads();
  }
}

// Small-K (long-N) tile: dst[row * ld + c] = (accumulate ? dst : 0) + alpha * sum_{j < rp}
// C[row * c_ld + j] B(j, c) for row < rows_valid, c < N; C is shared with rows_pad rows (columns
// >= R hold zeros or are skipped through B = 0). Threads: (rows_pad/4) row groups x cg column groups
// own 4 x TN micro-tiles, TN = one 128-bit pack of T; N is walked in chunks of cg * TN columns,
// K = rp in chunks of kStage2 / (cg * TN) staged rows. kVecIO: 128-bit dst accesses (ld, N
// multiples of the pack, dst 16-byte aligned). Ends with a __syncthreads() (the staging buffer is
// free again).
template <typename T, bool kVecIO>
__device__ __forceinline__ void small_k_tile(const acc_t<T>* __restrict__ C, int c_ld, int rows_valid, int rows_pad,
                                             int rp, int R, const FactorView<T>& b, int64_t N, acc_t<T> alpha,
                                             bool accumulate, T* __restrict__ dst, int64_t ld,
                                             acc_t<T>* __restrict__ stage) {
  using A = acc_t<T>;
  constexpr int TN = kVec<T>;
  const int tid = threadIdx.x;
  const int rg = rows_pad / kTM;
  const int cg = small_k_col_groups(rows_pad);
  const int bn = cg * TN, bk = kStage2 / bn;
  const bool active = tid < rg * cg;
  const int r0 = (tid / cg) * kTM, c0 = (tid % cg) * TN;
  const bool c_inner = b.stride_c == 1;

  for (int64_t n0 = 0; n0 < N; n0 += bn) {
    A acc[kTM][TN];
    ELR_UNROLL
    for (int i = 0; i < kTM; ++i) {
      ELR_UNROLL
      for (int j = 0; j < TN; ++j) acc[i][j] = A(0);
    }
    for (int k0 = 0; k0 < rp; k0 += bk) {
      const int kc = int(min64(bk, rp - k0));
      for (int e = tid; e < kc * bn; e += kThreads) {
        int kk, c;
        if (c_inner) {  // B rows contiguous in c
          kk = e / bn;
          c = e % bn;
        } else {  // U_cat: contiguous in s for a fixed (t, c)
          c = e / kc;
          kk = e % kc;
        }
        const int j = k0 + kk;
        stage[kk * bn + c] = j < R && n0 + c < N ? b.at(j, n0 + c) : A(0);
      }
      __syncthreads();
      if (active) {
        for (int kk = 0; kk < kc; ++kk) {
          A a[kTM], bv[TN];
          ELR_UNROLL
          for (int i = 0; i < kTM; ++i) a[i] = C[(r0 + i) * c_ld + k0 + kk];
          ELR_UNROLL
          for (int j = 0; j < TN; ++j) bv[j] = stage[kk * bn + c0 + j];
          ELR_UNROLL
          for (int i = 0; i < kTM; ++i) {
            ELR_UNROLL
            for (int j = 0; j < TN; ++j) acc[i][j] += a[i] * bv[j];
          }
        }
      }
      __syncthreads();
    }
    if (active) {
      const int64_t c = n0 + c0;
      ELR_UNROLL
      for (int i = 0; i < kTM; ++i) {
        const int row = r0 + i;
        if (row >= rows_valid || c >= N) continue;
        T* d = dst + row * ld + c;
        if constexpr (kVecIO) {  // N % TN == 0: the whole pack is in range
          A v[TN], old[TN];
          if (accumulate) load_acc<T, TN>(d, old);
          ELR_UNROLL
          for (int j = 0; j < TN; ++j) v[j] = (accumulate ? old[j] : A(0)) + alpha * acc[i][j];
          store_acc<T, TN>(d, v);
        } else {
          for (int j = 0; j < TN && c + j < N; ++j) {
            const A base = accumulate ? to_acc(d[j]) : A(0);
            d[j] = from_acc<T>(base + alpha * acc[i][j]);
          }
        }
      }
    }
  }
}

// Loads A [T, a1, a2] into shared memory, term t at t * a_ld (no barrier: the caller's next tile
// has them).
template <typename T>
__device__ __forceinline__ void load_factor_a(const KronShape& s, const FusedPlan& pl, const T* __restrict__ Af,
                                              acc_t<T>* abuf) {
  const int na = int(s.a1 * s.a2);
  for (int e = threadIdx.x; e < int(s.T) * na; e += kThreads) abuf[(e / na) * pl.a_ld + e % na] = to_acc(Af[e]);
}

// A-mixing forward on shared tiles: out[(m,i)][j] = sum_p A[t,i,p] in[(m,p)][j], rows m < bm (zero
// rows beyond, up to rows_out; zero columns j >= R).
template <typename A>
__device__ __forceinline__ A mix_forward_at(const KronShape& s, const FusedPlan& pl, const A* abuf, const A* tin,
                                            int row, int j) {
  const int a1 = int(s.a1), a2 = int(s.a2);
  if (row >= pl.bm * a1 || j >= int(rank_cols(s))) return A(0);
  const int m = row / a1, i = row - m * a1, t = j / int(s.r);
  A sum = A(0);
  for (int p = 0; p < a2; ++p) sum += abuf[a_index(s, pl, t, i, p)] * tin[tile_index(pl, m * a2 + p, j)];
  return sum;
}

// A-mixing backward on shared tiles: out[(m,p)][j] = sum_i A[t,i,p] ds[(m,i)][j].
template <typename A>
__device__ __forceinline__ A mix_backward_at(const KronShape& s, const FusedPlan& pl, const A* abuf, const A* ds,
                                             int row, int j) {
  const int a1 = int(s.a1), a2 = int(s.a2);
  if (row >= pl.bm * a2 || j >= int(rank_cols(s))) return A(0);
  const int m = row / a2, p = row - m * a2, t = j / int(s.r);
  A sum = A(0);
  for (int i = 0; i < a1; ++i) sum += abuf[a_index(s, pl, t, i, p)] * ds[tile_index(pl, m * a1 + i, j)];
  return sum;
}

// Copies rows < rows_valid, columns < R of a shared tile to a dense global [rows, R] block
// (tmat / smat / dt rows of this token tile are contiguous).
template <typename A, typename D>
__device__ __forceinline__ void store_rank_tile(const FusedPlan& pl, const A* tile, int rows_valid, int R,
                                                D* __restrict__ dst) {
  for (int e = threadIdx.x; e < rows_valid * R; e += kThreads) {
    const int row = e / R, j = e - row * R;
    dst[e] = Convert<D>::from(tile[tile_index(pl, row, j)]);
  }
}

// ---- Fused kernels --------------------------------------------------------------------------------
// grid (blocks): block b owns tokens [b * bm, min(M, (b + 1) * bm)). The minimum of kMinBlocksPerSm
// resident blocks gives ptxas a budget of 128 registers: without it, ptxas aims at a higher
// occupancy on sm_70 / sm_75 and spills the micro-tile accumulators (up to 56 bytes of stack).
template <typename T, bool kVecIO>
__global__ void __launch_bounds__(kThreads, kMinBlocksPerSm)
    kron_fused_forward_kernel(KronShape s, FusedPlan pl, const T* __restrict__ x, const T* __restrict__ Af,
                              const T* __restrict__ U, const T* __restrict__ V, T* __restrict__ y, bool accumulate,
                              acc_t<T> scale, T* __restrict__ tmat, T* __restrict__ smat) {
  using A = acc_t<T>;
  ELR_DYNAMIC_SHARED(A, smem);
  A* tbuf = smem + pl.off_t;
  A* sbuf = smem + pl.off_s;
  A* stage = smem + pl.off_stage;
  A* abuf = smem + pl.off_a;
  const int R = int(rank_cols(s)), rp = pl.rp;
  const int64_t m0 = int64_t(blockIdx.x) * pl.bm;
  const int vm = int(min64(pl.bm, s.M - m0));
  load_factor_a(s, pl, Af, abuf);
  // tmat tile = X V_cat^T, rounded to T as a stored tmat would be.
  long_k_tile<T, kVecIO>(x + m0 * s.a2 * s.b2, s.b2, vm * int(s.a2), pl.rows_in, s.b2, v_cat(s, V), R, rp, pl.ld,
                         stage, tbuf, [](A v) { return round_to<T>(v); });
  if (tmat != nullptr) store_rank_tile(pl, tbuf, vm * int(s.a2), R, tmat + m0 * s.a2 * R);
  for (int e = threadIdx.x; e < pl.rows_out * rp; e += kThreads) {
    const int row = e / rp, j = e % rp;
    sbuf[tile_index(pl, row, j)] = round_to<T>(mix_forward_at(s, pl, abuf, tbuf, row, j));
  }
  __syncthreads();
  if (smat != nullptr) store_rank_tile(pl, sbuf, vm * int(s.a1), R, smat + m0 * s.a1 * R);
  // y tile (+)= scale * smat U_cat.
  small_k_tile<T, kVecIO>(sbuf, pl.ld, vm * int(s.a1), pl.rows_out, rp, R, u_cat(s, U), s.b1, scale, accumulate,
                          y + m0 * s.a1 * s.b1, s.b1, stage);
}

template <typename T>
struct FusedBackwardArgs {
  const T* dy;
  const T* x;
  const T* A;
  const T* U;
  const T* V;
  const T* tmat;          // nullable: recomputed from x when needed
  acc_t<T> scale;
  T* dx;                  // nullable
  bool accumulate_dx;
  bool need_tmat;         // dA requested, or smat must be recomputed
  acc_t<T>* dA_partials;  // nullable: [blocks][T*a1*a2]
  T* smat_out;            // nullable: the forward's smat [M*a1, T*r]
  T* dt_out;              // nullable: dt [M*a2, T*r], rounded to T
};

template <typename T, bool kVecIO>
__global__ void __launch_bounds__(kThreads, kMinBlocksPerSm)
    kron_fused_backward_kernel(KronShape s, FusedPlan pl, FusedBackwardArgs<T> g) {
  using A = acc_t<T>;
  ELR_DYNAMIC_SHARED(A, smem);
  A* tbuf = smem + pl.off_t;  // tmat, then dt
  A* dsb = smem + pl.off_s;   // ds
  A* stage = smem + pl.off_stage;
  A* abuf = smem + pl.off_a;
  const int R = int(rank_cols(s)), rp = pl.rp;
  const int a1 = int(s.a1), a2 = int(s.a2), r = int(s.r);
  const int64_t m0 = int64_t(blockIdx.x) * pl.bm;
  const int vm = int(min64(pl.bm, s.M - m0));
  load_factor_a(s, pl, g.A, abuf);
  // ds = scale * dy U_cat^T (kept in acc_t on chip).
  const A scale = g.scale;
  long_k_tile<T, kVecIO>(g.dy + m0 * s.a1 * s.b1, s.b1, vm * a1, pl.rows_out, s.b1, u_cat(s, g.U), R, rp, pl.ld,
                         stage, dsb, [scale](A v) { return scale * v; });
  if (g.need_tmat) {  // uniform across the launch
    if (g.tmat != nullptr) {
      const T* src = g.tmat + m0 * s.a2 * R;
      for (int e = threadIdx.x; e < pl.rows_in * rp; e += kThreads) {
        const int row = e / rp, j = e % rp;
        tbuf[tile_index(pl, row, j)] = row < vm * a2 && j < R ? to_acc(src[row * R + j]) : A(0);
      }
      __syncthreads();
    } else {  // exactly the forward's tile, so the same bits
      long_k_tile<T, kVecIO>(g.x + m0 * s.a2 * s.b2, s.b2, vm * a2, pl.rows_in, s.b2, v_cat(s, g.V), R, rp, pl.ld,
                             stage, tbuf, [](A v) { return round_to<T>(v); });
    }
    if (g.smat_out != nullptr) {
      T* dst = g.smat_out + m0 * s.a1 * R;
      for (int e = threadIdx.x; e < vm * a1 * R; e += kThreads) {
        dst[e] = from_acc<T>(mix_forward_at(s, pl, abuf, tbuf, e / R, e % R));
      }
    }
    if (g.dA_partials != nullptr) {
      // dA[t,i,p] over this tile: sum_{m < bm, s} ds[(m,i),(t,s)] tmat[(m,p),(t,s)] (rows of
      // tokens past M are zero in both tiles).
      const int na = int(s.T) * a1 * a2;
      for (int e = threadIdx.x; e < na; e += kThreads) {
        const GradACoord c = grad_a_coord(s, e);
        A sum = A(0);
        for (int m = 0; m < pl.bm; ++m) {
          const A* dsr = dsb + tile_index(pl, m * a1 + c.i, c.t * r);
          const A* tr = tbuf + tile_index(pl, m * a2 + c.p, c.t * r);
          for (int q = 0; q < r; ++q) sum += dsr[q] * tr[q];
        }
        g.dA_partials[int64_t(blockIdx.x) * na + e] = sum;
      }
    }
    __syncthreads();  // tbuf is overwritten by dt below
  }
  // dt = A^T ds.
  for (int e = threadIdx.x; e < pl.rows_in * rp; e += kThreads) {
    const int row = e / rp, j = e % rp;
    tbuf[tile_index(pl, row, j)] = mix_backward_at(s, pl, abuf, dsb, row, j);
  }
  __syncthreads();
  if (g.dt_out != nullptr) store_rank_tile(pl, tbuf, vm * a2, R, g.dt_out + m0 * s.a2 * R);
  // dx tile (+)= dt V_cat.
  if (g.dx != nullptr) {
    small_k_tile<T, kVecIO>(tbuf, pl.ld, vm * a2, pl.rows_in, rp, R, v_cat(s, g.V), s.b2, A(1), g.accumulate_dx,
                            g.dx + m0 * s.a2 * s.b2, s.b2, stage);
  }
}

// ---- Fixed-order reductions ----------------------------------------------------------------------
// Sum over the whole block, fixed order (warp shuffles, then warp 0). Thread 0 gets the result.
template <typename A>
__device__ __forceinline__ A block_sum(A v) {
  __shared__ A slots[kWarps];
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  for (int offset = kWarp / 2; offset > 0; offset /= 2) v += __shfl_down_sync(kFullMask, v, offset);
  if (lane == 0) slots[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < kWarps ? slots[lane] : A(0);
    for (int offset = kWarp / 2; offset > 0; offset /= 2) v += __shfl_down_sync(kFullMask, v, offset);
  }
  return v;
}

// out[e] = sum_{b < count} partials[b * n + e]: grid (n), one block per element, fixed order.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    kron_sum_rows_kernel(const acc_t<T>* __restrict__ partials, int64_t count, int64_t n, T* __restrict__ out) {
  using A = acc_t<T>;
  const int64_t e = blockIdx.x;
  A sum = A(0);
  for (int64_t b = threadIdx.x; b < count; b += kThreads) sum += partials[b * n + e];
  sum = block_sum(sum);
  if (threadIdx.x == 0) out[e] = from_acc<T>(sum);
}

// ---- GEMM path: the A-mixing kernels (grid-stride, one output element per thread step) ----------
template <typename T>
__global__ void __launch_bounds__(kThreads)
    kron_mix_forward_kernel(KronShape s, const T* __restrict__ Af, const T* __restrict__ tmat, T* __restrict__ smat) {
  using A = acc_t<T>;
  const int64_t R = rank_cols(s), total = s.M * s.a1 * R;
  for (int64_t e = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; e < total; e += int64_t(gridDim.x) * blockDim.x) {
    const int64_t j = e % R, mi = e / R, i = mi % s.a1, m = mi / s.a1, t = j / s.r;
    const T* a = Af + (t * s.a1 + i) * s.a2;
    const T* in = tmat + m * s.a2 * R + j;
    A sum = A(0);
    for (int64_t p = 0; p < s.a2; ++p) sum += to_acc(a[p]) * to_acc(in[p * R]);
    smat[e] = from_acc<T>(sum);
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    kron_mix_backward_kernel(KronShape s, const T* __restrict__ Af, const T* __restrict__ ds, T* __restrict__ dt) {
  using A = acc_t<T>;
  const int64_t R = rank_cols(s), total = s.M * s.a2 * R;
  for (int64_t e = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; e < total; e += int64_t(gridDim.x) * blockDim.x) {
    const int64_t j = e % R, mp = e / R, p = mp % s.a2, m = mp / s.a2, t = j / s.r;
    const T* a = Af + t * s.a1 * s.a2 + p;
    const T* in = ds + m * s.a1 * R + j;
    A sum = A(0);
    for (int64_t i = 0; i < s.a1; ++i) sum += to_acc(a[i * s.a2]) * to_acc(in[i * R]);
    dt[e] = from_acc<T>(sum);
  }
}

// ---- kron_delta -------------------------------------------------------------------------------
// B[t,k,q] = sum_s U[t,k,s] V[t,s,q] (acc_t, workspace).
template <typename T>
__global__ void __launch_bounds__(kThreads)
    kron_delta_product_kernel(KronShape s, const T* __restrict__ U, const T* __restrict__ V,
                              acc_t<T>* __restrict__ B) {
  using A = acc_t<T>;
  const int64_t total = s.T * s.b1 * s.b2;
  for (int64_t e = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; e < total; e += int64_t(gridDim.x) * blockDim.x) {
    const int64_t q = e % s.b2, tk = e / s.b2, t = tk / s.b1;
    const T* u = U + tk * s.r;
    const T* v = V + t * s.r * s.b2 + q;
    A sum = A(0);
    for (int64_t j = 0; j < s.r; ++j) sum += to_acc(u[j]) * to_acc(v[j * s.b2]);
    B[e] = sum;
  }
}

// dW[(i*b1+k), (p*b2+q)] = sum_t A[t,i,p] B[t,k,q].
template <typename T>
__global__ void __launch_bounds__(kThreads)
    kron_delta_expand_kernel(KronShape s, const T* __restrict__ Af, const acc_t<T>* __restrict__ B,
                             T* __restrict__ dW) {
  using A = acc_t<T>;
  const int64_t cols = s.a2 * s.b2, total = s.a1 * s.b1 * cols;
  for (int64_t e = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; e < total; e += int64_t(gridDim.x) * blockDim.x) {
    const int64_t row = e / cols, col = e % cols;
    const int64_t i = row / s.b1, k = row % s.b1, p = col / s.b2, q = col % s.b2;
    A sum = A(0);
    for (int64_t t = 0; t < s.T; ++t) sum += to_acc(Af[(t * s.a1 + i) * s.a2 + p]) * B[(t * s.b1 + k) * s.b2 + q];
    dW[e] = from_acc<T>(sum);
  }
}

// grid (T*a1*a2): dA[t,i,p] = sum_{k,q} G[(i*b1+k), (p*b2+q)] B[t,k,q], one block per element.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    kron_delta_grad_A_kernel(KronShape s, const T* __restrict__ G, const acc_t<T>* __restrict__ B,
                             T* __restrict__ dA) {
  using A = acc_t<T>;
  const int64_t e = blockIdx.x;
  const int64_t t = e / (s.a1 * s.a2), i = (e / s.a2) % s.a1, p = e % s.a2;
  const int64_t cols = s.a2 * s.b2, n = s.b1 * s.b2;
  A sum = A(0);
  for (int64_t kq = threadIdx.x; kq < n; kq += kThreads) {
    const int64_t k = kq / s.b2, q = kq % s.b2;
    sum += to_acc(G[(i * s.b1 + k) * cols + p * s.b2 + q]) * B[t * n + kq];
  }
  sum = block_sum(sum);
  if (threadIdx.x == 0) dA[e] = from_acc<T>(sum);
}

// dB[t,k,q] = sum_{i,p} G[(i*b1+k), (p*b2+q)] A[t,i,p] (acc_t, workspace).
template <typename T>
__global__ void __launch_bounds__(kThreads)
    kron_delta_grad_B_kernel(KronShape s, const T* __restrict__ G, const T* __restrict__ Af,
                             acc_t<T>* __restrict__ dB) {
  using A = acc_t<T>;
  const int64_t cols = s.a2 * s.b2, total = s.T * s.b1 * s.b2;
  for (int64_t e = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; e < total; e += int64_t(gridDim.x) * blockDim.x) {
    const int64_t q = e % s.b2, tk = e / s.b2, k = tk % s.b1, t = tk / s.b1;
    A sum = A(0);
    for (int64_t i = 0; i < s.a1; ++i) {
      const T* g = G + (i * s.b1 + k) * cols + q;
      const T* a = Af + (t * s.a1 + i) * s.a2;
      for (int64_t p = 0; p < s.a2; ++p) sum += to_acc(g[p * s.b2]) * to_acc(a[p]);
    }
    dB[e] = sum;
  }
}

// dU[t,k,s] = sum_q dB[t,k,q] V[t,s,q].
template <typename T>
__global__ void __launch_bounds__(kThreads)
    kron_delta_grad_U_kernel(KronShape s, const acc_t<T>* __restrict__ dB, const T* __restrict__ V,
                             T* __restrict__ dU) {
  using A = acc_t<T>;
  const int64_t total = s.T * s.b1 * s.r;
  for (int64_t e = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; e < total; e += int64_t(gridDim.x) * blockDim.x) {
    const int64_t j = e % s.r, tk = e / s.r, t = tk / s.b1;
    const A* db = dB + tk * s.b2;
    const T* v = V + (t * s.r + j) * s.b2;
    A sum = A(0);
    for (int64_t q = 0; q < s.b2; ++q) sum += db[q] * to_acc(v[q]);
    dU[e] = from_acc<T>(sum);
  }
}

// dV[t,s,q] = sum_k U[t,k,s] dB[t,k,q].
template <typename T>
__global__ void __launch_bounds__(kThreads)
    kron_delta_grad_V_kernel(KronShape s, const T* __restrict__ U, const acc_t<T>* __restrict__ dB,
                             T* __restrict__ dV) {
  using A = acc_t<T>;
  const int64_t total = s.T * s.r * s.b2;
  for (int64_t e = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; e < total; e += int64_t(gridDim.x) * blockDim.x) {
    const int64_t q = e % s.b2, tj = e / s.b2, j = tj % s.r, t = tj / s.r;
    const T* u = U + t * s.b1 * s.r + j;
    const A* db = dB + t * s.b1 * s.b2 + q;
    A sum = A(0);
    for (int64_t k = 0; k < s.b1; ++k) sum += to_acc(u[k * s.r]) * db[k * s.b2];
    dV[e] = from_acc<T>(sum);
  }
}

}  // namespace kron_detail

#ifndef ELR_EXT_NVRTC
// ---- Host side ------------------------------------------------------------------------------------
namespace kron_detail {
inline int64_t grid_stride_blocks(int64_t n) { return max64(1, min64(kMaxGridX, ceil_div(n, kThreads))); }
inline dim3 grid_of(const KronGrid& g) { return dim3(unsigned(g.blocks)); }
}  // namespace kron_detail

// ---- API definitions ------------------------------------------------------------------------------
inline const char* kron_kernel_name(KronKernel k) {
  switch (k) {
    case KronKernel::kFusedForward: return "kron_fused_forward";
    case KronKernel::kFusedBackward: return "kron_fused_backward";
    case KronKernel::kFusedGradASum: return "kron_fused_grad_A_sum";
    case KronKernel::kMixForward: return "kron_mix_forward";
    case KronKernel::kMixBackward: return "kron_mix_backward";
    case KronKernel::kDeltaProduct: return "kron_delta_product";
    case KronKernel::kDeltaExpand: return "kron_delta_expand";
    case KronKernel::kDeltaGradA: return "kron_delta_grad_A";
    case KronKernel::kDeltaGradB: return "kron_delta_grad_B";
    case KronKernel::kDeltaGradU: return "kron_delta_grad_U";
    case KronKernel::kDeltaGradV: return "kron_delta_grad_V";
    default: return "";
  }
}

template <typename T>
KronGrid kron_grid(KronKernel k, const KronShape& s, int sm_count) {
  using namespace kron_detail;
  const int64_t R = s.rank_cols(), tokens = s.M > 0 ? 1 : 0;
  switch (k) {
    case KronKernel::kFusedForward:
    case KronKernel::kFusedBackward: {
      const FusedPlan p = make_fused_plan<T>(s, sm_count);
      return {tokens * p.blocks, p.smem_bytes};
    }
    case KronKernel::kFusedGradASum:
      return {make_fused_plan<T>(s, sm_count).bm > 0 ? tokens * s.T * s.a1 * s.a2 : 0, 0};
    case KronKernel::kMixForward: return {tokens * grid_stride_blocks(s.M * s.a1 * R), 0};
    case KronKernel::kMixBackward: return {tokens * grid_stride_blocks(s.M * s.a2 * R), 0};
    case KronKernel::kDeltaProduct:
    case KronKernel::kDeltaGradB: return {grid_stride_blocks(s.T * s.b1 * s.b2), 0};
    case KronKernel::kDeltaExpand: return {grid_stride_blocks(s.d_out() * s.d_in()), 0};
    case KronKernel::kDeltaGradA: return {s.T * s.a1 * s.a2, 0};
    case KronKernel::kDeltaGradU: return {grid_stride_blocks(s.T * s.b1 * s.r), 0};
    case KronKernel::kDeltaGradV: return {grid_stride_blocks(s.T * s.r * s.b2), 0};
    default: return {};
  }
}

template <typename T>
bool kron_fused_supported(const KronShape& s) {
  using namespace kron_detail;
  return fused_shape_ok(s) && fused_plan_fits<T>(fused_plan_for<T>(s, 1));
}

template <typename T>
void kron_lora_forward_fused_cuda(const KronShape& s, const T* x, const T* A, const T* U, const T* V, T* y,
                                  bool accumulate, double scale, T* tmat, T* smat, int sm_count,
                                  cudaStream_t stream) {
  using namespace kron_detail;
  if (s.M == 0) return;
  const FusedPlan pl = make_fused_plan<T>(s, sm_count);
  const dim3 grid = grid_of(kron_grid<T>(KronKernel::kFusedForward, s, sm_count));
  const acc_t<T> sc = acc_t<T>(scale);
  if (s.b1 % kVec<T> == 0 && s.b2 % kVec<T> == 0 && aligned16({x, y})) {
    const auto kernel = &kron_fused_forward_kernel<T, true>;
    ELR_LAUNCH(kernel, grid, dim3(kThreads), pl.smem_bytes, stream, s, pl, x, A, U, V, y, accumulate, sc, tmat, smat);
  } else {
    const auto kernel = &kron_fused_forward_kernel<T, false>;
    ELR_LAUNCH(kernel, grid, dim3(kThreads), pl.smem_bytes, stream, s, pl, x, A, U, V, y, accumulate, sc, tmat, smat);
  }
}

template <typename T>
size_t kron_lora_backward_fused_workspace_bytes(const KronShape& s, int sm_count) {
  using namespace kron_detail;
  const FusedPlan pl = make_fused_plan<T>(s, sm_count);
  return align256(size_t(pl.blocks * s.T * s.a1 * s.a2) * sizeof(acc_t<T>));
}

template <typename T>
void kron_lora_backward_fused_cuda(const KronShape& s, const T* dy, const T* x, const T* A, const T* U, const T* V,
                                   const T* tmat, double scale, T* dx, bool accumulate_dx, T* dA, T* smat_out,
                                   T* dt_out, void* workspace, int sm_count, cudaStream_t stream) {
  using namespace kron_detail;
  using Acc = acc_t<T>;
  if (s.M == 0 || (dx == nullptr && dA == nullptr && smat_out == nullptr && dt_out == nullptr)) return;
  const FusedPlan pl = make_fused_plan<T>(s, sm_count);
  FusedBackwardArgs<T> g;
  g.dy = dy;
  g.x = x;
  g.A = A;
  g.U = U;
  g.V = V;
  g.tmat = tmat;
  g.scale = Acc(scale);
  g.dx = dx;
  g.accumulate_dx = accumulate_dx;
  g.need_tmat = dA != nullptr || smat_out != nullptr;
  g.dA_partials = dA != nullptr ? static_cast<Acc*>(workspace) : nullptr;
  g.smat_out = smat_out;
  g.dt_out = dt_out;
  const dim3 grid = grid_of(kron_grid<T>(KronKernel::kFusedBackward, s, sm_count));
  if (s.b1 % kVec<T> == 0 && s.b2 % kVec<T> == 0 && aligned16({dy, x, dx})) {
    const auto kernel = &kron_fused_backward_kernel<T, true>;
    ELR_LAUNCH(kernel, grid, dim3(kThreads), pl.smem_bytes, stream, s, pl, g);
  } else {
    const auto kernel = &kron_fused_backward_kernel<T, false>;
    ELR_LAUNCH(kernel, grid, dim3(kThreads), pl.smem_bytes, stream, s, pl, g);
  }
  if (dA != nullptr) {
    const auto finalize = &kron_sum_rows_kernel<T>;
    ELR_LAUNCH(finalize, grid_of(kron_grid<T>(KronKernel::kFusedGradASum, s, sm_count)), dim3(kThreads), 0, stream,
               static_cast<const Acc*>(g.dA_partials), pl.blocks, s.T * s.a1 * s.a2, dA);
  }
}

template <typename T>
void kron_mix_forward_cuda(const KronShape& s, const T* A, const T* tmat, T* smat, cudaStream_t stream) {
  using namespace kron_detail;
  if (s.M == 0) return;
  const auto kernel = &kron_mix_forward_kernel<T>;
  ELR_LAUNCH(kernel, grid_of(kron_grid<T>(KronKernel::kMixForward, s, 0)), dim3(kThreads), 0, stream, s, A, tmat,
             smat);
}

template <typename T>
void kron_mix_backward_cuda(const KronShape& s, const T* A, const T* ds, T* dt, cudaStream_t stream) {
  using namespace kron_detail;
  if (s.M == 0) return;
  const auto kernel = &kron_mix_backward_kernel<T>;
  ELR_LAUNCH(kernel, grid_of(kron_grid<T>(KronKernel::kMixBackward, s, 0)), dim3(kThreads), 0, stream, s, A, ds,
             dt);
}

template <typename T>
size_t kron_delta_workspace_bytes(const KronShape& s) {
  return kron_detail::align256(size_t(s.T * s.b1 * s.b2) * sizeof(acc_t<T>));
}

template <typename T>
void kron_delta_cuda(const KronShape& s, const T* A, const T* U, const T* V, T* dW, void* workspace,
                     cudaStream_t stream) {
  using namespace kron_detail;
  using Acc = acc_t<T>;
  auto* B = static_cast<Acc*>(workspace);
  const auto product = &kron_delta_product_kernel<T>;
  ELR_LAUNCH(product, grid_of(kron_grid<T>(KronKernel::kDeltaProduct, s, 0)), dim3(kThreads), 0, stream, s, U, V,
             B);
  const auto expand = &kron_delta_expand_kernel<T>;
  ELR_LAUNCH(expand, grid_of(kron_grid<T>(KronKernel::kDeltaExpand, s, 0)), dim3(kThreads), 0, stream, s, A,
             static_cast<const Acc*>(B), dW);
}

template <typename T>
size_t kron_delta_backward_workspace_bytes(const KronShape& s) {
  return 2 * kron_delta_workspace_bytes<T>(s);
}

template <typename T>
void kron_delta_backward_cuda(const KronShape& s, const T* grad, const T* A, const T* U, const T* V, T* dA, T* dU,
                              T* dV, void* workspace, cudaStream_t stream) {
  using namespace kron_detail;
  using Acc = acc_t<T>;
  auto* B = static_cast<Acc*>(workspace);
  auto* dB = reinterpret_cast<Acc*>(static_cast<unsigned char*>(workspace) + kron_delta_workspace_bytes<T>(s));
  if (dA != nullptr) {
    const auto product = &kron_delta_product_kernel<T>;
    ELR_LAUNCH(product, grid_of(kron_grid<T>(KronKernel::kDeltaProduct, s, 0)), dim3(kThreads), 0, stream, s, U, V,
               B);
    const auto grad_a = &kron_delta_grad_A_kernel<T>;
    ELR_LAUNCH(grad_a, grid_of(kron_grid<T>(KronKernel::kDeltaGradA, s, 0)), dim3(kThreads), 0, stream, s, grad,
               static_cast<const Acc*>(B), dA);
  }
  if (dU == nullptr && dV == nullptr) return;
  const auto grad_b = &kron_delta_grad_B_kernel<T>;
  ELR_LAUNCH(grad_b, grid_of(kron_grid<T>(KronKernel::kDeltaGradB, s, 0)), dim3(kThreads), 0, stream, s, grad, A,
             dB);
  if (dU != nullptr) {
    const auto grad_u = &kron_delta_grad_U_kernel<T>;
    ELR_LAUNCH(grad_u, grid_of(kron_grid<T>(KronKernel::kDeltaGradU, s, 0)), dim3(kThreads), 0, stream, s,
               static_cast<const Acc*>(dB), V, dU);
  }
  if (dV != nullptr) {
    const auto grad_v = &kron_delta_grad_V_kernel<T>;
    ELR_LAUNCH(grad_v, grid_of(kron_grid<T>(KronKernel::kDeltaGradV, s, 0)), dim3(kThreads), 0, stream, s, U,
               static_cast<const Acc*>(dB), dV);
  }
}

// ---- Explicit instantiations: compiled once, in csrc/kernels/kron_lora.cu -----------------------
#define ELR_KRON_INSTANTIATIONS(PREFIX, T)                                                                         \
  PREFIX template bool kron_fused_supported<T>(const KronShape&);                                                  \
  PREFIX template void kron_lora_forward_fused_cuda<T>(const KronShape&, const T*, const T*, const T*, const T*,   \
                                                       T*, bool, double, T*, T*, int, cudaStream_t);               \
  PREFIX template size_t kron_lora_backward_fused_workspace_bytes<T>(const KronShape&, int);                       \
  PREFIX template void kron_lora_backward_fused_cuda<T>(const KronShape&, const T*, const T*, const T*, const T*,  \
                                                        const T*, const T*, double, T*, bool, T*, T*, T*, void*,   \
                                                        int, cudaStream_t);                                        \
  PREFIX template void kron_mix_forward_cuda<T>(const KronShape&, const T*, const T*, T*, cudaStream_t);           \
  PREFIX template void kron_mix_backward_cuda<T>(const KronShape&, const T*, const T*, T*, cudaStream_t);          \
  PREFIX template size_t kron_delta_workspace_bytes<T>(const KronShape&);                                          \
  PREFIX template void kron_delta_cuda<T>(const KronShape&, const T*, const T*, const T*, T*, void*, cudaStream_t); \
  PREFIX template size_t kron_delta_backward_workspace_bytes<T>(const KronShape&);                                 \
  PREFIX template void kron_delta_backward_cuda<T>(const KronShape&, const T*, const T*, const T*, const T*, T*,   \
                                                   T*, T*, void*, cudaStream_t);                                   \
  PREFIX template KronGrid kron_grid<T>(KronKernel, const KronShape&, int);
#define ELR_KRON_FOR_EACH_DTYPE(PREFIX)          \
  ELR_KRON_INSTANTIATIONS(PREFIX, float)         \
  ELR_KRON_INSTANTIATIONS(PREFIX, double)        \
  ELR_KRON_INSTANTIATIONS(PREFIX, __half)        \
  ELR_KRON_INSTANTIATIONS(PREFIX, __nv_bfloat16)

#if !defined(ELR_CUDA_SIM) && !defined(ELR_KRON_INSTANTIATE)
ELR_KRON_FOR_EACH_DTYPE(extern)
#endif
#endif  // ELR_EXT_NVRTC

}  // namespace elr
