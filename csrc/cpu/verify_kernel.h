// CPU kernel of dspark::verify, compiled once per instruction set (csrc/cpu/isa/*.cpp
// define CPU_CAPABILITY), so at::vec::Vectorized is AVX-512, AVX2 or plain C++.
// The five stages and every decision come from csrc/core/verify_request.h.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/record_function.h>

#include <algorithm>
#include <cmath>
#include <optional>
#include <vector>

#include "../core/verify_request.h"
#include "vec_sampling.h"
#include "verify_dispatch.h"

namespace dspark::cpu {
namespace CPU_CAPABILITY {

using core::TileStats;

// log max(0, p - q) of row[lo, lo + n) into out (core::residual_log_weight, vectorized).
template <typename T>
void residual_log_weights(const T* target_row, const T* draft_row, int64_t lo, int64_t n, float inv_t,
                          core::LogNormalizer target_norm, core::LogNormalizer draft_norm, float* out) {
  const int64_t n_vec = n - n % kLanes;
  const Vec v_inv_t(inv_t), v_neg_inf(-INFINITY);
  const Vec v_p_max(target_norm.max), v_p_log_sum(target_norm.log_sum);
  const Vec v_q_max(draft_norm.max), v_q_log_sum(draft_norm.log_sum);
  for (int64_t i = 0; i < n_vec; i += kLanes) {  // core::log_probability, then core::log_residual
    const Vec log_p = (sanitized_scaled(load_floats(target_row + lo + i), v_inv_t) - v_p_max) - v_p_log_sum;
    // NaN log q (a draft row without mass) is q = 0: core::draft_log_prob_or_zero_mass.
    const Vec log_q = max_ignoring_nan(
        v_neg_inf, (sanitized_scaled(load_floats(draft_row + lo + i), v_inv_t) - v_q_max) - v_q_log_sum);
    const Vec log_w = log_p + (Vec(0.0f) - (log_q - log_p).expm1()).log();
    Vec::blendv(v_neg_inf, log_w, log_p > log_q).store(out + i);
  }
  for (int64_t i = n_vec; i < n; ++i)
    out[i] = core::residual_log_weight(to_float(target_row[lo + i]), to_float(draft_row[lo + i]), inv_t,
                                       target_norm, draft_norm);
}

// Sum of core::residual_mass over row[lo, lo + n), vectorized.
template <typename T>
float residual_mass_sum(const T* target_row, const T* draft_row, int64_t lo, int64_t n, float inv_t,
                        core::LogNormalizer target_norm, core::LogNormalizer draft_norm) {
  const int64_t n_vec = n - n % kLanes;
  const Vec v_inv_t(inv_t), v_zero(0.0f), v_neg_inf(-INFINITY);
  const Vec v_p_max(target_norm.max), v_p_log_sum(target_norm.log_sum);
  const Vec v_q_max(draft_norm.max), v_q_log_sum(draft_norm.log_sum);
  Vec v_sum(0.0f);
  for (int64_t i = 0; i < n_vec; i += kLanes) {
    const Vec log_p = (sanitized_scaled(load_floats(target_row + lo + i), v_inv_t) - v_p_max) - v_p_log_sum;
    // NaN log p or log q (a row without mass) is probability 0 (core::residual_probability).
    const Vec p = exp_two_ulp(max_ignoring_nan(v_neg_inf, log_p));
    const Vec draft = load_floats(draft_row + lo + i);
    if (all_negative_infinity(draft)) {  // q = 0 in every lane: max(p - 0, 0) = p, bit for bit
      v_sum += p;
      continue;
    }
    const Vec log_q = (sanitized_scaled(draft, v_inv_t) - v_q_max) - v_q_log_sum;
    const Vec q = exp_two_ulp(max_ignoring_nan(v_neg_inf, log_q));
    v_sum += at::vec::maximum(p - q, v_zero);
  }
  float sum = lane_sum(v_sum);
  for (int64_t i = n_vec; i < n; ++i)
    sum += core::residual_mass(to_float(target_row[lo + i]), to_float(draft_row[lo + i]), inv_t, target_norm, draft_norm);
  return sum;
}

// A profiler range that ends where the next one starts (or at the end of the op).
struct StageScope {
  at::RecordFunction guard{at::RecordScope::USER_SCOPE};
  explicit StageScope(const char* name) {
    if (guard.isActive()) guard.before(std::string_view(name));
  }
};

template <typename LogitT, typename IdT>
void run_verify(const core::VerifyProblem<LogitT, IdT>& pb) {
  const int64_t B = pb.num_requests, D = pb.num_drafts, V = pb.vocab_size;
  const int64_t tiles = core::num_vocab_tiles(V);
  const int64_t target_rows = D + B;
  const bool sampled_drafts = pb.draft_logits != nullptr;
  const int64_t rows = target_rows + (sampled_drafts ? D : 0);
  auto load_logit = [](const LogitT* base, int64_t index) { return to_float(base[index]); };
  // Each stage is a torch.profiler range (bench/profile_verify_cpu.py sums them); free when no
  // profiler is on.
  std::optional<StageScope> stage_scope;

  // Row -> (request, draft position); cu_num_draft was validated by the launcher.
  std::vector<int32_t> row_request(rows), row_position(rows);
  for (int64_t b = 0; b < B; ++b) {
    const int64_t begin = pb.cu_num_draft[b], num_draft = pb.cu_num_draft[b + 1] - begin;
    for (int64_t k = 0; k <= num_draft; ++k) {
      row_request[begin + b + k] = static_cast<int32_t>(b);
      row_position[begin + b + k] = static_cast<int32_t>(k);
      if (sampled_drafts && k < num_draft) {
        row_request[target_rows + begin + k] = static_cast<int32_t>(b);
        row_position[target_rows + begin + k] = static_cast<int32_t>(k);
      }
    }
  }

  // Stages 1 and 2 run in waves, one per draft position k: wave k reads only the rows at
  // position k of the requests that accepted every draft before k (core::judge_draft on the
  // row summaries decides who goes on). Rows after a request's first rejection are never
  // read, so a request costs 1 + (accepted drafts) row passes instead of K + 1; every
  // decision is the one stage 3 takes on the full rows.
  auto tile_stats_of = [&](int64_t row, int64_t tile) {
    const int64_t lo = tile * kVocabTile, hi = std::min(V, lo + kVocabTile);
    const int64_t b = row_request[row];
    const float temperature = pb.temperature[b];
    TileStats stats{-INFINITY, 0.0f, -INFINITY, static_cast<int32_t>(lo)};
    if (row < target_rows) {
      const LogitT* logits = pb.target_logits + row * pb.target_row_stride;
      if (core::is_greedy(temperature)) {
        // The max only: stage 2 locates the argmax inside the first tile holding the row max.
        stats.argmax_value = max_of(logits + lo, hi - lo);
      } else {
        const float inv_t = core::inverse_temperature(temperature);
        const int64_t k = row_position[row];
        const int64_t begin = pb.cu_num_draft[b], num_draft = pb.cu_num_draft[b + 1] - begin;
        // One-hot drafts: leave the draft token out; its residual is p without it.
        const int64_t excluded = (!sampled_drafts && k < num_draft) ? static_cast<int64_t>(pb.draft_token_ids[begin + k]) : -1;
        const MaxSum total = (excluded >= lo && excluded < hi)
                                 ? core::merge(segment_max_sum(logits, lo, excluded, inv_t),
                                               segment_max_sum(logits, excluded + 1, hi, inv_t))
                                 : segment_max_sum(logits, lo, hi, inv_t);
        stats.max = total.max;
        stats.sum = total.sum;
      }
    } else if (!core::is_greedy(temperature)) {
      const MaxSum total = segment_max_sum<LogitT, true>(pb.draft_logits + (row - target_rows) * pb.draft_row_stride,
                                                         lo, hi, core::inverse_temperature(temperature));
      stats.max = total.max;
      stats.sum = total.sum;
    }
    pb.tile_stats[row * tiles + tile] = stats;
  };
  auto summarize_row = [&](int64_t row) {
    const TileStats* tile = pb.tile_stats + row * tiles;
    MaxSum total = core::empty_max_sum();
    ArgMax best{-INFINITY, 0};
    for (int64_t t = 0; t < tiles; ++t) {
      total = core::merge(total, MaxSum{tile[t].max, tile[t].sum});
      best = core::better(best, ArgMax{tile[t].argmax_value, tile[t].argmax_index});
    }
    if (row < target_rows && core::is_greedy(pb.temperature[row_request[row]])) {
      const int64_t lo = best.index;  // first id of the first tile holding the row max
      best = arg_max_of(pb.target_logits + row * pb.target_row_stride + lo, std::min(V, lo + kVocabTile) - lo, lo);
    }
    pb.row_summary[row] = TileStats{total.max, total.sum, best.value, best.index};
  };

  std::vector<core::RequestRows> requests(B);
  std::vector<int64_t> walking, still_walking, wave_rows;  // requests whose walk reaches this position
  for (int64_t b = 0; b < B; ++b) {
    core::request_rows(pb.cu_num_draft, b, D, pb.max_num_draft, &requests[b]);
    walking.push_back(b);
  }
  for (int32_t k = 0; !walking.empty(); ++k) {
    wave_rows.clear();
    for (const int64_t b : walking) {
      wave_rows.push_back(requests[b].target_begin + k);
      if (sampled_drafts && k < requests[b].num_draft && !core::is_greedy(pb.temperature[b]))
        wave_rows.push_back(target_rows + requests[b].draft_begin + k);  // greedy rows ignore draft logits
    }
    stage_scope.emplace("dspark::verify/tile_stats");
    const int64_t wave_tasks = static_cast<int64_t>(wave_rows.size()) * tiles;
    at::parallel_for(0, wave_tasks, kTilesPerChunk, [&](int64_t task_begin, int64_t task_end) {
      for (int64_t task = task_begin; task < task_end; ++task) tile_stats_of(wave_rows[task / tiles], task % tiles);
    });
    stage_scope.emplace("dspark::verify/row_summaries");
    at::parallel_for(0, static_cast<int64_t>(wave_rows.size()), kCheapItemsPerChunk, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) summarize_row(wave_rows[i]);
    });
    still_walking.clear();
    for (const int64_t b : walking) {
      const core::RequestRows& request = requests[b];
      if (k == request.num_draft) continue;  // the bonus row: every draft accepted
      const core::DraftJudgement j = core::judge_draft(
          pb.target_logits, pb.target_row_stride, pb.draft_logits, pb.draft_row_stride, pb.draft_token_ids,
          pb.row_summary[request.target_begin + k],
          sampled_drafts ? pb.row_summary + target_rows + request.draft_begin + k : nullptr, request, k, V,
          pb.temperature[b], static_cast<uint64_t>(pb.seed[b]), static_cast<uint64_t>(pb.offset[b]), load_logit);
      if (j.accepted) still_walking.push_back(b);
    }
    walking.swap(still_walking);
  }

  // Stage 3: decide.
  stage_scope.emplace("dspark::verify/decide");
  const int64_t width = pb.max_num_draft + 1;
  at::parallel_for(0, B, kCheapItemsPerChunk, [&](int64_t b_begin, int64_t b_end) {
    for (int64_t b = b_begin; b < b_end; ++b) {
      const core::RequestRows& request = requests[b];
      pb.plans[b] = core::decide_request(
          pb.target_logits, pb.target_row_stride, pb.draft_logits, pb.draft_row_stride, pb.draft_token_ids,
          pb.row_summary + request.target_begin, pb.row_summary + target_rows + request.draft_begin, request, V,
          pb.temperature[b], static_cast<uint64_t>(pb.seed[b]), static_cast<uint64_t>(pb.offset[b]),
          pb.output_token_ids + b * width, width, load_logit);
      pb.num_accepted[b] = pb.plans[b].num_accepted;
    }
  });

  // Stage 4: residual tile stats of the rejected row (sampled drafts only).
  stage_scope.emplace("dspark::verify/residual_tile_stats");
  if (sampled_drafts) {
    at::parallel_for(0, B * tiles, kTilesPerChunk, [&](int64_t task_begin, int64_t task_end) {
      for (int64_t task = task_begin; task < task_end; ++task) {
        const int64_t b = task / tiles, tile = task % tiles;
        const core::RequestPlan& plan = pb.plans[b];
        if (plan.source != static_cast<int32_t>(core::EmitSource::kResidual)) continue;
        const int64_t lo = tile * kVocabTile, hi = std::min(V, lo + kVocabTile);
        const int64_t draft_row = plan.target_row - b;  // draft index of the rejected position
        pb.residual_stats[task] = core::residual_tile_total(residual_mass_sum(
            pb.target_logits + plan.target_row * pb.target_row_stride, pb.draft_logits + draft_row * pb.draft_row_stride,
            lo, hi - lo, core::inverse_temperature(pb.temperature[b]), plan.target_norm, plan.draft_norm));
      }
    });
  }

  // Stage 5: sample the emitted token with a race between tiles, then inside the winner.
  stage_scope.emplace("dspark::verify/race");
  at::parallel_for(0, B, 2, [&](int64_t b_begin, int64_t b_end) {
    for (int64_t b = b_begin; b < b_end; ++b) {
      const core::RequestPlan& plan = pb.plans[b];
      if (plan.source == static_cast<int32_t>(core::EmitSource::kDone)) continue;
      const uint64_t seed = static_cast<uint64_t>(pb.seed[b]), offset = static_cast<uint64_t>(pb.offset[b]);
      const float inv_t = core::inverse_temperature(pb.temperature[b]);
      const LogitT* target_row = pb.target_logits + plan.target_row * pb.target_row_stride;
      const LogitT* draft_row = sampled_drafts ? pb.draft_logits + (plan.target_row - b) * pb.draft_row_stride : nullptr;
      bool residual = plan.source == static_cast<int32_t>(core::EmitSource::kResidual);
      bool fallback = false;

      auto tile_total = [&](bool use_residual, int64_t t) {
        const TileStats& stats = pb.tile_stats[plan.target_row * tiles + t];
        return use_residual ? pb.residual_stats[b * tiles + t] : MaxSum{stats.max, stats.sum};
      };
      auto race_tiles = [&](bool use_residual, bool is_fallback) {
        float shift = -INFINITY;
        for (int64_t t = 0; t < tiles; ++t) shift = std::max(shift, tile_total(use_residual, t).max);
        ArgMax winner{-INFINITY, -1};
        for (int64_t t = 0; t < tiles; ++t) {
          const float key = core::tile_race_key(tile_total(use_residual, t), shift, seed, offset, plan.position, t,
                                                core::verify_tile_purpose(is_fallback));
          winner = core::better(winner, ArgMax{key, static_cast<int32_t>(t)});
        }
        return winner;
      };
      ArgMax tile = race_tiles(residual, false);
      if (tile.value == -INFINITY && residual) {  // p - q has no mass left: p == q up to rounding
        residual = false;
        fallback = true;
        tile = race_tiles(false, true);
      }
      int64_t token;
      if (tile.value == -INFINITY) {
        token = plan.excluded_id >= 0 ? plan.excluded_id : 0;  // all mass on the excluded draft, or no finite logit
      } else {
        const int64_t lo = static_cast<int64_t>(tile.index) * kVocabTile, n = std::min(V, lo + kVocabTile) - lo;
        float log_weights[kVocabTile];
        if (residual) {
          residual_log_weights(target_row, draft_row, lo, n, inv_t, plan.target_norm, plan.draft_norm, log_weights);
        } else {
          target_log_weights(target_row, lo, n, inv_t, plan.excluded_id, log_weights);
        }
        const float shift = tile_total(residual, tile.index).max;
        token = race_tokens(log_weights, shift, lo, n, seed, offset, plan.position, core::verify_token_purpose(fallback)).index;
      }
      pb.output_token_ids[b * width + plan.position] = token;
    }
  });
}

}  // namespace CPU_CAPABILITY
}  // namespace dspark::cpu
