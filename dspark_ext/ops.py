"""Typed Python wrappers over ``torch.ops.dspark.*`` and their fake (meta) kernels.

The schemas live in csrc/registration.cpp; this module is named there with
``set_python_module`` so the dispatcher imports it whenever a fake kernel is needed
(torch.compile, FakeTensor, opcheck).
"""

from typing import Optional, Tuple

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
