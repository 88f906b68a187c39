// Included by one translation unit per instruction set, compiled with that set's flags
// and CPU_CAPABILITY defined (setup.py and CMakeLists.txt set both).
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "../markov_draft_kernel.h"

namespace dspark::cpu {
namespace CPU_CAPABILITY {
// Weights are float32 or the logits' dtype (csrc/markov_draft_launch.h).
#define DSPARK_INSTANTIATE_MARKOV_DRAFT(LOGIT, WEIGHT) \
  template void run_markov_draft<LOGIT, WEIGHT>(const core::MarkovDraftProblem<LOGIT, WEIGHT>&);
DSPARK_INSTANTIATE_MARKOV_DRAFT(float, float)
DSPARK_INSTANTIATE_MARKOV_DRAFT(c10::BFloat16, c10::BFloat16)
DSPARK_INSTANTIATE_MARKOV_DRAFT(c10::BFloat16, float)
DSPARK_INSTANTIATE_MARKOV_DRAFT(c10::Half, c10::Half)
DSPARK_INSTANTIATE_MARKOV_DRAFT(c10::Half, float)
#undef DSPARK_INSTANTIATE_MARKOV_DRAFT
}  // namespace CPU_CAPABILITY
}  // namespace dspark::cpu
