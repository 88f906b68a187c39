// CPU launcher of dspark::skinny_linear: F.linear(input, weight, bias) in float32 for the few
// rows of a target verifying drafts, on the weight packed by dspark_ext.ops.pack_skinny_weight
// ([ceil(N / 16), K, 16], blocks of 16 output features, k-major; float32 or bfloat16). Validates, then runs the
// kernel built for this CPU's instruction set (csrc/cpu/skinny_linear_kernel.h).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <vector>

#include "../checks.h"
#include "cpu_isa.h"
#include "packed_weight_checks.h"
#include "skinny_linear_dispatch.h"

namespace dspark::cpu {
namespace {

constexpr const char* kOp = "dspark::skinny_linear";

at::Tensor skinny_linear_cpu(const at::Tensor& input, const at::Tensor& packed_weight, int64_t out_features,
                             const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(input.dim() >= 1, kOp, ": input must have at least 1 dimension ([*, K]), got a scalar");
  check_dtype(kOp, "input", input, {at::kFloat});
  TORCH_CHECK(out_features >= 0, kOp, ": out_features must be >= 0, got ", out_features);
  const int64_t N = out_features;
  const int64_t K = input.size(-1);
  check_packed_weight(kOp, "packed_weight", packed_weight, N, K, "input.size(-1)", input, "input");
  if (bias.has_value()) check_vector(kOp, "bias", *bias, at::kFloat, N, "out_features", input, "input");

  std::vector<int64_t> out_shape(input.sizes().begin(), input.sizes().end() - 1);
  out_shape.push_back(N);
  int64_t M = 1;
  for (int64_t i = 0; i + 1 < input.dim(); ++i) M *= input.size(i);
  const at::Tensor rows = input.reshape({M, K});
  const at::Tensor x = (rows.stride(1) == 1 || K <= 1) ? rows : rows.contiguous();
  const at::Tensor w = packed_weight.contiguous();
  const at::Tensor b = bias.has_value() ? bias->contiguous() : at::Tensor();
  at::Tensor out = at::empty({M, N}, input.options());
  const float* bias_data = b.defined() ? b.data_ptr<float>() : nullptr;
  if (w.scalar_type() == at::kBFloat16) {
    const SkinnyLinearProblem<c10::BFloat16> problem{x.data_ptr<float>(), w.data_ptr<c10::BFloat16>(), bias_data,
                                                     out.data_ptr<float>(), M, N, K, x.stride(0)};
    DSPARK_CALL_FOR_CPU_ISA(run_skinny_linear, problem);
  } else {
    const SkinnyLinearProblem<float> problem{x.data_ptr<float>(), w.data_ptr<float>(), bias_data,
                                             out.data_ptr<float>(), M, N, K, x.stride(0)};
    DSPARK_CALL_FOR_CPU_ISA(run_skinny_linear, problem);
  }
  return out.view(out_shape);
}

}  // namespace
}  // namespace dspark::cpu

TORCH_LIBRARY_IMPL(dspark, CPU, m) { m.impl("skinny_linear", &dspark::cpu::skinny_linear_cpu); }
