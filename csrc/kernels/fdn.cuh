// FDN (eq. 8) CUDA kernels and their host launchers: torch-free (raw pointers, FdnShape, a stream).
//
//   forward   out = act(zhat * (1 + gamma) + beta),  zhat = (z - mean_g) * rstd_g
//   backward  g = dout * act'(pre),  dbeta = g,  dgamma = g * zhat,  dzhat = g * (1 + gamma),
//             dz = rstd * (dzhat - mean_g(dzhat) - zhat * mean_g(dzhat * zhat))
//
// Work decomposition. A group (n, g) holds C/G * HW elements (40960 for Stable Diffusion's
// 320 x 64 x 64 / 32, with only N*G = 64 groups against 132 SMs on an H100), so every group is
// split over `splits` blocks: grid (N*G, splits), block b of a group owning a contiguous chunk of
// its element order (NCHW: one contiguous run; NHWC: C/G contiguous channels at stride C per pixel).
//   forward:  fdn_stats_kernel   per-thread Welford, merged across the warp by shuffles and across
//                                the block through shared memory (Chan's formula) -> one partial
//                                (count, mean, M2) per block in the workspace
//             fdn_forward_apply_kernel  merges its group's partials in a fixed order (every block
//                                of the group gets the same bits; block 0 writes mean/rstd), then
//                                writes out elementwise
//   backward: fdn_backward_reduce_kernel  per-block partial sums of dzhat and dzhat * zhat
//             fdn_backward_apply_kernel   merges them, writes dz and full-size dgamma/dbeta
//             broadcast gamma/beta ([N, C]): dgamma[n, c] = sum_hw g * zhat, dbeta[n, c] = sum_hw g
//               NCHW: fdn_backward_affine_rows_kernel, one block per contiguous (n, c) row
//               NHWC: fdn_backward_affine_cols_kernel, 32 channels x 8 pixels per block, pixel
//                     range split over gridDim.y, partials summed by ..._cols_finalize_kernel
// No atomics: every reduction has a fixed order, so results are deterministic run to run.
//
// All statistics and sums are in acc_t<T> (fp32 for fp32/fp16/bf16, fp64 for fp64); mean and
// rstd are [N, G] in acc_t<T>. Loads and stores move `V` elements at a time (128 bits) when the
// layout and the pointers' alignment allow it, else one.
//
// The same source runs under nvcc and, for the tests, on the CPU through tests/cuda_sim/cuda_sim.h
// (ELR_CUDA_SIM). Its conventions: launches through ELR_LAUNCH, the 128-bit reinterpret_cast
// loads behind ELR_VECTOR_IO with an elementwise twin, every __syncthreads() and shuffle reached
// by the whole block / warp. The generic helpers (and the nvcc twins of those macros) live in
// cuda_common.cuh. Under ELR_EXT_NVRTC only the kernels and their device helpers are compiled (no
// std headers, no host launch code).
#pragma once

#include "cuda_common.cuh"  // first: the std headers (or NVRTC's fixed-width types) and acc_t<T>
#include "fdn_common.h"

namespace elr {

#ifndef ELR_EXT_NVRTC
// ---- API ----------------------------------------------------------------------------------------
// Every pointer is contiguous in s.layout (full-size tensors) or [N, C] (broadcast gamma/beta and
// their gradients); mean/rstd are [N, G]. `workspace` holds at least *_workspace_bytes(s) bytes
// (any alignment from cudaMalloc / the caching allocator). Nothing is launched when s.numel() == 0.
// Preconditions (the kernels' 32-bit index arithmetic and grid): N * C < 2^31, group_size() < 2^32.
template <typename T>
size_t fdn_forward_workspace_bytes(const FdnShape& s);
template <typename T>
void fdn_forward_cuda(const FdnShape& s, const T* z, const T* gamma, const T* beta, T* out, acc_t<T>* mean,
                      acc_t<T>* rstd, void* workspace, cudaStream_t stream);
template <typename T>
size_t fdn_backward_workspace_bytes(const FdnShape& s);
// dz, dgamma, dbeta may each be nullptr (not computed). beta may be nullptr when s.act == None.
template <typename T>
void fdn_backward_cuda(const FdnShape& s, const T* dout, const T* z, const T* gamma, const T* beta,
                       const acc_t<T>* mean, const acc_t<T>* rstd, T* dz, T* dgamma, T* dbeta, void* workspace,
                       cudaStream_t stream);
#endif  // !ELR_EXT_NVRTC

namespace fdn_detail {

using namespace cuda_common;  // ceil_div, Convert, Pack, load_acc, device_sm_count, kWarp ...

constexpr int kThreads = 256;  // every kernel here, 1-D except the (32, 8) column kernel
constexpr int kWarps = kThreads / kWarp;
// Splitting a group: at least kMinElemsPerBlock elements per block (16 per thread), at most
// kMaxSplits blocks per group, and no more blocks than kBlocksPerSm * SMs in all.
constexpr int64_t kMinElemsPerBlock = 4096;
constexpr int64_t kMaxSplits = 64;
constexpr int64_t kBlocksPerSm = 4;
// Every kernel is __launch_bounds__(kThreads, kBlocksPerSm): kBlocksPerSm blocks resident per SM,
// so the grid the launchers size for kBlocksPerSm blocks per SM runs in one wave. It also lets
// ptxas use up to 64 registers per thread: for a bare 256-thread bound it settles on about 40 on
// sm_90 and spills inside the backward reduction's loop.
// Broadcast dgamma/dbeta in NHWC: kColTile channels x kColRows pixels per block step.
constexpr int kColTile = 32;
constexpr int kColRows = kThreads / kColTile;
constexpr int64_t kMinRowsPerBlock = 64;

// Quotient and remainder in 32 bits: a 64-bit division is a subroutine call on the GPU, and the
// registers its calling convention clobbers make ptxas spill around the call. Every dividend here
// is an index within one group, within one (n, c) row or within the N*C grid: all below 2^32
// (group_size() < 2^32 is a precondition of the launchers; the ATen wrapper checks it).
__device__ __forceinline__ uint32_t div32(int64_t a, int64_t b) { return uint32_t(a) / uint32_t(b); }
__device__ __forceinline__ uint32_t mod32(int64_t a, int64_t b) { return uint32_t(a) % uint32_t(b); }

__device__ __forceinline__ float acc_rsqrt(float x) { return rsqrtf(x); }
__device__ __forceinline__ double acc_rsqrt(double x) { return 1.0 / sqrt(x); }
__device__ __forceinline__ float acc_exp(float x) { return expf(x); }
__device__ __forceinline__ double acc_exp(double x) { return exp(x); }
// SiLU's division. fp32: __fdividef (at most 2 ulp; 0 instead of a value below 1e-36 once the
// divisor 1 + e^-x passes 2^126, x < -87), because the IEEE division's slow path is a subroutine
// call, and in the 8-wide fp16/bf16 forward loop the registers its convention clobbers make ptxas
// spill. fp64 keeps the IEEE division.
__device__ __forceinline__ float acc_div(float a, float b) { return __fdividef(a, b); }
__device__ __forceinline__ double acc_div(double a, double b) { return a / b; }

template <typename A>
__device__ __forceinline__ A activation(A pre, FdnActivation act) {
  if (act == FdnActivation::SiLU) return acc_div(pre, A(1) + acc_exp(-pre));
  return pre;
}
// dout * act'(pre); silu'(x) = s * (1 + x * (1 - s)), s = sigmoid(x).
template <typename A>
__device__ __forceinline__ A activation_grad(A dout, A pre, FdnActivation act) {
  if (act == FdnActivation::SiLU) {
    const A s = acc_div(A(1), A(1) + acc_exp(-pre));
    return dout * s * (A(1) + pre * (A(1) - s));
  }
  return dout;
}

// ---- Geometry of one launch ---------------------------------------------------------------------
struct Tiling {
  int64_t N, C, HW, G;
  int64_t cpg;    // channels per group
  int64_t gsize;  // elements per group, cpg * HW
  int64_t chunk;  // packs per block along a group
  int64_t splits; // blocks per group (gridDim.y)
  FdnLayout layout;
  bool broadcast;
  FdnActivation act;
  double eps;
};

// Runs f(offset, affine_offset) for each pack of this block's chunk of group (n, g). offset
// addresses z/out/dout/dz (and full gamma/beta); affine_offset addresses gamma/beta, which is
// offset itself when they are full-size, else n * C + (channel of the pack's first element).
// A pack never straddles a pixel in NHWC (cpg % V == 0) nor, when broadcast, a channel in NCHW
// (HW % V == 0): the launcher picks V = 1 otherwise.
template <int V, typename F>
__device__ __forceinline__ void for_each_pack(const Tiling& t, int64_t n, int64_t g, F&& f) {
  const int64_t packs = t.gsize / V;
  const int64_t begin = int64_t(blockIdx.y) * t.chunk;
  const int64_t end = min64(packs, begin + t.chunk);
  int64_t p = begin + threadIdx.x;
  if (p >= end) return;
  // Element e of the group is (major, minor) = (e / inner, e % inner): (channel, pixel) in NCHW,
  // (pixel, channel) in NHWC. Advanced incrementally: no division per pack.
  const bool nchw = t.layout == FdnLayout::NCHW;
  const int64_t inner = nchw ? t.HW : t.cpg;
  const int64_t step = int64_t(blockDim.x) * V;
  const int64_t step_major = div32(step, inner), step_minor = mod32(step, inner);
  int64_t major = div32(p * V, inner), minor = mod32(p * V, inner);
  const int64_t c0 = g * t.cpg;
  for (; p < end; p += blockDim.x) {
    const int64_t c = c0 + (nchw ? major : minor);
    const int64_t offset = nchw ? (n * t.C + c) * t.HW + minor : (n * t.HW + major) * t.C + c;
    f(offset, t.broadcast ? n * t.C + c : offset);
    major += step_major;
    minor += step_minor;
    if (minor >= inner) {
      minor -= inner;
      ++major;
    }
  }
}

// gamma / beta of one pack (a broadcast value repeated in NCHW, V channels in NHWC).
template <typename T, int V>
__device__ __forceinline__ void load_affine(const Tiling& t, const T* p, int64_t affine_offset, acc_t<T> (&x)[V]) {
  if (t.broadcast && t.layout == FdnLayout::NCHW) {
    const acc_t<T> v = to_acc(p[affine_offset]);
    ELR_UNROLL
    for (int j = 0; j < V; ++j) x[j] = v;
  } else {
    load_acc<T, V>(p + affine_offset, x);
  }
}

// ---- Reductions ---------------------------------------------------------------------------------
template <typename A>
struct Welford {
  A n, mean, m2;
};

// Chan et al.'s parallel merge; a count of zero on either side is an identity.
template <typename A>
__device__ __forceinline__ Welford<A> welford_merge(const Welford<A>& a, const Welford<A>& b) {
  const A n = a.n + b.n;
  if (n == A(0)) return a;
  const A wb = b.n / n;
  const A delta = b.mean - a.mean;
  return {n, a.mean + delta * wb, a.m2 + b.m2 + delta * delta * a.n * wb};
}

// Adds one pack: Welford's update for a single element, else the pack's own two-pass moments
// merged in (one division per pack).
template <typename A, int V>
__device__ __forceinline__ void welford_add(Welford<A>& w, const A (&x)[V]) {
  if constexpr (V == 1) {
    w.n += A(1);
    const A d = x[0] - w.mean;
    w.mean += d / w.n;
    w.m2 += d * (x[0] - w.mean);
  } else {
    A sum = A(0);
    ELR_UNROLL
    for (int j = 0; j < V; ++j) sum += x[j];
    const A m = sum / A(V);
    A m2 = A(0);
    ELR_UNROLL
    for (int j = 0; j < V; ++j) m2 += (x[j] - m) * (x[j] - m);
    w = welford_merge(w, Welford<A>{A(V), m, m2});
  }
}

// Lane 0 ends with the merge of the warp (all 32 lanes must call).
template <typename A>
__device__ __forceinline__ Welford<A> warp_merge(Welford<A> w) {
  for (int offset = kWarp / 2; offset > 0; offset /= 2) {
    const Welford<A> o{__shfl_down_sync(kFullMask, w.n, offset), __shfl_down_sync(kFullMask, w.mean, offset),
                       __shfl_down_sync(kFullMask, w.m2, offset)};
    w = welford_merge(w, o);
  }
  return w;
}

template <typename A>
__device__ __forceinline__ void warp_sum2(A& a, A& b) {
  for (int offset = kWarp / 2; offset > 0; offset /= 2) {
    a += __shfl_down_sync(kFullMask, a, offset);
    b += __shfl_down_sync(kFullMask, b, offset);
  }
}

// Thread 0 ends with the merge of the (1-D) block. Once per kernel: the shared slots are not
// guarded for reuse.
template <typename A>
__device__ __forceinline__ Welford<A> block_merge(Welford<A> w) {
  __shared__ A slots[3][kWarps];
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  w = warp_merge(w);
  if (lane == 0) {
    slots[0][warp] = w.n;
    slots[1][warp] = w.mean;
    slots[2][warp] = w.m2;
  }
  __syncthreads();
  if (warp == 0) {
    const bool has = lane < int(blockDim.x) / kWarp;
    w = has ? Welford<A>{slots[0][lane], slots[1][lane], slots[2][lane]} : Welford<A>{A(0), A(0), A(0)};
    w = warp_merge(w);
  }
  return w;
}

// Thread 0 ends with the sums over the (1-D) block. Once per kernel.
template <typename A>
__device__ __forceinline__ void block_sum2(A& a, A& b) {
  __shared__ A slots[2][kWarps];
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  warp_sum2(a, b);
  if (lane == 0) {
    slots[0][warp] = a;
    slots[1][warp] = b;
  }
  __syncthreads();
  if (warp == 0) {
    const bool has = lane < int(blockDim.x) / kWarp;
    a = has ? slots[0][lane] : A(0);
    b = has ? slots[1][lane] : A(0);
    warp_sum2(a, b);
  }
}

// Merges the `splits` partials (count, mean, M2) of group gi in a fixed order; every thread gets
// mean and rstd.
template <typename A>
__device__ __forceinline__ void group_stats(const Tiling& t, const A* partials, int64_t gi, A& mean, A& rstd) {
  __shared__ A stats[2];
  if (threadIdx.x < kWarp) {
    Welford<A> w{A(0), A(0), A(0)};
    for (int64_t s = threadIdx.x; s < t.splits; s += kWarp) {
      const A* p = partials + (gi * t.splits + s) * 3;
      w = welford_merge(w, Welford<A>{p[0], p[1], p[2]});
    }
    w = warp_merge(w);
    if (threadIdx.x == 0) {
      stats[0] = w.mean;
      stats[1] = acc_rsqrt(w.m2 / w.n + A(t.eps));  // biased variance
    }
  }
  __syncthreads();
  mean = stats[0];
  rstd = stats[1];
}

// mean_g(dzhat) and mean_g(dzhat * zhat) of group gi from its `splits` partial sums.
template <typename A>
__device__ __forceinline__ void group_grad_means(const Tiling& t, const A* partials, int64_t gi, A& mean_dzhat,
                                                 A& mean_dzhat_zhat) {
  __shared__ A means[2];
  if (threadIdx.x < kWarp) {
    A a = A(0), b = A(0);
    for (int64_t s = threadIdx.x; s < t.splits; s += kWarp) {
      a += partials[(gi * t.splits + s) * 2];
      b += partials[(gi * t.splits + s) * 2 + 1];
    }
    warp_sum2(a, b);
    if (threadIdx.x == 0) {
      means[0] = a / A(t.gsize);
      means[1] = b / A(t.gsize);
    }
  }
  __syncthreads();
  mean_dzhat = means[0];
  mean_dzhat_zhat = means[1];
}

// ---- Kernels ------------------------------------------------------------------------------------
// grid (N*G, splits): partial Welford moments of each block's chunk -> partials[gi][split][3].
template <typename T, int V>
__global__ void __launch_bounds__(kThreads, kBlocksPerSm)
    fdn_stats_kernel(Tiling t, const T* __restrict__ z, acc_t<T>* __restrict__ partials) {
  using A = acc_t<T>;
  const int64_t gi = blockIdx.x, n = div32(gi, t.G), g = mod32(gi, t.G);
  Welford<A> w{A(0), A(0), A(0)};
  for_each_pack<V>(t, n, g, [&](int64_t offset, int64_t) {
    A x[V];
    load_acc<T, V>(z + offset, x);
    welford_add(w, x);
  });
  w = block_merge(w);
  if (threadIdx.x == 0) {
    A* p = partials + (gi * t.splits + blockIdx.y) * 3;
    p[0] = w.n;
    p[1] = w.mean;
    p[2] = w.m2;
  }
}

// grid (N*G, splits): out = act(zhat * (1 + gamma) + beta); block (gi, 0) also writes mean/rstd.
template <typename T, int V>
__global__ void __launch_bounds__(kThreads, kBlocksPerSm)
    fdn_forward_apply_kernel(Tiling t, const T* __restrict__ z, const T* __restrict__ gamma,
                             const T* __restrict__ beta, const acc_t<T>* __restrict__ partials, T* __restrict__ out,
                             acc_t<T>* __restrict__ mean_out, acc_t<T>* __restrict__ rstd_out) {
  using A = acc_t<T>;
  const int64_t gi = blockIdx.x, n = div32(gi, t.G), g = mod32(gi, t.G);
  A mean, rstd;
  group_stats(t, partials, gi, mean, rstd);
  if (blockIdx.y == 0 && threadIdx.x == 0) {
    mean_out[gi] = mean;
    rstd_out[gi] = rstd;
  }
  for_each_pack<V>(t, n, g, [&](int64_t offset, int64_t affine_offset) {
    A x[V], gm[V], bt[V];
    load_acc<T, V>(z + offset, x);
    load_affine<T, V>(t, gamma, affine_offset, gm);
    load_affine<T, V>(t, beta, affine_offset, bt);
    ELR_UNROLL
    for (int j = 0; j < V; ++j) x[j] = activation((x[j] - mean) * rstd * (A(1) + gm[j]) + bt[j], t.act);
    store_acc<T, V>(out + offset, x);
  });
}

// The per-element backward quantities shared by the backward kernels: g = dout * act'(pre) and zhat.
template <typename A>
__device__ __forceinline__ void backward_element(A dout, A z, A gamma, A beta, A mean, A rstd, FdnActivation act,
                                                 A& g, A& zhat) {
  zhat = (z - mean) * rstd;
  g = act == FdnActivation::SiLU ? activation_grad(dout, zhat * (A(1) + gamma) + beta, act) : dout;
}

// grid (N*G, splits): partial sums of dzhat and dzhat * zhat -> partials[gi][split][2].
template <typename T, int V>
__global__ void __launch_bounds__(kThreads, kBlocksPerSm)
    fdn_backward_reduce_kernel(Tiling t, const T* __restrict__ dout, const T* __restrict__ z,
                               const T* __restrict__ gamma, const T* __restrict__ beta,
                               const acc_t<T>* __restrict__ mean, const acc_t<T>* __restrict__ rstd,
                               acc_t<T>* __restrict__ partials) {
  using A = acc_t<T>;
  const int64_t gi = blockIdx.x, n = div32(gi, t.G), g = mod32(gi, t.G);
  const A mu = mean[gi], rs = rstd[gi];
  const bool silu = t.act == FdnActivation::SiLU;
  A sum_dzhat = A(0), sum_dzhat_zhat = A(0);
  for_each_pack<V>(t, n, g, [&](int64_t offset, int64_t affine_offset) {
    A dy[V], x[V], gm[V], bt[V] = {};
    load_acc<T, V>(dout + offset, dy);
    load_acc<T, V>(z + offset, x);
    load_affine<T, V>(t, gamma, affine_offset, gm);
    if (silu) load_affine<T, V>(t, beta, affine_offset, bt);
    ELR_UNROLL
    for (int j = 0; j < V; ++j) {
      A grad, zhat;
      backward_element(dy[j], x[j], gm[j], bt[j], mu, rs, t.act, grad, zhat);
      const A dzhat = grad * (A(1) + gm[j]);
      sum_dzhat += dzhat;
      sum_dzhat_zhat += dzhat * zhat;
    }
  });
  block_sum2(sum_dzhat, sum_dzhat_zhat);
  if (threadIdx.x == 0) {
    partials[(gi * t.splits + blockIdx.y) * 2] = sum_dzhat;
    partials[(gi * t.splits + blockIdx.y) * 2 + 1] = sum_dzhat_zhat;
  }
}

// grid (N*G, splits): dz (when non-null; needs the reduce kernel's partials) and full-size
// dgamma/dbeta (when non-null; nullptr when gamma/beta are broadcast).
template <typename T, int V>
__global__ void __launch_bounds__(kThreads, kBlocksPerSm)
    fdn_backward_apply_kernel(Tiling t, const T* __restrict__ dout, const T* __restrict__ z,
                              const T* __restrict__ gamma, const T* __restrict__ beta,
                              const acc_t<T>* __restrict__ mean, const acc_t<T>* __restrict__ rstd,
                              const acc_t<T>* __restrict__ partials, T* __restrict__ dz, T* __restrict__ dgamma,
                              T* __restrict__ dbeta) {
  using A = acc_t<T>;
  const int64_t gi = blockIdx.x, n = div32(gi, t.G), g = mod32(gi, t.G);
  const A mu = mean[gi], rs = rstd[gi];
  const bool silu = t.act == FdnActivation::SiLU;
  A mean_dzhat = A(0), mean_dzhat_zhat = A(0);
  if (dz != nullptr) group_grad_means(t, partials, gi, mean_dzhat, mean_dzhat_zhat);  // uniform branch
  for_each_pack<V>(t, n, g, [&](int64_t offset, int64_t affine_offset) {
    A dy[V], x[V], gm[V], bt[V] = {};
    load_acc<T, V>(dout + offset, dy);
    load_acc<T, V>(z + offset, x);
    load_affine<T, V>(t, gamma, affine_offset, gm);
    if (silu) load_affine<T, V>(t, beta, affine_offset, bt);
    A out_dz[V], out_dgamma[V], out_dbeta[V];
    ELR_UNROLL
    for (int j = 0; j < V; ++j) {
      A grad, zhat;
      backward_element(dy[j], x[j], gm[j], bt[j], mu, rs, t.act, grad, zhat);
      out_dz[j] = rs * (grad * (A(1) + gm[j]) - mean_dzhat - zhat * mean_dzhat_zhat);
      out_dgamma[j] = grad * zhat;
      out_dbeta[j] = grad;
    }
    if (dz != nullptr) store_acc<T, V>(dz + offset, out_dz);
    if (dgamma != nullptr) store_acc<T, V>(dgamma + offset, out_dgamma);
    if (dbeta != nullptr) store_acc<T, V>(dbeta + offset, out_dbeta);
  });
}

// Broadcast gamma/beta, NCHW. grid (N*C): block `row` = n * C + c sums its contiguous HW pixels.
template <typename T, int V>
__global__ void __launch_bounds__(kThreads, kBlocksPerSm)
    fdn_backward_affine_rows_kernel(Tiling t, const T* __restrict__ dout, const T* __restrict__ z,
                                    const T* __restrict__ gamma, const T* __restrict__ beta,
                                    const acc_t<T>* __restrict__ mean, const acc_t<T>* __restrict__ rstd,
                                    T* __restrict__ dgamma, T* __restrict__ dbeta) {
  using A = acc_t<T>;
  const int64_t row = blockIdx.x, n = div32(row, t.C), c = mod32(row, t.C);
  const int64_t gi = n * t.G + div32(c, t.cpg);
  const A mu = mean[gi], rs = rstd[gi];
  const A gm = to_acc(gamma[row]);
  const A bt = t.act == FdnActivation::SiLU ? to_acc(beta[row]) : A(0);
  A sum_g = A(0), sum_g_zhat = A(0);
  for (int64_t p = threadIdx.x; p < t.HW / V; p += blockDim.x) {
    A dy[V], x[V];
    load_acc<T, V>(dout + row * t.HW + p * V, dy);
    load_acc<T, V>(z + row * t.HW + p * V, x);
    ELR_UNROLL
    for (int j = 0; j < V; ++j) {
      A grad, zhat;
      backward_element(dy[j], x[j], gm, bt, mu, rs, t.act, grad, zhat);
      sum_g += grad;
      sum_g_zhat += grad * zhat;
    }
  }
  block_sum2(sum_g, sum_g_zhat);
  if (threadIdx.x == 0) {
    if (dgamma != nullptr) dgamma[row] = from_acc<T>(sum_g_zhat);
    if (dbeta != nullptr) dbeta[row] = from_acc<T>(sum_g);
  }
}

// Broadcast gamma/beta, NHWC. block (kColTile, kColRows), grid (N * ceil(C / kColTile), splits):
// lane x owns channel tile * kColTile + x (coalesced across the warp), warp y every kColRows-th
// pixel of this block's range. One split writes dgamma/dbeta directly, several write
// partials[n][split][c][2] for the finalize kernel.
template <typename T>
__global__ void __launch_bounds__(kThreads, kBlocksPerSm)
    fdn_backward_affine_cols_kernel(Tiling t, int64_t rows_per_block, const T* __restrict__ dout,
                                    const T* __restrict__ z, const T* __restrict__ gamma,
                                    const T* __restrict__ beta, const acc_t<T>* __restrict__ mean,
                                    const acc_t<T>* __restrict__ rstd, acc_t<T>* __restrict__ partials,
                                    T* __restrict__ dgamma, T* __restrict__ dbeta) {
  using A = acc_t<T>;
  __shared__ A slots[2][kColRows][kColTile];
  const int64_t tiles = ceil_div(t.C, kColTile);
  const int64_t n = div32(blockIdx.x, tiles), c = mod32(blockIdx.x, tiles) * kColTile + threadIdx.x;
  const bool valid = c < t.C;
  A sum_g = A(0), sum_g_zhat = A(0);
  if (valid) {
    const int64_t gi = n * t.G + div32(c, t.cpg);
    const A mu = mean[gi], rs = rstd[gi];
    const A gm = to_acc(gamma[n * t.C + c]);
    const A bt = t.act == FdnActivation::SiLU ? to_acc(beta[n * t.C + c]) : A(0);
    const int64_t hw_end = min64(t.HW, (int64_t(blockIdx.y) + 1) * rows_per_block);
    for (int64_t hw = int64_t(blockIdx.y) * rows_per_block + threadIdx.y; hw < hw_end; hw += blockDim.y) {
      const int64_t offset = (n * t.HW + hw) * t.C + c;
      A grad, zhat;
      backward_element(to_acc(dout[offset]), to_acc(z[offset]), gm, bt, mu, rs, t.act, grad, zhat);
      sum_g += grad;
      sum_g_zhat += grad * zhat;
    }
  }
  slots[0][threadIdx.y][threadIdx.x] = sum_g;
  slots[1][threadIdx.y][threadIdx.x] = sum_g_zhat;
  __syncthreads();
  if (threadIdx.y == 0 && valid) {
    for (unsigned r = 1; r < blockDim.y; ++r) {
      sum_g += slots[0][r][threadIdx.x];
      sum_g_zhat += slots[1][r][threadIdx.x];
    }
    if (gridDim.y == 1) {
      if (dgamma != nullptr) dgamma[n * t.C + c] = from_acc<T>(sum_g_zhat);
      if (dbeta != nullptr) dbeta[n * t.C + c] = from_acc<T>(sum_g);
    } else {
      A* p = partials + ((n * gridDim.y + blockIdx.y) * t.C + c) * 2;
      p[0] = sum_g;
      p[1] = sum_g_zhat;
    }
  }
}

// Sums the column kernel's partials over its splits, in order: one thread per (n, c).
template <typename T>
__global__ void __launch_bounds__(kThreads, kBlocksPerSm)
    fdn_backward_affine_cols_finalize_kernel(int64_t N, int64_t C, int64_t splits,
                                             const acc_t<T>* __restrict__ partials, T* __restrict__ dgamma,
                                             T* __restrict__ dbeta) {
  using A = acc_t<T>;
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= N * C) return;
  const int64_t n = div32(i, C), c = mod32(i, C);
  A sum_g = A(0), sum_g_zhat = A(0);
  for (int64_t s = 0; s < splits; ++s) {
    sum_g += partials[((n * splits + s) * C + c) * 2];
    sum_g_zhat += partials[((n * splits + s) * C + c) * 2 + 1];
  }
  if (dgamma != nullptr) dgamma[i] = from_acc<T>(sum_g_zhat);
  if (dbeta != nullptr) dbeta[i] = from_acc<T>(sum_g);
}

#ifndef ELR_EXT_NVRTC
// ---- Host side: launch geometry -----------------------------------------------------------------
// Upper bound of the blocks per group, independent of the device and of V (sizes the workspace).
inline int64_t max_group_splits(const FdnShape& s) {
  return max64(1, min64(kMaxSplits, ceil_div(s.group_size(), kMinElemsPerBlock)));
}

inline Tiling make_tiling(const FdnShape& s, int vec, int sm_count) {
  Tiling t;
  t.N = s.N;
  t.C = s.C;
  t.HW = s.HW;
  t.G = s.G;
  t.cpg = s.channels_per_group();
  t.gsize = s.group_size();
  t.layout = s.layout;
  t.broadcast = s.affine_broadcast;
  t.act = s.act;
  t.eps = s.eps;
  const int64_t wanted = ceil_div(kBlocksPerSm * sm_count, s.N * s.G);
  const int64_t splits = max64(1, min64(wanted, max_group_splits(s)));
  const int64_t packs = t.gsize / vec;
  t.chunk = ceil_div(packs, splits);
  t.splits = ceil_div(packs, t.chunk);  // no empty block
  return t;
}

// Broadcast dgamma/dbeta in NHWC: pixel-range splits per (n, channel tile).
inline int64_t max_col_splits(const FdnShape& s) {
  return max64(1, min64(kMaxSplits, ceil_div(s.HW, kMinRowsPerBlock)));
}
inline bool uses_col_kernel(const FdnShape& s) { return s.affine_broadcast && s.layout == FdnLayout::NHWC; }

// 128-bit packs when no pack straddles a pixel (NHWC) or a broadcast channel (NCHW) and every
// pointer is 16-byte aligned.
template <typename T>
int pick_vec(const FdnShape& s, std::initializer_list<const void*> pointers) {
  constexpr int64_t V = kVec<T>;
  bool ok = s.layout == FdnLayout::NCHW ? (s.affine_broadcast ? s.HW : s.group_size()) % V == 0
                                         : s.channels_per_group() % V == 0;
  for (const void* p : pointers) ok = ok && reinterpret_cast<uintptr_t>(p) % 16 == 0;
  return ok ? int(V) : 1;
}

template <typename T, int V>
void launch_forward(const FdnShape& s, const T* z, const T* gamma, const T* beta, T* out, acc_t<T>* mean,
                    acc_t<T>* rstd, void* workspace, cudaStream_t stream) {
  const Tiling t = make_tiling(s, V, device_sm_count());
  auto* partials = static_cast<acc_t<T>*>(workspace);
  const dim3 grid(unsigned(s.N * s.G), unsigned(t.splits));
  const auto stats = &fdn_stats_kernel<T, V>;
  ELR_LAUNCH(stats, grid, dim3(kThreads), 0, stream, t, z, partials);
  const auto apply = &fdn_forward_apply_kernel<T, V>;
  ELR_LAUNCH(apply, grid, dim3(kThreads), 0, stream, t, z, gamma, beta, partials, out, mean, rstd);
}

template <typename T, int V>
void launch_backward(const FdnShape& s, const T* dout, const T* z, const T* gamma, const T* beta,
                     const acc_t<T>* mean, const acc_t<T>* rstd, T* dz, T* dgamma, T* dbeta, void* workspace,
                     cudaStream_t stream) {
  using A = acc_t<T>;
  const int sms = device_sm_count();
  const Tiling t = make_tiling(s, V, sms);
  auto* group_partials = static_cast<A*>(workspace);
  auto* col_partials = reinterpret_cast<A*>(static_cast<unsigned char*>(workspace) +
                                            align256(size_t(s.N * s.G * max_group_splits(s) * 2) * sizeof(A)));
  const dim3 grid(unsigned(s.N * s.G), unsigned(t.splits));
  T* dgamma_full = s.affine_broadcast ? nullptr : dgamma;
  T* dbeta_full = s.affine_broadcast ? nullptr : dbeta;
  if (dz != nullptr) {
    const auto reduce = &fdn_backward_reduce_kernel<T, V>;
    ELR_LAUNCH(reduce, grid, dim3(kThreads), 0, stream, t, dout, z, gamma, beta, mean, rstd, group_partials);
  }
  if (dz != nullptr || dgamma_full != nullptr || dbeta_full != nullptr) {
    const auto apply = &fdn_backward_apply_kernel<T, V>;
    ELR_LAUNCH(apply, grid, dim3(kThreads), 0, stream, t, dout, z, gamma, beta, mean, rstd,
               static_cast<const A*>(group_partials), dz, dgamma_full, dbeta_full);
  }
  if (!s.affine_broadcast || (dgamma == nullptr && dbeta == nullptr)) return;
  if (s.layout == FdnLayout::NCHW) {
    const auto rows = &fdn_backward_affine_rows_kernel<T, V>;
    ELR_LAUNCH(rows, dim3(unsigned(s.N * s.C)), dim3(kThreads), 0, stream, t, dout, z, gamma, beta, mean, rstd,
               dgamma, dbeta);
    return;
  }
  const int64_t tiles = ceil_div(s.C, kColTile);
  const int64_t wanted = ceil_div(kBlocksPerSm * sms, s.N * tiles);
  const int64_t rows_per_block = ceil_div(s.HW, max64(1, min64(wanted, max_col_splits(s))));
  const int64_t splits = ceil_div(s.HW, rows_per_block);
  const auto cols = &fdn_backward_affine_cols_kernel<T>;
  ELR_LAUNCH(cols, dim3(unsigned(s.N * tiles), unsigned(splits)), dim3(kColTile, kColRows), 0, stream, t,
             rows_per_block, dout, z, gamma, beta, mean, rstd, col_partials, dgamma, dbeta);
  if (splits > 1) {
    const auto finalize = &fdn_backward_affine_cols_finalize_kernel<T>;
    ELR_LAUNCH(finalize, dim3(unsigned(ceil_div(s.N * s.C, kThreads))), dim3(kThreads), 0, stream, s.N, s.C, splits,
               static_cast<const A*>(col_partials), dgamma, dbeta);
  }
}

#endif  // !ELR_EXT_NVRTC

}  // namespace fdn_detail

#ifndef ELR_EXT_NVRTC
// ---- API definitions ----------------------------------------------------------------------------
template <typename T>
size_t fdn_forward_workspace_bytes(const FdnShape& s) {
  return fdn_detail::align256(size_t(s.N * s.G * fdn_detail::max_group_splits(s) * 3) * sizeof(acc_t<T>));
}

template <typename T>
void fdn_forward_cuda(const FdnShape& s, const T* z, const T* gamma, const T* beta, T* out, acc_t<T>* mean,
                      acc_t<T>* rstd, void* workspace, cudaStream_t stream) {
  if (s.numel() == 0) return;
  if (fdn_detail::pick_vec<T>(s, {z, gamma, beta, out}) > 1) {
    fdn_detail::launch_forward<T, fdn_detail::kVec<T>>(s, z, gamma, beta, out, mean, rstd, workspace, stream);
  } else {
    fdn_detail::launch_forward<T, 1>(s, z, gamma, beta, out, mean, rstd, workspace, stream);
  }
}

template <typename T>
size_t fdn_backward_workspace_bytes(const FdnShape& s) {
  using fdn_detail::align256;
  size_t bytes = align256(size_t(s.N * s.G * fdn_detail::max_group_splits(s) * 2) * sizeof(acc_t<T>));
  if (fdn_detail::uses_col_kernel(s)) {
    bytes += align256(size_t(s.N * fdn_detail::max_col_splits(s) * s.C * 2) * sizeof(acc_t<T>));
  }
  return bytes;
}

template <typename T>
void fdn_backward_cuda(const FdnShape& s, const T* dout, const T* z, const T* gamma, const T* beta,
                       const acc_t<T>* mean, const acc_t<T>* rstd, T* dz, T* dgamma, T* dbeta, void* workspace,
                       cudaStream_t stream) {
  if (s.numel() == 0 || (dz == nullptr && dgamma == nullptr && dbeta == nullptr)) return;
  if (fdn_detail::pick_vec<T>(s, {dout, z, gamma, beta, dz, dgamma, dbeta}) > 1) {
    fdn_detail::launch_backward<T, fdn_detail::kVec<T>>(s, dout, z, gamma, beta, mean, rstd, dz, dgamma, dbeta,
                                                        workspace, stream);
  } else {
    fdn_detail::launch_backward<T, 1>(s, dout, z, gamma, beta, mean, rstd, dz, dgamma, dbeta, workspace, stream);
  }
}

// ---- Explicit instantiations: compiled once, in csrc/kernels/fdn.cu ----------------------------
#define ELR_FDN_INSTANTIATIONS(PREFIX, T)                                                                      \
  PREFIX template size_t fdn_forward_workspace_bytes<T>(const FdnShape&);                                       \
  PREFIX template void fdn_forward_cuda<T>(const FdnShape&, const T*, const T*, const T*, T*, acc_t<T>*,        \
                                           acc_t<T>*, void*, cudaStream_t);                                     \
  PREFIX template size_t fdn_backward_workspace_bytes<T>(const FdnShape&);                                      \
  PREFIX template void fdn_backward_cuda<T>(const FdnShape&, const T*, const T*, const T*, const T*,            \
                                            const acc_t<T>*, const acc_t<T>*, T*, T*, T*, void*, cudaStream_t);
#define ELR_FDN_FOR_EACH_DTYPE(PREFIX)           \
  ELR_FDN_INSTANTIATIONS(PREFIX, float)         \
  ELR_FDN_INSTANTIATIONS(PREFIX, double)        \
  ELR_FDN_INSTANTIATIONS(PREFIX, __half)        \
  ELR_FDN_INSTANTIATIONS(PREFIX, __nv_bfloat16)

#if !defined(ELR_CUDA_SIM) && !defined(ELR_FDN_INSTANTIATE)
ELR_FDN_FOR_EACH_DTYPE(extern)
#endif
#endif  // !ELR_EXT_NVRTC

}  // namespace elr
