// The FDN kernels compiled once, for every dtype: the launchers of fdn.cuh instantiated explicitly.
// Other translation units include fdn.cuh and see `extern template` declarations of these.
#define ELR_FDN_INSTANTIATE
#include "fdn.cuh"

namespace elr {
ELR_FDN_FOR_EACH_DTYPE()
}  // namespace elr
