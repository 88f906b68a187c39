"""Typed Python wrappers over ``torch.ops.dspark.*`` and their fake (meta) kernels.

The schemas live in csrc/registration.cpp; this module is named there with
``set_python_module`` so the dispatcher imports it whenever a fake kernel is needed
(torch.compile, FakeTensor, opcheck).
"""

from typing import Optional, Sequence, Tuple

import torch


@torch.library.register_fake("dspark::verify")
def _verify_fake(target_logits, draft_token_ids, draft_logits, cu_num_draft, temperature, seed, offset, max_num_draft):
    num_requests = cu_num_draft.shape[0] - 1
    output_token_ids = target_logits.new_empty((num_requests, max_num_draft + 1), dtype=torch.int64)
    num_accepted = target_logits.new_empty((num_requests,), dtype=torch.int32)
    return output_token_ids, num_accepted


def verify(
    target_logits: torch.Tensor,
    draft_token_ids: torch.Tensor,
    draft_logits: Optional[torch.Tensor],
    cu_num_draft: torch.Tensor,
    temperature: torch.Tensor,
    seed: torch.Tensor,
    offset: torch.Tensor,
    max_num_draft: int,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Lossless parallel verification of a ragged batch of drafts (rejection sampling / greedy).

    Request b owns draft tokens ``cu_num_draft[b]:cu_num_draft[b+1]`` and target rows
    ``cu_num_draft[b] + b`` .. ``cu_num_draft[b+1] + b`` (the last one is the bonus row).
    Returns ``(output_token_ids [B, max_num_draft + 1] int64, num_accepted [B] int32)``:
    the accepted drafts, then one token chosen by the target, then -1 padding.
    See README.md for the full contract.
    """
    return torch.ops.dspark.verify(
        target_logits, draft_token_ids, draft_logits, cu_num_draft, temperature, seed, offset, max_num_draft
    )


@torch.library.register_fake("dspark::markov_draft")
def _markov_draft_fake(
    base_logits, prev_token_ids, markov_w1, markov_w2, temperature, seed, offset, conf_base, conf_w_prev,
    conf_temperature,
):
    num_requests, num_draft, _ = base_logits.shape
    draft_token_ids = base_logits.new_empty((num_requests, num_draft), dtype=torch.int64)
    draft_logits = base_logits.new_empty(base_logits.shape)  # contiguous, whatever base_logits' strides
    confidence_shape = (num_requests, num_draft) if conf_base is not None else (0,)
    confidence = base_logits.new_empty(confidence_shape, dtype=torch.float32)
    return draft_token_ids, draft_logits, confidence


def markov_draft(
    base_logits: torch.Tensor,
    prev_token_ids: torch.Tensor,
    markov_w1: torch.Tensor,
    markov_w2: torch.Tensor,
    temperature: torch.Tensor,
    seed: torch.Tensor,
    offset: torch.Tensor,
    conf_base: Optional[torch.Tensor] = None,
    conf_w_prev: Optional[torch.Tensor] = None,
    conf_temperature: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Autoregressive Markov drafting of K tokens per request, with optional per-position confidence.

    ``base_logits`` [B, K, V] (float32/bfloat16/float16) are the backbone's logits U_k;
    ``prev_token_ids`` [B] int64 the anchor token x_0; ``markov_w1``, ``markov_w2`` [V, r]
    (float32 or base_logits' dtype) the Markov embedding and output weight. Draft position k
    uses ``l_k = U_k + W2 @ W1[x_{k-1}]`` (float32 math, rounded to base_logits' dtype) and
    takes its argmax (``temperature`` [B] float32 == 0) or samples softmax(l_k / T) from the
    keyed Philox stream ``(seed, offset)`` [B] int64. With ``conf_base`` [B, K] float32,
    ``confidence[b, k] = sigmoid((conf_base[b, k] + conf_w_prev . W1[x_{k-1}]) / conf_temperature[k])``
    (``conf_w_prev`` [r] and ``conf_temperature`` [K] float32 are optional).

    Returns ``(draft_token_ids [B, K] int64, draft_logits [B, K, V] contiguous in base_logits'
    dtype, confidence [B, K] float32 or [0] without conf_base)``, all on base_logits' device.
    """
    return torch.ops.dspark.markov_draft(
        base_logits, prev_token_ids, markov_w1, markov_w2, temperature, seed, offset,
        conf_base, conf_w_prev, conf_temperature,
    )


@torch.library.register_fake("dspark::_exp_for_testing")
def _exp_for_testing_fake(x, isa, nonpositive=False):
    return torch.empty_like(x)


@torch.library.register_fake("dspark::schedule")
def _schedule_fake(confidence, sps, max_len):
    torch._check(confidence.dim() == 2, lambda: f"dspark::schedule: confidence must be 2-D, got {confidence.dim()}-D")
    torch._check(sps.dim() == 1, lambda: f"dspark::schedule: sps must be 1-D, got {sps.dim()}-D")
    return confidence.new_empty((confidence.shape[0],), dtype=torch.int32)


def schedule(confidence: torch.Tensor, sps: torch.Tensor, max_len: Optional[torch.Tensor] = None) -> torch.Tensor:
    """DSpark Algorithm 1: how many drafts each request verifies this round.

    ``confidence`` [R, K] float32 holds the conditional acceptance c_{r,k}; ``sps`` [N + 1]
    float32 the profiled steps per second of one target forward over n tokens at index n
    (index 0 unused; batches above N tokens are inadmissible; N >= R); ``max_len`` [R] int32
    optionally caps each request. Candidates (r, j) with survival a_{r,j} = prod_{i<=j} c_{r,i} > 0
    are admitted in descending a (ties: lower request, then lower position) while
    Theta = tau * SPS(B) strictly improves, stopping at the first that does not (the early stop
    keeps it lossless). Returns ``num_draft`` [R] int32. See README.md for the full contract.
    """
    return torch.ops.dspark.schedule(confidence, sps, max_len)


SKINNY_BLOCK = 16  # output features per block of a packed weight (csrc/cpu/skinny_linear_dispatch.h)


def pack_skinny_weight(weight: torch.Tensor) -> torch.Tensor:
    """The [N, K] weight of a linear layer (float32, or bfloat16: half the bytes to stream) in
    ``skinny_linear``'s layout and dtype: blocks of 16 output features, k-major, zero-padded
    past N: packed[b, k, j] = weight[16 b + j, k], shape [ceil(N / 16), K, 16]. Pack once, when
    the model loads."""
    if weight.dim() != 2:
        raise ValueError(f"pack_skinny_weight: weight must be 2-D [N, K], got shape {tuple(weight.shape)}")
    n, k = weight.shape
    blocks = -(-n // SKINNY_BLOCK)
    padded = weight.new_zeros(blocks * SKINNY_BLOCK, k)
    padded[:n] = weight
    return padded.view(blocks, SKINNY_BLOCK, k).transpose(1, 2).contiguous()


@torch.library.register_fake("dspark::skinny_linear")
def _skinny_linear_fake(input, packed_weight, out_features, bias):
    torch._check(input.dim() >= 1, lambda: "dspark::skinny_linear: input must have at least 1 dimension")
    torch._check(packed_weight.dim() == 3, lambda: "dspark::skinny_linear: packed_weight must be 3-D")
    torch._check(packed_weight.shape[1] == input.shape[-1],
                 lambda: "dspark::skinny_linear: packed_weight.size(1) must equal input.size(-1) (K)")
    return input.new_empty((*input.shape[:-1], out_features))


def skinny_linear(input: torch.Tensor, packed_weight: torch.Tensor, out_features: int,
                  bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``F.linear(input, weight, bias)`` in float32 on CPU for the few rows a target forward has
    when it verifies drafts: input [*, K] float32, ``packed_weight = pack_skinny_weight(weight)``
    (float32 or bfloat16, widened exactly), ``out_features`` = N, bias [N] float32 or None.
    Returns [*, N] float32.

    Each block of 16 output features streams from memory once for all rows of ``input``, so up
    to ~16 rows cost about one read of the weight (a BLAS GEMM costs ~2x that at 8 rows). Every
    output is one chain of fused multiply-adds over k in order, then + bias: ``out[m]`` is
    bit-identical whatever the other rows or their number, and the same in the AVX2 and
    AVX-512 builds. CPU only; large inputs (a prompt) belong to ``F.linear``.
    """
    return torch.ops.dspark.skinny_linear(input, packed_weight, out_features, bias)


@torch.library.register_fake("dspark::cached_attention")
def _cached_attention_fake(query, key_cache, value_cache, cu_seqlens, context_lengths, scale):
    torch._check(query.dim() == 3, lambda: "dspark::cached_attention: query must be 3-D [T, H, D]")
    torch._check(key_cache.dim() == 4, lambda: "dspark::cached_attention: key_cache must be 4-D [B, KVH, C, D]")
    torch._check(key_cache.shape[3] == query.shape[2],
                 lambda: "dspark::cached_attention: key_cache.size(3) must equal query.size(2) (D)")
    return query.new_empty(query.shape)


def cached_attention(query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                     cu_seqlens: torch.Tensor, context_lengths: torch.Tensor, scale: float) -> torch.Tensor:
    """Causal attention of a step's packed query rows over each request's cache, on CPU, as a
    target forward runs it when it decodes a token or verifies a few drafts.

    query [T, H, D] float32: request b's rows are ``cu_seqlens[b]:cu_seqlens[b+1]`` (int64
    [B + 1]); key_cache, value_cache [B, KVH, C, D] float32, with H a multiple of KVH (query head
    h reads KV head ``h // (H // KVH)``) and the step's own keys and values already written at
    positions ``context_lengths[b] + t``; context_lengths [B] int64, the keys cached before the
    step. Row t of request b attends to keys ``0 .. context_lengths[b] + t`` with softmax of
    ``scale * q . k``. Returns [T, H, D] float32.

    One task per (request, KV head) reads each cached row once for all its query heads and
    rows, so a step of a few rows per request costs about what one row does (CPU SDPA pads
    every request to the longest). A query's output depends only on its own row, position and
    cache: bit-identical whatever the other rows or their number, and the same in the AVX2 and
    AVX-512 builds. D <= 256; CPU only.
    """
    return torch.ops.dspark.cached_attention(query, key_cache, value_cache, cu_seqlens, context_lengths, scale)


@torch.library.register_fake("dspark::draft_layer")
def _draft_layer_fake(x, rope_cos, rope_sin, key_cache, value_cache, context_lengths, block_slot, attn_norm,
                      qkv_weight, q_norm, k_norm, o_weight, mlp_norm, gate_up_weight, down_weight, num_heads, eps,
                      final_norm=None):
    torch._check(x.dim() == 3, lambda: "dspark::draft_layer: x must be 3-D [B, Q, D]")
    torch._check(key_cache.dim() == 4, lambda: "dspark::draft_layer: key_cache must be 4-D [B, C, KVH, head dim]")
    return x.new_empty(x.shape)


def draft_layer(x: torch.Tensor, rope_cos: torch.Tensor, rope_sin: torch.Tensor, key_cache: torch.Tensor,
                value_cache: torch.Tensor, context_lengths: torch.Tensor, block_slot: int, attn_norm: torch.Tensor,
                qkv_weight: torch.Tensor, q_norm: Optional[torch.Tensor], k_norm: Optional[torch.Tensor],
                o_weight: torch.Tensor, mlp_norm: torch.Tensor, gate_up_weight: torch.Tensor,
                down_weight: torch.Tensor, num_heads: int, eps: float,
                final_norm: Optional[torch.Tensor] = None) -> torch.Tensor:
    """One pre-norm decoder layer of a DSpark drafter's backbone over a drafting round's block, on
    CPU, in one call (from Python the layer's ~35 small ops cost more than their arithmetic).

    x [B, Q, D] float32: the block's rows; rope_cos / rope_sin [B, Q, hd] float32: their RoPE
    tables (rotate_half); key_cache / value_cache [B, C, KVH, hd] float32, contiguous, holding each
    request's context keys/values at positions ``0 .. context_lengths[b]`` (int64 [B], at most
    ``block_slot``): the op writes the block's keys and values at ``block_slot .. block_slot + Q``
    (every request alike) and each block row attends to its request's context and to the whole
    block (bidirectional), with softmax(q . k / sqrt(hd)), GQA (query head h reads KV head
    ``h // (num_heads // KVH)``). Weights: ``qkv_weight`` ([(H + 2 KVH) hd, D]: q, k, v rows),
    ``o_weight`` ([D, H hd]), ``gate_up_weight`` ([2 I, D]: gate, up rows) and ``down_weight``
    ([D, I]), each packed by ``pack_skinny_weight`` (float32 or bfloat16); ``attn_norm`` /
    ``mlp_norm`` [D] and the optional per-head ``q_norm`` / ``k_norm`` [hd] RMSNorm weights
    (Qwen3's, applied before RoPE), ``eps`` their epsilon. Returns x + attention + MLP, [B, Q, D]
    float32, what ``dspark_ext.drafters.dspark.BackboneLayer.forward`` computes within rounding;
    with ``final_norm`` [D] (the backbone's last layer), that output through the backbone's final
    RMSNorm (same ``eps``). CPU only.
    """
    return torch.ops.dspark.draft_layer(x, rope_cos, rope_sin, key_cache, value_cache, context_lengths, block_slot,
                                        attn_norm, qkv_weight, q_norm, k_norm, o_weight, mlp_norm, gate_up_weight,
                                        down_weight, num_heads, eps, final_norm)


@torch.library.register_fake("dspark::draft_context")
def _draft_context_fake(features, rows, positions, context_weight, context_norm, rope_cos, rope_sin, kv_weights,
                        k_norms, key_caches, value_caches, eps):
    torch._check(features.dim() == 3, lambda: "dspark::draft_context: features must be 3-D [B, L, F]")
    torch._check(len(key_caches) == len(kv_weights) and len(value_caches) == len(kv_weights),
                 lambda: "dspark::draft_context: kv_weights, key_caches and value_caches must have one entry per layer")
    return None


def draft_context(features: torch.Tensor, rows: torch.Tensor, positions: torch.Tensor, context_weight: torch.Tensor,
                  context_norm: torch.Tensor, rope_cos: torch.Tensor, rope_sin: torch.Tensor,
                  kv_weights: Sequence[torch.Tensor], k_norms: Sequence[torch.Tensor],
                  key_caches: Sequence[torch.Tensor], value_caches: Sequence[torch.Tensor], eps: float) -> None:
    """A DSpark drafting round's context feed on CPU, in one call (from Python it is ~25 small
    ops a round): for each fed row i, the target's features ``features[rows[i], positions[i]]``
    (features [B, L, F] float32, unit stride along F; rows, positions [n] int64) through the
    context projection ``context_weight`` ([D, F], packed by ``pack_skinny_weight``, float32 or
    bfloat16, the feature scale folded in) and its RMSNorm ``context_norm`` [D]; then, in every
    layer l, the k/v projection ``kv_weights[l]`` ([2 KVH hd, D] packed: k rows, then v rows), the
    keys' per-head RMSNorm ``k_norms[l]`` [hd] (Qwen3's; an empty list: none) and rotate_half
    RoPE with row ``positions[i]`` of the tables ``rope_cos`` / ``rope_sin`` [P, hd] float32. The
    keys and values are written into ``key_caches[l]`` / ``value_caches[l]`` ([B, C, KVH, hd]
    float32, contiguous) at ``[rows[i], positions[i]]`` and nowhere else. ``eps``: the norms'
    epsilon. What ``DSparkBackbone.project_context`` and ``context_kv`` compute, within float32
    rounding. CPU only.
    """
    torch.ops.dspark.draft_context(features, rows, positions, context_weight, context_norm, rope_cos, rope_sin,
                                   list(kv_weights), list(k_norms), list(key_caches), list(value_caches), eps)
