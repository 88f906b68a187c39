// dspark::skinny_linear on CPU: out[m, n] = sum_k input[m, k] * weight[n, k] (+ bias[n]) for a
// few rows m, as a target forward runs it when it verifies a handful of draft tokens.
//
// Why not the BLAS GEMM: with M = 2..8 rows it packs and blocks for a large M, and verifying
// eight tokens costs ~2x one (bench/RESULTS.md). Here the weight is packed once, at load, into
// blocks of 16 output features laid out k-major ([K, 16] per block), so each block streams from
// memory once, in order, and meets every input row while it is in cache: on AVX-512 up to ~16
// rows cost about one read of the weight; on AVX2, whose 16 registers hold a tile of 3 rows,
// 8 rows cost ~1.4x (bench/RESULTS.md).
//
// Batch invariance: out[m, n] is one chain of fused multiply-adds over k = 0 .. K-1 from 0
// (the 16 features of a block are the vector lanes, so nothing is summed across lanes), then
// + bias. Its bits depend on neither M, nor the tile, nor the stretches of k it is computed in,
// nor the other rows, and the AVX2 and AVX-512 builds give the same bits (the plain build, for
// CPUs without FMA, rounds each product).
// So a layer's output for a token does not depend on how many tokens are verified with it.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/functional_bfloat16.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "skinny_linear_dispatch.h"

namespace dspark::cpu {
namespace CPU_CAPABILITY {
namespace skinny {

using Vec = at::vec::Vectorized<float>;
static_assert(kSkinnyBlock % Vec::size() == 0, "a build's vector must divide a block's 16 features");
constexpr int kVecsPerBlock = kSkinnyBlock / Vec::size();
// Register tile: kBlocks blocks (separate memory streams, so even one row keeps several loads
// in flight) x kInputs input rows. Accumulators kBlocks * kInputs * kVecsPerBlock, plus the
// blocks' vectors and a broadcast, fit the register file (32 zmm on AVX-512, 16 ymm on AVX2).
// GCC 12 keeps these tiles in registers (checked in the disassembly: no fma reads the stack);
// 3 x 8 or 4 x 4 on AVX-512 put accumulators on the stack.
constexpr int kBlocks = 2;
constexpr int kInputs = Vec::size() == 16 ? 8 : 3;
// Software prefetch 4 KB ahead of each stream: the hardware prefetcher alone left the loads
// of 4-12 rows waiting on memory (measured: ~1.5x the time of one row without it).
constexpr int64_t kPrefetchBytes = 4096;

// Every loop over the tile fully unrolled, so the accumulators stay in registers (GCC keeps a
// partly indexed array of vectors on the stack: one load and store per fma).
#define DSPARK_UNROLL _Pragma("GCC unroll 32")

inline Vec load_weights(const float* w) { return Vec::loadu(w); }
inline Vec load_weights(const c10::BFloat16* w) {
  Vec out;
  at::vec::load_to_float(w, out);  // exact: a bfloat16 is the top half of a float
  return out;
}

// AVX-512, 9-12 rows: the 2 x 8 tile would meet each block group twice, the second time with
// its fmas no longer hidden behind the stream from memory (9-12 rows cost ~1.2x 8 rows). The
// wide tile meets a group of 2 blocks with up to 12 rows in one pass (24 accumulators of the
// 32 registers): ~1.1x 8 rows (bench/RESULTS.md). Past 12 rows two passes of 8 measure better
// than 12 + the rest. Its rows are interleaved k-major ([K, kWideInputs]) so that the tile reads
// its inputs through one pointer (12 row pointers do not fit the general registers). Each
// output is the same chain of fmas (block_tile, reading the interleaved rows), so the bits do
// not depend on the tile.
constexpr int kWideInputs = Vec::size() == 16 ? 12 : 0;

inline void interleave_rows(const float* input, int64_t stride, int64_t rows, int64_t K, float* interleaved) {
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t k = 0; k < K; ++k) interleaved[k * kWideInputs + i] = input[i * stride + k];
}

// How many lanes of vector v of the block at output feature n0 are features below N (0 past N).
template <typename WeightT>
inline int output_lanes(const SkinnyLinearProblem<WeightT>& p, int64_t n0, int v) {
  return static_cast<int>(std::clamp<int64_t>(p.N - n0 - v * Vec::size(), 0, Vec::size()));
}

// kInterleaved: the rows come from ``interleaved`` ([K, kWideInputs], the wide tile), else each
// from its own pointer into the input. [k_begin, k_end): the stretch of the sum this call adds.
// A stretch that starts past 0 resumes the partial sums the previous stretch left in ``out``;
// one that ends before K leaves them there (a float32 store and load are exact, so the chain's
// bits do not depend on the stretches).
template <int R, int MI, typename WeightT, bool kInterleaved = false>
inline void block_tile(const SkinnyLinearProblem<WeightT>& p, int64_t block0, int64_t m0,
                       const float* interleaved = nullptr, int64_t k_begin = 0, int64_t k_end = -1) {
  if (k_end < 0) k_end = p.K;
  Vec acc[R][MI][kVecsPerBlock];
  DSPARK_UNROLL
  for (int r = 0; r < R; ++r) {
    const int64_t n0 = (block0 + r) * kSkinnyBlock;
    DSPARK_UNROLL
    for (int i = 0; i < MI; ++i)
      DSPARK_UNROLL
      for (int v = 0; v < kVecsPerBlock; ++v) {
        const int count = output_lanes(p, n0, v);
        acc[r][i][v] = (k_begin == 0 || count == 0)
                           ? Vec(0.0f)
                           : Vec::loadu(p.out + (m0 + i) * p.N + n0 + v * Vec::size(), count);
      }
  }
  const WeightT* w[R];
  DSPARK_UNROLL
  for (int r = 0; r < R; ++r) w[r] = p.packed + (block0 + r) * p.K * kSkinnyBlock;
  const float* x[kInterleaved ? 1 : MI];
  if constexpr (kInterleaved) {
    x[0] = interleaved;
  } else {
    DSPARK_UNROLL
    for (int i = 0; i < MI; ++i) x[i] = p.input + (m0 + i) * p.input_stride;
  }
  for (int64_t k = k_begin; k < k_end; ++k) {
    Vec wk[R][kVecsPerBlock];
    DSPARK_UNROLL
    for (int r = 0; r < R; ++r) {
      const WeightT* wr = w[r] + k * kSkinnyBlock;
      __builtin_prefetch(reinterpret_cast<const char*>(wr) + kPrefetchBytes);
      DSPARK_UNROLL
      for (int v = 0; v < kVecsPerBlock; ++v) wk[r][v] = load_weights(wr + v * Vec::size());
    }
    DSPARK_UNROLL
    for (int i = 0; i < MI; ++i) {
      const Vec xk(kInterleaved ? x[0][k * kWideInputs + i] : x[i][k]);
      DSPARK_UNROLL
      for (int r = 0; r < R; ++r)
        DSPARK_UNROLL
        for (int v = 0; v < kVecsPerBlock; ++v) acc[r][i][v] = at::vec::fmadd(wk[r][v], xk, acc[r][i][v]);
    }
  }
  DSPARK_UNROLL
  for (int r = 0; r < R; ++r) {
    const int64_t n0 = (block0 + r) * kSkinnyBlock;
    DSPARK_UNROLL
    for (int v = 0; v < kVecsPerBlock; ++v) {
      const int count = output_lanes(p, n0, v);
      if (count == 0) break;
      const int64_t first = v * Vec::size();
      DSPARK_UNROLL
      for (int i = 0; i < MI; ++i) {
        Vec result = acc[r][i][v];
        if (p.bias != nullptr && k_end == p.K) result = result + Vec::loadu(p.bias + n0 + first, count);
        result.store(p.out + (m0 + i) * p.N + n0 + first, count);
      }
    }
  }
}

// The last, partial group of input rows: MI = 1 .. kInputs - 1.
template <int R, typename WeightT, int MI = kInputs - 1>
inline void partial_block_tile(const SkinnyLinearProblem<WeightT>& p, int64_t block0, int64_t m0, int64_t inputs,
                               int64_t k_begin, int64_t k_end) {
  if constexpr (MI >= 1) {
    if (inputs == MI) return block_tile<R, MI>(p, block0, m0, nullptr, k_begin, k_end);
    partial_block_tile<R, WeightT, MI - 1>(p, block0, m0, inputs, k_begin, k_end);
  }
}

// AVX2, more rows than one tile takes (3): the groups of rows meet a block pair in turn. Met
// whole, the pair (up to 2 x 1536 x 16 floats, 196 KB) streams in from memory for the first group
// and is read again from L2 by every later one, after the stream: 8 rows cost ~1.6x one read of
// the weights. Met kStretchK values of k at a time (2 x 128 x 64 B = 16 KB of float32, in L1),
// every group's fmas follow the stream closely: ~1.4x (bench/RESULTS.md). AVX-512 takes 8 (12)
// rows in one pass and keeps whole passes, as does the plain build: stretches are unmeasured there.
#if defined(CPU_CAPABILITY_AVX2)
constexpr int64_t kStretchK = 128;
#else
constexpr int64_t kStretchK = 0;
#endif

template <int R, typename WeightT>
inline void blocks_against_all_inputs(const SkinnyLinearProblem<WeightT>& p, int64_t block0) {
  const int64_t stretch = (kStretchK > 0 && p.M > kInputs) ? kStretchK : std::max<int64_t>(p.K, 1);
  int64_t k_begin = 0;
  do {  // once for K = 0: the outputs are the bias
    const int64_t k_end = std::min(p.K, k_begin + stretch);
    int64_t m0 = 0;
    for (; m0 + kInputs <= p.M; m0 += kInputs) block_tile<R, kInputs>(p, block0, m0, nullptr, k_begin, k_end);
    if (m0 < p.M) partial_block_tile<R>(p, block0, m0, p.M - m0, k_begin, k_end);
    k_begin = k_end;
  } while (k_begin < p.K);
}

template <int R, typename WeightT, int MI = kWideInputs>
inline void wide_block_tile_of(const SkinnyLinearProblem<WeightT>& p, const float* interleaved, int64_t block) {
  if constexpr (MI > kInputs + 1) {
    if (p.M == MI) return block_tile<R, MI, WeightT, true>(p, block, 0, interleaved);
    wide_block_tile_of<R, WeightT, MI - 1>(p, interleaved, block);
  } else if constexpr (MI == kInputs + 1) {
    block_tile<R, MI, WeightT, true>(p, block, 0, interleaved);  // M = 9, the last of run_wide's rows
  }
}

static_assert(kWideInputs == 0 || kBlocks == 2, "the wide tile pairs blocks as the 2 x 8 tile does");

template <typename WeightT>
void run_wide(const SkinnyLinearProblem<WeightT>& p, int64_t blocks, int64_t grain) {
  TORCH_INTERNAL_ASSERT(p.M > kInputs && p.M <= kWideInputs, "skinny_linear: the wide tile takes 9-12 rows, got ", p.M);
  std::vector<float> interleaved(static_cast<size_t>(p.K * kWideInputs));
  interleave_rows(p.input, p.input_stride, p.M, p.K, interleaved.data());
  at::parallel_for(0, blocks, grain, [&](int64_t block_begin, int64_t block_end) {
    for (int64_t block = block_begin; block < block_end; block += kBlocks) {
      if (block + 1 < block_end)
        wide_block_tile_of<kBlocks, WeightT>(p, interleaved.data(), block);
      else  // the range's last block, alone
        wide_block_tile_of<1, WeightT>(p, interleaved.data(), block);
    }
  });
}

}  // namespace skinny

template <typename WeightT>
void run_skinny_linear(const SkinnyLinearProblem<WeightT>& p) {
  using namespace skinny;
  if (p.M == 0 || p.N == 0) return;
  const int64_t blocks = (p.N + kSkinnyBlock - 1) / kSkinnyBlock;
  // About 64K weights per task: enough to amortise a task, few enough that a small layer
  // (SmolLM2's o projection: N = 576, 36 blocks of K = 576) still splits over the cores.
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 16) / (std::max<int64_t>(p.K, 1) * kSkinnyBlock));
  if constexpr (kWideInputs > 0) {
    if (p.M > kInputs && p.M <= kWideInputs) return run_wide(p, blocks, grain);
  }
  at::parallel_for(0, blocks, grain, [&](int64_t block_begin, int64_t block_end) {
    int64_t block = block_begin;
    for (; block + kBlocks <= block_end; block += kBlocks) blocks_against_all_inputs<kBlocks>(p, block);
    for (; block < block_end; ++block) blocks_against_all_inputs<1>(p, block);
  });
}

template void run_skinny_linear<float>(const SkinnyLinearProblem<float>&);
template void run_skinny_linear<c10::BFloat16>(const SkinnyLinearProblem<c10::BFloat16>&);

}  // namespace CPU_CAPABILITY
}  // namespace dspark::cpu
