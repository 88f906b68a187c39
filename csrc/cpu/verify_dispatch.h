// The CPU verify kernel exists once per instruction set; the launcher picks one at run
// time from ATen's CPU capability (so ATEN_CPU_CAPABILITY=default|avx2|avx512 applies).
#pragma once

#include "../core/verify_request.h"

namespace dspark::cpu {
#define DSPARK_DECLARE_VERIFY_FOR_ISA(ISA)                                  \
  namespace ISA {                                                           \
  template <typename LogitT, typename IdT>                                  \
  void run_verify(const core::VerifyProblem<LogitT, IdT>& problem);         \
  }
DSPARK_DECLARE_VERIFY_FOR_ISA(DEFAULT)
DSPARK_DECLARE_VERIFY_FOR_ISA(AVX2)
DSPARK_DECLARE_VERIFY_FOR_ISA(AVX512)
#undef DSPARK_DECLARE_VERIFY_FOR_ISA
}  // namespace dspark::cpu
