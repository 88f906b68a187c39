"""vLLM V2 DSpark's dense Markov drafting loop as one `torch.ops.dspark.markov_draft` call.

`DSparkSpeculator._sample_sequential(num_reqs, head_hidden)`
(vllm/v1/worker/gpu/spec_decode/dspark/speculator.py:156-199, vLLM 0.32) runs the Markov head
num_speculative_steps times in a row, inside the draft step's FULL CUDA graph (:22-23):

    base = compute_draft_logits(head_hidden[sample_indices]).view(B, K, V)      # :165-169
    prev = input_ids[_anchor_idx[:B]]                                           # :177, the anchor
    for i in range(K):
        e = markov_w1(prev); logits_i = base[:, i] + logits_processor(markov_w2, e)   # :181-185
        prev = sample(logits_i)   # argmax without draft logits (:124-126), else Gumbel at the
                                  # request's temperature, caching logits_i pre-temperature in
                                  # draft_logits[state, i] for the rejection sampler (:136-154)
        draft_tokens[:, i] = prev
    confidence = sigmoid(confidence_head.proj(cat[h, e_i]))  if use_confidence_head  # :192-199

which is markov_draft's recurrence (README `torch.ops.dspark.markov_draft`) with markov_w1 =
`markov_head.markov_w1.weight` [V, r], markov_w2 = `markov_head.markov_w2.weight[:V]` [V, r]
(a ParallelLMHead padded to a multiple of 64 rows; the logits processor keeps the first V,
logits_processor.py:198), the anchor as prev_token_ids, temperature = the request's (0 without
draft logits, and for padded rows), seed = the request's seed and offset = the anchor position
(vLLM keys draw i by sample_pos[:, i] - 1 = anchor position + i, :146-148), conf_base =
`proj.weight[:, :H] @ h + proj.bias` and conf_w_prev = `proj.weight[0, H:]`
(qwen3_dspark.py:164-189, 305-310). The op returns the logits each draft was drawn from, which
are written to vLLM's draft-logits cache so that verification divides exactly them by T.

Rows whose request state is -1 (CUDA-graph padding or a dummy batch, dflash/speculator.py:
103-110, 700-722) are sampled greedily and never written to the cache (gumbel.py:232-256 masks
them the same way).

Everything else runs vLLM's original loop: top-k candidate drafting (:157-159), a reduced draft
vocabulary (:130-134), watermarked drafting (:138-142), a scaled or soft-capped logits processor,
quantized or tensor-parallel Markov / confidence weights, dtypes the op does not take, or a device
without a markov_draft kernel. Everything here is on the device: no host sync, shapes depend on
num_reqs and K only, so the call can be captured in vLLM's CUDA graph.
"""

import functools
import logging
import os
from typing import Callable, NamedTuple, Optional

import torch

from dspark_ext.integrations.vllm.v2_verify import op_has_kernel

logger = logging.getLogger("vllm.dspark_ext")

#: Calls that took markov_draft / the original loop (diagnostics).
call_counts = {"markov_draft": 0, "original": 0}

_UNQUANTIZED_METHODS = ("UnquantizedEmbeddingMethod", "UnquantizedLinearMethod")


def _is_plain_weight(layer) -> bool:
    """A floating-point 2-D weight used as is (no quantization scheme, no tensor parallelism)."""
    method = getattr(layer, "quant_method", None)
    weight = getattr(layer, "weight", None)
    return ((method is None or type(method).__name__ in _UNQUANTIZED_METHODS)
            and getattr(layer, "tp_size", 1) == 1 and isinstance(weight, torch.Tensor) and weight.dim() == 2
            and weight.is_floating_point())


@functools.lru_cache(maxsize=None)
def _shared_dspark_heads():
    """vLLM's DSparkMarkovHead and DSparkConfidenceHead (qwen3_dspark.py:48-189), which every
    DSpark model of vLLM 0.32 uses (qwen3_dspark, deepseek_v4/v41, kimi_k3), or None."""
    try:
        from vllm.model_executor.models.qwen3_dspark import DSparkConfidenceHead, DSparkMarkovHead
    except Exception:  # noqa: BLE001
        return None
    return DSparkMarkovHead, DSparkConfidenceHead


def _is_stock(instance, cls, *methods) -> bool:
    """`instance` is a `cls` whose `methods` are cls's own (not overridden by a subclass)."""
    return isinstance(instance, cls) and all(getattr(type(instance), m) is getattr(cls, m) for m in methods)


def fallback_reason(speculator) -> Optional[str]:
    """Why this speculator must run vLLM's own loop (host-side attributes only), or None."""
    if getattr(speculator, "_draft_topk", None) is not None:
        return "top-k candidate drafting (dspark_draft_topk)"
    if getattr(speculator, "draft_watermarker", None) is not None:
        return "watermarked drafting"
    model = speculator.model
    if getattr(speculator, "_d2t_scatter_index", None) is not None or \
            getattr(model, "draft_id_to_target_id", None) is not None:
        return "reduced draft vocabulary (d2t)"
    processor = getattr(model, "logits_processor", None)
    if processor is None or getattr(processor, "logits_as_input", False):
        return "no logits processor"
    if getattr(processor, "scale", 1.0) != 1.0 or getattr(processor, "soft_cap", None) is not None:
        return "scaled or soft-capped draft logits"
    heads = _shared_dspark_heads()
    head = getattr(getattr(model, "model", None), "markov_head", None)
    if heads is None or not _is_stock(head, heads[0], "embed", "bias"):
        return "not vLLM's DSparkMarkovHead"
    if not _is_plain_weight(head.markov_w1) or not _is_plain_weight(head.markov_w2):
        return "quantized or sharded Markov weights"
    if head.markov_w1.weight.dtype != head.markov_w2.weight.dtype:
        return "Markov weights of two dtypes"
    if getattr(speculator, "use_confidence_head", False):
        confidence_head = getattr(model.model, "confidence_head", None)
        if not _is_stock(confidence_head, heads[1], "forward"):
            return "not vLLM's DSparkConfidenceHead"
        if not _is_plain_weight(getattr(confidence_head, "proj", None)) or confidence_head.proj.weight.shape[0] != 1:
            return "quantized confidence head"
    cache = speculator.draft_logits
    if cache is not None and (cache.dim() != 3 or cache.shape[1] != speculator.num_speculative_steps):
        return f"draft-logits cache shaped {tuple(cache.shape)}"
    if not op_has_kernel("markov_draft", speculator.draft_tokens.device.type):
        return f"no dspark markov_draft kernel for {speculator.draft_tokens.device.type}"
    return None


def call_fallback_reason(speculator, sample_hidden: torch.Tensor, base_logits: torch.Tensor) -> Optional[str]:
    """What is known once the base logits exist: markov_draft's dtype rule for the weights, the
    cache holding the logits in their own dtype (vLLM asserts it, gumbel.py:364), and the
    confidence head's width (hidden + rank with the Markov term, qwen3_dspark.py:222-224)."""
    head = speculator.model.model.markov_head
    weight_dtype = head.markov_w1.weight.dtype
    if base_logits.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return f"{base_logits.dtype} draft logits"
    if weight_dtype not in (torch.float32, base_logits.dtype):
        return f"{weight_dtype} Markov weights with {base_logits.dtype} draft logits"
    vocab = base_logits.shape[-1]
    if head.markov_w1.weight.shape[0] < vocab or head.markov_w2.weight.shape[0] < vocab:
        return "Markov weights narrower than the draft vocabulary"
    cache = speculator.draft_logits
    if cache is not None and (cache.dtype != base_logits.dtype or cache.shape[-1] < vocab):
        return f"draft-logits cache {cache.dtype} x {cache.shape[-1]} for {base_logits.dtype} x {vocab} logits"
    if getattr(speculator, "use_confidence_head", False):
        confidence_head = speculator.model.model.confidence_head
        rank = head.markov_w1.weight.shape[1] if getattr(confidence_head, "with_markov", True) else 0
        if confidence_head.proj.weight.shape[1] != sample_hidden.shape[-1] + rank:
            return (f"confidence head of width {confidence_head.proj.weight.shape[1]} over hidden states of "
                    f"width {sample_hidden.shape[-1]}")
    return None


class MarkovWeights(NamedTuple):
    w1: torch.Tensor  # [V, r]
    w2: torch.Tensor  # [V, r]


def markov_weights(markov_head, vocab_size: int) -> MarkovWeights:
    """W1 and W2 as markov_draft takes them: the first V rows (W2 is padded to a multiple of 64;
    drafted and anchor ids are < V, so W1's rows past V are never read by vLLM either)."""
    return MarkovWeights(markov_head.markov_w1.weight[:vocab_size], markov_head.markov_w2.weight[:vocab_size])


class ConfidenceTerms(NamedTuple):
    conf_base: Optional[torch.Tensor]  # [B, K] float32
    conf_w_prev: Optional[torch.Tensor]  # [r] float32


def confidence_terms(speculator, sample_hidden: torch.Tensor, num_requests: int) -> ConfidenceTerms:
    """DSparkConfidenceHead's logit split into its hidden part (with the bias) and its weight on
    the Markov embedding: proj(cat[h, e]) = W[:, :H] h + b + W[0, H:] . e."""
    if not getattr(speculator, "use_confidence_head", False):
        return ConfidenceTerms(None, None)
    head = speculator.model.model.confidence_head
    weight, bias = head.proj.weight, getattr(head.proj, "bias", None)
    hidden_size = sample_hidden.shape[-1]
    conf_base = torch.nn.functional.linear(sample_hidden.float(), weight[:, :hidden_size].float(),
                                           None if bias is None else bias.float())
    conf_w_prev = weight[0, hidden_size:].float() if getattr(head, "with_markov", True) else None
    return ConfidenceTerms(conf_base.view(num_requests, -1), conf_w_prev)


def draft_temperature(speculator, request_state: torch.Tensor, is_request: torch.Tensor) -> torch.Tensor:
    """Per-row sampling temperature: vLLM draws greedily without a draft-logits cache (:124-126)
    and for padded rows (gumbel.py:233-235), else at the request's temperature."""
    if speculator.draft_logits is None:
        return torch.zeros(request_state.shape[0], dtype=torch.float32, device=request_state.device)
    return torch.where(is_request, speculator.temperature[request_state].to(torch.float32), 0.0)


def write_draft_logits_cache(cache: torch.Tensor, request_state: torch.Tensor, draft_logits: torch.Tensor) -> None:
    """cache[state_b, :, :V] = draft_logits[b] for every row with state_b >= 0, no other write.

    Without a host sync rows cannot be dropped, so padded rows write the same values as another
    row to the same place: the first real row's, or, when there is none (a dummy batch), slot 0's
    own current contents. Duplicate indices then all carry identical values. Overwrites the
    padded rows of `draft_logits`."""
    if request_state.shape[0] == 0:
        return
    vocab = draft_logits.shape[-1]
    is_request = request_state >= 0
    any_request = is_request.any()
    first_request = torch.argmax(is_request.to(torch.int32))
    stand_in = torch.where(any_request, draft_logits[first_request], cache[0, :, :vocab])
    torch.where(is_request[:, None, None], draft_logits, stand_in, out=draft_logits)
    stand_in_slot = torch.where(any_request, request_state[first_request], 0)
    destination = torch.where(is_request, request_state, stand_in_slot)
    cache[destination, :, :vocab] = draft_logits


@torch.no_grad()  # vLLM runs it under inference_mode already; the op has no autograd formula
def sample_sequential_with_markov_draft(speculator, num_reqs: int, head_hidden: torch.Tensor) -> bool:
    """The dense `_sample_sequential` through one markov_draft call. Returns False, having
    written nothing, when call_fallback_reason rules it out (the caller then runs vLLM's)."""
    num_steps = speculator.num_speculative_steps
    num_samples = num_reqs * num_steps
    # The backbone's logits, exactly as vLLM computes them (:165-169).
    sample_hidden = head_hidden[speculator.sample_indices[:num_samples]]
    base_logits = speculator.model.compute_draft_logits(sample_hidden)
    if call_fallback_reason(speculator, sample_hidden, base_logits) is not None:
        return False
    vocab = base_logits.shape[-1]
    base_logits = base_logits.view(num_reqs, num_steps, vocab)
    slot_state = speculator.sample_idx_mapping[:num_samples].view(num_reqs, num_steps)
    sample_pos = speculator.sample_pos[:num_samples].view(num_reqs, num_steps)
    request_state = slot_state[:, 0]  # every step of a request carries its state (dflash :683)
    is_request = request_state >= 0
    state = request_state.clamp(min=0)
    anchors = speculator.input_buffers.input_ids[speculator._anchor_idx[:num_reqs]]
    weights = markov_weights(speculator.model.model.markov_head, vocab)
    confidence = confidence_terms(speculator, sample_hidden, num_reqs)

    draft_token_ids, draft_logits, draft_confidence = torch.ops.dspark.markov_draft(
        base_logits,
        torch.where(is_request, anchors.to(torch.int64), 0),  # padded rows: any valid anchor
        weights.w1,
        weights.w2,
        draft_temperature(speculator, state, is_request),
        speculator.seeds[state].to(torch.int64),
        sample_pos[:, 0] - 1,  # the anchor's position: vLLM's key for draw 0 (:146-148)
        confidence.conf_base,
        confidence.conf_w_prev,
        None,
    )
    speculator.draft_tokens[:num_reqs] = draft_token_ids
    if confidence.conf_base is not None:
        speculator.draft_token_confidence_probs[:num_reqs] = draft_confidence
    if getattr(speculator, "acceptance_estimator", None) is not None:
        # vLLM feeds each step's pre-temperature logits to the estimator (:123).
        for step in range(num_steps):
            speculator._maybe_predict_acceptance(draft_logits[:, step], slot_state[:, step],
                                                 speculator._step_cols[step])
    if speculator.draft_logits is not None:
        write_draft_logits_cache(speculator.draft_logits, request_state, draft_logits)
    return True


_logged_reasons = set()


def _log_once(message: str, *args) -> None:
    key = (message,) + args
    if key not in _logged_reasons:
        _logged_reasons.add(key)
        logger.info(message, *args)


def make_sample_sequential_replacement(original: Callable) -> Callable:
    """A drop-in for `DSparkSpeculator._sample_sequential`: markov_draft, or `original`."""

    def _sample_sequential(self, num_reqs: int, head_hidden: torch.Tensor) -> None:
        reason = fallback_reason(self)
        if reason is None and sample_sequential_with_markov_draft(self, num_reqs, head_hidden):
            _log_once("dspark-ext (pid %d): DSpark drafting runs torch.ops.dspark.markov_draft", os.getpid())
            call_counts["markov_draft"] += 1
            return None
        _log_once("dspark-ext (pid %d): DSpark drafting runs vLLM's own loop (%s)", os.getpid(),
                  reason or "dtypes or widths of this call, see call_fallback_reason")
        call_counts["original"] += 1
        return original(self, num_reqs, head_hidden)

    _sample_sequential.__dspark_original__ = original
    _sample_sequential.__doc__ = make_sample_sequential_replacement.__doc__
    return _sample_sequential
