// Op schemas of the compiled kernels and the pybind11 module of the CPU extension (elr_ext._C).
//
// The schemas live in the `elr_ext_native` namespace; csrc/cpu/*.cpp and csrc/cuda/*.cu register
// their device implementations against them. The public ops (with fake kernels, autograd and the
// backend choice) are torch.library custom ops in elr_ext/ops/, which call these.
#include <torch/extension.h>
#include <torch/library.h>
#include <torch/version.h>

#include <string>

TORCH_LIBRARY(elr_ext_native, m) {
  // FDN, eq. 8. activation: 0 = none, 1 = silu. Returns (out, mean [N, G], rstd [N, G]).
  m.def("fdn_forward(Tensor z, Tensor gamma, Tensor beta, int num_groups, float eps, int activation)"
        " -> (Tensor, Tensor, Tensor)");
  // Returns (dz, dgamma, dbeta); an entry is undefined (None) when its output_mask entry is false.
  m.def("fdn_backward(Tensor grad_out, Tensor z, Tensor gamma, Tensor? beta, Tensor mean, Tensor rstd,"
        " int num_groups, int activation, bool[3] output_mask) -> (Tensor, Tensor, Tensor)");

  // Kronecker LoRA GEMM, eq. 9 (csrc/kernels/kron_lora_common.h has the math). x is [M, d_in].
  // Returns (y [M, d_out], tmat [M, a2, T*r], smat [M, a1, T*r]); tmat/smat are empty unless
  // save_intermediates (autograd saves them: rank-space, small next to x).
  m.def("kron_lora_forward(Tensor x, Tensor A, Tensor U, Tensor V, Tensor? weight, Tensor? bias, float scale,"
        " bool save_intermediates) -> (Tensor, Tensor, Tensor)");
  // Returns (dx, dA, dU, dV, dweight, dbias); undefined where output_mask is false.
  m.def("kron_lora_backward(Tensor grad_y, Tensor x, Tensor A, Tensor U, Tensor V, Tensor tmat, Tensor smat,"
        " Tensor? weight, float scale, bool[6] output_mask) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  // dW = sum_t A_t kron (U_t V_t), [a1*b1, a2*b2]: for conv weights, where building dW is cheap.
  m.def("kron_delta(Tensor A, Tensor U, Tensor V) -> Tensor");
  m.def("kron_delta_backward(Tensor grad, Tensor A, Tensor U, Tensor V, bool[3] output_mask)"
        " -> (Tensor, Tensor, Tensor)");

  // Fused low-rank projections, eq. 2 (docs/method.md; csrc/lowrank_proj_gemm.h has the GEMMs).
  // x [M, in]; downs[j] = B_j [r_j, in]; ups[j] = A_j [out_j, r_j]; biases[j] [out_j], or an empty
  // tensor for no bias. Returns ([y_j [M, out_j]], h = x [B_1; ...; B_K]^T [M, sum r_j]).
  m.def("lowrank_proj_forward(Tensor x, Tensor[] downs, Tensor[] ups, Tensor[] biases) -> (Tensor[], Tensor)");
  // Returns (dx [M, in], dB [sum r_j, in] (the downs' gradients stacked), [dA_j], [db_j]); an entry
  // whose flag is false is an empty tensor.
  m.def("lowrank_proj_backward(Tensor[] grad_ys, Tensor x, Tensor h, Tensor[] downs, Tensor[] ups, bool needs_x,"
        " bool needs_downs, bool[] needs_ups, bool[] needs_biases) -> (Tensor, Tensor, Tensor[], Tensor[])");
}

namespace {

pybind11::dict build_info() {
  pybind11::dict info;
  info["torch_version"] = std::to_string(TORCH_VERSION_MAJOR) + "." + std::to_string(TORCH_VERSION_MINOR) + "." +
                          std::to_string(TORCH_VERSION_PATCH);
#ifdef _OPENMP
  info["openmp"] = true;
#else
  info["openmp"] = false;
#endif
  info["compiler"] = __VERSION__;
  return info;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "elr_ext CPU kernels; op schemas under torch.ops.elr_ext_native";
  m.def("build_info", &build_info, "What this binary was compiled with");
}
