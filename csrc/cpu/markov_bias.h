// The Markov bias of dspark::markov_draft on CPU: bias[b, v] = W2[v] . a_b for a chunk of
// ids and every row b of the batch, the GEMM-shaped part of a step. Each W2 row is read once
// for the whole batch (blocks of 4 ids x 4 rows share their loads in registers), and every
// bias is the same dot product, summed in one fixed order whatever the batch size, so a row's
// logits never depend on the other rows. Compiled once per instruction set.
#pragma once

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <type_traits>

#include "vec_sampling.h"

namespace dspark::cpu {
namespace CPU_CAPABILITY {

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

// dot_block for 1 to 4 rows.
struct FloatDot {
  void operator()(int64_t rows, const float* a, const float* w, int64_t rank, float* out) const {
    switch (rows) {
      case 4: return dot_block<4>(a, w, rank, out);
      case 3: return dot_block<3>(a, w, rank, out);
      case 2: return dot_block<2>(a, w, rank, out);
      default: return dot_block<1>(a, w, rank, out);
    }
  }
};

// The W2 rows of ids [v, v + count), count <= 4, as a dot kernel reads them (element type R):
// in place when the types agree and all 4 exist; else staged in `buffer` (converted, and past
// the vocabulary the last row repeated: its sums are computed and dropped).
template <typename R, typename W>
const R* w2_block(const W* w2, int64_t rank, int64_t v, int64_t count, R* buffer) {
  if constexpr (std::is_same_v<R, W>) {
    if (count == 4) return w2 + v * rank;
  }
  for (int64_t q = 0; q < 4; ++q) {
    const W* src = w2 + (v + std::min(q, count - 1)) * rank;
    if constexpr (std::is_same_v<R, W>) {
      std::copy(src, src + rank, buffer + q * rank);
    } else {
      load_row_as_float(src, rank, buffer + q * rank);
    }
  }
  return buffer;
}

// bias[b * kBiasChunk + i] = W2[v0 + i] . a_b for i < n <= kBiasChunk, b < B (a: [B, r]), with
// `dot(rows, a, w, rank, out)` computing blocks of 4 ids x up to 4 rows: the GEMM-shaped step,
// reading each W2 row from memory once for the whole batch.
template <typename A, typename R, typename W, typename Dot>
void markov_bias_chunk(const A* a, int64_t B, const W* w2, int64_t rank, int64_t v0, int64_t n, int64_t prefetch_end,
                       R* w_buffer, Dot dot, float* bias) {
  float out[kRowsPerBlock * 4];
  for (int64_t i = 0; i < n; i += 4) {
    const int64_t count = std::min<int64_t>(4, n - i);
    // Small batches stream W2 at memory speed: ask for the rows 4 blocks ahead now (rows
    // below prefetch_end only: the next ids of this thread's tile).
    if (v0 + i + 20 <= prefetch_end) {
      const char* ahead = reinterpret_cast<const char*>(w2 + (v0 + i + 16) * rank);
      for (int64_t byte = 0; byte < 4 * rank * static_cast<int64_t>(sizeof(W)); byte += 64) __builtin_prefetch(ahead + byte);
    }
    const R* rows = w2_block(w2, rank, v0 + i, count, w_buffer);
    for (int64_t b = 0; b < B; b += kRowsPerBlock) {
      const int64_t rows_here = std::min(kRowsPerBlock, B - b);
      dot(rows_here, a + b * rank, rows, rank, out);
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

// dot_block_bf16 for 1 to 4 rows (markov_bias_chunk's `dot` for bf16 weights).
struct Bf16Dot {
  void operator()(int64_t rows, const c10::BFloat16* a, const c10::BFloat16* w, int64_t rank, float* out) const {
    switch (rows) {
      case 4: return dot_block_bf16<4>(a, w, rank, out);
      case 3: return dot_block_bf16<3>(a, w, rank, out);
      case 2: return dot_block_bf16<2>(a, w, rank, out);
      default: return dot_block_bf16<1>(a, w, rank, out);
    }
  }
};
#endif

}  // namespace CPU_CAPABILITY
}  // namespace dspark::cpu
