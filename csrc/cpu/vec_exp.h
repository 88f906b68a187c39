// Vector forms of core::exp_two_ulp (csrc/core/exp.h) for each CPU build: the same steps
// and roundings, so each lane equals the scalar function bitwise.
#pragma once

#include <ATen/cpu/vec/vec.h>

#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
#include <immintrin.h>
#endif

#include "../core/exp.h"

namespace dspark::cpu {
namespace CPU_CAPABILITY {

#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)

using VecF = at::vec::Vectorized<float>;

// core::exp_reduced on every lane: exp(x) = p 2^n. round() is the round-to-nearest-even
// instruction and fmadd the FMA instruction on both instruction sets.
inline VecF exp_reduced(VecF x, VecF* n_out) {
  using C = core::ExpConstants;
  const VecF n = (x * VecF(C::kLog2e)).round();
  VecF r = at::vec::fmadd(n, VecF(-C::kLn2Hi), x);
  r = at::vec::fmadd(n, VecF(-C::kLn2Lo), r);
  VecF q = at::vec::fmadd(VecF(C::kC6), r, VecF(C::kC5));
  q = at::vec::fmadd(q, r, VecF(C::kC4));
  q = at::vec::fmadd(q, r, VecF(C::kC3));
  q = at::vec::fmadd(q, r, VecF(C::kC2));
  *n_out = n;
  return at::vec::fmadd(q, r * r, r) + VecF(1.0f);
}

// x clamped to [kLowest, kHighest], NaN kept: clamp_min(a, b) is max(b, a), which returns a
// when either is NaN (as core::exp_two_ulp's comparisons do).
inline VecF clamped_for_exp(VecF x) {
  using C = core::ExpConstants;
  return at::vec::clamp_max(at::vec::clamp_min(x, VecF(C::kLowest)), VecF(C::kHighest));
}

#endif

#if defined(CPU_CAPABILITY_AVX512)

inline VecF exp_two_ulp(VecF value) {
  VecF n;
  const VecF p = exp_reduced(clamped_for_exp(value), &n);
  return _mm512_scalef_ps(p, n);  // p * 2^n, rounded once, like core::scale_by_power_of_two
}

inline VecF exp_nonpositive(VecF value) {
  using C = core::ExpConstants;
  VecF n;
  const VecF p = exp_reduced(_mm512_max_ps(value, _mm512_set1_ps(C::kLowest)), &n);  // NaN -> kLowest -> 0
  return _mm512_scalef_ps(p, n);
}

#elif defined(CPU_CAPABILITY_AVX2)

// p * 2^n rounded once, like ldexpf, for n in [-150, 128]: (p * 2^(n/2)) * 2^(n - n/2), each
// factor a normal float, the first product exact.
inline __m256 scale_by_power_of_two(__m256 p, __m256i n) {
  const __m256i half = _mm256_srai_epi32(n, 1);
  const __m256i bias = _mm256_set1_epi32(127);
  const __m256 scale_a = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(half, bias), 23));
  const __m256 scale_b = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(_mm256_sub_epi32(n, half), bias), 23));
  return _mm256_mul_ps(_mm256_mul_ps(p, scale_a), scale_b);
}

inline VecF exp_two_ulp(VecF value) {
  VecF n;
  const __m256 p = exp_reduced(clamped_for_exp(value), &n);
  return scale_by_power_of_two(p, _mm256_cvtps_epi32(n));
}

inline at::vec::Vectorized<float> exp_nonpositive(at::vec::Vectorized<float> value) {
  using C = core::ExpConstants;
  const __m256 x = _mm256_max_ps(value, _mm256_set1_ps(C::kLowest));  // NaN -> kLowest -> 0
  VecF n_vec;
  const __m256 p = exp_reduced(x, &n_vec);
  const __m256 n = n_vec;
  const __m256i n_int = _mm256_cvtps_epi32(n);
  // p in [0.7, 1.5) and n >= -125: p * 2^n is a normal float, exactly p with n added to its
  // exponent bits. Only x < -86.6 (subnormal results) takes the two-product path.
  const __m256 result = _mm256_castsi256_ps(_mm256_add_epi32(_mm256_castps_si256(p), _mm256_slli_epi32(n_int, 23)));
  const __m256 subnormal = _mm256_cmp_ps(n, _mm256_set1_ps(-125.0f), _CMP_LT_OQ);
  if (_mm256_movemask_ps(subnormal) == 0) return result;
  return _mm256_blendv_ps(result, scale_by_power_of_two(p, n_int), subnormal);
}

#else

inline at::vec::Vectorized<float> exp_two_ulp(at::vec::Vectorized<float> value) {
  return value.map(core::exp_two_ulp);
}

inline at::vec::Vectorized<float> exp_nonpositive(at::vec::Vectorized<float> value) {
  return value.map(core::exp_nonpositive);
}

#endif

}  // namespace CPU_CAPABILITY
}  // namespace dspark::cpu
