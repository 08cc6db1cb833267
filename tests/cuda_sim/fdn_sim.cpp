// The FDN CUDA kernels (csrc/kernels/fdn.cuh) built for the CPU through cuda_sim.h, behind a C ABI
// for ctypes (tests/cuda_sim/build.py, tests/test_fdn_cuda_sim.py).
//
// Every tensor argument is the raw data pointer of a contiguous buffer in the kernel's layout, in
// the dtype named by `dtype` (0 float32, 1 float64, 2 float16, 3 bfloat16: the torch tensors are
// passed as they are, no conversion); mean/rstd are [N, G] in the accumulation type (float64 for
// dtype 1, else float32). Optional outputs and beta may be NULL, as in the launchers. Returns 0,
// or -1 for an unknown dtype. The workspace is allocated here with the *_workspace_bytes helpers,
// poisoned with NaN bytes, so a kernel that reads partials it did not write shows it.
#define ELR_CUDA_SIM 1
#include "cuda_sim.h"

#include "kernels/fdn.cuh"

#include <cstdint>
#include <vector>

namespace {

elr::FdnShape make_shape(int64_t n, int64_t c, int64_t hw, int64_t g, int layout, int broadcast, int act, double eps) {
  elr::FdnShape s;
  s.N = n;
  s.C = c;
  s.HW = hw;
  s.G = g;
  s.layout = static_cast<elr::FdnLayout>(layout);
  s.affine_broadcast = broadcast != 0;
  s.act = static_cast<elr::FdnActivation>(act);
  s.eps = eps;
  return s;
}

std::vector<unsigned char> workspace(size_t bytes) { return std::vector<unsigned char>(bytes + 1, 0xff); }

template <typename T>
void forward(const elr::FdnShape& s, const void* z, const void* gamma, const void* beta, void* out, void* mean,
             void* rstd) {
  using A = elr::acc_t<T>;
  auto ws = workspace(elr::fdn_forward_workspace_bytes<T>(s));
  elr::fdn_forward_cuda<T>(s, static_cast<const T*>(z), static_cast<const T*>(gamma), static_cast<const T*>(beta),
                           static_cast<T*>(out), static_cast<A*>(mean), static_cast<A*>(rstd), ws.data(), nullptr);
}

template <typename T>
void backward(const elr::FdnShape& s, const void* dout, const void* z, const void* gamma, const void* beta,
              const void* mean, const void* rstd, void* dz, void* dgamma, void* dbeta) {
  using A = elr::acc_t<T>;
  auto ws = workspace(elr::fdn_backward_workspace_bytes<T>(s));
  elr::fdn_backward_cuda<T>(s, static_cast<const T*>(dout), static_cast<const T*>(z), static_cast<const T*>(gamma),
                            static_cast<const T*>(beta), static_cast<const A*>(mean), static_cast<const A*>(rstd),
                            static_cast<T*>(dz), static_cast<T*>(dgamma), static_cast<T*>(dbeta), ws.data(), nullptr);
}

}  // namespace

extern "C" {

int elr_fdn_sim_forward(int dtype, int64_t n, int64_t c, int64_t hw, int64_t g, int layout, int broadcast, int act,
                        double eps, const void* z, const void* gamma, const void* beta, void* out, void* mean,
                        void* rstd) {
  const auto s = make_shape(n, c, hw, g, layout, broadcast, act, eps);
  switch (dtype) {
    case 0: forward<float>(s, z, gamma, beta, out, mean, rstd); return 0;
    case 1: forward<double>(s, z, gamma, beta, out, mean, rstd); return 0;
    case 2: forward<__half>(s, z, gamma, beta, out, mean, rstd); return 0;
    case 3: forward<__nv_bfloat16>(s, z, gamma, beta, out, mean, rstd); return 0;
    default: return -1;
  }
}

int elr_fdn_sim_backward(int dtype, int64_t n, int64_t c, int64_t hw, int64_t g, int layout, int broadcast, int act,
                         const void* dout, const void* z, const void* gamma, const void* beta, const void* mean,
                         const void* rstd, void* dz, void* dgamma, void* dbeta) {
  const auto s = make_shape(n, c, hw, g, layout, broadcast, act, 0.0);
  switch (dtype) {
    case 0: backward<float>(s, dout, z, gamma, beta, mean, rstd, dz, dgamma, dbeta); return 0;
    case 1: backward<double>(s, dout, z, gamma, beta, mean, rstd, dz, dgamma, dbeta); return 0;
    case 2: backward<__half>(s, dout, z, gamma, beta, mean, rstd, dz, dgamma, dbeta); return 0;
    case 3: backward<__nv_bfloat16>(s, dout, z, gamma, beta, mean, rstd, dz, dgamma, dbeta); return 0;
    default: return -1;
  }
}

}  // extern "C"

ELR_CUDA_SIM_EXPORT_STATS()
