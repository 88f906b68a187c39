// dspark::cached_attention on CPU: causal attention of a step's few new rows per request over
// the request's cached keys and values, as a target forward runs it when it decodes one token
// or verifies a handful of drafts.
//
// Why not SDPA: CPU SDPA pads every request to the longest one's rows and pays for each padded
// row, and its blocked kernel is built for long query blocks: with one extra row in a batch of
// four, SmolLM2's attention cost ~1.5x a step of one row each (bench/RESULTS.md). Here one task
// per (request, KV head), or per piece of its rows (row_pieces), runs its queries (the heads that
// share the KV head, GQA, times the request's rows), queries and accumulators in registers; the
// request's key and value rows come from memory once and from this core's cache for the next
// queries. A decoding step costs about one read of the cache it attends to, and each extra row
// per request about half of that again.
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

// The vector of a row of D floats that starts at lane ``first``; lanes past D are zero.
inline Vec load_part(const float* row, int64_t first, int64_t D) {
  return first + Vec::size() <= D ? Vec::loadu(row + first)
         : first < D              ? Vec::loadu(row + first, static_cast<int>(D - first))
                                  : Vec(0.0f);
}

// The 16 lanes of a sum added in one tree for every build: l_i + l_{i+8}, then l_i + l_{i+4},
// then (l_0 + l_1) + (l_2 + l_3) (the pairs _mm_hadd_ps adds, so that four sums reduce together
// in sum_lanes_of_four with the same bits as one at a time).
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
inline __m128 four_lanes(const Vec (&acc)[kVecsPerLanes]) {
#if defined(CPU_CAPABILITY_AVX512)
  const __m512 all = acc[0];
  const __m256 eight = _mm256_add_ps(_mm512_castps512_ps256(all), _mm512_extractf32x8_ps(all, 1));
#else
  const __m256 eight = _mm256_add_ps(acc[0], acc[1]);
#endif
  return _mm_add_ps(_mm256_castps256_ps128(eight), _mm256_extractf128_ps(eight, 1));
}
#else
inline void four_lanes(const Vec (&acc)[kVecsPerLanes], float (&four)[4]) {
  alignas(64) float lanes[kAttentionLanes];
  for (int v = 0; v < kVecsPerLanes; ++v) acc[v].store(lanes + v * Vec::size());
  for (int i = 0; i < 8; ++i) lanes[i] += lanes[i + 8];
  for (int i = 0; i < 4; ++i) four[i] = lanes[i] + lanes[i + 4];
}
#endif

inline float sum_lanes(const Vec (&acc)[kVecsPerLanes]) {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  const __m128 four = four_lanes(acc);
  const __m128 pairs = _mm_hadd_ps(four, four);  // l0 + l1, l2 + l3, ...
  return _mm_cvtss_f32(_mm_hadd_ps(pairs, pairs));
#else
  float four[4];
  four_lanes(acc, four);
  return (four[0] + four[1]) + (four[2] + four[3]);
#endif
}

// sum_lanes of four sums at once, each times scale, into out[0 .. 3].
inline void sum_lanes_of_four(const Vec (&a)[kVecsPerLanes], const Vec (&b)[kVecsPerLanes],
                              const Vec (&c)[kVecsPerLanes], const Vec (&d)[kVecsPerLanes], float scale,
                              float* out) {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  const __m128 ab = _mm_hadd_ps(four_lanes(a), four_lanes(b));
  const __m128 cd = _mm_hadd_ps(four_lanes(c), four_lanes(d));
  _mm_storeu_ps(out, _mm_mul_ps(_mm_hadd_ps(ab, cd), _mm_set1_ps(scale)));
#else
  out[0] = sum_lanes(a) * scale, out[1] = sum_lanes(b) * scale;
  out[2] = sum_lanes(c) * scale, out[3] = sum_lanes(d) * scale;
#endif
}

// Softmax weights of one query over its keys: scores[0 .. keys) become exp(s - max) in place;
// returns their sum. A NaN score makes the maximum NaN, so the row's output is NaN.
inline float exponentiate(float* scores, int64_t keys) {
  // The maximum's value does not depend on the order; at::vec::maximum and the scalar rule below
  // both keep a NaN once they meet one.
  auto larger = [](float m, float x) { return (x != x || x > m) ? x : m; };
  Vec lanes_max(-std::numeric_limits<float>::infinity());
  int64_t j = 0;
  for (; j + Vec::size() <= keys; j += Vec::size()) lanes_max = at::vec::maximum(lanes_max, Vec::loadu(scores + j));
  alignas(64) float lanes[Vec::size()];
  lanes_max.store(lanes);
  float maximum = -std::numeric_limits<float>::infinity();
  for (int i = 0; i < Vec::size(); ++i) maximum = larger(maximum, lanes[i]);
  for (; j < keys; ++j) maximum = larger(maximum, scores[j]);
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

// The weighted sums of N queries over the same keys 0 .. keys - 1 (weights[q]: query q's softmax
// numerators), each divided by its total, into out[q]; every query's accumulators stay in
// registers and sum over the keys in order. N queries at once are N independent chains per
// vector (one query alone waits on each fused multiply-add), and share each value row's loads.
template <int CHUNKS, int N>
inline void weighted_values(const float* const* weights, const float* value_rows, int64_t keys, int64_t D,
                            const float* totals, float* const* out) {
  constexpr int kVecs = CHUNKS * kVecsPerLanes;
  Vec acc[N][kVecs];
  DSPARK_ATTENTION_UNROLL
  for (int n = 0; n < N; ++n)
    DSPARK_ATTENTION_UNROLL
    for (int i = 0; i < kVecs; ++i) acc[n][i] = Vec(0.0f);
  for (int64_t j = 0; j < keys; ++j) {
    const float* v_row = value_rows + j * D;
    DSPARK_ATTENTION_UNROLL
    for (int i = 0; i < kVecs; ++i) {
      const Vec v_part = load_part(v_row, int64_t{i} * Vec::size(), D);
      DSPARK_ATTENTION_UNROLL
      for (int n = 0; n < N; ++n) acc[n][i] = at::vec::fmadd(v_part, Vec(weights[n][j]), acc[n][i]);
    }
  }
  DSPARK_ATTENTION_UNROLL
  for (int n = 0; n < N; ++n) {
    const Vec sum(totals[n]);
    DSPARK_ATTENTION_UNROLL
    for (int i = 0; i < kVecs; ++i) {
      const int64_t first = int64_t{i} * Vec::size();
      if (first >= D) break;
      (acc[n][i] / sum).store(out[n] + first, static_cast<int>(std::min<int64_t>(Vec::size(), D - first)));
    }
  }
}

// Queries whose values accumulate together: their accumulators take at most half the vector
// registers (16 of 32 on AVX-512, 8 of 16 on AVX2), and at most 4.
template <int CHUNKS>
constexpr int kQueriesPerValuePass =
    std::clamp((Vec::size() == 16 ? 16 : 8) / (CHUNKS * kVecsPerLanes), 1, 4);

template <int CHUNKS, int N = kQueriesPerValuePass<CHUNKS>>
inline void weighted_values_of(int64_t n, const float* const* weights, const float* value_rows, int64_t keys,
                               int64_t D, const float* totals, float* const* out) {
  if constexpr (N > 1) {
    if (n < N) return weighted_values_of<CHUNKS, N - 1>(n, weights, value_rows, keys, D, totals, out);
  }
  weighted_values<CHUNKS, N>(weights, value_rows, keys, D, totals, out);
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
  for (int i = 0; i < kVecs; ++i) q[i] = load_part(query, int64_t{i} * Vec::size(), D);
  auto dot = [&](const float* k, Vec (&acc)[kVecsPerLanes]) {
    DSPARK_ATTENTION_UNROLL
    for (int v = 0; v < kVecsPerLanes; ++v) acc[v] = Vec(0.0f);
    DSPARK_ATTENTION_UNROLL
    for (int i = 0; i < kVecs; ++i)
      acc[i % kVecsPerLanes] = at::vec::fmadd(q[i], load_part(k, int64_t{i} * Vec::size(), D), acc[i % kVecsPerLanes]);
  };
  int64_t j = 0;
  for (; j + 4 <= keys; j += 4) {  // four keys at a time: four independent chains, one reduction
    Vec a[kVecsPerLanes], b[kVecsPerLanes], c[kVecsPerLanes], d[kVecsPerLanes];
    dot(key_rows + j * D, a);
    dot(key_rows + (j + 1) * D, b);
    dot(key_rows + (j + 2) * D, c);
    dot(key_rows + (j + 3) * D, d);
    sum_lanes_of_four(a, b, c, d, scale, scores + j);
  }
  for (; j < keys; ++j) {
    Vec a[kVecsPerLanes];
    dot(key_rows + j * D, a);
    scores[j] = sum_lanes(a) * scale;
  }
}

// Every query head of KV head g and every row of request b: each query's scores and softmax one
// at a time, then the values of a row's heads together (weighted_values). The request's key and
// value rows stay in this core's cache after the first query reads them.
template <int CHUNKS>
inline void attend_request_head(const CachedAttentionProblem& p, int64_t b, int64_t g, int64_t t_begin, int64_t t_end,
                                std::vector<float>& scores) {
  const int64_t row0 = p.cu_seqlens[b];
  const int64_t rows = p.cu_seqlens[b + 1] - row0;
  const int64_t G = p.H / p.KVH;
  const int64_t context = p.context_lengths[b];
  const float* key_rows = p.key_cache + (b * p.KVH + g) * p.C * p.D;
  const float* value_rows = p.value_cache + (b * p.KVH + g) * p.C * p.D;
  const int64_t stride = std::max<int64_t>(context + rows, 0);
  scores.resize(static_cast<size_t>(G * stride));
  constexpr int kGroup = kQueriesPerValuePass<CHUNKS>;
  for (int64_t t = t_begin; t < t_end; ++t) {  // row t's queries (its G heads) see keys 0 .. context + t
    const int64_t seen = context + t + 1;
    for (int64_t h0 = 0; h0 < G; h0 += kGroup) {
      const int64_t n = std::min<int64_t>(kGroup, G - h0);
      const float* weights[kGroup];
      float totals[kGroup];
      float* out[kGroup];
      for (int64_t i = 0; i < n; ++i) {
        const int64_t h = g * G + h0 + i;
        float* query_scores = scores.data() + (h0 + i) * stride;
        score_keys<CHUNKS>(p.query + (row0 + t) * p.query_row_stride + h * p.query_head_stride, key_rows, seen, p.D,
                           p.scale, query_scores);
        totals[i] = exponentiate(query_scores, seen);
        weights[i] = query_scores;
        out[i] = p.out + ((row0 + t) * p.H + h) * p.D;
      }
      weighted_values_of<CHUNKS>(n, weights, value_rows, seen, p.D, totals, out);
    }
  }
}

template <int CHUNKS = kMaxChunks>
inline void attend_request_head_of(const CachedAttentionProblem& p, int64_t b, int64_t g, int64_t t_begin,
                                   int64_t t_end, std::vector<float>& scores) {
  const int64_t chunks = (p.D + kAttentionLanes - 1) / kAttentionLanes;
  if constexpr (CHUNKS > 1) {
    if (chunks < CHUNKS) return attend_request_head_of<CHUNKS - 1>(p, b, g, t_begin, t_end, scores);
  }
  attend_request_head<CHUNKS>(p, b, g, t_begin, t_end, scores);
}

// Pieces each (request, KV head)'s rows are split into, one task each: with fewer such pairs
// than twice the threads (one request of SmolLM2: 3 KV heads on 2 threads, one with twice the
// other's queries) the rows of a verification step are shared out. A piece's queries are the
// same arithmetic as in a whole task (each query reads only its own row and the cache), so the
// split changes no bit; each piece reads its request's keys and values again, which still
// measured faster from 2 rows on (bench/RESULTS.md).
inline int64_t row_pieces(const CachedAttentionProblem& p) {
  const int64_t pairs = p.B * p.KVH;
  const int64_t wanted = 2 * static_cast<int64_t>(at::get_num_threads());
  if (pairs >= wanted) return 1;
  int64_t most_rows = 0;
  for (int64_t b = 0; b < p.B; ++b) most_rows = std::max(most_rows, p.cu_seqlens[b + 1] - p.cu_seqlens[b]);
  return std::clamp<int64_t>(std::min((wanted + pairs - 1) / pairs, most_rows), 1, wanted);
}

}  // namespace attention

void run_cached_attention(const CachedAttentionProblem& p) {
  if (p.B == 0 || p.KVH == 0) return;
  const int64_t pieces = attention::row_pieces(p);
  at::parallel_for(0, p.B * p.KVH * pieces, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t piece = task % pieces, head = task / pieces;
      const int64_t b = head / p.KVH, g = head % p.KVH;
      const int64_t rows = p.cu_seqlens[b + 1] - p.cu_seqlens[b];
      const int64_t t_begin = rows * piece / pieces, t_end = rows * (piece + 1) / pieces;
      if (t_begin < t_end) attention::attend_request_head_of(p, b, g, t_begin, t_end, scores);
    }
  });
}

}  // namespace CPU_CAPABILITY
}  // namespace dspark::cpu
