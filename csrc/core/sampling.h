// Sampling numerics shared by the CPU and CUDA kernels: logit sanitising, online
// log-sum-exp, first-index argmax, the speculative accept rule, the log-space
// residual and exponential-race keys. Framework-free so CPU tests exercise the
// exact functions the CUDA kernels call.
#pragma once

#include <cfloat>
#include <cmath>
#include <cstdint>

#include "host_device.h"

namespace dspark::core {

// The vocabulary is processed in tiles of this many ids. Both backends use the same
// tiling, so the two-level race below takes the same decisions on CPU and CUDA.
constexpr int64_t kVocabTile = 2048;

DSPARK_HOST_DEVICE int64_t num_vocab_tiles(int64_t vocab_size) {
  return (vocab_size + kVocabTile - 1) / kVocabTile;
}

DSPARK_HOST_DEVICE float negative_infinity() { return -INFINITY; }

// Temperature 0 (or anything not > 0, NaN included) is greedy decoding. 1/T is clamped so
// that a subnormal temperature cannot turn a 0 logit into 0 * inf = NaN.
DSPARK_HOST_DEVICE float inverse_temperature(float temperature) {
  return temperature > 0.0f ? fminf(1.0f / temperature, FLT_MAX) : 0.0f;
}

DSPARK_HOST_DEVICE bool is_greedy(float temperature) { return !(temperature > 0.0f); }

// NaN carries no probability (-inf); +inf becomes the largest finite logit, so rows
// holding +inf share their mass among those entries instead of producing NaN.
DSPARK_HOST_DEVICE float sanitize_logit(float scaled_logit) {
  if (scaled_logit != scaled_logit) return -INFINITY;
  return scaled_logit > FLT_MAX ? FLT_MAX : scaled_logit;
}

// Running (max, sum exp(x - max)) pair: a log-sum-exp that never overflows and
// merges across tiles, threads and CTAs in any order.
struct MaxSum {
  float max;
  float sum;
};

DSPARK_HOST_DEVICE MaxSum empty_max_sum() { return MaxSum{-INFINITY, 0.0f}; }

DSPARK_HOST_DEVICE MaxSum merge(MaxSum a, MaxSum b) {
  if (a.max < b.max) {
    const MaxSum t = a;
    a = b;
    b = t;
  }
  if (b.max == -INFINITY) return a;  // also covers a.max == -inf (both empty)
  return MaxSum{a.max, a.sum + b.sum * expf(b.max - a.max)};
}

DSPARK_HOST_DEVICE MaxSum add_term(MaxSum acc, float log_weight) {
  return merge(acc, MaxSum{log_weight, log_weight == -INFINITY ? 0.0f : 1.0f});
}

// A row's log-normaliser kept as (max, log sum) and never added up: max + log(sum) rounds
// away log(sum) once logits reach ~1e7 (or FLT_MAX for +inf), so probabilities are taken
// as (w - max) - log(sum), exact whatever the logits' magnitude.
struct LogNormalizer {
  float max;
  float log_sum;
};

DSPARK_HOST_DEVICE LogNormalizer normalizer_of(MaxSum s) {
  return s.sum > 0.0f ? LogNormalizer{s.max, logf(s.sum)} : LogNormalizer{-INFINITY, -INFINITY};
}

// log(w / total); NaN when the row has no mass (every rule below treats NaN as "no").
DSPARK_HOST_DEVICE float log_probability(float log_weight, LogNormalizer n) {
  return (log_weight - n.max) - n.log_sum;
}

// log(total) - shift, with the shift applied before the sum for the same reason.
DSPARK_HOST_DEVICE float shifted_log_total(MaxSum s, float shift) {
  return s.sum > 0.0f ? (s.max - shift) + logf(s.sum) : -INFINITY;
}

// Argmax with the first index winning ties; NaN never wins (it compares false).
struct ArgMax {
  float value;
  int32_t index;
};

DSPARK_HOST_DEVICE ArgMax empty_arg_max() { return ArgMax{-INFINITY, INT32_MAX}; }

DSPARK_HOST_DEVICE ArgMax better(ArgMax a, ArgMax b) {
  if (b.value > a.value || (b.value == a.value && b.index < a.index)) return b;
  return a;
}

// Per (row, vocabulary tile) stats of a pass over logits: MaxSum for sampled rows, ArgMax
// for greedy rows.
struct TileStats {
  float max;
  float sum;
  float argmax_value;
  int32_t argmax_index;
};

// Accept draft token x with probability min(1, p(x) / q(x)) (Leviathan et al. 2023,
// Alg. 1), in log space: u < p/q  <=>  log u < log p - log q. q(x) = 0 rejects
// (the draft could not have produced x); NaN rejects.
DSPARK_HOST_DEVICE bool accept_draft(float log_p, float log_q, float u) {
  if (!(log_q > -INFINITY)) return false;
  return logf(u) < log_p - log_q;
}

// log max(0, p - q) = log p + log(1 - q/p), exact for tiny p where p - q would
// cancel or underflow (the residual distribution of speculative sampling).
// A NaN log q (draft row without mass) means q = 0, so the residual is p; a NaN log p has
// no mass either way.
DSPARK_HOST_DEVICE float draft_log_prob_or_zero_mass(float log_q) { return log_q != log_q ? -INFINITY : log_q; }

DSPARK_HOST_DEVICE float log_residual(float log_p, float log_q) {
  log_q = draft_log_prob_or_zero_mass(log_q);
  if (!(log_p > log_q)) return -INFINITY;
  return log_p + logf(-expm1f(log_q - log_p));
}

// max(0, p - q) from log p and log q, in linear space: summed per tile to weigh the tiles
// of the residual (mass below ~1e-38 is dropped, which no sampler could ever draw).
DSPARK_HOST_DEVICE float residual_probability(float log_p, float log_q) {
  const float difference = expf(log_p) - expf(draft_log_prob_or_zero_mass(log_q));
  return difference > 0.0f ? difference : 0.0f;
}

// Exponential race key: argmax_i (log w_i - log E_i), E_i ~ Exp(1) (core::exponential_variate),
// picks i with probability w_i / sum w (the Gumbel-max trick), in one pass with no
// normaliser. Weight 0 (log w = -inf) never wins. Callers pass log-weights shifted to
// at most ~0 so the noise is not rounded away next to a huge logit.
DSPARK_HOST_DEVICE float race_key(float log_weight, float exponential) {
  return log_weight - logf(exponential);
}

}  // namespace dspark::core
