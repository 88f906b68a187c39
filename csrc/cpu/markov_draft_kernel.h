// CPU kernel of dspark::markov_draft, compiled once per instruction set (csrc/cpu/isa/*.cpp
// define CPU_CAPABILITY). The math of each position is csrc/core/markov.h; sampling is the
// two-level race of csrc/core/race.h, as in verify.
//
// One step k, for the whole batch at once:
//   1. gather a_b = W1[x_{k-1,b}] (float32) and write c_k;
//   2. parallel over vocabulary tiles (and groups of rows when tiles are few): W2 rows of the
//      tile are read once for every row (GEMM-shaped bias, markov_bias.h), each row's
//      l_k = round(U_k + bias) is written, and the tile's stats are taken from the rounded
//      values while they are in L1;
//   3. per row: x_k from the tile stats (argmax, or tile race + token race in one tile).
#pragma once

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

#include "../core/markov.h"
#include "markov_bias.h"
#include "markov_draft_dispatch.h"
#include "vec_sampling.h"

namespace dspark::cpu {
namespace CPU_CAPABILITY {

using core::TileStats;

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
  // Bias of rows [b_begin, b_begin + rows) for ids [v0, v0 + n).
  auto compute_bias = [&](int64_t b_begin, int64_t rows, int64_t v0, int64_t n, int64_t prefetch_end, float* w_rows,
                          c10::BFloat16* w_rows_bf16, float* bias) {
#if defined(CPU_CAPABILITY_AVX512)
    if constexpr (std::is_same_v<W, c10::BFloat16>) {
      if (bf16_dot)
        return markov_bias_chunk(a_bf16.data() + b_begin * r, rows, pb.markov_w2, r, v0, n, prefetch_end, w_rows_bf16,
                                 Bf16Dot{}, bias);
    }
#endif
    markov_bias_chunk(pb.prev_embedding + b_begin * r, rows, pb.markov_w2, r, v0, n, prefetch_end, w_rows, FloatDot{},
                      bias);
  };
  // Tasks are (tile, group of rows). A whole batch per tile reads each W2 row once per step;
  // rows are split into groups (multiples of the 4-row register block) only when there are
  // too few tiles to keep every thread busy, and a tile's groups are neighbouring tasks, so
  // they mostly run on one thread with W2 still in its caches.
  const int64_t wanted_tasks = 4 * static_cast<int64_t>(at::get_num_threads());
  const int64_t wanted_groups = std::clamp<int64_t>((wanted_tasks + num_tiles - 1) / num_tiles, 1, (B + 3) / 4);
  const int64_t rows_per_group = ((B + wanted_groups - 1) / wanted_groups + 3) / 4 * 4;
  const int64_t row_groups = (B + rows_per_group - 1) / rows_per_group;

  for (int64_t k = 0; k < K; ++k) {
    gather_previous_embeddings(pb, k);
    // Exact: the float32 values were widened from W1's bf16.
    for (int64_t i = 0; i < static_cast<int64_t>(a_bf16.size()); ++i) a_bf16[i] = c10::BFloat16(pb.prev_embedding[i]);

    at::parallel_for(0, num_tiles * row_groups, 1, [&](int64_t task_begin, int64_t task_end) {
      std::vector<float> bias(rows_per_group * kBiasChunk), w_rows(4 * r);
      std::vector<c10::BFloat16> w_rows_bf16(bf16_dot ? 4 * r : 0);
      float rounded[kBiasChunk];
      std::vector<TileStats> stats(rows_per_group);
      for (int64_t task = task_begin; task < task_end; ++task) {
        const int64_t tile = task / row_groups, b_begin = (task % row_groups) * rows_per_group;
        const int64_t rows = std::min(rows_per_group, B - b_begin);
        const int64_t lo = tile * kVocabTile, hi = std::min(V, lo + kVocabTile);
        for (int64_t i = 0; i < rows; ++i) stats[i] = TileStats{-INFINITY, 0.0f, -INFINITY, static_cast<int32_t>(lo)};
        for (int64_t v0 = lo; v0 < hi; v0 += kBiasChunk) {
          const int64_t n = std::min(hi, v0 + kBiasChunk) - v0;
          compute_bias(b_begin, rows, v0, n, hi, w_rows.data(), w_rows_bf16.data(), bias.data());
          for (int64_t i = 0; i < rows; ++i) {
            const int64_t b = b_begin + i;
            const int64_t row = (b * K + k) * V;
            write_corrected_logits(pb.base_logits + row + v0, bias.data() + i * kBiasChunk, n,
                                   pb.draft_logits + row + v0, rounded);
            const float temperature = pb.temperature[b];
            if (core::is_greedy(temperature)) {
              const ArgMax best = arg_max_of(rounded, n, v0);
              const ArgMax merged = core::better(ArgMax{stats[i].argmax_value, stats[i].argmax_index}, best);
              stats[i].argmax_value = merged.value;
              stats[i].argmax_index = merged.index;
            } else {
              const MaxSum chunk = segment_max_sum(rounded, 0, n, core::inverse_temperature(temperature));
              const MaxSum merged = core::merge(MaxSum{stats[i].max, stats[i].sum}, chunk);
              stats[i].max = merged.max;
              stats[i].sum = merged.sum;
            }
          }
        }
        for (int64_t i = 0; i < rows; ++i) tile_stats[(b_begin + i) * num_tiles + tile] = stats[i];
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
