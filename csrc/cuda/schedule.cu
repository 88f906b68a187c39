// CUDA launcher of dspark::schedule: structural checks only (a value check would need a
// device-to-host copy, i.e. a sync), then the kernels of schedule_kernel.cuh on the current
// stream. Malformed values are read as core/schedule.h sanitizes them.
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../schedule_launch.h"
#include "schedule_kernel.cuh"

namespace dspark::gpu {
namespace {

at::Tensor schedule_cuda(const at::Tensor& confidence, const at::Tensor& sps, const std::optional<at::Tensor>& max_len) {
  // Validates first, so a CPU tensor among CUDA ones gets the argument-naming error.
  PreparedSchedule s = prepare_schedule(confidence, sps, max_len);
  const core::ScheduleProblem& p = s.problem;
  const int64_t num_candidates = p.num_requests * p.num_draft;
  if (num_candidates == 0) return s.num_draft.zero_();
  const c10::cuda::CUDAGuard device_guard(confidence.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  if (num_candidates <= kBlockCandidates) {
    C10_CUDA_CHECK(launch_schedule_block(p, stream));
    return s.num_draft;
  }
  const int n = static_cast<int>(num_candidates);
  ScheduleScratch scratch{};
  C10_CUDA_CHECK(schedule_cub_temp_bytes(n, scratch.cub_temp_bytes));
  const size_t scratch_bytes = carve_schedule_scratch(nullptr, n, scratch);
  // From the caching allocator on this stream: graph-capturable, no sync.
  at::Tensor buffer = at::empty({static_cast<int64_t>(scratch_bytes)}, confidence.options().dtype(at::kByte));
  carve_schedule_scratch(static_cast<char*>(buffer.data_ptr()), n, scratch);
  C10_CUDA_CHECK(launch_schedule_device_wide(p, scratch, stream));
  return s.num_draft;
}

}  // namespace
}  // namespace dspark::gpu

TORCH_LIBRARY_IMPL(dspark, CUDA, m) { m.impl("schedule", &dspark::gpu::schedule_cuda); }
