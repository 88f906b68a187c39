"""vLLM V2's `rejection_sample` routed through `torch.ops.dspark.verify`.

V2's `RejectionSampler._verify` (vllm/v1/worker/gpu/spec_decode/rejection_sampler.py:258-286)
calls `rejection_sample(processed_logits, draft_logits, verify_draft_sampled, cu_num_logits,
pos, idx_mapping, expanded_idx_mapping, expanded_local_pos, temperature, seeds,
num_speculative_steps, synthetic_conditional_rates, use_fp64=..., use_block_verification=...,
**watermarking)` (defined at rejection_sampler_utils.py:1015). What that function computes, and
how each argument maps onto verify (line numbers are vLLM 0.32's):

- `target_logits` [num_logits, V] are *processed*: `Sampler.apply_sampling_params` already divided
  them by the temperature (sampler.py:262-265) and masked top-k / top-p; the kernels use
  `p = softmax(target_logits)` without any further temperature (rejection_sampler_utils.py:148-162)
  and the argmax for greedy rows (temp == 0, :242-260, :573-597). So verify runs at T = 1 on
  sampled rows and T = 0 on greedy rows, reading the rows in place.
- Rows of request b are `cu_num_logits[b]:cu_num_logits[b+1]` (its drafts, then one bonus row):
  `num_draft_tokens = end - start - 1` (:545-549). `cu_num_logits` starts at 0 (model_runner.py:
  1404-1407; per chunk `cu[start:end+1] - lo`, rejection_sampler.py:336-337), so verify's
  `cu_num_draft[b] = cu_num_logits[b] - b`, and verify's row layout (request b's rows start at
  `cu_num_draft[b] + b`) is exactly vLLM's.
- `draft_sampled` holds the *input* token of each logits row; the draft checked against row r is
  `draft_sampled[r + 1]` (:560). -1 marks a placeholder that must be rejected (:562-569); the
  token emitted there is drawn from the target row itself (:835-838). verify (CUDA) rejects an
  out-of-range id and, for one-hot drafts, draws from p (an out-of-range id lies in no tile); with
  draft logits the placeholder's q row is set to -inf, which verify reads as q = 0 (the
  correction is drawn from p): the same law. (verify on CPU refuses ids outside [0, V).)
- `draft_logits` [max_num_reqs, num_speculative_steps, V'] are the draft's *pre-temperature*
  logits, indexed by (request state, draft step) and divided by the request's temperature on
  load (:164-175, :282-292, gumbel.py:236-256). verify wants one [D, V] row per draft, so the
  rows are gathered and divided by the temperature in float32 here (bitwise vLLM's
  `x.to(float32) / temp`), then read by verify at T = 1. Only the first min(V, V') ids count
  (:1093); the target rows are sliced to that width (a strided view, no copy).
- Randomness: vLLM keys its draws by (seed[request state], position); verify by
  (seed, offset, draft position). seed = vLLM's per-request seed (random unless the request set
  one, sample/states.py:53-58) and offset = the position of the request's first logits row, which
  grows every step: reproducible, independent across steps, no host sync.
- Output: vLLM returns `sampled` [num_reqs, num_speculative_steps + 1] int64 and `num_sampled`
  [num_reqs] int32 = accepted + 1 (:1220-1223, :977-978); entries past `num_sampled` are never
  read (vLLM leaves them uninitialized, verify writes -1).

Precision: a float32 target is exact for any temperature. A bfloat16/float16 target reaches here
only unprocessed, i.e. when no request of the batch needs processing (sampler.py:238-239), which
implies every temperature is 0 or 1 (sample/states.py:67-72), so q = draft_logits / 1 is
representable in that dtype and is passed in it.

Everything else goes to vLLM's original function: synthetic acceptance, block verification,
watermarking, fp64 Gumbel sampling, unexpected shapes or dtypes, a device without a verify
kernel, or arguments this version does not know.
"""

import functools
import inspect
import logging
import os
from typing import Callable, NamedTuple, Optional

import torch

logger = logging.getLogger("vllm.dspark_ext")

_LOGIT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

#: Calls that took verify / the original (diagnostics for bench/vllm_gpu_check.py and tests).
call_counts = {"verify": 0, "original": 0}


class VerifyArguments(NamedTuple):
    """The eight arguments of dspark::verify, in schema order."""

    target_logits: torch.Tensor
    draft_token_ids: torch.Tensor
    draft_logits: Optional[torch.Tensor]
    cu_num_draft: torch.Tensor
    temperature: torch.Tensor
    seed: torch.Tensor
    offset: torch.Tensor
    max_num_draft: int


class DraftLayout(NamedTuple):
    """Where packed draft j (verify's order: request after request) lives in vLLM's tensors."""

    request: torch.Tensor  # [D] int64, its request b
    step: torch.Tensor  # [D] int64, its draft position within the request
    logits_row: torch.Tensor  # [D] int64, the logits row it is checked against: j + b


@functools.lru_cache(maxsize=None)
def op_has_kernel(op_name: str, device_type: str) -> bool:
    """Whether the installed dspark build has a kernel of `dspark::op_name` for this device."""
    key = {"cuda": "CUDA", "cpu": "CPU"}.get(device_type)
    return key is not None and torch._C._dispatch_has_kernel_for_dispatch_key(f"dspark::{op_name}", key)


def fallback_reason(args: dict) -> Optional[str]:
    """Why this call must run vLLM's original rejection_sample, or None if verify reproduces it."""
    if args.get("synthetic_conditional_rates") is not None:
        return "synthetic acceptance rates"
    if args.get("use_block_verification"):
        return "block verification"
    if any(args.get(name) is not None for name in ("contexts", "watermarking", "watermarking_skip_mask",
                                                   "watermark_key")):
        return "watermarking"
    if args.get("use_fp64"):
        return "fp64 Gumbel sampling (use_fp64_gumbel)"
    target, draft = args["target_logits"], args["draft_logits"]
    if target.dim() != 2 or target.stride(-1) != 1 or target.dtype not in _LOGIT_DTYPES:
        return f"target logits {tuple(target.shape)} {target.dtype}"
    if draft is not None:
        if draft.dim() != 3 or draft.dtype not in _LOGIT_DTYPES:
            return f"draft logits {tuple(draft.shape)} {draft.dtype}"
        if target.dtype != torch.float32 and draft.dtype != target.dtype:
            return f"{target.dtype} target with {draft.dtype} draft logits"
    num_requests = args["cu_num_logits"].shape[0] - 1
    if num_requests < 1 or target.shape[0] < num_requests:
        return f"{num_requests} requests over {target.shape[0]} logits rows"
    if not op_has_kernel("verify", target.device.type):
        return f"no dspark verify kernel for {target.device.type}"
    return None


def cu_num_draft_from_cu_num_logits(cu_num_logits: torch.Tensor) -> torch.Tensor:
    """verify's `cu_num_draft` [B + 1] int32: vLLM's cumulative logits rows (leading 0 included)
    minus one bonus row per request."""
    num_requests = cu_num_logits.shape[0] - 1
    bonus_rows = torch.arange(num_requests + 1, dtype=torch.int32, device=cu_num_logits.device)
    return cu_num_logits.to(torch.int32) - bonus_rows


def draft_layout(cu_num_draft: torch.Tensor, num_drafts: int) -> DraftLayout:
    """Request, step and logits row of every packed draft, on the device (no host sync)."""
    num_requests = cu_num_draft.shape[0] - 1
    packed = torch.arange(num_drafts, dtype=torch.int32, device=cu_num_draft.device)
    request = torch.searchsorted(cu_num_draft[1:].contiguous(), packed, right=True)
    request.clamp_(max=num_requests - 1)  # only reachable if vLLM's cu ended before D
    step = (packed - cu_num_draft[request]).to(torch.int64)
    return DraftLayout(request, step, packed.to(torch.int64) + request)


def draft_token_ids_for_verify(verify_draft_sampled: torch.Tensor, layout: DraftLayout) -> torch.Tensor:
    """The draft checked against logits row r is the input token of row r + 1; -1 stays -1
    (verify rejects it)."""
    last_row = verify_draft_sampled.shape[0] - 1
    return verify_draft_sampled[(layout.logits_row + 1).clamp_(max=last_row)]


def verify_temperature(request_temperature: torch.Tensor) -> torch.Tensor:
    """T for verify on processed rows: 0 keeps greedy rows greedy, 1 leaves sampled rows as they are."""
    return (request_temperature != 0).to(torch.float32)


def draft_logits_for_verify(draft_logits: torch.Tensor, request_state: torch.Tensor, layout: DraftLayout,
                            request_temperature: torch.Tensor, draft_token_ids: torch.Tensor, vocab_size: int,
                            dtype: torch.dtype) -> torch.Tensor:
    """[D, vocab_size] logits whose softmax is vLLM's q: the cached pre-temperature row of each
    draft divided by its request's temperature (1 for greedy rows, which verify does not read),
    and -inf (q = 0) for placeholder drafts."""
    rows = draft_logits[request_state[layout.request], layout.step, :vocab_size]
    divisor = torch.where(request_temperature == 0, 1.0, request_temperature)[layout.request]
    q_logits = rows / divisor[:, None]  # float32: bf16 rows are upcast exactly, then divided once
    q_logits.masked_fill_((draft_token_ids < 0)[:, None], float("-inf"))
    return q_logits.to(dtype)


def map_rejection_sample_arguments(target_logits, draft_logits, draft_sampled, cu_num_logits, pos, idx_mapping,
                                   temperature, seed, num_speculative_steps) -> VerifyArguments:
    """verify's arguments for one `rejection_sample` call (see the module docstring)."""
    num_requests = cu_num_logits.shape[0] - 1
    num_drafts = target_logits.shape[0] - num_requests
    vocab_size = target_logits.shape[1]
    if draft_logits is not None:
        vocab_size = min(vocab_size, draft_logits.shape[-1])
    rows = target_logits if vocab_size == target_logits.shape[1] else target_logits[:, :vocab_size]
    request_state = idx_mapping.to(torch.int64)
    request_temperature = temperature[request_state].to(torch.float32)
    cu_num_draft = cu_num_draft_from_cu_num_logits(cu_num_logits)
    layout = draft_layout(cu_num_draft, num_drafts)
    draft_token_ids = draft_token_ids_for_verify(draft_sampled, layout)
    q_logits = None
    if draft_logits is not None:
        q_logits = draft_logits_for_verify(draft_logits, request_state, layout, request_temperature,
                                           draft_token_ids, vocab_size, rows.dtype)
    first_row = cu_num_logits[:-1].to(torch.int64)
    return VerifyArguments(
        target_logits=rows,
        draft_token_ids=draft_token_ids,
        draft_logits=q_logits,
        cu_num_draft=cu_num_draft,
        temperature=verify_temperature(request_temperature),
        seed=seed[request_state].to(torch.int64),
        offset=pos[first_row].to(torch.int64),
        max_num_draft=int(num_speculative_steps),
    )


def rejection_sample_with_verify(target_logits, draft_logits, draft_sampled, cu_num_logits, pos, idx_mapping,
                                 temperature, seed, num_speculative_steps):
    """`(sampled [B, num_speculative_steps + 1] int64, num_sampled [B] int32)` as vLLM returns them."""
    args = map_rejection_sample_arguments(target_logits, draft_logits, draft_sampled, cu_num_logits, pos,
                                          idx_mapping, temperature, seed, num_speculative_steps)
    output_token_ids, num_accepted = torch.ops.dspark.verify(*args)
    return output_token_ids, num_accepted + 1


_logged_reasons = set()


def _log_once(message: str, *args) -> None:
    key = (message,) + args
    if key not in _logged_reasons:
        _logged_reasons.add(key)
        logger.info(message, *args)


def make_rejection_sample_replacement(original: Callable) -> Callable:
    """A drop-in for V2's `rejection_sample` that runs verify, or `original` (see fallback_reason)."""
    signature = inspect.signature(original)

    def rejection_sample(*args, **kwargs):
        try:
            bound = signature.bind(*args, **kwargs)
        except TypeError:
            reason = "arguments this vLLM version does not pass"
        else:
            bound.apply_defaults()
            reason = fallback_reason(bound.arguments)
        if reason is not None:
            _log_once("dspark-ext (pid %d): V2 rejection sampling runs vLLM's own kernels (%s)", os.getpid(), reason)
            call_counts["original"] += 1
            return original(*args, **kwargs)
        _log_once("dspark-ext (pid %d): V2 rejection sampling runs torch.ops.dspark.verify", os.getpid())
        call_counts["verify"] += 1
        a = bound.arguments
        return rejection_sample_with_verify(a["target_logits"], a["draft_logits"], a["draft_sampled"],
                                            a["cu_num_logits"], a["pos"], a["idx_mapping"], a["temperature"],
                                            a["seed"], a["num_speculative_steps"])

    rejection_sample.__dspark_original__ = original
    rejection_sample.__doc__ = make_rejection_sample_replacement.__doc__
    return rejection_sample
