// Every dspark op schema, declared once. Backends add kernels with
// TORCH_LIBRARY_IMPL(dspark, CPU|CUDA, m) next to their code; fake (meta) kernels live
// in Python (dspark_ext/ops.py), which the dispatcher imports on demand.
#include <torch/library.h>

TORCH_LIBRARY(dspark, m) {
  m.set_python_module("dspark_ext.ops");
  m.def(
      "verify(Tensor target_logits, Tensor draft_token_ids, Tensor? draft_logits, Tensor cu_num_draft, "
      "Tensor temperature, Tensor seed, Tensor offset, int max_num_draft) -> (Tensor, Tensor)");
  m.def(
      "markov_draft(Tensor base_logits, Tensor prev_token_ids, Tensor markov_w1, Tensor markov_w2, "
      "Tensor temperature, Tensor seed, Tensor offset, "
      "Tensor? conf_base, Tensor? conf_w_prev, Tensor? conf_temperature) -> (Tensor, Tensor, Tensor)");
  m.def("schedule(Tensor confidence, Tensor sps, Tensor? max_len) -> Tensor");
  // F.linear for the few rows of a target verifying drafts, batch-invariant, on a weight packed
  // by dspark_ext.ops.pack_skinny_weight ([ceil(N / 16), K, 16]); CPU only.
  m.def("skinny_linear(Tensor input, Tensor packed_weight, int out_features, Tensor? bias) -> Tensor");
  // Causal attention of a step's few rows per request over a [B, KVH, C, D] cache, batch-invariant; CPU only.
  m.def("cached_attention(Tensor query, Tensor key_cache, Tensor value_cache, Tensor cu_seqlens, "
        "Tensor context_lengths, float scale) -> Tensor");
  // One pre-norm decoder layer of a DSpark drafter's backbone over a drafting block (Q rows per
  // request), on projections packed for skinny_linear; writes the block's keys and values into
  // the caches [B, C, KVH, D] at block_slot; with final_norm, the backbone's final RMSNorm of the
  // layer's output too (the last layer); CPU only.
  m.def("draft_layer(Tensor x, Tensor rope_cos, Tensor rope_sin, Tensor(a!) key_cache, Tensor(b!) value_cache, "
        "Tensor context_lengths, int block_slot, Tensor attn_norm, Tensor qkv_weight, Tensor? q_norm, "
        "Tensor? k_norm, Tensor o_weight, Tensor mlp_norm, Tensor gate_up_weight, Tensor down_weight, "
        "int num_heads, float eps, Tensor? final_norm=None) -> Tensor");
  // A DSpark drafting round's context feed: the target's features of the rows (request, position)
  // through the context projection and its norm, then each layer's k/v projection, key norm and
  // RoPE, written into that layer's caches [B, C, KVH, D]; CPU only.
  m.def("draft_context(Tensor features, Tensor rows, Tensor positions, Tensor context_weight, Tensor context_norm, "
        "Tensor rope_cos, Tensor rope_sin, Tensor[] kv_weights, Tensor[] k_norms, Tensor(a!)[] key_caches, "
        "Tensor(b!)[] value_caches, float eps) -> ()");
  // Internal, for tests only: core::exp_two_ulp (or, nonpositive, core::exp_nonpositive) as
  // built for one CPU instruction set ("scalar", "default", "avx2", "avx512"), elementwise.
  m.def("_exp_for_testing(Tensor x, str isa, bool nonpositive=False) -> Tensor");
}
