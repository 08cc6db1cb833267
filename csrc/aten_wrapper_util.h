// Small pieces every ATen wrapper (csrc/cpu/*.cpp, csrc/cuda/*.cu) uses to hand tensors to the
// torch-free kernels. Host code only: no CUDA headers here.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>

namespace elr {

// The dtype of the tensors that hold acc_t<T> values (csrc/kernels/accumulate.h): FDN's mean / rstd,
// the fp32 results of the half-precision weight-gradient GEMMs. float64 for float64, else float32.
inline at::ScalarType accumulation_dtype(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

// A kernel's raw pointer to a tensor, or nullptr for an undefined or empty tensor (an absent
// optional input or an output that is not computed). T may be a CUDA type of the same layout
// (__half for at::Half), hence the reinterpret_cast.
template <typename T>
inline const T* cptr(const at::Tensor& t) {
  return t.defined() && t.numel() > 0 ? reinterpret_cast<const T*>(t.const_data_ptr()) : nullptr;
}
template <typename T>
inline T* mptr(const at::Tensor& t) {
  return t.defined() && t.numel() > 0 ? reinterpret_cast<T*>(t.mutable_data_ptr()) : nullptr;
}

// at::parallel_for over a CPU kernel's work units (groups, row blocks, token blocks), with a grain
// that gives each task at least at::internal::GRAIN_SIZE of the op's `numel` values so small calls
// stay on one thread.
struct AtenParallelFor {
  int64_t numel;
  template <typename Fn>
  void operator()(int64_t total, const Fn& fn) const {
    if (total <= 0) return;
    const int64_t per_unit = std::max<int64_t>(1, numel / total);
    const int64_t grain = std::max<int64_t>(1, at::internal::GRAIN_SIZE / per_unit);
    at::parallel_for(0, total, grain, fn);
  }
};

}  // namespace elr
