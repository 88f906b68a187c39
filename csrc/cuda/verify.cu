// CUDA launcher of dspark::verify: structural checks only (a value check would need a
// device-to-host copy, i.e. a sync), output and scratch allocation, then the kernels of
// verify_kernel.cuh on the current stream. Malformed values are handled on the device.
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../core/verify_request.h"
#include "../dispatch.h"
#include "../verify_launch.h"
#include "cuda_type.h"
#include "verify_kernel.cuh"

namespace dspark::gpu {
namespace {

std::tuple<at::Tensor, at::Tensor> verify_cuda(const at::Tensor& target_logits, const at::Tensor& draft_token_ids,
                                               const std::optional<at::Tensor>& draft_logits,
                                               const at::Tensor& cu_num_draft, const at::Tensor& temperature,
                                               const at::Tensor& seed, const at::Tensor& offset, int64_t max_num_draft) {
  // Validates first, so a CPU tensor among CUDA ones gets the argument-naming error.
  const PreparedVerify v = prepare_verify(target_logits, draft_token_ids, draft_logits, cu_num_draft, temperature, seed,
                                          offset, max_num_draft);
  const c10::cuda::CUDAGuard device_guard(v.target_logits.device());
  if (v.shape.num_requests > 0) {
    const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
    DSPARK_DISPATCH_LOGIT_TYPES(v.target_logits.scalar_type(), "dspark_verify_cuda", [&] {
      AT_DISPATCH_INDEX_TYPES(v.draft_token_ids.scalar_type(), "dspark_verify_cuda_ids", [&] {
        launch_verify(v.problem<typename CudaType<scalar_t>::type, scalar_t, index_t>(), stream);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
  }
  return {v.output_token_ids, v.num_accepted};
}

}  // namespace
}  // namespace dspark::gpu

TORCH_LIBRARY_IMPL(dspark, CUDA, m) { m.impl("verify", &dspark::gpu::verify_cuda); }
