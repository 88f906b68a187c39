"""Plain-PyTorch references of ``dspark::verify``, ``dspark::markov_draft`` and
``dspark::schedule`` (slow, readable; for tests only).

Each follows its op contract (README / dspark_ext.ops) step by step: verify one request and
one draft position at a time in float64, Markov drafting one draft position at a time in
the op's float32 math. Randomness comes from a ``torch.Generator`` instead of the ops' keyed
Philox streams, so sampled results can only be compared in distribution; greedy results
(temperature 0) are deterministic and must match the op token for token.

``rule`` (verify) and ``variant`` (Markov drafting) select deliberately *wrong* variants.
They exist only so the statistical tests can show that they are able to detect a broken
sampler (power checks); the ops are always compared against the exact ones.

This module never calls ``torch.ops.dspark``.
"""

import math
from typing import List, Optional, Tuple

import torch

#: Correct speculative sampling (Leviathan et al. 2023, Alg. 1).
RULE_EXACT = "exact"
#: Broken: accepts with probability min(1, p/q) ** 0.5 (accepts too often).
RULE_SQRT_ACCEPT = "sqrt_accept"
#: Broken: after a rejection samples the correction from p instead of norm(max(0, p - q)).
RULE_CORRECTION_FROM_TARGET = "correction_from_target"
RULES = (RULE_EXACT, RULE_SQRT_ACCEPT, RULE_CORRECTION_FROM_TARGET)


def sanitize_logits(logits: torch.Tensor) -> torch.Tensor:
    """float64 copy where NaN carries no probability (-inf); +inf is kept (handled by callers)."""
    x = logits.detach().to(device="cpu", dtype=torch.float64)
    return torch.where(torch.isnan(x), torch.full_like(x, float("-inf")), x)


def greedy_tokens(logits: torch.Tensor) -> torch.Tensor:
    """Greedy token of each row (last dim): the first index of the largest logit. NaN never
    wins (unlike torch.argmax), +inf is the largest value, and a row with nothing above
    -inf (all -inf / NaN) answers 0."""
    x = sanitize_logits(logits)
    best = x.max(dim=-1, keepdim=True).values
    # argmax over a 0/1 mask returns the first maximal index (documented tie rule).
    return (x == best).to(torch.int8).argmax(dim=-1)


def greedy_token(logits_row: torch.Tensor) -> int:
    return int(greedy_tokens(logits_row))


def probabilities(logits: torch.Tensor, temperature) -> torch.Tensor:
    """softmax(logits / T) over the last dim, in float64, with the op's rules: NaN ->
    probability 0; the +inf entries of a row (if any) share all of its mass equally.
    A row with no finite or +inf logit has no distribution: it comes back as all NaN.
    ``temperature`` is a float or a tensor broadcastable to ``logits.shape[:-1]``."""
    x = sanitize_logits(logits)
    t = torch.as_tensor(temperature, dtype=torch.float64)
    if t.dim() > 0:
        t = t.unsqueeze(-1)  # one temperature per row
    soft = torch.softmax(x / t, dim=-1)  # all -inf row -> NaN; a +inf entry -> NaN too
    positive_infinite = torch.isposinf(x)
    num_infinite = positive_infinite.sum(dim=-1, keepdim=True)
    shared = positive_infinite.double() / num_infinite.clamp(min=1)
    return torch.where(num_infinite > 0, shared, soft)


def sample(probs: List[float], u: float) -> int:
    """Inverse-CDF draw from (unnormalised) weights with a uniform u in [0, 1)."""
    threshold = u * math.fsum(probs)
    running = 0.0
    last_positive = 0
    for token, weight in enumerate(probs):
        if weight > 0.0:
            running += weight
            last_positive = token
            if running > threshold:
                return token
    return last_positive  # rounding: u * total landed on the very end


def accept_probability(p_x: float, q_x: float, rule: str = RULE_EXACT) -> float:
    """min(1, p(x) / q(x)); q(x) = 0 rejects (the draft could not have produced x)."""
    if not q_x > 0.0:
        return 0.0
    ratio = min(1.0, p_x / q_x)
    return math.sqrt(ratio) if rule == RULE_SQRT_ACCEPT else ratio


def residual_distribution(p: List[float], q: List[float], rule: str = RULE_EXACT) -> List[float]:
    """max(0, p - q) (unnormalised); p itself when the residual has no mass (p == q), and
    always p for the broken ``correction_from_target`` rule."""
    if rule == RULE_CORRECTION_FROM_TARGET:
        return p
    residual = [max(0.0, pi - qi) for pi, qi in zip(p, q)]
    return residual if math.fsum(residual) > 0.0 else p


def verify_request(
    target_probs: List[Optional[List[float]]],
    target_greedy: List[int],
    draft_ids: List[int],
    draft_probs: Optional[List[Optional[List[float]]]],
    greedy: bool,
    accept_uniforms: List[float],
    sample_uniform: float,
    rule: str = RULE_EXACT,
) -> List[int]:
    """One request with L drafts; returns its emitted tokens: the accepted drafts, then
    exactly one token chosen by the target.

    target_probs: L + 1 rows of p (None: the row has no finite logit); target_greedy: the
    greedy token of each target row; draft_ids: L ints; draft_probs: L rows of q, or None
    for one-hot drafts; accept_uniforms: L uniforms for the accept tests; sample_uniform:
    the uniform of the one sampled (correction or bonus) token.
    """
    for k, x in enumerate(draft_ids):
        if greedy:
            if x != target_greedy[k]:
                return draft_ids[:k] + [target_greedy[k]]  # first rejection: the target's argmax
            continue
        p = target_probs[k]
        if p is None:  # no finite logit: nothing can be accepted, the row emits token 0
            return draft_ids[:k] + [0]
        if draft_probs is None:
            q = [0.0] * len(p)
            q[x] = 1.0
        else:  # a draft row without finite logits has no q: reject
            q = draft_probs[k] if draft_probs[k] is not None else [0.0] * len(p)
        if accept_uniforms[k] < accept_probability(p[x], q[x], rule):
            continue
        return draft_ids[:k] + [sample(residual_distribution(p, q, rule), sample_uniform)]  # first rejection
    # Every draft accepted: the bonus token comes from the last row.
    last = len(draft_ids)
    if greedy:
        return draft_ids + [target_greedy[last]]
    p = target_probs[last]
    return draft_ids + [0 if p is None else sample(p, sample_uniform)]


def _rows_as_lists(probs: torch.Tensor) -> List[Optional[List[float]]]:
    has_mass = ~torch.isnan(probs).any(dim=-1)
    return [row if ok else None for row, ok in zip(probs.tolist(), has_mass.tolist())]


def verify_reference(
    target_logits: torch.Tensor,
    draft_token_ids: torch.Tensor,
    draft_logits: Optional[torch.Tensor],
    cu_num_draft: torch.Tensor,
    temperature: torch.Tensor,
    seed: torch.Tensor,
    offset: torch.Tensor,
    max_num_draft: int,
    generator: Optional[torch.Generator] = None,
    rule: str = RULE_EXACT,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Same arguments and outputs as ``torch.ops.dspark.verify`` (outputs on CPU).

    ``seed`` and ``offset`` are accepted for signature compatibility and ignored: the
    uniforms come from ``generator`` (torch's default generator when None). Inputs are
    assumed valid (no argument checking).
    """
    if rule not in RULES:
        raise ValueError(f"unknown rule {rule!r}, expected one of {RULES}")
    del seed, offset
    cu = cu_num_draft.cpu().tolist()
    ids = draft_token_ids.cpu().tolist()
    temps = temperature.cpu().tolist()
    num_requests = len(cu) - 1
    num_drafts = len(ids)

    # Per-row quantities, computed once. Request b owns target rows cu[b] + b .. cu[b+1] + b
    # and draft rows cu[b] .. cu[b+1] - 1. Greedy rows get a dummy T = 1 in the (unused) softmax.
    row_temperature = [temps[b] if temps[b] > 0 else 1.0 for b in range(num_requests) for _ in range(cu[b], cu[b + 1] + 1)]
    draft_temperature = [temps[b] if temps[b] > 0 else 1.0 for b in range(num_requests) for _ in range(cu[b], cu[b + 1])]
    target_probs = _rows_as_lists(probabilities(target_logits, torch.tensor(row_temperature, dtype=torch.float64)))
    target_greedy = greedy_tokens(target_logits).tolist()
    draft_probs = None
    if draft_logits is not None:
        draft_probs = _rows_as_lists(probabilities(draft_logits, torch.tensor(draft_temperature, dtype=torch.float64)))
    accept_uniforms = torch.rand(num_drafts, dtype=torch.float64, generator=generator).tolist()
    sample_uniforms = torch.rand(num_requests, dtype=torch.float64, generator=generator).tolist()

    output = [[-1] * (max_num_draft + 1) for _ in range(num_requests)]
    num_accepted = [0] * num_requests
    for b in range(num_requests):
        begin, end = cu[b], cu[b + 1]
        emitted = verify_request(
            target_probs[begin + b : end + b + 1],
            target_greedy[begin + b : end + b + 1],
            ids[begin:end],
            None if draft_probs is None else draft_probs[begin:end],
            temps[b] == 0.0,
            accept_uniforms[begin:end],
            sample_uniforms[b],
            rule,
        )
        output[b][: len(emitted)] = emitted
        num_accepted[b] = len(emitted) - 1
    return torch.tensor(output, dtype=torch.int64).reshape(num_requests, max_num_draft + 1), torch.tensor(
        num_accepted, dtype=torch.int32
    )


#: Correct Markov drafting (the contract of dspark::markov_draft).
MARKOV_EXACT = "exact"
#: Broken: drops the Markov bias (l = U), so a draft no longer depends on the previous token.
MARKOV_DROPPED = "markov_dropped"
MARKOV_VARIANTS = (MARKOV_EXACT, MARKOV_DROPPED)


def markov_probabilities(logits: torch.Tensor, temperature) -> torch.Tensor:
    """The op's sampling law ``softmax(sanitize(float32(l) / T))`` over the last dim, in float64.

    sanitize: NaN -> -inf, +inf -> FLT_MAX, applied *after* the division, so the +inf entries
    and the entries that overflow at this temperature share the mass equally. A row without
    mass (nothing above -inf) comes back as all NaN. ``temperature`` is a float or a tensor
    broadcastable to ``logits.shape[:-1]``."""
    t = torch.as_tensor(temperature, dtype=torch.float32)
    if t.dim() > 0:
        t = t.unsqueeze(-1)  # one temperature per row
    x = logits.detach().to(device="cpu", dtype=torch.float32) / t
    # neginf must be given: nan_to_num's default maps -inf to -FLT_MAX, which would give a row
    # without finite logits a uniform law instead of no mass.
    x = torch.nan_to_num(x, nan=float("-inf"), posinf=torch.finfo(torch.float32).max, neginf=float("-inf"))
    return torch.softmax(x.double(), dim=-1)


def markov_draft_reference(
    base_logits: torch.Tensor,
    prev_token_ids: torch.Tensor,
    markov_w1: torch.Tensor,
    markov_w2: torch.Tensor,
    temperature: torch.Tensor,
    seed: torch.Tensor,
    offset: torch.Tensor,
    conf_base: Optional[torch.Tensor] = None,
    conf_w_prev: Optional[torch.Tensor] = None,
    conf_temperature: Optional[torch.Tensor] = None,
    *,
    forced_tokens: Optional[torch.Tensor] = None,
    generator: Optional[torch.Generator] = None,
    variant: str = MARKOV_EXACT,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Same arguments and outputs as ``torch.ops.dspark.markov_draft`` (outputs on CPU):
    ``(draft_token_ids [B, K] int64, draft_logits [B, K, V] in base_logits' dtype,
    confidence [B, K] float32 or [0] without conf_base)``.

    Position k (x_0 = prev_token_ids): ``a = float32(W1[x_{k-1}])``,
    ``l = round_to_dtype(float32(U_k) + a @ float32(W2).T)``; greedy rows (``not T > 0``) take
    ``greedy_tokens(l)``, the others draw from ``markov_probabilities(l, T)`` (a row without
    mass answers 0); ``confidence = sigmoid((conf_base_k + a . conf_w_prev) / conf_temperature_k)``.
    The float32 bias is summed in matmul order, the op's order is unspecified: equal up to
    rounding, and bitwise equal when every product and partial sum is exact (e.g. small
    integer weights).

    ``seed`` and ``offset`` are accepted for signature compatibility and ignored: the draws
    come from ``generator`` (torch's default generator when None) and do not reproduce the
    op's Philox streams. ``forced_tokens`` [B, K], when given, replaces the chosen tokens
    (and is returned as draft_token_ids), so position k conditions on ``forced_tokens[:, k-1]``:
    teacher forcing, or replaying the op's own sampled tokens to check its logits and
    confidence. ``variant=MARKOV_DROPPED`` is the broken drafter of the power checks (the
    confidence keeps its previous-token term). Inputs are assumed valid (no argument checking).
    """
    if variant not in MARKOV_VARIANTS:
        raise ValueError(f"unknown variant {variant!r}, expected one of {MARKOV_VARIANTS}")
    del seed, offset
    base = base_logits.detach().cpu()
    num_requests, num_draft, vocab_size = base.shape
    w1, w2 = markov_w1.detach().cpu(), markov_w2.detach().cpu()
    temps = temperature.detach().cpu().float()
    greedy = ~(temps > 0)  # NaN temperatures are greedy too
    sampling_temps = torch.where(greedy, torch.ones_like(temps), temps)
    prev = prev_token_ids.detach().cpu().long()

    token_ids = torch.zeros(num_requests, num_draft, dtype=torch.int64)
    logits = torch.empty(num_requests, num_draft, vocab_size, dtype=base.dtype)
    confidence = torch.empty((num_requests, num_draft) if conf_base is not None else (0,), dtype=torch.float32)
    for k in range(num_draft):
        a = w1[prev].float()
        bias = a @ w2.float().T if variant == MARKOV_EXACT else 0.0
        row_logits = (base[:, k].float() + bias).to(base.dtype)
        logits[:, k] = row_logits
        probs = markov_probabilities(row_logits, sampling_temps)
        no_mass = torch.isnan(probs).any(dim=-1)
        probs[no_mass] = 0.0
        probs[no_mass, 0] = 1.0  # a row without mass answers 0
        drawn = torch.multinomial(probs, 1, generator=generator)[:, 0]
        chosen = torch.where(greedy, greedy_tokens(row_logits), drawn)
        if forced_tokens is not None:
            chosen = forced_tokens[:, k].detach().cpu().long()
        token_ids[:, k] = chosen
        if conf_base is not None:
            z = conf_base[:, k].detach().cpu().float()
            if conf_w_prev is not None:
                z = z + a @ conf_w_prev.detach().cpu().float()
            if conf_temperature is not None:
                z = z / conf_temperature[k].detach().cpu().float()
            confidence[:, k] = torch.sigmoid(z)
        prev = chosen
    return token_ids, logits, confidence


#: Fixed-point resolution of the expected accepted tokens tau in ``dspark::schedule``.
TAU_SCALE = 2**40


def _survival_and_caps(confidence: torch.Tensor, max_len: Optional[torch.Tensor]) -> Tuple[torch.Tensor, List[int]]:
    """Survival ``a[r, j] = prod_{i<=j} c[r, i]`` rounded to float32 after every product (the
    kernels' order), over confidences read like the CUDA kernel does (NaN -> 0, clamped to [0, 1]),
    and each request's cap ``clamp(max_len, 0, K)``."""
    c = torch.nan_to_num(confidence.detach().cpu().float(), nan=0.0).clamp(0.0, 1.0)
    num_requests, num_draft = c.shape
    survival = c.clone()
    for j in range(1, num_draft):
        survival[:, j] = survival[:, j - 1] * c[:, j]
    if max_len is None:
        caps = [num_draft] * num_requests
    else:
        caps = [min(max(int(m), 0), num_draft) for m in max_len.detach().cpu().tolist()]
    return survival, caps


def _throughput(tau_fixed: int, sps_value: float) -> float:
    """Theta = tau * SPS(B) in float64, tau in 2^-40 units (the kernels' exact arithmetic)."""
    return float(tau_fixed) * 2.0**-40 * sps_value


def _greedy_admission_path(confidence, sps, max_len):
    """DSpark Algorithm 1's candidates in admission order and Theta after admitting each:
    ``(candidates [(r, j)], thetas [float], theta_0)``; the path ends at the largest admissible
    batch (N tokens)."""
    survival, caps = _survival_and_caps(confidence, max_len)
    num_requests = survival.shape[0]
    steps_per_second = sps.detach().cpu().double().tolist()
    max_batch = len(steps_per_second) - 1
    if num_requests > max_batch:
        raise ValueError(f"sps covers batches up to {max_batch} tokens, fewer than R = {num_requests}")
    # Candidate space E = {(r, j) : a[r, j] > 0}, descending a, ties: lower request, lower position.
    candidates = sorted(
        (-float(survival[r, j]), r, j) for r in range(num_requests) for j in range(caps[r]) if survival[r, j] > 0
    )
    tau = num_requests * TAU_SCALE
    theta_0 = _throughput(tau, steps_per_second[num_requests]) if num_requests else 0.0
    path, thetas = [], []
    for position, (negative_survival, r, j) in enumerate(candidates):
        batch = num_requests + position + 1
        if batch > max_batch:
            break
        tau += int(-negative_survival * TAU_SCALE)  # truncation, like the kernels
        path.append((r, j))
        thetas.append(_throughput(tau, steps_per_second[batch]))
    return path, thetas, theta_0


def schedule_reference(
    confidence: torch.Tensor, sps: torch.Tensor, max_len: Optional[torch.Tensor] = None, *, early_stop: bool = True
) -> torch.Tensor:
    """DSpark Algorithm 1, line by line: ``num_draft`` [R] int32 like ``torch.ops.dspark.schedule``.

    Admits candidates in descending survival while Theta = tau * SPS(B) strictly improves and
    stops at the first one that does not. ``early_stop=False`` is the *broken* global search of
    DSpark appendix A (keep scanning, return the best Theta seen), which leaks the drafted
    tokens into their own admission; it exists so the losslessness test can show it fails."""
    num_requests = confidence.shape[0]
    path, thetas, best = _greedy_admission_path(confidence, sps, max_len)
    lengths = [0] * num_requests
    best_lengths = list(lengths)
    for (r, j), theta in zip(path, thetas):
        lengths[r] = j + 1
        if theta > best:
            best, best_lengths = theta, list(lengths)
        elif early_stop:
            break
    return torch.tensor(best_lengths, dtype=torch.int32)


def schedule_async_reference(
    confidence: torch.Tensor,
    lagged_confidence: torch.Tensor,
    sps: torch.Tensor,
    max_len: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """The asynchronous scheduler of DSpark Sec. 5.2, plainly: the budget is the batch size
    B* = R' + drafts that the global search (no early stop) picks on ``lagged_confidence`` [R', K']
    (scores from an earlier step, independent of the current drafts); the current candidates
    are then admitted in descending current survival, up to B* - R drafts."""
    lagged_batch = lagged_confidence.shape[0] + int(schedule_reference(lagged_confidence, sps, early_stop=False).sum())
    num_requests = confidence.shape[0]
    budget = max(lagged_batch - num_requests, 0)
    path, _, _ = _greedy_admission_path(confidence, sps, max_len)
    lengths = [0] * num_requests
    for r, j in path[:budget]:
        lengths[r] = j + 1
    return torch.tensor(lengths, dtype=torch.int32)


def cached_attention_reference(query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                               cu_seqlens: torch.Tensor, context_lengths: torch.Tensor, scale: float,
                               causal: bool = True) -> torch.Tensor:
    """``torch.ops.dspark.cached_attention`` in float64, one query row at a time: row t of request
    b attends to keys ``0 .. context_lengths[b] + t`` (``causal=False``: to the whole step, a
    deliberately wrong mask for tests that must tell it apart). Returns [T, H, D] float64."""
    T, H, D = query.shape
    group = H // key_cache.shape[1]
    out = torch.empty(T, H, D, dtype=torch.float64)
    for b in range(key_cache.shape[0]):
        first, rows = int(cu_seqlens[b]), int(cu_seqlens[b + 1] - cu_seqlens[b])
        for t in range(rows):
            seen = int(context_lengths[b]) + (t + 1 if causal else rows)
            keys = key_cache[b, :, :seen].double().repeat_interleave(group, 0)  # [H, seen, D]
            values = value_cache[b, :, :seen].double().repeat_interleave(group, 0)
            weights = (torch.einsum("hd,hkd->hk", query[first + t].double(), keys) * scale).softmax(-1)
            out[first + t] = torch.einsum("hk,hkd->hd", weights, values)
    return out
