"""The speculative generation loop: any ``Target`` plus any ``Drafter`` (dspark_ext/protocols.py).

One round, for every unfinished request b (finished requests send nothing):

1. the drafter proposes K tokens (skipped when K = 0: plain autoregressive decoding);
2. n_b of them are kept: K capped by the tokens left (``max_new - generated - 1``), or, with a
   draft confidence and an ``sps`` table, what ``dspark::schedule`` chooses under those caps;
3. the target runs once over the packed ``[anchor_b, drafts_b[:n_b]]``;
4. ``dspark::verify`` accepts a prefix of the drafts and picks one more token (the correction
   or the bonus), so every round emits 1 .. n_b + 1 tokens; the last one is the new anchor;
5. the target's cache is rewound to its length before the round + 1 + accepted drafts (the
   anchor and the accepted drafts stay, the rejected ones go; the new anchor is not in it yet).

Randomness is keyed, never drawn from a global generator: request b uses ``seed[b]`` and, as
``offset``, the number of tokens it has generated so far (distinct in every round, since every
round emits at least one token), for verify and for the drafter alike. The first token comes
from the prompt's last row through the same ``dspark::verify`` (no drafts, offset 0). Hence a
request's tokens depend only on its own prompt, seed, temperature and budget, never on the
rest of the batch, and at temperature > 0 they follow the target's own sampling law exactly.
"""

import time
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Sequence, Union

import torch

from dspark_ext.protocols import Draft, DraftContext, Drafter, Target

PerRequestInt = Union[int, Sequence[int]]
PerRequestFloat = Union[float, Sequence[float]]


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
    conditional denominator), and those accepted. Times in seconds (``time.perf_counter``,
    CUDA synchronised): ``time_target`` (prefill and forwards; ``time_prefill`` is the
    prefill's share), ``time_draft`` (the drafter), ``time_overhead`` (everything else:
    scheduling, verify, packing, bookkeeping, rewinds, callbacks)."""

    tokens: List[torch.Tensor]
    num_rounds: int = 0
    target_forwards: int = 0
    request_forwards: int = 0
    accepted_lengths: List[torch.Tensor] = field(default_factory=list)
    position_verified: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.int64))
    position_reached: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.int64))
    position_accepted: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.int64))
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
        return (
            f"{self.num_generated} tokens, {self.num_rounds} rounds, {self.target_forwards} target forwards, "
            f"{self.mean_accepted_length:.2f} tokens/forward, acceptance per position [{rate}]; "
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


def generate(
    target: Target,
    drafter: Drafter,
    prompts: Sequence[torch.Tensor],
    max_new_tokens: PerRequestInt,
    temperature: PerRequestFloat = 0.0,
    seed: PerRequestInt = 0,
    *,
    eos_token_id: Optional[Union[int, Sequence[int]]] = None,
    sps: Optional[torch.Tensor] = None,
    on_tokens: Optional[Callable[[int, torch.Tensor], None]] = None,
) -> GenerationResult:
    """Generates up to ``max_new_tokens`` tokens after each prompt with ``target``, drafting with
    ``drafter``. ``prompts``: 1-D int64 token ids (lengths may differ, at least one token each);
    ``max_new_tokens``, ``temperature`` (0 = greedy) and ``seed`` are one value or one per
    request (an int seed gives request b the seed ``seed + b``). A request stops after
    ``eos_token_id`` (one id or several) or after ``max_new_tokens`` tokens. ``sps`` (the
    target's steps-per-second table, ``dspark_ext.profile_sps``) lets ``dspark::schedule`` pick
    the draft lengths when the drafter reports confidences (it must cover a batch of at least
    the unfinished requests: ``sps.numel() - 1 >= B``). ``on_tokens(b, new_ids)`` is called with
    each request's newly emitted tokens, in order (streaming).

    The drafter is called on all B requests every round (a stable row per request, like the
    target's cache slots; finished requests' drafts are ignored), and not at all in a round
    where no request may verify a draft (every cap is 0)."""
    device = torch.device(target.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def clock() -> float:
        sync()
        return time.perf_counter()

    B = len(prompts)
    if B == 0:
        return GenerationResult(tokens=[])
    K = int(drafter.num_draft)
    prompts = [torch.as_tensor(p, dtype=torch.int64).reshape(-1) for p in prompts]
    prompt_lengths = torch.tensor([p.numel() for p in prompts], dtype=torch.int64)
    if int(prompt_lengths.min()) < 1:
        raise ValueError("every prompt needs at least one token")
    max_new = _per_request(max_new_tokens, B, torch.int64, "cpu", "max_new_tokens")
    if int(max_new.min()) < 0:
        raise ValueError("max_new_tokens must be >= 0")
    temperatures = _per_request(temperature, B, torch.float32, device, "temperature")
    if _is_sequence(seed):
        seeds = _per_request(seed, B, torch.int64, device, "seed")
    else:  # one seed: request b uses seed + b
        seeds = int(seed) + torch.arange(B, dtype=torch.int64, device=device)
    eos = None if eos_token_id is None else torch.as_tensor(eos_token_id, dtype=torch.int64, device=device).reshape(-1)

    result = GenerationResult(
        tokens=[],
        position_verified=torch.zeros(K, dtype=torch.int64, device=device),
        position_reached=torch.zeros(K, dtype=torch.int64, device=device),
        position_accepted=torch.zeros(K, dtype=torch.int64, device=device),
    )
    t_start = clock()

    # ---------------------------------------------------------------- state
    # sequence[b, :seq_len[b]] = prompt + generated tokens (the anchor last); the target's
    # cache holds all of it but the anchor.
    max_new_dev = max_new.to(device)
    seq_len = prompt_lengths.to(device).clone()
    capacity = int((prompt_lengths + max_new).max()) + 1
    sequence = torch.zeros(B, capacity, dtype=torch.int64, device=device)
    prompt_mask = torch.arange(capacity)[None] < prompt_lengths[:, None]
    sequence[prompt_mask.to(device)] = torch.cat(prompts).to(device)
    generated = torch.zeros(B, dtype=torch.int64, device=device)
    done = max_new_dev == 0
    positions = torch.arange(K + 1, device=device)
    row_index = torch.arange(B, device=device)

    def emit(out_tokens: torch.Tensor, count: torch.Tensor, rows: torch.Tensor) -> None:
        """Appends out_tokens[i, :count[i]] to request rows[i]: truncated after an eos; updates
        sequence, seq_len, generated and done, and streams the new tokens."""
        width = out_tokens.shape[1]
        valid = torch.arange(width, device=device)[None] < count[:, None]
        if eos is not None:
            is_eos = torch.isin(out_tokens, eos) & valid
            first_eos = torch.where(is_eos, torch.arange(width, device=device)[None], width).amin(1)
            count = torch.minimum(count, first_eos + 1)
            valid = torch.arange(width, device=device)[None] < count[:, None]
            hit_eos = first_eos < width
        else:
            hit_eos = torch.zeros_like(count, dtype=torch.bool)
        columns = (seq_len[rows][:, None] + torch.arange(width, device=device)[None])[valid]
        sequence[rows[:, None].expand(-1, width)[valid], columns] = out_tokens[valid]
        seq_len[rows] += count
        generated[rows] += count
        done[rows] |= hit_eos | (generated[rows] >= max_new_dev[rows])
        if on_tokens is not None:
            counts = count.tolist()
            starts = (seq_len[rows] - count).tolist()
            for i, b in enumerate(rows.tolist()):
                if counts[i]:
                    on_tokens(b, sequence[b, starts[i]:starts[i] + counts[i]].cpu())

    # ---------------------------------------------------------------- prefill: first token
    t0 = clock()
    prefill = target.start(prompts)
    result.time_prefill = clock() - t0
    result.time_target += result.time_prefill
    result.target_forwards += 1
    result.request_forwards += B
    last_rows = (torch.cumsum(prompt_lengths, 0) - 1).to(device)
    # features[b, j] = the target's features of token j of request b (what DSpark drafters read;
    # the anchor's predecessor row is the context's anchor_hidden); features_shown[b] = how many
    # of them the drafter has been given so far.
    features = None
    if prefill.hidden_states is not None:
        features = prefill.hidden_states.new_zeros(B, capacity, prefill.hidden_states.shape[-1])
        features[prompt_mask.to(device)] = prefill.hidden_states
    features_shown = torch.zeros(B, dtype=torch.int64, device=device)
    zeros_b = torch.zeros(B, dtype=torch.int32, device=device)
    first, _ = torch.ops.dspark.verify(
        prefill.logits[last_rows], torch.zeros(0, dtype=torch.int64, device=device), None, _cumsum0(zeros_b),
        temperatures, seeds, generated.clone(), 0)
    starting = ~done
    emit(first[starting], torch.ones(int(starting.sum()), dtype=torch.int64, device=device), row_index[starting])
    del prefill

    # ---------------------------------------------------------------- rounds
    while not bool(done.all()):
        active = ~done
        rows = row_index[active]
        caps = torch.where(active, (max_new_dev - generated - 1).clamp(0, K), 0)
        anchors = sequence[row_index, seq_len - 1]

        t0 = clock()
        draft = None
        if K > 0 and bool((caps > 0).any()):
            anchor_hidden = None if features is None else features[row_index, (seq_len - 2).clamp(min=0)]
            draft = drafter.propose(DraftContext(
                tokens=sequence[:, :int(seq_len.max())], lengths=seq_len.clone(), anchor_hidden=anchor_hidden,
                temperature=temperatures, seed=seeds, offset=generated.clone(),
                hidden_states=None if features is None else features[:, :int(seq_len.max())],
                new_from=features_shown.clone()))
            features_shown = seq_len - 1  # the drafter sees every row, finished ones included
            if tuple(draft.token_ids.shape) != (B, K):
                raise ValueError(f"the drafter proposed {list(draft.token_ids.shape)} tokens, expected [{B}, {K}]")
        result.time_draft += clock() - t0

        # How many drafts each request sends.
        if draft is None:
            num_draft = torch.zeros(B, dtype=torch.int64, device=device)
            draft = Draft(token_ids=torch.zeros(B, K, dtype=torch.int64, device=device))
        elif draft.confidence is not None and sps is not None:
            num_draft = torch.zeros(B, dtype=torch.int64, device=device)
            num_draft[active] = torch.ops.dspark.schedule(
                draft.confidence[active].float().contiguous(), sps.to(device=device, dtype=torch.float32),
                caps[active].to(torch.int32)).long()
        elif draft.confidence is not None:
            # Without a capacity table only drafts that can be accepted are sent: a draft of zero
            # confidence (e.g. prompt lookup without a match) ends the request's run.
            viable = (draft.confidence > 0).long().cumprod(1).sum(1)
            num_draft = torch.minimum(caps, viable)
        else:
            num_draft = caps

        # Pack [anchor, drafts[:n]] per active request (finished requests: empty segments).
        segment = torch.where(active, num_draft + 1, 0)
        candidates = torch.cat([anchors[:, None], draft.token_ids.to(torch.int64)], dim=1)
        packed = candidates[positions[None] < segment[:, None]]
        cu_seqlens = _cumsum0(segment)
        target_length_before = target.lengths().to(device)

        t0 = clock()
        out = target.forward(packed, cu_seqlens)
        result.time_target += clock() - t0
        result.target_forwards += 1
        result.request_forwards += int(rows.numel())
        result.num_rounds += 1

        # Verify over the active requests only: their rows are exactly the packed output.
        draft_mask = positions[None, :K] < num_draft[:, None]
        draft_ids = draft.token_ids.to(torch.int64)[draft_mask]
        target_logits = out.logits
        draft_logits = None if draft.logits is None else draft.logits[draft_mask]
        if draft_logits is not None and draft_logits.dtype != target_logits.dtype:
            # Widening float16/bfloat16 to float32 is exact: p and q stay what they were.
            target_logits, draft_logits = target_logits.float(), draft_logits.float()
        n_active = num_draft[rows]
        output, num_accepted = torch.ops.dspark.verify(
            target_logits, draft_ids, draft_logits, _cumsum0(n_active), temperatures[rows], seeds[rows],
            generated[rows], K)
        num_accepted = num_accepted.long()

        if out.hidden_states is not None:
            if features is None:
                features = out.hidden_states.new_zeros(B, capacity, out.hidden_states.shape[-1])
            # The anchor and the accepted drafts are now context: their rows keep their features.
            kept = positions[None] <= num_accepted[:, None]  # [R, K + 1]
            src = (cu_seqlens[:-1][rows].long()[:, None] + positions[None])[kept]
            dst = (seq_len[rows][:, None] - 1 + positions[None])[kept]
            features[rows[:, None].expand(-1, K + 1)[kept], dst] = out.hidden_states[src]

        # Rewind: keep the anchor and the accepted drafts.
        new_lengths = target_length_before.clone()
        new_lengths[rows] += 1 + num_accepted
        target.rewind(new_lengths)

        # Statistics.
        accepted_round = torch.full((B,), -1, dtype=torch.int64, device=device)
        accepted_round[rows] = num_accepted
        result.accepted_lengths.append(accepted_round.cpu())
        if K > 0:
            k = positions[None, :K]
            result.position_verified += (k < n_active[:, None]).sum(0)
            result.position_reached += ((k < n_active[:, None]) & (k <= num_accepted[:, None])).sum(0)
            result.position_accepted += (k < num_accepted[:, None]).sum(0)

        emit(output, num_accepted + 1, rows)

    # ---------------------------------------------------------------- results
    seq_len_cpu, sequence_cpu = seq_len.cpu(), sequence.cpu()
    result.tokens = [sequence_cpu[b, int(prompt_lengths[b]):int(seq_len_cpu[b])].clone() for b in range(B)]
    for name in ("position_verified", "position_reached", "position_accepted"):
        setattr(result, name, getattr(result, name).cpu())
    result.time_total = clock() - t_start
    result.time_overhead = result.time_total - result.time_target - result.time_draft
    return result
