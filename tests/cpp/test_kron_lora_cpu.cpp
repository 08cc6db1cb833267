// Unit tests of the torch-free Kronecker LoRA CPU kernels (csrc/kernels/kron_lora.h): the fused
// forward and backward and kron_delta with its backward, for float, double and a bfloat16 stand-in
// (the 16-bit path), against naive loops written here from the definition (eq. 9): dW is built
// explicitly and y = y0 + scale * x dW^T, the gradients likewise. The fp64 loops are the ground
// truth; the same loops in fp32, rounding tmat / smat / outputs to the storage type where the
// kernels do, are the "same-dtype" error yardstick (docs/testing.md). Outputs are poisoned with NaN
// before each call and every element must be written. Also checked bit for bit: a backward that
// recomputes tmat / smat equals one given the forward's, and results do not depend on how the
// parallel loop splits the work. Every compiled ISA path (generic, AVX2, AVX-512 where the CPU has
// them) is run. Fresh random inputs every run (ELR_TEST_SEED=<n> replays one).
//
// Exit code: 0 when every check passes, 1 otherwise.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <type_traits>
#include <vector>

#include "kernels/kron_lora.h"

namespace {

using elr::KronShape;
using elr::CpuIsa;

int g_failures = 0;
int g_checks = 0;

#define CHECK(cond, ...)                                        \
  do {                                                          \
    ++g_checks;                                                 \
    if (!(cond)) {                                              \
      ++g_failures;                                             \
      std::fprintf(stderr, "FAIL %s:%d: ", __FILE__, __LINE__); \
      std::fprintf(stderr, __VA_ARGS__);                        \
      std::fprintf(stderr, "\n");                               \
    }                                                           \
  } while (0)

// The serial stand-in for at::parallel_for; uneven pieces so that range boundaries are exercised.
struct SerialFor {
  template <typename Fn>
  void operator()(int64_t total, const Fn& fn) const {
    int64_t begin = 0, step = 1;
    while (begin < total) {
      const int64_t end = std::min(total, begin + step);
      fn(begin, end);
      begin = end;
      step = step % 3 + 1;
    }
  }
};
// The whole range in one call (what a single thread gets).
struct WholeFor {
  template <typename Fn>
  void operator()(int64_t total, const Fn& fn) const {
    if (total > 0) fn(0, total);
  }
};

// A bfloat16 stand-in (round to nearest even) with the conversions at::BFloat16 has: it takes the
// kernels' 16-bit path (block copies converted to fp32, rank-space values rounded) without torch.
struct Bf16 {
  uint16_t bits = 0;
  Bf16() = default;
  Bf16(float f) {  // NOLINT: implicit like at::BFloat16
    uint32_t u;
    std::memcpy(&u, &f, sizeof(u));
    bits = std::isnan(f) ? uint16_t{0x7FC0} : static_cast<uint16_t>((u + 0x7FFF + ((u >> 16) & 1)) >> 16);
  }
  operator float() const {  // NOLINT
    const uint32_t u = static_cast<uint32_t>(bits) << 16;
    float f;
    std::memcpy(&f, &u, sizeof(f));
    return f;
  }
};

template <typename T>
std::vector<T> poisoned(size_t n) {
  return std::vector<T>(n, static_cast<T>(std::numeric_limits<float>::quiet_NaN()));
}

template <typename T>
std::vector<T> cast(const std::vector<double>& v) {
  std::vector<T> out(v.size());
  for (size_t i = 0; i < v.size(); ++i) out[i] = static_cast<T>(static_cast<float>(v[i]));
  if constexpr (std::is_same<T, double>::value) out = v;
  return out;
}
template <typename T>
std::vector<double> widen(const std::vector<T>& v) {
  std::vector<double> out(v.size());
  for (size_t i = 0; i < v.size(); ++i) out[i] = static_cast<double>(static_cast<float>(v[i]));
  if constexpr (std::is_same<T, double>::value) out = v;
  return out;
}

// Inputs as fp64 values exactly representable in the storage type under test.
struct Inputs {
  std::vector<double> x, A, U, V, y0, dy, dx0;
};

struct Outputs {
  std::vector<double> y, tmat, smat, dx, dA, dU, dV;
};

// round(v) to the storage type T, in the compute type R (the kernels' rounding points).
template <typename T, typename R>
R round_t(R v) {
  if constexpr (std::is_same<T, double>::value || std::is_same<T, R>::value) {
    return v;
  } else {
    return static_cast<R>(static_cast<float>(static_cast<T>(static_cast<float>(v))));
  }
}

// The definition with naive loops in R: dW = sum_t A_t kron (U_t V_t) for the outputs of the
// linear map, tmat / smat rounded to T where the kernels store them (so with R = double and
// T = double this is the exact ground truth). accumulate: y = y0 + ..., dx = dx0 + ...
template <typename T, typename R>
Outputs reference(const KronShape& s, const Inputs& in, double scale, bool accumulate) {
  const int64_t M = s.M, Tn = s.T, a1 = s.a1, a2 = s.a2, b1 = s.b1, b2 = s.b2, r = s.r, Rk = s.rank_cols();
  const int64_t d_in = s.d_in(), d_out = s.d_out();
  auto cv = [](const std::vector<double>& v) { return std::vector<R>(v.begin(), v.end()); };
  const std::vector<R> x = cv(in.x), A = cv(in.A), U = cv(in.U), V = cv(in.V), dy = cv(in.dy);
  // dW[(i*b1+k), (p*b2+q)] = sum_t A[t,i,p] sum_s U[t,k,s] V[t,s,q]
  std::vector<R> dW(d_out * d_in, R(0));
  for (int64_t t = 0; t < Tn; ++t)
    for (int64_t i = 0; i < a1; ++i)
      for (int64_t p = 0; p < a2; ++p)
        for (int64_t k = 0; k < b1; ++k)
          for (int64_t q = 0; q < b2; ++q) {
            R b = 0;
            for (int64_t j = 0; j < r; ++j) b += U[(t * b1 + k) * r + j] * V[(t * r + j) * b2 + q];
            dW[(i * b1 + k) * d_in + p * b2 + q] += A[(t * a1 + i) * a2 + p] * b;
          }
  Outputs o;
  o.tmat.assign(M * a2 * Rk, 0);
  o.smat.assign(M * a1 * Rk, 0);
  std::vector<R> tm(M * a2 * Rk), sm(M * a1 * Rk);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t p = 0; p < a2; ++p)
      for (int64_t j = 0; j < Rk; ++j) {
        R v = 0;
        for (int64_t q = 0; q < b2; ++q) v += x[m * d_in + p * b2 + q] * V[j * b2 + q];
        tm[(m * a2 + p) * Rk + j] = round_t<T>(v);
      }
  for (int64_t m = 0; m < M; ++m)
    for (int64_t i = 0; i < a1; ++i)
      for (int64_t j = 0; j < Rk; ++j) {
        R v = 0;
        for (int64_t p = 0; p < a2; ++p) v += A[((j / r) * a1 + i) * a2 + p] * tm[(m * a2 + p) * Rk + j];
        sm[(m * a1 + i) * Rk + j] = round_t<T>(v);
      }
  o.tmat.assign(tm.begin(), tm.end());
  o.smat.assign(sm.begin(), sm.end());
  // y: the linear map where T is exact (the ground truth); from the rounded smat otherwise (the
  // path the kernels take, so the yardstick includes that rounding).
  o.y.assign(M * d_out, 0);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t o_ = 0; o_ < d_out; ++o_) {
      R v = 0;
      if constexpr (std::is_same<T, R>::value) {
        for (int64_t c = 0; c < d_in; ++c) v += x[m * d_in + c] * dW[o_ * d_in + c];
      } else {
        const int64_t i = o_ / b1, k = o_ % b1;
        for (int64_t j = 0; j < Rk; ++j) v += sm[(m * a1 + i) * Rk + j] * U[((j / r) * b1 + k) * r + j % r];
      }
      o.y[m * d_out + o_] = round_t<T>(R(scale) * v + (accumulate ? R(in.y0[m * d_out + o_]) : R(0)));
    }
  if constexpr (!std::is_same<T, R>::value) {
    // The yardstick for a rounded storage type follows the kernels' path: the factorised
    // gradients from the rounded tmat / smat (eq. 9's backward in kron_lora_common.h).
    std::vector<R> ds(M * a1 * Rk, 0), dt(M * a2 * Rk, 0);
    o.dx.assign(M * d_in, 0);
    o.dA.assign(Tn * a1 * a2, 0);
    o.dU.assign(Tn * b1 * r, 0);
    o.dV.assign(Tn * r * b2, 0);
    for (int64_t m = 0; m < M; ++m)
      for (int64_t i = 0; i < a1; ++i)
        for (int64_t j = 0; j < Rk; ++j) {
          R v = 0;
          for (int64_t k = 0; k < b1; ++k) v += dy[m * d_out + i * b1 + k] * U[((j / r) * b1 + k) * r + j % r];
          ds[(m * a1 + i) * Rk + j] = R(scale) * v;
        }
    for (int64_t m = 0; m < M; ++m)
      for (int64_t p = 0; p < a2; ++p)
        for (int64_t j = 0; j < Rk; ++j) {
          R v = 0;
          for (int64_t i = 0; i < a1; ++i) v += A[((j / r) * a1 + i) * a2 + p] * ds[(m * a1 + i) * Rk + j];
          dt[(m * a2 + p) * Rk + j] = v;
        }
    for (int64_t t = 0; t < Tn; ++t)
      for (int64_t i = 0; i < a1; ++i)
        for (int64_t p = 0; p < a2; ++p) {
          R v = 0;
          for (int64_t m = 0; m < M; ++m)
            for (int64_t j = t * r; j < (t + 1) * r; ++j) v += ds[(m * a1 + i) * Rk + j] * tm[(m * a2 + p) * Rk + j];
          o.dA[(t * a1 + i) * a2 + p] = round_t<T>(v);
        }
    for (int64_t j = 0; j < Rk; ++j) {
      for (int64_t k = 0; k < b1; ++k) {
        R v = 0;
        for (int64_t m = 0; m < M; ++m)
          for (int64_t i = 0; i < a1; ++i) v += dy[m * d_out + i * b1 + k] * sm[(m * a1 + i) * Rk + j];
        o.dU[((j / r) * b1 + k) * r + j % r] = round_t<T>(R(scale) * v);
      }
      for (int64_t q = 0; q < b2; ++q) {
        R v = 0;
        for (int64_t m = 0; m < M; ++m)
          for (int64_t p = 0; p < a2; ++p) v += dt[(m * a2 + p) * Rk + j] * x[m * d_in + p * b2 + q];
        o.dV[j * b2 + q] = round_t<T>(v);
      }
    }
    for (int64_t m = 0; m < M; ++m)
      for (int64_t p = 0; p < a2; ++p)
        for (int64_t q = 0; q < b2; ++q) {
          R v = 0;
          for (int64_t j = 0; j < Rk; ++j) v += dt[(m * a2 + p) * Rk + j] * V[j * b2 + q];
          o.dx[m * d_in + p * b2 + q] = round_t<T>(v + (accumulate ? R(in.dx0[m * d_in + p * b2 + q]) : R(0)));
        }
    return o;
  }
  // Gradients of L = <dy, scale * x dW^T>: dx = scale * dy dW, d(dW) = scale * dy^T x, chained
  // through dW = sum_t A_t kron (U_t V_t).
  o.dx.assign(M * d_in, 0);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t c = 0; c < d_in; ++c) {
      R v = 0;
      for (int64_t o_ = 0; o_ < d_out; ++o_) v += dy[m * d_out + o_] * dW[o_ * d_in + c];
      o.dx[m * d_in + c] = round_t<T>(R(scale) * v + (accumulate ? R(in.dx0[m * d_in + c]) : R(0)));
    }
  std::vector<R> G(d_out * d_in, R(0));  // dL/d(dW)
  for (int64_t m = 0; m < M; ++m)
    for (int64_t o_ = 0; o_ < d_out; ++o_)
      for (int64_t c = 0; c < d_in; ++c) G[o_ * d_in + c] += R(scale) * dy[m * d_out + o_] * x[m * d_in + c];
  o.dA.assign(Tn * a1 * a2, 0);
  o.dU.assign(Tn * b1 * r, 0);
  o.dV.assign(Tn * r * b2, 0);
  for (int64_t t = 0; t < Tn; ++t) {
    std::vector<R> B(b1 * b2, 0), dB(b1 * b2, 0);
    for (int64_t k = 0; k < b1; ++k)
      for (int64_t q = 0; q < b2; ++q)
        for (int64_t j = 0; j < r; ++j) B[k * b2 + q] += U[(t * b1 + k) * r + j] * V[(t * r + j) * b2 + q];
    for (int64_t i = 0; i < a1; ++i)
      for (int64_t p = 0; p < a2; ++p) {
        R v = 0;
        for (int64_t k = 0; k < b1; ++k)
          for (int64_t q = 0; q < b2; ++q) {
            const R g = G[(i * b1 + k) * d_in + p * b2 + q];
            v += g * B[k * b2 + q];
            dB[k * b2 + q] += g * A[(t * a1 + i) * a2 + p];
          }
        o.dA[(t * a1 + i) * a2 + p] = round_t<T>(v);
      }
    for (int64_t k = 0; k < b1; ++k)
      for (int64_t j = 0; j < r; ++j) {
        R v = 0;
        for (int64_t q = 0; q < b2; ++q) v += dB[k * b2 + q] * V[(t * r + j) * b2 + q];
        o.dU[(t * b1 + k) * r + j] = round_t<T>(v);
      }
    for (int64_t j = 0; j < r; ++j)
      for (int64_t q = 0; q < b2; ++q) {
        R v = 0;
        for (int64_t k = 0; k < b1; ++k) v += U[(t * b1 + k) * r + j] * dB[k * b2 + q];
        o.dV[(t * r + j) * b2 + q] = round_t<T>(v);
      }
  }
  return o;
}

// Every element written (finite), and max|got - ref| <= 2 * max|peer - ref| + tol * max(1, max|ref|)
// where peer is the naive same-dtype result (docs/testing.md; no peer for fp64).
template <typename T>
void expect_close(const std::vector<T>& got, const std::vector<double>& ref, const std::vector<double>* peer,
                  double tol, const std::string& what) {
  CHECK(got.size() == ref.size(), "%s: size %zu != %zu", what.c_str(), got.size(), ref.size());
  double scale = 1.0, peer_err = 0.0, worst = 0.0;
  for (size_t i = 0; i < ref.size(); ++i) {
    scale = std::max(scale, std::abs(ref[i]));
    if (peer) peer_err = std::max(peer_err, std::abs((*peer)[i] - ref[i]));
  }
  size_t unwritten = 0;
  for (size_t i = 0; i < got.size() && i < ref.size(); ++i) {
    const double g = static_cast<double>(static_cast<float>(got[i]));
    const double gd = std::is_same<T, double>::value ? static_cast<double>(got[i]) : g;
    if (!std::isfinite(gd)) ++unwritten;
    else worst = std::max(worst, std::abs(gd - ref[i]));
  }
  const double allowed = 2 * peer_err + tol * scale;
  CHECK(unwritten == 0, "%s: %zu of %zu elements not written (NaN poison left)", what.c_str(), unwritten, got.size());
  CHECK(worst <= allowed, "%s: max abs err %.3g > %.3g (naive same-dtype err %.3g)", what.c_str(), worst, allowed,
        peer_err);
}

template <typename T>
bool bitwise_equal(const std::vector<T>& a, const std::vector<T>& b) {
  return a.size() == b.size() && (a.empty() || std::memcmp(a.data(), b.data(), a.size() * sizeof(T)) == 0);
}

std::string describe(const KronShape& s) {
  char buf[200];
  std::snprintf(buf, sizeof buf, "[M=%lld T=%lld a=%lldx%lld b=%lldx%lld r=%lld]", (long long)s.M, (long long)s.T,
                (long long)s.a1, (long long)s.a2, (long long)s.b1, (long long)s.b2, (long long)s.r);
  return buf;
}

Inputs random_inputs(const KronShape& s, std::mt19937_64& rng) {
  std::normal_distribution<double> normal;
  auto fill = [&](int64_t n, double sd) {
    std::vector<double> v(n);
    for (auto& e : v) e = sd * normal(rng);
    return v;
  };
  Inputs in;
  in.x = fill(s.M * s.d_in(), 1.0);
  in.A = fill(s.T * s.a1 * s.a2, 1.0);
  in.U = fill(s.T * s.b1 * s.r, 1.0);
  in.V = fill(s.T * s.r * s.b2, 1.0);
  in.y0 = fill(s.M * s.d_out(), 3.0);
  in.dy = fill(s.M * s.d_out(), 1.0);
  in.dx0 = fill(s.M * s.d_in(), 3.0);
  return in;
}

// Rounds the inputs to T (so that the fp64 reference sees the values the kernel sees).
template <typename T>
Inputs representable(const Inputs& in) {
  Inputs o;
  o.x = widen(cast<T>(in.x));
  o.A = widen(cast<T>(in.A));
  o.U = widen(cast<T>(in.U));
  o.V = widen(cast<T>(in.V));
  o.y0 = widen(cast<T>(in.y0));
  o.dy = widen(cast<T>(in.dy));
  o.dx0 = widen(cast<T>(in.dx0));
  return o;
}

// Backward outputs requested: dx, dA, dU, dV.
struct Mask {
  bool dx, dA, dU, dV;
};

template <typename T>
void check_lora(const KronShape& s, std::mt19937_64& rng, double tol, const std::string& tag) {
  const std::string name = tag + " " + describe(s);
  const Inputs in = representable<T>(random_inputs(s, rng));
  const std::vector<T> x = cast<T>(in.x), A = cast<T>(in.A), U = cast<T>(in.U), V = cast<T>(in.V);
  const std::vector<T> dy = cast<T>(in.dy);
  const int64_t R = s.rank_cols();
  constexpr bool exact = std::is_same<T, double>::value;
  SerialFor pf;
  const double scale = 0.75;
  for (bool accumulate : {false, true}) {
    const std::string nm = name + (accumulate ? " acc" : " overwrite");
    const Outputs ref = reference<double, double>(s, in, scale, accumulate);
    const Outputs peer = reference<T, float>(s, in, scale, accumulate);
    const Outputs* pp = exact ? nullptr : &peer;
    // forward: y poisoned unless it holds the base to add onto
    std::vector<T> y = accumulate ? cast<T>(in.y0) : poisoned<T>(s.M * s.d_out());
    std::vector<T> tmat = poisoned<T>(s.M * s.a2 * R), smat = poisoned<T>(s.M * s.a1 * R);
    elr::kron_lora_forward_cpu<T>(s, x.data(), A.data(), U.data(), V.data(), y.data(), accumulate, scale, tmat.data(),
                                  smat.data(), pf);
    expect_close(y, ref.y, pp ? &pp->y : nullptr, tol, nm + " y");
    expect_close(tmat, ref.tmat, pp ? &pp->tmat : nullptr, tol, nm + " tmat");
    expect_close(smat, ref.smat, pp ? &pp->smat : nullptr, tol, nm + " smat");
    // without saving the intermediates: the same y, bit for bit
    std::vector<T> y2 = accumulate ? cast<T>(in.y0) : poisoned<T>(s.M * s.d_out());
    elr::kron_lora_forward_cpu<T>(s, x.data(), A.data(), U.data(), V.data(), y2.data(), accumulate, scale, nullptr,
                                  nullptr, WholeFor{});
    CHECK(bitwise_equal(y, y2), "%s: y differs without saved intermediates / with another split", nm.c_str());

    // backward, for several output masks, with the saved intermediates and recomputing them
    const Mask masks[] = {{true, true, true, true},  {true, false, false, false}, {false, true, false, false},
                          {false, false, true, false}, {false, false, false, true}, {false, true, true, true}};
    for (const Mask& mk : masks) {
      char mtag[64];
      std::snprintf(mtag, sizeof mtag, " mask=%d%d%d%d", mk.dx, mk.dA, mk.dU, mk.dV);
      std::vector<T> saved[4], recomputed[4];
      for (int pass = 0; pass < 2; ++pass) {
        const bool use_saved = pass == 0;
        std::vector<T> dx = mk.dx ? (accumulate ? cast<T>(in.dx0) : poisoned<T>(s.M * s.d_in())) : std::vector<T>();
        std::vector<T> dA = mk.dA ? poisoned<T>(s.T * s.a1 * s.a2) : std::vector<T>();
        std::vector<T> dU = mk.dU ? poisoned<T>(s.T * s.b1 * s.r) : std::vector<T>();
        std::vector<T> dV = mk.dV ? poisoned<T>(s.T * s.r * s.b2) : std::vector<T>();
        auto p = [](std::vector<T>& v) { return v.empty() ? nullptr : v.data(); };
        if (use_saved) {
          elr::kron_lora_backward_cpu<T>(s, dy.data(), x.data(), A.data(), U.data(), V.data(), tmat.data(),
                                         smat.data(), scale, p(dx), accumulate, p(dA), p(dU), p(dV), pf);
        } else {
          elr::kron_lora_backward_cpu<T>(s, dy.data(), x.data(), A.data(), U.data(), V.data(), nullptr, nullptr,
                                         scale, p(dx), accumulate, p(dA), p(dU), p(dV), WholeFor{});
        }
        const std::string bn = nm + mtag + (use_saved ? " saved" : " recomputed");
        if (mk.dx) expect_close(dx, ref.dx, pp ? &pp->dx : nullptr, tol, bn + " dx");
        if (mk.dA) expect_close(dA, ref.dA, pp ? &pp->dA : nullptr, tol, bn + " dA");
        if (mk.dU) expect_close(dU, ref.dU, pp ? &pp->dU : nullptr, tol, bn + " dU");
        if (mk.dV) expect_close(dV, ref.dV, pp ? &pp->dV : nullptr, tol, bn + " dV");
        std::vector<T>* out = use_saved ? saved : recomputed;
        out[0] = dx, out[1] = dA, out[2] = dU, out[3] = dV;
      }
      for (int k = 0; k < 4; ++k)
        CHECK(bitwise_equal(saved[k], recomputed[k]),
              "%s%s: output %d differs between saved and recomputed tmat/smat (and serial splits)", nm.c_str(), mtag,
              k);
    }
  }
}

// kron_delta: dW = sum_t A_t kron (U_t V_t) and its gradients for a random dL/dW.
template <typename T>
void check_delta(const KronShape& s, std::mt19937_64& rng, double tol, const std::string& tag) {
  const std::string name = tag + " kron_delta " + describe(s);
  std::normal_distribution<double> normal;
  auto fill = [&](int64_t n) {
    std::vector<double> v(n);
    for (auto& e : v) e = normal(rng);
    return widen(cast<T>(v));
  };
  const std::vector<double> A64 = fill(s.T * s.a1 * s.a2), U64 = fill(s.T * s.b1 * s.r), V64 = fill(s.T * s.r * s.b2);
  const std::vector<double> G64 = fill(s.d_out() * s.d_in());
  const std::vector<T> A = cast<T>(A64), U = cast<T>(U64), V = cast<T>(V64), G = cast<T>(G64);
  const int64_t d_in = s.d_in();
  // references in double and in float
  auto refs = [&](auto zero, bool round) {
    using R = decltype(zero);
    std::vector<double> dW(s.d_out() * d_in), dA(s.T * s.a1 * s.a2), dU(s.T * s.b1 * s.r), dV(s.T * s.r * s.b2);
    for (int64_t t = 0; t < s.T; ++t) {
      std::vector<R> B(s.b1 * s.b2, 0), dB(s.b1 * s.b2, 0);
      for (int64_t k = 0; k < s.b1; ++k)
        for (int64_t q = 0; q < s.b2; ++q)
          for (int64_t j = 0; j < s.r; ++j) B[k * s.b2 + q] += R(U64[(t * s.b1 + k) * s.r + j]) * R(V64[(t * s.r + j) * s.b2 + q]);
      for (int64_t i = 0; i < s.a1; ++i)
        for (int64_t p = 0; p < s.a2; ++p) {
          const R a = R(A64[(t * s.a1 + i) * s.a2 + p]);
          R da = 0;
          for (int64_t k = 0; k < s.b1; ++k)
            for (int64_t q = 0; q < s.b2; ++q) {
              const int64_t e = (i * s.b1 + k) * d_in + p * s.b2 + q;
              dW[e] += double(a * B[k * s.b2 + q]);
              da += R(G64[e]) * B[k * s.b2 + q];
              dB[k * s.b2 + q] += R(G64[e]) * a;
            }
          dA[(t * s.a1 + i) * s.a2 + p] = double(da);
        }
      for (int64_t k = 0; k < s.b1; ++k)
        for (int64_t j = 0; j < s.r; ++j) {
          R v = 0;
          for (int64_t q = 0; q < s.b2; ++q) v += dB[k * s.b2 + q] * R(V64[(t * s.r + j) * s.b2 + q]);
          dU[(t * s.b1 + k) * s.r + j] = double(v);
        }
      for (int64_t j = 0; j < s.r; ++j)
        for (int64_t q = 0; q < s.b2; ++q) {
          R v = 0;
          for (int64_t k = 0; k < s.b1; ++k) v += R(U64[(t * s.b1 + k) * s.r + j]) * dB[k * s.b2 + q];
          dV[(t * s.r + j) * s.b2 + q] = double(v);
        }
    }
    if (round)
      for (auto* v : {&dW, &dA, &dU, &dV}) *v = widen(cast<T>(*v));
    return std::vector<std::vector<double>>{dW, dA, dU, dV};
  };
  const auto ref = refs(double(0), false);
  const auto peer = refs(float(0), !std::is_same<T, double>::value);
  const bool exact = std::is_same<T, double>::value;
  std::vector<T> dW = poisoned<T>(s.d_out() * d_in);
  elr::kron_delta_cpu<T>(s, A.data(), U.data(), V.data(), dW.data(), SerialFor{});
  expect_close(dW, ref[0], exact ? nullptr : &peer[0], tol, name + " dW");
  for (int mask = 1; mask < 8; ++mask) {
    std::vector<T> dA = mask & 1 ? poisoned<T>(A.size()) : std::vector<T>();
    std::vector<T> dU = mask & 2 ? poisoned<T>(U.size()) : std::vector<T>();
    std::vector<T> dV = mask & 4 ? poisoned<T>(V.size()) : std::vector<T>();
    auto p = [](std::vector<T>& v) { return v.empty() ? nullptr : v.data(); };
    elr::kron_delta_backward_cpu<T>(s, G.data(), A.data(), U.data(), V.data(), p(dA), p(dU), p(dV), SerialFor{});
    const std::string bn = name + " mask=" + std::to_string(mask);
    if (mask & 1) expect_close(dA, ref[1], exact ? nullptr : &peer[1], tol, bn + " dA");
    if (mask & 2) expect_close(dU, ref[2], exact ? nullptr : &peer[2], tol, bn + " dU");
    if (mask & 4) expect_close(dV, ref[3], exact ? nullptr : &peer[3], tol, bn + " dV");
  }
}

const char* isa_name(CpuIsa isa) { return isa == CpuIsa::Avx512 ? "avx512" : isa == CpuIsa::Avx2 ? "avx2" : "generic"; }

}  // namespace

int main() {
  const char* seed_env = std::getenv("ELR_TEST_SEED");
  const uint64_t seed = seed_env ? std::strtoull(seed_env, nullptr, 10) : std::random_device{}();
  std::printf("test_kron_lora_cpu: seed %llu (ELR_TEST_SEED=%llu replays it)\n", (unsigned long long)seed,
              (unsigned long long)seed);
  std::mt19937_64 rng(seed);

  // {M, T, a1, a2, b1, b2, r}: T = 1, r = 1, a1 != a2, b1 != b2; T*r below, at and off the vector
  // width (8 floats / 4 doubles) and the register tile (32 / 16); b off the vector width and over
  // several column groups (128 floats / 64 doubles); several blocks and backward chunks (blocks of
  // 256 / max(a1, a2) tokens); M = 0 and M = 1.
  const std::vector<std::vector<int64_t>> shapes = {
      {1, 1, 1, 1, 1, 1, 1},      {3, 1, 2, 3, 5, 7, 1},    {7, 3, 2, 5, 3, 4, 2},    {5, 2, 3, 2, 9, 33, 4},
      {20, 4, 4, 4, 16, 20, 8},   {65, 5, 3, 6, 17, 13, 7}, {300, 2, 4, 4, 150, 70, 3}, {70, 8, 8, 8, 5, 9, 16},
      {0, 2, 3, 2, 4, 5, 2},      {1, 2, 3, 2, 40, 24, 4},  {260, 1, 2, 1, 12, 300, 6},
  };
  const CpuIsa best = elr::cpu_isa_limit();
  for (int isa = 0; isa <= static_cast<int>(best); ++isa) {
    elr::cpu_isa_limit() = static_cast<CpuIsa>(isa);
    const std::string tag = isa_name(static_cast<CpuIsa>(isa));
    for (const auto& d : shapes) {
      KronShape s;
      s.M = d[0], s.T = d[1], s.a1 = d[2], s.a2 = d[3], s.b1 = d[4], s.b2 = d[5], s.r = d[6];
      check_lora<double>(s, rng, 1e-10, tag + " double");
      check_lora<float>(s, rng, 1e-5, tag + " float");
      check_lora<Bf16>(s, rng, 8e-3, tag + " bf16");  // outputs rounded to 2^-9
      check_delta<double>(s, rng, 1e-10, tag + " double");
      check_delta<float>(s, rng, 1e-5, tag + " float");
      check_delta<Bf16>(s, rng, 8e-3, tag + " bf16");
    }
  }
  elr::cpu_isa_limit() = best;

  std::printf("test_kron_lora_cpu: %d checks, %d failures (best ISA %s)\n", g_checks, g_failures, isa_name(best));
  return g_failures == 0 ? 0 : 1;
}
