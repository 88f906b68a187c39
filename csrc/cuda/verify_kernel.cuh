// CUDA kernels of dspark::verify: framework-free (raw pointers and a cudaStream_t).
// The five stages are those of csrc/core/verify_request.h and compute, stage by stage,
// the quantities of the CPU kernel (csrc/cpu/verify_kernel.h): same vocabulary tiles,
// same core:: functions for every decision and random number, same fallbacks.
// Unlike the CPU launcher, nothing here trusts cu_num_draft or draft_token_ids: every
// index derived from them is checked on the device (core::request_rows, clamp_token).
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "../core/race.h"
#include "../core/verify_request.h"
#include "element_access.cuh"
#include "reductions.cuh"

namespace dspark::gpu {

using core::RequestPlan;
using core::TileStats;
using core::kVocabTile;

// Stages 1, 4 and 5 run kTileThreads-thread blocks (reductions.cuh), kIdsPerThread ids each.
constexpr int kRowSummaryThreads = 256;
constexpr int kDecideThreads = 128;
static_assert(kTileThreads * kIdsPerThread == kVocabTile, "one sweep of a block must cover exactly one tile");
static_assert(kIdsPerThread == 8, "stage 5 draws the token-race uniforms of 8 ids with two Philox calls");

// The element loader core::decide_request calls.
template <typename T>
struct LogitLoader {
  DSPARK_HOST_DEVICE float operator()(const T* base, int64_t index) const { return to_float(base[index]); }
};

// ---------------------------------------------------------------------------------------
// Stage 1: tile stats, one block per (row, tile).

// The request owning `row`: the largest b in [0, B) whose first row cu[b] + b * row_bias is
// <= row (row_bias 1 for target rows, where request b starts at cu[b] + b; 0 for draft rows).
// Reads cu[0, B) only; with a malformed cu_num_draft the answer may not hold the row, which
// the caller checks against core::request_rows.
__device__ __forceinline__ int64_t owning_request(const int32_t* cu_num_draft, int64_t num_requests, int64_t row,
                                                  int64_t row_bias) {
  int64_t lo = 0, hi = num_requests - 1;
  while (lo < hi) {
    const int64_t mid = lo + (hi - lo + 1) / 2;
    if (static_cast<int64_t>(cu_num_draft[mid]) + mid * row_bias <= row) {
      lo = mid;
    } else {
      hi = mid - 1;
    }
  }
  return lo;
}

template <bool kVectorLoads, typename T, typename IdT>
__global__ void __launch_bounds__(kTileThreads) verify_tile_stats_kernel(core::VerifyProblem<T, IdT> pb) {
  __shared__ union {
    typename BlockArgMax::TempStorage arg_max;
    typename BlockMaxSum::TempStorage max_sum;
  } temp;
  const int64_t B = pb.num_requests, D = pb.num_drafts, V = pb.vocab_size;
  const int64_t tiles = core::num_vocab_tiles(V);
  const int64_t target_rows = D + B;
  const bool sampled_drafts = pb.draft_logits != nullptr;
  const int64_t tasks = (target_rows + (sampled_drafts ? D : 0)) * tiles;

  for (int64_t task = blockIdx.x; task < tasks; task += gridDim.x) {
    const int64_t row = task / tiles, tile = task - row * tiles;
    const int64_t lo = tile * kVocabTile;
    const int64_t first = lo + static_cast<int64_t>(threadIdx.x) * kIdsPerThread;
    const bool is_target = row < target_rows;
    const int64_t local_row = is_target ? row : row - target_rows;  // target row, or draft index
    const T* logits = is_target ? pb.target_logits + local_row * pb.target_row_stride
                                : pb.draft_logits + local_row * pb.draft_row_stride;
    const int64_t b = owning_request(pb.cu_num_draft, B, local_row, is_target ? 1 : 0);
    core::RequestRows request{};
    bool owned = core::request_rows(pb.cu_num_draft, b, D, pb.max_num_draft, &request);
    const int64_t k = is_target ? local_row - request.target_begin : local_row - request.draft_begin;
    owned = owned && k >= 0 && (is_target ? k <= request.num_draft : k < request.num_draft);

    // Everything below is uniform over the block (one row, one request).
    TileStats stats{-INFINITY, 0.0f, -INFINITY, static_cast<int32_t>(lo)};
    const float temperature = owned ? pb.temperature[b] : 0.0f;
    // Draft rows of greedy requests (and unowned rows) are never read: their stats stay empty.
    const bool needed = owned && (is_target || !core::is_greedy(temperature));
    float x[kIdsPerThread];
    if (needed) load_chunk<kVectorLoads>(logits, first, V, x);
    if (needed && core::is_greedy(temperature)) {
      ArgMax best = core::empty_arg_max();
#pragma unroll
      for (int j = 0; j < kIdsPerThread; ++j) {
        // NaN must never become the running best: better() could not displace it.
        if (first + j < V) best = core::better(best, ArgMax{x[j] != x[j] ? -INFINITY : x[j], static_cast<int32_t>(first + j)});
      }
      best = BlockArgMax(temp.arg_max).Reduce(best, PickBetter{});
      stats.argmax_value = best.value;  // an all -inf/NaN tile answers {-inf, lo}: ties go to the lowest id
      stats.argmax_index = best.index;
    } else if (needed) {
      const float inv_t = core::inverse_temperature(temperature);
      // One-hot drafts: leave the draft token out of its row; an out-of-range id lies in no tile.
      const int64_t excluded = (is_target && !sampled_drafts && k < request.num_draft)
                                   ? static_cast<int64_t>(pb.draft_token_ids[request.draft_begin + k])
                                   : -1;
      float log_weights[kIdsPerThread];
#pragma unroll
      for (int j = 0; j < kIdsPerThread; ++j) {
        const int64_t id = first + j;
        log_weights[j] = (id < V && id != excluded) ? core::sanitize_logit(x[j] * inv_t) : -INFINITY;
      }
      const MaxSum total = BlockMaxSum(temp.max_sum).Reduce(chunk_max_sum(log_weights), MergeMaxSum{});
      stats.max = total.max;
      stats.sum = total.sum;
    }
    if (threadIdx.x == 0) pb.tile_stats[task] = stats;
    __syncthreads();  // temp is reused by the next task
  }
}

// ---------------------------------------------------------------------------------------
// Stage 2: row summaries, one warp per row.

__global__ void __launch_bounds__(kRowSummaryThreads)
    verify_row_summary_kernel(const TileStats* tile_stats, TileStats* row_summary, int64_t rows, int64_t tiles) {
  constexpr int64_t kWarpsPerBlock = kRowSummaryThreads / kWarpSize;
  const int lane = static_cast<int>(threadIdx.x) % kWarpSize;
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarpSize; row < rows;
       row += static_cast<int64_t>(gridDim.x) * kWarpsPerBlock) {
    MaxSum total = core::empty_max_sum();
    ArgMax best{-INFINITY, 0};  // the CPU's initial value: an all -inf row answers id 0
    for (int64_t t = lane; t < tiles; t += kWarpSize) {
      const TileStats s = tile_stats[row * tiles + t];
      total = core::merge(total, MaxSum{s.max, s.sum});
      best = core::better(best, ArgMax{s.argmax_value, s.argmax_index});
    }
#pragma unroll
    for (int distance = kWarpSize / 2; distance > 0; distance /= 2) {
      total = core::merge(total, MaxSum{__shfl_xor_sync(0xFFFFFFFFu, total.max, distance),
                                        __shfl_xor_sync(0xFFFFFFFFu, total.sum, distance)});
      best = core::better(best, ArgMax{__shfl_xor_sync(0xFFFFFFFFu, best.value, distance),
                                       __shfl_xor_sync(0xFFFFFFFFu, best.index, distance)});
    }
    if (lane == 0) row_summary[row] = TileStats{total.max, total.sum, best.value, best.index};
  }
}

// ---------------------------------------------------------------------------------------
// Stage 3: decide, one thread per request.

template <typename T, typename IdT>
__global__ void __launch_bounds__(kDecideThreads) verify_decide_kernel(core::VerifyProblem<T, IdT> pb) {
  const int64_t width = pb.max_num_draft + 1;
  const int64_t target_rows = pb.num_drafts + pb.num_requests;
  for (int64_t b = static_cast<int64_t>(blockIdx.x) * kDecideThreads + threadIdx.x; b < pb.num_requests;
       b += static_cast<int64_t>(gridDim.x) * kDecideThreads) {
    int64_t* output_row = pb.output_token_ids + b * width;
    core::RequestRows request;
    RequestPlan plan;
    if (core::request_rows(pb.cu_num_draft, b, pb.num_drafts, pb.max_num_draft, &request)) {
      plan = core::decide_request(pb.target_logits, pb.target_row_stride, pb.draft_logits, pb.draft_row_stride,
                                  pb.draft_token_ids, pb.row_summary + request.target_begin,
                                  pb.row_summary + target_rows + request.draft_begin, request, pb.vocab_size,
                                  pb.temperature[b], static_cast<uint64_t>(pb.seed[b]),
                                  static_cast<uint64_t>(pb.offset[b]), output_row, width, LogitLoader<T>{});
    } else {  // malformed cu_num_draft: nothing accepted, nothing emitted
      for (int64_t i = 0; i < width; ++i) output_row[i] = -1;
      plan = RequestPlan{static_cast<int32_t>(core::EmitSource::kDone), 0, -1, 0, 0.0f, 0.0f, 0};
    }
    pb.plans[b] = plan;
    pb.num_accepted[b] = plan.num_accepted;
  }
}

// ---------------------------------------------------------------------------------------
// Stage 4: residual mass per tile of the rejected row, one block per (request, tile).

template <bool kVectorLoads, typename T, typename IdT>
__global__ void __launch_bounds__(kTileThreads) verify_residual_stats_kernel(core::VerifyProblem<T, IdT> pb) {
  __shared__ typename BlockSum::TempStorage temp;
  const int64_t V = pb.vocab_size;
  const int64_t tiles = core::num_vocab_tiles(V);
  const int64_t tasks = pb.num_requests * tiles;
  for (int64_t task = blockIdx.x; task < tasks; task += gridDim.x) {
    const int64_t b = task / tiles, tile = task - b * tiles;
    const RequestPlan plan = pb.plans[b];
    if (plan.source != static_cast<int32_t>(core::EmitSource::kResidual)) continue;  // uniform over the block
    const int64_t first = tile * kVocabTile + static_cast<int64_t>(threadIdx.x) * kIdsPerThread;
    const int64_t draft_row = plan.target_row - b;  // draft index of the rejected position
    float target[kIdsPerThread], draft[kIdsPerThread];
    load_chunk<kVectorLoads>(pb.target_logits + plan.target_row * pb.target_row_stride, first, V, target);
    load_chunk<kVectorLoads>(pb.draft_logits + draft_row * pb.draft_row_stride, first, V, draft);
    const float inv_t = core::inverse_temperature(pb.temperature[b]);
    float mass = 0.0f;
#pragma unroll
    for (int j = 0; j < kIdsPerThread; ++j) {
      if (first + j < V) mass += core::residual_mass(target[j], draft[j], inv_t, plan.target_norm, plan.draft_norm);
    }
    const MaxSum total = core::residual_tile_total(BlockSum(temp).Sum(mass));
    if (threadIdx.x == 0) pb.residual_stats[task] = total;
    __syncthreads();  // temp is reused by the next task
  }
}

// ---------------------------------------------------------------------------------------
// Stage 5: sample the emitted token, one block per request: a race between tiles on
// their totals, then a race between the tokens of the winning tile.

__device__ __forceinline__ MaxSum tile_total(const TileStats* row_tiles, const MaxSum* residual_tiles,
                                              bool use_residual, int64_t t) {
  return use_residual ? residual_tiles[t] : MaxSum{row_tiles[t].max, row_tiles[t].sum};
}

// Winner of the race between the tiles of one row ({-inf, -1} when no tile has mass).
// Keys are shifted by the largest tile max, exactly as on the CPU (core::tile_race_key).
__device__ __forceinline__ ArgMax race_tiles(const TileStats* row_tiles, const MaxSum* residual_tiles,
                                             bool use_residual, int64_t tiles, uint64_t seed, uint64_t offset,
                                             int32_t position, bool fallback, typename BlockArgMax::TempStorage& temp,
                                             ArgMax& shared) {
  ArgMax largest_max{-INFINITY, 0};
  for (int64_t t = threadIdx.x; t < tiles; t += kTileThreads)
    largest_max = core::better(largest_max, ArgMax{tile_total(row_tiles, residual_tiles, use_residual, t).max, 0});
  const float shift = block_best(largest_max, temp, shared).value;
  ArgMax winner{-INFINITY, -1};
  for (int64_t t = threadIdx.x; t < tiles; t += kTileThreads) {
    const float key = core::tile_race_key(tile_total(row_tiles, residual_tiles, use_residual, t), shift, seed, offset,
                                          position, t, core::verify_tile_purpose(fallback));
    winner = core::better(winner, ArgMax{key, static_cast<int32_t>(t)});
  }
  return block_best(winner, temp, shared);
}

template <bool kVectorLoads, typename T, typename IdT>
__global__ void __launch_bounds__(kTileThreads) verify_sample_kernel(core::VerifyProblem<T, IdT> pb) {
  __shared__ typename BlockArgMax::TempStorage temp;
  __shared__ ArgMax shared_best;
  const int64_t V = pb.vocab_size;
  const int64_t tiles = core::num_vocab_tiles(V);
  const int64_t width = pb.max_num_draft + 1;
  for (int64_t b = blockIdx.x; b < pb.num_requests; b += gridDim.x) {
    const RequestPlan plan = pb.plans[b];
    if (plan.source == static_cast<int32_t>(core::EmitSource::kDone)) continue;  // uniform over the block
    const uint64_t seed = static_cast<uint64_t>(pb.seed[b]), offset = static_cast<uint64_t>(pb.offset[b]);
    const float inv_t = core::inverse_temperature(pb.temperature[b]);
    const TileStats* row_tiles = pb.tile_stats + plan.target_row * tiles;
    const MaxSum* residual_tiles = pb.residual_stats + b * tiles;
    bool residual = plan.source == static_cast<int32_t>(core::EmitSource::kResidual);
    bool fallback = false;

    ArgMax tile = race_tiles(row_tiles, residual_tiles, residual, tiles, seed, offset, plan.position, false, temp,
                             shared_best);
    if (tile.value == -INFINITY && residual) {  // p - q has no mass left: p == q up to rounding
      residual = false;
      fallback = true;
      tile = race_tiles(row_tiles, residual_tiles, false, tiles, seed, offset, plan.position, true, temp, shared_best);
    }
    int64_t token;
    if (tile.value == -INFINITY) {
      token = plan.excluded_id >= 0 ? plan.excluded_id : 0;  // all mass on the excluded draft, or no finite logit
    } else {
      const int64_t lo = static_cast<int64_t>(tile.index) * kVocabTile;
      const int64_t first = lo + static_cast<int64_t>(threadIdx.x) * kIdsPerThread;
      // Weights first, so the raw logits are dead before the 8 keys (and their Philox calls).
      float log_weights[kIdsPerThread];
      load_chunk<kVectorLoads>(pb.target_logits + plan.target_row * pb.target_row_stride, first, V, log_weights);
      if (residual) {
        float draft[kIdsPerThread];
        load_chunk<kVectorLoads>(pb.draft_logits + (plan.target_row - b) * pb.draft_row_stride, first, V, draft);
#pragma unroll
        for (int j = 0; j < kIdsPerThread; ++j) {
          log_weights[j] = core::residual_log_weight(log_weights[j], draft[j], inv_t, plan.target_norm,
                                                     plan.draft_norm);
        }
      } else {
#pragma unroll
        for (int j = 0; j < kIdsPerThread; ++j) {
          log_weights[j] = first + j == plan.excluded_id ? -INFINITY : core::sanitize_logit(log_weights[j] * inv_t);
        }
      }
      // The random words of core::token_race_block, one Philox call per four ids (first is a multiple of 8).
      const core::Philox4x32 randoms[kIdsPerThread / 4] = {
          core::token_race_block(seed, offset, plan.position, first / 4, core::verify_token_purpose(fallback)),
          core::token_race_block(seed, offset, plan.position, first / 4 + 1, core::verify_token_purpose(fallback))};
      const float shift = tile_total(row_tiles, residual_tiles, residual, tile.index).max;
      ArgMax best{-INFINITY, static_cast<int32_t>(lo)};  // the CPU's initial value: all -inf answers lo
#pragma unroll
      for (int j = 0; j < kIdsPerThread; ++j) {
        const int64_t id = first + j;
        if (id < V) {
          const float exponential = core::exponential_variate(randoms[j / 4].v[j % 4]);
          best = core::better(best, ArgMax{core::race_key(log_weights[j] - shift, exponential), static_cast<int32_t>(id)});
        }
      }
      token = block_best(best, temp, shared_best).index;
    }
    if (threadIdx.x == 0) pb.output_token_ids[b * width + plan.position] = token;
  }
}

// ---------------------------------------------------------------------------------------
// Host side.

// 1-D grid for `tasks` work items of `per_block` each; kernels loop (int64) over the rest.
inline unsigned int grid_blocks(int64_t tasks, int64_t per_block) {
  const int64_t blocks = (tasks + per_block - 1) / per_block;
  return static_cast<unsigned int>(std::clamp<int64_t>(blocks, 1, INT32_MAX));
}

template <bool kVectorLoads, typename T, typename IdT>
void launch_verify_stages(const core::VerifyProblem<T, IdT>& pb, cudaStream_t stream) {
  const int64_t tiles = core::num_vocab_tiles(pb.vocab_size);
  const bool sampled_drafts = pb.draft_logits != nullptr;
  const int64_t rows = pb.num_drafts + pb.num_requests + (sampled_drafts ? pb.num_drafts : 0);
  verify_tile_stats_kernel<kVectorLoads><<<grid_blocks(rows * tiles, 1), kTileThreads, 0, stream>>>(pb);
  verify_row_summary_kernel<<<grid_blocks(rows, kRowSummaryThreads / kWarpSize), kRowSummaryThreads, 0, stream>>>(
      pb.tile_stats, pb.row_summary, rows, tiles);
  verify_decide_kernel<<<grid_blocks(pb.num_requests, kDecideThreads), kDecideThreads, 0, stream>>>(pb);
  if (sampled_drafts) {
    verify_residual_stats_kernel<kVectorLoads>
        <<<grid_blocks(pb.num_requests * tiles, 1), kTileThreads, 0, stream>>>(pb);
  }
  verify_sample_kernel<kVectorLoads><<<grid_blocks(pb.num_requests, 1), kTileThreads, 0, stream>>>(pb);
}

// Enqueues the five stages on `stream`: no host synchronisation, no allocation (the
// scratch pointers of `pb` are carved by core::VerifyScratch). Launch errors are left for
// the caller's cudaGetLastError().
template <typename T, typename IdT>
void launch_verify(const core::VerifyProblem<T, IdT>& pb, cudaStream_t stream) {
  if (pb.num_requests == 0) return;
  const bool vector_loads =
      rows_allow_vector_loads(pb.target_logits, pb.target_row_stride, sizeof(T)) &&
      (pb.draft_logits == nullptr || rows_allow_vector_loads(pb.draft_logits, pb.draft_row_stride, sizeof(T)));
  if (vector_loads) {
    launch_verify_stages<true>(pb, stream);
  } else {
    launch_verify_stages<false>(pb, stream);
  }
}

}  // namespace dspark::gpu
