// Per-request decisions of dspark::verify shared by the CPU and CUDA kernels.
//
// The op runs in five stages, identical on both backends:
//   1. tile stats   : one pass over each (row, vocab tile): MaxSum of logits/T for sampled
//                     rows (one-hot drafts: excluding the draft token), ArgMax for greedy.
//   2. row summary  : merge each row's tiles into its log-normaliser (or argmax).
//   3. decide       : per request, walk the drafts left to right with the accept rule;
//                     write accepted tokens and what the emitted token must be sampled from.
//   4. residual     : only for sampled drafts rejected at row j: the mass of max(0, p - q)
//                     per tile of row j (the only re-read of a target and a draft row).
//   5. sample       : race between tiles using their totals, then between the tokens of the
//                     winning tile: exact sampling that re-reads one tile instead of the row.
#pragma once

#include <cstdint>

#include "host_device.h"
#include "race.h"
#include "rng.h"
#include "sampling.h"

namespace dspark::core {

// What stage 5 draws the request's emitted token from.
enum class EmitSource : int32_t {
  kDone = 0,          // greedy (already written) or the request is invalid
  kTargetRow = 1,     // bonus row, all drafts accepted: sample p
  kExcludingDraft = 2,// one-hot draft x rejected: sample p restricted to ids != x
  kResidual = 3,      // sampled draft rejected: sample norm(max(0, p - q))
};

// Stage-3 output per request, read by stages 4 and 5.
struct RequestPlan {
  int32_t source;        // EmitSource
  int32_t position;      // draft position k of the emitted row (0..L)
  int32_t excluded_id;   // draft id removed from the row (kExcludingDraft), else -1
  int32_t num_accepted;
  LogNormalizer target_norm;  // of target_row/T at `position`
  LogNormalizer draft_norm;   // of draft_row/T at `position` (kResidual)
  int64_t target_row;    // absolute row of target_logits holding `position`
};

// Everything a backend kernel needs, as raw pointers (the adapters own the tensors).
template <typename LogitT, typename IdT>
struct VerifyProblem {
  const LogitT* target_logits;  // [D + B, V], rows target_row_stride apart, unit inner stride
  int64_t target_row_stride;
  const LogitT* draft_logits;   // [D, V] or nullptr (one-hot drafts)
  int64_t draft_row_stride;
  const IdT* draft_token_ids;   // [D]
  const int32_t* cu_num_draft;  // [B + 1]
  const float* temperature;     // [B]
  const int64_t* seed;          // [B]
  const int64_t* offset;        // [B]
  int64_t num_requests;         // B
  int64_t num_drafts;           // D
  int64_t vocab_size;           // V
  int64_t max_num_draft;
  int64_t* output_token_ids;    // [B, max_num_draft + 1]
  int32_t* num_accepted;        // [B]
  // Scratch, carved from one byte buffer by VerifyScratch.
  TileStats* tile_stats;        // [(D + B) + D, num_tiles]: target rows, then draft rows
  TileStats* row_summary;       // [(D + B) + D]
  RequestPlan* plans;           // [B]
  MaxSum* residual_stats;       // [B, num_tiles]
};

// Byte layout of the scratch buffer: sizes depend on shapes only (CUDA-graph safe).
struct VerifyScratch {
  int64_t tile_stats_offset, row_summary_offset, plans_offset, residual_offset, total_bytes;

  DSPARK_HOST_DEVICE static int64_t align16(int64_t bytes) { return (bytes + 15) / 16 * 16; }

  DSPARK_HOST_DEVICE static VerifyScratch layout(int64_t num_requests, int64_t num_drafts, int64_t vocab_size) {
    const int64_t rows = 2 * num_drafts + num_requests;
    const int64_t tiles = num_vocab_tiles(vocab_size);
    VerifyScratch s{};
    s.tile_stats_offset = 0;
    s.row_summary_offset = align16(rows * tiles * static_cast<int64_t>(sizeof(TileStats)));
    s.plans_offset = s.row_summary_offset + align16(rows * static_cast<int64_t>(sizeof(TileStats)));
    s.residual_offset = s.plans_offset + align16(num_requests * static_cast<int64_t>(sizeof(RequestPlan)));
    s.total_bytes = s.residual_offset + align16(num_requests * tiles * static_cast<int64_t>(sizeof(MaxSum)));
    return s;
  }

  template <typename LogitT, typename IdT>
  DSPARK_HOST_DEVICE void carve(unsigned char* base, VerifyProblem<LogitT, IdT>* p) const {
    p->tile_stats = reinterpret_cast<TileStats*>(base + tile_stats_offset);
    p->row_summary = reinterpret_cast<TileStats*>(base + row_summary_offset);
    p->plans = reinterpret_cast<RequestPlan*>(base + plans_offset);
    p->residual_stats = reinterpret_cast<MaxSum*>(base + residual_offset);
  }
};

// Row layout of a well-formed request, or false when cu_num_draft is malformed
// (only reachable on CUDA, where values are not checked on the host).
struct RequestRows {
  int64_t draft_begin;  // first draft index == first draft_logits row
  int32_t num_draft;
  int64_t target_begin; // first target_logits row
};

DSPARK_HOST_DEVICE bool request_rows(const int32_t* cu_num_draft, int64_t request,
                                     int64_t num_drafts_total, int64_t max_num_draft,
                                     RequestRows* rows) {
  const int64_t begin = cu_num_draft[request];
  const int64_t end = cu_num_draft[request + 1];
  if (begin < 0 || end < begin || end > num_drafts_total || end - begin > max_num_draft) return false;
  *rows = RequestRows{begin, static_cast<int32_t>(end - begin), begin + request};
  return true;
}

DSPARK_HOST_DEVICE int64_t clamp_token(int64_t id, int64_t vocab_size, bool* in_range) {
  *in_range = id >= 0 && id < vocab_size;
  return *in_range ? id : 0;
}

// Stage 5 keys (core/race.h) in verify's streams. Position is the draft position of the
// emitted row, so a request's random stream does not depend on where its rows sit in the batch.
DSPARK_HOST_DEVICE RandomPurpose verify_tile_purpose(bool fallback) {
  return fallback ? RandomPurpose::kVerifyFallbackTileRace : RandomPurpose::kVerifyTileRace;
}

DSPARK_HOST_DEVICE RandomPurpose verify_token_purpose(bool fallback) {
  return fallback ? RandomPurpose::kVerifyFallbackTokenRace : RandomPurpose::kVerifyTokenRace;
}

DSPARK_HOST_DEVICE float accept_uniform(uint64_t seed, uint64_t offset, int32_t position) {
  return uniform(seed, offset, static_cast<uint32_t>(position), 0u, RandomPurpose::kVerifyAccept);
}

// The accept rule at draft position k of one request, from the row summaries of stage 2
// (log-normaliser for sampled rows, argmax for greedy rows) of that position.
struct DraftJudgement {
  bool accepted;
  int32_t excluded_id;        // a rejected one-hot draft that carries mass, else -1
  LogNormalizer target_norm;  // sampled rows: of target_row/T at k
  LogNormalizer draft_norm;   // sampled drafts: of draft_row/T at k
};

template <typename LogitT, typename IdT, typename LoadLogit>
DSPARK_HOST_DEVICE DraftJudgement judge_draft(
    const LogitT* target_logits, int64_t target_row_stride, const LogitT* draft_logits, int64_t draft_row_stride,
    const IdT* draft_token_ids, const TileStats& target_summary, const TileStats* draft_summary,
    const RequestRows& rows, int32_t k, int64_t vocab_size, float temperature, uint64_t seed, uint64_t offset,
    LoadLogit load_logit) {
  DraftJudgement j{false, -1, {0.0f, 0.0f}, {0.0f, 0.0f}};
  bool in_range;
  const int64_t x = clamp_token(static_cast<int64_t>(draft_token_ids[rows.draft_begin + k]), vocab_size, &in_range);
  if (is_greedy(temperature)) {
    j.accepted = in_range && target_summary.argmax_index == x;
    return j;
  }
  const float inv_t = inverse_temperature(temperature);
  const int64_t target_row = rows.target_begin + k;
  const float log_p_unnorm =
      in_range ? sanitize_logit(load_logit(target_logits, target_row * target_row_stride + x) * inv_t) : -INFINITY;
  MaxSum target_total{target_summary.max, target_summary.sum};
  float log_q;
  if (draft_logits == nullptr) {
    // Stage 1 left the one-hot draft token out of the row total; add it back for p.
    target_total = add_term(target_total, log_p_unnorm);
    log_q = in_range ? 0.0f : -INFINITY;
  } else {
    j.draft_norm = normalizer_of(MaxSum{draft_summary->max, draft_summary->sum});
    const int64_t draft_row = rows.draft_begin + k;
    log_q = in_range ? log_probability(sanitize_logit(load_logit(draft_logits, draft_row * draft_row_stride + x) * inv_t),
                                       j.draft_norm)
                     : -INFINITY;
  }
  j.target_norm = normalizer_of(target_total);
  j.accepted = accept_draft(log_probability(log_p_unnorm, j.target_norm), log_q, accept_uniform(seed, offset, k));
  // Excluded only if it carries mass: a rejected draft without any is never emitted.
  j.excluded_id = (!j.accepted && draft_logits == nullptr && log_p_unnorm > -INFINITY) ? static_cast<int32_t>(x) : -1;
  return j;
}

// Stage 3 for one request: judge_draft left to right until the first rejection (the rows
// after it are never read). Writes the accepted draft ids, -1 padding, and for greedy
// requests the emitted token.
template <typename LogitT, typename IdT, typename LoadLogit>
DSPARK_HOST_DEVICE RequestPlan decide_request(
    const LogitT* target_logits, int64_t target_row_stride, const LogitT* draft_logits,
    int64_t draft_row_stride, const IdT* draft_token_ids, const TileStats* target_summary,
    const TileStats* draft_summary, const RequestRows& rows, int64_t vocab_size, float temperature,
    uint64_t seed, uint64_t offset, int64_t* output_row, int64_t output_width, LoadLogit load_logit) {
  RequestPlan plan{static_cast<int32_t>(EmitSource::kDone), 0, -1, 0, {0.0f, 0.0f}, {0.0f, 0.0f}, rows.target_begin};
  for (int64_t i = 0; i < output_width; ++i) output_row[i] = -1;
  const bool greedy = is_greedy(temperature);

  int32_t k = 0;
  for (; k < rows.num_draft; ++k) {
    const DraftJudgement j =
        judge_draft(target_logits, target_row_stride, draft_logits, draft_row_stride, draft_token_ids, target_summary[k],
                    draft_logits == nullptr ? nullptr : draft_summary + k, rows, k, vocab_size, temperature, seed,
                    offset, load_logit);
    if (!j.accepted) {
      plan.excluded_id = j.excluded_id;
      plan.target_norm = j.target_norm;
      plan.draft_norm = j.draft_norm;
      break;
    }
    output_row[k] = draft_token_ids[rows.draft_begin + k];
  }
  plan.num_accepted = k;
  plan.position = k;
  plan.target_row = rows.target_begin + k;
  if (greedy) {
    output_row[k] = target_summary[k].argmax_index;
    plan.source = static_cast<int32_t>(EmitSource::kDone);
  } else if (k == rows.num_draft) {
    plan.source = static_cast<int32_t>(EmitSource::kTargetRow);
  } else if (draft_logits == nullptr) {
    plan.source = static_cast<int32_t>(EmitSource::kExcludingDraft);
  } else {
    plan.source = static_cast<int32_t>(EmitSource::kResidual);
  }
  return plan;
}

// Stage 4: residual mass of one token, MaxSum{0, sum of these} per tile.
DSPARK_HOST_DEVICE float residual_mass(float target_logit, float draft_logit, float inv_t,
                                       LogNormalizer target_norm, LogNormalizer draft_norm) {
  return residual_probability(log_probability(sanitize_logit(target_logit * inv_t), target_norm),
                              log_probability(sanitize_logit(draft_logit * inv_t), draft_norm));
}

DSPARK_HOST_DEVICE MaxSum residual_tile_total(float mass_sum) { return MaxSum{mass_sum > 0.0f ? 0.0f : -INFINITY, mass_sum}; }

// Stage 5: log-weight of token i in the residual norm(max(0, p - q)) of the rejected row
// (log space keeps the race exact for tiny p).
DSPARK_HOST_DEVICE float residual_log_weight(float target_logit, float draft_logit, float inv_t,
                                             LogNormalizer target_norm, LogNormalizer draft_norm) {
  return log_residual(log_probability(sanitize_logit(target_logit * inv_t), target_norm),
                      log_probability(sanitize_logit(draft_logit * inv_t), draft_norm));
}

}  // namespace dspark::core
