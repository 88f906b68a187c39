"""The two interfaces the generation loop (dspark_ext/generate.py) knows: a Target (the unchanged
model being sped up) and a Drafter (what proposes tokens for it to verify). Anything that
implements them plugs into ``dspark_ext.generate``; the loop never sees model-specific code.

Token layout: a round sends each request b a ragged run of new tokens (its anchor, then its
scheduled drafts). They travel packed, request after request, as ``token_ids`` [T] with
``cu_seqlens`` [B + 1] int32 (request b owns ``token_ids[cu_seqlens[b]:cu_seqlens[b + 1]]``,
possibly empty); the logits come back in the same packed order, which is exactly the
``target_logits`` layout of ``torch.ops.dspark.verify``.
"""

from dataclasses import dataclass
from typing import Optional, Protocol, Sequence, Tuple, runtime_checkable

import torch


@dataclass
class TargetOutput:
    """Logits [T, V] (float) for every packed input token: row t predicts the token after
    token_ids[t]. ``hidden_states`` [T, D] (optional): features of the chosen layers at the
    same positions (what a DSpark drafter conditions on), concatenated along the last dim."""

    logits: torch.Tensor
    hidden_states: Optional[torch.Tensor] = None


@runtime_checkable
class Target(Protocol):
    """A causal LM with one KV cache (context) per request.

    ``start(prompts)`` drops every request and starts ``len(prompts)`` new ones, each with its
    prompt (1-D int64 token ids, lengths may differ) as context; it returns the output for the
    prompt tokens, packed like ``forward`` (the loop uses each request's last row).
    ``forward(token_ids, cu_seqlens)`` appends request b's new tokens to its context (at
    positions ``length(b) ..``) and returns their outputs. ``rewind(lengths)`` [B] int64 truncates
    each request's context to ``lengths[b]`` tokens (<= its current length): the rejected drafts'
    KV entries are dropped. ``lengths()`` [B] int64 is each request's current context length."""

    vocab_size: int
    device: torch.device

    def start(self, prompts: Sequence[torch.Tensor]) -> TargetOutput: ...

    def forward(self, token_ids: torch.Tensor, cu_seqlens: torch.Tensor) -> TargetOutput: ...

    def rewind(self, lengths: torch.Tensor) -> None: ...

    def lengths(self) -> torch.Tensor: ...


@dataclass
class Draft:
    """K proposed tokens per request. ``token_ids`` [B, K] int64. ``logits`` [B, K, V] (the
    distribution each draft was drawn from, before temperature, in any float dtype: verify is
    shown them widened to float32; None = deterministic drafts, verified as one-hot proposals). ``confidence`` [B, K] float32 (conditional acceptance, for
    the scheduler; None = verify all K unless the loop caps them).

    Two compact forms spare a drafter writing B x K whole-vocabulary rows that verify mostly never
    reads (at batch 4 and SmolLM2's 49,152 ids, 5.5 MB per round, ~1 ms on a 2-core CPU):
    ``logit_ids`` [N] int64 says the logits' last dim covers only these ids (a draft
    vocabulary; every other id has probability 0), and ``point_mass`` [B] bool marks requests
    whose drafts are deterministic (verified as one-hot proposals; their logits rows are
    ignored). ``verified_logits`` expands only the drafts verify reads."""

    token_ids: torch.Tensor
    logits: Optional[torch.Tensor] = None
    confidence: Optional[torch.Tensor] = None
    logit_ids: Optional[torch.Tensor] = None
    point_mass: Optional[torch.Tensor] = None

    def dense_logits(self, vocab_size: int) -> Optional[torch.Tensor]:
        """Every draft's law over the whole vocabulary, [B, K, vocab_size] (None: deterministic)."""
        mask = torch.ones(self.token_ids.shape, dtype=torch.bool, device=self.token_ids.device)
        rows = self.verified_logits(mask, vocab_size)
        return None if rows is None else rows.view(*self.token_ids.shape, vocab_size)

    def verified_logits(self, mask: torch.Tensor, vocab_size: int) -> Optional[torch.Tensor]:
        """The draft laws of the drafts ``mask`` [B, K] selects, over the whole vocabulary:
        [n, vocab_size] in row-major (request, position) order; None when every draft is
        deterministic."""
        if self.logits is None:
            return None
        rows = self.logits[mask].float()
        if self.logit_ids is not None:
            if rows.shape[-1] != self.logit_ids.numel():
                raise ValueError(f"the draft's logits cover {rows.shape[-1]} ids, its logit_ids {self.logit_ids.numel()}")
            rows = rows.new_full((rows.shape[0], vocab_size), float("-inf")).index_copy_(1, self.logit_ids, rows)
        elif rows.shape[-1] != vocab_size:
            raise ValueError(f"the draft's logits cover {rows.shape[-1]} ids, the target's vocabulary {vocab_size}")
        if self.point_mass is not None:
            # A deterministic draft as a law: log-probability 0 at its token, -inf elsewhere.
            # In place (``rows`` is this call's own copy: boolean indexing copies), one pass.
            deterministic = self.point_mass[:, None].expand_as(mask)[mask][:, None]
            token = self.token_ids[mask].to(torch.int64)[:, None]
            at_token = torch.where(deterministic, 0.0, rows.gather(1, token))
            rows.masked_fill_(deterministic, float("-inf")).scatter_(1, token, at_token)
        return rows


@dataclass
class DraftContext:
    """What a drafter may look at when proposing. ``tokens`` [B, L] int64 holds each request's
    whole sequence so far (prompt + generated, anchor last) in its first ``lengths[b]`` entries;
    ``anchor_hidden`` [B, D] (or None) are the target's hidden states at each anchor's
    predecessor row (the row whose logits produced the anchor); ``temperature`` [B] float32,
    ``seed`` [B] int64 and ``offset`` [B] int64 key the drafter's randomness for this round.

    ``hidden_states`` [B, L, F] (or None, when the target returns no features) are the target's
    features of each token of ``tokens``, valid at positions < ``lengths[b] - 1`` (the anchor has
    not been through the target yet); ``new_from`` [B] int64 is the first position whose features
    the drafter has not been shown in an earlier round of this generation (0 = a new request), so
    a drafter can keep an incremental per-request context cache."""

    tokens: torch.Tensor
    lengths: torch.Tensor
    anchor_hidden: Optional[torch.Tensor]
    temperature: torch.Tensor
    seed: torch.Tensor
    offset: torch.Tensor
    hidden_states: Optional[torch.Tensor] = None
    new_from: Optional[torch.Tensor] = None
    plan: Optional[str] = None  # the name of the DraftPlan the loop chose (drafters with plans)


@dataclass
class DraftPlan:
    """One way a drafter can draft this round, with its forecast, for the loop to price.

    ``survival`` [B, K] float32: the forecast probability that request b's first j + 1 drafts
    are all accepted, computed *before* drafting from what earlier rounds and the sequence so
    far show (never from this round's draft tokens), so that choosing among plans, or not to
    draft at all, keeps the output law exact. ``parts``: the names (``cost_name``) of the pieces
    the plan runs, priced by the cost profile. ``fresh``: False when the forecast only refreshes
    by running the plan (lagged confidences): the loop then probes it now and then."""

    name: str
    survival: Optional[torch.Tensor]
    parts: Tuple[str, ...] = ()
    fresh: bool = True


@runtime_checkable
class Drafter(Protocol):
    """Proposes ``num_draft`` tokens per request each round (0 = plain autoregressive decoding).

    Optional: ``plans(context) -> Sequence[DraftPlan]`` (the ways it can draft this round, for a
    loop that prices drafting; the chosen name arrives as ``context.plan``) and ``cost_name``
    (the name its cost is profiled under)."""

    num_draft: int

    def propose(self, context: DraftContext) -> Draft: ...
