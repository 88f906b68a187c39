"""Verification-length scheduling in plain tensor ops: no host sync, no data-dependent
shapes, any device, traceable by torch.compile.

``schedule_async`` is DSpark's production scheduler (Sec. 5.2): the token budget comes from
confidences of an earlier step, so it can be fixed before the current drafts exist. The
synchronous scheduler is the op ``torch.ops.dspark.schedule``; ``schedule_eager`` is the same
Algorithm 1 composed from torch ops (bitwise equal to the op, the baseline of
bench/bench_schedule.py).
"""

import functools
import math
from typing import List, Optional, Sequence, Tuple

import torch

#: tau (expected accepted tokens) is summed in 2^-40 fixed point, exactly as the kernels do.
TAU_FRACTION_BITS = 40


def survival_probabilities(confidence: torch.Tensor, max_len: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``a[r, j] = prod_{i<=j} c[r, i]`` [R, K] float32, rounded after every product (the kernels'
    order; torch.cumprod may accumulate in float64), 0 beyond ``max_len[r]``. Confidences are read
    like the CUDA kernel reads them: NaN -> 0, clamped to [0, 1]."""
    c = torch.nan_to_num(confidence.float(), nan=0.0).clamp(0.0, 1.0)
    columns = [c[:, 0]] if c.shape[1] else []
    for j in range(1, c.shape[1]):
        columns.append(columns[-1] * c[:, j])
    survival = torch.stack(columns, dim=1) if columns else c.clone()
    if max_len is not None:
        positions = torch.arange(c.shape[1], device=c.device)
        survival = torch.where(positions < max_len.clamp(min=0).unsqueeze(1), survival, 0.0)
    return survival


def _admission_order(survival: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Candidates in Algorithm 1's order: descending survival, ties by lower request then lower
    position (a stable sort of the row-major flattening). Returns (sorted survival, flat index)."""
    return torch.sort(survival.reshape(-1), descending=True, stable=True)


def _greedy_path_throughput(
    sorted_survival: torch.Tensor, num_requests: int, sps: torch.Tensor
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Along the admission order: (Theta after each candidate [n] float64, Theta with no draft
    [] float64, admissible [n] bool: the candidate exists and the batch stays within N)."""
    max_batch = sps.shape[0] - 1
    increments = (sorted_survival.double() * 2.0**TAU_FRACTION_BITS).long()  # truncation, like the kernels
    tau = (num_requests << TAU_FRACTION_BITS) + torch.cumsum(increments, 0)
    batch = num_requests + 1 + torch.arange(sorted_survival.shape[0], device=sorted_survival.device)
    admissible = (sorted_survival > 0) & (batch <= max_batch)
    steps_per_second = sps.double()
    theta = tau.double() * 2.0**-TAU_FRACTION_BITS * steps_per_second[batch.clamp(max=max_batch)]
    theta_0 = float(num_requests) * steps_per_second[num_requests]
    return theta, theta_0, admissible


def _lengths_of_first(order: torch.Tensor, num_admitted: torch.Tensor, num_requests: int, num_draft: int) -> torch.Tensor:
    """num_draft [R] int32 when the first ``num_admitted`` candidates of ``order`` are admitted;
    a request's admitted positions are a prefix, so its length is its largest admitted j + 1."""
    admitted = torch.arange(order.shape[0], device=order.device) < num_admitted
    lengths = torch.where(admitted, order % num_draft + 1, 0)
    out = torch.zeros(num_requests, dtype=torch.int64, device=order.device)
    return out.scatter_reduce(0, order // num_draft, lengths, "amax").to(torch.int32)


def _check(confidence: torch.Tensor, sps: torch.Tensor, name: str = "confidence") -> None:
    if confidence.dim() != 2:
        raise ValueError(f"{name} must be [R, K], got shape {list(confidence.shape)}")
    if sps.dim() != 1 or confidence.shape[0] > sps.shape[0] - 1:
        raise ValueError(
            f"sps must be [N + 1] with N >= R = {confidence.shape[0]} ({name}.size(0)), got shape {list(sps.shape)}"
        )


def schedule_eager(confidence: torch.Tensor, sps: torch.Tensor, max_len: Optional[torch.Tensor] = None) -> torch.Tensor:
    """DSpark Algorithm 1 with the early stop, from torch ops: equal to ``torch.ops.dspark.schedule``."""
    _check(confidence, sps)
    num_requests, num_draft = confidence.shape
    if num_requests * num_draft == 0:
        return torch.zeros(num_requests, dtype=torch.int32, device=confidence.device)
    sorted_survival, order = _admission_order(survival_probabilities(confidence, max_len))
    theta, theta_0, admissible = _greedy_path_throughput(sorted_survival, num_requests, sps)
    previous = torch.cat([theta_0.reshape(1), theta[:-1]])
    improves = admissible & (theta > previous)
    num_admitted = improves.long().cumprod(0).sum()  # up to the first failure: the early stop
    return _lengths_of_first(order, num_admitted, num_requests, num_draft)


def schedule_async(
    confidence: torch.Tensor,
    lagged_confidence: torch.Tensor,
    sps: torch.Tensor,
    max_len: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """DSpark's asynchronous scheduler (Sec. 5.2): ``num_draft`` [R] int32.

    The budget is the verify batch size B* (tokens, anchors included) that maximises Theta over
    the *whole* greedy path of ``lagged_confidence`` [R', K'] (scores from an earlier step, e.g.
    two rounds back: the search may look past a non-improving candidate because these scores
    cannot depend on the current drafts). Fixing B* ahead is what lets an engine pick the next
    step's batch size (and CUDA graph) before the current step ends. The current candidates are
    then admitted in descending current survival (``confidence`` [R, K], same order and ties as
    ``dspark::schedule``), at most B* - R of them (none if R >= B*). Lossless: B* is fixed before
    the current drafts exist, and a draft's admission depends only on scores of tokens admitted
    before it (within a request the ranking follows its prefix)."""
    _check(confidence, sps)
    _check(lagged_confidence, sps, "lagged_confidence")
    num_requests, num_draft = confidence.shape
    lagged_requests = lagged_confidence.shape[0]
    if num_requests * num_draft == 0:
        return torch.zeros(num_requests, dtype=torch.int32, device=confidence.device)
    lagged_sorted, _ = _admission_order(survival_probabilities(lagged_confidence))
    theta, theta_0, admissible = _greedy_path_throughput(lagged_sorted, lagged_requests, sps)
    # A NaN Theta (NaN SPS) never counts as better, as in the synchronous comparison; a NaN
    # Theta_0 wins argmax and gives budget 0, as no Theta compares greater than it.
    candidates = torch.where(admissible & ~theta.isnan(), theta, float("-inf"))
    lagged_drafts = torch.argmax(torch.cat([theta_0.reshape(1), candidates]))  # first maximum: fewest tokens
    budget = (lagged_requests + lagged_drafts - num_requests).clamp(min=0)  # drafts within B*; B* <= N

    sorted_survival, order = _admission_order(survival_probabilities(confidence, max_len))
    num_candidates = (sorted_survival > 0).sum()
    return _lengths_of_first(order, torch.minimum(budget, num_candidates), num_requests, num_draft)


# --------------------------------------------------------------------------- draft-cost-aware planning


def best_throughput(survival: torch.Tensor, caps: torch.Tensor, step_seconds: torch.Tensor,
                    draft_seconds: float, weights: Optional[Sequence[float]] = None,
                    weigh_base: bool = False) -> Tuple[float, List[int]]:
    """The best expected tokens per second of one round in which R requests draft with
    forecast ``survival`` [R, K] (P(first j + 1 drafts accepted)), at most ``caps`` [R] drafts
    each, the drafting costs ``draft_seconds`` and verifying n tokens costs ``step_seconds[n]``
    (a 1-D CPU float64 table): the maximum over Algorithm 1's admission order of
    tau(n) / (draft_seconds + step_seconds[n]), tau(n) = R + the admitted survivals; and the
    draft lengths [R] that reach it. The whole order is searched: forecasts are fixed before the
    round, as in ``schedule_async``.

    ``weights`` [R] in [0, 1] (default all 1): what a draft token of each request is worth
    (e.g. ``lead_discounts``). Request r's drafts count ``weights[r] * survival[r, j]``, still
    falling with j, so the admitted drafts stay a prefix of each request; the R tokens every
    round makes count 1 each, or with ``weigh_base`` ``weights[r]`` each (how fast the round
    brings a batch call's end closer, ``dspark_ext.generate.CALL_END_OBJECTIVE``); all weights 1
    is the plain tokens-per-second objective either way."""
    num_requests, num_draft = survival.shape
    # Plain Python: a round plans over a few dozen candidates, where tensor ops cost more in
    # dispatch than in work (the loop calls this every round).
    caps_list, step = caps.tolist(), step_seconds.tolist()
    weight_list = [1.0] * num_requests if weights is None else [float(w) for w in weights]
    ordered = sorted(((weight * value, row) for row, (values, cap, weight)
                      in enumerate(zip(survival.tolist(), caps_list, weight_list))
                      for value in values[:max(cap, 0)] if value > 0 and weight > 0),  # NaN > 0 is False
                     key=lambda candidate: -candidate[0])[: max(len(step) - 1 - num_requests, 0)]
    lengths, best_lengths = [0] * num_requests, [0] * num_requests
    best = tau = float(sum(weight_list)) if weigh_base else float(num_requests)
    best /= draft_seconds + step[num_requests]
    for admitted, (value, row) in enumerate(ordered, start=1):
        tau += value
        lengths[row] += 1
        rate = tau / (draft_seconds + step[num_requests + admitted])
        if rate > best:
            best, best_lengths = rate, list(lengths)
    return best, best_lengths


#: ``lead_discounts``: a request more than this many spreads ahead counts 0 (its chance of
#: being last is then below 1e-17 of the leader's).
_IRRELEVANT_LEAD = 12.0
#: Gauss-Hermite nodes of ``lead_discounts``' expectation over a standard normal: 24 agree with a
#: 400-point grid of the integral to 1e-5 on random batches, in ~40 us of plain Python (the grid
#: in torch ops cost 100-200 us of dispatch in every planned round of a batch).
_QUADRATURE_NODES = 24


@functools.lru_cache(maxsize=None)
def _standard_normal_quadrature(n: int) -> Tuple[Tuple[float, ...], Tuple[float, ...]]:
    """(nodes, weights) with sum_i w_i f(x_i) ~ E f(Z), Z ~ N(0, 1): Golub-Welsch on the
    probabilists' Hermite recurrence (eigenvalues of its Jacobi matrix; weights the squared
    first components of the eigenvectors)."""
    k = torch.arange(1, n, dtype=torch.float64).sqrt()
    nodes, vectors = torch.linalg.eigh(torch.diag(k, 1) + torch.diag(k, -1))
    return tuple(nodes.tolist()), tuple((vectors[0] ** 2).tolist())


def lead_discounts(ahead: Sequence[float], spread: float) -> List[float]:
    """What a token of each request of a batch call is worth to the call, in [0, 1]: its chance
    of being the last to finish (the call ends with that one), relative to the likeliest last.

    ``ahead[r]``: how many tokens request r is ahead of the one with the most left (>= 0).
    ``spread``: the standard deviation, in tokens, of how far a request gets by the time the
    call would end. Model: each request's shortfall then is normal, mean -ahead[r], sd
    ``spread``, independent; r is last when its shortfall is the largest, with probability
    E prod_{c != r} Phi(Z - (ahead[r] - ahead[c]) / spread) over Z ~ N(0, 1) (Phi: the
    standard normal distribution). With all requests level every token is worth 1 (tokens per
    second); a lead that the others' luck is unlikely to erase makes that request's drafts worth
    little. ``spread`` 0: 1 for the requests with the most left, 0 for the others. Cost
    O(distinct leads^2 x nodes), whatever R."""
    ahead = [float(a) for a in ahead]
    if not ahead or min(ahead) == max(ahead):
        return [1.0] * len(ahead)
    if not spread > 0:
        return [1.0 if a <= min(ahead) else 0.0 for a in ahead]
    least = min(ahead)
    counts: dict = {}  # distinct leads, in spreads -> how many requests have it
    for a in ahead:
        lead = (a - least) / spread
        counts[lead] = counts.get(lead, 0) + 1
    nodes, weights = _standard_normal_quadrature(_QUADRATURE_NODES)
    chance = {}
    for lead in counts:
        if lead > _IRRELEVANT_LEAD:
            chance[lead] = 0.0
            continue
        # The others: every request but this one (one fewer of its own lead).
        others = [(lead - other, count - (other == lead)) for other, count in counts.items() if count - (other == lead)]
        total = 0.0
        for x, w in zip(nodes, weights):
            for gap, count in others:
                w *= (0.5 * math.erfc((gap - x) * math.sqrt(0.5))) ** count  # Phi(x - gap)
            total += w
        chance[lead] = total
    likeliest = max(chance.values())
    return [chance[(a - least) / spread] / likeliest for a in ahead]


def plain_decoding_throughput(num_requests: int, step_seconds: torch.Tensor) -> float:
    """Tokens per second of a round that drafts nothing: R tokens in one step of R tokens."""
    return num_requests / float(step_seconds[num_requests])
