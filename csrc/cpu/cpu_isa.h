// Which build of a CPU kernel to run: ATen's own choice of instruction set, read once
// (so ATEN_CPU_CAPABILITY=default|avx2|avx512 applies to our kernels as to ATen's).
#pragma once

#include <ATen/Version.h>

#include <string>

namespace dspark::cpu {

enum class CpuIsa { kDefault, kAvx2, kAvx512 };

inline CpuIsa detected_cpu_isa() {
  static const CpuIsa isa = [] {
    const std::string capability = at::get_cpu_capability();
    if (capability == "AVX512") return CpuIsa::kAvx512;
    if (capability == "AVX2") return CpuIsa::kAvx2;
    return CpuIsa::kDefault;
  }();
  return isa;
}

// Calls ISA::function(args...) for the detected instruction set; the kernels are built once
// per set in csrc/cpu/isa/ (only DEFAULT off x86).
#if defined(DSPARK_HAVE_X86_ISA_KERNELS)
#define DSPARK_CALL_FOR_CPU_ISA(function, ...)                        \
  do {                                                                \
    switch (::dspark::cpu::detected_cpu_isa()) {                      \
      case ::dspark::cpu::CpuIsa::kAvx512:                            \
        AVX512::function(__VA_ARGS__);                                \
        break;                                                        \
      case ::dspark::cpu::CpuIsa::kAvx2:                              \
        AVX2::function(__VA_ARGS__);                                  \
        break;                                                        \
      default:                                                        \
        DEFAULT::function(__VA_ARGS__);                               \
    }                                                                 \
  } while (false)
#else
#define DSPARK_CALL_FOR_CPU_ISA(function, ...) DEFAULT::function(__VA_ARGS__)
#endif

}  // namespace dspark::cpu
