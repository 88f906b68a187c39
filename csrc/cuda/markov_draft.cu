// CUDA launcher of dspark::markov_draft: structural checks only (a value check would need a
// device-to-host copy, i.e. a sync), output and scratch allocation, then the cooperative
// kernel of markov_draft_kernel.cuh on the current stream. Malformed values are handled on
// the device (an anchor outside the vocabulary has no transition bias).
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../core/markov.h"
#include "../dispatch.h"
#include "../markov_draft_launch.h"
#include "cuda_type.h"
#include "markov_draft_kernel.cuh"

namespace dspark::gpu {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> markov_draft_cuda(
    const at::Tensor& base_logits, const at::Tensor& prev_token_ids, const at::Tensor& markov_w1,
    const at::Tensor& markov_w2, const at::Tensor& temperature, const at::Tensor& seed, const at::Tensor& offset,
    const std::optional<at::Tensor>& conf_base, const std::optional<at::Tensor>& conf_w_prev,
    const std::optional<at::Tensor>& conf_temperature) {
  // Validates first, so a CPU tensor among CUDA ones gets the argument-naming error.
  const PreparedMarkovDraft m = prepare_markov_draft(base_logits, prev_token_ids, markov_w1, markov_w2, temperature,
                                                     seed, offset, conf_base, conf_w_prev, conf_temperature);
  const c10::cuda::CUDAGuard device_guard(m.base_logits.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  DSPARK_DISPATCH_LOGIT_TYPES(m.base_logits.scalar_type(), "dspark_markov_draft_cuda", [&] {
    using KernelT = typename CudaType<scalar_t>::type;
    if (m.weights_are_float()) {
      C10_CUDA_CHECK(launch_markov_draft(m.problem<KernelT, scalar_t, float, float>(), stream));
    } else {
      C10_CUDA_CHECK(launch_markov_draft(m.problem<KernelT, scalar_t, KernelT, scalar_t>(), stream));
    }
  });
  return {m.draft_token_ids, m.draft_logits, m.confidence};
}

}  // namespace
}  // namespace dspark::gpu

TORCH_LIBRARY_IMPL(dspark, CUDA, m) { m.impl("markov_draft", &dspark::gpu::markov_draft_cuda); }
