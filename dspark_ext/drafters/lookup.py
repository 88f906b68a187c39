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

With a ``TokenDatastore`` (``datastore.py``: text the target wrote for other prompts), a request
whose own text has no earlier copy of its last two tokens drafts the store's continuation of its
longest suffix the store holds instead, where that suffix is longer than its own match (a store
of 1-token keys thus drafts for every request with no match of its own), with confidences
calibrated for store matches (by their length and the same record). Still a function of the
sequence so far.

Everything is batched over requests with tensor ops (``unfold`` + ``eq``); the search costs
O(B L n) per n-gram size.
"""

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, List, Optional, Sequence, Tuple

import torch

from dspark_ext.protocols import Draft, DraftContext, DraftPlan

if TYPE_CHECKING:
    from dspark_ext.drafters.datastore import TokenDatastore

#: Record categories: leading tokens of the previous proposal that the sequence continued with
#: (0, 1, 2 or more), and NO_RECORD when the previous call had no match (or there was none).
NO_RECORD = 3
NUM_RECORDS = 4
#: Pseudo-observations of the calibration table against a request's own agreement counts.
ADAPT_WEIGHT = 8.0
#: Where a proposal comes from: the request's own text, or the datastore.
PROMPT, STORE = 0, 1
#: A datastore is asked when the request's own text matches fewer than this many tokens.
STORE_BELOW_PROMPT_MATCH = 2


class NgramDrafter:
    """Prompt lookup; ``calibration`` (a ``LookupCalibration``) turns its 0/1 confidences into
    calibrated conditional acceptances and gives the loop a forecast (``plans``)."""

    cost_name = "lookup"

    def __init__(self, num_draft: int = 4, max_ngram: int = 3, min_ngram: int = 2,
                 calibration: Optional["LookupCalibration"] = None, datastore: Optional["TokenDatastore"] = None):
        if num_draft < 0 or min_ngram < 1 or max_ngram < min_ngram:
            raise ValueError(f"need num_draft >= 0 and 1 <= min_ngram <= max_ngram, got "
                             f"{num_draft}, {min_ngram}, {max_ngram}")
        if calibration is not None and calibration.max_ngram < max_ngram:
            raise ValueError(f"the calibration covers matches up to {calibration.max_ngram} tokens, "
                             f"the drafter looks for {max_ngram}")
        if datastore is not None and calibration is not None:
            if calibration.store_table is None:
                raise ValueError("the calibration has no table for datastore matches: fit it with the datastore "
                                 "(dspark calibrate-lookup --datastore)")
            if calibration.store_max_ngram < datastore.max_ngram:
                raise ValueError(f"the calibration covers datastore matches up to {calibration.store_max_ngram} "
                                 f"tokens, the datastore holds {datastore.max_ngram}")
            if datastore.min_ngram < calibration.store_min_ngram:
                raise ValueError(f"the calibration was fitted with datastore matches from "
                                 f"{calibration.store_min_ngram} tokens on, the datastore matches "
                                 f"{datastore.min_ngram}: refit it with this datastore (dspark calibrate-lookup --datastore)")
        self.num_draft = int(num_draft)
        self.max_ngram = int(max_ngram)
        self.min_ngram = int(min_ngram)
        self.calibration = calibration
        self.datastore = datastore
        self.last_record = torch.zeros(0, dtype=torch.int64)  # of the last call, per request
        self.last_source = torch.zeros(0, dtype=torch.int64)  # PROMPT or STORE, per request
        self.proposals = [0, 0]  # requests proposed for with a match, per source (PROMPT, STORE)
        self._cached: Optional[Tuple[int, tuple]] = None  # (id of the context, proposal) between plans and propose
        self._requests: list = []  # one _RequestLookup per row

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

    def _lookup(self, context: DraftContext):
        """(draft ids [B, K], match length [B], confidence [B, K]) for this context, computed once
        per context (``plans`` then ``propose`` reuse it). Per request in plain Python: a few
        list and dict operations per new token, where tensor ops would cost more in dispatch
        than in work at the batch sizes a round has."""
        if self._cached is not None and self._cached[0] is context:
            return self._cached[1]
        tokens, lengths = context.tokens, context.lengths.to(torch.int64)
        B, K = tokens.shape[0], self.num_draft
        device = tokens.device
        if len(self._requests) != B:
            self._requests = [_RequestLookup(self.max_ngram, K) for _ in range(B)]
        lengths_list = lengths.tolist()
        rows = tokens[:, :max(lengths_list, default=0)].tolist()
        greedy = (context.temperature == 0).tolist()
        tables = None
        if self.calibration is not None:
            tables = {PROMPT: (self.calibration.table_list(), self.max_ngram)}
            if self.datastore is not None:
                tables[STORE] = (self.calibration.store_table_list(), self.calibration.store_max_ngram)
        drafts, matches, confidences, records, sources = [], [], [], [], []
        for b, request in enumerate(self._requests):
            sequence = rows[b][:lengths_list[b]]
            record = request.observe(sequence)
            request.extend(sequence)
            period, n = request.match(self.min_ngram)
            draft = [sequence[len(sequence) - period + j % period] for j in range(K)]
            source, usable = PROMPT, K
            if self.datastore is not None and n < STORE_BELOW_PROMPT_MATCH and K > 0:
                following, stored = self.datastore.continuation(sequence, K)
                if stored > n:  # a store match must be longer than the request's own
                    # Past the store's continuation (a sequence end), the drafts are filler.
                    source, n, usable = STORE, stored, len(following)
                    draft = following + [following[-1]] * (K - len(following))
            if n == 0:
                confidence = [0.0] * K  # the filler: the loop sends no such drafts
            elif tables is None:
                confidence = [1.0] * usable + [0.0] * (K - usable)
            else:
                table, longest = tables[source]
                prior = table[int(greedy[b])][min(n, longest)][record]
                agreed, reached = request.agreed[source], request.reached[source]
                # The table, updated with the request's own agreement counts (a Beta posterior
                # with ADAPT_WEIGHT pseudo-observations at the table's value): text that
                # repeats itself more or less than the held-out data moves it.
                confidence = [(ADAPT_WEIGHT * prior[min(k, len(prior) - 1)] + agreed[k])
                              / (ADAPT_WEIGHT + reached[k]) if k < usable else 0.0 for k in range(K)]
            request.propose(draft, len(sequence), n > 0, source, usable)
            drafts.append(draft)
            matches.append(n)
            confidences.append(confidence)
            records.append(record)
            sources.append(source)
        result = (torch.tensor(drafts, dtype=torch.int64, device=device).view(B, K),
                  torch.tensor(matches, dtype=torch.int64, device=device),
                  torch.tensor(confidences, dtype=torch.float32, device=device).view(B, K))
        self.last_record = torch.tensor(records, dtype=torch.int64)
        self.last_source = torch.tensor(sources, dtype=torch.int64)
        self._cached = (context, result)
        return result

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
        stored = int(((self.last_source == STORE) & (match_length.cpu() > 0)).sum())
        self.proposals[STORE] += stored
        self.proposals[PROMPT] += int((match_length > 0).sum()) - stored
        return Draft(token_ids=draft, confidence=confidence)


class _RequestLookup:
    """One request's lookup state: its sequence so far; its n-grams (n = 1..max_ngram), each
    mapped to the end position of its most recent occurrence that a later token follows (the
    suffix of n tokens then finds its latest earlier copy in one dict lookup, as
    ``NgramDrafter.periods`` defines it); its last proposal, and how often the text agreed with
    its proposals at each draft position."""

    def __init__(self, max_ngram: int, num_draft: int):
        self.max_ngram, self.num_draft = max_ngram, num_draft
        self.reset()

    def reset(self) -> None:
        self.tokens: List[int] = []
        self.last_end: List[dict] = [{} for _ in range(self.max_ngram)]
        self.last_ids: List[int] = []
        self.last_length, self.last_matched, self.last_source, self.last_usable = 0, False, PROMPT, 0
        # Per source (PROMPT, STORE): proposals whose earlier drafts the text followed, and
        # those it followed at this position too.
        self.reached = [[0] * self.num_draft for _ in (PROMPT, STORE)]
        self.agreed = [[0] * self.num_draft for _ in (PROMPT, STORE)]

    def observe(self, sequence: List[int]) -> int:
        """Starts over when ``sequence`` does not extend the one seen last (a new request in the
        row); else counts how the text went on after the last proposal and returns the record
        (see the module docstring). At any temperature, the chance that the text continues with
        a deterministic draft is the chance that verify accepts it (p(x) both ways), so leading
        agreement counts acceptance whether or not the drafts were verified."""
        known = len(self.tokens)
        if known == 0 or len(sequence) < known or sequence[:known] != self.tokens:
            self.reset()
            return NO_RECORD
        emitted = len(sequence) - self.last_length
        if not self.last_matched or emitted <= 0:
            return NO_RECORD
        leading = 0
        while (leading < min(emitted, self.num_draft, self.last_usable)
               and sequence[self.last_length + leading] == self.last_ids[leading]):
            leading += 1
        reached, agreed = self.reached[self.last_source], self.agreed[self.last_source]
        for k in range(min(leading + 1, emitted, self.num_draft, self.last_usable)):
            reached[k] += 1
        for k in range(leading):
            agreed[k] += 1
        return min(leading, 2)

    def extend(self, sequence: List[int]) -> None:
        """Takes the new tokens of ``sequence``; indexes the n-grams ending at every position
        that now has a successor."""
        tokens = self.tokens
        first = len(tokens) - 1  # the old last position gains its successor
        tokens.extend(sequence[len(tokens):])
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

    def propose(self, draft: List[int], length: int, matched: bool, source: int = PROMPT,
                usable: Optional[int] = None) -> None:
        """Notes a proposal: its drafts, where it starts, whether anything matched, its source and
        how many of its drafts are real (a datastore continuation may end early)."""
        self.last_ids, self.last_length, self.last_matched, self.last_source = draft, length, matched, source
        self.last_usable = len(draft) if usable is None else usable


@dataclass
class LookupCalibration:
    """Conditional acceptance of prompt-lookup drafts: ``table[greedy, n, record, k]`` = P(draft k
    accepted | drafts 0..k-1 accepted), for greedy (index 1) or sampled (index 0) requests, match
    length n (0 = no match: always 0) and record (see the module docstring). Fitted on held-out
    generations by ``fit`` (``dspark calibrate-lookup``), never on the evaluation sets."""

    table: torch.Tensor  # [2, max_ngram + 1, NUM_RECORDS, K] float32
    notes: dict
    # The same for datastore matches (n = their length), fitted where a datastore drafted.
    store_table: Optional[torch.Tensor] = None

    @property
    def max_ngram(self) -> int:
        return self.table.shape[1] - 1

    @property
    def store_max_ngram(self) -> int:
        return -1 if self.store_table is None else self.store_table.shape[1] - 1

    @property
    def store_min_ngram(self) -> int:
        """The shortest datastore match the fit saw (its datastore's ``min_ngram``; 2 for a fit that
        did not record it, the first datastore's)."""
        return int(self.notes.get("datastore", {}).get("min_ngram", 2))

    def table_list(self) -> list:
        """The table as nested lists (float32 values), built once."""
        if getattr(self, "_table_list", None) is None:
            self._table_list = self.table.tolist()
        return self._table_list

    def store_table_list(self) -> list:
        """``store_table`` as nested lists, built once."""
        if getattr(self, "_store_table_list", None) is None:
            self._store_table_list = self.store_table.tolist()
        return self._store_table_list

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
            notes: Optional[dict] = None, source: Optional[torch.Tensor] = None,
            store_max_ngram: Optional[int] = None) -> "LookupCalibration":
        """From one row per (request, round): whether it was greedy, its match length and record,
        how many drafts were verified and how many accepted. Each cell is its count ratio,
        shrunk toward the same (greedy, n, k) pooled over records with ``prior_weight``
        pseudo-samples (sparse records borrow strength); no match always gives 0. With
        ``source`` (PROMPT or STORE per row) and ``store_max_ngram``, the datastore's rows fit
        ``store_table`` the same way."""
        if (source is None) != (store_max_ngram is None):
            raise ValueError("LookupCalibration.fit: give source and store_max_ngram together (or neither)")
        if store_max_ngram is None:
            table, info = cls._fit_table(greedy, match_length, record, verified, accepted, max_ngram, num_draft,
                                         prior_weight)
            return cls(table=table, notes={**(notes or {}), **info})
        columns = (greedy, match_length, record, verified, accepted)

        def fitted(rows: torch.Tensor, longest: int):
            return cls._fit_table(*(column[rows] for column in columns), longest, num_draft, prior_weight)

        table, info = fitted(source == PROMPT, max_ngram)
        store_table, store_info = fitted(source == STORE, store_max_ngram)
        info.update({"store_" + key: value for key, value in store_info.items()})
        return cls(table=table, notes={**(notes or {}), **info}, store_table=store_table)

    @staticmethod
    def _fit_table(greedy: torch.Tensor, match_length: torch.Tensor, record: torch.Tensor, verified: torch.Tensor,
                   accepted: torch.Tensor, max_ngram: int, num_draft: int, prior_weight: float):
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
        info = {"samples": int(verified.numel()), "reached_per_cell": reached_cells[..., 0].long().tolist()}
        return table.float(), info

    def save(self, path) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        data = {"table": self.table.tolist(), "notes": self.notes}
        if self.store_table is not None:
            data["store_table"] = self.store_table.tolist()
        path.write_text(json.dumps(data, indent=1))

    @classmethod
    def load(cls, path) -> "LookupCalibration":
        data = json.loads(Path(path).read_text())
        store = data.get("store_table")
        return cls(table=torch.tensor(data["table"], dtype=torch.float32), notes=data.get("notes", {}),
                   store_table=None if store is None else torch.tensor(store, dtype=torch.float32))


class _RecordingLookup(NgramDrafter):
    """Prompt lookup that notes (match length, record) of each proposal and reads its outcome,
    how many drafts the next context shows accepted, when it is called again."""

    def __init__(self, num_draft: int, max_ngram: int, min_ngram: int, datastore=None):
        super().__init__(num_draft, max_ngram, min_ngram, datastore=datastore)
        self.rows: list = []
        self._pending = None

    def propose(self, context: DraftContext) -> Draft:
        lengths = context.lengths.to(torch.int64).cpu()
        if self._pending is not None and self._pending["lengths"].shape == lengths.shape:
            p = self._pending
            emitted = lengths - p["lengths"]
            keep = (p["match_length"] > 0) & (emitted > 0) & (p["verified"] > 0)
            accepted = torch.minimum(emitted - 1, p["verified"])
            self.rows.append(torch.stack([p["greedy"], p["match_length"], p["record"], p["verified"], accepted,
                                          p["source"]])[:, keep])
        _, match_length, confidence = self._lookup(context)  # propose reuses it
        draft = super().propose(context)
        record, source = self.last_record.cpu(), self.last_source.cpu()
        # the loop's cap: max_new - generated - 1, read off the offsets by the caller's max_new
        left = (self.max_new.to(lengths.device) - context.offset.cpu() - 1).clamp(0, self.num_draft)
        usable = (confidence.cpu() > 0).sum(1)  # a datastore continuation may end before K
        self._pending = {"lengths": lengths, "match_length": match_length.cpu(), "record": record,
                         "verified": torch.where(match_length.cpu() > 0, torch.minimum(left, usable), 0),
                         "greedy": (context.temperature.cpu() == 0).long(), "source": source}
        return draft


def calibrate_lookup(target, prompts: Sequence[torch.Tensor], *, num_draft: int, max_ngram: int, min_ngram: int,
                     max_new_tokens: int = 128, batch_size: int = 8, temperatures: Sequence[float] = (0.0, 1.0),
                     eos_token_id=None, seed: int = 0, log=print, datastore=None) -> LookupCalibration:
    """Generates with prompt lookup (every matched draft verified; with ``datastore``, its
    continuations where the prompt matches fewer than ``STORE_BELOW_PROMPT_MATCH`` tokens) at
    each temperature and fits a ``LookupCalibration`` on the outcomes. ``prompts`` must be held
    out from any evaluation and from the datastore's text."""
    from dspark_ext.generate import generate

    if datastore is not None:
        datastore.check_vocabulary(target.vocab_size, "the target")
    columns = []
    for temperature in temperatures:
        for start in range(0, len(prompts), batch_size):
            batch = prompts[start:start + batch_size]
            drafter = _RecordingLookup(num_draft, max_ngram, min_ngram, datastore=datastore)
            drafter.max_new = torch.full((len(batch),), max_new_tokens, dtype=torch.int64)
            generate(target, drafter, batch, max_new_tokens, temperature=temperature, seed=seed + start,
                     eos_token_id=eos_token_id)
            columns += drafter.rows
            log(f"lookup calibration: T = {temperature:g}, prompts {start + len(batch)}/{len(prompts)}, "
                f"{sum(c.shape[1] for c in columns)} matched rounds")
    data = torch.cat(columns, dim=1) if columns else torch.zeros(6, 0, dtype=torch.int64)
    greedy, match_length, record, verified, accepted, source = data
    notes = {"num_prompts": len(prompts), "max_new_tokens": max_new_tokens, "temperatures": list(temperatures),
             "min_ngram": min_ngram}
    if datastore is not None:
        notes["datastore"] = dict(datastore.notes, tokens=int(datastore.tokens.numel()), min_ngram=datastore.min_ngram,
                                  max_ngram=datastore.max_ngram)
    return LookupCalibration.fit(greedy, match_length, record, verified, accepted, max_ngram, num_draft, notes=notes,
                                 source=source, store_max_ngram=None if datastore is None else datastore.max_ngram)
