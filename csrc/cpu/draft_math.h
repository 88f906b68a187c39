// The per-row arithmetic of a DSpark drafting round on CPU, shared by dspark::draft_layer and
// dspark::draft_context: projections on a weight packed for skinny_linear, RMSNorm and
// rotate_half RoPE, in plain loops over one row.
#pragma once

#include <ATen/core/Tensor.h>

#include <cmath>
#include <cstdint>

#include "cpu_isa.h"
#include "skinny_linear_dispatch.h"

namespace dspark::cpu::draft {

// out[m] = in[m] @ W.T for M rows of K features, W packed by dspark_ext.ops.pack_skinny_weight.
inline void packed_linear(const at::Tensor& packed, const float* in, int64_t M, int64_t K, int64_t N, float* out) {
  if (packed.scalar_type() == at::kBFloat16) {
    const SkinnyLinearProblem<c10::BFloat16> problem{in, packed.data_ptr<c10::BFloat16>(), nullptr, out, M, N, K, K};
    DSPARK_CALL_FOR_CPU_ISA(run_skinny_linear, problem);
  } else {
    const SkinnyLinearProblem<float> problem{in, packed.data_ptr<float>(), nullptr, out, M, N, K, K};
    DSPARK_CALL_FOR_CPU_ISA(run_skinny_linear, problem);
  }
}

// F.rms_norm over `width` values: x * rsqrt(mean(x^2) + eps) * weight (weight null: 1).
inline void rms_norm(const float* x, const float* weight, float* out, int64_t width, float eps) {
  double squares = 0.0;
  for (int64_t i = 0; i < width; ++i) squares += static_cast<double>(x[i]) * x[i];
  const float inverse = 1.0f / std::sqrt(static_cast<float>(squares / static_cast<double>(width)) + eps);
  for (int64_t i = 0; i < width; ++i) out[i] = weight ? (x[i] * inverse) * weight[i] : x[i] * inverse;
}

// rotate_half RoPE of one head in place: x * cos + cat(-x[half:], x[:half]) * sin.
inline void rotate(float* x, const float* cos, const float* sin, int64_t head_dim, float* scratch) {
  const int64_t half = head_dim / 2;
  for (int64_t i = 0; i < head_dim; ++i) scratch[i] = x[i];
  for (int64_t i = 0; i < half; ++i) x[i] = scratch[i] * cos[i] - scratch[i + half] * sin[i];
  for (int64_t i = half; i < head_dim; ++i) x[i] = scratch[i] * cos[i] + scratch[i - half] * sin[i];
}

}  // namespace dspark::cpu::draft
