// The FDN CUDA kernels (csrc/kernels/fdn.cuh) built for the CPU through cuda_sim.h, behind a C ABI
// for ctypes (tests/cuda_sim/build.py, tests/test_fdn_cuda_sim.py).
//
// Every tensor argument is the raw data pointer of a contiguous buffer in the kernel's layout, in
// the dtype named by `dtype` (0 float32, 1 float64, 2 float16, 3 bfloat16: the torch tensors are
// passed as they are, no conversion); mean/rstd are [N, G] in the accumulation type (float64 for
// dtype 1, else float32). Optional outputs and beta may be NULL, as in the launchers. Returns 0,
// -1 for an unknown dtype, or the cudaError_t that cudaGetLastError reports after the launcher (a
// refused launch; the ATen wrapper's C10_CUDA_KERNEL_LAUNCH_CHECK would throw). The workspace is allocated here with the *_workspace_bytes helpers,
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

int launch_status() { return static_cast<int>(cudaGetLastError()); }

// The simulator's own launch checks: fills n floats of dynamic shared memory, then copies them out
// reversed, so every value an output holds crossed threads through shared memory.
__global__ void shared_roundtrip_kernel(int64_t n, float* out) {
  ELR_DYNAMIC_SHARED(float, buf);
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) buf[i] = float(i) + 0.5f;
  __syncthreads();
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) out[i] = buf[n - 1 - i];
}

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
    case 0: forward<float>(s, z, gamma, beta, out, mean, rstd); return launch_status();
    case 1: forward<double>(s, z, gamma, beta, out, mean, rstd); return launch_status();
    case 2: forward<__half>(s, z, gamma, beta, out, mean, rstd); return launch_status();
    case 3: forward<__nv_bfloat16>(s, z, gamma, beta, out, mean, rstd); return launch_status();
    default: return -1;
  }
}

int elr_fdn_sim_backward(int dtype, int64_t n, int64_t c, int64_t hw, int64_t g, int layout, int broadcast, int act,
                         const void* dout, const void* z, const void* gamma, const void* beta, const void* mean,
                         const void* rstd, void* dz, void* dgamma, void* dbeta) {
  const auto s = make_shape(n, c, hw, g, layout, broadcast, act, 0.0);
  switch (dtype) {
    case 0: backward<float>(s, dout, z, gamma, beta, mean, rstd, dz, dgamma, dbeta); return launch_status();
    case 1: backward<double>(s, dout, z, gamma, beta, mean, rstd, dz, dgamma, dbeta); return launch_status();
    case 2: backward<__half>(s, dout, z, gamma, beta, mean, rstd, dz, dgamma, dbeta); return launch_status();
    case 3: backward<__nv_bfloat16>(s, dout, z, gamma, beta, mean, rstd, dz, dgamma, dbeta); return launch_status();
    default: return -1;
  }
}

// shared_roundtrip_kernel over n floats (n * 4 bytes of dynamic shared memory), one block of 256
// threads. opt_in_bytes >= 0 first calls cudaFuncSetAttribute(kernel,
// cudaFuncAttributeMaxDynamicSharedMemorySize, opt_in_bytes). status[0]: that call's cudaError_t
// (0 when not made), status[1]: cudaGetLastError() after the launch, status[2]: the launches the
// simulator refused so far (elr_cuda_sim_launch_failures).
void elr_cuda_sim_shared_roundtrip(int64_t n, int opt_in_bytes, float* out, int* status) {
  status[0] = 0;
  if (opt_in_bytes >= 0) {
    status[0] = static_cast<int>(
        cudaFuncSetAttribute(shared_roundtrip_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, opt_in_bytes));
  }
  (void)cudaGetLastError();  // the opt-in's own error is in status[0]
  ELR_LAUNCH(shared_roundtrip_kernel, dim3(1), dim3(256), size_t(n) * sizeof(float), nullptr, n, out);
  status[1] = launch_status();
  status[2] = static_cast<int>(cuda_sim::errors().launch_failures);
}

}  // extern "C"

ELR_CUDA_SIM_EXPORT_STATS()
