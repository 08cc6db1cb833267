// FDN (feature denormalisation, eq. 8 of the paper): the shape description shared by the CPU
// and CUDA kernels. Torch-free: kernels see raw pointers and this struct only.
//
//   out = act(zhat * (1 + gamma) + beta),  zhat = (z - mean_g) * rstd_g
//
// mean_g / rstd_g are the statistics of group g of sample n over (C/G channels, H*W positions).
#pragma once

#ifndef ELR_EXT_NVRTC  // NVRTC: cuda_common.cuh supplies the fixed-width types
#include <cstdint>
#endif

namespace elr {

// Memory layout of z, out, grad_out, dz and of full-size gamma/beta/dgamma/dbeta.
// NCHW: offset(n, c, hw) = (n * C + c) * HW + hw        (a group is one contiguous run)
// NHWC: offset(n, c, hw) = (n * HW + hw) * C + c        (channels_last)
enum class FdnLayout : int { NCHW = 0, NHWC = 1 };

enum class FdnActivation : int { None = 0, SiLU = 1 };

struct FdnShape {
  int64_t N = 0;
  int64_t C = 0;
  int64_t HW = 0;
  int64_t G = 0;  // number of groups, C % G == 0
  FdnLayout layout = FdnLayout::NCHW;
  // true: gamma/beta (and dgamma/dbeta) are [N, C] contiguous (from a [N, C, 1, 1] tensor);
  // false: they have z's full shape and layout.
  bool affine_broadcast = false;
  FdnActivation act = FdnActivation::None;
  double eps = 1e-5;

  int64_t channels_per_group() const { return C / G; }
  int64_t group_size() const { return (C / G) * HW; }
  int64_t numel() const { return N * C * HW; }
};

}  // namespace elr
