// CUDA kernel of dspark::markov_draft: framework-free (raw pointers and a cudaStream_t).
// One cooperative launch runs all K steps; the step-to-step dependency (x_k over the whole
// vocabulary) is a grid-wide barrier, never a host round trip. Where a cooperative launch is
// unavailable the same phases run as 1 + 2K ordinary launches on the stream. Per step:
//   A. units: one block per (256 ids, 8 rows): each thread owns one id, reads its W2 row
//      once for the 8 rows (a GEMM-shaped bias; W2 is read from DRAM once per step and the
//      other row blocks hit L2), writes l_k = round(U_k + bias) and its unit's stats;
//   B. rows: one block per row: x_k from the unit stats, by the two-level race of
//      core/race.h (the token race re-reads one tile of l_k), then W1[x_k] and c_{k+1}.
// Every decision and random number is the CPU kernel's (csrc/cpu/markov_draft_kernel.h):
// same tiles, same core:: functions, same keys.
#pragma once

#include <cooperative_groups.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>

#include "../core/markov.h"
#include "../core/race.h"
#include "element_access.cuh"
#include "reductions.cuh"

namespace dspark::gpu {

using core::TileStats;
using core::kVocabTile;

constexpr int kMarkovThreads = kTileThreads;   // one id per thread in a unit
constexpr int kMarkovRowsPerUnit = 8;          // rows sharing each W2 row read
constexpr int kRankChunk = 128;                // a_b values staged in shared memory at a time
static_assert(kMarkovThreads == core::kMarkovUnitIds, "a unit is one id per thread");
static_assert(kMarkovThreads * kIdsPerThread == kVocabTile, "the token race sweeps one tile per block");

struct MergeTileStats {
  __device__ __forceinline__ TileStats operator()(const TileStats& a, const TileStats& b) const {
    const MaxSum s = core::merge(MaxSum{a.max, a.sum}, MaxSum{b.max, b.sum});
    const ArgMax m = core::better(ArgMax{a.argmax_value, a.argmax_index}, ArgMax{b.argmax_value, b.argmax_index});
    return TileStats{s.max, s.sum, m.value, m.index};
  }
};

__device__ __forceinline__ TileStats warp_merge(TileStats s) {
#pragma unroll
  for (int distance = kWarpSize / 2; distance > 0; distance /= 2) {
    const TileStats other{__shfl_xor_sync(0xFFFFFFFFu, s.max, distance), __shfl_xor_sync(0xFFFFFFFFu, s.sum, distance),
                          __shfl_xor_sync(0xFFFFFFFFu, s.argmax_value, distance),
                          __shfl_xor_sync(0xFFFFFFFFu, s.argmax_index, distance)};
    s = MergeTileStats{}(s, other);
  }
  return s;
}

struct MarkovShared {
  alignas(16) float prev_embedding[kMarkovRowsPerUnit][kRankChunk];  // read as float4
  float inverse_temperature[kMarkovRowsPerUnit];
  TileStats warp_stats[kMarkovRowsPerUnit][kMarkovThreads / kWarpSize];
  union {
    typename BlockArgMax::TempStorage arg_max;
    typename BlockSum::TempStorage sum;
  } temp;
  ArgMax best;
};

// Step A for one unit: ids [unit * 256, +256) of rows [b0, b0 + rows).
template <bool kVectorLoads, typename T, typename W>
__device__ __noinline__ void markov_unit(const core::MarkovDraftProblem<T, W>& pb, int64_t k, int64_t unit, int64_t b0, int rows,
                            MarkovShared& sh) {
  const int64_t V = pb.vocab_size, r = pb.rank;
  const int64_t v = unit * core::kMarkovUnitIds + threadIdx.x;
  const bool in_vocab = v < V;
  float acc[kMarkovRowsPerUnit];
#pragma unroll
  for (int i = 0; i < kMarkovRowsPerUnit; ++i) acc[i] = 0.0f;
  const W* w_row = pb.markov_w2 + (in_vocab ? v : 0) * r;
  // Divisions (a subroutine call on the GPU) happen here, while few registers are live; the
  // first barrier of the loop below publishes them.
  if (threadIdx.x < rows) sh.inverse_temperature[threadIdx.x] = core::inverse_temperature(pb.temperature[b0 + threadIdx.x]);
  for (int64_t r0 = 0; r0 < r; r0 += kRankChunk) {
    const int chunk = static_cast<int>(r - r0 < kRankChunk ? r - r0 : kRankChunk);
    __syncthreads();  // the previous chunk's values are consumed
    for (int e = threadIdx.x; e < kMarkovRowsPerUnit * kRankChunk; e += kMarkovThreads) {
      const int i = e / kRankChunk, j = e % kRankChunk;
      sh.prev_embedding[i][j] = (i < rows && j < chunk) ? pb.prev_embedding[(b0 + i) * r + r0 + j] : 0.0f;
    }
    __syncthreads();
    if (in_vocab) {
      int j = 0;
      // 8 weights at a time, with 16-byte loads when W2's rows allow them; both load paths
      // sum in the same order, so the bias does not depend on W2's alignment.
      for (; j + kIdsPerThread <= chunk; j += kIdsPerThread) {
        float w[kIdsPerThread];
        if constexpr (kVectorLoads) {
          load_aligned_chunk(w_row + r0 + j, w);
        } else {
#pragma unroll
          for (int e = 0; e < kIdsPerThread; ++e) w[e] = to_float(w_row[r0 + j + e]);
        }
#pragma unroll
        for (int i = 0; i < kMarkovRowsPerUnit; ++i) {
          const float4 a0 = *reinterpret_cast<const float4*>(&sh.prev_embedding[i][j]);
          const float4 a1 = *reinterpret_cast<const float4*>(&sh.prev_embedding[i][j + 4]);
          acc[i] += w[0] * a0.x + w[1] * a0.y + w[2] * a0.z + w[3] * a0.w + w[4] * a1.x + w[5] * a1.y +
                    w[6] * a1.z + w[7] * a1.w;
        }
      }
      for (; j < chunk; ++j) {
        const float w = to_float(w_row[r0 + j]);
#pragma unroll
        for (int i = 0; i < kMarkovRowsPerUnit; ++i) acc[i] += w * sh.prev_embedding[i][j];
      }
    }
  }

  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
#pragma unroll
  for (int i = 0; i < kMarkovRowsPerUnit; ++i) {
    TileStats mine{-INFINITY, 0.0f, -INFINITY, static_cast<int32_t>(unit * core::kMarkovUnitIds)};
    if (i < rows && in_vocab) {
      const int64_t b = b0 + i;
      const int64_t index = (b * pb.steps + k) * V + v;
      const T l = from_float<T>(to_float(pb.base_logits[index]) + acc[i]);
      pb.draft_logits[index] = l;
      const float x = to_float(l);
      if (core::is_greedy(pb.temperature[b])) {
        mine.argmax_value = x != x ? -INFINITY : x;  // NaN never wins
        mine.argmax_index = static_cast<int32_t>(v);
      } else {
        const MaxSum one = core::add_term(core::empty_max_sum(), core::sanitize_logit(x * sh.inverse_temperature[i]));
        mine.max = one.max;
        mine.sum = one.sum;
      }
    }
    const TileStats merged = warp_merge(mine);
    if (lane == 0) sh.warp_stats[i][warp] = merged;
  }
  __syncthreads();
  if (threadIdx.x < rows) {
    const int i = threadIdx.x;
    TileStats s = sh.warp_stats[i][0];
    for (int w = 1; w < kMarkovThreads / kWarpSize; ++w) s = MergeTileStats{}(s, sh.warp_stats[i][w]);
    pb.unit_stats[(b0 + i) * core::num_markov_units(V) + unit] = s;
  }
}

// Step B, second half: a_b = W1[previous] into the scratch, and c_k.
template <typename T, typename W>
__device__ __noinline__ void gather_row(const core::MarkovDraftProblem<T, W>& pb, int64_t b, int64_t k, int64_t previous,
                           MarkovShared& sh) {
  const int64_t r = pb.rank;
  const int64_t row = core::transition_row(previous, pb.vocab_size);
  float prev_term = 0.0f;
  for (int64_t j = threadIdx.x; j < r; j += kMarkovThreads) {
    const float a = row >= 0 ? to_float(pb.markov_w1[row * r + j]) : 0.0f;
    pb.prev_embedding[b * r + j] = a;
    if (pb.conf_w_prev != nullptr) prev_term += pb.conf_w_prev[j] * a;
  }
  if (pb.confidence != nullptr) {
    prev_term = BlockSum(sh.temp.sum).Sum(prev_term);
    if (threadIdx.x == 0) {
      const float sts = pb.conf_temperature != nullptr ? pb.conf_temperature[k] : 1.0f;
      pb.confidence[b * pb.steps + k] = core::markov_confidence(pb.conf_base[b * pb.steps + k], prev_term, sts);
    }
    __syncthreads();  // temp is reused
  }
}

// Step B, first half: x_k of row b from its unit stats.
template <typename T, typename W>
__device__ __noinline__ int64_t select_token(const core::MarkovDraftProblem<T, W>& pb, int64_t b, int64_t k, MarkovShared& sh) {
  const int64_t V = pb.vocab_size;
  const int64_t units = core::num_markov_units(V), tiles = core::num_vocab_tiles(V);
  constexpr int64_t kUnitsPerTile = kVocabTile / core::kMarkovUnitIds;
  const TileStats* stats = pb.unit_stats + b * units;
  const float temperature = pb.temperature[b];
  if (core::is_greedy(temperature)) {
    ArgMax best{-INFINITY, 0};  // a row with nothing above -inf answers 0, as on the CPU
    for (int64_t u = threadIdx.x; u < units; u += kMarkovThreads)
      best = core::better(best, ArgMax{stats[u].argmax_value, stats[u].argmax_index});
    return block_best(best, sh.temp.arg_max, sh.best).index;
  }
  // A tile's total merges its units in order, like the CPU's chunks.
  auto tile_total = [&](int64_t t) {
    MaxSum total = core::empty_max_sum();
    for (int64_t u = t * kUnitsPerTile; u < units && u < (t + 1) * kUnitsPerTile; ++u)
      total = core::merge(total, MaxSum{stats[u].max, stats[u].sum});
    return total;
  };
  ArgMax largest{-INFINITY, 0};
  for (int64_t t = threadIdx.x; t < tiles; t += kMarkovThreads) largest = core::better(largest, ArgMax{tile_total(t).max, 0});
  const float shift = block_best(largest, sh.temp.arg_max, sh.best).value;
  const uint64_t seed = static_cast<uint64_t>(pb.seed[b]), offset = static_cast<uint64_t>(pb.offset[b]);
  const int32_t position = static_cast<int32_t>(k);
  ArgMax winner{-INFINITY, -1};
  for (int64_t t = threadIdx.x; t < tiles; t += kMarkovThreads) {
    const float key = core::tile_race_key(tile_total(t), shift, seed, offset, position, t, core::kMarkovTilePurpose);
    winner = core::better(winner, ArgMax{key, static_cast<int32_t>(t)});
  }
  winner = block_best(winner, sh.temp.arg_max, sh.best);
  if (winner.value == -INFINITY) return 0;  // no finite logit, as on the CPU
  const int64_t lo = static_cast<int64_t>(winner.index) * kVocabTile;
  const float tile_shift = tile_total(winner.index).max;
  const float inv_t = core::inverse_temperature(temperature);
  const int64_t first = lo + static_cast<int64_t>(threadIdx.x) * kIdsPerThread;
  float log_weights[kIdsPerThread];
  load_chunk<false>(pb.draft_logits + (b * pb.steps + k) * V, first, V, log_weights);  // one tile per row and step
  const core::Philox4x32 randoms[kIdsPerThread / 4] = {
      core::token_race_block(seed, offset, position, first / 4, core::kMarkovTokenPurpose),
      core::token_race_block(seed, offset, position, first / 4 + 1, core::kMarkovTokenPurpose)};
  ArgMax best{-INFINITY, static_cast<int32_t>(lo)};
#pragma unroll
  for (int j = 0; j < kIdsPerThread; ++j) {
    if (first + j < V) {
      const float log_weight = core::sanitize_logit(log_weights[j] * inv_t);
      const float key = core::race_key(log_weight - tile_shift, core::exponential_variate(randoms[j / 4].v[j % 4]));
      best = core::better(best, ArgMax{key, static_cast<int32_t>(first + j)});
    }
  }
  return block_best(best, sh.temp.arg_max, sh.best).index;
}

// The three phases over the whole grid (grid-stride loops; every block of the grid calls them).

template <typename T, typename W>
__device__ __forceinline__ void gather_anchors(const core::MarkovDraftProblem<T, W>& pb, MarkovShared& sh) {
  for (int64_t b = blockIdx.x; b < pb.batch; b += gridDim.x) gather_row(pb, b, 0, pb.prev_token_ids[b], sh);
}

// Task t is (unit t / row_blocks, row block t % row_blocks): the blocks working on one unit run
// side by side, so its W2 slice comes from DRAM once per step and from L2 for the other row
// blocks. Tasks are stepped without a 64-bit division in the loop (a subroutine call here).
template <bool kVectorLoads, typename T, typename W>
__device__ __forceinline__ void run_units(const core::MarkovDraftProblem<T, W>& pb, int64_t k, MarkovShared& sh) {
  const int64_t B = pb.batch;
  const int64_t units = core::num_markov_units(pb.vocab_size);
  const int64_t row_blocks = (B + kMarkovRowsPerUnit - 1) / kMarkovRowsPerUnit;
  const int64_t unit_stride = gridDim.x / row_blocks, row_block_stride = gridDim.x % row_blocks;
  int64_t unit = blockIdx.x / row_blocks, block_of_rows = blockIdx.x % row_blocks;
  while (unit < units) {
    const int64_t b0 = block_of_rows * kMarkovRowsPerUnit;
    markov_unit<kVectorLoads>(pb, k, unit, b0, static_cast<int>(B - b0 < kMarkovRowsPerUnit ? B - b0 : kMarkovRowsPerUnit), sh);
    unit += unit_stride;
    block_of_rows += row_block_stride;
    if (block_of_rows >= row_blocks) {
      block_of_rows -= row_blocks;
      ++unit;
    }
  }
}

template <typename T, typename W>
__device__ __forceinline__ void select_rows(const core::MarkovDraftProblem<T, W>& pb, int64_t k, MarkovShared& sh) {
  for (int64_t b = blockIdx.x; b < pb.batch; b += gridDim.x) {
    const int64_t token = select_token(pb, b, k, sh);
    if (threadIdx.x == 0) pb.draft_token_ids[b * pb.steps + k] = token;
    if (k + 1 < pb.steps) gather_row(pb, b, k + 1, token, sh);
  }
}

// All K steps in one cooperative launch. kVectorLoads: 16-byte loads of W2 rows (decided on
// the host).
template <bool kVectorLoads, typename T, typename W>
__global__ void __launch_bounds__(kMarkovThreads) markov_draft_kernel(core::MarkovDraftProblem<T, W> pb) {
  __shared__ MarkovShared sh;
  cooperative_groups::grid_group grid = cooperative_groups::this_grid();
  gather_anchors(pb, sh);
  for (int64_t k = 0; k < pb.steps; ++k) {
    grid.sync();
    run_units<kVectorLoads>(pb, k, sh);
    grid.sync();
    select_rows(pb, k, sh);
  }
}

// The same phases as separate launches (1 + 2K on the stream), where a cooperative launch is
// not available (no cooperative-launch support, or a context too small for one block per SM).
// One block per row (the launcher's grid covers the batch).
template <typename T, typename W>
__global__ void __launch_bounds__(kMarkovThreads) markov_gather_kernel(core::MarkovDraftProblem<T, W> pb) {
  __shared__ MarkovShared sh;
  const int64_t b = blockIdx.x;
  if (b < pb.batch) gather_row(pb, b, 0, pb.prev_token_ids[b], sh);
}

template <bool kVectorLoads, typename T, typename W>
__global__ void __launch_bounds__(kMarkovThreads) markov_units_kernel(core::MarkovDraftProblem<T, W> pb, int64_t k) {
  __shared__ MarkovShared sh;
  run_units<kVectorLoads>(pb, k, sh);
}

template <typename T, typename W>
__global__ void __launch_bounds__(kMarkovThreads) markov_select_kernel(core::MarkovDraftProblem<T, W> pb, int64_t k) {
  __shared__ MarkovShared sh;
  select_rows(pb, k, sh);
}

// Whether W2's rows allow 16-byte loads: an aligned base and rows whose length keeps every
// 8-element chunk aligned.
template <typename T, typename W>
bool markov_allows_vector_loads(const core::MarkovDraftProblem<T, W>& pb) {
  return reinterpret_cast<uintptr_t>(pb.markov_w2) % 16 == 0 && (pb.rank * sizeof(W)) % 16 == 0;
}

template <bool kVectorLoads, typename T, typename W>
cudaError_t launch_markov_draft_kernel(const core::MarkovDraftProblem<T, W>& pb, cudaStream_t stream) {
  auto* kernel = markov_draft_kernel<kVectorLoads, T, W>;
  int device = 0, sm_count = 0, cooperative = 0, blocks_per_sm = 0;
  cudaError_t status = cudaGetDevice(&device);
  if (status == cudaSuccess) status = cudaDeviceGetAttribute(&sm_count, cudaDevAttrMultiProcessorCount, device);
  if (status == cudaSuccess) status = cudaDeviceGetAttribute(&cooperative, cudaDevAttrCooperativeLaunch, device);
  if (status == cudaSuccess) status = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks_per_sm, kernel, kMarkovThreads, 0);
  if (status != cudaSuccess) return status;
  const int64_t units = core::num_markov_units(pb.vocab_size);
  const int64_t unit_tasks = units * ((pb.batch + kMarkovRowsPerUnit - 1) / kMarkovRowsPerUnit);
  auto blocks_for = [](int64_t work) { return static_cast<unsigned int>(std::clamp<int64_t>(work, 1, INT32_MAX)); };
  // DSPARK_MARKOV_SEPARATE_LAUNCHES=1 takes the separate launches anyway (tests compare them).
  if (cooperative == 0 || blocks_per_sm == 0 || std::getenv("DSPARK_MARKOV_SEPARATE_LAUNCHES") != nullptr) {
    if (pb.batch > INT32_MAX) return cudaErrorInvalidValue;  // one block per row below
    markov_gather_kernel<<<blocks_for(pb.batch), kMarkovThreads, 0, stream>>>(pb);
    for (int64_t k = 0; k < pb.steps; ++k) {
      markov_units_kernel<kVectorLoads><<<blocks_for(unit_tasks), kMarkovThreads, 0, stream>>>(pb, k);
      markov_select_kernel<<<blocks_for(pb.batch), kMarkovThreads, 0, stream>>>(pb, k);
    }
    return cudaGetLastError();
  }
  // A cooperative grid must be co-resident; more blocks than work items would only wait.
  const int64_t resident = static_cast<int64_t>(blocks_per_sm) * sm_count;
  core::MarkovDraftProblem<T, W> args = pb;
  void* kernel_args[] = {&args};
  return cudaLaunchCooperativeKernel(reinterpret_cast<const void*>(kernel),
                                     dim3(blocks_for(std::min(std::max(pb.batch, unit_tasks), resident))),
                                     dim3(kMarkovThreads), kernel_args, 0, stream);
}

// Enqueues all K steps on `stream` as one cooperative launch: no host synchronisation, no
// allocation (the scratch pointers of `pb` are carved by core::MarkovDraftScratch).
template <typename T, typename W>
cudaError_t launch_markov_draft(const core::MarkovDraftProblem<T, W>& pb, cudaStream_t stream) {
  if (pb.batch == 0 || pb.steps == 0) return cudaSuccess;
  return markov_allows_vector_loads(pb) ? launch_markov_draft_kernel<true>(pb, stream)
                                        : launch_markov_draft_kernel<false>(pb, stream);
}

}  // namespace dspark::gpu
