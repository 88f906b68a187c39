// CPU launcher of dspark::markov_draft: validates, checks values (free on the host), picks
// the kernel built for this CPU's instruction set and runs it.
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <cmath>

#include "../core/markov.h"
#include "../dispatch.h"
#include "../markov_draft_launch.h"
#include "cpu_isa.h"
#include "markov_draft_dispatch.h"

namespace dspark::cpu {
namespace {

void check_values_on_host(const PreparedMarkovDraft& m) {
  constexpr const char* op = "dspark::markov_draft";
  const int64_t* anchors = m.prev_token_ids.const_data_ptr<int64_t>();
  const float* temperature = m.temperature.const_data_ptr<float>();
  for (int64_t b = 0; b < m.shape.batch; ++b) {
    TORCH_CHECK(anchors[b] >= 0 && anchors[b] < m.shape.vocab_size, op, ": prev_token_ids[", b, "] = ", anchors[b],
                " is outside the vocabulary [0, ", m.shape.vocab_size, ")");
    TORCH_CHECK(temperature[b] >= 0.0f && std::isfinite(temperature[b]), op, ": temperature[", b,
                "] must be finite and >= 0 (0 = greedy), got ", temperature[b]);
  }
  if (m.conf_temperature.has_value()) {
    const float* sts = m.conf_temperature->const_data_ptr<float>();
    for (int64_t k = 0; k < m.shape.steps; ++k)
      TORCH_CHECK(sts[k] > 0.0f && std::isfinite(sts[k]), op, ": conf_temperature[", k,
                  "] must be finite and > 0, got ", sts[k]);
  }
}

template <typename LogitT, typename WeightT>
void run_for_cpu(const core::MarkovDraftProblem<LogitT, WeightT>& problem) {
  DSPARK_CALL_FOR_CPU_ISA(run_markov_draft, problem);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> markov_draft_cpu(
    const at::Tensor& base_logits, const at::Tensor& prev_token_ids, const at::Tensor& markov_w1,
    const at::Tensor& markov_w2, const at::Tensor& temperature, const at::Tensor& seed, const at::Tensor& offset,
    const std::optional<at::Tensor>& conf_base, const std::optional<at::Tensor>& conf_w_prev,
    const std::optional<at::Tensor>& conf_temperature) {
  const PreparedMarkovDraft m = prepare_markov_draft(base_logits, prev_token_ids, markov_w1, markov_w2, temperature,
                                                     seed, offset, conf_base, conf_w_prev, conf_temperature);
  check_values_on_host(m);
  if (m.shape.batch > 0 && m.shape.steps > 0) {
    DSPARK_DISPATCH_LOGIT_TYPES(m.base_logits.scalar_type(), "dspark_markov_draft_cpu", [&] {
      if (m.weights_are_float()) {
        run_for_cpu(m.problem<scalar_t, scalar_t, float, float>());
      } else {
        run_for_cpu(m.problem<scalar_t, scalar_t, scalar_t, scalar_t>());
      }
    });
  }
  return {m.draft_token_ids, m.draft_logits, m.confidence};
}

}  // namespace
}  // namespace dspark::cpu

TORCH_LIBRARY_IMPL(dspark, CPU, m) { m.impl("markov_draft", &dspark::cpu::markov_draft_cpu); }
