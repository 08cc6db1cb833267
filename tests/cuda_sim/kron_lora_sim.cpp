// The Kronecker LoRA CUDA kernels (csrc/kernels/kron_lora.cuh) built for the CPU through cuda_sim.h,
// behind a C ABI for ctypes (tests/cuda_sim/build.py, tests/test_kron_lora_cuda_sim.py,
// tests/test_cuda_launch_plans.py).
//
// `shape` points to 7 int64: M, T, a1, a2, b1, b2, r (kron_lora_common.h; the kron_delta entry
// points ignore M). Every tensor argument is the raw data pointer of a contiguous buffer in the dtype
// named by `dtype` (0 float32, 1 float64, 2 float16, 3 bfloat16: torch tensors as they are, no
// conversion). Optional inputs and outputs may be NULL, as in the launchers. Returns 0, -1 for an
// unknown dtype, -2 when the fused entry points get a shape the fused path does not support.
// Workspaces are allocated here with the *_workspace_bytes helpers and poisoned with NaN bytes, so
// a kernel that reads partials it did not write shows it. The launching entry points tile for the
// simulated device's SM count (elr_cuda_sim_set_sm_count), as the ATen wrapper does for the GPU's;
// the planning entry points take the SM count as an argument and launch nothing.
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

// ---- Shared-memory bank conflicts of the fused kernels ------------------------------------------
// The degree of a warp-wide access: the largest number of distinct 4-byte words that fall in one of
// the 32 banks (1: conflict-free; lanes reading the same word are one broadcast). Each pattern
// below walks the lanes of every warp through the kernel's own lane -> element mapping and asks the
// header's index helpers (tile_index, a_index, grad_a_coord, small_k_col_groups) for the word.
namespace bank {

constexpr int kBanks = 32;
using elr::kron_detail::FusedPlan;
using elr::kron_detail::kThreads;
using elr::kron_detail::kTM;
using elr::kron_detail::kTN;

struct Warp {
  int64_t words[32];
  int n = 0;
  void add(int64_t w) { words[n++] = w; }
  int degree() const {
    int worst = n > 0 ? 1 : 0;
    for (int b = 0; b < kBanks; ++b) {
      int distinct = 0;
      for (int l = 0; l < n; ++l) {
        if (words[l] % kBanks != b) continue;
        bool seen = false;
        for (int k = 0; k < l; ++k) seen = seen || words[k] == words[l];
        distinct += seen ? 0 : 1;
      }
      worst = distinct > worst ? distinct : worst;
    }
    return worst;
  }
};

// The worst degree over the warps of a loop `for (e = tid; e < n; e += kThreads)` (lanes of a warp
// hold consecutive e) and over the inner steps 0 .. steps-1: word(e, step) < 0 means that lane
// reads nothing.
template <typename Word>
int loop_degree(int n, int steps, Word word) {
  int worst = 0;
  for (int base = 0; base < n; base += 32) {
    for (int step = 0; step < steps; ++step) {
      Warp w;
      for (int e = base; e < base + 32 && e < n; ++e) {
        const int64_t x = word(e, step);
        if (x >= 0) w.add(x);
      }
      const int d = w.degree();
      worst = d > worst ? d : worst;
    }
  }
  return worst;
}

// out: [dA loop ds reads, dA loop tmat reads, mix forward A reads, mix forward tmat-tile reads,
//       mix backward A reads, mix backward ds-tile reads, small-K tile C reads, long-K tile stores]
void degrees(const elr::KronShape& s, const FusedPlan& pl, int64_t* out) {
  using namespace elr::kron_detail;
  const int a1 = int(s.a1), a2 = int(s.a2), r = int(s.r), R = int(s.T * s.r), rp = pl.rp;
  const int na = int(s.T) * a1 * a2;
  // Fused dA loop: step = (m, q).
  out[0] = loop_degree(na, pl.bm * r, [&](int e, int step) {
    const GradACoord c = grad_a_coord(s, e);
    return int64_t(tile_index(pl, (step / r) * a1 + c.i, c.t * r + step % r));
  });
  out[1] = loop_degree(na, pl.bm * r, [&](int e, int step) {
    const GradACoord c = grad_a_coord(s, e);
    return int64_t(tile_index(pl, (step / r) * a2 + c.p, c.t * r + step % r));
  });
  // Mixing forward (smat tile from the tmat tile): e = row * rp + j, step = p.
  auto fwd = [&](bool a_side) {
    return loop_degree(pl.rows_out * rp, a2, [&, a_side](int e, int p) -> int64_t {
      const int row = e / rp, j = e % rp;
      if (row >= pl.bm * a1 || j >= R) return -1;
      const int m = row / a1, i = row % a1, t = j / r;
      return a_side ? a_index(s, pl, t, i, p) : tile_index(pl, m * a2 + p, j);
    });
  };
  out[2] = fwd(true);
  out[3] = fwd(false);
  // Mixing backward (dt tile from the ds tile): e = row * rp + j, step = i.
  auto bwd = [&](bool a_side) {
    return loop_degree(pl.rows_in * rp, a1, [&, a_side](int e, int i) -> int64_t {
      const int row = e / rp, j = e % rp;
      if (row >= pl.bm * a2 || j >= R) return -1;
      const int m = row / a2, p = row % a2, t = j / r;
      return a_side ? a_index(s, pl, t, i, p) : tile_index(pl, m * a1 + i, j);
    });
  };
  out[4] = bwd(true);
  out[5] = bwd(false);
  // Small-K tile, C[(r0 + i) * ld + k] for thread tid < rg * cg, r0 = (tid / cg) * 4; over the
  // smat tile (forward) and the dt tile (backward), step = (i, k).
  int worst = 0;
  for (const int rows : {pl.rows_out, pl.rows_in}) {
    const int cg = small_k_col_groups(rows), active = (rows / kTM) * cg;
    const int d = loop_degree(kThreads, kTM * rp, [&](int tid, int step) -> int64_t {
      if (tid >= active) return -1;
      return tile_index(pl, (tid / cg) * kTM + step / rp, step % rp);
    });
    worst = d > worst ? d : worst;
  }
  out[6] = worst;
  // Long-K tile output stores out[(r0 + i) * ld + c0 + j]: thread tid is group tid % groups of
  // slice tid / groups, and slice sl's lanes store together; step = (sl, i, j).
  worst = 0;
  for (const int rows : {pl.rows_in, pl.rows_out}) {
    const int cg = rp / kTN, groups = (rows / kTM) * cg;
    const int ks = int(elr::cuda_common::min64(elr::kron_detail::kBK, kThreads / groups));
    const int d = loop_degree(kThreads, ks * kTM * kTN, [&](int tid, int step) -> int64_t {
      const int g = tid % groups, slice = tid / groups, sl = step / (kTM * kTN);
      if (slice >= ks || slice != sl) return -1;
      const int i = (step / kTN) % kTM, j = step % kTN;
      return tile_index(pl, (g / cg) * kTM + i, (g % cg) * kTN + j);
    });
    worst = d > worst ? d : worst;
  }
  out[7] = worst;
}

}  // namespace bank

extern "C" {

// The SM count the launching entry points below tile for (the simulated device's).
int elr_kron_sim_device_sm_count() { return elr::cuda_common::device_sm_count(); }

// plan[8]: fused supported (0/1), tokens per block, padded rank columns, tile row stride, A term
// stride, blocks, shared bytes, rows of the tmat tile.
int elr_kron_sim_plan(int dtype, const int64_t* shape, int sm_count, int64_t* plan) {
  const auto s = make_shape(shape);
  return dispatch(dtype, [&]<typename T>() {
    const auto p = elr::kron_detail::make_fused_plan<T>(s, sm_count);
    plan[0] = elr::kron_fused_supported<T>(s) ? 1 : 0;
    plan[1] = p.bm;
    plan[2] = p.rp;
    plan[3] = p.ld;
    plan[4] = p.a_ld;
    plan[5] = p.blocks;
    plan[6] = int64_t(p.smem_bytes);
    plan[7] = p.rows_in;
    return 0;
  });
}

// The number of kernels kron_grid knows (KronKernel::kCount), and the name of kernel k.
int elr_kron_sim_kernel_count() { return int(elr::KronKernel::kCount); }
const char* elr_kron_sim_kernel_name(int k) { return elr::kron_kernel_name(elr::KronKernel(k)); }

// grids[2 * k], grids[2 * k + 1]: blocks and dynamic shared bytes of kernel k for the shape on a
// device with sm_count SMs (kron_grid, the grids the launchers use).
int elr_kron_sim_grids(int dtype, const int64_t* shape, int sm_count, int64_t* grids) {
  const auto s = make_shape(shape);
  return dispatch(dtype, [&]<typename T>() {
    for (int k = 0; k < int(elr::KronKernel::kCount); ++k) {
      const elr::KronGrid g = elr::kron_grid<T>(elr::KronKernel(k), s, sm_count);
      grids[2 * k] = g.blocks;
      grids[2 * k + 1] = int64_t(g.smem_bytes);
    }
    return 0;
  });
}

// out[8]: the bank-conflict degrees of bank::degrees for the fused plan of the shape at sm_count
// SMs; unpadded != 0 evaluates the same patterns with the row stride rp and the A term stride
// a1*a2 (the layout without padding). Returns -2 when the shape has no fused plan, -3 for fp64
// (8-byte accumulators: the 4-byte bank model does not apply).
int elr_kron_sim_bank_conflicts(int dtype, const int64_t* shape, int sm_count, int unpadded, int64_t* out) {
  const auto s = make_shape(shape);
  return dispatch(dtype, [&]<typename T>() {
    if (sizeof(elr::acc_t<T>) != 4) return -3;
    auto p = elr::kron_detail::make_fused_plan<T>(s, sm_count);
    if (p.bm == 0) return -2;
    if (unpadded) {
      p.ld = p.rp;
      p.a_ld = int(s.a1 * s.a2);
    }
    bank::degrees(s, p, out);
    return 0;
  });
}

int elr_kron_sim_forward(int dtype, const int64_t* shape, const void* x, const void* A, const void* U, const void* V,
                         void* y, int accumulate, double scale, void* tmat, void* smat) {
  const auto s = make_shape(shape);
  return dispatch(dtype, [&]<typename T>() {
    if (!elr::kron_fused_supported<T>(s)) return -2;
    elr::kron_lora_forward_fused_cuda<T>(s, in<T>(x), in<T>(A), in<T>(U), in<T>(V), out<T>(y), accumulate != 0,
                                         scale, out<T>(tmat), out<T>(smat), elr::cuda_common::device_sm_count(),
                                         nullptr);
    return 0;
  });
}

// The fused backward kernel's outputs: dx, dA, and the intermediates of the weight-gradient GEMMs
// (smat_out [M*a1, T*r], dt_out [M*a2, T*r]) that the ATen wrapper hands to cuBLAS.
int elr_kron_sim_backward(int dtype, const int64_t* shape, const void* dy, const void* x, const void* A,
                          const void* U, const void* V, const void* tmat, double scale, void* dx, int accumulate_dx,
                          void* dA, void* smat_out, void* dt_out) {
  const auto s = make_shape(shape);
  return dispatch(dtype, [&]<typename T>() {
    if (!elr::kron_fused_supported<T>(s)) return -2;
    const int sms = elr::cuda_common::device_sm_count();
    auto ws = workspace(elr::kron_lora_backward_fused_workspace_bytes<T>(s, sms));
    elr::kron_lora_backward_fused_cuda<T>(s, in<T>(dy), in<T>(x), in<T>(A), in<T>(U), in<T>(V), in<T>(tmat), scale,
                                          out<T>(dx), accumulate_dx != 0, out<T>(dA), out<T>(smat_out),
                                          out<T>(dt_out), ws.data(), sms, nullptr);
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
