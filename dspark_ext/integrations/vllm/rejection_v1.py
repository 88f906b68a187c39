"""vLLM V1's rejection sampler routed through `torch.ops.dspark.verify`.

`RejectionSampler.forward(metadata, draft_probs, logits, sampling_metadata)`
(vllm/v1/sample/rejection_sampler.py:103) receives the target's logits as `[D + B, V]` rows,
request after request, each request's draft rows followed by its bonus row
(gpu_model_runner.py:2625, `_calc_spec_decode_metadata`): exactly verify's row layout. The
replacement takes one of three paths per call:

- fast: plain sampling parameters. verify reads the logits in place, with vLLM's temperatures
  (0 for greedy rows) and the draft probabilities as logits that reproduce them under
  softmax(. / T). It samples the bonus token too, so vLLM's separate bonus sampler is skipped.
- processed: top-k, top-p, penalties, allowed ids, bad words, min_tokens, thinking budget.
  Penalties and the like go through vLLM's own code (the draft rows as its rejection sampler
  processes them, the bonus rows as its sampler does, vllm/v1/sample/sampler.py:83); top-k /
  top-p become one keep-threshold per row (`top_k_top_p.py`, no vocabulary sort) and mask the
  rows with -inf, in place as vLLM's forward allows; verify then runs with vLLM's temperatures,
  so accepted, correction and bonus tokens all follow the processed law.
- fallback: vLLM's original forward, for what the mapping cannot prove equal (synthetic
  acceptance, logprobs of processed logits, per-token logprob ids, unknown logits processors,
  draft ids outside the vocabulary on CPU).
"""

import enum
import logging
import os
from typing import Callable, Optional, Tuple

import torch

import dspark_ext  # noqa: F401  (loads torch.ops.dspark.*)

logger = logging.getLogger("vllm.dspark_ext")

_SEED_BOUND = 1 << 62


class Path(enum.Enum):
    FAST = "fast"
    PROCESSED = "processed"
    FALLBACK = "fallback"


def choose_path(sampler, metadata, draft_probs, logits, sampling_metadata) -> Tuple[Path, str]:
    """Which path a call takes, and why (the reason is logged once per distinct reason)."""
    num_requests = len(metadata.num_draft_tokens)
    num_drafts = metadata.draft_token_ids.shape[0]
    if getattr(sampler, "synthetic_mode", False):
        return Path.FALLBACK, "synthetic acceptance is vLLM's own benchmark mode"
    if logits.dim() != 2 or logits.shape[0] != num_drafts + num_requests:
        return Path.FALLBACK, f"logits have {tuple(logits.shape)} rows, not drafts + requests"
    if draft_probs is not None and tuple(draft_probs.shape) != (num_drafts, logits.shape[1]):
        return Path.FALLBACK, f"draft_probs shaped {tuple(draft_probs.shape)}"
    if sampling_metadata.logprob_token_ids:
        return Path.FALLBACK, "logprobs of explicit token ids"
    logitsprocs = sampling_metadata.logitsprocs
    if list(logitsprocs.argmax_invariant):
        return Path.FALLBACK, "argmax-invariant logits processors (vLLM loads none with speculation)"
    unknown = [type(p).__name__ for p in logitsprocs.non_argmax_invariant if not _is_min_tokens(p)]
    if unknown:
        return Path.FALLBACK, f"logits processors {unknown}"
    if logits.device.type == "cpu" and num_drafts:
        # verify refuses out-of-vocabulary ids on CPU; vLLM rejects them (CUDA's verify does too).
        ids = metadata.draft_token_ids
        if bool((ids < 0).any()) or bool((ids >= logits.shape[1]).any()):
            return Path.FALLBACK, "draft ids outside the vocabulary"
    processing = processing_reasons(sampler, sampling_metadata)
    if processing:
        if sampling_metadata.max_num_logprobs is not None and sampler.is_processed_logprobs_mode:
            return Path.FALLBACK, "logprobs of processed logits"
        return Path.PROCESSED, ", ".join(processing)
    return Path.FAST, "plain sampling parameters"


def _is_min_tokens(processor) -> bool:
    from vllm.v1.sample.logits_processor.builtin import MinTokensLogitsProcessor

    return isinstance(processor, MinTokensLogitsProcessor)


def processing_reasons(sampler, sampling_metadata) -> list:
    """The sampling parameters of this batch that change the law beyond temperature."""
    reasons = []
    if sampling_metadata.top_k is not None:
        reasons.append("top-k")
    if sampling_metadata.top_p is not None:
        reasons.append("top-p")
    return reasons + vllm_processing_reasons(sampling_metadata)


def vllm_processing_reasons(sampling_metadata) -> list:
    """The parameters whose processing is left to vLLM's own code."""
    reasons = []
    if not sampling_metadata.no_penalties:
        reasons.append("penalties")
    if sampling_metadata.allowed_token_ids_mask is not None:
        reasons.append("allowed token ids")
    if sampling_metadata.bad_words_token_ids:
        reasons.append("bad words")
    if any(getattr(p, "min_toks", True) for p in sampling_metadata.logitsprocs.non_argmax_invariant):
        reasons.append("min_tokens")
    holder = sampling_metadata.thinking_budget_state_holder
    if holder is not None and holder.has_tracked_requests():
        reasons.append("thinking budget")
    return reasons


def verify_temperature(sampling_metadata, num_requests: int, device) -> torch.Tensor:
    """vLLM's per-request temperature with 0 for greedy rows (vLLM stores greedy as 0.0,
    gpu_input_batch.py:398); all-greedy batches carry no temperature tensor."""
    if sampling_metadata.all_greedy or sampling_metadata.temperature is None:
        return torch.zeros(num_requests, dtype=torch.float32, device=device)
    return sampling_metadata.temperature.to(torch.float32)


def cu_num_draft_with_leading_zero(metadata) -> torch.Tensor:
    """verify's `cu_num_draft` [B + 1]: vLLM's inclusive cumulative draft count, after a 0."""
    cu = metadata.cu_num_draft_tokens
    return torch.cat([cu.new_zeros(1), cu]).to(torch.int32)


def request_seeds(sampling_metadata, num_requests: int, device) -> torch.Tensor:
    """One fresh 62-bit key per request and call. A request with its own torch.Generator
    (SamplingParams.seed) draws it from that generator, so its tokens do not depend on its
    batch slot or neighbours; the others draw from the global RNG, as vLLM's sampler does."""
    if sampling_metadata.all_greedy:
        return torch.zeros(num_requests, dtype=torch.int64, device=device)
    seeds = torch.randint(0, _SEED_BOUND, (num_requests,), dtype=torch.int64, device=device)
    for index, generator in sampling_metadata.generators.items():
        seeds[index] = torch.randint(0, _SEED_BOUND, (1,), dtype=torch.int64, device=generator.device,
                                     generator=generator).to(device)[0]
    return seeds


def draft_probs_as_logits(draft_probs: torch.Tensor, row_temperature: torch.Tensor, dtype) -> torch.Tensor:
    """Logits whose softmax(. / T) is the draft distribution: T * log(q) (T = 1 on greedy rows,
    whose drafts verify checks against the argmax only). log(0) = -inf carries no mass."""
    log_q = draft_probs.to(torch.float32).log()
    on_cpu = row_temperature.device.type == "cpu"  # elsewhere, skipping the scale would cost a sync
    if not on_cpu or bool((row_temperature != 1).any()):
        log_q.mul_(torch.where(row_temperature > 0, row_temperature, torch.ones_like(row_temperature))[:, None])
    return log_q.to(dtype)


def rows_per_request(metadata, device) -> torch.Tensor:
    """Each request's row count in the logits: its drafts plus the bonus row (host list, no sync)."""
    return torch.tensor([n + 1 for n in metadata.num_draft_tokens], dtype=torch.long).to(device)


def vllm_processed_rows(sampler, metadata, logits: torch.Tensor, sampling_metadata) -> torch.Tensor:
    """[D + B, V] float32, a new tensor: every row processed the way stock vLLM processes it,
    before temperature. Draft rows: RejectionSampler.apply_logits_processors (penalties with the
    drafts as output, allowed ids, bad words, min_tokens, thinking budget;
    rejection_sampler.py:304). Bonus rows: Sampler.apply_logits_processors with
    predict_bonus_token=True (sampler.py:372)."""
    rows = torch.empty(logits.shape, dtype=torch.float32, device=logits.device)
    target_rows = logits[metadata.target_logits_indices].to(torch.float32)
    rows[metadata.target_logits_indices] = sampler.apply_logits_processors(target_rows, sampling_metadata, metadata)
    bonus_rows = logits[metadata.bonus_logits_indices].to(torch.float32)
    rows[metadata.bonus_logits_indices] = sampler.sampler.apply_logits_processors(
        bonus_rows, sampling_metadata, predict_bonus_token=True)
    return rows


def mask_top_k_top_p(rows: torch.Tensor, metadata, temperature: torch.Tensor, sampling_metadata) -> None:
    """vLLM's top-k / top-p (applied after temperature, rejection_sampler.py:536 and sampler.py:
    296) as -inf in place: the same kept set for every row, the bonus rows included."""
    from dspark_ext.integrations.vllm.top_k_top_p import keep_thresholds

    counts = rows_per_request(metadata, rows.device)
    num_rows = rows.shape[0]

    def per_row(values: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        return None if values is None else torch.repeat_interleave(values, counts, output_size=num_rows)

    threshold = keep_thresholds(rows, per_row(temperature), per_row(sampling_metadata.top_k),
                                per_row(sampling_metadata.top_p))
    rows.masked_fill_(rows < threshold[:, None], float("-inf"))


def logprobs_tensors(sampler, metadata, logits, output_token_ids, sampling_metadata):
    """What stock vLLM returns for raw logprobs modes (rejection_sampler.py:200): logprobs of the
    raw logits at every emitted position."""
    if sampling_metadata.max_num_logprobs is None:
        return None
    target = logits[metadata.target_logits_indices].to(torch.float32)
    bonus = logits[metadata.bonus_logits_indices].to(torch.float32)
    return sampler._get_logprobs_tensors(sampling_metadata.max_num_logprobs, metadata, logits, target, bonus,
                                         output_token_ids)


_logged_reasons = set()


def _log_path_once(path: Path, reason: str) -> None:
    if (path, reason) not in _logged_reasons:
        _logged_reasons.add((path, reason))
        logger.info("dspark-ext (pid %d): vLLM rejection sampling takes the %s path (%s)", os.getpid(), path.value,
                    reason)


def dspark_forward(sampler, original_forward: Callable, metadata, draft_probs, logits, sampling_metadata):
    """RejectionSampler.forward through torch.ops.dspark.verify (see the module docstring)."""
    from vllm.v1.outputs import SamplerOutput

    path, reason = choose_path(sampler, metadata, draft_probs, logits, sampling_metadata)
    _log_path_once(path, reason)
    if path is Path.FALLBACK:
        return original_forward(sampler, metadata, draft_probs, logits, sampling_metadata)

    num_requests = len(metadata.num_draft_tokens)
    device = logits.device
    temperature = verify_temperature(sampling_metadata, num_requests, device)
    if path is Path.PROCESSED and vllm_processing_reasons(sampling_metadata):
        rows = vllm_processed_rows(sampler, metadata, logits, sampling_metadata)
    elif draft_probs is None or logits.dtype == torch.float32:
        rows = logits
    else:  # q must be exactly the draft's law: bf16/fp16 logits are read as float32 beside float32 q
        rows = logits.to(torch.float32)
    if path is Path.PROCESSED and (sampling_metadata.top_k is not None or sampling_metadata.top_p is not None):
        if rows is logits and sampling_metadata.max_num_logprobs is not None:
            rows = logits.clone()  # the logprobs are those of the raw logits
        mask_top_k_top_p(rows, metadata, temperature, sampling_metadata)
    draft_logits = None
    if draft_probs is not None:
        draft_temperature = torch.repeat_interleave(
            temperature, torch.tensor(metadata.num_draft_tokens, dtype=torch.long).to(device),
            output_size=draft_probs.shape[0])
        draft_logits = draft_probs_as_logits(draft_probs, draft_temperature, rows.dtype)
    output, _ = torch.ops.dspark.verify(
        rows, metadata.draft_token_ids, draft_logits, cu_num_draft_with_leading_zero(metadata), temperature,
        request_seeds(sampling_metadata, num_requests, device),
        torch.zeros(num_requests, dtype=torch.int64, device=device), metadata.max_spec_len)
    output_token_ids = output.to(torch.int32)  # vLLM's placeholder is -1, as verify's padding
    return SamplerOutput(
        sampled_token_ids=output_token_ids,
        logprobs_tensors=logprobs_tensors(sampler, metadata, logits, output_token_ids, sampling_metadata),
    )


def install() -> list:
    """Replaces RejectionSampler.forward (keeping the original for the fallback path)."""
    from vllm.v1.sample.rejection_sampler import RejectionSampler

    current = RejectionSampler.forward
    if getattr(current, "__dspark_original__", None) is not None:
        return []

    def forward(self, metadata, draft_probs, logits, sampling_metadata):
        return dspark_forward(self, current, metadata, draft_probs, logits, sampling_metadata)

    forward.__dspark_original__ = current
    forward.__doc__ = dspark_forward.__doc__
    RejectionSampler.forward = forward
    return ["vllm.v1.sample.rejection_sampler.RejectionSampler.forward -> torch.ops.dspark.verify"]
