"""Prompt-lookup drafting (training-free n-gram drafter).

For each request, the last n tokens of its sequence (n from ``max_ngram`` down to
``min_ngram``) are searched for earlier in the same sequence; the most recent earlier
occurrence, at start i, predicts that the sequence repeats with period d = (L - n) - i, so the
K drafts are ``s[L - d + (j mod d)]`` for j = 0..K-1: the tokens that followed the occurrence,
continued periodically when they run into the end of the sequence. Without any match the
drafts repeat the last token (d = 1). Drafts are deterministic (``logits=None``: verify treats
them as one-hot proposals, which keeps sampling lossless).

Everything is batched over requests with tensor ops (``unfold`` + ``eq``); the search costs
O(B L n) per n-gram size.
"""

from typing import Tuple

import torch

from dspark_ext.protocols import Draft, DraftContext


class NgramDrafter:
    def __init__(self, num_draft: int = 4, max_ngram: int = 3, min_ngram: int = 2):
        if num_draft < 0 or min_ngram < 1 or max_ngram < min_ngram:
            raise ValueError(f"need num_draft >= 0 and 1 <= min_ngram <= max_ngram, got "
                             f"{num_draft}, {min_ngram}, {max_ngram}")
        self.num_draft = int(num_draft)
        self.max_ngram = int(max_ngram)
        self.min_ngram = int(min_ngram)

    def periods(self, tokens: torch.Tensor, lengths: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """([B] int64 period d, [B] bool found) of each request: d = (L - n) - i for the longest
        n-gram suffix with an earlier occurrence (most recent start i), 1 without any."""
        B, width = tokens.shape
        device = tokens.device
        period = torch.ones(B, dtype=torch.int64, device=device)
        found = torch.zeros(B, dtype=torch.bool, device=device)
        rows = torch.arange(B, device=device)
        for n in range(self.max_ngram, self.min_ngram - 1, -1):
            if width < n + 1:
                continue
            # The suffix s[L - n : L] of every request (clamped indices where L < n + 1: masked below).
            suffix_cols = (lengths[:, None] - n + torch.arange(n, device=device)[None]).clamp(min=0)
            suffix = tokens[rows[:, None], suffix_cols]  # [B, n]
            windows = tokens.unfold(1, n, 1)  # [B, width - n + 1, n]
            match = (windows == suffix[:, None, :]).all(-1)  # [B, W]
            starts = torch.arange(windows.shape[1], device=device)
            # An earlier occurrence: start i <= L - n - 1 (at least one token follows it, and
            # it is not the suffix itself).
            match &= starts[None] <= (lengths[:, None] - n - 1)
            last = torch.where(match, starts[None], -1).amax(1)  # most recent occurrence
            hit = (last >= 0) & ~found
            period = torch.where(hit, lengths - n - last, period)
            found |= hit
        return period, found

    def propose(self, context: DraftContext) -> Draft:
        tokens, lengths = context.tokens, context.lengths.to(torch.int64)
        B, K = tokens.shape[0], self.num_draft
        device = tokens.device
        if K == 0:
            return Draft(token_ids=torch.zeros(B, 0, dtype=torch.int64, device=device))
        d, found = self.periods(tokens, lengths)
        j = torch.arange(K, device=device)[None]
        cols = lengths[:, None] - d[:, None] + j % d[:, None]
        draft = tokens.gather(1, cols)
        # Confidence 1 where a match was found, 0 for the filler: the loop sends no filler drafts.
        confidence = found[:, None].float().expand(B, K).contiguous()
        return Draft(token_ids=draft.to(torch.int64), confidence=confidence)
