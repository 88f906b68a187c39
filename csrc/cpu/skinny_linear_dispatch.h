// The CPU skinny_linear kernel exists once per instruction set (csrc/cpu/isa/); the launcher
// picks one at run time from ATen's CPU capability.
#pragma once

#include <c10/util/BFloat16.h>

#include <cstdint>

namespace dspark::cpu {

// Output features per block of a packed weight: one AVX-512 vector, two AVX2 vectors. Fixed
// for every build, so a packed weight is portable and every build sums in the same order.
constexpr int64_t kSkinnyBlock = 16;

// WeightT: float, or c10::BFloat16 (widened exactly to float as it is loaded: half the bytes
// to stream, the same float32 chain).
template <typename WeightT>
struct SkinnyLinearProblem {
  const float* input;     // [M, K], row stride input_stride, unit stride along K
  const WeightT* packed;  // [ceil(N / 16), K, 16]: packed[b, k, j] = weight[16 b + j, k], zero past N
  const float* bias;    // [N] contiguous, or nullptr
  float* out;           // [M, N] contiguous
  int64_t M, N, K;
  int64_t input_stride;
};

#define DSPARK_DECLARE_SKINNY_LINEAR_FOR_ISA(ISA) \
  namespace ISA {                                 \
  template <typename WeightT>                     \
  void run_skinny_linear(const SkinnyLinearProblem<WeightT>& problem); \
  }
DSPARK_DECLARE_SKINNY_LINEAR_FOR_ISA(DEFAULT)
DSPARK_DECLARE_SKINNY_LINEAR_FOR_ISA(AVX2)
DSPARK_DECLARE_SKINNY_LINEAR_FOR_ISA(AVX512)
#undef DSPARK_DECLARE_SKINNY_LINEAR_FOR_ISA

}  // namespace dspark::cpu
