"""Prompt lookup (training-free n-gram drafting), optionally with calibrated confidences.

For each request, the last n tokens of its sequence (n from ``max_ngram`` down to
``min_ngram``) are searched for earlier in the same sequence; the most recent earlier
occurrence, at start i, predicts that the sequence repeats with period d = (L - n) - i, so the
K drafts are ``s[L - d + (j mod d)]`` for j = 0..K-1: the tokens that followed the occurrence,
continued periodically when they run into the end of the sequence. Without any match the
drafts repeat the last token (d = 1). Drafts are deterministic (``logits=None``: verify treats
them as one-hot proposals, which keeps sampling lossless).

Confidence: without a ``LookupCalibration``, 1 where a match was found and 0 for the filler.
With one, each draft's conditional acceptance as measured on held-out generations, by the match
length n and the request's lookup *record*: how many leading tokens of the previous call's
proposal the sequence then really continued with (0, 1, 2+, or none when that call had no
match), updated with the request's own agreement counts so far. All of it is a function of the
sequence so far, so the confidences (and any choice made from them) never depend on the tokens
a round samples.

Everything is batched over requests with tensor ops (``unfold`` + ``eq``); the search costs
O(B L n) per n-gram size.
"""

import json
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import torch

from dspark_ext.protocols import Draft, DraftContext, DraftPlan

#: Record categories: leading tokens of the previous proposal that the sequence continued with
#: (0, 1, 2 or more), and NO_RECORD when the previous call had no match (or there was none).
NO_RECORD = 3
NUM_RECORDS = 4
#: Pseudo-observations of the calibration table against a request's own agreement counts.
ADAPT_WEIGHT = 8.0


class NgramDrafter:
    """Prompt lookup; ``calibration`` (a ``LookupCalibration``) turns its 0/1 confidences into
    calibrated conditional acceptances and gives the loop a forecast (``plans``)."""

    cost_name = "lookup"

    def __init__(self, num_draft: int = 4, max_ngram: int = 3, min_ngram: int = 2,
                 calibration: Optional["LookupCalibration"] = None):
        if num_draft < 0 or min_ngram < 1 or max_ngram < min_ngram:
            raise ValueError(f"need num_draft >= 0 and 1 <= min_ngram <= max_ngram, got "
                             f"{num_draft}, {min_ngram}, {max_ngram}")
        if calibration is not None and calibration.max_ngram < max_ngram:
            raise ValueError(f"the calibration covers matches up to {calibration.max_ngram} tokens, "
                             f"the drafter looks for {max_ngram}")
        self.num_draft = int(num_draft)
        self.max_ngram = int(max_ngram)
        self.min_ngram = int(min_ngram)
        self.calibration = calibration
        # The previous call's proposal per request (for the record), and whether it had a match.
        self._last_ids = torch.zeros(0, 0, dtype=torch.int64)
        self._last_length = torch.zeros(0, dtype=torch.int64)
        self._last_matched = torch.zeros(0, dtype=torch.bool)
        self._reached = torch.zeros(0, 0)  # per request and position: drafts whose predecessors agreed
        self._agreed = torch.zeros(0, 0)  # ... and that agreed themselves
        self.last_record = torch.zeros(0, dtype=torch.int64)
        self._cached: Optional[Tuple[int, tuple]] = None  # (id of the context, proposal) between plans and propose
        self._indexes: list = []  # one _SuffixIndex per request
        self._previous_tokens = torch.zeros(0, 0, dtype=torch.int64)  # the last call's sequences
        self._previous_lengths = torch.zeros(0, dtype=torch.int64)

    def periods(self, tokens: torch.Tensor, lengths: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """([B] int64 period d, [B] int64 match length n) of each request: d = (L - n) - i for the
        longest n-gram suffix with an earlier occurrence (most recent start i); d = 1, n = 0
        without any.

        One pass over the sequence per suffix length: ``ends[b, e]`` stays true while the j + 1
        tokens ending at position e equal the last j + 1 tokens, so the n-gram occurrences are
        found incrementally (d = L - 1 - e whatever n)."""
        B, width = tokens.shape
        device = tokens.device
        period = torch.ones(B, dtype=torch.int64, device=device)
        match_length = torch.zeros(B, dtype=torch.int64, device=device)
        if width < 2:
            return period, match_length
        rows = torch.arange(B, device=device)
        position = torch.arange(width, device=device)[None]
        # An earlier occurrence ends at e <= L - 2, so that at least one token follows it.
        ends = position <= (lengths[:, None] - 2)
        shifted = torch.full_like(tokens, -1)  # token ids are >= 0: -1 never matches
        for j in range(min(self.max_ngram, width - 1)):  # an n-gram and a later copy need n + 1 tokens
            shifted[:, j:] = tokens[:, : width - j]  # shifted[b, e] = tokens[b, e - j] (-1 for e < j)
            if j > 0:
                shifted[:, j - 1] = -1
            suffix_token = tokens[rows, (lengths - 1 - j).clamp(min=0)]
            ends &= shifted == suffix_token[:, None]
            n = j + 1
            if n >= self.min_ngram:
                last = torch.where(ends, position, -1).amax(1)  # the most recent occurrence
                hit = last >= 0
                period = torch.where(hit, lengths - 1 - last, period)
                match_length = torch.where(hit, n, match_length)
        return period, match_length

    def _continuing(self, context: DraftContext) -> torch.Tensor:
        """[B] bool: the request's sequence extends the one of the previous call (its n-gram
        index and agreement counts carry over); False for a new request in the row."""
        tokens, lengths = context.tokens, context.lengths.to(torch.int64)
        previous, previous_lengths = self._previous_tokens, self._previous_lengths
        if previous.shape[0] != tokens.shape[0]:
            return torch.zeros(tokens.shape[0], dtype=torch.bool, device=tokens.device)
        width = min(previous.shape[1], tokens.shape[1])
        known = torch.arange(width, device=tokens.device)[None] < previous_lengths.to(tokens.device)[:, None]
        same = ((tokens[:, :width] == previous[:, :width].to(tokens.device)) | ~known).all(1)
        return same & (lengths >= previous_lengths.to(tokens.device)) & (previous_lengths.to(tokens.device) > 0)

    def _indexed_periods(self, context: DraftContext, continuing: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """``periods`` from per-request n-gram indexes that grow with the sequences (a few dict
        operations per new token instead of a pass over the whole sequence every round)."""
        tokens, lengths = context.tokens, context.lengths.to(torch.int64)
        B = tokens.shape[0]
        if len(self._indexes) != B:
            self._indexes = [_SuffixIndex(self.max_ngram) for _ in range(B)]
        lengths_list, continuing_list = lengths.tolist(), continuing.tolist()
        known = [len(index.tokens) if continuing_list[b] else 0 for b, index in enumerate(self._indexes)]
        start = min(known, default=0)
        new_tokens = tokens[:, start:max(lengths_list, default=0)].tolist()
        periods, matches = [], []
        for b, index in enumerate(self._indexes):
            if known[b] == 0:
                index.reset()
            index.extend(new_tokens[b][known[b] - start:lengths_list[b] - start])
            period, n = index.match(self.min_ngram)
            periods.append(period)
            matches.append(n)
        device = tokens.device
        return (torch.tensor(periods, dtype=torch.int64, device=device),
                torch.tensor(matches, dtype=torch.int64, device=device))

    def _observe(self, context: DraftContext, continuing: torch.Tensor) -> torch.Tensor:
        """Reads how the sequence went on after the previous proposal: returns each request's
        record [B] int64 (see the module docstring) and adds to its agreement counts: at any
        temperature, the chance that the sequence continues with a deterministic draft is the
        chance that verify accepts it (p(x) both ways), so leading agreement counts acceptance
        whether or not the drafts were verified."""
        tokens, lengths = context.tokens, context.lengths.to(torch.int64)
        B, K = tokens.shape[0], self.num_draft
        device = tokens.device
        if self._last_ids.shape != (B, K):
            self._reached = torch.zeros(B, K, device=device)
            self._agreed = torch.zeros(B, K, device=device)
            return torch.full((B,), NO_RECORD, dtype=torch.int64, device=device)
        fresh = ~continuing
        last_ids, last_length = self._last_ids.to(device), self._last_length.to(device)
        k = torch.arange(K, device=device)[None]
        columns = last_length[:, None] + k
        emitted = columns < lengths[:, None]
        followed = tokens.gather(1, columns.clamp(max=tokens.shape[1] - 1)) == last_ids
        leading = (followed & emitted).long().cumprod(1).sum(1)
        observed = ~fresh & self._last_matched.to(device) & (last_length < lengths)
        self._reached = torch.where(fresh[:, None], 0.0, self._reached.to(device))
        self._agreed = torch.where(fresh[:, None], 0.0, self._agreed.to(device))
        self._reached += (observed[:, None] & (k <= leading[:, None]) & emitted).float()
        self._agreed += (observed[:, None] & (k < leading[:, None])).float()
        return torch.where(observed, leading.clamp(max=2), NO_RECORD)

    def _lookup(self, context: DraftContext):
        """(draft ids [B, K], match length [B], confidence [B, K]) for this context, computed once
        per context (``plans`` then ``propose`` reuse it)."""
        if self._cached is not None and self._cached[0] is context:
            return self._cached[1]
        tokens, lengths = context.tokens, context.lengths.to(torch.int64)
        B, K = tokens.shape[0], self.num_draft
        device = tokens.device
        continuing = self._continuing(context)
        d, match_length = self._indexed_periods(context, continuing)
        j = torch.arange(K, device=device)[None]
        cols = lengths[:, None] - d[:, None] + j % d[:, None]
        draft = tokens.gather(1, cols).to(torch.int64)
        self.last_record = self._observe(context, continuing)
        self._previous_tokens, self._previous_lengths = tokens.clone(), lengths.clone()
        if self.calibration is None:
            # 1 where a match was found, 0 for the filler: the loop sends no filler drafts.
            confidence = (match_length > 0)[:, None].float().expand(B, K).contiguous()
        else:
            prior = self.calibration.confidence(match_length, self.last_record, context.temperature, K)
            # The table, updated with the request's own agreement counts (a Beta posterior with
            # ADAPT_WEIGHT pseudo-observations at the table's value): text that repeats itself
            # more or less than the held-out data moves it.
            adapted = (ADAPT_WEIGHT * prior + self._agreed) / (ADAPT_WEIGHT + self._reached)
            confidence = torch.where(match_length[:, None] > 0, adapted, 0.0)
        self._last_ids, self._last_length, self._last_matched = draft.clone(), lengths.clone(), match_length > 0
        self._cached = (context, (draft, match_length, confidence))
        return draft, match_length, confidence

    def plans(self, context: DraftContext) -> Sequence[DraftPlan]:
        """With a calibration: one plan, this round's calibrated survival (a function of the
        sequence so far). Without: none (the loop then always drafts)."""
        if self.calibration is None or self.num_draft == 0:
            return []
        _, _, confidence = self._lookup(context)
        return [DraftPlan("lookup", survival=confidence.cumprod(1), parts=(self.cost_name,))]

    def propose(self, context: DraftContext) -> Draft:
        tokens, lengths = context.tokens, context.lengths.to(torch.int64)
        B, K = tokens.shape[0], self.num_draft
        device = tokens.device
        if K == 0:
            return Draft(token_ids=torch.zeros(B, 0, dtype=torch.int64, device=device))
        draft, match_length, confidence = self._lookup(context)
        self._cached = None
        return Draft(token_ids=draft, confidence=confidence)


class _SuffixIndex:
    """One request's n-grams (n = 1..max_ngram), each mapped to the end position of its most
    recent occurrence that a later token follows: the sequence's suffix of n tokens then finds
    its latest earlier copy in one lookup, as ``NgramDrafter.periods`` defines it."""

    def __init__(self, max_ngram: int):
        self.max_ngram = max_ngram
        self.reset()

    def reset(self) -> None:
        self.tokens: List[int] = []
        self.last_end: List[dict] = [{} for _ in range(self.max_ngram)]

    def extend(self, new_tokens: List[int]) -> None:
        """Appends tokens; indexes the n-grams ending at every position that now has a successor."""
        tokens = self.tokens
        first = len(tokens) - 1  # the old last position gains its successor
        tokens.extend(new_tokens)
        for end in range(max(first, 0), len(tokens) - 1):
            for n in range(1, min(self.max_ngram, end + 1) + 1):
                self.last_end[n - 1][tuple(tokens[end - n + 1:end + 1])] = end

    def match(self, min_ngram: int) -> Tuple[int, int]:
        """(period d, match length n) of the longest suffix with an earlier copy; (1, 0) without."""
        tokens, length = self.tokens, len(self.tokens)
        for n in range(min(self.max_ngram, length - 1), min_ngram - 1, -1):
            end = self.last_end[n - 1].get(tuple(tokens[length - n:]))
            if end is not None:
                return length - 1 - end, n
        return 1, 0


@dataclass
class LookupCalibration:
    """Conditional acceptance of prompt-lookup drafts: ``table[greedy, n, record, k]`` = P(draft k
    accepted | drafts 0..k-1 accepted), for greedy (index 1) or sampled (index 0) requests, match
    length n (0 = no match: always 0) and record (see the module docstring). Fitted on held-out
    generations by ``fit`` (``dspark calibrate-lookup``), never on the evaluation sets."""

    table: torch.Tensor  # [2, max_ngram + 1, NUM_RECORDS, K] float32
    notes: dict

    @property
    def max_ngram(self) -> int:
        return self.table.shape[1] - 1

    def confidence(self, match_length: torch.Tensor, record: torch.Tensor, temperature: torch.Tensor,
                   num_draft: int) -> torch.Tensor:
        """[B, num_draft] float32 (positions past the table's K repeat its last one)."""
        table = self.table.to(match_length.device)
        greedy = (temperature.to(match_length.device) == 0).long()
        rows = table[greedy, match_length.clamp(max=self.max_ngram), record]  # [B, K_table]
        k = torch.arange(num_draft, device=match_length.device).clamp(max=table.shape[-1] - 1)
        return rows[:, k].contiguous()

    @classmethod
    def fit(cls, greedy: torch.Tensor, match_length: torch.Tensor, record: torch.Tensor, verified: torch.Tensor,
            accepted: torch.Tensor, max_ngram: int, num_draft: int, prior_weight: float = 4.0,
            notes: Optional[dict] = None) -> "LookupCalibration":
        """From one row per (request, round): whether it was greedy, its match length and record,
        how many drafts were verified and how many accepted. Each cell is its count ratio,
        shrunk toward the same (greedy, n, k) pooled over records with ``prior_weight``
        pseudo-samples (sparse records borrow strength); no match always gives 0."""
        K = num_draft
        k = torch.arange(K)[None]
        reached = ((k < verified[:, None]) & (k <= accepted[:, None])).double()  # [N, K]
        hit = (k < accepted[:, None]).double()
        cell = (greedy.long() * (max_ngram + 1) + match_length.clamp(max=max_ngram)) * NUM_RECORDS + record
        size = 2 * (max_ngram + 1) * NUM_RECORDS
        reached_cells = torch.zeros(size, K, dtype=torch.float64).index_add_(0, cell, reached)
        hit_cells = torch.zeros(size, K, dtype=torch.float64).index_add_(0, cell, hit)
        reached_cells = reached_cells.view(2, max_ngram + 1, NUM_RECORDS, K)
        hit_cells = hit_cells.view(2, max_ngram + 1, NUM_RECORDS, K)
        pooled = (hit_cells.sum(2, keepdim=True) + 1.0) / (reached_cells.sum(2, keepdim=True) + 2.0)
        weight = reached_cells + prior_weight
        table = torch.where(weight > 0, (hit_cells + prior_weight * pooled) / weight.clamp(min=1e-12), pooled)
        table[:, 0] = 0.0
        info = dict(notes or {})
        info["samples"] = int(verified.numel())
        info["reached_per_cell"] = reached_cells[..., 0].long().tolist()
        return cls(table=table.float(), notes=info)

    def save(self, path) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"table": self.table.tolist(), "notes": self.notes}, indent=1))

    @classmethod
    def load(cls, path) -> "LookupCalibration":
        data = json.loads(Path(path).read_text())
        return cls(table=torch.tensor(data["table"], dtype=torch.float32), notes=data.get("notes", {}))


class _RecordingLookup(NgramDrafter):
    """Prompt lookup that notes (match length, record) of each proposal and reads its outcome,
    how many drafts the next context shows accepted, when it is called again."""

    def __init__(self, num_draft: int, max_ngram: int, min_ngram: int):
        super().__init__(num_draft, max_ngram, min_ngram)
        self.rows: list = []
        self._pending = None

    def propose(self, context: DraftContext) -> Draft:
        lengths = context.lengths.to(torch.int64).cpu()
        if self._pending is not None and self._pending["lengths"].shape == lengths.shape:
            p = self._pending
            emitted = lengths - p["lengths"]
            keep = (p["match_length"] > 0) & (emitted > 0) & (p["verified"] > 0)
            accepted = torch.minimum(emitted - 1, p["verified"])
            self.rows.append(torch.stack([p["greedy"], p["match_length"], p["record"], p["verified"], accepted])[:, keep])
        draft = super().propose(context)
        record = self.last_record.cpu()
        _, match_length = self.periods(context.tokens, context.lengths.to(torch.int64))
        # the loop's cap: max_new - generated - 1, read off the offsets by the caller's max_new
        left = (self.max_new.to(lengths.device) - context.offset.cpu() - 1).clamp(0, self.num_draft)
        self._pending = {"lengths": lengths, "match_length": match_length.cpu(), "record": record,
                         "verified": torch.where(match_length.cpu() > 0, left, 0),
                         "greedy": (context.temperature.cpu() == 0).long()}
        return draft


def calibrate_lookup(target, prompts: Sequence[torch.Tensor], *, num_draft: int, max_ngram: int, min_ngram: int,
                     max_new_tokens: int = 128, batch_size: int = 8, temperatures: Sequence[float] = (0.0, 1.0),
                     eos_token_id=None, seed: int = 0, log=print) -> LookupCalibration:
    """Generates with prompt lookup (every matched draft verified) at each temperature and fits a
    ``LookupCalibration`` on the outcomes. ``prompts`` must be held out from any evaluation."""
    from dspark_ext.generate import generate

    columns = []
    for temperature in temperatures:
        for start in range(0, len(prompts), batch_size):
            batch = prompts[start:start + batch_size]
            drafter = _RecordingLookup(num_draft, max_ngram, min_ngram)
            drafter.max_new = torch.full((len(batch),), max_new_tokens, dtype=torch.int64)
            generate(target, drafter, batch, max_new_tokens, temperature=temperature, seed=seed + start,
                     eos_token_id=eos_token_id)
            columns += drafter.rows
            log(f"lookup calibration: T = {temperature:g}, prompts {start + len(batch)}/{len(prompts)}, "
                f"{sum(c.shape[1] for c in columns)} matched rounds")
    data = torch.cat(columns, dim=1) if columns else torch.zeros(5, 0, dtype=torch.int64)
    greedy, match_length, record, verified, accepted = data
    return LookupCalibration.fit(greedy, match_length, record, verified, accepted, max_ngram, num_draft,
                                 notes={"num_prompts": len(prompts), "max_new_tokens": max_new_tokens,
                                        "temperatures": list(temperatures), "min_ngram": min_ngram})
