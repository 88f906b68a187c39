// CUDA launcher of dspark::verify: structural checks only (a value check would need a
// device-to-host copy, i.e. a sync), output and scratch allocation, then the kernels of
// verify_kernel.cuh on the current stream. Malformed values are handled on the device.
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../core/verify_request.h"
#include "../dispatch.h"
#include "../verify_checks.h"
#include "verify_kernel.cuh"

namespace dspark::gpu {
namespace {

// The CUDA type with the bit layout of each ATen logit type.
template <typename T>
struct CudaLogit {
  using type = T;
};
template <>
struct CudaLogit<c10::Half> {
  using type = __half;
};
template <>
struct CudaLogit<c10::BFloat16> {
  using type = __nv_bfloat16;
};

std::tuple<at::Tensor, at::Tensor> verify_cuda(const at::Tensor& target_logits_in, const at::Tensor& draft_token_ids_in,
                                               const std::optional<at::Tensor>& draft_logits_in,
                                               const at::Tensor& cu_num_draft_in, const at::Tensor& temperature_in,
                                               const at::Tensor& seed_in, const at::Tensor& offset_in,
                                               int64_t max_num_draft) {
  const VerifyShape shape = check_verify_arguments(target_logits_in, draft_token_ids_in, draft_logits_in,
                                                   cu_num_draft_in, temperature_in, seed_in, offset_in, max_num_draft);
  const c10::cuda::CUDAGuard device_guard(target_logits_in.device());
  const at::Tensor target_logits = with_dense_rows(target_logits_in);
  const std::optional<at::Tensor> draft_logits =
      draft_logits_in.has_value() ? std::optional<at::Tensor>(with_dense_rows(*draft_logits_in)) : std::nullopt;
  const at::Tensor draft_token_ids = draft_token_ids_in.contiguous();
  const at::Tensor cu_num_draft = cu_num_draft_in.contiguous();
  const at::Tensor temperature = temperature_in.contiguous();
  const at::Tensor seed = seed_in.contiguous();
  const at::Tensor offset = offset_in.contiguous();

  auto [output_token_ids, num_accepted] = allocate_verify_outputs(target_logits, shape.num_requests, max_num_draft);
  if (shape.num_requests == 0) return {output_token_ids, num_accepted};
  const core::VerifyScratch layout = core::VerifyScratch::layout(shape.num_requests, shape.num_drafts, shape.vocab_size);
  at::Tensor scratch = at::empty({layout.total_bytes}, target_logits.options().dtype(at::kByte));
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();

  DSPARK_DISPATCH_LOGIT_TYPES(target_logits.scalar_type(), "dspark_verify_cuda", [&] {
    using logit_t = typename CudaLogit<scalar_t>::type;
    AT_DISPATCH_INDEX_TYPES(draft_token_ids.scalar_type(), "dspark_verify_cuda_ids", [&] {
      core::VerifyProblem<logit_t, index_t> problem{};
      problem.target_logits = reinterpret_cast<const logit_t*>(target_logits.const_data_ptr<scalar_t>());
      problem.target_row_stride = target_logits.stride(0);
      problem.draft_logits =
          draft_logits.has_value() ? reinterpret_cast<const logit_t*>(draft_logits->const_data_ptr<scalar_t>()) : nullptr;
      problem.draft_row_stride = draft_logits.has_value() ? draft_logits->stride(0) : 0;
      problem.draft_token_ids = draft_token_ids.const_data_ptr<index_t>();
      problem.cu_num_draft = cu_num_draft.const_data_ptr<int32_t>();
      problem.temperature = temperature.const_data_ptr<float>();
      problem.seed = seed.const_data_ptr<int64_t>();
      problem.offset = offset.const_data_ptr<int64_t>();
      problem.num_requests = shape.num_requests;
      problem.num_drafts = shape.num_drafts;
      problem.vocab_size = shape.vocab_size;
      problem.max_num_draft = max_num_draft;
      problem.output_token_ids = output_token_ids.mutable_data_ptr<int64_t>();
      problem.num_accepted = num_accepted.mutable_data_ptr<int32_t>();
      layout.carve(scratch.mutable_data_ptr<unsigned char>(), &problem);
      launch_verify(problem, stream);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return {output_token_ids, num_accepted};
}

}  // namespace
}  // namespace dspark::gpu

TORCH_LIBRARY_IMPL(dspark, CUDA, m) { m.impl("verify", &dspark::gpu::verify_cuda); }
