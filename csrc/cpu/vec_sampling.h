// Vectorised sampling helpers shared by the CPU kernels (verify, markov_draft), compiled
// once per instruction set: at::vec::Vectorized is AVX-512, AVX2 or plain C++ depending
// on CPU_CAPABILITY. Each is the vector form of a csrc/core function named in its comment.
#pragma once

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <type_traits>

#include "../core/race.h"
#include "../core/sampling.h"
#include "vec_exp.h"

namespace dspark::cpu {
namespace CPU_CAPABILITY {

using core::ArgMax;
using core::MaxSum;
using core::kVocabTile;
using Vec = at::vec::Vectorized<float>;
constexpr int64_t kLanes = Vec::size();
// Smallest chunk a thread takes: a few microseconds of work, so that small batches run
// inline instead of paying an OpenMP fork per stage.
constexpr int64_t kTilesPerChunk = 8;
constexpr int64_t kCheapItemsPerChunk = 64;

template <typename T>
inline float to_float(T value) {
  return static_cast<float>(value);
}

template <typename T>
inline Vec load_floats(const T* p) {
  if constexpr (std::is_same_v<T, float>) {
    return Vec::loadu(p);
  } else {
    Vec out;
    at::vec::load_to_float<T>(p, out);
    return out;
  }
}

// at::vec::clamp_min(a, b) is "b if a < b else a" on every instruction set (x86: max_ps(b, a)),
// so a NaN b leaves a: one instruction for a NaN-ignoring running max and for NaN -> -inf.
// tests/test_cpu_isa.py and the NaN tests hold every build to it.
inline Vec max_ignoring_nan(Vec running_max, Vec x) { return at::vec::clamp_min(running_max, x); }

// Vector form of core::sanitize_logit(x * inv_t).
inline Vec sanitized_scaled(Vec x, Vec inv_t) {
  return at::vec::clamp_max(max_ignoring_nan(Vec(-INFINITY), x * inv_t), Vec(FLT_MAX));
}

inline float lane_max(Vec v) {
  float lanes[kLanes];
  v.store(lanes);
  return *std::max_element(lanes, lanes + kLanes);
}

inline float lane_sum(Vec v) {
  float lanes[kLanes];
  v.store(lanes);
  float total = 0.0f;
  for (int64_t i = 0; i < kLanes; ++i) total += lanes[i];
  return total;
}

// Whether every lane of x is -inf: a stretch of a draft law with no mass (ids outside a draft
// vocabulary, or everything but a point mass), whose exp terms are exactly 0.
inline bool all_negative_infinity(Vec x) { return (x == Vec(-INFINITY)).zero_mask() == 0; }

// Largest of p[0, n), NaN ignored (-inf when there is no other value).
template <typename T>
float max_of(const T* p, int64_t n) {
  const int64_t n_vec = n - n % kLanes;
  Vec v_max(-INFINITY);
  for (int64_t i = 0; i < n_vec; i += kLanes) v_max = max_ignoring_nan(v_max, load_floats(p + i));
  float max = lane_max(v_max);
  for (int64_t i = n_vec; i < n; ++i) {
    const float x = to_float(p[i]);
    if (x > max) max = x;
  }
  return max;
}

// MaxSum of sanitize(x * inv_t) over row[lo, hi) when a logit is +inf or x * inv_t overflows:
// the scaled, sanitised logits go to an L1 buffer, then a sum-exp pass reads it.
template <typename T>
MaxSum segment_max_sum_sanitized(const T* p, int64_t n, float inv_t) {
  float scaled[kVocabTile];
  const Vec v_inv_t(inv_t);
  const int64_t n_vec = n - n % kLanes;
  Vec v_max(-INFINITY);
  for (int64_t i = 0; i < n_vec; i += kLanes) {
    const Vec x = sanitized_scaled(load_floats(p + i), v_inv_t);
    x.store(scaled + i);
    v_max = max_ignoring_nan(v_max, x);
  }
  float max = lane_max(v_max);
  for (int64_t i = n_vec; i < n; ++i) {
    scaled[i] = core::sanitize_logit(to_float(p[i]) * inv_t);
    max = std::max(max, scaled[i]);
  }
  if (max == -INFINITY) return core::empty_max_sum();
  const Vec v_shift(max);
  Vec v_sum(0.0f);
  for (int64_t i = 0; i < n_vec; i += kLanes) v_sum += exp_nonpositive(Vec::loadu(scaled + i) - v_shift);
  float sum = lane_sum(v_sum);
  for (int64_t i = n_vec; i < n; ++i) sum += core::exp_nonpositive(scaled[i] - max);
  return MaxSum{max, sum};
}

// MaxSum of sanitize(x * inv_t) over row[lo, hi), in two passes over the range (the second
// hits L1): the max of the raw logits (1/T > 0 and rounding keep the order, so the scaled max
// is max * (1/T)), then sum exp(x * (1/T) - max). A NaN logit gives exp_nonpositive(NaN) = 0
// and -inf gives 0, as sanitising would; +inf, or a product that overflows, takes the
// sanitising form. Either way the result has the same bits. exp_nonpositive: within 2 ulp,
// the same bits in every build.
// kSkipEmpty (draft rows, often -inf over most of the vocabulary): vectors whose every logit is
// -inf add exp(-inf) = +0 to nonnegative sums, so skipping them keeps the bits.
template <typename T, bool kSkipEmpty = false>
MaxSum segment_max_sum(const T* row, int64_t lo, int64_t hi, float inv_t) {
  const T* p = row + lo;
  const int64_t n = hi - lo;
  const int64_t n_vec = n - n % kLanes;
  const float max = max_of(p, n) * inv_t;
  if (max == -INFINITY) return core::empty_max_sum();  // every logit -inf or NaN
  if (!(max <= FLT_MAX)) return segment_max_sum_sanitized(p, n, inv_t);
  const Vec v_inv_t(inv_t), v_shift(max);
  Vec v_sum(0.0f);
  for (int64_t i = 0; i < n_vec; i += kLanes) {
    const Vec x = load_floats(p + i);
    if constexpr (kSkipEmpty) {
      if (all_negative_infinity(x)) continue;
    }
    v_sum += exp_nonpositive(x * v_inv_t - v_shift);
  }
  float sum = lane_sum(v_sum);
  for (int64_t i = n_vec; i < n; ++i) sum += core::exp_nonpositive(to_float(p[i]) * inv_t - max);
  return MaxSum{max, sum};
}

// First index (reported as first_id + i) of the largest of p[0, n); NaN never wins; an
// all -inf/NaN range answers first_id, so an emitted id is always a real vocabulary id.
template <typename T>
ArgMax arg_max_of(const T* p, int64_t n, int64_t first_id) {
  const int64_t n_vec = n - n % kLanes;
  const float max = max_of(p, n);
  if (max == -INFINITY) return ArgMax{-INFINITY, static_cast<int32_t>(first_id)};
  // Second pass over the (cache-resident) range finds the first lane equal to the max.
  const Vec v_target(max);
  const int all_lanes = static_cast<int>((1ull << kLanes) - 1);
  for (int64_t i = 0; i < n_vec; i += kLanes) {
    const int not_equal = (load_floats(p + i) == v_target).zero_mask();
    if (not_equal != all_lanes) return ArgMax{max, static_cast<int32_t>(first_id + i + __builtin_ctz(~not_equal & all_lanes))};
  }
  for (int64_t i = n_vec; i < n; ++i)
    if (to_float(p[i]) == max) return ArgMax{max, static_cast<int32_t>(first_id + i)};
  return ArgMax{max, static_cast<int32_t>(first_id)};  // unreachable: max came from this range
}

// sanitize(row[lo + i] * inv_t) into out, with `excluded` (an absolute id, or -1) at -inf.
template <typename T>
void target_log_weights(const T* row, int64_t lo, int64_t n, float inv_t, int64_t excluded, float* out) {
  const int64_t n_vec = n - n % kLanes;
  const Vec v_inv_t(inv_t);
  for (int64_t i = 0; i < n_vec; i += kLanes) sanitized_scaled(load_floats(row + lo + i), v_inv_t).store(out + i);
  for (int64_t i = n_vec; i < n; ++i) out[i] = core::sanitize_logit(to_float(row[lo + i]) * inv_t);
  if (excluded >= lo && excluded < lo + n) out[excluded - lo] = -INFINITY;
}

// Token race inside one tile: argmax_i core::race_key(log_weights[i] - shift, E_i) with E_i
// the variates of core::token_race_block, one Philox call per four ids, keys vectorized.
inline ArgMax race_tokens(const float* log_weights, float shift, int64_t lo, int64_t n, uint64_t seed,
                          uint64_t offset, int32_t position, core::RandomPurpose purpose) {
  float keys[kVocabTile];
  for (int64_t g = 0; g < (n + 3) / 4; ++g) {
    const core::Philox4x32 block = core::token_race_block(seed, offset, position, (lo >> 2) + g, purpose);
    for (int lane = 0; lane < 4; ++lane) keys[4 * g + lane] = core::race_variate_input(block.v[lane]);
  }
  const int64_t n_vec = n - n % kLanes;
  const Vec v_shift(shift);
  for (int64_t i = 0; i < n_vec; i += kLanes) {
    const Vec exponential = Vec(0.0f) - (Vec(0.0f) - Vec::loadu(keys + i)).log1p();  // core::exponential_variate
    ((Vec::loadu(log_weights + i) - v_shift) - exponential.log()).store(keys + i);
  }
  for (int64_t i = n_vec; i < n; ++i) keys[i] = core::race_key(log_weights[i] - shift, -std::log1p(-keys[i]));
  return arg_max_of(keys, n, lo);
}

}  // namespace CPU_CAPABILITY
}  // namespace dspark::cpu
