// CPU launcher of dspark::verify: validates, checks values (free on the host), picks
// the kernel built for this CPU's instruction set and runs it.
#include <ATen/Dispatch.h>
#include <ATen/Version.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "../core/verify_request.h"
#include "../dispatch.h"
#include "../verify_checks.h"
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
    TORCH_CHECK(t[b] >= 0.0f, op, ": temperature[", b, "] must be >= 0 (0 = greedy), got ", t[b]);
}

enum class CpuIsa { kDefault, kAvx2, kAvx512 };

// ATen's own choice (it honours ATEN_CPU_CAPABILITY=default|avx2|avx512), read once.
CpuIsa detected_cpu_isa() {
  static const CpuIsa isa = [] {
    const std::string capability = at::get_cpu_capability();
    if (capability == "AVX512") return CpuIsa::kAvx512;
    if (capability == "AVX2") return CpuIsa::kAvx2;
    return CpuIsa::kDefault;
  }();
  return isa;
}

template <typename LogitT, typename IdT>
void run_for_cpu(const core::VerifyProblem<LogitT, IdT>& problem) {
  switch (detected_cpu_isa()) {
#if defined(DSPARK_HAVE_X86_ISA_KERNELS)
    case CpuIsa::kAvx512:
      return AVX512::run_verify(problem);
    case CpuIsa::kAvx2:
      return AVX2::run_verify(problem);
#endif
    default:
      return DEFAULT::run_verify(problem);
  }
}

std::tuple<at::Tensor, at::Tensor> verify_cpu(const at::Tensor& target_logits_in, const at::Tensor& draft_token_ids_in,
                                              const std::optional<at::Tensor>& draft_logits_in,
                                              const at::Tensor& cu_num_draft_in, const at::Tensor& temperature_in,
                                              const at::Tensor& seed_in, const at::Tensor& offset_in,
                                              int64_t max_num_draft) {
  const VerifyShape shape = check_verify_arguments(target_logits_in, draft_token_ids_in, draft_logits_in,
                                                   cu_num_draft_in, temperature_in, seed_in, offset_in, max_num_draft);
  const at::Tensor target_logits = with_dense_rows(target_logits_in);
  const std::optional<at::Tensor> draft_logits =
      draft_logits_in.has_value() ? std::optional<at::Tensor>(with_dense_rows(*draft_logits_in)) : std::nullopt;
  const at::Tensor draft_token_ids = draft_token_ids_in.contiguous();
  const at::Tensor cu_num_draft = cu_num_draft_in.contiguous();
  const at::Tensor temperature = temperature_in.contiguous();
  const at::Tensor seed = seed_in.contiguous();
  const at::Tensor offset = offset_in.contiguous();
  check_values_on_host(draft_token_ids, cu_num_draft, temperature, shape.num_drafts, shape.vocab_size, max_num_draft);

  auto [output_token_ids, num_accepted] = allocate_verify_outputs(target_logits, shape.num_requests, max_num_draft);
  if (shape.num_requests == 0) return {output_token_ids, num_accepted};
  const core::VerifyScratch layout = core::VerifyScratch::layout(shape.num_requests, shape.num_drafts, shape.vocab_size);
  at::Tensor scratch = at::empty({layout.total_bytes}, target_logits.options().dtype(at::kByte));

  DSPARK_DISPATCH_LOGIT_TYPES(target_logits.scalar_type(), "dspark_verify_cpu", [&] {
    AT_DISPATCH_INDEX_TYPES(draft_token_ids.scalar_type(), "dspark_verify_cpu_ids", [&] {
      core::VerifyProblem<scalar_t, index_t> problem{};
      problem.target_logits = target_logits.data_ptr<scalar_t>();
      problem.target_row_stride = target_logits.stride(0);
      problem.draft_logits = draft_logits.has_value() ? draft_logits->data_ptr<scalar_t>() : nullptr;
      problem.draft_row_stride = draft_logits.has_value() ? draft_logits->stride(0) : 0;
      problem.draft_token_ids = draft_token_ids.data_ptr<index_t>();
      problem.cu_num_draft = cu_num_draft.data_ptr<int32_t>();
      problem.temperature = temperature.data_ptr<float>();
      problem.seed = seed.data_ptr<int64_t>();
      problem.offset = offset.data_ptr<int64_t>();
      problem.num_requests = shape.num_requests;
      problem.num_drafts = shape.num_drafts;
      problem.vocab_size = shape.vocab_size;
      problem.max_num_draft = max_num_draft;
      problem.output_token_ids = output_token_ids.data_ptr<int64_t>();
      problem.num_accepted = num_accepted.data_ptr<int32_t>();
      layout.carve(scratch.data_ptr<unsigned char>(), &problem);
      run_for_cpu(problem);
    });
  });
  return {output_token_ids, num_accepted};
}

}  // namespace
}  // namespace dspark::cpu

TORCH_LIBRARY_IMPL(dspark, CPU, m) { m.impl("verify", &dspark::cpu::verify_cpu); }
