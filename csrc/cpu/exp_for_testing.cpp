// CPU kernel of dspark::_exp_for_testing (internal): core::exp_two_ulp (or exp_nonpositive),
// or its vector form as built for one instruction set, elementwise. tests/test_exp.py measures its error.
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <string>

#include "../core/exp.h"

namespace dspark::cpu {
#define DSPARK_DECLARE_EXP_FOR_ISA(ISA) \
  namespace ISA {                       \
  void exp_two_ulp_array(const float* in, float* out, int64_t n, bool nonpositive); \
  }
DSPARK_DECLARE_EXP_FOR_ISA(DEFAULT)
DSPARK_DECLARE_EXP_FOR_ISA(AVX2)
DSPARK_DECLARE_EXP_FOR_ISA(AVX512)
#undef DSPARK_DECLARE_EXP_FOR_ISA

namespace {

at::Tensor exp_for_testing(const at::Tensor& x, c10::string_view isa_view, bool nonpositive) {
  constexpr const char* op = "dspark::_exp_for_testing";
  const std::string isa(isa_view);
  TORCH_CHECK(x.scalar_type() == at::kFloat, op, ": x must be float32, got ", x.scalar_type());
  const at::Tensor in = x.contiguous();
  at::Tensor out = at::empty_like(in);
  const float* src = in.data_ptr<float>();
  if (nonpositive) {
    // exp_nonpositive's contract is x <= 0 (or NaN): larger x has no defined result.
    for (int64_t i = 0; i < in.numel(); ++i)
      TORCH_CHECK(!(src[i] > 0.0f), op, ": nonpositive=True takes x <= 0 (or NaN) only, got x[", i, "] = ", src[i]);
  }
  float* dst = out.data_ptr<float>();
  const int64_t n = in.numel();
  if (isa == "scalar") {
    for (int64_t i = 0; i < n; ++i) dst[i] = nonpositive ? core::exp_nonpositive(src[i]) : core::exp_two_ulp(src[i]);
  } else if (isa == "default") {
    DEFAULT::exp_two_ulp_array(src, dst, n, nonpositive);
#if defined(DSPARK_HAVE_X86_ISA_KERNELS)
  } else if (isa == "avx2") {
    TORCH_CHECK(__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"), op, ": this CPU has no AVX2");
    AVX2::exp_two_ulp_array(src, dst, n, nonpositive);
  } else if (isa == "avx512") {
    TORCH_CHECK(__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                    __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq"), op, ": this CPU has no AVX-512");
    AVX512::exp_two_ulp_array(src, dst, n, nonpositive);
#endif
  } else {
    TORCH_CHECK(false, op, ": isa must be one of scalar, default, avx2, avx512 (x86 only), got '", isa, "'");
  }
  return out;
}

}  // namespace
}  // namespace dspark::cpu

TORCH_LIBRARY_IMPL(dspark, CPU, m) { m.impl("_exp_for_testing", &dspark::cpu::exp_for_testing); }
