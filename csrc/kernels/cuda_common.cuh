// Helpers shared by the CUDA kernel headers of csrc/kernels (fdn.cuh, kron_lora.cuh): the nvcc side
// of the conventions of tests/cuda_sim/cuda_sim.h, conversions to and from the accumulation type,
// 128-bit packs, small integer helpers. Torch-free.
//
// The same sources run under nvcc and, for the tests, on the CPU through tests/cuda_sim/cuda_sim.h
// (ELR_CUDA_SIM), which a simulated build includes first; it defines ELR_LAUNCH and
// ELR_DYNAMIC_SHARED itself, so the definitions below are the nvcc twins. Conventions:
//   * launches go through ELR_LAUNCH (`kernel` one token: put a template-id in a variable first);
//   * dynamic shared memory through ELR_DYNAMIC_SHARED;
//   * 128-bit reinterpret_cast loads/stores only behind ELR_VECTOR_IO (an elementwise twin runs in
//     the simulation over the same packs);
//   * every __syncthreads() / shuffle is reached by the whole block / warp.
//
// ELR_EXT_NVRTC: the translation unit is device code only, compiled by NVRTC (tests/test_nvrtc_sm70.py
// builds the kernels for compute_70, which nvcc 13 no longer targets). NVRTC has no C++ standard
// library and no host runtime, so every header here keeps its std includes, host helpers and
// launchers behind `#ifndef ELR_EXT_NVRTC`; this file then supplies the fixed-width integer types.
#pragma once

#if defined(ELR_EXT_NVRTC)
#if defined(ELR_CUDA_SIM)
#error "ELR_EXT_NVRTC (device-only NVRTC build) and ELR_CUDA_SIM (host simulation) exclude each other"
#endif
// glibc's LP64 definitions (int64_t is long, not long long), so the kernels' mangled names are the
// ones nvcc gives them in the shipped binary.
typedef signed char int8_t;
typedef short int16_t;
typedef int int32_t;
typedef long int64_t;
typedef unsigned char uint8_t;
typedef unsigned short uint16_t;
typedef unsigned int uint32_t;
typedef unsigned long uint64_t;
typedef unsigned long uintptr_t;
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#else
#include <cstddef>
#include <cstdint>
#include <initializer_list>
#endif

#include "accumulate.h"  // acc_t<T>: the accumulation type, shared with the CPU kernels

#if defined(ELR_CUDA_SIM)
#ifndef ELR_LAUNCH
#error "a simulated build includes tests/cuda_sim/cuda_sim.h before the kernel headers of csrc/kernels"
#endif
#elif !defined(ELR_EXT_NVRTC)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#endif

// ---- Portable CUDA macros ---------------------------------------------------------------------
#ifndef ELR_LAUNCH
#define ELR_LAUNCH(kernel, grid, block, shmem, stream, ...) kernel<<<grid, block, shmem, stream>>>(__VA_ARGS__)
#endif
#ifndef ELR_DYNAMIC_SHARED
#define ELR_DYNAMIC_SHARED(type, name)                               \
  extern __shared__ __align__(16) unsigned char elr_dynamic_shared_[]; \
  type* name = reinterpret_cast<type*>(elr_dynamic_shared_)
#endif
#ifndef ELR_VECTOR_IO
#if defined(__CUDACC__) && !defined(ELR_CUDA_SIM)
#define ELR_VECTOR_IO 1  // one 128-bit load/store per pack
#else
#define ELR_VECTOR_IO 0  // the portable twin: element by element, same packs
#endif
#endif
#ifndef ELR_UNROLL
#if defined(__CUDACC__)
#define ELR_UNROLL _Pragma("unroll")
#else
#define ELR_UNROLL
#endif
#endif

namespace elr {
namespace cuda_common {

constexpr int kWarp = 32;
constexpr unsigned kFullMask = 0xffffffffu;

__host__ __device__ __forceinline__ int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
__host__ __device__ __forceinline__ int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }
__host__ __device__ __forceinline__ int64_t max64(int64_t a, int64_t b) { return a > b ? a : b; }
__host__ __device__ __forceinline__ size_t align256(size_t bytes) { return (bytes + 255) / 256 * 256; }

// ---- Conversions to and from the accumulation type --------------------------------------------
template <typename T>
struct Convert;
template <>
struct Convert<float> {
  __host__ __device__ static float to(float x) { return x; }
  __host__ __device__ static float from(float x) { return x; }
};
template <>
struct Convert<double> {
  __host__ __device__ static double to(double x) { return x; }
  __host__ __device__ static double from(double x) { return x; }
};
template <>
struct Convert<__half> {
  __host__ __device__ static float to(__half x) { return __half2float(x); }
  __host__ __device__ static __half from(float x) { return __float2half_rn(x); }
};
template <>
struct Convert<__nv_bfloat16> {
  __host__ __device__ static float to(__nv_bfloat16 x) { return __bfloat162float(x); }
  __host__ __device__ static __nv_bfloat16 from(float x) { return __float2bfloat16_rn(x); }
};
template <typename T>
__device__ __forceinline__ acc_t<T> to_acc(T x) {
  return Convert<T>::to(x);
}
template <typename T>
__device__ __forceinline__ T from_acc(acc_t<T> x) {
  return Convert<T>::from(x);
}
// x rounded to T and back: the value a tensor of dtype T would hold (identity for float/double).
template <typename T>
__device__ __forceinline__ acc_t<T> round_to(acc_t<T> x) {
  return Convert<T>::to(Convert<T>::from(x));
}

// ---- Packs: V consecutive elements, one 128-bit access when ELR_VECTOR_IO ----------------------
template <typename T>
constexpr int kVec = 16 / int(sizeof(T));

template <typename T, int V>
struct alignas(sizeof(T) * V) Pack {
  T v[V];
};

template <typename T, int V>
__device__ __forceinline__ Pack<T, V> load_pack(const T* p) {
#if ELR_VECTOR_IO
  return *reinterpret_cast<const Pack<T, V>*>(p);
#else
  Pack<T, V> r;
  for (int j = 0; j < V; ++j) r.v[j] = p[j];
  return r;
#endif
}

template <typename T, int V>
__device__ __forceinline__ void store_pack(T* p, const Pack<T, V>& x) {
#if ELR_VECTOR_IO
  *reinterpret_cast<Pack<T, V>*>(p) = x;
#else
  for (int j = 0; j < V; ++j) p[j] = x.v[j];
#endif
}

template <typename T, int V>
__device__ __forceinline__ void load_acc(const T* p, acc_t<T> (&x)[V]) {
  const Pack<T, V> pk = load_pack<T, V>(p);
  ELR_UNROLL
  for (int j = 0; j < V; ++j) x[j] = to_acc(pk.v[j]);
}

template <typename T, int V>
__device__ __forceinline__ void store_acc(T* p, const acc_t<T> (&x)[V]) {
  Pack<T, V> pk;
  ELR_UNROLL
  for (int j = 0; j < V; ++j) pk.v[j] = from_acc<T>(x[j]);
  store_pack<T, V>(p, pk);
}

#ifndef ELR_EXT_NVRTC
// ---- Host side ----------------------------------------------------------------------------------
// True when every pointer is 16-byte aligned (nullptr counts as aligned: it is never accessed).
inline bool aligned16(std::initializer_list<const void*> pointers) {
  bool ok = true;
  for (const void* p : pointers) ok = ok && reinterpret_cast<uintptr_t>(p) % 16 == 0;
  return ok;
}

inline int device_sm_count() {
  int device = 0, sms = 0;
  if (cudaGetDevice(&device) != cudaSuccess ||
      cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) != cudaSuccess || sms <= 0) {
    (void)cudaGetLastError();  // not sticky; do not leave it for the caller's launch check
    return 80;
  }
  return sms;
}
#endif  // !ELR_EXT_NVRTC

}  // namespace cuda_common
}  // namespace elr
