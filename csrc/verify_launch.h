// What the CPU and CUDA launchers of dspark::verify share: structural validation (values
// that need a device read are checked by the CPU launcher only), inputs in the layout the
// kernels read, outputs, scratch, and the tensors -> raw-pointer VerifyProblem bridge.
#pragma once

#include <ATen/core/Tensor.h>

#include <ATen/ops/empty.h>

#include <optional>
#include <tuple>

#include "checks.h"
#include "core/rng.h"
#include "core/verify_request.h"

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
  check_sampling_controls(op, temperature, seed, offset, B);
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

struct PreparedVerify {
  VerifyShape shape;
  int64_t max_num_draft;
  at::Tensor target_logits, draft_token_ids, cu_num_draft, temperature, seed, offset;
  std::optional<at::Tensor> draft_logits;
  at::Tensor output_token_ids, num_accepted, scratch;
  core::VerifyScratch layout;

  // KernelLogitT has the bits of ScalarT in the kernel's own type (c10::Half -> __half on CUDA).
  template <typename KernelLogitT, typename ScalarT, typename IdT>
  core::VerifyProblem<KernelLogitT, IdT> problem() const {
    core::VerifyProblem<KernelLogitT, IdT> p{};
    p.target_logits = reinterpret_cast<const KernelLogitT*>(target_logits.const_data_ptr<ScalarT>());
    p.target_row_stride = target_logits.stride(0);
    p.draft_logits = draft_logits.has_value()
                         ? reinterpret_cast<const KernelLogitT*>(draft_logits->const_data_ptr<ScalarT>())
                         : nullptr;
    p.draft_row_stride = draft_logits.has_value() ? draft_logits->stride(0) : 0;
    p.draft_token_ids = draft_token_ids.const_data_ptr<IdT>();
    p.cu_num_draft = cu_num_draft.const_data_ptr<int32_t>();
    p.temperature = temperature.const_data_ptr<float>();
    p.seed = seed.const_data_ptr<int64_t>();
    p.offset = offset.const_data_ptr<int64_t>();
    p.num_requests = shape.num_requests;
    p.num_drafts = shape.num_drafts;
    p.vocab_size = shape.vocab_size;
    p.max_num_draft = max_num_draft;
    p.output_token_ids = output_token_ids.mutable_data_ptr<int64_t>();
    p.num_accepted = num_accepted.mutable_data_ptr<int32_t>();
    layout.carve(scratch.mutable_data_ptr<unsigned char>(), &p);
    return p;
  }
};

// Validates the structure, makes the small tensors contiguous (logit rows stay strided),
// and allocates outputs and scratch, whose sizes depend on shapes only (CUDA-graph safe).
inline PreparedVerify prepare_verify(const at::Tensor& target_logits, const at::Tensor& draft_token_ids,
                                     const std::optional<at::Tensor>& draft_logits, const at::Tensor& cu_num_draft,
                                     const at::Tensor& temperature, const at::Tensor& seed, const at::Tensor& offset,
                                     int64_t max_num_draft) {
  PreparedVerify v;
  v.shape = check_verify_arguments(target_logits, draft_token_ids, draft_logits, cu_num_draft, temperature, seed,
                                   offset, max_num_draft);
  v.max_num_draft = max_num_draft;
  v.target_logits = with_dense_rows(target_logits);
  if (draft_logits.has_value()) v.draft_logits = with_dense_rows(*draft_logits);
  v.draft_token_ids = draft_token_ids.contiguous();
  v.cu_num_draft = cu_num_draft.contiguous();
  v.temperature = temperature.contiguous();
  v.seed = seed.contiguous();
  v.offset = offset.contiguous();
  const at::TensorOptions options = target_logits.options();
  v.output_token_ids = at::empty({v.shape.num_requests, max_num_draft + 1}, options.dtype(at::kLong));
  v.num_accepted = at::empty({v.shape.num_requests}, options.dtype(at::kInt));
  v.layout = core::VerifyScratch::layout(v.shape.num_requests, v.shape.num_drafts, v.shape.vocab_size);
  v.scratch = at::empty({v.layout.total_bytes}, options.dtype(at::kByte));
  return v;
}

}  // namespace dspark
