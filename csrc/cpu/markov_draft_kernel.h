// CPU kernel of dspark::markov_draft, compiled once per instruction set (csrc/cpu/isa/*.cpp
// define CPU_CAPABILITY). The math of each position is csrc/core/markov.h; sampling is the
// two-level race of csrc/core/race.h, as in verify.
//
// One step k, for the whole batch at once:
//   1. gather a_b = W1[x_{k-1,b}] (float32) and write c_k;
//   2. parallel over vocabulary tiles: W2 rows of the tile are read once for every row
//      (GEMM-shaped bias), each row's l_k = round(U_k + bias) is written, and the tile's
//      stats are taken from the rounded values while they are in L1;
//   3. per row: x_k from the tile stats (argmax, or tile race + token race in one tile).
#pragma once

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <type_traits>
#include <vector>

#include "../core/markov.h"
#include "markov_draft_dispatch.h"
#include "vec_sampling.h"

namespace dspark::cpu {
namespace CPU_CAPABILITY {

using core::TileStats;

// Ids whose bias is computed before the rows consume it: [B, 256] floats stay in L1/L2.
constexpr int64_t kBiasChunk = 256;
static_assert(kVocabTile % kBiasChunk == 0, "bias chunks must tile a vocabulary tile");

// out[0, n) = float(src[0, n)).
template <typename W>
void load_row_as_float(const W* src, int64_t n, float* out) {
  if constexpr (std::is_same_v<W, float>) {
    std::copy(src, src + n, out);
  } else {
    const int64_t n_vec = n - n % kLanes;
    for (int64_t j = 0; j < n_vec; j += kLanes) load_floats(src + j).store(out + j);
    for (int64_t j = n_vec; j < n; ++j) out[j] = to_float(src[j]);
  }
}

// Sums of four vectors, in a fixed tree per instruction set. Every bias is a dot product
// reduced this way, whatever the batch size, so a row's logits never depend on the other
// rows of the batch.
inline void horizontal_sums4(const Vec (&v)[4], float* out) {
#if defined(CPU_CAPABILITY_AVX512)
  const __m512 a = v[0], b = v[1], c = v[2], d = v[3];
  // 128-bit blocks [a0+a2, a1+a3, b0+b2, b1+b3], then [a, b, c, d] partials, then 4-lane sums.
  const __m512 ab = _mm512_add_ps(_mm512_shuffle_f32x4(a, b, 0x44), _mm512_shuffle_f32x4(a, b, 0xEE));
  const __m512 cd = _mm512_add_ps(_mm512_shuffle_f32x4(c, d, 0x44), _mm512_shuffle_f32x4(c, d, 0xEE));
  __m512 abcd = _mm512_add_ps(_mm512_shuffle_f32x4(ab, cd, 0x88), _mm512_shuffle_f32x4(ab, cd, 0xDD));
  abcd = _mm512_add_ps(abcd, _mm512_shuffle_ps(abcd, abcd, 0x4E));
  abcd = _mm512_add_ps(abcd, _mm512_shuffle_ps(abcd, abcd, 0xB1));
  alignas(64) float lanes[16];
  _mm512_store_ps(lanes, abcd);
  out[0] = lanes[0], out[1] = lanes[4], out[2] = lanes[8], out[3] = lanes[12];
#elif defined(CPU_CAPABILITY_AVX2)
  const __m256 ab = _mm256_hadd_ps(v[0], v[1]), cd = _mm256_hadd_ps(v[2], v[3]);
  const __m256 abcd = _mm256_hadd_ps(ab, cd);  // [a, b, c, d] partials of each 128-bit half
  _mm_storeu_ps(out, _mm_add_ps(_mm256_castps256_ps128(abcd), _mm256_extractf128_ps(abcd, 1)));
#else
  for (int q = 0; q < 4; ++q) out[q] = at::vec::vec_reduce_all<float>([](Vec& x, Vec& y) { return x + y; }, v[q]);
#endif
}

// out[q * 4 + i] = W2[i] . a_q for 4 W2 rows (float32, rank apart) and kRows rows of a:
// per-lane partial sums over j, a scalar tail, then horizontal_sums4.
template <int64_t kRows>
void dot_block(const float* a, const float* w, int64_t rank, float* out) {
  const int64_t r_vec = rank - rank % kLanes;
  Vec acc[kRows][4];
#pragma GCC unroll 4
  for (int64_t q = 0; q < kRows; ++q)
#pragma GCC unroll 4
    for (int64_t i = 0; i < 4; ++i) acc[q][i] = Vec(0.0f);
  for (int64_t j = 0; j < r_vec; j += kLanes) {
    Vec wv[4];
#pragma GCC unroll 4
    for (int64_t i = 0; i < 4; ++i) wv[i] = Vec::loadu(w + i * rank + j);
#pragma GCC unroll 4
    for (int64_t q = 0; q < kRows; ++q) {
      const Vec x = Vec::loadu(a + q * rank + j);
#pragma GCC unroll 4
      for (int64_t i = 0; i < 4; ++i) acc[q][i] = at::vec::fmadd(x, wv[i], acc[q][i]);
    }
  }
  for (int64_t q = 0; q < kRows; ++q) {
    horizontal_sums4(acc[q], out + q * 4);
    for (int64_t i = 0; i < 4; ++i)
      for (int64_t j = r_vec; j < rank; ++j) out[q * 4 + i] += a[q * rank + j] * w[i * rank + j];
  }
}

constexpr int64_t kRowsPerBlock = 4;  // 4 rows x 4 ids = 16 accumulators

// bias[b * kBiasChunk + i] = W2[v0 + i] . a_b for i < n <= kBiasChunk, b < B (a: [B, r]):
// the GEMM-shaped step, reading each W2 row from memory once for the whole batch.
template <typename W>
void markov_bias_chunk(const float* a, int64_t B, const W* w2, int64_t rank, int64_t v0, int64_t n,
                       int64_t prefetch_end, float* w_buffer, float* bias) {
  float out[kRowsPerBlock * 4];
  for (int64_t i = 0; i < n; i += 4) {
    const int64_t count = std::min<int64_t>(4, n - i);
    // Small batches stream W2 at memory speed: ask for the rows 4 blocks ahead now (rows
    // below prefetch_end only: the next ids of this thread's tile).
    const char* ahead = reinterpret_cast<const char*>(w2 + (v0 + i + 16) * rank);
    const int64_t ahead_bytes = 4 * rank * static_cast<int64_t>(sizeof(W));
    if (v0 + i + 20 <= prefetch_end)
      for (int64_t byte = 0; byte < ahead_bytes; byte += 64) __builtin_prefetch(ahead + byte);
    // float32 weights are read in place; past the vocabulary the last row is repeated (its
    // sums are computed and dropped).
    const float* rows = w_buffer;
    if constexpr (std::is_same_v<W, float>) {
      if (count == 4) rows = w2 + (v0 + i) * rank;
    }
    if (rows == w_buffer)
      for (int64_t q = 0; q < 4; ++q)
        load_row_as_float(w2 + (v0 + i + std::min(q, count - 1)) * rank, rank, w_buffer + q * rank);
    for (int64_t b = 0; b < B; b += kRowsPerBlock) {
      const int64_t rows_here = std::min(kRowsPerBlock, B - b);
      switch (rows_here) {
        case 4: dot_block<4>(a + b * rank, rows, rank, out); break;
        case 3: dot_block<3>(a + b * rank, rows, rank, out); break;
        case 2: dot_block<2>(a + b * rank, rows, rank, out); break;
        default: dot_block<1>(a + b * rank, rows, rank, out);
      }
      for (int64_t q = 0; q < rows_here; ++q)
        for (int64_t k = 0; k < count; ++k) bias[(b + q) * kBiasChunk + i + k] = out[q * 4 + k];
    }
  }
}

#if defined(CPU_CAPABILITY_AVX512)
// bf16 weights on CPUs with AVX512_BF16: vdpbf16ps multiplies pairs of bf16 (exactly, in
// float32) and adds them to a float32 accumulator, twice the rate of float32 FMAs and no
// conversion pass over W2. a_b = W1[x] is bf16 too, so only the summation order changes
// (and subnormals flush to zero); every bias of the call uses this path, so results stay
// batch invariant.
// DSPARK_DISABLE_AVX512_BF16=1 keeps the float32 path (tests compare the two).
inline bool cpu_has_avx512_bf16() {
  static const bool has = __builtin_cpu_supports("avx512bf16") && std::getenv("DSPARK_DISABLE_AVX512_BF16") == nullptr;
  return has;
}

#define DSPARK_BF16_TARGET __attribute__((target("avx512f,avx512bw,avx512bf16")))

DSPARK_BF16_TARGET inline __m512bh load_bf16_pairs(const c10::BFloat16* p, int64_t count) {
  const __mmask32 mask = count >= 32 ? ~__mmask32{0} : static_cast<__mmask32>((1u << count) - 1u);
  return reinterpret_cast<__m512bh>(_mm512_maskz_loadu_epi16(mask, p));
}

template <int64_t kRows>
DSPARK_BF16_TARGET void dot_block_bf16(const c10::BFloat16* a, const c10::BFloat16* w, int64_t rank, float* out) {
  __m512 acc[kRows][4];
#pragma GCC unroll 4
  for (int64_t q = 0; q < kRows; ++q)
#pragma GCC unroll 4
    for (int64_t i = 0; i < 4; ++i) acc[q][i] = _mm512_setzero_ps();
  // 32 ids per step; the last step loads zeros past the rank.
  for (int64_t j = 0; j < rank; j += 32) {
    const int64_t count = std::min<int64_t>(32, rank - j);
    __m512bh wv[4];
#pragma GCC unroll 4
    for (int64_t i = 0; i < 4; ++i) wv[i] = load_bf16_pairs(w + i * rank + j, count);
#pragma GCC unroll 4
    for (int64_t q = 0; q < kRows; ++q) {
      const __m512bh x = load_bf16_pairs(a + q * rank + j, count);
#pragma GCC unroll 4
      for (int64_t i = 0; i < 4; ++i) acc[q][i] = _mm512_dpbf16_ps(acc[q][i], x, wv[i]);
    }
  }
#pragma GCC unroll 4
  for (int64_t q = 0; q < kRows; ++q) {
    const Vec sums[4] = {Vec(acc[q][0]), Vec(acc[q][1]), Vec(acc[q][2]), Vec(acc[q][3])};
    horizontal_sums4(sums, out + q * 4);
  }
}

// markov_bias_chunk for bf16 weights with vdpbf16ps (a: [B, r] bf16).
DSPARK_BF16_TARGET inline void markov_bias_chunk_bf16(const c10::BFloat16* a, int64_t B, const c10::BFloat16* w2,
                                                     int64_t rank, int64_t v0, int64_t n, int64_t prefetch_end,
                                                     c10::BFloat16* w_buffer, float* bias) {
  float out[kRowsPerBlock * 4];
  for (int64_t i = 0; i < n; i += 4) {
    const int64_t count = std::min<int64_t>(4, n - i);
    const char* ahead = reinterpret_cast<const char*>(w2 + (v0 + i + 16) * rank);
    if (v0 + i + 20 <= prefetch_end)
      for (int64_t byte = 0; byte < 4 * rank * 2; byte += 64) __builtin_prefetch(ahead + byte);
    // Read in place; past the vocabulary the last row is repeated (its sums are dropped).
    const c10::BFloat16* rows = w2 + (v0 + i) * rank;
    if (count < 4) {
      for (int64_t q = 0; q < 4; ++q) {
        const c10::BFloat16* src = w2 + (v0 + i + std::min(q, count - 1)) * rank;
        std::copy(src, src + rank, w_buffer + q * rank);
      }
      rows = w_buffer;
    }
    for (int64_t b = 0; b < B; b += kRowsPerBlock) {
      const int64_t rows_here = std::min(kRowsPerBlock, B - b);
      switch (rows_here) {
        case 4: dot_block_bf16<4>(a + b * rank, rows, rank, out); break;
        case 3: dot_block_bf16<3>(a + b * rank, rows, rank, out); break;
        case 2: dot_block_bf16<2>(a + b * rank, rows, rank, out); break;
        default: dot_block_bf16<1>(a + b * rank, rows, rank, out);
      }
      for (int64_t q = 0; q < rows_here; ++q)
        for (int64_t k = 0; k < count; ++k) bias[(b + q) * kBiasChunk + i + k] = out[q * 4 + k];
    }
  }
}
#endif

// out[i] = round(U[i] + bias[i]) in the logits dtype, and rounded[i] = float(out[i]), i < n.
template <typename T>
void write_corrected_logits(const T* base, const float* bias, int64_t n, T* out, float* rounded) {
  if constexpr (std::is_same_v<T, float>) {
    const int64_t n_vec = n - n % kLanes;
    for (int64_t i = 0; i < n_vec; i += kLanes) {
      const Vec l = Vec::loadu(base + i) + Vec::loadu(bias + i);
      l.store(out + i);
      l.store(rounded + i);
    }
    for (int64_t i = n_vec; i < n; ++i) rounded[i] = out[i] = base[i] + bias[i];
  } else {
    using VecT = at::vec::Vectorized<T>;
    constexpr int64_t kStep = VecT::size();
    static_assert(kStep == 2 * kLanes, "16-bit vectors convert to two float vectors");
    const int64_t n_vec = n - n % kStep;
    for (int64_t i = 0; i < n_vec; i += kStep) {
      auto [u_lo, u_hi] = at::vec::convert_to_float<T>(VecT::loadu(base + i));
      const VecT l = at::vec::convert_from_float<T>(u_lo + Vec::loadu(bias + i), u_hi + Vec::loadu(bias + i + kLanes));
      l.store(out + i);
      auto [r_lo, r_hi] = at::vec::convert_to_float<T>(l);
      r_lo.store(rounded + i);
      r_hi.store(rounded + i + kLanes);
    }
    for (int64_t i = n_vec; i < n; ++i) {
      out[i] = static_cast<T>(to_float(base[i]) + bias[i]);
      rounded[i] = to_float(out[i]);
    }
  }
}

// Step 1: a_b = W1[x_{k-1}] as float32 (zeros for an anchor outside the vocabulary) and c_k.
template <typename LogitT, typename W>
void gather_previous_embeddings(const core::MarkovDraftProblem<LogitT, W>& pb, int64_t k) {
  const int64_t r = pb.rank;
  for (int64_t b = 0; b < pb.batch; ++b) {
    const int64_t previous = k == 0 ? pb.prev_token_ids[b] : pb.draft_token_ids[b * pb.steps + k - 1];
    const int64_t row = core::transition_row(previous, pb.vocab_size);
    float* a = pb.prev_embedding + b * r;
    if (row >= 0) {
      load_row_as_float(pb.markov_w1 + row * r, r, a);
    } else {
      std::fill(a, a + r, 0.0f);
    }
    if (pb.confidence != nullptr) {
      float prev_term = 0.0f;
      if (pb.conf_w_prev != nullptr)
        for (int64_t j = 0; j < r; ++j) prev_term += pb.conf_w_prev[j] * a[j];
      const float sts = pb.conf_temperature != nullptr ? pb.conf_temperature[k] : 1.0f;
      pb.confidence[b * pb.steps + k] = core::markov_confidence(pb.conf_base[b * pb.steps + k], prev_term, sts);
    }
  }
}

// Step 3 for one row: the token of l_k from its tile stats.
template <typename LogitT, typename W>
int64_t select_token(const core::MarkovDraftProblem<LogitT, W>& pb, int64_t b, int64_t k, const TileStats* tiles,
                     int64_t num_tiles) {
  const int64_t V = pb.vocab_size;
  const float temperature = pb.temperature[b];
  const LogitT* row = pb.draft_logits + (b * pb.steps + k) * V;
  if (core::is_greedy(temperature)) {
    ArgMax best{-INFINITY, 0};  // a row with nothing above -inf answers 0, as in verify
    for (int64_t t = 0; t < num_tiles; ++t) best = core::better(best, ArgMax{tiles[t].argmax_value, tiles[t].argmax_index});
    return best.index;
  }
  const uint64_t seed = static_cast<uint64_t>(pb.seed[b]), offset = static_cast<uint64_t>(pb.offset[b]);
  const int32_t position = static_cast<int32_t>(k);
  float shift = -INFINITY;
  for (int64_t t = 0; t < num_tiles; ++t) shift = std::max(shift, tiles[t].max);
  ArgMax winner{-INFINITY, -1};
  for (int64_t t = 0; t < num_tiles; ++t) {
    const float key = core::tile_race_key(MaxSum{tiles[t].max, tiles[t].sum}, shift, seed, offset, position, t,
                                          core::kMarkovTilePurpose);
    winner = core::better(winner, ArgMax{key, static_cast<int32_t>(t)});
  }
  if (winner.value == -INFINITY) return 0;  // no finite logit: as in verify
  const int64_t lo = static_cast<int64_t>(winner.index) * kVocabTile, n = std::min(V, lo + kVocabTile) - lo;
  float log_weights[kVocabTile];
  target_log_weights(row, lo, n, core::inverse_temperature(temperature), -1, log_weights);
  return race_tokens(log_weights, tiles[winner.index].max, lo, n, seed, offset, position, core::kMarkovTokenPurpose).index;
}

template <typename LogitT, typename W>
void run_markov_draft(const core::MarkovDraftProblem<LogitT, W>& pb) {
  const int64_t B = pb.batch, K = pb.steps, V = pb.vocab_size, r = pb.rank;
  const int64_t num_tiles = core::num_vocab_tiles(V);
  TileStats* tile_stats = pb.unit_stats;  // [B, num_tiles] here (the scratch holds [B, units] >= that)
  bool bf16_dot = false;  // bf16 weights take vdpbf16ps where this CPU has it
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<W, c10::BFloat16>) bf16_dot = cpu_has_avx512_bf16();
#endif
  std::vector<c10::BFloat16> a_bf16(bf16_dot ? B * r : 0);
  auto compute_bias = [&](int64_t v0, int64_t n, int64_t prefetch_end, float* w_rows, c10::BFloat16* w_rows_bf16,
                          float* bias) {
#if defined(CPU_CAPABILITY_AVX512)
    if constexpr (std::is_same_v<W, c10::BFloat16>) {
      if (bf16_dot) return markov_bias_chunk_bf16(a_bf16.data(), B, pb.markov_w2, r, v0, n, prefetch_end, w_rows_bf16, bias);
    }
#endif
    markov_bias_chunk(pb.prev_embedding, B, pb.markov_w2, r, v0, n, prefetch_end, w_rows, bias);
  };

  for (int64_t k = 0; k < K; ++k) {
    gather_previous_embeddings(pb, k);
    // Exact: the float32 values were widened from W1's bf16.
    for (int64_t i = 0; i < static_cast<int64_t>(a_bf16.size()); ++i) a_bf16[i] = c10::BFloat16(pb.prev_embedding[i]);

    at::parallel_for(0, num_tiles, 1, [&](int64_t tile_begin, int64_t tile_end) {
      std::vector<float> bias(B * kBiasChunk), w_rows(4 * r);
      std::vector<c10::BFloat16> w_rows_bf16(bf16_dot ? 4 * r : 0);
      float rounded[kBiasChunk];
      std::vector<TileStats> stats(B);
      for (int64_t tile = tile_begin; tile < tile_end; ++tile) {
        const int64_t lo = tile * kVocabTile, hi = std::min(V, lo + kVocabTile);
        for (int64_t b = 0; b < B; ++b) stats[b] = TileStats{-INFINITY, 0.0f, -INFINITY, static_cast<int32_t>(lo)};
        for (int64_t v0 = lo; v0 < hi; v0 += kBiasChunk) {
          const int64_t n = std::min(hi, v0 + kBiasChunk) - v0;
          compute_bias(v0, n, hi, w_rows.data(), w_rows_bf16.data(), bias.data());
          for (int64_t b = 0; b < B; ++b) {
            const int64_t row = (b * K + k) * V;
            write_corrected_logits(pb.base_logits + row + v0, bias.data() + b * kBiasChunk, n,
                                   pb.draft_logits + row + v0, rounded);
            const float temperature = pb.temperature[b];
            if (core::is_greedy(temperature)) {
              const ArgMax best = arg_max_of(rounded, n, v0);
              const ArgMax merged = core::better(ArgMax{stats[b].argmax_value, stats[b].argmax_index}, best);
              stats[b].argmax_value = merged.value;
              stats[b].argmax_index = merged.index;
            } else {
              const MaxSum chunk = segment_max_sum(rounded, 0, n, core::inverse_temperature(temperature));
              const MaxSum merged = core::merge(MaxSum{stats[b].max, stats[b].sum}, chunk);
              stats[b].max = merged.max;
              stats[b].sum = merged.sum;
            }
          }
        }
        for (int64_t b = 0; b < B; ++b) tile_stats[b * num_tiles + tile] = stats[b];
      }
    });

    at::parallel_for(0, B, kCheapItemsPerChunk / 8, [&](int64_t b_begin, int64_t b_end) {
      for (int64_t b = b_begin; b < b_end; ++b)
        pb.draft_token_ids[b * K + k] = select_token(pb, b, k, tile_stats + b * num_tiles, num_tiles);
    });
  }
}

}  // namespace CPU_CAPABILITY
}  // namespace dspark::cpu
