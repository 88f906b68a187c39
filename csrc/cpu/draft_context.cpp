// CPU launcher of dspark::draft_context: a drafting round's context feed in one call. Each round a
// DSpark drafter caches, for the tokens verification has just made context, its context keys
// and values in every backbone layer: the target's features through the context projection and
// its norm, then each layer's k/v projection, the keys' per-head norm and RoPE. From Python that
// is ~25 small framework ops a round, and right after a target step each costs tens of
// microseconds of cold code (bench/RESULTS.md); here the projections run on the packed weights
// through the skinny_linear kernel built for this CPU, the rest in plain loops.
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <algorithm>
#include <string>
#include <vector>

#include "../checks.h"
#include "draft_math.h"
#include "packed_weight_checks.h"

namespace dspark::cpu {
namespace {

constexpr const char* kOp = "dspark::draft_context";

void draft_context_cpu(const at::Tensor& features, const at::Tensor& rows, const at::Tensor& positions,
                       const at::Tensor& context_weight, const at::Tensor& context_norm, const at::Tensor& rope_cos,
                       const at::Tensor& rope_sin, at::TensorList kv_weights, at::TensorList k_norms,
                       at::TensorList key_caches, at::TensorList value_caches, double eps) {
  check_dim(kOp, "features", features, 3);
  check_dtype(kOp, "features", features, {at::kFloat});
  TORCH_CHECK(features.stride(2) == 1, kOp, ": features must be contiguous along its last dim (F), got strides ",
              features.strides());
  const int64_t B = features.size(0), L = features.size(1), F = features.size(2);
  check_dim(kOp, "rows", rows, 1);
  const int64_t n = rows.size(0);
  check_dtype(kOp, "rows", rows, {at::kLong});
  check_same_device(kOp, "rows", rows, features, "features");
  check_vector(kOp, "positions", positions, at::kLong, n, "n = rows.size(0)", features, "features");
  check_dim(kOp, "context_norm", context_norm, 1);
  const int64_t D = context_norm.size(0);
  check_vector(kOp, "context_norm", context_norm, at::kFloat, D, "D", features, "features");
  check_packed_weight(kOp, "context_weight", context_weight, D, F, "F = features.size(2)", features, "features");
  TORCH_CHECK(std::isfinite(eps) && eps >= 0, kOp, ": eps must be finite and >= 0, got ", eps);

  const size_t layers = kv_weights.size();
  TORCH_CHECK(key_caches.size() == layers && value_caches.size() == layers, kOp, ": kv_weights, key_caches and ",
              "value_caches must have one entry per layer, got ", layers, ", ", key_caches.size(), " and ",
              value_caches.size());
  TORCH_CHECK(k_norms.empty() || k_norms.size() == layers, kOp, ": k_norms must be empty or have one entry per ",
              "layer (", layers, "), got ", k_norms.size());
  int64_t C = 0, KVH = 0, hd = 0;
  for (size_t l = 0; l < layers; ++l) {
    check_kv_caches(kOp, key_caches[l], value_caches[l], features, "features");
    TORCH_CHECK(key_caches[l].is_contiguous() && value_caches[l].is_contiguous(), kOp,
                ": key_caches and value_caches must be contiguous (the context's keys and values are written into them)");
    if (l == 0) {
      C = key_caches[0].size(1), KVH = key_caches[0].size(2), hd = key_caches[0].size(3);
      TORCH_CHECK(KVH > 0 && hd > 0 && hd % 2 == 0, kOp, ": key_caches[0] must have KV heads and an even head dim, "
                  "got shape ", key_caches[0].sizes());
    }
    TORCH_CHECK(key_caches[l].size(0) == B && key_caches[l].size(1) == C && key_caches[l].size(2) == KVH &&
                    key_caches[l].size(3) == hd,
                kOp, ": key_caches[", l, "] must be [B, C, KVH, head dim] = [", B, ", ", C, ", ", KVH, ", ", hd,
                "] (B = features.size(0), the rest as key_caches[0]), got ", key_caches[l].sizes());
    const std::string name = "kv_weights[" + std::to_string(l) + "]";
    check_packed_weight(kOp, name.c_str(), kv_weights[l], 2 * KVH * hd, D, "D = context_norm.size(0)", features,
                        "features");
    if (!k_norms.empty()) {
      const std::string norm_name = "k_norms[" + std::to_string(l) + "]";
      check_vector(kOp, norm_name.c_str(), k_norms[l], at::kFloat, hd, "head dim", features, "features");
    }
  }
  for (const auto& [name, table] : {std::pair<const char*, const at::Tensor&>{"rope_cos", rope_cos},
                                    std::pair<const char*, const at::Tensor&>{"rope_sin", rope_sin}}) {
    check_dim(kOp, name, table, 2);
    check_dtype(kOp, name, table, {at::kFloat});
    check_same_device(kOp, name, table, features, "features");
    TORCH_CHECK(table.size(0) == rope_cos.size(0) && (layers == 0 || table.size(1) == hd), kOp, ": ", name,
                " must be [positions, head dim] (head dim ", hd, ", as many positions as rope_cos), got ",
                table.sizes());
  }
  const at::Tensor row_ids = rows.contiguous(), position_ids = positions.contiguous();
  const int64_t* row_data = row_ids.data_ptr<int64_t>();
  const int64_t* position_data = position_ids.data_ptr<int64_t>();
  const int64_t last_position = std::min({L, layers == 0 ? L : C, rope_cos.size(0)});
  for (int64_t i = 0; i < n; ++i) {
    TORCH_CHECK(row_data[i] >= 0 && row_data[i] < B, kOp, ": rows[", i, "] = ", row_data[i],
                " must be a request in [0, ", B, ") (features.size(0))");
    TORCH_CHECK(position_data[i] >= 0 && position_data[i] < last_position, kOp, ": positions[", i, "] = ",
                position_data[i], " must be in [0, ", last_position,
                ") (within features.size(1), the caches' size(1) and rope_cos.size(0))");
  }
  if (n == 0) return;

  // The fed rows' features, gathered, then the context projection and its norm.
  std::vector<float> gathered(n * F), projected(n * D), context(n * D);
  const float* feature_data = features.data_ptr<float>();
  for (int64_t i = 0; i < n; ++i) {
    const float* src = feature_data + row_data[i] * features.stride(0) + position_data[i] * features.stride(1);
    std::copy(src, src + F, &gathered[i * F]);
  }
  draft::packed_linear(context_weight.contiguous(), gathered.data(), n, F, D, projected.data());
  const at::Tensor norm_weight = context_norm.contiguous();
  for (int64_t i = 0; i < n; ++i)
    draft::rms_norm(&projected[i * D], norm_weight.data_ptr<float>(), &context[i * D], D, static_cast<float>(eps));

  // Each layer's keys (per-head norm, RoPE at the row's position) and values, into its caches.
  const int64_t width = KVH * hd;
  std::vector<float> kv(n * 2 * width), scratch(hd);
  const at::Tensor cos = rope_cos.contiguous(), sin = rope_sin.contiguous();
  for (size_t l = 0; l < layers; ++l) {
    draft::packed_linear(kv_weights[l].contiguous(), context.data(), n, D, 2 * width, kv.data());
    const at::Tensor norm = k_norms.empty() ? at::Tensor() : k_norms[l].contiguous();
    float* keys = key_caches[l].data_ptr<float>();
    float* values = value_caches[l].data_ptr<float>();
    for (int64_t i = 0; i < n; ++i) {
      float* k = &kv[i * 2 * width];
      const float* c = cos.data_ptr<float>() + position_data[i] * hd;
      const float* s = sin.data_ptr<float>() + position_data[i] * hd;
      for (int64_t h = 0; h < KVH; ++h) {
        float* head = k + h * hd;
        if (norm.defined()) draft::rms_norm(head, norm.data_ptr<float>(), head, hd, static_cast<float>(eps));
        draft::rotate(head, c, s, hd, scratch.data());
      }
      const int64_t slot = (row_data[i] * C + position_data[i]) * width;
      std::copy(k, k + width, keys + slot);
      std::copy(k + width, k + 2 * width, values + slot);
    }
  }
}

}  // namespace
}  // namespace dspark::cpu

TORCH_LIBRARY_IMPL(dspark, CPU, m) { m.impl("draft_context", &dspark::cpu::draft_context_cpu); }
