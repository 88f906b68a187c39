"""The speculative generation loop: any ``Target`` plus any ``Drafter`` (dspark_ext/protocols.py).

One round, for every unfinished request b (finished requests send nothing):

1. **plan** (with a cost profile): from forecasts that only look at earlier rounds, pick how to
   draft, or not to draft at all, whichever promises the most tokens per second once the
   drafting is paid for (``choose_plan``; in a batch, a request's tokens count by its chance
   of being the last to finish, since the call ends with it: ``draft_worth``);
2. the drafter proposes K tokens (skipped when K = 0 or the plan is not to draft);
3. n_b of them are kept: K capped by the tokens left (``max_new - generated - 1``), or, with a
   draft confidence and a throughput table, what ``dspark::schedule`` chooses under those caps
   (with a cost profile the table counts the drafting cost: tokens / (draft + verify time));
4. the target runs once over the packed ``[anchor_b, drafts_b[:n_b]]``;
5. ``dspark::verify`` accepts a prefix of the drafts and picks one more token (the correction
   or the bonus), so every round emits 1 .. n_b + 1 tokens; the last one is the new anchor;
6. the target's cache is rewound to its length before the round + 1 + accepted drafts (the
   anchor and the accepted drafts stay, the rejected ones go; the new anchor is not in it yet).

Randomness is keyed, never drawn from a global generator: request b uses ``seed[b]`` and, as
``offset``, the number of tokens it has generated so far (distinct in every round, since every
round emits at least one token), for verify and for the drafter alike. The first token comes
from the prompt's last row through the same ``dspark::verify`` (no drafts, offset 0). Hence a
request's tokens depend only on its own prompt, seed, temperature and budget, never on the
rest of the batch, and at temperature > 0 they follow the target's own sampling law exactly:
every choice above (plan, lengths) depends on the drafts or on earlier rounds, never on
anything this round's verification draws.
"""

import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Union

import torch

from dspark_ext.forecast import SurvivalForecast
from dspark_ext.protocols import Draft, DraftContext, DraftPlan, Drafter, Target
from dspark_ext.scheduling import best_throughput, lead_discounts, plain_decoding_throughput

PerRequestInt = Union[int, Sequence[int]]
PerRequestFloat = Union[float, Sequence[float]]

#: A plan whose forecast only refreshes when it runs (``DraftPlan.fresh = False``) is run after
#: this many planned rounds without it (rounds the planning backoff leaves unplanned do not
#: count); every probe that does not win on its own doubles the interval (up to
#: ``MAX_PROBE_INTERVAL``), so a drafter that never pays costs almost nothing.
PROBE_INTERVAL = 32
MAX_PROBE_INTERVAL = 256
#: The throughput a plan must promise in a round of one request, as a multiple of drafting
#: nothing. 1.0 for every plan:
#: - a fresh plan's forecast (prompt lookup's: calibrated acceptance by match length and record,
#:   fitted on held-out generations) is unbiased; at batch 4 a margin of 1.05 left lookup rounds
#:   undrafted that paid on average (six batch-4 cells, two interleaved runs: 1.067x / 1.073x
#:   plain decoding with it, 1.082x / 1.085x without);
#: - a lagged plan's forecast (a drafter's mean survival on this text) prices a lower bound: the
#:   round it runs, ``dspark::schedule`` picks the lengths from that round's own confidences, and
#:   the best lengths for each round beat the best lengths for their mean (MT-Bench, batch 1:
#:   priced at 1.05-1.10x, delivered 1.09-1.17x).
PLAN_MARGIN = 1.0
#: The same in a round of several requests. The call's-end objective (``CALL_END_OBJECTIVE``)
#: prices one round as if each request's worth stayed what it is now, but drafting spreads the
#: requests apart, and a call whose requests drift apart ends with rounds of its last requests
#: alone, which cost nearly a full step each on a CPU. With exact forecasts and exact prices
#: (``bench/simulate_batch_planning.py``: batch 2, 4 and 8, the profiles of two machines), 1.0
#: lost up to 4% to drafting nothing where drafting barely paid; 1.05 never lost more than 0.5%
#: to it and never trailed 1.0. The measurements that had set batch rounds to 1.0 (a margin of
#: 1.05 cost 3% at batch 4, T = 1, and the lookup rounds above) ran under the objective before,
#: tokens per second with only the drafts weighted, which already drafts too little there.
BATCH_PLAN_MARGIN = 1.05
#: Planning backs off where drafting does not pay: after ``QUIET_ROUNDS`` planned rounds in a row
#: drafted nothing, the next round drafts nothing without planning; each time planning then
#: again finds nothing worth drafting, the unplanned stretch doubles (up to ``MAX_UNPLANNED``).
#: A plan that drafts (a probe included) resets it. In a call that never drafts, planning (prompt
#: lookup, forecasts, pricing: ~0.6 ms) and the probes of lagged plans cost 1.0-1.4 ms per round
#: at batch 4, ~3% of a step; the backoff leaves most such rounds unplanned, which also spaces the
#: probes out (they count planned rounds), and delays a lookup match that appears in an
#: unplanned stretch by at most ``MAX_UNPLANNED`` rounds. It reads only earlier rounds' plans,
#: so it cannot bias the output law.
QUIET_ROUNDS = 4
MAX_UNPLANNED = 8
#: In a round of several requests, plans are priced by how fast they bring the call's end closer:
#: every token a request makes, its round's own token included, counts by the request's chance of
#: being the last to finish (``draft_worth``), and drafting nothing makes the sum of those per
#: step. False: tokens per second with only the drafts weighted (before 2026-12-06), which counts
#: a request far ahead as much as the one the call waits for and so priced drafting for a lagging
#: request as a small gain on the whole batch's tokens. Either way its inputs are fixed before
#: the round draws a token.
CALL_END_OBJECTIVE = True


@dataclass
class GenerationResult:
    """What ``generate`` returns.

    ``tokens[b]``: the generated tokens of request b (1-D int64, CPU), prompt excluded, eos
    included when it stopped there. ``num_rounds``: draft/verify rounds (prefill excluded).
    ``target_forwards``: calls of the target (``start`` included). ``request_forwards``: the
    number of (request, target call) pairs in which the request took part (prefill included).
    ``accepted_lengths``: per round, [B] int64 accepted drafts (-1: the request sat the round
    out). ``position_verified[k]`` / ``position_reached[k]`` / ``position_accepted[k]`` [K]:
    drafts verified at draft position k, those whose k predecessors were all accepted (the
    conditional denominator), and those accepted. ``plan_rounds``: rounds per plan ("none":
    nothing drafted); ``unplanned_rounds``: those of the "none" rounds that the planning backoff
    left unplanned (``QUIET_ROUNDS``). Times in seconds (``time.perf_counter``, CUDA synchronised):
    ``time_target`` (prefill and forwards; ``time_prefill`` is the prefill's share),
    ``time_draft`` (the drafter, planning included), ``time_overhead`` (everything else:
    scheduling, verify, packing, bookkeeping, rewinds, callbacks)."""

    tokens: List[torch.Tensor]
    num_rounds: int = 0
    target_forwards: int = 0
    request_forwards: int = 0
    accepted_lengths: List[torch.Tensor] = field(default_factory=list)
    position_verified: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.int64))
    position_reached: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.int64))
    position_accepted: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.int64))
    plan_rounds: Dict[str, int] = field(default_factory=dict)
    unplanned_rounds: int = 0
    time_total: float = 0.0
    time_prefill: float = 0.0
    time_target: float = 0.0
    time_draft: float = 0.0
    time_overhead: float = 0.0

    @property
    def num_generated(self) -> int:
        return sum(int(t.numel()) for t in self.tokens)

    @property
    def mean_accepted_length(self) -> float:
        """Tokens emitted per request per target forward (prefill included): 1 for plain
        decoding, 1 + the mean accepted drafts for speculative decoding."""
        return self.num_generated / max(self.request_forwards, 1)

    @property
    def acceptance_rate(self) -> torch.Tensor:
        """[K] float64 conditional acceptance per draft position: accepted / reached (NaN where
        no draft reached the position)."""
        return self.position_accepted.double() / self.position_reached.double()

    def summary(self) -> str:
        rate = ", ".join(f"{r:.2f}" for r in self.acceptance_rate.tolist())
        plans = ", ".join(f"{name} {count}" + (f" ({self.unplanned_rounds} unplanned)" if name == "none" and
                                                 self.unplanned_rounds else "")
                          for name, count in self.plan_rounds.items())
        return (
            f"{self.num_generated} tokens, {self.num_rounds} rounds, {self.target_forwards} target forwards, "
            f"{self.mean_accepted_length:.2f} tokens/forward, acceptance per position [{rate}]"
            f"{f', rounds per plan: {plans}' if plans else ''}; "
            f"time {self.time_total * 1e3:.1f} ms = target {self.time_target * 1e3:.1f} "
            f"(prefill {self.time_prefill * 1e3:.1f}) + draft {self.time_draft * 1e3:.1f} "
            f"+ overhead {self.time_overhead * 1e3:.1f}"
        )


def _is_sequence(value) -> bool:
    return isinstance(value, (list, tuple)) or (isinstance(value, torch.Tensor) and value.dim() == 1)


def _per_request(value, num_requests: int, dtype: torch.dtype, device, name: str) -> torch.Tensor:
    if _is_sequence(value):
        tensor = torch.as_tensor(value, dtype=dtype).to(device)
        if tensor.shape != (num_requests,):
            raise ValueError(f"{name} needs one value per request ({num_requests}), got {list(tensor.shape)}")
        return tensor
    return torch.full((num_requests,), value, dtype=dtype, device=device)


def _cumsum0(lengths: torch.Tensor) -> torch.Tensor:
    """[n + 1] int32 offsets of segments of ``lengths`` [n]: 0, l_0, l_0 + l_1, ..."""
    out = torch.zeros(lengths.shape[0] + 1, dtype=torch.int32, device=lengths.device)
    out[1:] = torch.cumsum(lengths, 0)
    return out


def _as_sps(sps) -> Optional[torch.Tensor]:
    """A steps-per-second table as ``dspark::schedule`` reads it: 1-D float32 (a list, e.g. a
    saved drafter's ``config["sps"]``, is accepted)."""
    if sps is None:
        return None
    table = torch.as_tensor(sps, dtype=torch.float32)
    if table.dim() != 1 or table.numel() < 2:
        raise ValueError(f"sps must be a 1-D table [max_tokens + 1] with max_tokens >= 1, got shape {list(table.shape)}")
    return table


class _Generation:
    """The state of one ``generate`` call; each method is one named step of a round."""

    def __init__(self, target: Target, drafter: Drafter, prompts, max_new_tokens, temperature, seed,
                 eos_token_id, sps, cost, on_tokens):
        self.target, self.drafter, self.cost, self.on_tokens = target, drafter, cost, on_tokens
        self.device = device = torch.device(target.device)
        self.B = B = len(prompts)
        self.K = K = int(drafter.num_draft)
        self.prompts = [torch.as_tensor(p, dtype=torch.int64).reshape(-1) for p in prompts]
        self.prompt_lengths = torch.tensor([p.numel() for p in self.prompts], dtype=torch.int64)
        if int(self.prompt_lengths.min()) < 1:
            raise ValueError("every prompt needs at least one token")
        max_new = _per_request(max_new_tokens, B, torch.int64, "cpu", "max_new_tokens")
        if int(max_new.min()) < 0:
            raise ValueError("max_new_tokens must be >= 0")
        max_context = getattr(target, "max_context", None)
        if max_context is not None and int((self.prompt_lengths + max_new).max()) > int(max_context):
            b = int(torch.argmax(self.prompt_lengths + max_new))
            raise ValueError(f"request {b}: prompt ({int(self.prompt_lengths[b])} tokens) + max_new_tokens "
                             f"({int(max_new[b])}) exceeds the target's context of {int(max_context)} tokens")
        self.temperatures = _per_request(temperature, B, torch.float32, device, "temperature")
        if bool((self.temperatures < 0).any()) or not bool(torch.isfinite(self.temperatures).all()):
            raise ValueError("temperature must be finite and >= 0")
        if _is_sequence(seed):
            self.seeds = _per_request(seed, B, torch.int64, device, "seed")
        else:  # one seed: request b uses seed + b
            self.seeds = int(seed) + torch.arange(B, dtype=torch.int64, device=device)
        self.eos = (None if eos_token_id is None
                    else torch.as_tensor(eos_token_id, dtype=torch.int64, device=device).reshape(-1))
        self.sps = _as_sps(sps)
        self.result = GenerationResult(
            tokens=[],
            position_verified=torch.zeros(K, dtype=torch.int64, device=device),
            position_reached=torch.zeros(K, dtype=torch.int64, device=device),
            position_accepted=torch.zeros(K, dtype=torch.int64, device=device),
        )
        # sequence[b, :seq_len[b]] = prompt + generated tokens (the anchor last); the target's
        # cache holds all of it but the anchor.
        self.max_new = max_new.to(device)
        self.seq_len = self.prompt_lengths.to(device).clone()
        self.capacity = int((self.prompt_lengths + max_new).max()) + 1
        self.sequence = torch.zeros(B, self.capacity, dtype=torch.int64, device=device)
        self.prompt_mask = (torch.arange(self.capacity)[None] < self.prompt_lengths[:, None]).to(device)
        self.sequence[self.prompt_mask] = torch.cat(self.prompts).to(device)
        self.generated = torch.zeros(B, dtype=torch.int64, device=device)
        self.done = self.max_new == 0
        self.positions = torch.arange(K + 1, device=device)
        self.row_index = torch.arange(B, device=device)
        # features[b, j] = the target's features of token j of request b (what DSpark drafters
        # read); features_shown[b] = how many of them the drafter has been given so far.
        self.features: Optional[torch.Tensor] = None
        self.features_shown = torch.zeros(B, dtype=torch.int64, device=device)
        # The loop's own forecast for drafters that report confidences but no ``plans``: the
        # survival their confidences gave each request so far (``dspark_ext.forecast``).
        self.lagged_survival = SurvivalForecast.for_drafter(drafter)
        self.lagged_survival.resize(B)
        self.rounds_without: Dict[str, int] = {}
        self.probe_interval: Dict[str, int] = {}
        self._step_seconds: Dict[int, torch.Tensor] = {}
        self.plan_lengths: Optional[torch.Tensor] = None  # set by choose_plan
        # What choose_plan's plan promised: its rate over drafting nothing's, in the round's own
        # objective (None where it drafts nothing or probes), to set against what calls gain.
        self.plan_gain: Optional[float] = None
        # Sum, sum of squares and count of the tokens a request made per round in this call.
        self.round_tokens = (0.0, 0.0, 0)
        self._schedule_tables: Dict[tuple, torch.Tensor] = {}
        # Planning backoff (QUIET_ROUNDS): planned rounds in a row that drafted nothing, the
        # rounds left unplanned and the length of the next unplanned stretch.
        self.quiet_rounds, self.unplanned_left, self.unplanned_stretch = 0, 0, 1

    # ------------------------------------------------------------------ helpers
    def clock(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def emit(self, out_tokens: torch.Tensor, count: torch.Tensor, rows: torch.Tensor) -> None:
        """Appends out_tokens[i, :count[i]] to request rows[i]: truncated after an eos; updates
        sequence, seq_len, generated and done, and streams the new tokens."""
        device, width = self.device, out_tokens.shape[1]
        columns_w = torch.arange(width, device=device)[None]
        valid = columns_w < count[:, None]
        hit_eos = torch.zeros_like(count, dtype=torch.bool)
        if self.eos is not None:
            is_eos = torch.isin(out_tokens, self.eos) & valid
            first_eos = torch.where(is_eos, columns_w, width).amin(1)
            count = torch.minimum(count, first_eos + 1)
            valid = columns_w < count[:, None]
            hit_eos = first_eos < width
        columns = (self.seq_len[rows][:, None] + columns_w)[valid]
        self.sequence[rows[:, None].expand(-1, width)[valid], columns] = out_tokens[valid]
        self.seq_len[rows] += count
        self.generated[rows] += count
        self.done[rows] |= hit_eos | (self.generated[rows] >= self.max_new[rows])
        if self.on_tokens is not None:
            counts, starts = count.tolist(), (self.seq_len[rows] - count).tolist()
            for i, b in enumerate(rows.tolist()):
                if counts[i]:
                    self.on_tokens(b, self.sequence[b, starts[i]:starts[i] + counts[i]].cpu())

    def store_features(self, hidden: torch.Tensor, rows: torch.Tensor, src: torch.Tensor, dst: torch.Tensor) -> None:
        if self.features is None:
            self.features = hidden.new_zeros(self.B, self.capacity, hidden.shape[-1])
        self.features[rows, dst] = hidden[src]

    # ------------------------------------------------------------------ prefill
    def prefill(self) -> None:
        """The prompts through the target; the first token of every request from their last rows."""
        device, B = self.device, self.B
        t0 = self.clock()
        out = self.target.start(self.prompts)
        self.result.time_prefill = self.clock() - t0
        self.result.time_target += self.result.time_prefill
        self.result.target_forwards += 1
        self.result.request_forwards += B
        if out.hidden_states is not None:
            rows, cols = self.prompt_mask.nonzero(as_tuple=True)
            self.store_features(out.hidden_states, rows, torch.arange(rows.numel(), device=device), cols)
        last_rows = (torch.cumsum(self.prompt_lengths, 0) - 1).to(device)
        first, _ = torch.ops.dspark.verify(
            out.logits[last_rows], torch.zeros(0, dtype=torch.int64, device=device), None,
            _cumsum0(torch.zeros(B, dtype=torch.int32, device=device)), self.temperatures, self.seeds,
            self.generated.clone(), 0)
        starting = ~self.done
        self.emit(first[starting], torch.ones(int(starting.sum()), dtype=torch.int64, device=device),
                  self.row_index[starting])

    # ------------------------------------------------------------------ one round
    def draft_context(self) -> DraftContext:
        width = int(self.seq_len.max())
        anchor_hidden = hidden = None
        if self.features is not None:
            anchor_hidden = self.features[self.row_index, (self.seq_len - 2).clamp(min=0)]
            hidden = self.features[:, :width]
        return DraftContext(tokens=self.sequence[:, :width], lengths=self.seq_len.clone(), anchor_hidden=anchor_hidden,
                            temperature=self.temperatures, seed=self.seeds, offset=self.generated.clone(),
                            hidden_states=hidden, new_from=self.features_shown.clone())

    def step_seconds(self, num_requests: int) -> torch.Tensor:
        """Verify time of n = 0..R (K + 1) tokens for R requests, from the cost profile."""
        if num_requests not in self._step_seconds:
            self._step_seconds[num_requests] = 1.0 / self.cost.sps(num_requests, max_tokens=num_requests * (self.K + 1)).double()
        return self._step_seconds[num_requests]

    def schedule_table(self, plan: DraftPlan, num_requests: int) -> torch.Tensor:
        """The steps-per-second table ``dspark::schedule`` reads: 1 / (draft + verify time)."""
        key = (plan.parts, num_requests)
        if key not in self._schedule_tables:
            self._schedule_tables[key] = self.cost.sps(num_requests, draft_seconds=self.draft_seconds(plan, num_requests),
                                                       max_tokens=num_requests * (self.K + 1)).to(self.device)
        return self._schedule_tables[key]

    def draft_seconds(self, plan: Optional[DraftPlan], num_requests: int) -> float:
        if plan is None or self.cost is None:
            return 0.0
        return sum(self.cost.drafter_seconds(part, num_requests) for part in plan.parts)

    def plans(self, context: DraftContext, active: torch.Tensor) -> List[DraftPlan]:
        """The drafter's plans, or the loop's own lagged one for a drafter that reports
        confidences but no plans (none for the others: they always draft)."""
        if hasattr(self.drafter, "plans"):
            return list(self.drafter.plans(context))
        if self.result.num_rounds > 0 and not bool(self.lagged_survival.rounds.any()):
            return []  # no confidences seen yet after a round of drafting: nothing to forecast
        return [DraftPlan("lagged", survival=self.lagged_survival.forecast().to(self.device),
                          parts=(getattr(self.drafter, "cost_name", type(self.drafter).__name__),), fresh=False)]

    def count_round_tokens(self, made: torch.Tensor) -> None:
        """Adds one round's tokens per verified request ([R] float64, accepted drafts + 1) to the
        call's tally behind ``draft_worth``'s spread."""
        total, squares, count = self.round_tokens
        made_sum, made_squares = torch.stack([made.sum(), (made * made).sum()]).tolist()  # one sync
        self.round_tokens = (total + made_sum, squares + made_squares, count + int(made.numel()))

    def draft_worth(self, active: torch.Tensor) -> Optional[List[float]]:
        """What a draft token of each active request is worth to the call (``lead_discounts``),
        or None in a round of one request: from how far each request is ahead of the one with
        the most tokens left, and how much the tokens a request makes per round have varied in
        this call (its mean m and variance v, over the max(left) / m rounds the call has left:
        a spread of sqrt(rounds x v) tokens)."""
        left = (self.max_new - self.generated)[active].tolist()
        if len(left) <= 1:
            return None
        total, squares, count = self.round_tokens
        spread = 0.0
        if count:
            mean = total / count
            spread = (max(left) / mean * max(squares / count - mean * mean, 0.0)) ** 0.5
        return lead_discounts([max(left) - r_left for r_left in left], spread)

    def choose_plan(self, context: DraftContext, caps: torch.Tensor, active: torch.Tensor) -> Optional[DraftPlan]:
        """The plan with the most expected tokens per second, or None (draft nothing). In a round
        of several requests a token counts as much as it can bring the call's end closer
        (``draft_worth``, ``CALL_END_OBJECTIVE``), and this also sets ``plan_lengths``, the lengths
        the plan was priced at.
        Every input is fixed before this round draws a token: earlier rounds, the sequence so far
        and the tokens each request has made."""
        self.plan_lengths = self.plan_gain = None
        if self.K == 0 or not bool((caps > 0).any()):
            return None
        plans = self.plans(context, active) if self.cost is not None else []
        if not plans:
            return DraftPlan("default", survival=None, parts=())
        R = int(active.sum())
        step_seconds = self.step_seconds(R)
        active_caps = caps[active]
        worth = self.draft_worth(active) if CALL_END_OBJECTIVE else None  # None in a round of one request
        margin = PLAN_MARGIN if R == 1 else BATCH_PLAN_MARGIN
        plain = (plain_decoding_throughput(R, step_seconds) if worth is None
                 else sum(worth) / float(step_seconds[R]))  # worth of the tokens a round that drafts nothing makes
        best, best_rate, best_lengths = None, 0.0, None
        for plan in plans:
            survival = plan.survival[active]
            draft_seconds = self.draft_seconds(plan, R)
            if worth is not None:
                rate, lengths = best_throughput(survival, active_caps, step_seconds, draft_seconds, worth,
                                                weigh_base=True)
            else:
                rate, lengths = best_throughput(survival, active_caps, step_seconds, draft_seconds)
                if R > 1 and rate > margin * plain:  # tokens per second, each request's drafts weighted
                    rate, lengths = best_throughput(survival, active_caps, step_seconds, draft_seconds,
                                                    self.draft_worth(active))
            if rate > margin * plain and rate > best_rate:
                best, best_rate, best_lengths = plan, rate, lengths
        for plan in plans:  # probe forecasts that only refresh when their plan runs
            if plan.fresh:
                continue
            waited = self.rounds_without.get(plan.name, 0)
            interval = self.probe_interval.get(plan.name, PROBE_INTERVAL)
            if best is plan:
                self.probe_interval[plan.name] = PROBE_INTERVAL
            elif waited + 1 >= interval:
                self.probe_interval[plan.name] = min(2 * interval, MAX_PROBE_INTERVAL)
                best, best_lengths = plan, None
        for plan in plans:
            self.rounds_without[plan.name] = 0 if best is plan else self.rounds_without.get(plan.name, 0) + 1
        if best_lengths is not None:
            self.plan_gain = best_rate / plain
            if R > 1:
                self.plan_lengths = torch.zeros(self.B, dtype=torch.int64, device=self.device)
                self.plan_lengths[active] = torch.tensor(best_lengths, dtype=torch.int64, device=self.device)
        return best

    def propose(self, context: DraftContext, plan: Optional[DraftPlan]) -> Draft:
        B, K = self.B, self.K
        if plan is None:
            return Draft(token_ids=torch.zeros(B, K, dtype=torch.int64, device=self.device))
        context.plan = plan.name
        draft = self.drafter.propose(context)
        self.features_shown = self.seq_len - 1  # the drafter sees every row, finished ones included
        if tuple(draft.token_ids.shape) != (B, K):
            raise ValueError(f"the drafter proposed {list(draft.token_ids.shape)} tokens, expected [{B}, {K}]")
        if draft.confidence is not None and not hasattr(self.drafter, "plans"):  # only ``plans`` reads it
            self.lagged_survival.update(draft.confidence.float().cumprod(1))
        return draft

    def verification_lengths(self, draft: Draft, plan: Optional[DraftPlan], caps: torch.Tensor,
                             active: torch.Tensor) -> torch.Tensor:
        """How many drafts each request sends: [B] int64."""
        device = self.device
        if plan is None:
            return torch.zeros(self.B, dtype=torch.int64, device=device)
        table = self.sps
        if self.cost is not None:
            table = self.schedule_table(plan, int(active.sum()))
        if draft.confidence is not None and table is not None:
            num_draft = torch.zeros(self.B, dtype=torch.int64, device=device)
            num_draft[active] = torch.ops.dspark.schedule(
                draft.confidence[active].float().contiguous(), table.to(device=device, dtype=torch.float32),
                caps[active].to(torch.int32)).long()
            return num_draft
        if draft.confidence is not None:
            # Without a throughput table only drafts that can be accepted are sent: a draft of zero
            # confidence (e.g. prompt lookup without a match) ends the request's run.
            viable = (draft.confidence > 0).long().cumprod(1).sum(1)
            return torch.minimum(caps, viable)
        return caps

    def verify_round(self, draft: Draft, num_draft: torch.Tensor, active: torch.Tensor) -> None:
        """Target forward over [anchor, drafts[:n]] per request, verify, keep features, rewind,
        statistics, emit."""
        device, K = self.device, self.K
        positions, rows = self.positions, self.row_index[active]
        anchors = self.sequence[self.row_index, self.seq_len - 1]
        segment = torch.where(active, num_draft + 1, 0)  # finished requests: empty segments
        candidates = torch.cat([anchors[:, None], draft.token_ids.to(torch.int64)], dim=1)
        packed = candidates[positions[None] < segment[:, None]]
        cu_seqlens = _cumsum0(segment)
        target_length_before = self.target.lengths().to(device)

        t0 = self.clock()
        out = self.target.forward(packed, cu_seqlens)
        self.result.time_target += self.clock() - t0
        self.result.target_forwards += 1
        self.result.request_forwards += int(rows.numel())
        self.result.num_rounds += 1

        # Verify over the active requests only: their rows are exactly the packed output.
        draft_mask = positions[None, :K] < num_draft[:, None]
        draft_ids = draft.token_ids.to(torch.int64)[draft_mask]
        target_logits = out.logits
        draft_logits = draft.verified_logits(draft_mask, target_logits.shape[-1])
        if draft_logits is not None and draft_logits.dtype != target_logits.dtype:
            # Widening float16/bfloat16 to float32 is exact: p and q stay what they were.
            target_logits, draft_logits = target_logits.float(), draft_logits.float()
        n_active = num_draft[rows]
        output, num_accepted = torch.ops.dspark.verify(
            target_logits, draft_ids, draft_logits, _cumsum0(n_active), self.temperatures[rows], self.seeds[rows],
            self.generated[rows], K)
        num_accepted = num_accepted.long()
        self.count_round_tokens(num_accepted.double() + 1.0)

        if out.hidden_states is not None:
            # The anchor and the accepted drafts are now context: their rows keep their features.
            kept = positions[None] <= num_accepted[:, None]  # [R, K + 1]
            src = (cu_seqlens[:-1][rows].long()[:, None] + positions[None])[kept]
            dst = (self.seq_len[rows][:, None] - 1 + positions[None])[kept]
            self.store_features(out.hidden_states, rows[:, None].expand(-1, K + 1)[kept], src, dst)

        new_lengths = target_length_before.clone()  # rewind: keep the anchor and the accepted drafts
        new_lengths[rows] += 1 + num_accepted
        self.target.rewind(new_lengths)

        accepted_round = torch.full((self.B,), -1, dtype=torch.int64, device=device)
        accepted_round[rows] = num_accepted
        self.result.accepted_lengths.append(accepted_round.cpu())
        if K > 0:
            k = positions[None, :K]
            self.result.position_verified += (k < n_active[:, None]).sum(0)
            self.result.position_reached += ((k < n_active[:, None]) & (k <= num_accepted[:, None])).sum(0)
            self.result.position_accepted += (k < num_accepted[:, None]).sum(0)
        self.emit(output, num_accepted + 1, rows)

    def draft_caps(self, active: torch.Tensor) -> torch.Tensor:
        """How many drafts each request may verify this round: [B] int64. Its budget bounds it;
        with a cost profile (planned rounds), so does the batch: a call ends with its last
        request, so a request more than one round (K + 1 tokens) ahead of the one with the most
        tokens left drafts nothing; its drafts would cost verify rows without ending the call
        sooner. Both depend only on tokens already emitted, so the output law is unchanged."""
        remaining = torch.where(active, self.max_new - self.generated, 0)
        caps = torch.where(active, (remaining - 1).clamp(0, self.K), 0)
        if self.cost is not None and self.B > 1:
            caps = torch.where(remaining + self.K + 1 > remaining.max(), caps, 0)
        return caps

    def planned(self) -> bool:
        """Whether this round plans (``QUIET_ROUNDS``): always without a cost profile, where the
        loop does not price rounds."""
        if self.cost is None:
            return True
        if self.unplanned_left > 0:
            self.unplanned_left -= 1
            self.result.unplanned_rounds += 1
            self.plan_lengths = self.plan_gain = None  # a planned round's caps and promise never outlive it
            return False
        return True

    def back_off(self, plan: Optional[DraftPlan]) -> None:
        if self.cost is None:
            return
        if plan is not None:
            self.quiet_rounds, self.unplanned_stretch = 0, 1
            return
        self.quiet_rounds += 1
        if self.quiet_rounds >= QUIET_ROUNDS:
            self.unplanned_left = self.unplanned_stretch
            self.unplanned_stretch = min(2 * self.unplanned_stretch, MAX_UNPLANNED)

    def round(self) -> None:
        active = ~self.done
        caps = self.draft_caps(active)
        t0 = self.clock()
        context, plan = None, None
        if self.planned():
            context = self.draft_context()
            plan = self.choose_plan(context, caps, active)
            self.back_off(plan)
        draft = self.propose(context, plan)
        self.result.time_draft += self.clock() - t0
        name = "none" if plan is None else plan.name
        self.result.plan_rounds[name] = self.result.plan_rounds.get(name, 0) + 1
        if self.plan_lengths is not None:  # drafts past the priced lengths were worth less than they cost
            caps = torch.minimum(caps, self.plan_lengths)
        num_draft = self.verification_lengths(draft, plan, caps, active)
        self.verify_round(draft, num_draft, active)

    def finish(self, t_start: float) -> GenerationResult:
        result = self.result
        seq_len, sequence = self.seq_len.cpu(), self.sequence.cpu()
        result.tokens = [sequence[b, int(self.prompt_lengths[b]):int(seq_len[b])].clone() for b in range(self.B)]
        for name in ("position_verified", "position_reached", "position_accepted"):
            setattr(result, name, getattr(result, name).cpu())
        result.time_total = self.clock() - t_start
        result.time_overhead = result.time_total - result.time_target - result.time_draft
        return result


def generate(
    target: Target,
    drafter: Drafter,
    prompts: Sequence[torch.Tensor],
    max_new_tokens: PerRequestInt,
    temperature: PerRequestFloat = 0.0,
    seed: PerRequestInt = 0,
    *,
    eos_token_id: Optional[Union[int, Sequence[int]]] = None,
    sps: Optional[Union[torch.Tensor, Sequence[float]]] = None,
    cost=None,
    on_tokens: Optional[Callable[[int, torch.Tensor], None]] = None,
) -> GenerationResult:
    """Generates up to ``max_new_tokens`` tokens after each prompt with ``target``, drafting with
    ``drafter``. ``prompts``: 1-D int64 token ids (lengths may differ, at least one token each);
    ``max_new_tokens``, ``temperature`` (0 = greedy) and ``seed`` are one value or one per
    request (an int seed gives request b the seed ``seed + b``). A request stops after
    ``eos_token_id`` (one id or several) or after ``max_new_tokens`` tokens; prompt +
    ``max_new_tokens`` beyond the target's ``max_context`` (when it has one) is an error.

    Scheduling: ``cost`` (a ``dspark_ext.cost_profile.CostProfile`` measured on this machine)
    prices verification and drafting, picks each round's plan (or none) before drafting, and
    lets ``dspark::schedule`` pick the draft lengths by tokens / (draft + verify time).
    Without it, ``sps`` (the target's steps-per-second table, a tensor or list, as
    ``dspark_ext.profile_sps`` returns or a saved drafter's config holds) lets ``dspark::schedule``
    pick the lengths from verify time alone when the drafter reports confidences (it must cover
    the unfinished requests: ``sps.numel() - 1 >= B``). ``on_tokens(b, new_ids)`` is called with
    each request's newly emitted tokens, in order (streaming).

    The drafter is called on all B requests in every round it drafts (a stable row per request,
    like the target's cache slots; finished requests' drafts are ignored), and not at all in a
    round where no request may verify a draft (every cap is 0) or the plan is not to draft."""
    if len(prompts) == 0:
        return GenerationResult(tokens=[])
    run = _Generation(target, drafter, prompts, max_new_tokens, temperature, seed, eos_token_id, sps, cost, on_tokens)
    t_start = run.clock()
    run.prefill()
    while not bool(run.done.all()):
        run.round()
    return run.finish(t_start)
