// FDN (eq. 8) CPU kernels: fused GroupNorm + modulation + optional SiLU, forward and backward.
// Torch-free header-only templates over T in {float, double, at::Half, at::BFloat16}; values are
// converted with static_cast to and from acc_t<T> (fp32, or fp64 for double).
//
//   forward:  mean, rstd per (n, g) by two passes (mean, then the sum of squared deviations);
//             out = act(zhat * (1 + gamma) + beta),  zhat = (z - mean) * rstd
//   backward: gate = dout * act'(pre),  dbeta = gate,  dgamma = gate * zhat,
//             dzhat = gate * (1 + gamma),
//             dz = rstd * (dzhat - mean_g(dzhat) - zhat * mean_g(dzhat * zhat))
//             zhat (and pre for SiLU) are recomputed from z, never stored.
//
// How the work is split:
//   NCHW  one task per (n, g). A group is one contiguous run of (C/G)*HW elements (160 KB at
//         [2, 320, 64, 64], G = 32), so its passes run while it sits in L2.
//   NHWC  loops run along channels. Small problems: one task per (n, tile of whole groups over
//         all rows), every pass while the tile is in L2, as NCHW. Large ones: tasks over blocks of
//         whole rows; per-group statistics (two-pass inside the cache-hot block) are merged in
//         fp64 (Chan et al.), then a second parallel loop applies. See NhwcPlan.
// Every inner loop is branch-free over contiguous memory so the compiler vectorises it; sums use
// several independent lanes (no -ffast-math needed), flushed to fp64 per chunk. On x86 with
// GCC/Clang the same loops are also compiled for AVX2 and AVX-512 and picked at run time, the
// way ATen does it, because the extension itself is built for the baseline ISA.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "accumulate.h"
#include "cpu_isa.h"
#include "fdn_common.h"

#if ELR_X86_DISPATCH
#define ELR_FDN_TARGET_AVX2 __attribute__((target("avx2,fma")))
#define ELR_FDN_TARGET_AVX512 \
  __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx2,fma,prefer-vector-width=512")))
#endif

#if defined(__GNUC__)
// Forced inlining is what carries the caller's ISA into the loops (see run_with_isa).
#define ELR_FDN_INLINE inline __attribute__((always_inline))
#define ELR_FDN_INLINE_LAMBDA __attribute__((always_inline))
#define ELR_FDN_RESTRICT __restrict__
#define ELR_FDN_UNROLL _Pragma("GCC unroll 64")
#else
#define ELR_FDN_INLINE inline
#define ELR_FDN_INLINE_LAMBDA
#define ELR_FDN_RESTRICT
#define ELR_FDN_UNROLL
#endif

namespace elr {

namespace fdn_detail {

#if ELR_X86_DISPATCH
template <typename Body>
ELR_FDN_TARGET_AVX2 void run_avx2(const Body& body, int64_t begin, int64_t end) {
  body(begin, end);
}
template <typename Body>
ELR_FDN_TARGET_AVX512 void run_avx512(const Body& body, int64_t begin, int64_t end) {
  body(begin, end);
}
#endif

// Runs body(begin, end) compiled for the best ISA available: body must be declared with
// ELR_FDN_INLINE_LAMBDA and call only ELR_FDN_INLINE functions, so that all of it is inlined
// into the ISA-specific instantiation.
template <typename Body>
void run_with_isa(CpuIsa isa, const Body& body, int64_t begin, int64_t end) {
#if ELR_X86_DISPATCH
  if (isa == CpuIsa::Avx512) return run_avx512(body, begin, end);
  if (isa == CpuIsa::Avx2) return run_avx2(body, begin, end);
#endif
  (void)isa;
  body(begin, end);
}

// Elements per local buffer: fp16/bf16 inputs are converted chunk by chunk into acc-typed
// buffers that stay in L1, and every sum is flushed to fp64 once per chunk.
constexpr int64_t kChunk = 256;

// A per-group or per-channel value used where a loop indexes an array: m[i] is the same for all i.
template <typename A>
struct Bcast {
  A v;
  A operator[](int64_t) const { return v; }
};

// src as acc-typed values: the pointer itself when T is the acc type, else converted into buf.
template <typename A, typename T>
ELR_FDN_INLINE const A* load(const T* src, int64_t n, A* ELR_FDN_RESTRICT buf) {
  if constexpr (std::is_same<A, T>::value) {
    (void)n;
    (void)buf;
    return src;
  } else {
    for (int64_t i = 0; i < n; ++i) buf[i] = static_cast<A>(src[i]);
    return buf;
  }
}

// Where to compute acc-typed results bound for dst: dst itself when T is the acc type, else buf
// (then store() converts).
template <typename A, typename T>
ELR_FDN_INLINE A* dest(T* dst, A* buf) {
  if constexpr (std::is_same<A, T>::value) {
    (void)buf;
    return dst;
  } else {
    (void)dst;
    return buf;
  }
}

template <typename A, typename T>
ELR_FDN_INLINE void store(T* dst, const A* ELR_FDN_RESTRICT buf, int64_t n) {
  if constexpr (!std::is_same<A, T>::value) {
    for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<T>(buf[i]);
  } else {
    (void)dst;
    (void)buf;
    (void)n;
  }
}

// Sums with 64 bytes of independent lanes: vectorises without reassociation flags.
// (Fully unrolled, so the lanes stay in registers.)
template <typename A>
ELR_FDN_INLINE A reduce_lanes(A* acc) {
  constexpr int L = 64 / sizeof(A);
  ELR_FDN_UNROLL
  for (int w = L / 2; w > 0; w /= 2)
    ELR_FDN_UNROLL
    for (int j = 0; j < w; ++j) acc[j] += acc[j + w];
  return acc[0];
}

// (The tail goes to its own scalar: indexing the lanes with a variable would keep them in memory.)
template <typename A>
ELR_FDN_INLINE A lane_sum(const A* ELR_FDN_RESTRICT x, int64_t n) {
  constexpr int L = 64 / sizeof(A);
  A acc[L] = {};
  int64_t i = 0;
  for (; i + L <= n; i += L)
    ELR_FDN_UNROLL
    for (int j = 0; j < L; ++j) acc[j] += x[i + j];
  A tail = 0;
  for (; i < n; ++i) tail += x[i];
  return reduce_lanes(acc) + tail;
}

// sum((x - m)^2)
template <typename A>
ELR_FDN_INLINE A lane_sum_sq_dev(const A* ELR_FDN_RESTRICT x, A m, int64_t n) {
  constexpr int L = 64 / sizeof(A);
  A acc[L] = {};
  int64_t i = 0;
  for (; i + L <= n; i += L)
    ELR_FDN_UNROLL
    for (int j = 0; j < L; ++j) {
      const A d = x[i + j] - m;
      acc[j] += d * d;
    }
  A tail = 0;
  for (; i < n; ++i) tail += (x[i] - m) * (x[i] - m);
  return reduce_lanes(acc) + tail;
}

// exp(x) for fp32 (Cephes expf: round-to-nearest range reduction, degree-6 polynomial, within
// 2 ulp) written so that loops calling it vectorise; std::exp does not without -ffast-math.
// |x| is clamped to 87 on the bit pattern: a float clamp (std::min/max) lets GCC fold the clamped
// cases into branches that stop vectorisation. exp(NaN) is then finite, which SiLU does not
// notice: its result is NaN through the other factor (pre / (1 + exp(-pre))).
ELR_FDN_INLINE float exp_vec(float x) {
  int32_t bits;
  std::memcpy(&bits, &x, sizeof(bits));
  bits = (bits & INT32_MIN) | std::min(bits & INT32_MAX, int32_t{0x42AE0000});  // 0x42AE0000 = 87.0f
  std::memcpy(&x, &bits, sizeof(x));
  const float shifted = x * 1.44269504088896341f + 12582912.0f;  // 1.5 * 2^23: rounds to integer
  const float k = shifted - 12582912.0f;
  int32_t ki;
  std::memcpy(&ki, &shifted, sizeof(ki));
  ki -= 0x4B400000;  // the integer k sits in the low mantissa bits of `shifted`
  float r = x - k * 0.693359375f;
  r = r - k * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float y = p * r * r + r + 1.0f;
  const int32_t scale_bits = static_cast<int32_t>(static_cast<uint32_t>(ki + 127) << 23);
  float scale;
  std::memcpy(&scale, &scale_bits, sizeof(scale));
  return y * scale;
}
ELR_FDN_INLINE double exp_vec(double x) { return std::exp(x); }

template <FdnActivation kAct, typename A>
ELR_FDN_INLINE A act_forward(A pre) {
  if constexpr (kAct == FdnActivation::SiLU) {
    return pre / (A(1) + exp_vec(-pre));
  } else {
    return pre;
  }
}

// d act / d pre; silu'(x) = s * (1 + x * (1 - s)), s = sigmoid(x)
template <FdnActivation kAct, typename A>
ELR_FDN_INLINE A act_grad(A pre) {
  if constexpr (kAct == FdnActivation::SiLU) {
    const A s = A(1) / (A(1) + exp_vec(-pre));
    return s * (A(1) + pre * (A(1) - s));
  } else {
    (void)pre;
    return A(1);
  }
}

// ---- element loops (M, R, K: a Bcast or a pointer; G, B likewise) -------------------------------

// Broadcast affine: out = act((x - m) * a + b), a = rstd * (1 + gamma).
template <FdnActivation kAct, typename A, typename M, typename S, typename B>
ELR_FDN_INLINE void fwd_affine(const A* ELR_FDN_RESTRICT x, M m, S a, B b, A* ELR_FDN_RESTRICT out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = act_forward<kAct>((x[i] - m[i]) * a[i] + b[i]);
}

// Full-size affine: out = act(zhat * (1 + g) + b).
template <FdnActivation kAct, typename A, typename M, typename R>
ELR_FDN_INLINE void fwd_full(const A* ELR_FDN_RESTRICT x, M m, R r, const A* ELR_FDN_RESTRICT g,
                             const A* ELR_FDN_RESTRICT b, A* ELR_FDN_RESTRICT out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    const A zh = (x[i] - m[i]) * r[i];
    out[i] = act_forward<kAct>(zh * (A(1) + g[i]) + b[i]);
  }
}

// Backward terms per element: writes dzhat = gate * (1 + gamma) to dzh (kept for the dz pass
// when it can hold fp32/fp64 exactly: dz itself). kFull: also writes dgamma = gate * zhat and
// dbeta = gate, and yields s1 = dzhat, s2 = dzhat * zhat. Broadcast: yields s1 = gate,
// s2 = gate * zhat (the per-channel dbeta and dgamma). kAccum adds into s1/s2 (per-channel
// accumulators) instead of assigning.
template <FdnActivation kAct, bool kFull, bool kAccum, typename A, typename M, typename R, typename G, typename B>
ELR_FDN_INLINE void bwd_terms(const A* ELR_FDN_RESTRICT x, const A* ELR_FDN_RESTRICT dy, M m, R r, G g, B b,
                              A* ELR_FDN_RESTRICT dzh, A* ELR_FDN_RESTRICT s1, A* ELR_FDN_RESTRICT s2,
                              A* ELR_FDN_RESTRICT dg, A* ELR_FDN_RESTRICT db, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    const A zh = (x[i] - m[i]) * r[i];
    const A one_g = A(1) + g[i];
    A gate = dy[i];
    if constexpr (kAct != FdnActivation::None) gate *= act_grad<kAct>(zh * one_g + b[i]);
    const A d = gate * one_g;
    dzh[i] = d;
    A t1 = gate, t2 = gate * zh;
    if constexpr (kFull) {
      dg[i] = t2;
      db[i] = gate;
      t1 = d;
      t2 = d * zh;
    } else {
      (void)dg;
      (void)db;
    }
    if constexpr (kAccum) {
      s1[i] += t1;
      s2[i] += t2;
    } else {
      s1[i] = t1;
      s2[i] = t2;
    }
  }
}

// dz = rstd * (dzhat - k1 - zhat * k2), k1 = mean_g(dzhat), k2 = mean_g(dzhat * zhat), with dzhat
// recomputed (fp16/bf16, where dz cannot hold it) ...
template <FdnActivation kAct, typename A, typename M, typename R, typename G, typename B, typename K>
ELR_FDN_INLINE void bwd_dz(const A* ELR_FDN_RESTRICT x, const A* ELR_FDN_RESTRICT dy, M m, R r, G g, B b, K k1,
                           K k2, A* ELR_FDN_RESTRICT dz, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    const A zh = (x[i] - m[i]) * r[i];
    const A one_g = A(1) + g[i];
    A gate = dy[i];
    if constexpr (kAct != FdnActivation::None) gate *= act_grad<kAct>(zh * one_g + b[i]);
    dz[i] = (gate * one_g - k1[i] - zh * k2[i]) * r[i];
  }
}

// ... or read back from dz, where the first pass left it (fp32/fp64): no second exp for SiLU, and
// two streams instead of four.
template <typename A, typename M, typename R, typename K>
ELR_FDN_INLINE void bwd_dz_inplace(const A* ELR_FDN_RESTRICT x, M m, R r, K k1, K k2, A* ELR_FDN_RESTRICT dz,
                                   int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    const A zh = (x[i] - m[i]) * r[i];
    dz[i] = (dz[i] - k1[i] - zh * k2[i]) * r[i];
  }
}

// Group statistics merged from parts (Chan et al.): each part brings its count, mean and sum of
// squared deviations M2, computed two-pass while it is in L1; merging is exact algebra in fp64.
struct MeanM2 {
  double count = 0, mean = 0, m2 = 0;
  void merge(double n, double part_mean, double part_m2) {
    if (n <= 0) return;
    const double total = count + n, delta = part_mean - mean;
    mean += delta * (n / total);
    m2 += part_m2 + delta * delta * (count * n / total);
    count = total;
  }
  template <typename A>
  A rstd(double eps) const {
    return static_cast<A>(1.0 / std::sqrt((count > 0 ? m2 / count : 0.0) + eps));
  }
};

// ---- NCHW: one task per (n, g) ---------------------------------------------------------------

template <typename T, FdnActivation kAct, bool kBcast>
ELR_FDN_INLINE void forward_nchw_groups(const FdnShape& s, const T* z, const T* gamma, const T* beta, T* out,
                                        acc_t<T>* mean, acc_t<T>* rstd, int64_t begin, int64_t end) {
  using A = acc_t<T>;
  const int64_t Cg = s.channels_per_group(), HW = s.HW, L = Cg * HW;
  alignas(64) A xb[kChunk], gb[kChunk], bb[kChunk], ob[kChunk];
  for (int64_t ng = begin; ng < end; ++ng) {
    const int64_t n = ng / s.G, c0 = (ng % s.G) * Cg;
    const int64_t base = (n * s.C + c0) * HW;
    MeanM2 stats;  // one read of the group from L2; the two passes run over each chunk in L1
    for (int64_t i = 0; i < L; i += kChunk) {
      const int64_t len = std::min(kChunk, L - i);
      const A* x = load(z + base + i, len, xb);
      const A part_mean = lane_sum(x, len) / static_cast<A>(len);
      stats.merge(static_cast<double>(len), part_mean, lane_sum_sq_dev(x, part_mean, len));
    }
    const A mu = static_cast<A>(stats.mean), rs = stats.rstd<A>(s.eps);
    mean[ng] = mu;
    rstd[ng] = rs;
    if constexpr (kBcast) {
      for (int64_t c = c0; c < c0 + Cg; ++c) {
        const A a = rs * (A(1) + static_cast<A>(gamma[n * s.C + c]));
        const A b = static_cast<A>(beta[n * s.C + c]);
        const int64_t off = (n * s.C + c) * HW;
        for (int64_t i = 0; i < HW; i += kChunk) {
          const int64_t len = std::min(kChunk, HW - i);
          A* o = dest(out + off + i, ob);
          fwd_affine<kAct>(load(z + off + i, len, xb), Bcast<A>{mu}, Bcast<A>{a}, Bcast<A>{b}, o, len);
          store(out + off + i, o, len);
        }
      }
    } else {  // full-size gamma/beta: the group is contiguous in them too
      for (int64_t i = 0; i < L; i += kChunk) {
        const int64_t len = std::min(kChunk, L - i), off = base + i;
        A* o = dest(out + off, ob);
        fwd_full<kAct>(load(z + off, len, xb), Bcast<A>{mu}, Bcast<A>{rs}, load(gamma + off, len, gb),
                       load(beta + off, len, bb), o, len);
        store(out + off, o, len);
      }
    }
  }
}

template <typename T, FdnActivation kAct, bool kBcast>
ELR_FDN_INLINE void backward_nchw_groups(const FdnShape& s, const T* dout, const T* z, const T* gamma,
                                         const T* beta, const acc_t<T>* mean, const acc_t<T>* rstd, T* dz,
                                         T* dgamma, T* dbeta, int64_t begin, int64_t end) {
  using A = acc_t<T>;
  const int64_t Cg = s.channels_per_group(), HW = s.HW, L = Cg * HW;
  const double inv_l = L > 0 ? 1.0 / static_cast<double>(L) : 0.0;
  constexpr bool kBeta = kAct != FdnActivation::None;      // beta only enters through the activation
  constexpr bool kInPlace = std::is_same<T, A>::value;     // dz holds dzhat between the passes
  alignas(64) A xb[kChunk], yb[kChunk], gb[kChunk], bb[kChunk], t1[kChunk], t2[kChunk], dgb[kChunk],
      dbb[kChunk], dzb[kChunk];
  for (int64_t ng = begin; ng < end; ++ng) {
    const int64_t n = ng / s.G, c0 = (ng % s.G) * Cg;
    const int64_t base = (n * s.C + c0) * HW;
    const A mu = mean[ng], rs = rstd[ng];
    double s1 = 0, s2 = 0;  // sum(dzhat), sum(dzhat * zhat) over the group
    if constexpr (kBcast) {
      for (int64_t c = c0; c < c0 + Cg; ++c) {
        const A gc = static_cast<A>(gamma[n * s.C + c]);
        const A bc = kBeta ? static_cast<A>(beta[n * s.C + c]) : A(0);
        const int64_t off = (n * s.C + c) * HW;
        double sum_gate = 0, sum_gate_zh = 0;
        for (int64_t i = 0; i < HW; i += kChunk) {
          const int64_t len = std::min(kChunk, HW - i);
          // dzhat stays in dz for the second pass (fp32/fp64), else it is dropped and recomputed.
          A* dzh = kInPlace && dz ? dest(dz + off + i, dzb) : dzb;
          bwd_terms<kAct, false, false>(load(z + off + i, len, xb), load(dout + off + i, len, yb), Bcast<A>{mu},
                                        Bcast<A>{rs}, Bcast<A>{gc}, Bcast<A>{bc}, dzh, t1, t2, dgb, dbb, len);
          sum_gate += lane_sum(t1, len);
          sum_gate_zh += lane_sum(t2, len);
        }
        if (dbeta) dbeta[n * s.C + c] = static_cast<T>(static_cast<A>(sum_gate));
        if (dgamma) dgamma[n * s.C + c] = static_cast<T>(static_cast<A>(sum_gate_zh));
        s1 += (1.0 + gc) * sum_gate;
        s2 += (1.0 + gc) * sum_gate_zh;
      }
    } else {
      for (int64_t i = 0; i < L; i += kChunk) {
        const int64_t len = std::min(kChunk, L - i), off = base + i;
        A* dg = dgamma ? dest(dgamma + off, dgb) : dgb;
        A* db = dbeta ? dest(dbeta + off, dbb) : dbb;
        A* dzh = kInPlace && dz ? dest(dz + off, dzb) : dzb;
        const A* bp = kBeta ? load(beta + off, len, bb) : bb;
        bwd_terms<kAct, true, false>(load(z + off, len, xb), load(dout + off, len, yb), Bcast<A>{mu}, Bcast<A>{rs},
                                     load(gamma + off, len, gb), bp, dzh, t1, t2, dg, db, len);
        if (dgamma) store(dgamma + off, dg, len);
        if (dbeta) store(dbeta + off, db, len);
        s1 += lane_sum(t1, len);
        s2 += lane_sum(t2, len);
      }
    }
    if (!dz) continue;
    const Bcast<A> k1{static_cast<A>(s1 * inv_l)}, k2{static_cast<A>(s2 * inv_l)};
    if constexpr (kInPlace) {
      for (int64_t i = 0; i < L; i += kChunk) {
        const int64_t len = std::min(kChunk, L - i);
        bwd_dz_inplace(z + base + i, Bcast<A>{mu}, Bcast<A>{rs}, k1, k2, dz + base + i, len);
      }
    } else if constexpr (kBcast) {
      for (int64_t c = c0; c < c0 + Cg; ++c) {
        const A gc = static_cast<A>(gamma[n * s.C + c]);
        const A bc = kBeta ? static_cast<A>(beta[n * s.C + c]) : A(0);
        const int64_t off = (n * s.C + c) * HW;
        for (int64_t i = 0; i < HW; i += kChunk) {
          const int64_t len = std::min(kChunk, HW - i);
          bwd_dz<kAct>(load(z + off + i, len, xb), load(dout + off + i, len, yb), Bcast<A>{mu}, Bcast<A>{rs},
                       Bcast<A>{gc}, Bcast<A>{bc}, k1, k2, dzb, len);
          store(dz + off + i, dzb, len);
        }
      }
    } else {
      for (int64_t i = 0; i < L; i += kChunk) {
        const int64_t len = std::min(kChunk, L - i), off = base + i;
        const A* bp = kBeta ? load(beta + off, len, bb) : bb;
        bwd_dz<kAct>(load(z + off, len, xb), load(dout + off, len, yb), Bcast<A>{mu}, Bcast<A>{rs},
                     load(gamma + off, len, gb), bp, k1, k2, dzb, len);
        store(dz + off, dzb, len);
      }
    }
  }
}

// ---- NHWC (channels_last) --------------------------------------------------------------------
// A task is (n, channel tile of whole groups, row block). Loops run along the channels of a row,
// with per-channel fp32 accumulators flushed to fp64 every kFlushRows rows.
//   fused: when a tile of all HW rows is small (<= kTileBytes), row blocks = 1 and tiles are as
//          narrow as keeps rows >= 128 channels: each task holds whole groups, does every pass
//          while its tile is in L2, and needs no merge (like NCHW).
//   split: otherwise tiles = 1 (whole rows, which the hardware prefetchers follow) and row blocks
//          carry per-group partial statistics (two-pass inside the block, then merged in fp64
//          with MeanM2) or per-channel partial sums (backward); the last pass runs as a second
//          parallel loop.

constexpr int64_t kFlushRows = 64;
constexpr int64_t kTileBytes = 256 * 1024;

struct NhwcPlan {
  int64_t groups = 1, tiles = 1;  // channel tiles of `groups` groups, `tiles` per sample
  int64_t rows = 1, blocks = 1;   // row blocks of `rows` rows, `blocks` per sample
  NhwcPlan(const FdnShape& s, int64_t acc_bytes) {
    const int64_t Cg = std::max<int64_t>(1, s.channels_per_group()), HW = std::max<int64_t>(1, s.HW);
    groups = std::min(s.G, (128 + Cg - 1) / Cg);
    if (HW * groups * Cg * acc_bytes <= kTileBytes) {
      tiles = (s.G + groups - 1) / groups;
      rows = HW;
    } else {
      groups = s.G;
      rows = std::min(HW, std::max((HW + 15) / 16, (16384 + s.C - 1) / std::max<int64_t>(1, s.C)));
      blocks = (HW + rows - 1) / rows;
    }
  }
  bool fused() const { return blocks == 1; }
  int64_t total(const FdnShape& s) const { return s.N * tiles * blocks; }
};

struct NhwcTask {
  int64_t n, g0, g1, c0, W, r0, r1;
  NhwcTask(const FdnShape& s, const NhwcPlan& p, int64_t u) {
    const int64_t per_n = p.tiles * p.blocks, tile = u % per_n / p.blocks, block = u % per_n % p.blocks;
    n = u / per_n;
    g0 = tile * p.groups;
    g1 = std::min(s.G, g0 + p.groups);
    c0 = g0 * s.channels_per_group();
    W = (g1 - g0) * s.channels_per_group();
    r0 = block * p.rows;
    r1 = std::min(s.HW, r0 + p.rows);
  }
  int64_t offset(const FdnShape& s, int64_t r, int64_t c) const { return (n * s.HW + r) * s.C + c0 + c; }
};

// Per-channel sums over the task's rows: fn(r, c, len, lanes1 + c, lanes2 + c) accumulates the
// row chunk [c, c + len) of the tile; fp32 lanes are flushed into the fp64 totals.
template <typename A, typename Fn>
ELR_FDN_INLINE void nhwc_sums(const NhwcTask& t, A* lanes1, A* lanes2, double* total1, double* total2, Fn&& fn) {
  std::fill(total1, total1 + t.W, 0.0);
  std::fill(total2, total2 + t.W, 0.0);
  for (int64_t r0 = t.r0; r0 < t.r1; r0 += kFlushRows) {
    std::fill(lanes1, lanes1 + t.W, A(0));
    std::fill(lanes2, lanes2 + t.W, A(0));
    for (int64_t r = r0; r < std::min(t.r1, r0 + kFlushRows); ++r)
      for (int64_t c = 0; c < t.W; c += kChunk) fn(r, c, std::min(kChunk, t.W - c), lanes1 + c, lanes2 + c);
    for (int64_t i = 0; i < t.W; ++i) {
      total1[i] += lanes1[i];
      total2[i] += lanes2[i];
    }
  }
}

// Per-channel vectors of one task's tile width.
template <typename A>
struct NhwcScratch {
  std::vector<A> lanes1, lanes2, m, r, b;
  std::vector<double> total1, total2;
  explicit NhwcScratch(int64_t W) : lanes1(W), lanes2(W), m(W), r(W), b(W), total1(W), total2(W) {}
};

// Statistics of a task's rows, per group of its tile: count, mean (and the fp32-rounded mean in
// m, per channel), M2, two-pass over the rows.
template <typename T>
ELR_FDN_INLINE void nhwc_task_stats(const FdnShape& s, const NhwcTask& t, const T* z, NhwcScratch<acc_t<T>>& w,
                                    MeanM2* stats) {
  using A = acc_t<T>;
  const int64_t Cg = s.channels_per_group();
  const double count = static_cast<double>((t.r1 - t.r0) * Cg);
  alignas(64) A xb[kChunk];
  nhwc_sums(t, w.lanes1.data(), w.lanes2.data(), w.total1.data(), w.total2.data(),
            [&](int64_t r, int64_t c, int64_t len, A* acc, A*) ELR_FDN_INLINE_LAMBDA {
              const A* x = load(z + t.offset(s, r, c), len, xb);
              for (int64_t i = 0; i < len; ++i) acc[i] += x[i];
            });
  for (int64_t g = 0; g < t.g1 - t.g0; ++g) {
    double sum = 0;
    for (int64_t i = g * Cg; i < (g + 1) * Cg; ++i) sum += w.total1[i];
    stats[g].count = count;
    stats[g].mean = count > 0 ? sum / count : 0.0;
    std::fill(w.m.begin() + g * Cg, w.m.begin() + (g + 1) * Cg, static_cast<A>(stats[g].mean));
  }
  nhwc_sums(t, w.lanes1.data(), w.lanes2.data(), w.total1.data(), w.total2.data(),
            [&](int64_t r, int64_t c, int64_t len, A* acc, A*) ELR_FDN_INLINE_LAMBDA {
              const A* x = load(z + t.offset(s, r, c), len, xb);
              const A* m = w.m.data() + c;
              for (int64_t i = 0; i < len; ++i) {
                const A d = x[i] - m[i];
                acc[i] += d * d;
              }
            });
  for (int64_t g = 0; g < t.g1 - t.g0; ++g) {
    double sq = 0;
    for (int64_t i = g * Cg; i < (g + 1) * Cg; ++i) sq += w.total1[i];
    // sum (x - m)^2 about the rounded mean m = M2 + count * (mean - m)^2
    const double shift = stats[g].mean - static_cast<double>(w.m[g * Cg]);
    stats[g].m2 = std::max(0.0, sq - count * shift * shift);
  }
}

// out = act((x - m_c) * a_c + b_c) (broadcast, a_c = rstd * (1 + gamma_c)) or
// act((x - m_c) * a_c * (1 + gamma) + beta) (full, a_c = rstd); m, a, b index the tile's channels.
template <typename T, FdnActivation kAct, bool kBcast>
ELR_FDN_INLINE void nhwc_apply(const FdnShape& s, const NhwcTask& t, const T* z, const T* gamma, const T* beta,
                               T* out, const acc_t<T>* m, const acc_t<T>* a, const acc_t<T>* b) {
  using A = acc_t<T>;
  alignas(64) A xb[kChunk], gb[kChunk], bb[kChunk], ob[kChunk];
  for (int64_t r = t.r0; r < t.r1; ++r)
    for (int64_t c = 0; c < t.W; c += kChunk) {
      const int64_t len = std::min(kChunk, t.W - c), off = t.offset(s, r, c);
      A* o = dest(out + off, ob);
      if constexpr (kBcast) {
        (void)gamma, (void)beta;
        fwd_affine<kAct>(load(z + off, len, xb), m + c, a + c, b + c, o, len);
      } else {
        (void)b;
        fwd_full<kAct>(load(z + off, len, xb), m + c, a + c, load(gamma + off, len, gb), load(beta + off, len, bb), o,
                       len);
      }
      store(out + off, o, len);
    }
}

// Per-channel sums of the bwd_terms (s1, s2) over the task's rows into w.total1/total2; full
// gamma writes dgamma/dbeta, and fp32/fp64 leave dzhat in dz. m, r, g, b index the tile's channels
// (g, b: broadcast gamma/beta in the acc type).
template <typename T, FdnActivation kAct, bool kBcast>
ELR_FDN_INLINE void nhwc_backward_sums(const FdnShape& s, const NhwcTask& t, const T* dout, const T* z,
                                       const T* gamma, const T* beta, const acc_t<T>* m, const acc_t<T>* r,
                                       const acc_t<T>* g, const acc_t<T>* b, T* dz, T* dgamma, T* dbeta,
                                       NhwcScratch<acc_t<T>>& w) {
  using A = acc_t<T>;
  [[maybe_unused]] constexpr bool kBeta = kAct != FdnActivation::None;
  constexpr bool kInPlace = std::is_same<T, A>::value;
  alignas(64) A xb[kChunk], yb[kChunk], gb[kChunk], bb[kChunk], dgb[kChunk], dbb[kChunk], dzb[kChunk];
  nhwc_sums(t, w.lanes1.data(), w.lanes2.data(), w.total1.data(), w.total2.data(),
            [&](int64_t row, int64_t c, int64_t len, A* acc1, A* acc2) ELR_FDN_INLINE_LAMBDA {
              const int64_t off = t.offset(s, row, c);
              const A* x = load(z + off, len, xb);
              const A* dy = load(dout + off, len, yb);
              A* dzh = kInPlace && dz ? dest(dz + off, dzb) : dzb;
              if constexpr (kBcast) {
                (void)gamma, (void)beta;
                bwd_terms<kAct, false, true>(x, dy, m + c, r + c, g + c, b + c, dzh, acc1, acc2, dgb, dbb, len);
              } else {
                (void)g, (void)b;
                A* dg = dgamma ? dest(dgamma + off, dgb) : dgb;
                A* db = dbeta ? dest(dbeta + off, dbb) : dbb;
                const A* bp = kBeta ? load(beta + off, len, bb) : bb;
                bwd_terms<kAct, true, true>(x, dy, m + c, r + c, load(gamma + off, len, gb), bp, dzh, acc1, acc2, dg,
                                            db, len);
                if (dgamma) store(dgamma + off, dg, len);
                if (dbeta) store(dbeta + off, db, len);
              }
            });
}

// dz over the task's rows; k1/k2 = mean_g(dzhat), mean_g(dzhat * zhat) per channel.
template <typename T, FdnActivation kAct, bool kBcast>
ELR_FDN_INLINE void nhwc_dz(const FdnShape& s, const NhwcTask& t, const T* dout, const T* z, const T* gamma,
                            const T* beta, const acc_t<T>* m, const acc_t<T>* r, const acc_t<T>* g,
                            const acc_t<T>* b, const acc_t<T>* k1, const acc_t<T>* k2, T* dz) {
  using A = acc_t<T>;
  [[maybe_unused]] constexpr bool kBeta = kAct != FdnActivation::None;
  alignas(64) A xb[kChunk], yb[kChunk], gb[kChunk], bb[kChunk], dzb[kChunk];
  for (int64_t row = t.r0; row < t.r1; ++row)
    for (int64_t c = 0; c < t.W; c += kChunk) {
      const int64_t len = std::min(kChunk, t.W - c), off = t.offset(s, row, c);
      if constexpr (std::is_same<T, A>::value) {  // dz holds dzhat
        (void)dout, (void)gamma, (void)beta, (void)g, (void)b;
        bwd_dz_inplace(z + off, m + c, r + c, k1 + c, k2 + c, dz + off, len);
      } else {
        const A* x = load(z + off, len, xb);
        const A* dy = load(dout + off, len, yb);
        if constexpr (kBcast) {
          bwd_dz<kAct>(x, dy, m + c, r + c, g + c, b + c, k1 + c, k2 + c, dzb, len);
        } else {
          const A* bp = kBeta ? load(beta + off, len, bb) : bb;
          bwd_dz<kAct>(x, dy, m + c, r + c, load(gamma + off, len, gb), bp, k1 + c, k2 + c, dzb, len);
        }
        store(dz + off, dzb, len);
      }
    }
}

// k1/k2 of the tile's channels from the per-channel totals of s1/s2 (broadcast: the per-channel
// dbeta/dgamma, which are written out here).
template <typename T, bool kBcast>
void nhwc_group_means(const FdnShape& s, int64_t n, int64_t c0, int64_t W, const double* total1,
                      const double* total2, const acc_t<T>* g, T* dgamma, T* dbeta, acc_t<T>* k1, acc_t<T>* k2) {
  using A = acc_t<T>;
  const int64_t Cg = s.channels_per_group();
  const double inv_l = s.HW * Cg > 0 ? 1.0 / static_cast<double>(s.HW * Cg) : 0.0;
  for (int64_t g0 = 0; g0 < W; g0 += Cg) {
    double s1 = 0, s2 = 0;  // sum(dzhat), sum(dzhat * zhat) over the group
    for (int64_t i = g0; i < g0 + Cg; ++i) {
      if constexpr (kBcast) {  // dzhat = gate * (1 + gamma_c)
        if (dbeta) dbeta[n * s.C + c0 + i] = static_cast<T>(static_cast<A>(total1[i]));
        if (dgamma) dgamma[n * s.C + c0 + i] = static_cast<T>(static_cast<A>(total2[i]));
        s1 += (1.0 + static_cast<double>(g[i])) * total1[i];
        s2 += (1.0 + static_cast<double>(g[i])) * total2[i];
      } else {
        (void)g, (void)dgamma, (void)dbeta;
        s1 += total1[i];
        s2 += total2[i];
      }
    }
    std::fill(k1 + g0, k1 + g0 + Cg, static_cast<A>(s1 * inv_l));
    std::fill(k2 + g0, k2 + g0 + Cg, static_cast<A>(s2 * inv_l));
  }
}

template <typename T, FdnActivation kAct, bool kBcast, typename ParallelFor>
void forward_nhwc(const FdnShape& s, const T* z, const T* gamma, const T* beta, T* out, acc_t<T>* mean,
                  acc_t<T>* rstd, CpuIsa isa, ParallelFor& pfor) {
  using A = acc_t<T>;
  const NhwcPlan plan(s, sizeof(A));
  const int64_t C = s.C, Cg = s.channels_per_group();
  if (plan.fused()) {
    pfor(plan.total(s), [&](int64_t begin, int64_t end) {
      run_with_isa(
          isa,
          [&](int64_t b, int64_t e) ELR_FDN_INLINE_LAMBDA {
            NhwcScratch<A> w(plan.groups * Cg);
            std::vector<MeanM2> stats(plan.groups);
            for (int64_t u = b; u < e; ++u) {
              const NhwcTask t(s, plan, u);
              nhwc_task_stats(s, t, z, w, stats.data());
              for (int64_t g = 0; g < t.g1 - t.g0; ++g) {
                const A rs = stats[g].rstd<A>(s.eps);
                mean[t.n * s.G + t.g0 + g] = w.m[g * Cg];
                rstd[t.n * s.G + t.g0 + g] = rs;
                for (int64_t i = g * Cg; i < (g + 1) * Cg; ++i) {
                  w.r[i] = kBcast ? rs * (A(1) + static_cast<A>(gamma[t.n * C + t.c0 + i])) : rs;
                  if constexpr (kBcast) w.b[i] = static_cast<A>(beta[t.n * C + t.c0 + i]);
                }
              }
              nhwc_apply<T, kAct, kBcast>(s, t, z, gamma, beta, out, w.m.data(), w.r.data(), w.b.data());
            }
          },
          begin, end);
    });
    return;
  }
  std::vector<MeanM2> parts(plan.total(s) * s.G);  // tiles = 1: a task holds every group
  pfor(plan.total(s), [&](int64_t begin, int64_t end) {
    run_with_isa(
        isa,
        [&](int64_t b, int64_t e) ELR_FDN_INLINE_LAMBDA {
          NhwcScratch<A> w(C);
          for (int64_t u = b; u < e; ++u) nhwc_task_stats(s, NhwcTask(s, plan, u), z, w, parts.data() + u * s.G);
        },
        begin, end);
  });
  std::vector<A> ch_mean(s.N * C), ch_scale(s.N * C), ch_beta(kBcast ? s.N * C : 0);
  for (int64_t n = 0; n < s.N; ++n)
    for (int64_t g = 0; g < s.G; ++g) {
      MeanM2 stats;
      for (int64_t blk = 0; blk < plan.blocks; ++blk) {
        const MeanM2& p = parts[(n * plan.blocks + blk) * s.G + g];
        stats.merge(p.count, p.mean, p.m2);
      }
      const A mu = static_cast<A>(stats.mean), rs = stats.rstd<A>(s.eps);
      mean[n * s.G + g] = mu;
      rstd[n * s.G + g] = rs;
      for (int64_t c = g * Cg; c < (g + 1) * Cg; ++c) {
        ch_mean[n * C + c] = mu;
        ch_scale[n * C + c] = kBcast ? rs * (A(1) + static_cast<A>(gamma[n * C + c])) : rs;
        if constexpr (kBcast) ch_beta[n * C + c] = static_cast<A>(beta[n * C + c]);
      }
    }
  pfor(plan.total(s), [&](int64_t begin, int64_t end) {
    run_with_isa(
        isa,
        [&](int64_t b, int64_t e) ELR_FDN_INLINE_LAMBDA {
          for (int64_t u = b; u < e; ++u) {
            const NhwcTask t(s, plan, u);
            nhwc_apply<T, kAct, kBcast>(s, t, z, gamma, beta, out, ch_mean.data() + t.n * C,
                                        ch_scale.data() + t.n * C, kBcast ? ch_beta.data() + t.n * C : nullptr);
          }
        },
        begin, end);
  });
}

template <typename T, FdnActivation kAct, bool kBcast, typename ParallelFor>
void backward_nhwc(const FdnShape& s, const T* dout, const T* z, const T* gamma, const T* beta,
                   const acc_t<T>* mean, const acc_t<T>* rstd, T* dz, T* dgamma, T* dbeta, CpuIsa isa,
                   ParallelFor& pfor) {
  using A = acc_t<T>;
  const NhwcPlan plan(s, sizeof(A));
  const int64_t C = s.C, Cg = s.channels_per_group();
  // Per (n, c): the group statistics and, when broadcast, gamma/beta in the acc type.
  std::vector<A> ch_mean(s.N * C), ch_rstd(s.N * C), ch_gamma(kBcast ? s.N * C : 0), ch_beta(kBcast ? s.N * C : 0);
  for (int64_t nc = 0; nc < s.N * C; ++nc) {
    const int64_t ng = nc / C * s.G + nc % C / Cg;
    ch_mean[nc] = mean[ng];
    ch_rstd[nc] = rstd[ng];
    if constexpr (kBcast) {
      ch_gamma[nc] = static_cast<A>(gamma[nc]);
      ch_beta[nc] = kAct != FdnActivation::None ? static_cast<A>(beta[nc]) : A(0);
    }
  }
  auto at = [&](const std::vector<A>& v, const NhwcTask& t) { return v.empty() ? nullptr : v.data() + t.n * C + t.c0; };
  if (plan.fused()) {
    pfor(plan.total(s), [&](int64_t begin, int64_t end) {
      run_with_isa(
          isa,
          [&](int64_t b, int64_t e) ELR_FDN_INLINE_LAMBDA {
            NhwcScratch<A> w(plan.groups * Cg);
            std::vector<A> k1(plan.groups * Cg), k2(plan.groups * Cg);
            for (int64_t u = b; u < e; ++u) {
              const NhwcTask t(s, plan, u);
              const A *m = at(ch_mean, t), *r = at(ch_rstd, t), *g = at(ch_gamma, t), *bt = at(ch_beta, t);
              nhwc_backward_sums<T, kAct, kBcast>(s, t, dout, z, gamma, beta, m, r, g, bt, dz, dgamma, dbeta, w);
              nhwc_group_means<T, kBcast>(s, t.n, t.c0, t.W, w.total1.data(), w.total2.data(), g, dgamma, dbeta,
                                          k1.data(), k2.data());
              if (dz) nhwc_dz<T, kAct, kBcast>(s, t, dout, z, gamma, beta, m, r, g, bt, k1.data(), k2.data(), dz);
            }
          },
          begin, end);
    });
    return;
  }
  std::vector<double> part1(plan.total(s) * C), part2(plan.total(s) * C);  // tiles = 1: whole rows
  pfor(plan.total(s), [&](int64_t begin, int64_t end) {
    run_with_isa(
        isa,
        [&](int64_t b, int64_t e) ELR_FDN_INLINE_LAMBDA {
          NhwcScratch<A> w(C);
          for (int64_t u = b; u < e; ++u) {
            const NhwcTask t(s, plan, u);
            nhwc_backward_sums<T, kAct, kBcast>(s, t, dout, z, gamma, beta, at(ch_mean, t), at(ch_rstd, t),
                                                at(ch_gamma, t), at(ch_beta, t), dz, dgamma, dbeta, w);
            std::copy(w.total1.begin(), w.total1.end(), part1.begin() + u * C);
            std::copy(w.total2.begin(), w.total2.end(), part2.begin() + u * C);
          }
        },
        begin, end);
  });
  std::vector<A> ch_k1(s.N * C), ch_k2(s.N * C);
  std::vector<double> total1(C), total2(C);
  for (int64_t n = 0; n < s.N; ++n) {
    std::fill(total1.begin(), total1.end(), 0.0);
    std::fill(total2.begin(), total2.end(), 0.0);
    for (int64_t blk = 0; blk < plan.blocks; ++blk)
      for (int64_t c = 0; c < C; ++c) {
        total1[c] += part1[(n * plan.blocks + blk) * C + c];
        total2[c] += part2[(n * plan.blocks + blk) * C + c];
      }
    nhwc_group_means<T, kBcast>(s, n, 0, C, total1.data(), total2.data(), kBcast ? ch_gamma.data() + n * C : nullptr,
                                dgamma, dbeta, ch_k1.data() + n * C, ch_k2.data() + n * C);
  }
  if (!dz) return;
  pfor(plan.total(s), [&](int64_t begin, int64_t end) {
    run_with_isa(
        isa,
        [&](int64_t b, int64_t e) ELR_FDN_INLINE_LAMBDA {
          for (int64_t u = b; u < e; ++u) {
            const NhwcTask t(s, plan, u);
            nhwc_dz<T, kAct, kBcast>(s, t, dout, z, gamma, beta, at(ch_mean, t), at(ch_rstd, t), at(ch_gamma, t),
                                     at(ch_beta, t), at(ch_k1, t), at(ch_k2, t), dz);
          }
        },
        begin, end);
  });
}

// Calls fn.template operator()<kAct, kBcast>() with the call's activation and broadcast mode.
template <typename Fn>
void dispatch_mode(const FdnShape& s, Fn&& fn) {
  if (s.act == FdnActivation::SiLU) {
    if (s.affine_broadcast)
      fn(std::integral_constant<FdnActivation, FdnActivation::SiLU>{}, std::true_type{});
    else
      fn(std::integral_constant<FdnActivation, FdnActivation::SiLU>{}, std::false_type{});
  } else {
    if (s.affine_broadcast)
      fn(std::integral_constant<FdnActivation, FdnActivation::None>{}, std::true_type{});
    else
      fn(std::integral_constant<FdnActivation, FdnActivation::None>{}, std::false_type{});
  }
}

}  // namespace fdn_detail

// pfor(total, fn) calls fn(begin, end) over [0, total) in parallel chunks (at::parallel_for in the
// wrapper; a serial loop in the C++ tests). Every pointer is contiguous in s.layout; broadcast
// gamma/beta are [N, C]. mean and rstd are [N, G].
template <typename T, typename ParallelFor>
void fdn_forward_cpu(const FdnShape& s, const T* z, const T* gamma, const T* beta, T* out, acc_t<T>* mean,
                     acc_t<T>* rstd, ParallelFor&& pfor) {
  using namespace fdn_detail;
  if (s.C == 0) {  // empty groups: the statistics of nothing, and no element to write
    for (int64_t i = 0; i < s.N * s.G; ++i) {
      mean[i] = acc_t<T>(0);
      rstd[i] = MeanM2{}.rstd<acc_t<T>>(s.eps);
    }
    return;
  }
  const CpuIsa isa = cpu_isa_limit();
  dispatch_mode(s, [&](auto act_c, auto bcast_c) {
    constexpr FdnActivation kAct = decltype(act_c)::value;
    constexpr bool kBcast = decltype(bcast_c)::value;
    if (s.layout == FdnLayout::NCHW) {
      pfor(s.N * s.G, [&](int64_t begin, int64_t end) {
        run_with_isa(
            isa,
            [&](int64_t b, int64_t e) ELR_FDN_INLINE_LAMBDA {
              forward_nchw_groups<T, kAct, kBcast>(s, z, gamma, beta, out, mean, rstd, b, e);
            },
            begin, end);
      });
    } else {
      forward_nhwc<T, kAct, kBcast>(s, z, gamma, beta, out, mean, rstd, isa, pfor);
    }
  });
}

// dz, dgamma, dbeta may each be nullptr (skip). beta may be nullptr when s.act == None.
// dgamma/dbeta have gamma's form: full-size in s.layout, or [N, C] when s.affine_broadcast.
template <typename T, typename ParallelFor>
void fdn_backward_cpu(const FdnShape& s, const T* dout, const T* z, const T* gamma, const T* beta,
                      const acc_t<T>* mean, const acc_t<T>* rstd, T* dz, T* dgamma, T* dbeta, ParallelFor&& pfor) {
  using namespace fdn_detail;
  if ((!dz && !dgamma && !dbeta) || s.C == 0) return;
  const CpuIsa isa = cpu_isa_limit();
  dispatch_mode(s, [&](auto act_c, auto bcast_c) {
    constexpr FdnActivation kAct = decltype(act_c)::value;
    constexpr bool kBcast = decltype(bcast_c)::value;
    if (s.layout == FdnLayout::NCHW) {
      pfor(s.N * s.G, [&](int64_t begin, int64_t end) {
        run_with_isa(
            isa,
            [&](int64_t b, int64_t e) ELR_FDN_INLINE_LAMBDA {
              backward_nchw_groups<T, kAct, kBcast>(s, dout, z, gamma, beta, mean, rstd, dz, dgamma, dbeta, b, e);
            },
            begin, end);
      });
    } else {
      backward_nhwc<T, kAct, kBcast>(s, dout, z, gamma, beta, mean, rstd, dz, dgamma, dbeta, isa, pfor);
    }
  });
}

}  // namespace elr
