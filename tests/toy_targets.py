"""Toy targets and drafters for tests/test_generate.py.

``TrigramTarget`` implements the ``Target`` protocol with an explicit per-request cache (the
token ids and their count): the logits after token x_t at position t are
``table[x_{t-1}, x_t] + position_bias[t % P]`` (x_{-1} = BOS), so a forward must read the
cached previous token and the cached length: a wrong rewind or a wrong position changes the
output. Everything is batched with tensor ops (tens of thousands of requests per call).
"""

from typing import List, Optional, Sequence

import torch

from dspark_ext.drafters import MarkovDrafter
from dspark_ext.protocols import Draft, DraftContext, TargetOutput


class TrigramTarget:
    def __init__(self, vocab_size: int = 6, *, seed: int = 0, scale: float = 1.0, period: int = 5,
                 hidden_size: int = 4):
        g = torch.Generator().manual_seed(seed)
        self.vocab_size = vocab_size
        self.device = torch.device("cpu")
        self.table = torch.randn(vocab_size + 1, vocab_size, vocab_size, generator=g) * scale  # [prev + BOS, cur, next]
        self.position_bias = torch.randn(period, vocab_size, generator=g) * scale * 0.5
        self.embedding = torch.randn(vocab_size, hidden_size, generator=g)
        self.cache = torch.zeros(0, 0, dtype=torch.int64)
        self.length = torch.zeros(0, dtype=torch.int64)
        self.forward_calls = 0
        self.forward_tokens = 0
        self.segment_log: List[List[int]] = []  # per forward, the segment lengths

    # -- the law, for tests
    def logits_after(self, prev: torch.Tensor, cur: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
        """[..., V] logits of the token after ``cur`` at ``position`` (``prev`` = V for BOS)."""
        return self.table[prev, cur] + self.position_bias[position % self.position_bias.shape[0]]

    # -- the protocol
    def start(self, prompts: Sequence[torch.Tensor]) -> TargetOutput:
        B = len(prompts)
        self.cache = torch.zeros(B, 16, dtype=torch.int64)
        self.length = torch.zeros(B, dtype=torch.int64)
        lengths = torch.tensor([len(p) for p in prompts], dtype=torch.int32)
        cu = torch.zeros(B + 1, dtype=torch.int32)
        cu[1:] = torch.cumsum(lengths, 0)
        return self._append(torch.cat([torch.as_tensor(p, dtype=torch.int64) for p in prompts]), cu, count=False)

    def forward(self, token_ids: torch.Tensor, cu_seqlens: torch.Tensor) -> TargetOutput:
        return self._append(token_ids, cu_seqlens, count=True)

    def rewind(self, lengths: torch.Tensor) -> None:
        lengths = lengths.to(torch.int64).cpu()
        assert lengths.shape == self.length.shape, (lengths.shape, self.length.shape)
        assert bool((lengths <= self.length).all() and (lengths >= 0).all()), "rewind past the cache"
        self.length = lengths.clone()

    def lengths(self) -> torch.Tensor:
        return self.length.clone()

    def _append(self, token_ids: torch.Tensor, cu_seqlens: torch.Tensor, count: bool) -> TargetOutput:
        token_ids = token_ids.cpu()
        cu = cu_seqlens.cpu()
        B = self.length.shape[0]
        assert cu.dtype == torch.int32 and cu.shape == (B + 1,) and int(cu[0]) == 0, cu
        assert int(cu[-1]) == token_ids.shape[0] and token_ids.dtype == torch.int64
        assert bool(((token_ids >= 0) & (token_ids < self.vocab_size)).all())
        seg = torch.diff(cu).long()
        assert bool((seg >= 0).all())
        if count:
            self.forward_calls += 1
            self.forward_tokens += token_ids.shape[0]
            self.segment_log.append(seg.tolist())
        needed = int((self.length + seg).max()) if B else 0
        if needed > self.cache.shape[1]:
            grown = torch.zeros(B, max(needed, 2 * self.cache.shape[1]), dtype=torch.int64)
            grown[:, : self.cache.shape[1]] = self.cache
            self.cache = grown
        request = torch.repeat_interleave(torch.arange(B), seg)  # [T]
        within = torch.arange(token_ids.shape[0]) - cu[:-1].long()[request]
        position = self.length[request] + within
        self.cache[request, position] = token_ids
        previous = torch.where(position > 0, self.cache[request, (position - 1).clamp(min=0)], self.vocab_size)
        self.length += seg
        logits = self.logits_after(previous, token_ids, position)
        return TargetOutput(logits=logits, hidden_states=self.embedding[token_ids])

    def greedy_reference(self, prompt: torch.Tensor, max_new: int, eos: Optional[int] = None) -> torch.Tensor:
        """Plain greedy decoding of one request straight from the law (no cache, no ops)."""
        seq = [int(t) for t in prompt]
        out = []
        while len(out) < max_new:
            prev = seq[-2] if len(seq) >= 2 else self.vocab_size
            logits = self.logits_after(torch.tensor(prev), torch.tensor(seq[-1]), torch.tensor(len(seq) - 1))
            token = int(torch.argmax(logits))
            out.append(token)
            seq.append(token)
            if eos is not None and token == eos:
                break
        return torch.tensor(out, dtype=torch.int64)

    def exact_joint(self, prompt: torch.Tensor, num_tokens: int, temperature: float = 1.0) -> torch.Tensor:
        """Exact law of the first ``num_tokens`` generated tokens (flat [V ** num_tokens], code
        y_1 V^(n-1) + ... + y_n), from the float32 logits, in float64."""
        V = self.vocab_size
        prev, cur = (int(prompt[-2]) if len(prompt) >= 2 else V), int(prompt[-1])
        pos = len(prompt) - 1
        # law[code] over sequences so far, with (prev, cur) per code.
        law = torch.ones(1, dtype=torch.float64)
        prevs, curs = torch.tensor([prev]), torch.tensor([cur])
        for step in range(num_tokens):
            logits = self.logits_after(prevs, curs, torch.tensor(pos + step)).double()  # [C, V]
            p = torch.softmax(logits / temperature, dim=-1)
            law = (law[:, None] * p).reshape(-1)
            prevs = curs.repeat_interleave(V)
            curs = torch.arange(V).repeat(curs.shape[0])
        return law


class MisreportingDrafter(MarkovDrafter):
    """A broken drafter: samples from its Markov logits but reports different ones (token 0
    boosted), so verify's q is not the law the drafts came from: output is no longer the target's."""

    def propose(self, context: DraftContext) -> Draft:
        draft = super().propose(context)
        logits = draft.logits.clone()
        logits[..., 0] += 3.0
        return Draft(token_ids=draft.token_ids, logits=logits, confidence=draft.confidence)

