// dspark::cached_attention on CPU: causal attention of a step's few new rows per request over
// the request's cached keys and values, as a target forward runs it when it decodes one token
// or verifies a handful of drafts.
//
// Why not SDPA: CPU SDPA pads every request to the longest one's rows and pays for each padded
// row, and its blocked kernel is built for long query blocks: with one extra row in a batch of
// four, SmolLM2's attention cost ~1.5x a step of one row each (bench/RESULTS.md). Here one task
// per (request, KV head) runs its queries (the heads that share the KV head, GQA, times the
// request's rows) one at a time, the query and its accumulators in registers; the request's key
// and value rows come from memory once and from this core's cache for the next queries. A step
// costs about one read of the cache it attends to, plus ~1/3 of that per extra row per request.
//
// Batch invariance: a query's output depends only on its own row, its position and the cache
// below it. Its scores are one chain of fused multiply-adds over d in 16 lanes, then a fixed
// tree; the softmax sums over its keys in order, in 16 lanes, with core::exp_nonpositive; the
// values accumulate over its keys in order. So a token's attention output is the same bits
// whether it is decoded alone or verified with others, and the AVX2 and AVX-512 builds agree
// (the plain build, for CPUs without FMA, rounds each product).
#pragma once

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <vector>

#include "cached_attention_dispatch.h"
#include "vec_exp.h"

namespace dspark::cpu {
namespace CPU_CAPABILITY {
namespace attention {

using Vec = at::vec::Vectorized<float>;
static_assert(kAttentionLanes % Vec::size() == 0, "a build's vector must divide the 16 lanes");
constexpr int kVecsPerLanes = kAttentionLanes / Vec::size();
constexpr int kMaxChunks = kAttentionMaxHeadDim / kAttentionLanes;

// Every loop over a row's vectors fully unrolled, so the query and accumulators stay in registers.
#define DSPARK_ATTENTION_UNROLL _Pragma("GCC unroll 32")

// The 16 lanes of acc added in one tree for every build: l_i + l_{i+8}, then + 4, + 2, + 1
// (the order of GCC's _mm512_reduce_add_ps, kept explicit so the AVX2 build matches it).
inline float sum_lanes(const Vec (&acc)[kVecsPerLanes]) {
#if defined(CPU_CAPABILITY_AVX512)
  const __m512 all = acc[0];
  const __m256 eight = _mm256_add_ps(_mm512_castps512_ps256(all), _mm512_extractf32x8_ps(all, 1));
#elif defined(CPU_CAPABILITY_AVX2)
  const __m256 eight = _mm256_add_ps(acc[0], acc[1]);
#endif
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  const __m128 four = _mm_add_ps(_mm256_castps256_ps128(eight), _mm256_extractf128_ps(eight, 1));
  const __m128 two = _mm_add_ps(four, _mm_movehl_ps(four, four));
  return _mm_cvtss_f32(two) + _mm_cvtss_f32(_mm_shuffle_ps(two, two, 1));
#else
  alignas(64) float lanes[kAttentionLanes];
  for (int v = 0; v < kVecsPerLanes; ++v) acc[v].store(lanes + v * Vec::size());
  for (int width = kAttentionLanes / 2; width >= 1; width /= 2)
    for (int i = 0; i < width; ++i) lanes[i] += lanes[i + width];
  return lanes[0];
#endif
}

// Softmax weights of one query over its keys: scores[0 .. keys) become exp(s - max) in place;
// returns their sum. A NaN score makes the maximum NaN, so the row's output is NaN.
inline float exponentiate(float* scores, int64_t keys) {
  float maximum = -std::numeric_limits<float>::infinity();
  for (int64_t j = 0; j < keys; ++j) {
    if (scores[j] != scores[j]) {
      maximum = scores[j];
      break;
    }
    maximum = std::max(maximum, scores[j]);
  }
  Vec sum[kVecsPerLanes];
  for (int v = 0; v < kVecsPerLanes; ++v) sum[v] = Vec(0.0f);
  const Vec shift(maximum);
  for (int64_t j0 = 0; j0 < keys; j0 += kAttentionLanes)
    for (int v = 0; v < kVecsPerLanes; ++v) {
      const int64_t first = j0 + v * Vec::size();
      const int64_t count = std::clamp<int64_t>(keys - first, 0, Vec::size());
      if (count == Vec::size()) {
        const Vec e = exp_nonpositive(Vec::loadu(scores + first) - shift);
        e.store(scores + first);
        sum[v] = sum[v] + e;
      } else if (count > 0) {
        const Vec e = exp_nonpositive(Vec::loadu(scores + first, static_cast<int>(count)) - shift);
        e.store(scores + first, static_cast<int>(count));
        sum[v] = sum[v] + Vec::set(Vec(0.0f), e, count);
      }
    }
  return sum_lanes(sum);
}

// The weighted sum of one query's values over keys 0 .. keys - 1 (weights: its softmax
// numerators), divided by their sum; the accumulators stay in registers.
template <int CHUNKS>
inline void weighted_values(const float* weights, const float* value_rows, int64_t keys, int64_t D, float total,
                            float* out) {
  constexpr int kVecs = CHUNKS * kVecsPerLanes;
  Vec acc[kVecs];
  DSPARK_ATTENTION_UNROLL
  for (int i = 0; i < kVecs; ++i) acc[i] = Vec(0.0f);
  for (int64_t j = 0; j < keys; ++j) {
    const float* v_row = value_rows + j * D;
    const Vec weight(weights[j]);
    DSPARK_ATTENTION_UNROLL
    for (int i = 0; i < kVecs; ++i) {
      const int64_t first = int64_t{i} * Vec::size();
      const Vec v_part = first + Vec::size() <= D ? Vec::loadu(v_row + first)
                         : first < D              ? Vec::loadu(v_row + first, static_cast<int>(D - first))
                                                  : Vec(0.0f);
      acc[i] = at::vec::fmadd(v_part, weight, acc[i]);
    }
  }
  const Vec sum(total);
  DSPARK_ATTENTION_UNROLL
  for (int i = 0; i < kVecs; ++i) {
    const int64_t first = int64_t{i} * Vec::size();
    if (first >= D) break;
    (acc[i] / sum).store(out + first, static_cast<int>(std::min<int64_t>(Vec::size(), D - first)));
  }
}

// One query's scores against keys 0 .. keys - 1: scale x (one chain of fused multiply-adds over
// d in 16 lanes, then sum_lanes), into scores[j]. The query stays in registers; each key row
// streams through once.
template <int CHUNKS>
inline void score_keys(const float* query, const float* key_rows, int64_t keys, int64_t D, float scale,
                       float* scores) {
  constexpr int kVecs = CHUNKS * kVecsPerLanes;
  Vec q[kVecs];
  DSPARK_ATTENTION_UNROLL
  for (int i = 0; i < kVecs; ++i) {
    const int64_t first = int64_t{i} * Vec::size();
    q[i] = first + Vec::size() <= D ? Vec::loadu(query + first)
           : first < D              ? Vec::loadu(query + first, static_cast<int>(D - first))
                                    : Vec(0.0f);
  }
  for (int64_t j = 0; j < keys; ++j) {
    const float* k = key_rows + j * D;
    Vec acc[kVecsPerLanes];
    DSPARK_ATTENTION_UNROLL
    for (int v = 0; v < kVecsPerLanes; ++v) acc[v] = Vec(0.0f);
    DSPARK_ATTENTION_UNROLL
    for (int i = 0; i < kVecs; ++i) {
      const int64_t first = int64_t{i} * Vec::size();
      const Vec k_part = first + Vec::size() <= D ? Vec::loadu(k + first)
                         : first < D              ? Vec::loadu(k + first, static_cast<int>(D - first))
                                                  : Vec(0.0f);
      acc[i % kVecsPerLanes] = at::vec::fmadd(q[i], k_part, acc[i % kVecsPerLanes]);
    }
    scores[j] = sum_lanes(acc) * scale;
  }
}

// Every query head of KV head g and every row of request b, one query at a time: row t sees
// keys 0 .. context + t. The request's key and value rows stay in this core's cache after the
// first query reads them.
template <int CHUNKS>
inline void attend_request_head(const CachedAttentionProblem& p, int64_t b, int64_t g, std::vector<float>& scores) {
  const int64_t row0 = p.cu_seqlens[b];
  const int64_t rows = p.cu_seqlens[b + 1] - row0;
  const int64_t G = p.H / p.KVH;
  const int64_t context = p.context_lengths[b];
  const float* key_rows = p.key_cache + (b * p.KVH + g) * p.C * p.D;
  const float* value_rows = p.value_cache + (b * p.KVH + g) * p.C * p.D;
  scores.resize(static_cast<size_t>(std::max<int64_t>(context + rows, 0)));
  for (int64_t t = 0; t < rows; ++t)
    for (int64_t h = g * G; h < (g + 1) * G; ++h) {
      const int64_t seen = context + t + 1;
      score_keys<CHUNKS>(p.query + (row0 + t) * p.query_row_stride + h * p.query_head_stride, key_rows, seen, p.D,
                         p.scale, scores.data());
      const float total = exponentiate(scores.data(), seen);
      weighted_values<CHUNKS>(scores.data(), value_rows, seen, p.D, total, p.out + ((row0 + t) * p.H + h) * p.D);
    }
}

template <int CHUNKS = kMaxChunks>
inline void attend_request_head_of(const CachedAttentionProblem& p, int64_t b, int64_t g, std::vector<float>& scores) {
  const int64_t chunks = (p.D + kAttentionLanes - 1) / kAttentionLanes;
  if constexpr (CHUNKS > 1) {
    if (chunks < CHUNKS) return attend_request_head_of<CHUNKS - 1>(p, b, g, scores);
  }
  attend_request_head<CHUNKS>(p, b, g, scores);
}

}  // namespace attention

void run_cached_attention(const CachedAttentionProblem& p) {
  if (p.B == 0 || p.KVH == 0) return;
  at::parallel_for(0, p.B * p.KVH, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores;
    for (int64_t task = begin; task < end; ++task)
      attention::attend_request_head_of(p, task / p.KVH, task % p.KVH, scores);
  });
}

}  // namespace CPU_CAPABILITY
}  // namespace dspark::cpu
