// DSpark Algorithm 1 (hardware-aware prefix scheduler), shared by the CPU and CUDA kernels
// of dspark::schedule.
//
// Survival a_{r,j} = prod_{i<=j} c_{r,i}, rounded to float32 after every product. Candidates
// (r, j) with a > 0 and j < cap_r are admitted in descending a (ties: lower request, then lower
// position) while Theta = tau * SPS(B) strictly improves; the first candidate that does not
// improve it stops the scan (the early stop keeps admission non-anticipating: DSpark App. A).
//
// tau is accumulated in fixed point (2^-40 units, int64) so that its prefix sums are exact
// and associative: a sequential CPU loop and a parallel CUDA scan give the same bits.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include "host_device.h"

namespace dspark::core {

constexpr int kTauFractionBits = 40;
// tau <= R * (K + 1) must fit int64 in 2^-40 units with room to spare.
constexpr int64_t kMaxScheduledTokens = int64_t{1} << 22;
// Survival probabilities lie in [0, 1], whose float32 bit patterns are below 2^30 and order
// like the values: radix sorts read only these bits.
constexpr int kSurvivalKeyBits = 30;

// A conditional acceptance as the kernels read it: NaN counts as 0 and values are clamped to
// [0, 1] (the CPU launcher rejects such values; CUDA cannot check them without a sync).
DSPARK_HOST_DEVICE float sanitized_confidence(float c) {
  return c > 0.0f ? (c < 1.0f ? c : 1.0f) : 0.0f;  // NaN fails c > 0
}

// Number of draft positions request r may verify: max_len clamped to [0, K].
DSPARK_HOST_DEVICE int draft_cap(int32_t max_len, int num_draft) {
  return max_len < 0 ? 0 : (max_len < num_draft ? static_cast<int>(max_len) : num_draft);
}

// Exact: a * 2^40 is an integer-valued double for a >= 2^-17, and truncation drops < 2^-40.
DSPARK_HOST_DEVICE int64_t tau_increment(float survival) {
  return static_cast<int64_t>(static_cast<double>(survival) * 0x1p40);
}

DSPARK_HOST_DEVICE int64_t tau_of_anchors(int64_t num_requests) { return num_requests << kTauFractionBits; }

// Theta = tau * SPS(B): expected accepted tokens per second of a batch of B tokens.
DSPARK_HOST_DEVICE double throughput(int64_t tau_fixed, float steps_per_second) {
  return static_cast<double>(tau_fixed) * 0x1p-40 * static_cast<double>(steps_per_second);
}

// Whether the candidate at sorted position `position` (0-based; it grows the batch to
// B = R + position + 1 tokens) strictly improves Theta over the batch without it. Every earlier
// candidate improved Theta (or the scan would have stopped), so Theta_best is the previous
// batch's Theta. tau_before is tau over the anchors and the earlier candidates.
DSPARK_HOST_DEVICE bool improves_throughput(float survival, int64_t tau_before, int64_t position,
                                            int64_t num_requests, const float* sps, int64_t sps_stride,
                                            int64_t max_batch) {
  const int64_t batch = num_requests + position + 1;
  if (!(survival > 0.0f) || batch > max_batch) return false;
  const double before = throughput(tau_before, sps[(batch - 1) * sps_stride]);
  const double after = throughput(tau_before + tau_increment(survival), sps[batch * sps_stride]);
  return after > before;  // false for NaN SPS values: such a batch is never admitted
}

// Sort key of a survival probability: its float32 bits (order-preserving for a in [0, 1]),
// 0 for a candidate that is not in the candidate space.
DSPARK_HOST_DEVICE uint32_t survival_key(float survival) {
#if defined(__CUDA_ARCH__)
  const uint32_t bits = __float_as_uint(survival);
#else
  uint32_t bits;
  std::memcpy(&bits, &survival, sizeof(bits));
#endif
  return survival > 0.0f ? bits : 0u;
}

DSPARK_HOST_DEVICE float survival_of_key(uint32_t key) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(key);
#else
  float survival;
  std::memcpy(&survival, &key, sizeof(key));
  return survival;
#endif
}

// Raw-pointer problem of one dspark::schedule call. Strides are in elements.
struct ScheduleProblem {
  const float* confidence;  // [R, K]
  int64_t confidence_stride_r, confidence_stride_k;
  const float* sps;         // [N + 1]
  int64_t sps_stride;
  const int32_t* max_len;   // [R] or nullptr
  int64_t max_len_stride;
  int64_t num_requests, num_draft, max_batch;  // R, K, N
  int32_t* num_draft_out;   // [R] contiguous

  DSPARK_HOST_DEVICE int cap(int64_t r) const {
    return max_len == nullptr ? static_cast<int>(num_draft) : draft_cap(max_len[r * max_len_stride], static_cast<int>(num_draft));
  }
  DSPARK_HOST_DEVICE float confidence_at(int64_t r, int64_t j) const {
    return sanitized_confidence(confidence[r * confidence_stride_r + j * confidence_stride_k]);
  }
};

}  // namespace dspark::core
