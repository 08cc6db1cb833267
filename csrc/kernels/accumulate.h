// The accumulation type of every CPU and CUDA kernel (fdn, kron_lora): sums, statistics and
// rank-space values are kept in acc_t<T>, fp32 for fp32/fp16/bf16 inputs and fp64 for fp64 inputs
// (so fp64 gradcheck sees fp64 math end to end). Torch-free and include-free, so NVRTC and the CUDA
// simulator compile it as it is. The ATen-level twin (the dtype of the tensors the wrappers
// allocate for these values) is elr::accumulation_dtype in csrc/aten_wrapper_util.h; the Python one
// is elr_ext.reference.accumulation_dtype.
#pragma once

namespace elr {

template <typename T>
struct AccType {
  using type = float;
};
template <>
struct AccType<double> {
  using type = double;
};
template <typename T>
using acc_t = typename AccType<T>::type;

}  // namespace elr
