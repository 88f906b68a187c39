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

#if defined(CPU_CAPABILITY_AVX512)

inline at::vec::Vectorized<float> exp_two_ulp(at::vec::Vectorized<float> value) {
  using C = core::ExpConstants;
  __m512 x = value;
  x = _mm512_max_ps(_mm512_set1_ps(C::kLowest), x);  // max(a, b) returns b when either is NaN: NaN stays
  x = _mm512_min_ps(_mm512_set1_ps(C::kHighest), x);
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(C::kLog2e)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(C::kLn2Hi), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(C::kLn2Lo), r);
  __m512 q = _mm512_fmadd_ps(_mm512_set1_ps(C::kC6), r, _mm512_set1_ps(C::kC5));
  q = _mm512_fmadd_ps(q, r, _mm512_set1_ps(C::kC4));
  q = _mm512_fmadd_ps(q, r, _mm512_set1_ps(C::kC3));
  q = _mm512_fmadd_ps(q, r, _mm512_set1_ps(C::kC2));
  const __m512 p = _mm512_add_ps(_mm512_fmadd_ps(q, _mm512_mul_ps(r, r), r), _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(p, n);  // p * 2^n, rounded once, like ldexpf
}

inline at::vec::Vectorized<float> exp_nonpositive(at::vec::Vectorized<float> value) {
  using C = core::ExpConstants;
  const __m512 x = _mm512_max_ps(value, _mm512_set1_ps(C::kLowest));  // NaN -> kLowest -> 0
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(C::kLog2e)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(C::kLn2Hi), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(C::kLn2Lo), r);
  __m512 q = _mm512_fmadd_ps(_mm512_set1_ps(C::kC6), r, _mm512_set1_ps(C::kC5));
  q = _mm512_fmadd_ps(q, r, _mm512_set1_ps(C::kC4));
  q = _mm512_fmadd_ps(q, r, _mm512_set1_ps(C::kC3));
  q = _mm512_fmadd_ps(q, r, _mm512_set1_ps(C::kC2));
  const __m512 p = _mm512_add_ps(_mm512_fmadd_ps(q, _mm512_mul_ps(r, r), r), _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(p, n);
}

#elif defined(CPU_CAPABILITY_AVX2)

// core::exp_reduced on 8 lanes: exp(x) = p 2^n.
inline __m256 exp_reduced(__m256 x, __m256* n_out) {
  using C = core::ExpConstants;
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(C::kLog2e)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(C::kLn2Hi), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(C::kLn2Lo), r);
  __m256 q = _mm256_fmadd_ps(_mm256_set1_ps(C::kC6), r, _mm256_set1_ps(C::kC5));
  q = _mm256_fmadd_ps(q, r, _mm256_set1_ps(C::kC4));
  q = _mm256_fmadd_ps(q, r, _mm256_set1_ps(C::kC3));
  q = _mm256_fmadd_ps(q, r, _mm256_set1_ps(C::kC2));
  *n_out = n;
  return _mm256_add_ps(_mm256_fmadd_ps(q, _mm256_mul_ps(r, r), r), _mm256_set1_ps(1.0f));
}

// p * 2^n rounded once, like ldexpf, for n in [-150, 128]: (p * 2^(n/2)) * 2^(n - n/2), each
// factor a normal float, the first product exact.
inline __m256 scale_by_power_of_two(__m256 p, __m256i n) {
  const __m256i half = _mm256_srai_epi32(n, 1);
  const __m256i bias = _mm256_set1_epi32(127);
  const __m256 scale_a = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(half, bias), 23));
  const __m256 scale_b = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(_mm256_sub_epi32(n, half), bias), 23));
  return _mm256_mul_ps(_mm256_mul_ps(p, scale_a), scale_b);
}

inline at::vec::Vectorized<float> exp_two_ulp(at::vec::Vectorized<float> value) {
  using C = core::ExpConstants;
  __m256 x = value;
  x = _mm256_max_ps(_mm256_set1_ps(C::kLowest), x);  // max(a, b) returns b when either is NaN: NaN stays
  x = _mm256_min_ps(_mm256_set1_ps(C::kHighest), x);
  __m256 n;
  const __m256 p = exp_reduced(x, &n);
  return scale_by_power_of_two(p, _mm256_cvtps_epi32(n));
}

inline at::vec::Vectorized<float> exp_nonpositive(at::vec::Vectorized<float> value) {
  using C = core::ExpConstants;
  const __m256 x = _mm256_max_ps(value, _mm256_set1_ps(C::kLowest));  // NaN -> kLowest -> 0
  __m256 n;
  const __m256 p = exp_reduced(x, &n);
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
