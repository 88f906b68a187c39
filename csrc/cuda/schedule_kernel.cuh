// CUDA kernels of dspark::schedule (DSpark Algorithm 1; numerics in core/schedule.h).
//
// Algorithm 1 as a scan: sort the candidates by descending survival (a stable radix sort of
// the float32 bits keeps the request-then-position tie order of the row-major layout), take
// the inclusive prefix sum of the fixed-point tau increments, and the early stop is the first
// sorted position whose candidate does not improve Theta. Each request's admitted positions are
// a prefix of its row, so its length is the largest admitted position + 1.
//
// Small problems (R * K <= kBlockCandidates) run in one block with CUB block primitives, one
// launch. Larger ones use device-wide CUB sort and scan with a few small kernels around them.
// Both read the same core functions, so they agree with the CPU kernel bit for bit.
#pragma once

#include <cub/cub.cuh>

#include <cstdint>

#include "../core/schedule.h"

namespace dspark::gpu {

using core::ScheduleProblem;

constexpr int kScheduleBlockThreads = 512;
constexpr int kScheduleItemsPerThread = 8;
constexpr int kBlockCandidates = kScheduleBlockThreads * kScheduleItemsPerThread;  // 4096
constexpr int kScheduleThreads = 256;  // block size of the device-wide path's kernels
constexpr int kScheduleRadixBits = 4;  // CUB's default: digit counters fit shared memory at 512 threads

struct MinPosition {  // cub::Min is gone in CCCL 3; this works with every CUB
  __device__ __forceinline__ int operator()(int a, int b) const { return a < b ? a : b; }
};

// Writes survival a_{r, 0..K-1} (float32, rounded after every product) of row r as sort keys:
// 0 for a candidate outside E (a == 0, or j >= the request's cap). confidence_of(j) reads c_{r,j}
// (it may read keys[r * K + j] itself: each slot is read before it is written). The products are
// a serial chain (left-to-right rounding); the loads are not, and unrolling keeps several in flight.
template <typename ConfidenceOf>
__device__ __forceinline__ void write_row_keys(const ScheduleProblem& p, int r, ConfidenceOf confidence_of,
                                               uint32_t* keys) {
  const int num_draft = static_cast<int>(p.num_draft);
  const int cap = p.cap(r);
  float survival = 1.0f;
#pragma unroll 8
  for (int j = 0; j < num_draft; ++j) {
    survival = survival * confidence_of(j);
    keys[r * num_draft + j] = j < cap ? core::survival_key(survival) : 0u;
  }
}

// Whether sorted candidate `position` (key, inclusive fixed-point prefix of tau) is admitted by the
// scan up to it, given that all earlier ones were.
__device__ __forceinline__ bool admits(const ScheduleProblem& p, uint32_t key, int64_t tau_inclusive, int position) {
  const float survival = core::survival_of_key(key);
  const int64_t tau_before = core::tau_of_anchors(p.num_requests) + tau_inclusive - core::tau_increment(survival);
  return core::improves_throughput(survival, tau_before, position, p.num_requests, p.sps, p.sps_stride, p.max_batch);
}

// ---------------------------------------------------------------- one block, R * K <= 4096

__global__ void __launch_bounds__(kScheduleBlockThreads, 1) schedule_block_kernel(ScheduleProblem p) {
  using BlockSort = cub::BlockRadixSort<uint32_t, kScheduleBlockThreads, kScheduleItemsPerThread, uint16_t,
                                        kScheduleRadixBits>;
  using BlockScan = cub::BlockScan<int64_t, kScheduleBlockThreads>;
  using BlockMin = cub::BlockReduce<int, kScheduleBlockThreads>;
  __shared__ union {
    uint32_t row_keys[kBlockCandidates];  // read into registers before the sort reuses the space
    typename BlockSort::TempStorage sort;
    typename BlockScan::TempStorage scan;
    typename BlockMin::TempStorage min;
  } temp;
  __shared__ int num_admitted;

  const int num_requests = static_cast<int>(p.num_requests);
  const int num_draft = static_cast<int>(p.num_draft);
  const int num_candidates = num_requests * num_draft;
  // Coalesced: consecutive threads read consecutive confidences (a row-per-thread loop would not).
  for (int c = threadIdx.x; c < num_candidates; c += kScheduleBlockThreads) {
    const int r = c / num_draft;
    temp.row_keys[c] = __float_as_uint(p.confidence_at(r, c - r * num_draft));
  }
  __syncthreads();
  for (int r = threadIdx.x; r < num_requests; r += kScheduleBlockThreads) {
    p.num_draft_out[r] = 0;
    const uint32_t* row = temp.row_keys + r * num_draft;
    write_row_keys(p, r, [row](int j) { return __uint_as_float(row[j]); }, temp.row_keys);  // in place
  }
  __syncthreads();

  uint32_t keys[kScheduleItemsPerThread];
  uint16_t candidates[kScheduleItemsPerThread];
#pragma unroll
  for (int i = 0; i < kScheduleItemsPerThread; ++i) {
    const int c = threadIdx.x * kScheduleItemsPerThread + i;
    keys[i] = c < num_candidates ? temp.row_keys[c] : 0u;
    candidates[i] = static_cast<uint16_t>(c);
  }
  __syncthreads();
  BlockSort(temp.sort).SortDescending(keys, candidates, 0, core::kSurvivalKeyBits);  // stable
  __syncthreads();

  int64_t increments[kScheduleItemsPerThread], tau[kScheduleItemsPerThread];
#pragma unroll
  for (int i = 0; i < kScheduleItemsPerThread; ++i) increments[i] = core::tau_increment(core::survival_of_key(keys[i]));
  BlockScan(temp.scan).InclusiveSum(increments, tau);
  __syncthreads();

  int first_failure = num_candidates;
#pragma unroll
  for (int i = 0; i < kScheduleItemsPerThread; ++i) {
    const int position = threadIdx.x * kScheduleItemsPerThread + i;
    if (position < first_failure && !admits(p, keys[i], tau[i], position)) first_failure = position;
  }
  const int stop = BlockMin(temp.min).Reduce(first_failure, MinPosition{});
  if (threadIdx.x == 0) num_admitted = stop;
  __syncthreads();

#pragma unroll
  for (int i = 0; i < kScheduleItemsPerThread; ++i) {
    const int position = threadIdx.x * kScheduleItemsPerThread + i;
    if (position < num_admitted) {
      const int c = candidates[i];
      atomicMax(p.num_draft_out + c / num_draft, c % num_draft + 1);
    }
  }
}

// ---------------------------------------------------------------- device-wide path

struct ScheduleScratch {
  uint32_t* keys_in;
  uint32_t* keys_sorted;
  int32_t* candidates_in;
  int32_t* candidates_sorted;
  int64_t* tau_increments;
  int64_t* tau_inclusive;   // inclusive prefix sums of tau_increments
  int32_t* num_admitted;    // [1]
  void* cub_temp;
  size_t cub_temp_bytes;
};

__global__ void __launch_bounds__(kScheduleThreads) schedule_keys_kernel(ScheduleProblem p, ScheduleScratch s) {
  const int r = blockIdx.x * kScheduleThreads + threadIdx.x;
  const int num_draft = static_cast<int>(p.num_draft);
  if (r == 0) *s.num_admitted = static_cast<int32_t>(p.num_requests) * num_draft;
  if (r >= p.num_requests) return;
  p.num_draft_out[r] = 0;
  write_row_keys(p, r, [&p, r](int j) { return p.confidence_at(r, j); }, s.keys_in);
  for (int j = 0; j < num_draft; ++j) s.candidates_in[r * num_draft + j] = r * num_draft + j;
}

__global__ void __launch_bounds__(kScheduleThreads) schedule_increments_kernel(int num_candidates, ScheduleScratch s) {
  const int position = blockIdx.x * kScheduleThreads + threadIdx.x;
  if (position < num_candidates)
    s.tau_increments[position] = core::tau_increment(core::survival_of_key(s.keys_sorted[position]));
}

__global__ void __launch_bounds__(kScheduleThreads) schedule_stop_kernel(ScheduleProblem p, ScheduleScratch s) {
  using BlockMin = cub::BlockReduce<int, kScheduleThreads>;
  __shared__ typename BlockMin::TempStorage temp;
  const int num_candidates = static_cast<int>(p.num_requests * p.num_draft);
  const int position = blockIdx.x * kScheduleThreads + threadIdx.x;
  int failure = num_candidates;
  if (position < num_candidates && !admits(p, s.keys_sorted[position], s.tau_inclusive[position], position))
    failure = position;
  const int block_failure = BlockMin(temp).Reduce(failure, MinPosition{});
  if (threadIdx.x == 0 && block_failure < num_candidates) atomicMin(s.num_admitted, block_failure);
}

__global__ void __launch_bounds__(kScheduleThreads) schedule_lengths_kernel(ScheduleProblem p, ScheduleScratch s) {
  const int position = blockIdx.x * kScheduleThreads + threadIdx.x;
  if (position >= *s.num_admitted) return;
  const int num_draft = static_cast<int>(p.num_draft);
  const int c = s.candidates_sorted[position];
  atomicMax(p.num_draft_out + c / num_draft, c % num_draft + 1);
}

// CUB's temp storage for the device-wide path's sort and scan (they run one after the other
// on one stream, so they share it).
inline cudaError_t schedule_cub_temp_bytes(int num_candidates, size_t& bytes) {
  size_t sort_bytes = 0, scan_bytes = 0;
  cudaError_t err = cub::DeviceRadixSort::SortPairsDescending(
      nullptr, sort_bytes, static_cast<const uint32_t*>(nullptr), static_cast<uint32_t*>(nullptr),
      static_cast<const int32_t*>(nullptr), static_cast<int32_t*>(nullptr), num_candidates, 0, core::kSurvivalKeyBits);
  if (err != cudaSuccess) return err;
  err = cub::DeviceScan::InclusiveSum(nullptr, scan_bytes, static_cast<int64_t*>(nullptr),
                                      static_cast<int64_t*>(nullptr), num_candidates);
  bytes = sort_bytes > scan_bytes ? sort_bytes : scan_bytes;
  return err;
}

// Lays the scratch out from `base` (256-byte aligned pieces, s.cub_temp_bytes of CUB storage
// last) and returns its size; with base == nullptr it only measures.
inline size_t carve_schedule_scratch(char* base, int num_candidates, ScheduleScratch& s) {
  const size_t n = static_cast<size_t>(num_candidates);
  size_t offset = 0;
  const auto take = [&](size_t bytes) {
    char* piece = base == nullptr ? nullptr : base + offset;
    offset += (bytes + 255) / 256 * 256;
    return piece;
  };
  s.keys_in = reinterpret_cast<uint32_t*>(take(4 * n));
  s.keys_sorted = reinterpret_cast<uint32_t*>(take(4 * n));
  s.candidates_in = reinterpret_cast<int32_t*>(take(4 * n));
  s.candidates_sorted = reinterpret_cast<int32_t*>(take(4 * n));
  s.tau_increments = reinterpret_cast<int64_t*>(take(8 * n));
  s.tau_inclusive = reinterpret_cast<int64_t*>(take(8 * n));
  s.num_admitted = reinterpret_cast<int32_t*>(take(4));
  s.cub_temp = take(s.cub_temp_bytes);
  return offset;
}

inline cudaError_t launch_schedule_device_wide(const ScheduleProblem& p, const ScheduleScratch& s, cudaStream_t stream) {
  const int num_requests = static_cast<int>(p.num_requests);
  const int num_candidates = num_requests * static_cast<int>(p.num_draft);
  const int candidate_blocks = (num_candidates + kScheduleThreads - 1) / kScheduleThreads;
  schedule_keys_kernel<<<(num_requests + kScheduleThreads - 1) / kScheduleThreads, kScheduleThreads, 0, stream>>>(p, s);
  size_t temp_bytes = s.cub_temp_bytes;
  cudaError_t err = cub::DeviceRadixSort::SortPairsDescending(s.cub_temp, temp_bytes, s.keys_in, s.keys_sorted,
                                                              s.candidates_in, s.candidates_sorted, num_candidates, 0,
                                                              core::kSurvivalKeyBits, stream);
  if (err != cudaSuccess) return err;
  schedule_increments_kernel<<<candidate_blocks, kScheduleThreads, 0, stream>>>(num_candidates, s);
  temp_bytes = s.cub_temp_bytes;
  err = cub::DeviceScan::InclusiveSum(s.cub_temp, temp_bytes, s.tau_increments, s.tau_inclusive, num_candidates,
                                      stream);
  if (err != cudaSuccess) return err;
  schedule_stop_kernel<<<candidate_blocks, kScheduleThreads, 0, stream>>>(p, s);
  schedule_lengths_kernel<<<candidate_blocks, kScheduleThreads, 0, stream>>>(p, s);
  return cudaGetLastError();
}

inline cudaError_t launch_schedule_block(const ScheduleProblem& p, cudaStream_t stream) {
  schedule_block_kernel<<<1, kScheduleBlockThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace dspark::gpu
