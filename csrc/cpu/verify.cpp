// CPU launcher of dspark::verify: validates, checks values (free on the host), picks
// the kernel built for this CPU's instruction set and runs it.
#include <ATen/Dispatch.h>
#include <ATen/ops/fill.h>
#include <torch/library.h>

#include <cmath>
#include <cstdlib>

#include "../core/verify_request.h"
#include "../dispatch.h"
#include "../verify_launch.h"
#include "cpu_isa.h"
#include "verify_dispatch.h"

namespace dspark::cpu {
namespace {

void check_values_on_host(const at::Tensor& draft_token_ids, const at::Tensor& cu_num_draft,
                          const at::Tensor& temperature, int64_t num_drafts, int64_t vocab_size,
                          int64_t max_num_draft) {
  constexpr const char* op = "dspark::verify";
  const int32_t* cu = cu_num_draft.data_ptr<int32_t>();
  const int64_t B = cu_num_draft.size(0) - 1;
  TORCH_CHECK(cu[0] == 0, op, ": cu_num_draft must start at 0, got ", cu[0]);
  for (int64_t b = 0; b < B; ++b) {
    const int64_t length = static_cast<int64_t>(cu[b + 1]) - cu[b];
    TORCH_CHECK(length >= 0, op, ": cu_num_draft must be non-decreasing, but cu_num_draft[", b + 1, "] = ", cu[b + 1],
                " < cu_num_draft[", b, "] = ", cu[b]);
    TORCH_CHECK(length <= max_num_draft, op, ": request ", b, " has ", length,
                " draft tokens (from cu_num_draft) but max_num_draft is ", max_num_draft);
  }
  TORCH_CHECK(cu[B] == num_drafts, op, ": cu_num_draft[B] must equal D = draft_token_ids.size(0) = ", num_drafts,
              ", got ", cu[B]);
  AT_DISPATCH_INDEX_TYPES(draft_token_ids.scalar_type(), "dspark_verify_ids", [&] {
    const index_t* ids = draft_token_ids.data_ptr<index_t>();
    for (int64_t i = 0; i < num_drafts; ++i)
      TORCH_CHECK(ids[i] >= 0 && ids[i] < vocab_size, op, ": draft_token_ids[", i, "] = ", ids[i],
                  " is outside the vocabulary [0, ", vocab_size, ")");
  });
  const float* t = temperature.data_ptr<float>();
  for (int64_t b = 0; b < B; ++b)
    TORCH_CHECK(t[b] >= 0.0f && std::isfinite(t[b]), op, ": temperature[", b, "] must be finite and >= 0 (0 = greedy), got ",
                t[b]);
}

template <typename LogitT, typename IdT>
void run_for_cpu(const core::VerifyProblem<LogitT, IdT>& problem) {
  DSPARK_CALL_FOR_CPU_ISA(run_verify, problem);
}

std::tuple<at::Tensor, at::Tensor> verify_cpu(const at::Tensor& target_logits, const at::Tensor& draft_token_ids,
                                              const std::optional<at::Tensor>& draft_logits,
                                              const at::Tensor& cu_num_draft, const at::Tensor& temperature,
                                              const at::Tensor& seed, const at::Tensor& offset, int64_t max_num_draft) {
  const PreparedVerify v = prepare_verify(target_logits, draft_token_ids, draft_logits, cu_num_draft, temperature, seed,
                                          offset, max_num_draft);
  check_values_on_host(v.draft_token_ids, v.cu_num_draft, v.temperature, v.shape.num_drafts, v.shape.vocab_size,
                       max_num_draft);
  // Tests only: scratch filled with 0xFF bytes (NaN floats, -1 ids), so a stage that read a row
  // summary or tile stats no wave computed could not go unnoticed (tests/test_verify.py).
  static const bool poison_scratch = std::getenv("DSPARK_VERIFY_POISON_SCRATCH") != nullptr;
  if (poison_scratch) v.scratch.fill_(0xFF);
  if (v.shape.num_requests > 0) {
    DSPARK_DISPATCH_LOGIT_TYPES(v.target_logits.scalar_type(), "dspark_verify_cpu", [&] {
      AT_DISPATCH_INDEX_TYPES(v.draft_token_ids.scalar_type(), "dspark_verify_cpu_ids",
                              [&] { run_for_cpu(v.problem<scalar_t, scalar_t, index_t>()); });
    });
  }
  return {v.output_token_ids, v.num_accepted};
}

}  // namespace
}  // namespace dspark::cpu

TORCH_LIBRARY_IMPL(dspark, CPU, m) { m.impl("verify", &dspark::cpu::verify_cpu); }
