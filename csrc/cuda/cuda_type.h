// at::Half / at::BFloat16 have the bit layout of the CUDA types the kernels take: the map from the
// dispatched scalar_t to the kernel's element type, shared by the CUDA wrappers.
#pragma once

#include <ATen/ATen.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace elr {

template <typename scalar_t>
struct CudaType {
  using type = scalar_t;
};
template <>
struct CudaType<at::Half> {
  using type = __half;
};
template <>
struct CudaType<at::BFloat16> {
  using type = __nv_bfloat16;
};

}  // namespace elr
