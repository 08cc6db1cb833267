// Kronecker LoRA GEMM (eq. 9) and kron_delta for CUDA tensors: checks, output/workspace allocation,
// the base product through cuBLAS, and the choice between the fused kernels and the batched-GEMM
// path of csrc/kernels/kron_lora.cuh. Implements the elr_ext_native::kron_lora_forward /
// kron_lora_backward / kron_delta / kron_delta_backward schemas of csrc/ops.cpp.
//
// The base product and the Kronecker term accumulate into one output: y = addmm(bias, x, W^T) (or
// bias alone, or nothing) and then the kernels add scale * x dW^T into y in place; dx the same way
// from grad_y W. dW itself is never built on this path.
//
// The weight gradients dU = scale * smat^T dy, dV = dt^T x (both paths) and, on the GEMM path,
// dA are long-K GEMMs with small outputs: cuBLAS runs them here on views of the rank-space
// intermediates, for fp16/bf16 with fp32 accumulation and an fp32 result that is scaled and
// rounded once (mm with out_dtype = float32: even a split-K reduction stays in fp32). cuBLAS gives
// the same bits for the same shapes, stream and device run after run, so the backward stays
// deterministic.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <torch/library.h>

#include <array>
#include <optional>
#include <tuple>

#include "aten_wrapper_util.h"
#include "cuda/cuda_type.h"
#include "kernels/kron_lora.cuh"
#include "kron_lora_args.h"

namespace elr {
namespace {

// The CUDA-only check; shapes, dtypes and devices are checked in kron_lora_args.h. Every dtype
// runs on every architecture the extension is built for (bf16 needs only cuda_bf16.h's
// conversions, which it provides from sm_70 on; the kernels do no bf16 arithmetic).
void check_cuda_input(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK(t.is_cuda(), op, ": ", name, " must be a CUDA tensor, got ", t.device());
}

// The fused kernels' tiling depends on the SM count (kron_lora.cuh: make_fused_plan); ATen caches
// the device properties, so this is a lookup.
int sm_count() { return at::cuda::getCurrentDeviceProperties()->multiProcessorCount; }

at::Tensor workspace(size_t bytes, const at::Tensor& like) {
  return at::empty({static_cast<int64_t>(bytes)}, like.options().dtype(at::kByte));
}

// U_cat [T*r, b1] with U_cat[t*r + s, k] = U[t, k, s] (a small copy), V_cat [T*r, b2] (a view).
at::Tensor u_cat(const at::Tensor& U, const KronShape& s) {
  return U.permute({0, 2, 1}).contiguous().view({s.rank_cols(), s.b1});
}
at::Tensor v_cat(const at::Tensor& V, const KronShape& s) { return V.view({s.rank_cols(), s.b2}); }

// a @ b with fp32 accumulation and an fp32 result for fp16/bf16 (the accumulation dtype of the
// kernels); in the inputs' dtype otherwise.
at::Tensor mm_acc(const at::Tensor& a, const at::Tensor& b) {
  const auto acc = accumulation_dtype(a.scalar_type());
  return acc != a.scalar_type() ? at::mm(a, b, acc) : at::mm(a, b);
}
at::Tensor bmm_acc(const at::Tensor& a, const at::Tensor& b) {
  const auto acc = accumulation_dtype(a.scalar_type());
  return acc != a.scalar_type() ? at::bmm(a, b, acc) : at::bmm(a, b);
}

// dU[t, k, s] = scale * sum_rows smat[row, t*r + s] dy[row, k]: [T*r, b1] = smat^T dy, then the
// (small) transpose into U's layout. smat2 [M*a1, T*r], gy2 [M*a1, b1].
void grad_U(const KronShape& s, const at::Tensor& smat2, const at::Tensor& gy2, double scale, at::Tensor& dU) {
  at::Tensor duc = mm_acc(smat2.t(), gy2);
  duc.mul_(scale);
  dU.copy_(duc.view({s.T, s.r, s.b1}).permute({0, 2, 1}));
}

// dV[t, s, q] = sum_rows dt[row, t*r + s] x[row, q]: [T*r, b2] = dt^T x is V's layout already.
// dt2 [M*a2, T*r], x2 [M*a2, b2].
void grad_V(const KronShape& s, const at::Tensor& dt2, const at::Tensor& x2, at::Tensor& dV) {
  at::Tensor dv2 = dV.view({s.rank_cols(), s.b2});
  if (accumulation_dtype(dt2.scalar_type()) != dt2.scalar_type()) {
    dv2.copy_(mm_acc(dt2.t(), x2));
  } else {
    at::mm_out(dv2, dt2.t(), x2);
  }
}

// ---- Batched-GEMM path (factors too large for the fused kernels) -----------------------------------
// y [M, d_out] viewed [M*a1, b1] gets scale * smat U_cat (added when accumulate). Returns (tmat, smat)
// as [M*a2, T*r] / [M*a1, T*r].
template <typename T>
std::tuple<at::Tensor, at::Tensor> gemm_forward(const KronShape& s, const at::Tensor& x, const at::Tensor& A,
                                                const at::Tensor& U, const at::Tensor& V, at::Tensor& y,
                                                bool accumulate, double scale, cudaStream_t stream) {
  const int64_t R = s.rank_cols();
  const at::Tensor tmat = at::mm(x.view({s.M * s.a2, s.b2}), v_cat(V, s).t()).contiguous();
  at::Tensor smat = at::empty({s.M * s.a1, R}, x.options());
  kron_mix_forward_cuda<T>(s, cptr<T>(A), cptr<T>(tmat), mptr<T>(smat), stream);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  at::Tensor y2 = y.view({s.M * s.a1, s.b1});
  // beta = 0: y's uninitialised contents are ignored, not multiplied.
  at::addmm_out(y2, y2, smat, u_cat(U, s), /*beta=*/accumulate ? 1 : 0, /*alpha=*/scale);
  return {tmat, smat};
}

template <typename T>
void gemm_backward(const KronShape& s, const at::Tensor& gy, const at::Tensor& x, const at::Tensor& A,
                   const at::Tensor& U, const at::Tensor& V, const at::Tensor& tmat_in, const at::Tensor& smat_in,
                   double scale, at::Tensor& dx, bool accumulate_dx, at::Tensor& dA, at::Tensor& dU, at::Tensor& dV,
                   cudaStream_t stream) {
  const int64_t R = s.rank_cols();
  const at::Tensor x2 = x.view({s.M * s.a2, s.b2});
  const at::Tensor gy2 = gy.view({s.M * s.a1, s.b1});
  const at::Tensor uc = u_cat(U, s), vc = v_cat(V, s);
  const bool has_t = kron_has_intermediate(tmat_in), has_s = kron_has_intermediate(smat_in);
  const bool need_t = dA.defined() || (dU.defined() && !has_s);
  at::Tensor tmat, smat;
  if (need_t) tmat = has_t ? tmat_in.contiguous().view({s.M * s.a2, R}) : at::mm(x2, vc.t()).contiguous();
  if (dU.defined()) {
    if (has_s) {
      smat = smat_in.contiguous().view({s.M * s.a1, R});
    } else {
      smat = at::empty({s.M * s.a1, R}, x.options());
      kron_mix_forward_cuda<T>(s, cptr<T>(A), cptr<T>(tmat), mptr<T>(smat), stream);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  }
  at::Tensor ds = at::empty({s.M * s.a1, R}, x.options());
  at::addmm_out(ds, ds, gy2, uc.t(), /*beta=*/0, /*alpha=*/scale);  // ds = scale * dy U_cat^T
  if (dA.defined()) {
    // dA[t, i, p] = sum_{m, s} ds[m, i, (t, s)] tmat[m, p, (t, s)]: per term a [a1, M*r] x [M*r, a2]
    // product. (m, s) is not one stride of ds / tmat, so both are copied term-major first: (a1 + a2)
    // * M * T*r elements, T*r / b of what the GEMMs around them read.
    const at::Tensor ds_t = ds.view({s.M, s.a1, s.T, s.r}).permute({2, 1, 0, 3}).reshape({s.T, s.a1, s.M * s.r});
    const at::Tensor tm_t = tmat.view({s.M, s.a2, s.T, s.r}).permute({2, 1, 0, 3}).reshape({s.T, s.a2, s.M * s.r});
    dA.copy_(bmm_acc(ds_t, tm_t.transpose(1, 2)));
  }
  if (dx.defined() || dV.defined()) {
    at::Tensor dt = at::empty({s.M * s.a2, R}, x.options());
    kron_mix_backward_cuda<T>(s, cptr<T>(A), cptr<T>(ds), mptr<T>(dt), stream);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (dx.defined()) {
      at::Tensor dx2 = dx.view({s.M * s.a2, s.b2});
      at::addmm_out(dx2, dx2, dt, vc, /*beta=*/accumulate_dx ? 1 : 0, /*alpha=*/1);
    }
    if (dV.defined()) grad_V(s, dt, x2, dV);
  }
  if (dU.defined()) grad_U(s, smat, gy2, scale, dU);
}

// The fused backward: the kernel writes dx, dA and the rank-space intermediates the weight
// gradients need (dt; smat when none was saved), cuBLAS does the two weight-gradient GEMMs.
template <typename T>
void fused_backward(const KronShape& s, const at::Tensor& gy, const at::Tensor& x, const at::Tensor& A,
                    const at::Tensor& U, const at::Tensor& V, const at::Tensor& tmat, const at::Tensor& smat,
                    double scale, at::Tensor& dx, bool accumulate_dx, at::Tensor& dA, at::Tensor& dU, at::Tensor& dV,
                    cudaStream_t stream) {
  const int64_t R = s.rank_cols();
  const int sms = sm_count();
  const at::Tensor smat_out =
      dU.defined() && !smat.defined() ? at::empty({s.M * s.a1, R}, x.options()) : at::Tensor();
  const at::Tensor dt = dV.defined() ? at::empty({s.M * s.a2, R}, x.options()) : at::Tensor();
  const at::Tensor ws = workspace(dA.defined() ? kron_lora_backward_fused_workspace_bytes<T>(s, sms) : 0, x);
  kron_lora_backward_fused_cuda<T>(s, cptr<T>(gy), cptr<T>(x), cptr<T>(A), cptr<T>(U), cptr<T>(V), cptr<T>(tmat),
                                   scale, mptr<T>(dx), accumulate_dx, mptr<T>(dA), mptr<T>(smat_out), mptr<T>(dt),
                                   ws.mutable_data_ptr(), sms, stream);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (dU.defined()) {
    const at::Tensor sm = smat.defined() ? smat.view({s.M * s.a1, R}) : smat_out;
    grad_U(s, sm, gy.view({s.M * s.a1, s.b1}), scale, dU);
  }
  if (dV.defined()) grad_V(s, dt, x.view({s.M * s.a2, s.b2}), dV);
}

// ---- Ops ----------------------------------------------------------------------------------------------
std::tuple<at::Tensor, at::Tensor, at::Tensor> kron_lora_forward_cuda_op(
    const at::Tensor& x_in, const at::Tensor& A_in, const at::Tensor& U_in, const at::Tensor& V_in,
    const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias, double scale,
    bool save_intermediates) {
  check_cuda_input("kron_lora_forward", "x", x_in);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const KronForwardInputs in = kron_forward_inputs(x_in, A_in, U_in, V_in, weight, bias);
  const KronShape& s = in.s;
  const at::Tensor &x = in.x, &A = in.A, &U = in.U, &V = in.V;

  // The base product first (cuBLAS); the Kronecker term is then added onto it in place.
  KronForwardOutputs out = kron_forward_outputs(s, x, weight, bias, save_intermediates);
  at::Tensor &y = out.y, &tmat = out.tmat, &smat = out.smat;
  const bool accumulate = out.accumulate;
  if (s.M == 0) return {y, tmat, smat};
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "kron_lora_forward_cuda", [&] {
    using T = typename CudaType<scalar_t>::type;
    if (kron_fused_supported<T>(s)) {
      kron_lora_forward_fused_cuda<T>(s, cptr<T>(x), cptr<T>(A), cptr<T>(U), cptr<T>(V), mptr<T>(y), accumulate,
                                      scale, mptr<T>(tmat), mptr<T>(smat), sm_count(), stream);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    } else {
      auto [t, sm] = gemm_forward<T>(s, x, A, U, V, y, accumulate, scale, stream);
      if (save_intermediates) {
        tmat = t.view({s.M, s.a2, s.rank_cols()});
        smat = sm.view({s.M, s.a1, s.rank_cols()});
      }
    }
  });
  return {y, tmat, smat};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> kron_lora_backward_cuda_op(
    const at::Tensor& grad_y_in, const at::Tensor& x_in, const at::Tensor& A_in, const at::Tensor& U_in,
    const at::Tensor& V_in, const at::Tensor& tmat_in, const at::Tensor& smat_in,
    const std::optional<at::Tensor>& weight, double scale, std::array<bool, 6> output_mask) {
  check_cuda_input("kron_lora_backward", "x", x_in);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const KronBackwardInputs in = kron_backward_inputs(grad_y_in, x_in, A_in, U_in, V_in, tmat_in, smat_in, weight);
  const KronShape& s = in.s;
  const at::Tensor &gy = in.grad_y, &x = in.x, &A = in.A, &U = in.U, &V = in.V;
  // dx starts as the base gradient; the Kronecker part is added in place.
  KronBackwardOutputs g = kron_backward_outputs(s, gy, x, weight, output_mask);
  at::Tensor &dx = g.dx, &dA = g.dA, &dU = g.dU, &dV = g.dV, &dweight = g.dweight, &dbias = g.dbias;
  const bool accumulate_dx = g.accumulate_dx;
  if (s.M == 0) {  // sums over no tokens
    for (at::Tensor* t : {&dA, &dU, &dV}) {
      if (t->defined()) t->zero_();
    }
    return {dx, dA, dU, dV, dweight, dbias};
  }
  if (!dx.defined() && !dA.defined() && !dU.defined() && !dV.defined()) return {dx, dA, dU, dV, dweight, dbias};
  const at::Tensor tmat = kron_saved_intermediate(tmat_in), smat = kron_saved_intermediate(smat_in);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "kron_lora_backward_cuda", [&] {
    using T = typename CudaType<scalar_t>::type;
    if (kron_fused_supported<T>(s)) {
      fused_backward<T>(s, gy, x, A, U, V, tmat, smat, scale, dx, accumulate_dx, dA, dU, dV, stream);
    } else {
      gemm_backward<T>(s, gy, x, A, U, V, tmat, smat, scale, dx, accumulate_dx, dA, dU, dV, stream);
    }
  });
  return {dx, dA, dU, dV, dweight, dbias};
}

at::Tensor kron_delta_cuda_op(const at::Tensor& A_in, const at::Tensor& U_in, const at::Tensor& V_in) {
  constexpr const char* op = "kron_delta";
  check_cuda_input(op, "A", A_in);
  const KronShape s = kron_make_factor_shape(op, A_in, U_in, V_in);
  const c10::cuda::CUDAGuard guard(A_in.device());
  const at::Tensor A = A_in.contiguous(), U = U_in.contiguous(), V = V_in.contiguous();
  at::Tensor dW = at::empty({s.d_out(), s.d_in()}, A.options());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, A.scalar_type(), "kron_delta_cuda", [&] {
    using T = typename CudaType<scalar_t>::type;
    const at::Tensor ws = workspace(kron_delta_workspace_bytes<T>(s), A);
    kron_delta_cuda<T>(s, cptr<T>(A), cptr<T>(U), cptr<T>(V), mptr<T>(dW), ws.mutable_data_ptr(), stream);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return dW;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> kron_delta_backward_cuda_op(const at::Tensor& grad_in,
                                                                          const at::Tensor& A_in,
                                                                          const at::Tensor& U_in,
                                                                          const at::Tensor& V_in,
                                                                          std::array<bool, 3> output_mask) {
  constexpr const char* op = "kron_delta_backward";
  check_cuda_input(op, "A", A_in);
  const KronShape s = kron_make_factor_shape(op, A_in, U_in, V_in);
  kron_check_delta_grad(op, s, grad_in, A_in);
  const c10::cuda::CUDAGuard guard(A_in.device());
  const at::Tensor grad = grad_in.contiguous();
  const at::Tensor A = A_in.contiguous(), U = U_in.contiguous(), V = V_in.contiguous();
  KronDeltaGrads g = kron_delta_grad_outputs(s, A, output_mask);
  at::Tensor &dA = g.dA, &dU = g.dU, &dV = g.dV;
  if (!g.any()) return {dA, dU, dV};
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, A.scalar_type(), "kron_delta_backward_cuda", [&] {
    using T = typename CudaType<scalar_t>::type;
    const at::Tensor ws = workspace(kron_delta_backward_workspace_bytes<T>(s), A);
    kron_delta_backward_cuda<T>(s, cptr<T>(grad), cptr<T>(A), cptr<T>(U), cptr<T>(V), mptr<T>(dA), mptr<T>(dU),
                                mptr<T>(dV), ws.mutable_data_ptr(), stream);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {dA, dU, dV};
}

}  // namespace
}  // namespace elr

TORCH_LIBRARY_IMPL(elr_ext_native, CUDA, m) {
  m.impl("kron_lora_forward", &elr::kron_lora_forward_cuda_op);
  m.impl("kron_lora_backward", &elr::kron_lora_backward_cuda_op);
  m.impl("kron_delta", &elr::kron_delta_cuda_op);
  m.impl("kron_delta_backward", &elr::kron_delta_backward_cuda_op);
}
