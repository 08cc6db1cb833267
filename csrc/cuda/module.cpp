// The pybind11 module of the CUDA extension (elr_ext._C_cuda). Its op implementations register
// themselves (TORCH_LIBRARY_IMPL ... CUDA) in the other files of this folder against the schemas
// defined by the CPU extension, which elr_ext loads first.
#include <cuda_runtime_api.h>
#include <torch/extension.h>

#ifndef ELR_EXT_CUDA_ARCHS
#define ELR_EXT_CUDA_ARCHS "unknown"
#endif

namespace {

pybind11::dict build_info() {
  pybind11::dict info;
  info["cuda_runtime_compiled"] = std::to_string(CUDART_VERSION / 1000) + "." + std::to_string(CUDART_VERSION % 1000 / 10);
  info["archs"] = ELR_EXT_CUDA_ARCHS;
  return info;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "elr_ext CUDA kernels; implementations of torch.ops.elr_ext_native for CUDA tensors";
  m.def("build_info", &build_info, "What this binary was compiled with");
}
