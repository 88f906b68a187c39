// Block-wide reductions shared by the CUDA kernels (256-thread blocks, CUB primitives).
#pragma once

#include <cub/cub.cuh>

#include "../core/sampling.h"
#include "element_access.cuh"

namespace dspark::gpu {

using core::ArgMax;
using core::MaxSum;

constexpr int kTileThreads = 256;   // one block sweeps one vocabulary tile (8 ids per thread)
constexpr int kWarpSize = 32;

struct MergeMaxSum {
  __device__ __forceinline__ MaxSum operator()(const MaxSum& a, const MaxSum& b) const { return core::merge(a, b); }
};

struct PickBetter {
  __device__ __forceinline__ ArgMax operator()(const ArgMax& a, const ArgMax& b) const { return core::better(a, b); }
};

// MaxSum of one thread's log-weights (no NaN): max first, then sum exp(w - max).
__device__ __forceinline__ MaxSum chunk_max_sum(const float (&log_weights)[kIdsPerThread]) {
  float max = -INFINITY;
#pragma unroll
  for (int j = 0; j < kIdsPerThread; ++j) max = fmaxf(max, log_weights[j]);
  if (max == -INFINITY) return core::empty_max_sum();
  float sum = 0.0f;
#pragma unroll
  for (int j = 0; j < kIdsPerThread; ++j) sum += expf(log_weights[j] - max);
  return MaxSum{max, sum};
}

using BlockArgMax = cub::BlockReduce<ArgMax, kTileThreads>;
using BlockMaxSum = cub::BlockReduce<MaxSum, kTileThreads>;
using BlockSum = cub::BlockReduce<float, kTileThreads>;

// Block-wide core::better reduction, answered to every thread.
__device__ __forceinline__ ArgMax block_best(ArgMax mine, typename BlockArgMax::TempStorage& temp, ArgMax& shared) {
  const ArgMax best = BlockArgMax(temp).Reduce(mine, PickBetter{});
  if (threadIdx.x == 0) shared = best;
  __syncthreads();
  const ArgMax result = shared;
  __syncthreads();  // temp and shared are reused by the caller's next reduction
  return result;
}

}  // namespace dspark::gpu
