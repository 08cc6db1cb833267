// Kronecker-product LoRA GEMM (eq. 9) CPU kernels and kron_delta. Torch-free header-only templates
// over T in {float, double, at::Half, at::BFloat16}; values are converted with static_cast to and
// from acc_t<T> (fp32, or fp64 for double). Math and index conventions: kron_lora_common.h (rank
// column j = t * r + s, tmat [M, a2, T*r], smat [M, a1, T*r], x viewed [M*a2, b2], y [M*a1, b1]).
//
// Fused and token-blocked (the CPU twin of the CUDA fused path): no dW, no pass over a big operand
// but the ones the math needs. The tokens are cut into blocks of about kBlockRows rows of X and of
// Y (mb tokens), and each block runs every step before the next one:
//   forward   tmat = X vt (vt = V_cat^T [b2, T*r]);  smat = A-mixing(tmat);
//             y (+)= scale * smat uc (uc = U_cat [T*r, b1])
//   backward  dU_cat += smat^T dY and ds = scale * dY uct (one pass over dY);
//             (dt, dA) = mixing backward;  dV_cat += dt^T X;  dx (+)= dt vc
// x and dy are read once per call (x twice when the backward recomputes tmat), y and dx written
// once (added onto in place when they hold the base product), the rank-space block buffers (tmat,
// smat, ds, dt: block rows x T*r) stay in cache, and no big operand is packed or copied (the small
// factors are, once per call). The products are register-tiled small GEMMs (small_gemm: MR x NV
// tiles of 32-byte vectors, GCC/Clang vector extensions) in either operand order. The big rows are
// walked in column groups of kGroupBytes, and a software prefetch stream fetches the next group
// (or block) while the current one computes: the hardware prefetchers miss this column-strip
// pattern. On the shapes of this op (T*r up to a few hundred on one side) this runs well above
// MKL's speed on the same products: MKL packs the big operand and zero-fills the output in extra
// passes.
//
// kron_delta (conv weights, where building dW is cheap): B_t = U_t V_t, then dW row by row; its
// backward through dB_t = sum_{i,p} A[t,i,p] grad-block(i, p). Simple vectorised loops.
//
// Determinism: no atomics; every output element is summed in a fixed order. The backward's
// reductions over tokens (dA, dU, dV) go through per-chunk partial sums, the chunks being fixed
// by the shape only (not by the thread count), added in chunk order. Each product accumulates
// over k in order whatever the tiling, so a recomputed tmat / smat has the bits of the forward's.
//
// Precision: sums in acc_t<T>. The rank-space values are rounded to T where the unfused path
// stores them (tmat after X V^T, smat after the mixing; a no-op for fp32 / fp64) and the next
// stage consumes the rounded values, exactly as on CUDA, so the returned tmat / smat are the
// values y was built from; ds and dt stay in acc_t<T>.
//
// Work is split through a `pfor(total, fn(begin, end))` functor (at::parallel_for in the ATen
// wrapper, a serial loop in the unit tests). On x86 with GCC/Clang the loops are also compiled for
// AVX2 and AVX-512 and picked at run time (the extension itself is built for the baseline ISA).
#pragma once

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "accumulate.h"
#include "cpu_isa.h"
#include "kron_lora_common.h"

#if ELR_X86_DISPATCH
#define ELR_KRON_TARGET_AVX2 __attribute__((target("avx2,fma")))
#define ELR_KRON_TARGET_AVX512 __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx2,fma")))
#endif

#if defined(__GNUC__)
// Forced inlining is what carries the caller's ISA into the loops (see run_with_isa).
#define ELR_KRON_INLINE inline __attribute__((always_inline))
#define ELR_KRON_INLINE_LAMBDA __attribute__((always_inline))
#define ELR_KRON_RESTRICT __restrict__
#define ELR_KRON_UNROLL _Pragma("GCC unroll 64")
#else
#define ELR_KRON_INLINE inline
#define ELR_KRON_INLINE_LAMBDA
#define ELR_KRON_RESTRICT
#define ELR_KRON_UNROLL
#endif

namespace elr {

// ---- API ----------------------------------------------------------------------------------------
// Pointers are contiguous row-major arrays of the shapes in kron_lora_common.h; every element of
// every non-null output is written. Nothing runs for M == 0 except that dA, dU, dV are zeroed.

// y (+)= scale * x dW^T: accumulate = true adds onto y (the base x W^T + bias already there), false
// overwrites it. tmat / smat (nullable) receive the rank-space intermediates, rounded to T.
template <typename T, typename ParallelFor>
void kron_lora_forward_cpu(const KronShape& s, const T* x, const T* A, const T* U, const T* V, T* y, bool accumulate,
                           double scale, T* tmat, T* smat, const ParallelFor& pfor);

// tmat / smat: the forward's (nullable: recomputed from x exactly as the forward did). dx
// (nullable) is added onto when accumulate_dx (the base dy W already there), else overwritten. dA,
// dU, dV each nullable.
template <typename T, typename ParallelFor>
void kron_lora_backward_cpu(const KronShape& s, const T* dy, const T* x, const T* A, const T* U, const T* V,
                            const T* tmat, const T* smat, double scale, T* dx, bool accumulate_dx, T* dA, T* dU,
                            T* dV, const ParallelFor& pfor);

// dW [a1*b1, a2*b2] = sum_t A_t kron (U_t V_t) (conv weights, where building dW is cheap). s.M is
// ignored.
template <typename T, typename ParallelFor>
void kron_delta_cpu(const KronShape& s, const T* A, const T* U, const T* V, T* dW, const ParallelFor& pfor);

// Gradients of kron_delta for grad = dL/dW [a1*b1, a2*b2]; dA, dU, dV each nullable.
template <typename T, typename ParallelFor>
void kron_delta_backward_cpu(const KronShape& s, const T* grad, const T* A, const T* U, const T* V, T* dA, T* dU,
                             T* dV, const ParallelFor& pfor);

namespace kron_cpu_detail {

// ---- ISA dispatch (cpu_isa.h) ---------------------------------------------------------------------
template <CpuIsa I>
using IsaTag = std::integral_constant<CpuIsa, I>;

#if ELR_X86_DISPATCH
template <typename Body>
ELR_KRON_TARGET_AVX2 void run_avx2(const Body& body, int64_t begin, int64_t end) {
  body(IsaTag<CpuIsa::Avx2>{}, begin, end);
}
template <typename Body>
ELR_KRON_TARGET_AVX512 void run_avx512(const Body& body, int64_t begin, int64_t end) {
  body(IsaTag<CpuIsa::Avx512>{}, begin, end);
}
#endif

// Runs body(IsaTag<isa>{}, begin, end) compiled for the best ISA allowed. body is a generic lambda
// declared with ELR_KRON_INLINE_LAMBDA that calls only ELR_KRON_INLINE functions, so all of it is
// inlined into the ISA-specific instantiation; the tag picks the register tiling. Buffers are
// allocated outside the body.
template <typename Body>
void run_with_isa(const Body& body, int64_t begin, int64_t end) {
#if ELR_X86_DISPATCH
  const CpuIsa isa = cpu_isa_limit();
  if (isa == CpuIsa::Avx512) return run_avx512(body, begin, end);
  if (isa == CpuIsa::Avx2) return run_avx2(body, begin, end);
#endif
  body(IsaTag<CpuIsa::Generic>{}, begin, end);
}

// ---- Small register-tiled GEMM ------------------------------------------------------------------
// 32-byte vectors: 8 floats / 4 doubles. (Zen 4 runs 512-bit FMAs as two 256-bit halves, so wider
// vectors would not add throughput there, while 32 bytes keeps T*r = 8 on the vector path.)
// GCC / Clang vector extensions; elsewhere (or with ELR_KRON_PORTABLE_VEC defined, which the unit
// tests also build) a plain struct with the same operations.
#if defined(__GNUC__) && !defined(ELR_KRON_PORTABLE_VEC)
template <typename A>
struct Vec32;
template <>
struct Vec32<float> {
  typedef float type __attribute__((vector_size(32), aligned(4), may_alias));
};
template <>
struct Vec32<double> {
  typedef double type __attribute__((vector_size(32), aligned(8), may_alias));
};
template <typename A>
using vec_t = typename Vec32<A>::type;
#else
// Portable stand-in with the operations the tiles use.
template <typename A>
struct PortableVec {
  A v[32 / sizeof(A)];
  PortableVec& operator+=(const PortableVec& o) {
    for (size_t i = 0; i < 32 / sizeof(A); ++i) v[i] += o.v[i];
    return *this;
  }
  friend PortableVec operator*(A a, const PortableVec& b) {
    PortableVec r;
    for (size_t i = 0; i < 32 / sizeof(A); ++i) r.v[i] = a * b.v[i];
    return r;
  }
  friend PortableVec operator*(const PortableVec& b, A a) { return a * b; }
  friend PortableVec operator*(const PortableVec& a, const PortableVec& b) {
    PortableVec r;
    for (size_t i = 0; i < 32 / sizeof(A); ++i) r.v[i] = a.v[i] * b.v[i];
    return r;
  }
};
template <typename A>
using vec_t = PortableVec<A>;
#endif
template <typename A>
constexpr int64_t kVec = 32 / sizeof(A);

// Register tile (rows x vectors) per ISA: 24 accumulators of the 32 vector registers with AVX-512,
// 12 of 16 with AVX2, 8 two-register halves of 16 with SSE2.
template <CpuIsa I>
struct Tile;
template <>
struct Tile<CpuIsa::Avx512> {
  static constexpr int MR = 6, NV = 4;
};
template <>
struct Tile<CpuIsa::Avx2> {
  static constexpr int MR = 3, NV = 4;
};
template <>
struct Tile<CpuIsa::Generic> {
  static constexpr int MR = 2, NV = 2;
};

#if defined(__GNUC__)
#define ELR_KRON_PREFETCH_READ(p) __builtin_prefetch((p), 0, 3)
#define ELR_KRON_PREFETCH_WRITE(p) __builtin_prefetch((p), 1, 3)
#else
#define ELR_KRON_PREFETCH_READ(p) ((void)(p))
#define ELR_KRON_PREFETCH_WRITE(p) ((void)(p))
#endif

// A software prefetch stream over up to kMaxRegions row-strided regions, one cache line per
// step(). The tiles step it once per k, so the memory the next column group or block will touch
// (big rows read or written in column strips, a pattern the hardware prefetchers miss) arrives
// while the current one computes.
struct Prefetcher {
  static constexpr int kMaxRegions = 3;
  struct Region {
    const char* base;
    int64_t rows, row_bytes, stride;
    bool write;
  };
  Region region[kMaxRegions];
  int n = 0, cur = 0;
  int64_t row = 0, off = 0;

  // rows x row_bytes bytes from base, rows stride bytes apart. Ignored when empty or full.
  void add(const void* base, int64_t rows, int64_t row_bytes, int64_t stride, bool write) {
    if (base == nullptr || rows <= 0 || row_bytes <= 0 || n == kMaxRegions) return;
    region[n++] = Region{static_cast<const char*>(base), rows, row_bytes, stride, write};
  }
  void clear() { n = cur = 0, row = off = 0; }
  bool active() const { return cur < n; }
  ELR_KRON_INLINE void step() {
    if (cur >= n) return;
    const Region& g = region[cur];
    const char* p = g.base + row * g.stride + off;
    if (g.write) {
      ELR_KRON_PREFETCH_WRITE(p);
    } else {
      ELR_KRON_PREFETCH_READ(p);
    }
    off += 64;
    if (off >= g.row_bytes) {
      off = 0;
      if (++row >= g.rows) row = 0, ++cur;
    }
  }
};

// C[MR, NV*kVec] = alpha * sum_{k < K} a(i, k) B[k, :] (+ C when accumulate), a(i, k) = a[i*sai + k*sak].
// pf (nullable) is stepped once per k while it has lines left.
template <int MR, int NV, typename A>
ELR_KRON_INLINE void gemm_tile(const A* ELR_KRON_RESTRICT a, int64_t sai, int64_t sak, const A* ELR_KRON_RESTRICT b,
                               int64_t ldb, int64_t K, A* ELR_KRON_RESTRICT c, int64_t ldc, A alpha, bool accumulate,
                               Prefetcher* pf) {
  using V = vec_t<A>;
  constexpr int64_t W = kVec<A>;
  if (pf != nullptr && !pf->active()) pf = nullptr;
  V acc[MR][NV];
  ELR_KRON_UNROLL
  for (int i = 0; i < MR; ++i)
    ELR_KRON_UNROLL
    for (int j = 0; j < NV; ++j) acc[i][j] = V{};
  for (int64_t k = 0; k < K; ++k) {
    if (pf != nullptr) pf->step();
    const A* bk = b + k * ldb;
    V bv[NV];
    ELR_KRON_UNROLL
    for (int j = 0; j < NV; ++j) bv[j] = *reinterpret_cast<const V*>(bk + j * W);
    const A* ak = a + k * sak;
    ELR_KRON_UNROLL
    for (int i = 0; i < MR; ++i) {
      const A ai = ak[i * sai];
      ELR_KRON_UNROLL
      for (int j = 0; j < NV; ++j) acc[i][j] += ai * bv[j];
    }
  }
  ELR_KRON_UNROLL
  for (int i = 0; i < MR; ++i)
    ELR_KRON_UNROLL
    for (int j = 0; j < NV; ++j) {
      V* cp = reinterpret_cast<V*>(c + i * ldc + j * W);
      V r = acc[i][j] * alpha;
      if (accumulate) r += *cp;
      *cp = r;
    }
}

// The columns left after the vector tiles (fewer than kVec).
template <typename A>
ELR_KRON_INLINE void gemm_scalar(int64_t M, int64_t N, int64_t K, const A* a, int64_t sai, int64_t sak, const A* b,
                                 int64_t ldb, A* c, int64_t ldc, A alpha, bool accumulate) {
  for (int64_t i = 0; i < M; ++i)
    for (int64_t j = 0; j < N; ++j) {
      A acc = A(0);
      for (int64_t k = 0; k < K; ++k) acc += a[i * sai + k * sak] * b[k * ldb + j];
      const A r = acc * alpha;
      c[i * ldc + j] = accumulate ? c[i * ldc + j] + r : r;
    }
}

// Row tiles of MR rows of the column strip at n0, from row i while that many are left; advances i.
template <int MR, int NV, typename A>
ELR_KRON_INLINE void gemm_rows(int64_t& i, int64_t M, int64_t n0, int64_t K, const A* a, int64_t sai, int64_t sak,
                               const A* b, int64_t ldb, A* c, int64_t ldc, A alpha, bool accumulate, Prefetcher* pf) {
  for (; i + MR <= M; i += MR)
    gemm_tile<MR, NV>(a + i * sai, sai, sak, b + n0, ldb, K, c + i * ldc + n0, ldc, alpha, accumulate, pf);
}

// One column strip of NV vectors at column n0, all M rows: MR-row tiles, then smaller ones.
template <int MR, int NV, typename A>
ELR_KRON_INLINE void gemm_strip(int64_t M, int64_t n0, int64_t K, const A* a, int64_t sai, int64_t sak, const A* b,
                                int64_t ldb, A* c, int64_t ldc, A alpha, bool accumulate, Prefetcher* pf) {
  int64_t i = 0;
  gemm_rows<MR, NV>(i, M, n0, K, a, sai, sak, b, ldb, c, ldc, alpha, accumulate, pf);
  if constexpr (MR > 4) gemm_rows<4, NV>(i, M, n0, K, a, sai, sak, b, ldb, c, ldc, alpha, accumulate, pf);
  if constexpr (MR > 2) gemm_rows<2, NV>(i, M, n0, K, a, sai, sak, b, ldb, c, ldc, alpha, accumulate, pf);
  gemm_rows<1, NV>(i, M, n0, K, a, sai, sak, b, ldb, c, ldc, alpha, accumulate, pf);
}

// C[M, N] = alpha * sum_{k < K} a(i, k) B[k, j] (+ C when accumulate), a(i, k) = a[i*sai + k*sak]
// (either operand order: sai = lda, sak = 1 for A row-major; sai = 1, sak = lda for A^T), B row-major
// with leading dimension ldb, C with ldc. Column strips outermost, so a strip of B is reused by
// every row tile. Accumulation over k runs in order whatever the tile, so each element's value
// does not depend on where it falls in the tiling. pf (nullable) is stepped once per k of every tile.
template <CpuIsa I, typename A>
ELR_KRON_INLINE void small_gemm(int64_t M, int64_t N, int64_t K, const A* a, int64_t sai, int64_t sak, const A* b,
                                int64_t ldb, A* c, int64_t ldc, A alpha, bool accumulate, Prefetcher* pf = nullptr) {
  constexpr int MR = Tile<I>::MR, NV = Tile<I>::NV;
  constexpr int64_t W = kVec<A>;
  int64_t n0 = 0;
  for (; n0 + NV * W <= N; n0 += NV * W)
    gemm_strip<MR, NV>(M, n0, K, a, sai, sak, b, ldb, c, ldc, alpha, accumulate, pf);
  if constexpr (NV > 2) {
    if (n0 + 2 * W <= N) {
      gemm_strip<MR, 2>(M, n0, K, a, sai, sak, b, ldb, c, ldc, alpha, accumulate, pf);
      n0 += 2 * W;
    }
  }
  for (; n0 + W <= N; n0 += W) gemm_strip<MR, 1>(M, n0, K, a, sai, sak, b, ldb, c, ldc, alpha, accumulate, pf);
  if (n0 < N) gemm_scalar(M, N - n0, K, a, sai, sak, b + n0, ldb, c + n0, ldc, alpha, accumulate);
}

// ---- Conversions ------------------------------------------------------------------------------------
template <typename T, typename A>
constexpr bool kNative = std::is_same<T, A>::value;

// src as acc-typed values: src itself when it already is, else converted into buf.
template <typename A, typename T>
ELR_KRON_INLINE const A* as_acc(const T* src, int64_t n, A* ELR_KRON_RESTRICT buf) {
  if constexpr (kNative<T, A>) {
    (void)n, (void)buf;
    return src;
  } else {
    for (int64_t i = 0; i < n; ++i) buf[i] = static_cast<A>(src[i]);
    return buf;
  }
}

// Where to compute acc-typed results bound for dst (nullable): dst itself when it exists and is
// acc-typed, else buf (then store() converts).
template <typename A, typename T>
ELR_KRON_INLINE A* dest(T* dst, A* buf) {
  if constexpr (kNative<T, A>) {
    return dst != nullptr ? dst : buf;
  } else {
    (void)dst;
    return buf;
  }
}

// dst (nullable) = buf, when buf is not dst itself.
template <typename A, typename T>
ELR_KRON_INLINE void store(T* dst, const A* buf, int64_t n) {
  if (dst == nullptr) return;
  if constexpr (kNative<T, A>) {
    if (dst != buf) std::copy_n(buf, n, dst);
  } else {
    for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<T>(buf[i]);
  }
}

// v = (acc) (T) v: the value a T-typed store would keep (a no-op when T is the acc type).
template <typename T, typename A>
ELR_KRON_INLINE void round_to_t(A* v, int64_t n) {
  if constexpr (!kNative<T, A>) {
    for (int64_t i = 0; i < n; ++i) v[i] = static_cast<A>(static_cast<T>(v[i]));
  } else {
    (void)v, (void)n;
  }
}

// ---- The A-mixing ---------------------------------------------------------------------------------
// The A-mixing and its gradients are tiny GEMMs, one per rank column j, side by side in the
// vector lanes: C_j(x, y) (+)= sum_{k < K} P_j(x, k) Q_j(y, k) with
//   P_j(x, k) = p[x * px + k * pk + j],  Q_j(y, k) = q[y * qy + k * qk + j],  C_j(x, y) = c[x * cx + y * cy + j].
// A BX x BY register tile of vectors (one per (x, y)) loads BX + BY vectors per k for BX * BY FMAs.
template <CpuIsa I>
struct LaneTile {
  static constexpr int BX = 4, BY = 4;
};
template <>
struct LaneTile<CpuIsa::Avx2> {
  static constexpr int BX = 2, BY = 4;
};
template <>
struct LaneTile<CpuIsa::Generic> {
  static constexpr int BX = 2, BY = 2;
};

template <int BX, int BY, typename A>
ELR_KRON_INLINE void lane_tile(const A* ELR_KRON_RESTRICT p, int64_t px, int64_t pk, const A* ELR_KRON_RESTRICT q,
                               int64_t qy, int64_t qk, int64_t K, A* ELR_KRON_RESTRICT c, int64_t cx, int64_t cy,
                               bool accumulate) {
  using V = vec_t<A>;
  V acc[BX][BY];
  ELR_KRON_UNROLL
  for (int x = 0; x < BX; ++x)
    ELR_KRON_UNROLL
    for (int y = 0; y < BY; ++y) acc[x][y] = accumulate ? *reinterpret_cast<const V*>(c + x * cx + y * cy) : V{};
  for (int64_t k = 0; k < K; ++k) {
    V pv[BX], qv[BY];
    ELR_KRON_UNROLL
    for (int x = 0; x < BX; ++x) pv[x] = *reinterpret_cast<const V*>(p + x * px + k * pk);
    ELR_KRON_UNROLL
    for (int y = 0; y < BY; ++y) qv[y] = *reinterpret_cast<const V*>(q + y * qy + k * qk);
    ELR_KRON_UNROLL
    for (int x = 0; x < BX; ++x)
      ELR_KRON_UNROLL
      for (int y = 0; y < BY; ++y) acc[x][y] += pv[x] * qv[y];
  }
  ELR_KRON_UNROLL
  for (int x = 0; x < BX; ++x)
    ELR_KRON_UNROLL
    for (int y = 0; y < BY; ++y) *reinterpret_cast<V*>(c + x * cx + y * cy) = acc[x][y];
}

// Rows x of one BX-row band: BY-column tiles, then single columns.
template <int BX, int BY, typename A>
ELR_KRON_INLINE void lane_band(int64_t Y, const A* p, int64_t px, int64_t pk, const A* q, int64_t qy, int64_t qk,
                               int64_t K, A* c, int64_t cx, int64_t cy, bool accumulate) {
  int64_t y = 0;
  for (; y + BY <= Y; y += BY) lane_tile<BX, BY>(p, px, pk, q + y * qy, qy, qk, K, c + y * cy, cx, cy, accumulate);
  for (; y < Y; ++y) lane_tile<BX, 1>(p, px, pk, q + y * qy, qy, qk, K, c + y * cy, cx, cy, accumulate);
}

// All C_j(x, y), x < X, y < Y, j < n; the sum over k runs in order for every element.
template <CpuIsa I, typename A>
ELR_KRON_INLINE void lane_gemm(int64_t X, int64_t Y, int64_t K, int64_t n, const A* p, int64_t px, int64_t pk,
                               const A* q, int64_t qy, int64_t qk, A* c, int64_t cx, int64_t cy, bool accumulate) {
  constexpr int BX = LaneTile<I>::BX, BY = LaneTile<I>::BY;
  constexpr int64_t W = kVec<A>;
  int64_t j = 0;
  for (; j + W <= n; j += W) {
    int64_t x = 0;
    for (; x + BX <= X; x += BX)
      lane_band<BX, BY>(Y, p + x * px + j, px, pk, q + j, qy, qk, K, c + x * cx + j, cx, cy, accumulate);
    for (; x < X; ++x) lane_band<1, BY>(Y, p + x * px + j, px, pk, q + j, qy, qk, K, c + x * cx + j, cx, cy, accumulate);
  }
  for (; j < n; ++j)
    for (int64_t x = 0; x < X; ++x)
      for (int64_t y = 0; y < Y; ++y) {
        A acc = accumulate ? c[x * cx + y * cy + j] : A(0);
        for (int64_t k = 0; k < K; ++k) acc += p[x * px + k * pk + j] * q[y * qy + k * qk + j];
        c[x * cx + y * cy + j] = acc;
      }
}

// smat rows of nt tokens: sb[m, i, j] = sum_p aexp[i, p, j] tb[m, p, j], rounded to T.
template <CpuIsa I, typename T, typename A>
ELR_KRON_INLINE void mix_forward_rows(const KronShape& s, const A* aexp, const A* tb, int64_t nt, A* sb) {
  const int64_t R = s.rank_cols(), a1 = s.a1, a2 = s.a2;
  lane_gemm<I>(nt, a1, a2, R, tb, a2 * R, R, aexp, a2 * R, R, sb, a1 * R, R, false);
  round_to_t<T>(sb, nt * a1 * R);
}

// dt rows of nt tokens (dtb nullable): dtb[m, p, j] = sum_i aexpt[p, i, j] dsb[m, i, j]; and (g
// nullable) g[i, p, j] += sum_m dsb[m, i, j] tb[m, p, j].
template <CpuIsa I, typename A>
ELR_KRON_INLINE void mix_backward_rows(const KronShape& s, const A* aexpt, const A* dsb, const A* tb, int64_t nt,
                                       A* dtb, A* g) {
  const int64_t R = s.rank_cols(), a1 = s.a1, a2 = s.a2;
  if (dtb != nullptr) lane_gemm<I>(nt, a2, a1, R, dsb, a1 * R, R, aexpt, a1 * R, R, dtb, a2 * R, R, false);
  if (g != nullptr) lane_gemm<I>(a1, a2, nt, R, dsb, R, a1 * R, tb, R, a2 * R, g, a2 * R, R, true);
}

// ---- Plan and packed factors --------------------------------------------------------------------
// Tokens per block: about kBlockRows rows of X (a2 per token) and of Y / dY (a1 per token). The
// weight-gradient products (dU += smat^T dY, dV += dt^T X) accumulate over a block's rows into
// partial sums as wide as b1 / b2, which they load and store once per block: blocks of a few
// hundred rows amortise that. The big rows themselves need not fit in cache: every product streams
// them in column strips (dY in groups of kGroupBytes per row, shared by the two products that read
// it), so only the rank-space block buffers stay resident.
constexpr int64_t kBlockRows = 256;
constexpr int64_t kGroupBytes = 512;
// Backward token chunks: whole blocks, kMinChunkBlocks or more each (every chunk zeroes and later
// sums its partials), at most kMaxChunks, and per-chunk partial sums (dU, dV, dA) of at most
// kPartialBudget values in all.
constexpr int64_t kMinChunkBlocks = 2;
constexpr int64_t kMaxChunks = 64;
constexpr int64_t kPartialBudget = int64_t(1) << 21;

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
inline int64_t clamp64(int64_t v, int64_t lo, int64_t hi) { return std::max(lo, std::min(v, hi)); }

inline int64_t block_tokens(const KronShape& s) {
  return clamp64(kBlockRows / std::max(s.a1, s.a2), 1, std::max<int64_t>(s.M, 1));
}

// The factors in acc_t<T>, rearranged once per call (a1*a2*T*r + 4*T*r*b values at most):
//   aexp [a1, a2, R]  aexp[i, p, j] = A[t, i, p]      (the mixing's per-column coefficient)
//   aexpt [a2, a1, R] aexpt[p, i, j] = A[t, i, p]     (the same, for the mixing's backward)
//   vt   [b2, R]      vt[q, j] = V[t, s, q]          (B of tmat = X vt)
//   vc   [R, b2]      vc[j, q] = V[t, s, q]          (B of dx = dt vc)
//   uc   [R, b1]      uc[j, k] = U[t, k, s]          (B of y = smat uc)
//   uct  [b1, R]      uct[k, j] = U[t, k, s]         (B of ds = dy uct)
template <typename A>
struct Factors {
  std::vector<A> aexp, aexpt, vt, vc, uc, uct;

  template <typename T>
  Factors(const KronShape& s, const T* Af, const T* U, const T* V, bool need_aexpt, bool need_vt, bool need_vc,
          bool need_uc, bool need_uct) {
    const int64_t R = s.rank_cols(), b1 = s.b1, b2 = s.b2, r = s.r;
    aexp.resize(static_cast<size_t>(s.a1 * s.a2 * R));
    if (need_aexpt) aexpt.resize(static_cast<size_t>(s.a1 * s.a2 * R));
    for (int64_t i = 0; i < s.a1; ++i)
      for (int64_t p = 0; p < s.a2; ++p)
        for (int64_t t = 0; t < s.T; ++t) {
          const A a = static_cast<A>(Af[(t * s.a1 + i) * s.a2 + p]);
          std::fill_n(aexp.data() + (i * s.a2 + p) * R + t * r, r, a);
          if (need_aexpt) std::fill_n(aexpt.data() + (p * s.a1 + i) * R + t * r, r, a);
        }
    if (need_vt) vt.resize(static_cast<size_t>(b2 * R));
    if (need_vc) vc.resize(static_cast<size_t>(R * b2));
    for (int64_t j = 0; j < R && (need_vt || need_vc); ++j)
      for (int64_t q = 0; q < b2; ++q) {
        const A v = static_cast<A>(V[j * b2 + q]);  // V [T, r, b2] is V_cat [R, b2]
        if (need_vt) vt[q * R + j] = v;
        if (need_vc) vc[j * b2 + q] = v;
      }
    if (need_uc) uc.resize(static_cast<size_t>(R * b1));
    if (need_uct) uct.resize(static_cast<size_t>(b1 * R));
    for (int64_t t = 0; t < s.T && (need_uc || need_uct); ++t)
      for (int64_t k = 0; k < b1; ++k)
        for (int64_t q = 0; q < r; ++q) {
          const A u = static_cast<A>(U[(t * b1 + k) * r + q]);
          if (need_uc) uc[(t * r + q) * b1 + k] = u;
          if (need_uct) uct[k * R + t * r + q] = u;
        }
  }
};

// Per-task scratch: one allocation carved into the block buffers (empty ones cost nothing).
template <typename A>
struct Scratch {
  std::vector<A> mem;
  A *x = nullptr, *dy = nullptr, *out = nullptr, *t = nullptr, *s = nullptr, *ds = nullptr, *dt = nullptr;
  Scratch(int64_t nx, int64_t ndy, int64_t nout, int64_t nt, int64_t ns, int64_t nds, int64_t ndt) {
    mem.resize(static_cast<size_t>(nx + ndy + nout + nt + ns + nds + ndt));
    A* p = mem.data();
    x = p, p += nx;
    dy = p, p += ndy;
    out = p, p += nout;
    t = p, p += nt;
    s = p, p += ns;
    ds = p, p += nds;
    dt = p;
  }
};

// tmat rows of the nt tokens at x block xb: tb = X vt, rounded to T.
template <CpuIsa I, typename T, typename A>
ELR_KRON_INLINE void tmat_rows(const KronShape& s, const Factors<A>& f, const A* xb, int64_t nt, A* tb,
                               Prefetcher* pf) {
  const int64_t R = s.rank_cols(), rows = nt * s.a2;
  small_gemm<I>(rows, R, s.b2, xb, s.b2, 1, f.vt.data(), R, tb, R, A(1), false, pf);
  round_to_t<T>(tb, rows * R);
}

// Adds to pf the column group [k0, k0 + g) of `rows` rows of a row-major [*, ld] array of T at p
// (nothing for converted types, whose block copies stream sequentially anyway).
template <typename T, typename A>
void prefetch_group(Prefetcher& pf, const T* p, int64_t rows, int64_t ld, int64_t k0, int64_t g, bool write) {
  if (kNative<T, A> && p != nullptr && g > 0)
    pf.add(p + k0, rows, g * int64_t(sizeof(T)), ld * int64_t(sizeof(T)), write);
}

// ---- kron_delta helpers ---------------------------------------------------------------------------
// out[j] += c * x[j]
template <typename A>
ELR_KRON_INLINE void axpy(A* ELR_KRON_RESTRICT out, A c, const A* ELR_KRON_RESTRICT x, int64_t n) {
  for (int64_t j = 0; j < n; ++j) out[j] += c * x[j];
}

// Independent accumulators of dot(): 128 bytes.
template <typename A>
constexpr int64_t kLane = 128 / sizeof(A);

// sum_j x[j] y[j] with kLane independent lanes (vectorises without reassociation flags).
template <typename A>
ELR_KRON_INLINE A dot(const A* ELR_KRON_RESTRICT x, const A* ELR_KRON_RESTRICT y, int64_t n) {
  constexpr int64_t L = kLane<A>;
  A acc[L] = {};
  int64_t j = 0;
  for (; j + L <= n; j += L)
    ELR_KRON_UNROLL
    for (int64_t l = 0; l < L; ++l) acc[l] += x[j + l] * y[j + l];
  A tail = A(0);
  for (; j < n; ++j) tail += x[j] * y[j];
  ELR_KRON_UNROLL
  for (int64_t w = L / 2; w > 0; w /= 2)
    ELR_KRON_UNROLL
    for (int64_t l = 0; l < w; ++l) acc[l] += acc[l + w];
  return acc[0] + tail;
}

template <typename A, typename T>
std::vector<A> to_acc_vector(const T* src, int64_t n) {
  std::vector<A> out(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) out[i] = static_cast<A>(src[i]);
  return out;
}

// B[t,k,q] = sum_s U[t,k,s] V[t,s,q] (kron_delta's per-term product), from acc copies of U, V.
template <typename A, typename ParallelFor>
std::vector<A> delta_product(const KronShape& s, const A* U, const A* V, const ParallelFor& pfor) {
  std::vector<A> B(static_cast<size_t>(s.T * s.b1 * s.b2));
  A* Bp = B.data();
  pfor(s.T * s.b1, [&](int64_t begin, int64_t end) {
    run_with_isa(
        [&](auto, int64_t b, int64_t e) ELR_KRON_INLINE_LAMBDA {
          for (int64_t tk = b; tk < e; ++tk) {
            const int64_t t = tk / s.b1;
            A* out = Bp + tk * s.b2;
            std::fill_n(out, s.b2, A(0));
            for (int64_t j = 0; j < s.r; ++j) axpy(out, U[tk * s.r + j], V + (t * s.r + j) * s.b2, s.b2);
          }
        },
        begin, end);
  });
  return B;
}

// ---- The fused backward, step by step (kron_lora_backward_cpu) ----------------------------------
// Which rank-space values the requested gradients need.
struct BackwardNeeds {
  bool ds;  // ds = scale * dY uct: for dx, dA and dV
  bool dt;  // dt, the mixing's backward of ds: for dx and dV
  bool t;   // tmat rows: for dA, and for dU when smat is recomputed from them
  bool x;   // X rows: for dV, and to recompute tmat
};
inline BackwardNeeds backward_needs(bool has_tmat, bool has_smat, bool dx, bool dA, bool dU, bool dV) {
  BackwardNeeds n;
  n.ds = dx || dA || dV;
  n.dt = dx || dV;
  n.t = dA || (dU && !has_smat);
  n.x = dV || (n.t && !has_tmat);
  return n;
}

// The backward's token chunks and their partial sums. Chunk c covers tokens [c * per_chunk,
// (c + 1) * per_chunk) (whole blocks; fixed by the shape, not the thread count) and owns n_part
// partial sums: dU_cat [R, b1] (n_du values), dV_cat [R, b2] (n_dv), dA as [a1, a2, R] (n_da).
struct BackwardChunks {
  int64_t n_du, n_dv, n_da, n_part, per_chunk, chunks;
};
inline BackwardChunks backward_chunks(const KronShape& s, int64_t mb, bool dU, bool dV, bool dA) {
  const int64_t R = s.rank_cols();
  BackwardChunks c;
  c.n_du = dU ? R * s.b1 : 0;
  c.n_dv = dV ? R * s.b2 : 0;
  c.n_da = dA ? s.a1 * s.a2 * R : 0;
  c.n_part = c.n_du + c.n_dv + c.n_da;
  const int64_t blocks = ceil_div(s.M, mb);
  const int64_t max_chunks =
      clamp64(std::min(blocks / kMinChunkBlocks, kPartialBudget / std::max<int64_t>(c.n_part, 1)), 1, kMaxChunks);
  c.per_chunk = ceil_div(blocks, max_chunks) * mb;
  c.chunks = ceil_div(s.M, c.per_chunk);
  return c;
}

// One block of nt tokens from token m0: its rows of the big operands (x, dx nullable), dY and X as
// acc values, and the size of the chunk's next block (0 at the chunk's end).
template <typename T, typename A>
struct BackwardBlock {
  int64_t m0, nt, nt_next, rows_in, rows_out;
  const T* dy;
  const T* x;
  T* dx;
  const A* dyb;
  const A* xb;
};

// The operands of one backward call and its steps, run per block of tokens inside run_with_isa
// (every step ELR_KRON_INLINE, so that each is compiled for the caller's ISA).
template <typename T, typename A>
struct BackwardPass {
  const KronShape& s;
  const Factors<A>& f;
  const T *dy, *x, *tmat, *smat;
  T* dx;
  bool accumulate_dx, want_dU, want_dV;
  BackwardNeeds need;
  int64_t mb, group;
  A alpha;

  // The per-task block buffers (acc copies of x, dy, dx for converted types; the rank-space rows).
  Scratch<A> scratch() const {
    constexpr bool native = kNative<T, A>;
    const int64_t R = s.rank_cols(), d_in = s.d_in(), d_out = s.d_out();
    return Scratch<A>(need.x && !native ? mb * d_in : 0, native ? 0 : mb * d_out,
                      dx != nullptr && !native ? mb * d_in : 0, need.t ? mb * s.a2 * R : 0,
                      want_dU ? mb * s.a1 * R : 0, need.ds ? mb * s.a1 * R : 0, need.dt ? mb * s.a2 * R : 0);
  }

  // Zeroes chunk c's partial sums, then adds every block of the chunk into them.
  template <CpuIsa I>
  ELR_KRON_INLINE void chunk(IsaTag<I> isa, const BackwardChunks& ch, int64_t c, A* partials, Scratch<A>& w,
                             Prefetcher& pf) const {
    A* part = partials + c * ch.n_part;
    std::fill_n(part, ch.n_part, A(0));
    A* pa = ch.n_da > 0 ? part + ch.n_du + ch.n_dv : nullptr;
    const int64_t c_end = std::min(s.M, (c + 1) * ch.per_chunk);
    for (int64_t m0 = c * ch.per_chunk; m0 < c_end; m0 += mb) {
      const int64_t nt = std::min(mb, c_end - m0);
      BackwardBlock<T, A> b;
      b.m0 = m0, b.nt = nt, b.nt_next = std::min(mb, c_end - m0 - nt);
      b.rows_in = nt * s.a2, b.rows_out = nt * s.a1;
      b.dy = dy + m0 * s.d_out();
      b.x = need.x ? x + m0 * s.d_in() : nullptr;
      b.dx = dx != nullptr ? dx + m0 * s.d_in() : nullptr;
      b.dyb = as_acc(b.dy, nt * s.d_out(), w.dy);
      b.xb = need.x ? as_acc(b.x, nt * s.d_in(), w.x) : nullptr;
      block(isa, b, part, part + ch.n_du, pa, w, pf);
    }
  }

  // Every step for one block: the dU_cat partial pu, ds, then dt with the dA partial pa (nullable),
  // the dV_cat partial pv and dx.
  template <CpuIsa I>
  ELR_KRON_INLINE void block(IsaTag<I> isa, const BackwardBlock<T, A>& b, A* pu, A* pv, A* pa, Scratch<A>& w,
                             Prefetcher& pf) const {
    pf.clear();
    prefetch_group<T, A>(pf, b.dy, b.rows_out, s.b1, 0, std::min(group, s.b1), false);
    const A* tb = need.t ? tmat_block(isa, b, w, pf) : nullptr;
    const A* sb = want_dU ? smat_block(isa, b, tb, w) : nullptr;
    dy_products(isa, b, sb, pu, w, pf);
    if (!need.ds) return;
    mix_backward_rows<I>(s, f.aexpt.data(), w.ds, tb, b.nt, need.dt ? w.dt : nullptr, pa);
    if (!need.dt) return;
    if (want_dV) dv_partial(isa, b, pv, w, pf);
    if (dx != nullptr) dx_rows(isa, b, w, pf);
  }

  // The block's tmat rows: the forward's, or recomputed from X exactly as the forward did.
  template <CpuIsa I>
  ELR_KRON_INLINE const A* tmat_block(IsaTag<I>, const BackwardBlock<T, A>& b, Scratch<A>& w, Prefetcher& pf) const {
    if (tmat != nullptr) return as_acc(tmat + b.m0 * s.a2 * s.rank_cols(), b.rows_in * s.rank_cols(), w.t);
    tmat_rows<I, T>(s, f, b.xb, b.nt, w.t, &pf);
    return w.t;
  }

  // The block's smat rows: the forward's, or the A-mixing of its tmat rows tb.
  template <CpuIsa I>
  ELR_KRON_INLINE const A* smat_block(IsaTag<I>, const BackwardBlock<T, A>& b, const A* tb, Scratch<A>& w) const {
    if (smat != nullptr) return as_acc(smat + b.m0 * s.a1 * s.rank_cols(), b.rows_out * s.rank_cols(), w.s);
    mix_forward_rows<I, T>(s, f.aexp.data(), tb, b.nt, w.s);
    return w.s;
  }

  // One pass over dY in column groups, each read by both of its products while cache-hot: the
  // dU_cat partial [R, b1] += smat^T dY and ds = scale * dY uct (summed group by group). Each group
  // prefetches the next, the last one X's first group.
  template <CpuIsa I>
  ELR_KRON_INLINE void dy_products(IsaTag<I>, const BackwardBlock<T, A>& b, const A* sb, A* pu, Scratch<A>& w,
                                   Prefetcher& pf) const {
    const int64_t R = s.rank_cols(), b1 = s.b1, b2 = s.b2;
    for (int64_t k0 = 0; k0 < b1; k0 += group) {
      const int64_t g = std::min(group, b1 - k0);
      pf.clear();
      if (k0 + g < b1) {
        prefetch_group<T, A>(pf, b.dy, b.rows_out, b1, k0 + g, std::min(group, b1 - k0 - g), false);
      } else if (want_dV) {
        prefetch_group<T, A>(pf, b.x, b.rows_in, b2, 0, std::min(group, b2), false);
      } else if (dx != nullptr) {
        prefetch_group<T, A>(pf, b.dx, b.rows_in, b2, 0, std::min(group, b2), true);
      } else {
        prefetch_next_block(b, pf);
      }
      if (want_dU) small_gemm<I>(R, g, b.rows_out, sb, 1, R, b.dyb + k0, b1, pu + k0, b1, A(1), true, &pf);
      if (need.ds)
        small_gemm<I>(b.rows_out, R, g, b.dyb + k0, b1, 1, f.uct.data() + k0 * R, R, w.ds, R, alpha, k0 > 0, &pf);
    }
  }

  // The dV_cat partial [R, b2] += dt^T X, in column groups of X.
  template <CpuIsa I>
  ELR_KRON_INLINE void dv_partial(IsaTag<I>, const BackwardBlock<T, A>& b, A* pv, Scratch<A>& w,
                                  Prefetcher& pf) const {
    const int64_t R = s.rank_cols(), b2 = s.b2;
    for (int64_t q0 = 0; q0 < b2; q0 += group) {
      const int64_t g = std::min(group, b2 - q0);
      prefetch_after_group(b, q0 + g, /*x_side=*/true, pf);
      small_gemm<I>(R, g, b.rows_in, w.dt, 1, R, b.xb + q0, b2, pv + q0, b2, A(1), true, &pf);
    }
  }

  // dx (+)= dt vc for the block's rows, in column groups of dx.
  template <CpuIsa I>
  ELR_KRON_INLINE void dx_rows(IsaTag<I>, const BackwardBlock<T, A>& b, Scratch<A>& w, Prefetcher& pf) const {
    const int64_t R = s.rank_cols(), b2 = s.b2;
    A* dxb = dest(b.dx, w.out);
    if (!kNative<T, A> && accumulate_dx) as_acc(b.dx, b.nt * s.d_in(), dxb);
    for (int64_t q0 = 0; q0 < b2; q0 += group) {
      const int64_t g = std::min(group, b2 - q0);
      prefetch_after_group(b, q0 + g, /*x_side=*/false, pf);
      small_gemm<I>(b.rows_in, g, R, w.dt, R, 1, f.vc.data() + q0, b2, dxb + q0, b2, A(1), accumulate_dx, &pf);
    }
    store(b.dx, dxb, b.nt * s.d_in());
  }

  // The next block's first reads (its first group of dY and its saved tmat / smat rows), fetched
  // while this block's last column group computes.
  void prefetch_next_block(const BackwardBlock<T, A>& b, Prefetcher& pf) const {
    pf.clear();
    if (b.nt_next <= 0) return;
    const int64_t m1 = b.m0 + b.nt, R = s.rank_cols();
    prefetch_group<T, A>(pf, dy + m1 * s.d_out(), b.nt_next * s.a1, s.b1, 0, std::min(group, s.b1), false);
    if (want_dU && smat != nullptr)
      prefetch_group<T, A>(pf, smat + m1 * s.a1 * R, 1, 0, 0, b.nt_next * s.a1 * R, false);
    if (need.t && tmat != nullptr)
      prefetch_group<T, A>(pf, tmat + m1 * s.a2 * R, 1, 0, 0, b.nt_next * s.a2 * R, false);
  }

  // After the column group of X (x_side) or dx that ends at q_next: the next group of the same loop,
  // else the first of the dx loop, else the next block's first reads.
  void prefetch_after_group(const BackwardBlock<T, A>& b, int64_t q_next, bool x_side, Prefetcher& pf) const {
    pf.clear();
    const int64_t b2 = s.b2;
    if (q_next < b2) {
      const int64_t g_next = std::min(group, b2 - q_next);
      if (x_side) prefetch_group<T, A>(pf, b.x, b.rows_in, b2, q_next, g_next, false);
      else prefetch_group<T, A>(pf, b.dx, b.rows_in, b2, q_next, g_next, true);
    } else if (x_side && dx != nullptr) {
      prefetch_group<T, A>(pf, b.dx, b.rows_in, b2, 0, std::min(group, b2), true);
    } else {
      prefetch_next_block(b, pf);
    }
  }
};

// dU and dV from the chunks' partial sums, added in chunk order kReduce elements at a time
// (vectorised over the elements): dU[t, k, s] = alpha * dU_cat[t*r + s, k]; dV_cat is dV's layout.
template <typename T, typename A, typename ParallelFor>
void reduce_dU_dV(const KronShape& s, const BackwardChunks& ch, const A* partials, A alpha, T* dU, T* dV,
                  const ParallelFor& pfor) {
  constexpr int64_t kReduce = 256;
  const int64_t n = ch.n_du + ch.n_dv, b1 = s.b1;
  pfor(ceil_div(n, kReduce), [&](int64_t begin, int64_t end) {
    A sum[kReduce];
    for (int64_t u = begin; u < end; ++u) {
      const int64_t e0 = u * kReduce, len = std::min(kReduce, n - e0);
      std::copy_n(partials + e0, len, sum);
      for (int64_t c = 1; c < ch.chunks; ++c) {
        const A* pc = partials + c * ch.n_part + e0;
        for (int64_t e = 0; e < len; ++e) sum[e] += pc[e];
      }
      for (int64_t e = 0; e < len; ++e) {
        const int64_t idx = e0 + e;
        if (idx < ch.n_du) {  // dU_cat[j, k] -> dU[t, k, s]
          const int64_t j = idx / b1, k = idx % b1, t = j / s.r, q = j % s.r;
          dU[(t * b1 + k) * s.r + q] = static_cast<T>(sum[e] * alpha);
        } else {
          dV[idx - ch.n_du] = static_cast<T>(sum[e]);
        }
      }
    }
  });
}

// dA[t, i, p] from the chunks' [a1, a2, R] partials: the sum over chunks and the term's r rank
// columns, in fp64.
template <typename T, typename A>
void reduce_dA(const KronShape& s, const BackwardChunks& ch, const A* partials, T* dA) {
  const int64_t R = s.rank_cols(), a1 = s.a1, a2 = s.a2;
  for (int64_t i = 0; i < a1; ++i)
    for (int64_t p = 0; p < a2; ++p)
      for (int64_t t = 0; t < s.T; ++t) {
        double sum = 0.0;
        for (int64_t c = 0; c < ch.chunks; ++c) {
          const A* g = partials + c * ch.n_part + ch.n_du + ch.n_dv + (i * a2 + p) * R + t * s.r;
          for (int64_t q = 0; q < s.r; ++q) sum += static_cast<double>(g[q]);
        }
        dA[(t * a1 + i) * a2 + p] = static_cast<T>(static_cast<A>(sum));
      }
}

// ---- kron_delta's backward, step by step (kron_delta_backward_cpu) ------------------------------
// dA[t,i,p] = sum_{k,q} grad[(i*b1+k), (p*b2+q)] B[t,k,q], B = delta_product: one (i, p) per unit,
// fixed order.
template <typename T, typename A, typename ParallelFor>
void delta_grad_A(const KronShape& s, const T* grad, const A* B, T* dA, const ParallelFor& pfor) {
  const int64_t d_in = s.d_in(), b1 = s.b1, b2 = s.b2, nT = s.T;
  pfor(s.a1 * s.a2, [&](int64_t begin, int64_t end) {
    std::vector<A> g_buf(kNative<T, A> ? 0 : b2);
    std::vector<A> sums(static_cast<size_t>(nT));
    A* gb = g_buf.data();
    A* sm = sums.data();
    run_with_isa(
        [&](auto, int64_t ub, int64_t ue) ELR_KRON_INLINE_LAMBDA {
          for (int64_t u = ub; u < ue; ++u) {
            const int64_t i = u / s.a2, p = u % s.a2;
            std::fill_n(sm, nT, A(0));
            for (int64_t k = 0; k < b1; ++k) {
              const A* g = as_acc(grad + (i * b1 + k) * d_in + p * b2, b2, gb);
              for (int64_t t = 0; t < nT; ++t) sm[t] += dot(g, B + (t * b1 + k) * b2, b2);
            }
            for (int64_t t = 0; t < nT; ++t) dA[(t * s.a1 + i) * s.a2 + p] = static_cast<T>(sm[t]);
          }
        },
        begin, end);
  });
}

// dB[t,k,q] = sum_{i,p} grad[(i*b1+k), (p*b2+q)] A[t,i,p] ([T, b1, b2]; Aa: A as acc values): one k
// per unit (all t at once, so each grad segment is read once).
template <typename T, typename A, typename ParallelFor>
std::vector<A> delta_grad_B(const KronShape& s, const T* grad, const A* Aa, const ParallelFor& pfor) {
  const int64_t d_in = s.d_in(), b1 = s.b1, b2 = s.b2, nT = s.T;
  std::vector<A> dB_v(static_cast<size_t>(nT * b1 * b2));
  A* dB = dB_v.data();
  pfor(b1, [&](int64_t begin, int64_t end) {
    std::vector<A> g_buf(kNative<T, A> ? 0 : b2);
    std::vector<A> acc_buf(static_cast<size_t>(nT * b2));
    A* gb = g_buf.data();
    A* ab = acc_buf.data();
    run_with_isa(
        [&](auto, int64_t kb, int64_t ke) ELR_KRON_INLINE_LAMBDA {
          for (int64_t k = kb; k < ke; ++k) {
            std::fill_n(ab, nT * b2, A(0));
            for (int64_t i = 0; i < s.a1; ++i)
              for (int64_t p = 0; p < s.a2; ++p) {
                const A* g = as_acc(grad + (i * b1 + k) * d_in + p * b2, b2, gb);
                for (int64_t t = 0; t < nT; ++t) axpy(ab + t * b2, Aa[(t * s.a1 + i) * s.a2 + p], g, b2);
              }
            for (int64_t t = 0; t < nT; ++t) std::copy_n(ab + t * b2, b2, dB + (t * b1 + k) * b2);
          }
        },
        begin, end);
  });
  return dB_v;
}

// dU[t,k,s] = sum_q dB[t,k,q] V[t,s,q] (Va: V as acc values).
template <typename T, typename A, typename ParallelFor>
void delta_grad_U(const KronShape& s, const A* dB, const A* Va, T* dU, const ParallelFor& pfor) {
  const int64_t b1 = s.b1, b2 = s.b2, r = s.r;
  pfor(s.T * b1, [&](int64_t begin, int64_t end) {
    run_with_isa(
        [&](auto, int64_t ub, int64_t ue) ELR_KRON_INLINE_LAMBDA {
          for (int64_t tk = ub; tk < ue; ++tk) {
            const int64_t t = tk / b1;
            for (int64_t j = 0; j < r; ++j)
              dU[tk * r + j] = static_cast<T>(dot(dB + tk * b2, Va + (t * r + j) * b2, b2));
          }
        },
        begin, end);
  });
}

// dV[t,s,q] = sum_k U[t,k,s] dB[t,k,q] (Ua: U as acc values).
template <typename T, typename A, typename ParallelFor>
void delta_grad_V(const KronShape& s, const A* dB, const A* Ua, T* dV, const ParallelFor& pfor) {
  const int64_t b1 = s.b1, b2 = s.b2, r = s.r;
  pfor(s.T * r, [&](int64_t begin, int64_t end) {
    std::vector<A> out_buf(kNative<T, A> ? 0 : b2);
    A* ob = out_buf.data();
    run_with_isa(
        [&](auto, int64_t ub, int64_t ue) ELR_KRON_INLINE_LAMBDA {
          for (int64_t tj = ub; tj < ue; ++tj) {
            const int64_t t = tj / r, j = tj % r;
            T* dst = dV + tj * b2;
            A* out = dest(dst, ob);
            std::fill_n(out, b2, A(0));
            for (int64_t k = 0; k < b1; ++k) axpy(out, Ua[(t * b1 + k) * r + j], dB + (t * b1 + k) * b2, b2);
            store(dst, out, b2);
          }
        },
        begin, end);
  });
}

}  // namespace kron_cpu_detail

// ---- Implementations ----------------------------------------------------------------------------

template <typename T, typename ParallelFor>
void kron_lora_forward_cpu(const KronShape& s, const T* x, const T* A, const T* U, const T* V, T* y, bool accumulate,
                           double scale, T* tmat, T* smat, const ParallelFor& pfor) {
  using namespace kron_cpu_detail;
  using Acc = acc_t<T>;
  if (s.M <= 0) return;
  const int64_t R = s.rank_cols(), a1 = s.a1, a2 = s.a2, b1 = s.b1, d_in = s.d_in(), d_out = s.d_out();
  const Factors<Acc> f(s, A, U, V, /*aexpt=*/false, /*vt=*/true, /*vc=*/false, /*uc=*/true, /*uct=*/false);
  const int64_t mb = block_tokens(s);
  const int64_t group = std::max<int64_t>(kGroupBytes / int64_t(sizeof(Acc)), 1);
  const Acc alpha = static_cast<Acc>(scale);
  pfor(ceil_div(s.M, mb), [&](int64_t begin, int64_t end) {
    constexpr bool native = kNative<T, Acc>;
    Scratch<Acc> w(native ? 0 : mb * d_in, 0, native ? 0 : mb * d_out, mb * a2 * R, mb * a1 * R, 0, 0);
    Prefetcher pf;
    run_with_isa(
        [&](auto isa, int64_t bb, int64_t be) ELR_KRON_INLINE_LAMBDA {
          constexpr CpuIsa I = decltype(isa)::value;
          for (int64_t blk = bb; blk < be; ++blk) {
            const int64_t m0 = blk * mb, nt = std::min(mb, s.M - m0), rows_out = nt * a1;
            T* ydst = y + m0 * d_out;
            const Acc* xb = as_acc(x + m0 * d_in, nt * d_in, w.x);
            T* tdst = tmat != nullptr ? tmat + m0 * a2 * R : nullptr;
            T* sdst = smat != nullptr ? smat + m0 * a1 * R : nullptr;
            Acc* tb = dest(tdst, w.t);
            Acc* sb = dest(sdst, w.s);
            pf.clear();  // (X is read row by row: the hardware prefetches it)
            prefetch_group<T, Acc>(pf, ydst, rows_out, b1, 0, std::min(group, b1), /*write=*/true);
            tmat_rows<I, T>(s, f, xb, nt, tb, &pf);
            store(tdst, tb, nt * a2 * R);
            mix_forward_rows<I, T>(s, f.aexp.data(), tb, nt, sb);
            store(sdst, sb, nt * a1 * R);
            Acc* yb = dest(ydst, w.out);
            if (!native && accumulate) as_acc(ydst, nt * d_out, yb);  // T -> acc copy into w.out
            // y (+)= scale * smat uc, in column groups; each prefetches the next.
            for (int64_t k0 = 0; k0 < b1; k0 += group) {
              const int64_t g = std::min(group, b1 - k0);
              pf.clear();
              prefetch_group<T, Acc>(pf, ydst, rows_out, b1, k0 + g, std::min(group, b1 - k0 - g), true);
              small_gemm<I>(rows_out, g, R, sb, R, 1, f.uc.data() + k0, b1, yb + k0, b1, alpha, accumulate, &pf);
            }
            store(ydst, yb, nt * d_out);
          }
        },
        begin, end);
  });
}

template <typename T, typename ParallelFor>
void kron_lora_backward_cpu(const KronShape& s, const T* dy, const T* x, const T* A, const T* U, const T* V,
                            const T* tmat, const T* smat, double scale, T* dx, bool accumulate_dx, T* dA, T* dU,
                            T* dV, const ParallelFor& pfor) {
  using namespace kron_cpu_detail;
  using Acc = acc_t<T>;
  if (s.M <= 0) {  // sums over no tokens
    if (dA != nullptr) std::fill_n(dA, s.T * s.a1 * s.a2, static_cast<T>(0.0f));
    if (dU != nullptr) std::fill_n(dU, s.T * s.b1 * s.r, static_cast<T>(0.0f));
    if (dV != nullptr) std::fill_n(dV, s.rank_cols() * s.b2, static_cast<T>(0.0f));
    return;
  }
  const BackwardNeeds need =
      backward_needs(tmat != nullptr, smat != nullptr, dx != nullptr, dA != nullptr, dU != nullptr, dV != nullptr);
  if (!need.ds && dU == nullptr) return;
  const Factors<Acc> f(s, A, U, V, /*aexpt=*/need.dt, /*vt=*/need.t && tmat == nullptr, /*vc=*/dx != nullptr,
                       /*uc=*/false, /*uct=*/need.ds);
  const int64_t mb = block_tokens(s);
  const int64_t group = std::max<int64_t>(kGroupBytes / int64_t(sizeof(Acc)), 1);
  const BackwardPass<T, Acc> pass{s, f, dy, x, tmat, smat, dx, accumulate_dx, dU != nullptr, dV != nullptr, need, mb,
                                  group, static_cast<Acc>(scale)};
  const BackwardChunks ch = backward_chunks(s, mb, dU != nullptr, dV != nullptr, dA != nullptr);
  std::vector<Acc> partials(static_cast<size_t>(ch.chunks * ch.n_part));
  pfor(ch.chunks, [&](int64_t begin, int64_t end) {
    Scratch<Acc> w = pass.scratch();
    Prefetcher pf;
    run_with_isa(
        [&](auto isa, int64_t cb, int64_t ce) ELR_KRON_INLINE_LAMBDA {
          for (int64_t c = cb; c < ce; ++c) pass.chunk(isa, ch, c, partials.data(), w, pf);
        },
        begin, end);
  });
  reduce_dU_dV(s, ch, partials.data(), pass.alpha, dU, dV, pfor);
  if (dA != nullptr) reduce_dA(s, ch, partials.data(), dA);
}

template <typename T, typename ParallelFor>
void kron_delta_cpu(const KronShape& s, const T* A, const T* U, const T* V, T* dW, const ParallelFor& pfor) {
  using namespace kron_cpu_detail;
  using Acc = acc_t<T>;
  const std::vector<Acc> Ua = to_acc_vector<Acc>(U, s.T * s.b1 * s.r);
  const std::vector<Acc> Va = to_acc_vector<Acc>(V, s.T * s.r * s.b2);
  const std::vector<Acc> Aa = to_acc_vector<Acc>(A, s.T * s.a1 * s.a2);
  const std::vector<Acc> B = delta_product(s, Ua.data(), Va.data(), pfor);
  const int64_t d_in = s.d_in(), b1 = s.b1, b2 = s.b2;
  // One row (i, k) of dW per unit: for each p, dW[row, p*b2 : (p+1)*b2] = sum_t A[t,i,p] B[t,k,:].
  pfor(s.d_out(), [&](int64_t begin, int64_t end) {
    std::vector<Acc> out_buf(kNative<T, Acc> ? 0 : b2);
    Acc* ob = out_buf.data();
    run_with_isa(
        [&](auto, int64_t rb, int64_t re) ELR_KRON_INLINE_LAMBDA {
          for (int64_t row = rb; row < re; ++row) {
            const int64_t i = row / b1, k = row % b1;
            for (int64_t p = 0; p < s.a2; ++p) {
              T* dst = dW + row * d_in + p * b2;
              Acc* out = dest(dst, ob);
              std::fill_n(out, b2, Acc(0));
              for (int64_t t = 0; t < s.T; ++t)
                axpy(out, Aa[(t * s.a1 + i) * s.a2 + p], B.data() + (t * b1 + k) * b2, b2);
              store(dst, out, b2);
            }
          }
        },
        begin, end);
  });
}

template <typename T, typename ParallelFor>
void kron_delta_backward_cpu(const KronShape& s, const T* grad, const T* A, const T* U, const T* V, T* dA, T* dU,
                             T* dV, const ParallelFor& pfor) {
  using namespace kron_cpu_detail;
  using Acc = acc_t<T>;
  if (dA == nullptr && dU == nullptr && dV == nullptr) return;
  const std::vector<Acc> Ua = to_acc_vector<Acc>(U, s.T * s.b1 * s.r);
  const std::vector<Acc> Va = to_acc_vector<Acc>(V, s.T * s.r * s.b2);
  const std::vector<Acc> Aa = to_acc_vector<Acc>(A, s.T * s.a1 * s.a2);
  if (dA != nullptr) delta_grad_A(s, grad, delta_product(s, Ua.data(), Va.data(), pfor).data(), dA, pfor);
  if (dU == nullptr && dV == nullptr) return;
  const std::vector<Acc> dB = delta_grad_B(s, grad, Aa.data(), pfor);
  if (dU != nullptr) delta_grad_U(s, dB.data(), Va.data(), dU, pfor);
  if (dV != nullptr) delta_grad_V(s, dB.data(), Ua.data(), dV, pfor);
}

}  // namespace elr
