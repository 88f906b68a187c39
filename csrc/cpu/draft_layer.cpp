// CPU launcher of dspark::draft_layer: one pre-norm decoder layer of a DSpark drafter's backbone
// over a drafting round's block of Q rows per request, in one call. The round's few rows make
// each step tiny (Q x 576 values), so the ~35 framework ops a layer takes from Python cost more
// than their arithmetic; here the projections run on the packed weights through the
// skinny_linear kernel built for this CPU (csrc/cpu/skinny_linear_kernel.h), the norms and RoPE in
// plain loops, SiLU and the attention (SDPA over the cache in place) through ATen.
#include <ATen/core/Tensor.h>
#include <ATen/ops/arange.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/ge.h>
#include <ATen/ops/logical_or.h>
#include <ATen/ops/lt.h>
#include <ATen/ops/scaled_dot_product_attention.h>
#include <ATen/ops/silu.h>
#include <torch/library.h>

#include <cmath>
#include <vector>

#include "../checks.h"
#include "draft_math.h"
#include "packed_weight_checks.h"

namespace dspark::cpu {
namespace {

constexpr const char* kOp = "dspark::draft_layer";
using draft::packed_linear;
using draft::rms_norm;
using draft::rotate;

at::Tensor draft_layer_cpu(const at::Tensor& x, const at::Tensor& rope_cos, const at::Tensor& rope_sin,
                           const at::Tensor& key_cache, const at::Tensor& value_cache,
                           const at::Tensor& context_lengths, int64_t block_slot, const at::Tensor& attn_norm,
                           const at::Tensor& qkv_weight, const std::optional<at::Tensor>& q_norm,
                           const std::optional<at::Tensor>& k_norm, const at::Tensor& o_weight,
                           const at::Tensor& mlp_norm, const at::Tensor& gate_up_weight, const at::Tensor& down_weight,
                           int64_t num_heads, double eps, const std::optional<at::Tensor>& final_norm) {
  check_dim(kOp, "x", x, 3);
  check_dtype(kOp, "x", x, {at::kFloat});
  check_kv_caches(kOp, key_cache, value_cache, x, "x");
  TORCH_CHECK(key_cache.is_contiguous() && value_cache.is_contiguous(), kOp,
              ": key_cache and value_cache must be contiguous (the block's keys and values are written into them)");
  const int64_t B = x.size(0), Q = x.size(1), D = x.size(2);
  const int64_t C = key_cache.size(1), KVH = key_cache.size(2), hd = key_cache.size(3);
  check_size(kOp, "key_cache", key_cache, 0, B, "B = x.size(0)");
  TORCH_CHECK(num_heads > 0 && KVH > 0 && num_heads % KVH == 0, kOp, ": num_heads (", num_heads,
              ") must be a positive multiple of key_cache's ", KVH, " KV heads (key_cache.size(2))");
  TORCH_CHECK(hd > 0 && hd % 2 == 0, kOp, ": the head dim (key_cache.size(3)) must be even and positive, got ", hd);
  TORCH_CHECK(block_slot >= 0 && block_slot + Q <= C, kOp, ": block_slot (", block_slot, ") + the block's ", Q,
              " rows (x.size(1)) must fit the cache's ", C, " positions (key_cache.size(1))");
  TORCH_CHECK(std::isfinite(eps) && eps >= 0, kOp, ": eps must be finite and >= 0, got ", eps);
  for (const auto& [name, table] : {std::pair<const char*, const at::Tensor&>{"rope_cos", rope_cos},
                                    std::pair<const char*, const at::Tensor&>{"rope_sin", rope_sin}}) {
    check_dim(kOp, name, table, 3);
    check_dtype(kOp, name, table, {at::kFloat});
    check_same_device(kOp, name, table, x, "x");
    TORCH_CHECK(table.size(0) == B && table.size(1) == Q && table.size(2) == hd, kOp, ": ", name,
                " must be [B, Q, head dim] = [", B, ", ", Q, ", ", hd, "], got ", table.sizes());
  }
  check_vector(kOp, "context_lengths", context_lengths, at::kLong, B, "B = x.size(0)", x, "x");
  check_vector(kOp, "attn_norm", attn_norm, at::kFloat, D, "D = x.size(2)", x, "x");
  check_vector(kOp, "mlp_norm", mlp_norm, at::kFloat, D, "D = x.size(2)", x, "x");
  if (q_norm.has_value()) check_vector(kOp, "q_norm", *q_norm, at::kFloat, hd, "head dim", x, "x");
  if (k_norm.has_value()) check_vector(kOp, "k_norm", *k_norm, at::kFloat, hd, "head dim", x, "x");
  if (final_norm.has_value()) check_vector(kOp, "final_norm", *final_norm, at::kFloat, D, "D = x.size(2)", x, "x");
  const int64_t H = num_heads, qkv_width = (H + 2 * KVH) * hd;
  check_dim(kOp, "down_weight", down_weight, 3);
  const int64_t I = down_weight.size(1);
  check_packed_weight(kOp, "qkv_weight", qkv_weight, qkv_width, D, "D = x.size(2)", x, "x");
  check_packed_weight(kOp, "o_weight", o_weight, D, H * hd, "num_heads x head dim", x, "x");
  check_packed_weight(kOp, "gate_up_weight", gate_up_weight, 2 * I, D, "D = x.size(2)", x, "x");
  check_packed_weight(kOp, "down_weight", down_weight, D, I, "I = down_weight.size(1)", x, "x");
  const at::Tensor lengths = context_lengths.contiguous();
  const int64_t* length_data = lengths.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b)
    TORCH_CHECK(length_data[b] >= 0 && length_data[b] <= block_slot, kOp, ": context_lengths[", b,
                "] must be in [0, block_slot = ", block_slot, "], got ", length_data[b]);

  // Every operand read through a raw pointer is made contiguous first (a strided view is copied).
  const at::Tensor input = x.contiguous(), cos = rope_cos.contiguous(), sin = rope_sin.contiguous();
  const at::Tensor qn = q_norm.has_value() ? q_norm->contiguous() : at::Tensor();
  const at::Tensor kn = k_norm.has_value() ? k_norm->contiguous() : at::Tensor();
  const at::Tensor attn_w = attn_norm.contiguous(), mlp_w = mlp_norm.contiguous();
  const at::Tensor qkv_w = qkv_weight.contiguous(), o_w = o_weight.contiguous();
  const at::Tensor gate_up_w = gate_up_weight.contiguous(), down_w = down_weight.contiguous();
  const int64_t M = B * Q;
  const float* in = input.data_ptr<float>();
  at::Tensor out = at::empty({B, Q, D}, x.options());
  float* residual = out.data_ptr<float>();
  std::vector<float> normed(M * D), qkv(M * qkv_width), scratch(hd);
  std::vector<float> gate_up(M * 2 * I);

  // Attention block: norm, q/k/v, per-head q/k norms and RoPE, the block's keys and values into
  // the cache after the context, SDPA over the cache in place.
  for (int64_t m = 0; m < M; ++m) rms_norm(in + m * D, attn_w.data_ptr<float>(), &normed[m * D], D, float(eps));
  packed_linear(qkv_w, normed.data(), M, D, qkv_width, qkv.data());
  float* keys = key_cache.data_ptr<float>();
  float* values = value_cache.data_ptr<float>();
  for (int64_t m = 0; m < M; ++m) {
    const int64_t b = m / Q, t = m % Q;
    const float* c = cos.data_ptr<float>() + m * hd;
    const float* s = sin.data_ptr<float>() + m * hd;
    float* row = &qkv[m * qkv_width];
    for (int64_t h = 0; h < H + KVH; ++h) {
      float* head = row + h * hd;
      const at::Tensor& norm = h < H ? qn : kn;
      if (norm.defined()) rms_norm(head, norm.data_ptr<float>(), head, hd, float(eps));
      rotate(head, c, s, hd, scratch.data());
    }
    const int64_t slot = ((b * C) + block_slot + t) * KVH * hd;
    for (int64_t i = 0; i < KVH * hd; ++i) {
      keys[slot + i] = row[H * hd + i];
      values[slot + i] = row[(H + KVH) * hd + i];
    }
  }
  const int64_t L = block_slot + Q;
  const at::Tensor queries = at::from_blob(qkv.data(), {B, Q, H, hd}, {Q * qkv_width, qkv_width, hd, 1},
                                           x.options()).transpose(1, 2);
  const at::Tensor key_view = key_cache.narrow(1, 0, L).transpose(1, 2);
  const at::Tensor value_view = value_cache.narrow(1, 0, L).transpose(1, 2);
  const at::Tensor columns = at::arange(L, lengths.options());
  // A block row reads its request's context (positions < context_lengths[b]) and the whole block.
  const at::Tensor mask = at::logical_or(at::lt(columns.unsqueeze(0), lengths.unsqueeze(1)),
                                         at::ge(columns, block_slot).unsqueeze(0))
                              .view({B, 1, 1, L})
                              .expand({B, 1, Q, L});
  const at::Tensor attended = at::scaled_dot_product_attention(queries, key_view, value_view, mask, 0.0, false,
                                                               std::nullopt, KVH != H)
                                  .transpose(1, 2).contiguous();  // [B, Q, H, hd]
  packed_linear(o_w, attended.data_ptr<float>(), M, H * hd, D, residual);
  for (int64_t i = 0; i < M * D; ++i) residual[i] = in[i] + residual[i];

  // MLP block: norm, gate/up, SiLU(gate) * up, down, residual.
  for (int64_t m = 0; m < M; ++m) rms_norm(residual + m * D, mlp_w.data_ptr<float>(), &normed[m * D], D, float(eps));
  packed_linear(gate_up_w, normed.data(), M, D, 2 * I, gate_up.data());
  const at::Tensor gate_and_up = at::from_blob(gate_up.data(), {M, 2 * I}, x.options());
  // ATen's vectorized SiLU: the exp is most of this block's arithmetic.
  const at::Tensor activation = at::silu(gate_and_up.narrow(1, 0, I)).mul_(gate_and_up.narrow(1, I, I)).contiguous();
  std::vector<float> down(M * D);
  packed_linear(down_w, activation.data_ptr<float>(), M, I, D, down.data());
  for (int64_t i = 0; i < M * D; ++i) residual[i] += down[i];
  if (final_norm.has_value()) {  // the backbone's last layer: its final norm too
    const at::Tensor weight = final_norm->contiguous();
    for (int64_t m = 0; m < M; ++m) rms_norm(residual + m * D, weight.data_ptr<float>(), residual + m * D, D, float(eps));
  }
  return out;
}

}  // namespace
}  // namespace dspark::cpu

TORCH_LIBRARY_IMPL(dspark, CPU, m) { m.impl("draft_layer", &dspark::cpu::draft_layer_cpu); }
