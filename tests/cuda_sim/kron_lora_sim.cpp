// The Kronecker LoRA CUDA kernels (csrc/kernels/kron_lora.cuh) built for the CPU through cuda_sim.h,
// behind a C ABI for ctypes (tests/cuda_sim/build.py, tests/test_kron_lora_cuda_sim.py).
//
// `shape` points to 7 int64: M, T, a1, a2, b1, b2, r (kron_lora_common.h; the kron_delta entry
// points ignore M). Every tensor argument is the raw data pointer of a contiguous buffer in the dtype
// named by `dtype` (0 float32, 1 float64, 2 float16, 3 bfloat16: torch tensors as they are, no
// conversion). Optional inputs and outputs may be NULL, as in the launchers. Returns 0, -1 for an
// unknown dtype, -2 when the fused entry points get a shape the fused path does not support.
// Workspaces are allocated here with the *_workspace_bytes helpers and poisoned with NaN bytes, so
// a kernel that reads partials it did not write shows it.
#define ELR_CUDA_SIM 1
#include "cuda_sim.h"

#include "kernels/kron_lora.cuh"

#include <cstdint>
#include <vector>

namespace {

elr::KronShape make_shape(const int64_t* d) {
  elr::KronShape s;
  s.M = d[0];
  s.T = d[1];
  s.a1 = d[2];
  s.a2 = d[3];
  s.b1 = d[4];
  s.b2 = d[5];
  s.r = d[6];
  return s;
}

std::vector<unsigned char> workspace(size_t bytes) { return std::vector<unsigned char>(bytes + 1, 0xff); }

template <typename T>
const T* in(const void* p) {
  return static_cast<const T*>(p);
}
template <typename T>
T* out(void* p) {
  return static_cast<T*>(p);
}

// Calls f.template operator()<T>() for the dtype code.
template <typename F>
int dispatch(int dtype, F&& f) {
  switch (dtype) {
    case 0: return f.template operator()<float>();
    case 1: return f.template operator()<double>();
    case 2: return f.template operator()<__half>();
    case 3: return f.template operator()<__nv_bfloat16>();
    default: return -1;
  }
}

}  // namespace

extern "C" {

// out[5]: fused supported (0/1), tokens per block, padded rank columns, blocks, shared bytes.
int elr_kron_sim_plan(int dtype, const int64_t* shape, int64_t* plan) {
  const auto s = make_shape(shape);
  return dispatch(dtype, [&]<typename T>() {
    const auto p = elr::kron_detail::make_fused_plan<T>(s);
    plan[0] = elr::kron_fused_supported<T>(s) ? 1 : 0;
    plan[1] = p.bm;
    plan[2] = p.rp;
    plan[3] = p.blocks;
    plan[4] = int64_t(p.smem_bytes);
    return 0;
  });
}

int elr_kron_sim_forward(int dtype, const int64_t* shape, const void* x, const void* A, const void* U, const void* V,
                         void* y, int accumulate, double scale, void* tmat, void* smat) {
  const auto s = make_shape(shape);
  return dispatch(dtype, [&]<typename T>() {
    if (!elr::kron_fused_supported<T>(s)) return -2;
    elr::kron_lora_forward_fused_cuda<T>(s, in<T>(x), in<T>(A), in<T>(U), in<T>(V), out<T>(y), accumulate != 0,
                                         scale, out<T>(tmat), out<T>(smat), nullptr);
    return 0;
  });
}

int elr_kron_sim_backward(int dtype, const int64_t* shape, const void* dy, const void* x, const void* A,
                          const void* U, const void* V, const void* tmat, const void* smat, double scale, void* dx,
                          int accumulate_dx, void* dA, void* dU, void* dV) {
  const auto s = make_shape(shape);
  return dispatch(dtype, [&]<typename T>() {
    if (!elr::kron_fused_supported<T>(s)) return -2;
    auto ws = workspace(elr::kron_lora_backward_fused_workspace_bytes<T>(s));
    elr::kron_lora_backward_fused_cuda<T>(s, in<T>(dy), in<T>(x), in<T>(A), in<T>(U), in<T>(V), in<T>(tmat),
                                          in<T>(smat), scale, out<T>(dx), accumulate_dx != 0, out<T>(dA), out<T>(dU),
                                          out<T>(dV), ws.data(), nullptr);
    return 0;
  });
}

int elr_kron_sim_mix_forward(int dtype, const int64_t* shape, const void* A, const void* tmat, void* smat) {
  const auto s = make_shape(shape);
  return dispatch(dtype, [&]<typename T>() {
    elr::kron_mix_forward_cuda<T>(s, in<T>(A), in<T>(tmat), out<T>(smat), nullptr);
    return 0;
  });
}

int elr_kron_sim_mix_backward(int dtype, const int64_t* shape, const void* A, const void* ds, void* dt) {
  const auto s = make_shape(shape);
  return dispatch(dtype, [&]<typename T>() {
    elr::kron_mix_backward_cuda<T>(s, in<T>(A), in<T>(ds), out<T>(dt), nullptr);
    return 0;
  });
}

int elr_kron_sim_mix_grad_A(int dtype, const int64_t* shape, const void* ds, const void* tmat, void* dA) {
  const auto s = make_shape(shape);
  return dispatch(dtype, [&]<typename T>() {
    auto ws = workspace(elr::kron_mix_grad_A_workspace_bytes<T>(s));
    elr::kron_mix_grad_A_cuda<T>(s, in<T>(ds), in<T>(tmat), out<T>(dA), ws.data(), nullptr);
    return 0;
  });
}

int elr_kron_sim_delta(int dtype, const int64_t* shape, const void* A, const void* U, const void* V, void* dW) {
  const auto s = make_shape(shape);
  return dispatch(dtype, [&]<typename T>() {
    auto ws = workspace(elr::kron_delta_workspace_bytes<T>(s));
    elr::kron_delta_cuda<T>(s, in<T>(A), in<T>(U), in<T>(V), out<T>(dW), ws.data(), nullptr);
    return 0;
  });
}

int elr_kron_sim_delta_backward(int dtype, const int64_t* shape, const void* grad, const void* A, const void* U,
                                const void* V, void* dA, void* dU, void* dV) {
  const auto s = make_shape(shape);
  return dispatch(dtype, [&]<typename T>() {
    auto ws = workspace(elr::kron_delta_backward_workspace_bytes<T>(s));
    elr::kron_delta_backward_cuda<T>(s, in<T>(grad), in<T>(A), in<T>(U), in<T>(V), out<T>(dA), out<T>(dU),
                                     out<T>(dV), ws.data(), nullptr);
    return 0;
  });
}

}  // extern "C"

ELR_CUDA_SIM_EXPORT_STATS()
