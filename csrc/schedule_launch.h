// What the CPU and CUDA launchers of dspark::schedule share: structural validation (values
// that need a device read are checked by the CPU launcher only), the output, and the
// tensors -> raw-pointer bridge. Inputs are read through their strides: no copies.
#pragma once

#include <ATen/core/Tensor.h>

#include <ATen/ops/empty.h>

#include <optional>

#include "checks.h"
#include "core/schedule.h"

namespace dspark {

struct PreparedSchedule {
  core::ScheduleProblem problem;
  at::Tensor num_draft;  // [R] int32, written in full by the kernels
};

inline PreparedSchedule prepare_schedule(const at::Tensor& confidence, const at::Tensor& sps,
                                         const std::optional<at::Tensor>& max_len) {
  constexpr const char* op = "dspark::schedule";
  check_dim(op, "confidence", confidence, 2);
  check_dtype(op, "confidence", confidence, {at::kFloat});
  const int64_t R = confidence.size(0), K = confidence.size(1);
  check_dim(op, "sps", sps, 1);
  check_dtype(op, "sps", sps, {at::kFloat});
  check_same_device(op, "sps", sps, confidence, "confidence");
  TORCH_CHECK(sps.size(0) >= 1, op, ": sps must have N + 1 >= 1 entries (index n = SPS of a batch of n tokens), got shape ",
              sps.sizes());
  const int64_t N = sps.size(0) - 1;
  TORCH_CHECK(R <= N, op, ": sps must cover a batch of at least R = confidence.size(0) = ", R,
              " tokens (every request verifies its anchor), got N = sps.size(0) - 1 = ", N);
  TORCH_CHECK(R * (K + 1) <= core::kMaxScheduledTokens, op, ": confidence may describe at most 2^22 tokens, R * (K + 1), got shape ",
              confidence.sizes());
  if (max_len.has_value()) {
    check_vector(op, "max_len", *max_len, at::kInt, R, "R = confidence.size(0)", confidence, "confidence");
  }

  PreparedSchedule s;
  s.num_draft = at::empty({R}, confidence.options().dtype(at::kInt));
  core::ScheduleProblem& p = s.problem;
  p.confidence = confidence.data_ptr<float>();
  p.confidence_stride_r = confidence.stride(0);
  p.confidence_stride_k = confidence.stride(1);
  p.sps = sps.data_ptr<float>();
  p.sps_stride = sps.stride(0);
  p.max_len = max_len.has_value() ? max_len->data_ptr<int32_t>() : nullptr;
  p.max_len_stride = max_len.has_value() ? max_len->stride(0) : 0;
  p.num_requests = R;
  p.num_draft = K;
  p.max_batch = N;
  p.num_draft_out = s.num_draft.data_ptr<int32_t>();
  return s;
}

}  // namespace dspark
