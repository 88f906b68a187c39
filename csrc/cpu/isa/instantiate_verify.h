// Included by one translation unit per instruction set, compiled with that set's flags
// and CPU_CAPABILITY defined (setup.py and CMakeLists.txt set both).
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "../verify_kernel.h"

namespace dspark::cpu {
namespace CPU_CAPABILITY {
#define DSPARK_INSTANTIATE_VERIFY(LOGIT, ID) \
  template void run_verify<LOGIT, ID>(const core::VerifyProblem<LOGIT, ID>&);
DSPARK_INSTANTIATE_VERIFY(float, int32_t)
DSPARK_INSTANTIATE_VERIFY(float, int64_t)
DSPARK_INSTANTIATE_VERIFY(c10::BFloat16, int32_t)
DSPARK_INSTANTIATE_VERIFY(c10::BFloat16, int64_t)
DSPARK_INSTANTIATE_VERIFY(c10::Half, int32_t)
DSPARK_INSTANTIATE_VERIFY(c10::Half, int64_t)
#undef DSPARK_INSTANTIATE_VERIFY
}  // namespace CPU_CAPABILITY
}  // namespace dspark::cpu
