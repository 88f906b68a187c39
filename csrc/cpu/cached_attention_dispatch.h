// The CPU cached_attention kernel exists once per instruction set (csrc/cpu/isa/); the
// launcher picks one at run time from ATen's CPU capability.
#pragma once

#include <cstdint>

namespace dspark::cpu {

// Dot products and sums are accumulated in 16 lanes (one AVX-512 vector, two AVX2 vectors),
// then added in one fixed tree: every build with FMA gives the same bits.
constexpr int64_t kAttentionLanes = 16;
// The longest head cached_attention takes (its key and value rows are held in registers).
constexpr int64_t kAttentionMaxHeadDim = 256;

struct CachedAttentionProblem {
  const float* query;           // [T, H, D]: row stride query_row_stride, head stride query_head_stride, unit along D
  int64_t query_row_stride, query_head_stride;
  const float* key_cache;       // [B, KVH, C, D] contiguous
  const float* value_cache;     // [B, KVH, C, D] contiguous
  const int64_t* cu_seqlens;    // [B + 1]: request b's query rows are [cu_seqlens[b], cu_seqlens[b + 1])
  const int64_t* context_lengths;  // [B]: keys cached before the step; query t of request b sees keys 0 .. context_lengths[b] + t
  float* out;                   // [T, H, D] contiguous
  int64_t B, H, KVH, C, D;
  float scale;
};

#define DSPARK_DECLARE_CACHED_ATTENTION_FOR_ISA(ISA) \
  namespace ISA {                                    \
  void run_cached_attention(const CachedAttentionProblem& problem); \
  }
DSPARK_DECLARE_CACHED_ATTENTION_FOR_ISA(DEFAULT)
DSPARK_DECLARE_CACHED_ATTENTION_FOR_ISA(AVX2)
DSPARK_DECLARE_CACHED_ATTENTION_FOR_ISA(AVX512)
#undef DSPARK_DECLARE_CACHED_ATTENTION_FOR_ISA

}  // namespace dspark::cpu
