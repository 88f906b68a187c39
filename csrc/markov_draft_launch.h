// What the CPU and CUDA launchers of dspark::markov_draft share: structural validation
// (values that need a device read are checked by the CPU launcher only), inputs in the
// layout the kernels read, outputs, scratch, and the tensors -> raw-pointer bridge.
#pragma once

#include <ATen/core/Tensor.h>

#include <ATen/ops/empty.h>

#include <optional>

#include "checks.h"
#include "core/markov.h"
#include "core/rng.h"

namespace dspark {

struct MarkovDraftShape {
  int64_t batch, steps, vocab_size, rank;
};

inline MarkovDraftShape check_markov_draft_arguments(
    const at::Tensor& base_logits, const at::Tensor& prev_token_ids, const at::Tensor& markov_w1,
    const at::Tensor& markov_w2, const at::Tensor& temperature, const at::Tensor& seed, const at::Tensor& offset,
    const std::optional<at::Tensor>& conf_base, const std::optional<at::Tensor>& conf_w_prev,
    const std::optional<at::Tensor>& conf_temperature) {
  constexpr const char* op = "dspark::markov_draft";
  check_dim(op, "base_logits", base_logits, 3);
  check_dtype(op, "base_logits", base_logits, {at::kFloat, at::kBFloat16, at::kHalf});
  const int64_t B = base_logits.size(0), K = base_logits.size(1), V = base_logits.size(2);
  TORCH_CHECK(V >= 1 && V <= INT32_MAX, op, ": base_logits must have a vocabulary of 1 to 2^31-1 ids in dim 2, got shape ",
              base_logits.sizes());
  TORCH_CHECK(K <= core::kMaxRandomPosition, op, ": base_logits may hold at most 2^24 - 1 draft positions in dim 1, got shape ",
              base_logits.sizes());
  check_dim(op, "prev_token_ids", prev_token_ids, 1);
  check_dtype(op, "prev_token_ids", prev_token_ids, {at::kLong});
  check_size(op, "prev_token_ids", prev_token_ids, 0, B, "B = base_logits.size(0)");

  check_dim(op, "markov_w1", markov_w1, 2);
  const at::ScalarType logit_type = base_logits.scalar_type();
  TORCH_CHECK(markov_w1.scalar_type() == at::kFloat || markov_w1.scalar_type() == logit_type, op,
              ": markov_w1 must be float32 or the dtype of base_logits (", logit_type, "), got ",
              markov_w1.scalar_type());
  check_size(op, "markov_w1", markov_w1, 0, V, "V = base_logits.size(2)");
  const int64_t r = markov_w1.size(1);
  TORCH_CHECK(r >= 1, op, ": markov_w1 must have a rank r >= 1 in dim 1, got shape ", markov_w1.sizes());
  check_dim(op, "markov_w2", markov_w2, 2);
  TORCH_CHECK(markov_w2.scalar_type() == markov_w1.scalar_type(), op, ": markov_w2 must have the dtype of markov_w1 (",
              markov_w1.scalar_type(), "), got ", markov_w2.scalar_type());
  check_size(op, "markov_w2", markov_w2, 0, V, "V = base_logits.size(2)");
  check_size(op, "markov_w2", markov_w2, 1, r, "the rank r = markov_w1.size(1)");

  check_sampling_controls(op, temperature, seed, offset, B);

  if (conf_base.has_value()) {
    check_dim(op, "conf_base", *conf_base, 2);
    check_dtype(op, "conf_base", *conf_base, {at::kFloat});
    check_size(op, "conf_base", *conf_base, 0, B, "B");
    check_size(op, "conf_base", *conf_base, 1, K, "K = base_logits.size(1)");
    check_same_device(op, "conf_base", *conf_base, base_logits, "base_logits");
  } else {
    TORCH_CHECK(!conf_w_prev.has_value() && !conf_temperature.has_value(), op,
                ": conf_w_prev and conf_temperature need conf_base (confidence is computed only when conf_base is given)");
  }
  if (conf_w_prev.has_value()) {
    check_vector(op, "conf_w_prev", *conf_w_prev, at::kFloat, r, "the rank r = markov_w1.size(1)", base_logits,
                 "base_logits");
  }
  if (conf_temperature.has_value()) {
    check_vector(op, "conf_temperature", *conf_temperature, at::kFloat, K, "K = base_logits.size(1)", base_logits,
                 "base_logits");
  }
  check_same_device(op, "prev_token_ids", prev_token_ids, base_logits, "base_logits");
  check_same_device(op, "markov_w1", markov_w1, base_logits, "base_logits");
  check_same_device(op, "markov_w2", markov_w2, base_logits, "base_logits");
  check_same_device(op, "temperature", temperature, base_logits, "base_logits");
  check_same_device(op, "seed", seed, base_logits, "base_logits");
  check_same_device(op, "offset", offset, base_logits, "base_logits");
  return MarkovDraftShape{B, K, V, r};
}

inline std::optional<at::Tensor> contiguous_or_none(const std::optional<at::Tensor>& t) {
  return t.has_value() ? std::optional<at::Tensor>(t->contiguous()) : std::nullopt;
}

struct PreparedMarkovDraft {
  MarkovDraftShape shape;
  at::Tensor base_logits, prev_token_ids, markov_w1, markov_w2, temperature, seed, offset;
  std::optional<at::Tensor> conf_base, conf_w_prev, conf_temperature;
  at::Tensor draft_token_ids, draft_logits, confidence, scratch;
  core::MarkovDraftScratch layout;

  bool weights_are_float() const { return markov_w1.scalar_type() == at::kFloat; }

  // Kernel types have the bits of the ATen ones (c10::BFloat16 -> __nv_bfloat16 on CUDA).
  template <typename KernelLogitT, typename ScalarT, typename KernelWeightT, typename WeightScalarT>
  core::MarkovDraftProblem<KernelLogitT, KernelWeightT> problem() const {
    core::MarkovDraftProblem<KernelLogitT, KernelWeightT> p{};
    p.base_logits = reinterpret_cast<const KernelLogitT*>(base_logits.const_data_ptr<ScalarT>());
    p.prev_token_ids = prev_token_ids.const_data_ptr<int64_t>();
    p.markov_w1 = reinterpret_cast<const KernelWeightT*>(markov_w1.const_data_ptr<WeightScalarT>());
    p.markov_w2 = reinterpret_cast<const KernelWeightT*>(markov_w2.const_data_ptr<WeightScalarT>());
    p.temperature = temperature.const_data_ptr<float>();
    p.seed = seed.const_data_ptr<int64_t>();
    p.offset = offset.const_data_ptr<int64_t>();
    p.conf_base = conf_base.has_value() ? conf_base->const_data_ptr<float>() : nullptr;
    p.conf_w_prev = conf_w_prev.has_value() ? conf_w_prev->const_data_ptr<float>() : nullptr;
    p.conf_temperature = conf_temperature.has_value() ? conf_temperature->const_data_ptr<float>() : nullptr;
    p.batch = shape.batch;
    p.steps = shape.steps;
    p.vocab_size = shape.vocab_size;
    p.rank = shape.rank;
    p.draft_token_ids = draft_token_ids.mutable_data_ptr<int64_t>();
    p.draft_logits = reinterpret_cast<KernelLogitT*>(draft_logits.mutable_data_ptr<ScalarT>());
    p.confidence = conf_base.has_value() ? confidence.mutable_data_ptr<float>() : nullptr;
    layout.carve(scratch.mutable_data_ptr<unsigned char>(), &p);
    return p;
  }
};

// Validates the structure, makes inputs contiguous, and allocates outputs and scratch,
// whose sizes depend on shapes only (CUDA-graph safe).
inline PreparedMarkovDraft prepare_markov_draft(
    const at::Tensor& base_logits, const at::Tensor& prev_token_ids, const at::Tensor& markov_w1,
    const at::Tensor& markov_w2, const at::Tensor& temperature, const at::Tensor& seed, const at::Tensor& offset,
    const std::optional<at::Tensor>& conf_base, const std::optional<at::Tensor>& conf_w_prev,
    const std::optional<at::Tensor>& conf_temperature) {
  PreparedMarkovDraft m;
  m.shape = check_markov_draft_arguments(base_logits, prev_token_ids, markov_w1, markov_w2, temperature, seed, offset,
                                         conf_base, conf_w_prev, conf_temperature);
  m.base_logits = base_logits.contiguous();
  m.prev_token_ids = prev_token_ids.contiguous();
  m.markov_w1 = markov_w1.contiguous();
  m.markov_w2 = markov_w2.contiguous();
  m.temperature = temperature.contiguous();
  m.seed = seed.contiguous();
  m.offset = offset.contiguous();
  m.conf_base = contiguous_or_none(conf_base);
  m.conf_w_prev = contiguous_or_none(conf_w_prev);
  m.conf_temperature = contiguous_or_none(conf_temperature);
  const MarkovDraftShape& s = m.shape;
  const at::TensorOptions options = base_logits.options();
  m.draft_token_ids = at::empty({s.batch, s.steps}, options.dtype(at::kLong));
  m.draft_logits = at::empty({s.batch, s.steps, s.vocab_size}, options);
  m.confidence = conf_base.has_value() ? at::empty({s.batch, s.steps}, options.dtype(at::kFloat))
                                       : at::empty({0}, options.dtype(at::kFloat));
  m.layout = core::MarkovDraftScratch::layout(s.batch, s.vocab_size, s.rank);
  m.scratch = at::empty({m.layout.total_bytes}, options.dtype(at::kByte));
  return m;
}

}  // namespace dspark
