// exp(x) in float32 to within 2 ulp for every float32 x (measured <= 1 ulp, see
// tests/test_exp.py), from operations that every CPU build repeats exactly (CPU only: the
// CUDA kernels keep CUDA's expf, itself within 2 ulp, see csrc/cuda/reductions.cuh):
//   n = round(x * log2(e)),  r = x - n ln2 (Cody-Waite: ln2 as hi + lo, both by fma),
//   exp(r) = 1 + r + r^2 q(r) with q of degree 4 (coefficients fitted here for the relative
//   error of exp on |r| <= ln2 / 2), then p * 2^n rounded once (ldexp: subnormal results
//   are exact to rounding, n >= 128 gives inf).
// The AVX2 and AVX-512 forms in csrc/cpu/vec_exp.h take the same steps with the same
// roundings, so those builds get bitwise the same exp (the DEFAULT build too, unless an
// emulated fma double-rounds: see fused_multiply_add). Framework-free (no torch, no ATen).
#pragma once

#include <bit>
#include <cmath>
#include <cstdint>

namespace dspark::core {

struct ExpConstants {
  // Inputs are clamped first: exp(-104) is below half the smallest subnormal (rounds to 0)
  // and exp(89) overflows; the clamp keeps n small enough for the integer steps.
  static constexpr float kLowest = -104.0f;
  static constexpr float kHighest = 89.0f;
  static constexpr float kLog2e = 0x1.715476p+0f;
  static constexpr float kLn2Hi = 0x1.62e430p-1f;   // ln 2 rounded to float: n * kLn2Hi is exact in an fma
  static constexpr float kLn2Lo = -0x1.05c610p-29f;  // ln 2 - kLn2Hi
  // q(r) ~ (exp(r) - 1 - r) / r^2 on |r| <= ln2 / 2: relative error of 1 + r + r^2 q(r) ~3e-9.
  static constexpr float kC2 = 0x1.fffffcp-2f;
  static constexpr float kC3 = 0x1.555492p-3f;
  static constexpr float kC4 = 0x1.5558f2p-5f;
  static constexpr float kC5 = 0x1.123a0cp-7f;
  static constexpr float kC6 = 0x1.6a237ap-10f;
};

// a * b + c rounded once. Where the target has an FMA instruction (x86 with -mfma, as the
// AVX2 and AVX-512 builds are compiled; aarch64) that is fmaf; elsewhere (the x86 DEFAULT
// build, for CPUs without FMA, where fmaf is a slow library call) it is emulated in double:
// a * b is exact there, and the one double rounding before the float rounding changes the
// result only when it lands exactly on a float midpoint (about once in 2^29 operations).
inline float fused_multiply_add(float a, float b, float c) {
#if defined(__FMA__) || defined(__ARM_FEATURE_FMA) || defined(__FP_FAST_FMAF) || defined(FP_FAST_FMAF)
  return fmaf(a, b, c);
#else
  return static_cast<float>(static_cast<double>(a) * static_cast<double>(b) + static_cast<double>(c));
#endif
}

// Round to the nearest integer, ties to even, for |t| < 2^22: adding 1.5 * 2^23 leaves no
// fraction bits (what the vector round instructions do, without nearbyintf's library call).
inline float round_to_nearest_integer(float t) {
  constexpr float kShift = 0x1.8p23f;
  return (t + kShift) - kShift;
}

// 2^k as a float, for k in [-126, 127].
inline float power_of_two(int32_t k) { return std::bit_cast<float>(static_cast<uint32_t>(k + 127) << 23); }

// Range reduction and polynomial: x (already clamped, not NaN) -> (p, n) with exp(x) = p 2^n.
inline float exp_reduced(float x, float* n_out) {
  using C = ExpConstants;
  const float n = round_to_nearest_integer(x * C::kLog2e);
  float r = fused_multiply_add(n, -C::kLn2Hi, x);  // exact: x and n ln2 agree in their leading bits
  r = fused_multiply_add(n, -C::kLn2Lo, r);
  float q = fused_multiply_add(C::kC6, r, C::kC5);
  q = fused_multiply_add(q, r, C::kC4);
  q = fused_multiply_add(q, r, C::kC3);
  q = fused_multiply_add(q, r, C::kC2);
  *n_out = n;
  return fused_multiply_add(q, r * r, r) + 1.0f;
}

// p * 2^n rounded once (like ldexpf) for n in [-150, 128]: (p * 2^(n/2)) * 2^(n - n/2), each
// factor a normal float, the first product exact.
inline float scale_by_power_of_two(float p, int32_t n) {
  const int32_t half = n >> 1;  // floor(n / 2)
  return (p * power_of_two(half)) * power_of_two(n - half);
}

inline float exp_two_ulp(float x) {
  using C = ExpConstants;
  if (x != x) return x + x;  // a quiet NaN, as the vector instructions return
  x = C::kLowest > x ? C::kLowest : x;  // the order of the vector max/min instructions
  x = C::kHighest < x ? C::kHighest : x;
  float n;
  const float p = exp_reduced(x, &n);
  return scale_by_power_of_two(p, static_cast<int32_t>(n));
}

// exp(x) for x <= 0 only (larger x is outside its contract: no upper clamp), with NaN as 0
// (a NaN logit carries no probability): the same bits as exp_two_ulp there, one clamp
// cheaper. What the sampling passes call on x * (1/T) - max, which is <= 0 as rounded
// (products and differences rounded separately: no contraction into an fma).
inline float exp_nonpositive(float x) {
  using C = ExpConstants;
  x = x > C::kLowest ? x : C::kLowest;  // NaN -> kLowest -> 0
  float n;
  const float p = exp_reduced(x, &n);
  return scale_by_power_of_two(p, static_cast<int32_t>(n));
}

}  // namespace dspark::core
