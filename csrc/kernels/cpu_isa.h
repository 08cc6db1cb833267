// The x86 ISA levels of the CPU kernels (fdn.h, kron_lora.h): their loops are also compiled for
// AVX2 and AVX-512 (GCC / Clang target attributes; the extension itself is built for the baseline
// ISA) and one is picked at run time, up to cpu_isa_limit(). Torch-free.
#pragma once

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__)) && !defined(__CUDACC__)
#define ELR_X86_DISPATCH 1
#else
#define ELR_X86_DISPATCH 0
#endif

namespace elr {

enum class CpuIsa : int { Generic = 0, Avx2 = 1, Avx512 = 2 };

// The best ISA this CPU runs. A reference so that the unit tests (and benchmarks) can lower it to
// cover every compiled path; the kernels read it at each call.
inline CpuIsa& cpu_isa_limit() {
  static CpuIsa isa = [] {
#if ELR_X86_DISPATCH
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl"))
      return CpuIsa::Avx512;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return CpuIsa::Avx2;
#endif
    return CpuIsa::Generic;
  }();
  return isa;
}

}  // namespace elr
