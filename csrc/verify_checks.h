// Structural validation of dspark::verify arguments, shared by the CPU and CUDA
// launchers (values that need a device read are checked by the CPU launcher only).
#pragma once

#include <ATen/core/Tensor.h>

#include <ATen/ops/empty.h>

#include <optional>
#include <tuple>

#include "checks.h"
#include "core/rng.h"

namespace dspark {

struct VerifyShape {
  int64_t num_requests, num_drafts, vocab_size;
};

inline VerifyShape check_verify_arguments(const at::Tensor& target_logits, const at::Tensor& draft_token_ids,
                                          const std::optional<at::Tensor>& draft_logits,
                                          const at::Tensor& cu_num_draft, const at::Tensor& temperature,
                                          const at::Tensor& seed, const at::Tensor& offset, int64_t max_num_draft) {
  constexpr const char* op = "dspark::verify";
  check_dim(op, "target_logits", target_logits, 2);
  check_dtype(op, "target_logits", target_logits, {at::kFloat, at::kBFloat16, at::kHalf});
  check_dim(op, "draft_token_ids", draft_token_ids, 1);
  check_dtype(op, "draft_token_ids", draft_token_ids, {at::kInt, at::kLong});
  check_dim(op, "cu_num_draft", cu_num_draft, 1);
  check_dtype(op, "cu_num_draft", cu_num_draft, {at::kInt});
  TORCH_CHECK(cu_num_draft.size(0) >= 1, op, ": cu_num_draft must have B + 1 >= 1 entries, got shape ",
              cu_num_draft.sizes());
  const int64_t B = cu_num_draft.size(0) - 1;
  const int64_t D = draft_token_ids.size(0);
  const int64_t V = target_logits.size(1);
  TORCH_CHECK(V >= 1 && V <= INT32_MAX, op, ": target_logits must have a vocabulary of 1 to 2^31-1 columns, got shape ",
              target_logits.sizes());
  TORCH_CHECK(target_logits.size(0) == D + B, op, ": target_logits must have D + B = ", D, " + ", B, " = ", D + B,
              " rows (D = draft_token_ids.size(0), B = cu_num_draft.size(0) - 1), got shape ", target_logits.sizes());
  TORCH_CHECK(max_num_draft >= 0 && max_num_draft <= core::kMaxRandomPosition - 1, op,
              ": max_num_draft must be in [0, 2^24 - 2], got ", max_num_draft);
  check_dim(op, "temperature", temperature, 1);
  check_dtype(op, "temperature", temperature, {at::kFloat});
  check_size(op, "temperature", temperature, 0, B, "B");
  check_dim(op, "seed", seed, 1);
  check_dtype(op, "seed", seed, {at::kLong});
  check_size(op, "seed", seed, 0, B, "B");
  check_dim(op, "offset", offset, 1);
  check_dtype(op, "offset", offset, {at::kLong});
  check_size(op, "offset", offset, 0, B, "B");
  check_same_device(op, "draft_token_ids", draft_token_ids, target_logits, "target_logits");
  check_same_device(op, "cu_num_draft", cu_num_draft, target_logits, "target_logits");
  check_same_device(op, "temperature", temperature, target_logits, "target_logits");
  check_same_device(op, "seed", seed, target_logits, "target_logits");
  check_same_device(op, "offset", offset, target_logits, "target_logits");
  if (draft_logits.has_value()) {
    const at::Tensor& d = *draft_logits;
    check_dim(op, "draft_logits", d, 2);
    TORCH_CHECK(d.scalar_type() == target_logits.scalar_type(), op, ": draft_logits must have the dtype of target_logits (",
                target_logits.scalar_type(), "), got ", d.scalar_type());
    check_size(op, "draft_logits", d, 0, D, "D = draft_token_ids.size(0)");
    check_size(op, "draft_logits", d, 1, V, "the vocabulary size of target_logits");
    check_same_device(op, "draft_logits", d, target_logits, "target_logits");
  }
  return VerifyShape{B, D, V};
}

// Rows may be strided (a slice of a bigger buffer, or broadcast); the vocabulary
// dimension is read densely, so only a strided vocabulary dimension is copied.
inline at::Tensor with_dense_rows(const at::Tensor& logits) {
  return logits.stride(1) == 1 || logits.size(1) == 1 ? logits : logits.contiguous();
}

inline std::tuple<at::Tensor, at::Tensor> allocate_verify_outputs(const at::Tensor& like, int64_t num_requests,
                                                                   int64_t max_num_draft) {
  return {at::empty({num_requests, max_num_draft + 1}, like.options().dtype(at::kLong)),
          at::empty({num_requests}, like.options().dtype(at::kInt))};
}

}  // namespace dspark
