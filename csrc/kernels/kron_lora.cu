// The Kronecker LoRA kernels compiled once, for every dtype: the launchers of kron_lora.cuh
// instantiated explicitly. Other translation units include kron_lora.cuh and see `extern template`
// declarations of these.
#define ELR_KRON_INSTANTIATE
#include "kron_lora.cuh"

namespace elr {
ELR_KRON_FOR_EACH_DTYPE()
}  // namespace elr
