// Unit tests of the torch-free FDN CPU kernels (csrc/kernels/fdn.h) for float, double and a
// bfloat16 stand-in (the 16-bit path), against a naive fp64 implementation written here (with the
// same naive loops in the compute type as the "same-dtype" error yardstick), plus central finite
// differences of the kernel's own forward for the backward formula. Fresh random inputs every run
// (ELR_TEST_SEED=<n> replays one); outputs are poisoned with NaN before each call and every element
// must be written. Each compiled ISA path (generic, AVX2, AVX-512 where the CPU has them) is run.
//
// Exit code: 0 when every check passes, 1 otherwise.
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

#include "kernels/fdn.h"

namespace {

using elr::FdnActivation;
using elr::FdnLayout;
using elr::FdnShape;

int g_failures = 0;
int g_checks = 0;

#define CHECK(cond, ...)                                      \
  do {                                                        \
    ++g_checks;                                               \
    if (!(cond)) {                                            \
      ++g_failures;                                           \
      std::fprintf(stderr, "FAIL %s:%d: ", __FILE__, __LINE__); \
      std::fprintf(stderr, __VA_ARGS__);                      \
      std::fprintf(stderr, "\n");                             \
    }                                                         \
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

int64_t offset(const FdnShape& s, int64_t n, int64_t c, int64_t hw) {
  return s.layout == FdnLayout::NCHW ? (n * s.C + c) * s.HW + hw : (n * s.HW + hw) * s.C + c;
}
int64_t affine_offset(const FdnShape& s, int64_t n, int64_t c, int64_t hw) {
  return s.affine_broadcast ? n * s.C + c : offset(s, n, c, hw);
}
int64_t affine_numel(const FdnShape& s) { return s.affine_broadcast ? s.N * s.C : s.numel(); }

template <typename R>
R act(FdnActivation a, R x) {
  return a == FdnActivation::SiLU ? x / (R(1) + std::exp(-x)) : x;
}
template <typename R>
R act_grad(FdnActivation a, R x) {
  if (a != FdnActivation::SiLU) return R(1);
  const R sg = R(1) / (R(1) + std::exp(-x));
  return sg * (R(1) + x * (R(1) - sg));
}

struct Inputs {
  std::vector<double> z, gamma, beta, dout;
};

struct Reference {
  std::vector<double> out, mean, rstd, dz, dgamma, dbeta;
};

// The definition, one element at a time, computed in R: fp64 is the ground truth, and the same
// naive loops in fp32 give the error an ordinary fp32 implementation makes on these inputs.
template <typename R>
Reference reference(const FdnShape& s, const Inputs& in64) {
  const std::vector<R> z(in64.z.begin(), in64.z.end()), gamma(in64.gamma.begin(), in64.gamma.end()),
      beta(in64.beta.begin(), in64.beta.end()), dout(in64.dout.begin(), in64.dout.end());
  Reference r;
  const int64_t Cg = s.C / s.G, L = Cg * s.HW;
  r.out.assign(s.numel(), 0);
  r.dz.assign(s.numel(), 0);
  r.mean.assign(s.N * s.G, 0);
  r.rstd.assign(s.N * s.G, 0);
  std::vector<R> dgamma(affine_numel(s), 0), dbeta(affine_numel(s), 0);
  for (int64_t n = 0; n < s.N; ++n)
    for (int64_t g = 0; g < s.G; ++g) {
      R sum = 0, sq = 0;
      for (int64_t c = g * Cg; c < (g + 1) * Cg; ++c)
        for (int64_t hw = 0; hw < s.HW; ++hw) sum += z[offset(s, n, c, hw)];
      const R mean = L ? sum / L : R(0);
      for (int64_t c = g * Cg; c < (g + 1) * Cg; ++c)
        for (int64_t hw = 0; hw < s.HW; ++hw) sq += (z[offset(s, n, c, hw)] - mean) * (z[offset(s, n, c, hw)] - mean);
      const R rstd = R(1) / std::sqrt((L ? sq / L : R(0)) + static_cast<R>(s.eps));
      r.mean[n * s.G + g] = mean;
      r.rstd[n * s.G + g] = rstd;
      R s1 = 0, s2 = 0;
      for (int64_t c = g * Cg; c < (g + 1) * Cg; ++c)
        for (int64_t hw = 0; hw < s.HW; ++hw) {
          const int64_t o = offset(s, n, c, hw), a = affine_offset(s, n, c, hw);
          const R zh = (z[o] - mean) * rstd, pre = zh * (1 + gamma[a]) + beta[a];
          r.out[o] = act(s.act, pre);
          const R gate = dout[o] * act_grad(s.act, pre);
          dbeta[a] += gate;
          dgamma[a] += gate * zh;
          s1 += gate * (1 + gamma[a]);
          s2 += gate * (1 + gamma[a]) * zh;
        }
      for (int64_t c = g * Cg; c < (g + 1) * Cg; ++c)
        for (int64_t hw = 0; hw < s.HW; ++hw) {
          const int64_t o = offset(s, n, c, hw), a = affine_offset(s, n, c, hw);
          const R zh = (z[o] - mean) * rstd, pre = zh * (1 + gamma[a]) + beta[a];
          const R dzh = dout[o] * act_grad(s.act, pre) * (1 + gamma[a]);
          r.dz[o] = rstd * (dzh - s1 / L - zh * s2 / L);
        }
    }
  r.dgamma.assign(dgamma.begin(), dgamma.end());
  r.dbeta.assign(dbeta.begin(), dbeta.end());
  return r;
}

Inputs random_inputs(const FdnShape& s, std::mt19937_64& rng) {
  std::normal_distribution<double> normal;
  std::uniform_real_distribution<double> uniform(-3.0, 3.0);
  Inputs in;
  const double shift = uniform(rng);  // a non-zero mean, which E[x^2] - E[x]^2 would suffer from
  for (int64_t i = 0; i < s.numel(); ++i) in.z.push_back(shift + 2.0 * normal(rng));
  for (int64_t i = 0; i < affine_numel(s); ++i) in.gamma.push_back(0.5 * normal(rng));
  for (int64_t i = 0; i < affine_numel(s); ++i) in.beta.push_back(normal(rng));
  for (int64_t i = 0; i < s.numel(); ++i) in.dout.push_back(normal(rng));
  return in;
}

template <typename T, typename U>
std::vector<T> cast(const std::vector<U>& v) {
  return std::vector<T>(v.begin(), v.end());
}

template <typename T>
std::vector<T> poisoned(size_t n) {
  return std::vector<T>(n, static_cast<T>(std::numeric_limits<float>::quiet_NaN()));
}

// A bfloat16 stand-in (round to nearest even) with the conversions at::BFloat16 has: it takes the
// kernels' 16-bit path (convert chunks to fp32, recompute dzhat in the dz pass) without torch.
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

// Every element written (finite), and max|got - ref| <= 2 * max|peer - ref| + tol * max(1, max|ref|)
// (+ extra_abs) where peer is the naive same-dtype result (docs/testing.md; no peer for fp64).
template <typename T>
void expect_close(const std::vector<T>& got, const std::vector<double>& ref, const std::vector<double>* peer,
                  double tol, const std::string& what, double extra_abs = 0.0) {
  CHECK(got.size() == ref.size(), "%s: size %zu != %zu", what.c_str(), got.size(), ref.size());
  double scale = 1.0, peer_err = 0.0, worst = 0.0;
  for (size_t i = 0; i < ref.size(); ++i) {
    scale = std::max(scale, std::abs(ref[i]));
    if (peer) peer_err = std::max(peer_err, std::abs((*peer)[i] - ref[i]));
  }
  size_t unwritten = 0;
  for (size_t i = 0; i < got.size() && i < ref.size(); ++i) {
    const double g = static_cast<double>(got[i]);
    if (!std::isfinite(g)) ++unwritten;
    else worst = std::max(worst, std::abs(g - ref[i]));
  }
  const double allowed = 2 * peer_err + tol * scale + extra_abs;
  CHECK(unwritten == 0, "%s: %zu of %zu elements not written (NaN poison left)", what.c_str(), unwritten, got.size());
  CHECK(worst <= allowed, "%s: max abs err %.3g > %.3g (naive same-dtype err %.3g)", what.c_str(), worst, allowed,
        peer_err);
}

std::string describe(const FdnShape& s) {
  char buf[200];
  std::snprintf(buf, sizeof buf, "[N=%lld C=%lld HW=%lld G=%lld %s %s %s]", (long long)s.N, (long long)s.C,
                (long long)s.HW, (long long)s.G, s.layout == FdnLayout::NCHW ? "nchw" : "nhwc",
                s.affine_broadcast ? "bcast" : "full", s.act == FdnActivation::SiLU ? "silu" : "none");
  return buf;
}

template <typename T>
void check_against_reference(const FdnShape& s, std::mt19937_64& rng, double tol, const std::string& tag) {
  using A = elr::acc_t<T>;
  Inputs in = random_inputs(s, rng);
  const auto z = cast<T>(in.z), gamma = cast<T>(in.gamma), beta = cast<T>(in.beta), dout = cast<T>(in.dout);
  in = Inputs{cast<double>(z), cast<double>(gamma), cast<double>(beta), cast<double>(dout)};  // as rounded
  const Reference ref = reference<double>(s, in);
  const bool fp64 = std::is_same<T, double>::value;
  const Reference peer = reference<A>(s, in);  // naive, in the kernel's compute type
  auto peer_of = [&](const std::vector<double>& v) { return fp64 ? nullptr : &v; };
  const std::string what = tag + " " + describe(s);

  auto out = poisoned<T>(s.numel());
  auto mean = poisoned<A>(s.N * s.G), rstd = poisoned<A>(s.N * s.G);
  elr::fdn_forward_cpu(s, z.data(), gamma.data(), beta.data(), out.data(), mean.data(), rstd.data(), SerialFor{});
  expect_close(out, ref.out, peer_of(peer.out), tol, what + " out");
  expect_close(mean, ref.mean, peer_of(peer.mean), tol, what + " mean");
  std::vector<double> rstd_rel(rstd.size()), peer_rel(rstd.size()), ones(rstd.size(), 1.0);
  for (size_t i = 0; i < rstd.size(); ++i) {  // relative: rstd reaches 1/sqrt(eps)
    rstd_rel[i] = rstd[i] / ref.rstd[i];
    peer_rel[i] = peer.rstd[i] / ref.rstd[i];
  }
  expect_close(rstd_rel, ones, peer_of(peer_rel), tol, what + " rstd/ref");

  // dz = rstd * (dzhat - k1 - zhat * k2) subtracts O(|dzhat|) terms rounded in T, then scales by rstd:
  // forming k1 in another order than the naive loop moves dz by ~eps * rstd * |dzhat|, which shows
  // in one-element groups (naively exactly 0, rstd = 1/sqrt(eps)).
  double max_rstd = 0, max_dout = 0, max_gamma = 0;
  for (double v : ref.rstd) max_rstd = std::max(max_rstd, v);
  for (double v : in.dout) max_dout = std::max(max_dout, std::abs(v));
  for (double v : in.gamma) max_gamma = std::max(max_gamma, std::abs(v));
  const double dz_extra = 8 * std::numeric_limits<A>::epsilon() * max_rstd * max_dout * (1 + max_gamma) * 1.1;

  // Backward with every output, then with each alone (the others nullptr), beta nullptr for none.
  for (int mask = 7; mask >= 1; mask = mask == 7 ? 4 : mask / 2) {
    auto dz = poisoned<T>(s.numel());
    auto dgamma = poisoned<T>(affine_numel(s)), dbeta = poisoned<T>(affine_numel(s));
    const T* beta_arg = s.act == FdnActivation::None && mask != 7 ? nullptr : beta.data();
    elr::fdn_backward_cpu(s, dout.data(), z.data(), gamma.data(), beta_arg, mean.data(), rstd.data(),
                          (mask & 4) ? dz.data() : nullptr, (mask & 2) ? dgamma.data() : nullptr,
                          (mask & 1) ? dbeta.data() : nullptr, SerialFor{});
    const std::string m = what + " mask=" + std::to_string(mask);
    if (mask & 4) expect_close(dz, ref.dz, peer_of(peer.dz), tol, m + " dz", dz_extra);
    if (mask & 2) expect_close(dgamma, ref.dgamma, peer_of(peer.dgamma), tol, m + " dgamma");
    if (mask & 1) expect_close(dbeta, ref.dbeta, peer_of(peer.dbeta), tol, m + " dbeta");
    if (!(mask & 4) && s.numel() > 0)
      CHECK(std::isnan(static_cast<double>(dz[0])), "%s: dz written although skipped", m.c_str());
  }
}

// The kernel's backward against central differences of the kernel's own forward, in fp64:
// loss = sum(w * out), so d loss / d x is the backward with dout = w.
void check_finite_differences(const FdnShape& s, std::mt19937_64& rng) {
  const Inputs in = random_inputs(s, rng);
  std::vector<double> z = in.z, gamma = in.gamma, beta = in.beta;
  const std::vector<double>& w = in.dout;
  std::vector<double> out(s.numel()), mean(s.N * s.G), rstd(s.N * s.G);
  auto loss = [&]() {
    elr::fdn_forward_cpu(s, z.data(), gamma.data(), beta.data(), out.data(), mean.data(), rstd.data(), SerialFor{});
    double l = 0;
    for (int64_t i = 0; i < s.numel(); ++i) l += w[i] * out[i];
    return l;
  };
  loss();
  std::vector<double> dz(s.numel()), dgamma(affine_numel(s)), dbeta(affine_numel(s));
  elr::fdn_backward_cpu(s, w.data(), z.data(), gamma.data(), beta.data(), mean.data(), rstd.data(), dz.data(),
                        dgamma.data(), dbeta.data(), SerialFor{});
  const double h = 1e-6;
  auto numeric = [&](std::vector<double>& x) {
    std::vector<double> grad(x.size());
    for (size_t i = 0; i < x.size(); ++i) {
      const double keep = x[i];
      x[i] = keep + h;
      const double up = loss();
      x[i] = keep - h;
      const double down = loss();
      x[i] = keep;
      grad[i] = (up - down) / (2 * h);
    }
    return grad;
  };
  const std::string what = "finite differences " + describe(s);
  expect_close(dz, numeric(z), nullptr, 1e-6, what + " dz");
  expect_close(dgamma, numeric(gamma), nullptr, 1e-6, what + " dgamma");
  expect_close(dbeta, numeric(beta), nullptr, 1e-6, what + " dbeta");
}

// exp_vec (the vectorisable fp32 exp behind SiLU) against std::exp, and SiLU at the extremes.
void check_exp() {
  double worst = 0;
  for (float x = -87.0f; x <= 87.0f; x += 0.0137f) {
    const double want = std::exp(static_cast<double>(x));
    worst = std::max(worst, std::abs(elr::fdn_detail::exp_vec(x) - want) / want);
  }
  CHECK(worst < 4e-7, "exp_vec: max relative error %.3g", worst);
  using elr::fdn_detail::act_forward;
  using elr::fdn_detail::act_grad;
  constexpr FdnActivation kSiLU = FdnActivation::SiLU;
  const float nan = std::numeric_limits<float>::quiet_NaN(), inf = std::numeric_limits<float>::infinity();
  CHECK(std::isnan(act_forward<kSiLU>(nan)) && std::isnan(act_grad<kSiLU>(nan)), "silu(NaN) is not NaN");
  CHECK(act_forward<kSiLU>(inf) == inf && std::abs(act_forward<kSiLU>(-200.0f)) < 1e-30f, "silu saturation");
  CHECK(act_grad<kSiLU>(200.0f) == 1.0f && std::abs(act_grad<kSiLU>(-200.0f)) < 1e-30f, "silu' saturation");
}

const char* isa_name(elr::CpuIsa isa) {
  return isa == elr::CpuIsa::Avx512 ? "avx512" : isa == elr::CpuIsa::Avx2 ? "avx2" : "generic";
}

}  // namespace

int main() {
  const char* seed_env = std::getenv("ELR_TEST_SEED");
  const uint64_t seed = seed_env ? std::strtoull(seed_env, nullptr, 10) : std::random_device{}();
  std::printf("test_fdn_cpu: seed %llu (ELR_TEST_SEED=%llu replays it)\n", (unsigned long long)seed,
              (unsigned long long)seed);
  std::mt19937_64 rng(seed);

  check_exp();

  // {N, C, HW, G}: G = 1, G = C, C/G = 2, 4, 10, 20, 40; HW = 1 and HW not a multiple of 8/16;
  // groups longer than a chunk (256), C longer than a chunk, NHWC channel tiles of uneven width
  // (600 / 30), NHWC row blocks (tiles of all rows over 256 KB), HW = 0 and C = 0.
  const std::vector<std::vector<int64_t>> shapes = {
      {1, 4, 1, 2},     {2, 6, 5, 3},      {3, 8, 1, 8},      {2, 12, 37, 1},     {1, 40, 21, 4},
      {2, 16, 1000, 4}, {1, 600, 9, 30},   {2, 64, 300, 16},  {1, 8, 4, 2},       {2, 4, 0, 2},
      {2, 64, 1100, 16}, {1, 40, 7000, 4}, {2, 0, 5, 2},
  };
  const elr::CpuIsa best = elr::cpu_isa_limit();
  for (int isa = 0; isa <= static_cast<int>(best); ++isa) {
    elr::cpu_isa_limit() = static_cast<elr::CpuIsa>(isa);
    const std::string tag = isa_name(static_cast<elr::CpuIsa>(isa));
    for (const auto& d : shapes)
      for (FdnLayout layout : {FdnLayout::NCHW, FdnLayout::NHWC})
        for (bool bcast : {false, true})
          for (FdnActivation a : {FdnActivation::None, FdnActivation::SiLU}) {
            FdnShape s;
            s.N = d[0];
            s.C = d[1];
            s.HW = d[2];
            s.G = d[3];
            s.layout = layout;
            s.affine_broadcast = bcast;
            s.act = a;
            s.eps = 1e-5;
            check_against_reference<double>(s, rng, 1e-10, tag + " double");
            check_against_reference<float>(s, rng, 1e-5, tag + " float");
            check_against_reference<Bf16>(s, rng, 8e-3, tag + " bf16");  // outputs rounded to 2^-9
          }
  }
  elr::cpu_isa_limit() = best;

  for (FdnLayout layout : {FdnLayout::NCHW, FdnLayout::NHWC})
    for (bool bcast : {false, true})
      for (FdnActivation a : {FdnActivation::None, FdnActivation::SiLU}) {
        FdnShape s;
        s.N = 2;
        s.C = 4;
        s.HW = 3;
        s.G = 2;
        s.layout = layout;
        s.affine_broadcast = bcast;
        s.act = a;
        check_finite_differences(s, rng);
      }

  std::printf("test_fdn_cpu: %d checks, %d failures (best ISA %s)\n", g_checks, g_failures, isa_name(best));
  return g_failures == 0 ? 0 : 1;
}
