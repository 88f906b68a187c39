// CPU launcher of dspark::cached_attention: causal attention of a step's packed query rows
// [T, H, D] over each request's cached keys and values [B, KVH, C, D] (the step's own keys
// already written at context_lengths[b] + t). Validates, then runs the kernel built for this
// CPU's instruction set (csrc/cpu/cached_attention_kernel.h).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <cmath>

#include "../checks.h"
#include "cached_attention_dispatch.h"
#include "cpu_isa.h"

namespace dspark::cpu {
namespace {

constexpr const char* kOp = "dspark::cached_attention";

at::Tensor cached_attention_cpu(const at::Tensor& query, const at::Tensor& key_cache, const at::Tensor& value_cache,
                                const at::Tensor& cu_seqlens, const at::Tensor& context_lengths, double scale) {
  check_dim(kOp, "query", query, 3);
  check_dtype(kOp, "query", query, {at::kFloat});
  check_kv_caches(kOp, key_cache, value_cache, query, "query");
  const int64_t T = query.size(0), H = query.size(1), D = query.size(2);
  const int64_t B = key_cache.size(0), KVH = key_cache.size(1), C = key_cache.size(2);
  check_size(kOp, "key_cache", key_cache, 3, D, "head dim D = query.size(2)");
  TORCH_CHECK(KVH > 0 && H % KVH == 0, kOp, ": query's ", H, " heads must be a multiple of key_cache's ", KVH,
              " KV heads (key_cache.size(1))");
  TORCH_CHECK(D <= kAttentionMaxHeadDim, kOp, ": head dim D = query.size(2) must be <= ", kAttentionMaxHeadDim,
              ", got ", D);
  TORCH_CHECK(std::isfinite(scale), kOp, ": scale must be finite, got ", scale);
  check_vector(kOp, "cu_seqlens", cu_seqlens, at::kLong, B + 1, "B + 1, B = key_cache.size(0)", query, "query");
  check_vector(kOp, "context_lengths", context_lengths, at::kLong, B, "B = key_cache.size(0)", query, "query");

  const at::Tensor cu = cu_seqlens.contiguous();
  const at::Tensor lengths = context_lengths.contiguous();
  const int64_t* cu_data = cu.data_ptr<int64_t>();
  const int64_t* length_data = lengths.data_ptr<int64_t>();
  TORCH_CHECK(cu_data[0] == 0 && cu_data[B] == T, kOp, ": cu_seqlens must run from 0 to T = query.size(0) = ", T,
              ", got ", cu_data[0], " .. ", cu_data[B]);
  for (int64_t b = 0; b < B; ++b) {
    const int64_t rows = cu_data[b + 1] - cu_data[b];
    TORCH_CHECK(rows >= 0, kOp, ": cu_seqlens must be nondecreasing, got ", cu_data[b], " then ", cu_data[b + 1],
                " at request ", b);
    TORCH_CHECK(length_data[b] >= 0 && length_data[b] <= C - rows, kOp, ": context_lengths[", b, "] + its ", rows,
                " query rows must fit the cache's ", C, " positions (key_cache.size(2)), got context_lengths[", b,
                "] = ", length_data[b]);
  }

  const at::Tensor q = query.stride(2) == 1 ? query : query.contiguous();
  const at::Tensor k = key_cache.contiguous();
  const at::Tensor v = value_cache.contiguous();
  at::Tensor out = at::empty({T, H, D}, query.options());
  const CachedAttentionProblem problem{q.data_ptr<float>(), q.stride(0), q.stride(1), k.data_ptr<float>(),
                                       v.data_ptr<float>(), cu_data, length_data, out.data_ptr<float>(),
                                       B, H, KVH, C, D, static_cast<float>(scale)};
  DSPARK_CALL_FOR_CPU_ISA(run_cached_attention, problem);
  return out;
}

}  // namespace
}  // namespace dspark::cpu

TORCH_LIBRARY_IMPL(dspark, CPU, m) { m.impl("cached_attention", &dspark::cpu::cached_attention_cpu); }
