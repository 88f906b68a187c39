// exp_two_ulp over an array, compiled once per instruction set (csrc/cpu/isa/vec_exp_*.cpp):
// what dspark::_exp_for_testing runs, so tests measure each build's own instructions.
#pragma once

#include <cstdint>

#include "vec_exp.h"

namespace dspark::cpu {
namespace CPU_CAPABILITY {

void exp_two_ulp_array(const float* in, float* out, int64_t n, bool nonpositive) {
  using Vec = at::vec::Vectorized<float>;
  int64_t i = 0;
  for (; i + Vec::size() <= n; i += Vec::size()) {
    const Vec x = Vec::loadu(in + i);
    (nonpositive ? exp_nonpositive(x) : exp_two_ulp(x)).store(out + i);
  }
  for (; i < n; ++i) out[i] = nonpositive ? core::exp_nonpositive(in[i]) : core::exp_two_ulp(in[i]);
}

}  // namespace CPU_CAPABILITY
}  // namespace dspark::cpu
