// The CPU markov_draft kernel exists once per instruction set (csrc/cpu/cpu_isa.h picks one).
#pragma once

#include "../core/markov.h"

namespace dspark::cpu {
#define DSPARK_DECLARE_MARKOV_DRAFT_FOR_ISA(ISA)                                     \
  namespace ISA {                                                                   \
  template <typename LogitT, typename WeightT>                                      \
  void run_markov_draft(const core::MarkovDraftProblem<LogitT, WeightT>& problem);  \
  }
DSPARK_DECLARE_MARKOV_DRAFT_FOR_ISA(DEFAULT)
DSPARK_DECLARE_MARKOV_DRAFT_FOR_ISA(AVX2)
DSPARK_DECLARE_MARKOV_DRAFT_FOR_ISA(AVX512)
#undef DSPARK_DECLARE_MARKOV_DRAFT_FOR_ISA
}  // namespace dspark::cpu
