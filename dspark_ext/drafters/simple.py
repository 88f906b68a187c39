"""Simple drafters for ``dspark_ext.generate``: plain autoregressive decoding (no drafts) and a
Markov drafter over fixed (or computed) backbone logits, drawing through ``dspark::markov_draft``.
``dspark_ext.drafters.lookup.NgramDrafter`` is the training-free prompt-lookup drafter."""

from typing import Callable, Optional, Union

import torch

from dspark_ext.heads import MarkovHead
from dspark_ext.protocols import Draft, DraftContext


class AutoregressiveDrafter:
    """No drafts: every round the target emits exactly one token (plain decoding, same loop)."""

    num_draft = 0

    def propose(self, context: DraftContext) -> Draft:
        B = context.tokens.shape[0]
        return Draft(token_ids=torch.zeros(B, 0, dtype=torch.int64, device=context.tokens.device))


BaseLogits = Union[torch.Tensor, Callable[[DraftContext], torch.Tensor]]


class MarkovDrafter:
    """DSpark's semi-autoregressive stage without a learned backbone: backbone logits U [K, V]
    (the same for every request) or ``base_logits(context) -> [B, K, V]``, plus a ``MarkovHead``'s
    transition bias, sampled left to right by ``dspark::markov_draft`` from the anchor, with the
    context's temperature, seed and offset. Reports the drafting logits (so verification is
    lossless) and, when ``conf_base`` ([K] or ``callable(context) -> [B, K]``) is given, the
    per-position confidence ``sigmoid((conf_base_k + conf_w_prev . W1[x_{k-1}]) / conf_temperature_k)``
    for the scheduler."""

    def __init__(
        self,
        head: MarkovHead,
        base_logits: BaseLogits,
        num_draft: Optional[int] = None,
        conf_base: Optional[Union[torch.Tensor, Callable[[DraftContext], torch.Tensor]]] = None,
        conf_w_prev: Optional[torch.Tensor] = None,
        conf_temperature: Optional[torch.Tensor] = None,
    ):
        if isinstance(base_logits, torch.Tensor):
            if base_logits.dim() != 2 or base_logits.shape[1] != head.vocab_size:
                raise ValueError(f"base_logits must be [K, V = {head.vocab_size}], got {list(base_logits.shape)}")
            num_draft = base_logits.shape[0] if num_draft is None else num_draft
            if num_draft != base_logits.shape[0]:
                raise ValueError(f"num_draft {num_draft} != base_logits' K {base_logits.shape[0]}")
        elif num_draft is None:
            raise ValueError("num_draft is needed when base_logits is a callable")
        if conf_base is None and (conf_w_prev is not None or conf_temperature is not None):
            raise ValueError("conf_w_prev / conf_temperature need conf_base")
        self.head = head
        self.base_logits = base_logits
        self.num_draft = int(num_draft)
        self.conf_base = conf_base
        self.conf_w_prev = conf_w_prev
        self.conf_temperature = conf_temperature

    @classmethod
    def random(cls, vocab_size: int, num_draft: int, *, rank: int = 4, scale: float = 1.0, seed: int = 0,
               confidence: bool = False, device="cpu") -> "MarkovDrafter":
        """Random base logits (N(0, scale^2)) and Markov weights; with ``confidence``, random
        confidence parameters too (for the scheduler)."""
        g = torch.Generator().manual_seed(seed)
        head = MarkovHead(vocab_size, rank)
        with torch.no_grad():
            head.w1.weight.copy_(torch.randn(vocab_size, rank, generator=g))
            head.w2.weight.copy_(torch.randn(vocab_size, rank, generator=g) * scale / rank**0.5)
        head.to(device)
        base = (torch.randn(num_draft, vocab_size, generator=g) * scale).to(device)
        kwargs = {}
        if confidence:
            kwargs = dict(conf_base=(torch.randn(num_draft, generator=g) + 1.0).to(device),
                          conf_w_prev=(torch.randn(rank, generator=g) * 0.5).to(device))
        return cls(head, base, **kwargs)

    def propose(self, context: DraftContext) -> Draft:
        B = context.tokens.shape[0]
        device = context.tokens.device
        if isinstance(self.base_logits, torch.Tensor):
            base = self.base_logits.to(device)[None].expand(B, -1, -1)
        else:
            base = self.base_logits(context)
        anchors = context.tokens[torch.arange(B, device=device), context.lengths - 1]
        conf_args = (None, None, None)
        if self.conf_base is not None:
            conf_base = self.conf_base(context) if callable(self.conf_base) else self.conf_base
            conf_base = conf_base.to(device=device, dtype=torch.float32)
            if conf_base.dim() == 1:
                conf_base = conf_base[None].expand(B, -1)
            conf_args = (
                conf_base.contiguous(),
                None if self.conf_w_prev is None else self.conf_w_prev.to(device=device, dtype=torch.float32),
                None if self.conf_temperature is None else self.conf_temperature.to(device=device, dtype=torch.float32),
            )
        token_ids, logits, confidence = torch.ops.dspark.markov_draft(
            base.contiguous(), anchors, self.head.w1.weight.detach(), self.head.w2.weight.detach(),
            context.temperature, context.seed, context.offset, *conf_args)
        return Draft(token_ids=token_ids, logits=logits, confidence=confidence if self.conf_base is not None else None)

    def propose_block(self, context: DraftContext, block: int) -> Draft:
        """The first ``block`` drafts of ``propose``: sampled left to right, they do not depend
        on the later ones."""
        if not 1 <= block <= self.num_draft:
            raise ValueError(f"block must be in [1, {self.num_draft}], got {block}")
        draft = self.propose(context)
        return Draft(token_ids=draft.token_ids[:, :block], logits=draft.logits[:, :block],
                     confidence=None if draft.confidence is None else draft.confidence[:, :block],
                     logit_ids=draft.logit_ids, point_mass=draft.point_mass)
