"""Shared test helpers for dspark::verify: random ragged batches, output-format checks,
exact speculative-sampling distributions and the statistical (chi-square + total
variation) distribution check used for the op and for the deliberately broken samplers.
The last section holds the dspark::markov_draft counterparts (inputs, reference runs,
exact sequence laws)."""

import itertools
import math
import subprocess
import sys
from dataclasses import dataclass, fields, replace
from typing import List, Optional, Sequence, Union

import pytest
import torch

from dspark_ext.reference import (
    MARKOV_EXACT,
    greedy_tokens,
    markov_draft_reference,
    markov_probabilities,
    probabilities,
    verify_reference,
)

verify_op = torch.ops.dspark.verify.default

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
ID_DTYPES = (torch.int32, torch.int64)
#: The op processes the vocabulary in tiles of this many ids (csrc/core/sampling.h).
VOCAB_TILE = 2048

cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


# --------------------------------------------------------------------------- batches


@dataclass
class Batch:
    """The eight arguments of dspark::verify, in schema order."""

    target_logits: torch.Tensor
    draft_token_ids: torch.Tensor
    draft_logits: Optional[torch.Tensor]
    cu_num_draft: torch.Tensor
    temperature: torch.Tensor
    seed: torch.Tensor
    offset: torch.Tensor
    max_num_draft: int

    def args(self) -> tuple:
        return (
            self.target_logits,
            self.draft_token_ids,
            self.draft_logits,
            self.cu_num_draft,
            self.temperature,
            self.seed,
            self.offset,
            self.max_num_draft,
        )

    @property
    def lengths(self) -> List[int]:
        return torch.diff(self.cu_num_draft.cpu()).tolist()

    @property
    def num_requests(self) -> int:
        return self.cu_num_draft.shape[0] - 1

    @property
    def vocab_size(self) -> int:
        return self.target_logits.shape[1]

    def to(self, device) -> "Batch":
        """Copy to ``device``; keeps a strided row layout (rows of a wider buffer) strided."""

        def move(t):
            if t is None:
                return None
            if t.dim() == 2 and t.stride(0) == 0:  # broadcast rows stay broadcast
                return t[:1].to(device).expand(t.shape)
            if t.dim() == 2 and t.stride(0) != t.shape[1] and t.stride(1) == 1 and t.stride(0) > 0:
                wide = torch.empty(t.shape[0], t.stride(0), dtype=t.dtype, device=device)
                wide[:, : t.shape[1]] = t.to(device)
                return wide[:, : t.shape[1]]
            return t.to(device)

        return Batch(*(move(a) if isinstance(a, torch.Tensor) else a for a in self.args()))

    def request(self, b: int) -> "Batch":
        """Request b alone, as a batch of one (same rows, same seed and offset)."""
        cu = self.cu_num_draft.cpu().tolist()
        begin, end = cu[b], cu[b + 1]
        return Batch(
            self.target_logits[begin + b : end + b + 1],
            self.draft_token_ids[begin:end],
            None if self.draft_logits is None else self.draft_logits[begin:end],
            torch.tensor([0, end - begin], dtype=torch.int32, device=self.cu_num_draft.device),
            self.temperature[b : b + 1],
            self.seed[b : b + 1],
            self.offset[b : b + 1],
            self.max_num_draft,
        )

    def select(self, order: Sequence[int]) -> "Batch":
        """A new batch holding requests ``order`` (in that order, repeats allowed)."""
        parts = [self.request(b) for b in order]
        device = self.cu_num_draft.device
        lengths = [p.draft_token_ids.shape[0] for p in parts]
        cu = torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32)
        return Batch(
            torch.cat([p.target_logits for p in parts]),
            torch.cat([p.draft_token_ids for p in parts]),
            None if self.draft_logits is None else torch.cat([p.draft_logits for p in parts]),
            cu.to(device),
            torch.cat([p.temperature for p in parts]),
            torch.cat([p.seed for p in parts]),
            torch.cat([p.offset for p in parts]),
            self.max_num_draft,
        )


def make_batch(
    lengths: Sequence[int],
    vocab_size: int,
    *,
    dtype: torch.dtype = torch.float32,
    id_dtype: torch.dtype = torch.int64,
    temperature: Union[float, Sequence[float]] = 0.0,
    draft_logits: bool = False,
    strided: bool = False,
    max_num_draft: Optional[int] = None,
    p_draft_is_argmax: float = 0.7,
    logit_scale: float = 3.0,
    draft_noise: float = 1.0,
    integer_logits: bool = False,
    seed: int = 0,
    device: str = "cpu",
) -> Batch:
    """A random ragged batch with ``len(lengths)`` requests (lengths may be 0).

    Greedy requests (T = 0) draft the target's argmax with probability
    ``p_draft_is_argmax``, else a uniform random id, so both accepts and rejects happen.
    Sampled requests (T > 0) with ``draft_logits`` draw each draft token from
    softmax(draft_logits / T), where draft_logits = target + ``draft_noise`` * noise; one-hot
    drafts (``draft_logits=False``) use the greedy construction. ``strided`` stores the
    logits as the left part of wider buffers (``big[:, :V]``). ``integer_logits`` rounds the
    logits to integers, so rows hold many exactly tied maxima (greedy tie rule).
    """
    g = torch.Generator().manual_seed(seed)
    num_requests = len(lengths)
    num_drafts = int(sum(lengths))
    temps = [float(temperature)] * num_requests if isinstance(temperature, (int, float)) else [float(t) for t in temperature]
    assert len(temps) == num_requests
    cu = torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32)

    def logits(rows: int) -> torch.Tensor:
        width = vocab_size + (37 if strided else 0)
        big = torch.randn(rows, width, generator=g) * logit_scale
        big = (big.round() if integer_logits else big).to(dtype)
        return big[:, :vocab_size]

    target = logits(num_drafts + num_requests)
    drafts = None
    if draft_logits:
        drafts = logits(num_drafts)
        drafts.copy_((target[_draft_rows_to_target_rows(lengths)].float()
                      + draft_noise * torch.randn(num_drafts, vocab_size, generator=g)).to(dtype))
    greedy = greedy_tokens(target).tolist()
    ids = []
    for b, length in enumerate(lengths):
        for k in range(length):
            d = int(cu[b]) + k
            row = int(cu[b]) + b + k
            if temps[b] > 0 and drafts is not None:
                q = probabilities(drafts[d], temps[b])
                ids.append(int(torch.multinomial(q, 1, generator=g)))
            elif float(torch.rand((), generator=g)) < p_draft_is_argmax:
                ids.append(greedy[row])
            else:
                ids.append(int(torch.randint(vocab_size, (), generator=g)))
    batch = Batch(
        target,
        torch.tensor(ids, dtype=id_dtype),
        drafts,
        cu,
        torch.tensor(temps, dtype=torch.float32),
        torch.randint(0, 2**62, (num_requests,), generator=g, dtype=torch.int64),
        torch.randint(0, 2**40, (num_requests,), generator=g, dtype=torch.int64),
        max(lengths, default=0) if max_num_draft is None else max_num_draft,
    )
    return batch if device == "cpu" else batch.to(device)


def _draft_rows_to_target_rows(lengths: Sequence[int]) -> torch.Tensor:
    rows, begin = [], 0
    for b, length in enumerate(lengths):
        rows += [begin + b + k for k in range(length)]
        begin += length
    return torch.tensor(rows, dtype=torch.int64)


def repeated_request_batch(
    target_rows: torch.Tensor,
    draft_rows: Optional[torch.Tensor],
    draft_ids: torch.Tensor,
    temperature: float,
    *,
    seed: Optional[torch.Tensor] = None,
    offset: Optional[torch.Tensor] = None,
    broadcast: bool = False,
) -> Batch:
    """N requests with identical rows: request i has the L drafts ``draft_ids[i]`` ([N, L]),
    target rows ``target_rows`` ([L + 1, V]) and draft rows ``draft_rows`` ([L, V] or None).
    Seeds default to 0..N-1 (offsets to 0), so the requests are independent samples.
    ``broadcast`` (L + 1 == 1 target row, or all rows equal) uses stride-0 rows instead of copies."""
    num, length = draft_ids.shape
    vocab = target_rows.shape[1]
    if broadcast:
        _assert_rows_equal(target_rows)
        target = target_rows[:1].expand(num * (length + 1), vocab)
        drafts = None
        if draft_rows is not None:
            _assert_rows_equal(draft_rows)
            drafts = draft_rows[:1].expand(num * length, vocab)
    else:
        target = target_rows.repeat(num, 1)
        drafts = None if draft_rows is None else draft_rows.repeat(num, 1)
    device = target_rows.device
    return Batch(
        target,
        draft_ids.reshape(-1).to(device),
        drafts,
        (torch.arange(num + 1, dtype=torch.int32) * length).to(device),
        torch.full((num,), temperature, dtype=torch.float32, device=device),
        torch.arange(num, dtype=torch.int64, device=device) if seed is None else seed.to(device),
        torch.zeros(num, dtype=torch.int64, device=device) if offset is None else offset.to(device),
        length,
    )


def _assert_rows_equal(rows: torch.Tensor) -> None:
    torch.testing.assert_close(rows, rows[:1].expand_as(rows), rtol=0, atol=0, equal_nan=True)


def run_op(batch: Batch):
    return verify_op(*batch.args())


def run_reference(batch: Batch, seed: int = 0, rule: str = "exact"):
    return verify_reference(*batch.args(), generator=torch.Generator().manual_seed(seed), rule=rule)


# --------------------------------------------------------------------------- output checks


def check_output_format(batch: Batch, output: torch.Tensor, num_accepted: torch.Tensor) -> None:
    """Structural contract of the outputs: shapes/dtypes, accepted prefix == the drafts,
    exactly one emitted id in [0, V), then -1 padding."""
    B, width, V = batch.num_requests, batch.max_num_draft + 1, batch.vocab_size
    assert output.shape == (B, width) and output.dtype == torch.int64, (output.shape, output.dtype)
    assert num_accepted.shape == (B,) and num_accepted.dtype == torch.int32, (num_accepted.shape, num_accepted.dtype)
    out, n = output.cpu(), num_accepted.cpu().long()
    lengths = torch.tensor(batch.lengths, dtype=torch.int64)
    assert bool(((n >= 0) & (n <= lengths)).all()), "num_accepted outside [0, L_b]"
    cols = torch.arange(width).expand(B, width)
    ids = batch.draft_token_ids.cpu().long()
    begin = batch.cu_num_draft.cpu().long()[:-1]
    accepted_cols = cols < n[:, None]
    draft_at = ids[(begin[:, None] + cols).clamp(max=max(ids.numel() - 1, 0))] if ids.numel() else torch.zeros_like(out)
    assert bool((out[accepted_cols] == draft_at[accepted_cols]).all()), "accepted prefix differs from the drafts"
    emitted = out.gather(1, n[:, None])[:, 0]
    assert bool(((emitted >= 0) & (emitted < V)).all()), f"emitted id outside [0, {V}): {emitted.tolist()}"
    assert bool((out[cols > n[:, None]] == -1).all()), "padding after the emitted token is not -1"


# --------------------------------------------------------------------------- exact distributions


def exact_probs(logits_row: torch.Tensor, temperature: float) -> torch.Tensor:
    """softmax(row / T) in float64 (op rules for NaN / +inf), from the row's stored values."""
    return probabilities(logits_row, temperature)


def joint_first_two_exact(p0: torch.Tensor, q0: torch.Tensor, p1: torch.Tensor) -> torch.Tensor:
    """Exact law of (output[:, 0], output[:, 1]) for a request with L >= 1 drafts, the draft
    at position 0 drawn from q0, and fixed target rows p0, p1 (rows do not depend on x0).

    Position 0 emits a accepted with probability min(p0(a), q0(a)); then output[:, 1] ~ p1
    (lossless at position 1, whatever happens after). A rejection at 0 emits a correction
    with probability max(0, p0(a) - q0(a)) and output[:, 1] = -1.
    Returned as a [V, V + 1] matrix, column 0 = (a, -1), column b + 1 = (a, b).
    """
    V = p0.numel()
    joint = torch.zeros(V, V + 1, dtype=torch.float64)
    joint[:, 0] = (p0 - q0).clamp(min=0)
    joint[:, 1:] = torch.minimum(p0, q0)[:, None] * p1[None, :]
    return joint


def joint_codes(output: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Category code of (output[:, 0], output[:, 1]) matching joint_first_two_exact().flatten()."""
    out = output.cpu()
    return out[:, 0] * (vocab_size + 1) + (out[:, 1] + 1)


def acceptance_length_exact(ps: Sequence[torch.Tensor], qs: Sequence[torch.Tensor]) -> torch.Tensor:
    """Exact law of num_accepted for drafts x_k ~ q_k against rows p_k (k < L): position k
    accepts with probability alpha_k = sum_x min(p_k(x), q_k(x))."""
    alphas = [float(torch.minimum(p, q).sum()) for p, q in zip(ps, qs)]
    law, survive = [], 1.0
    for alpha in alphas:
        law.append(survive * (1.0 - alpha))
        survive *= alpha
    law.append(survive)
    return torch.tensor(law, dtype=torch.float64)


# --------------------------------------------------------------------------- statistics


@dataclass
class DistributionCheck:
    ok: bool
    num_samples: int
    chi2_pvalue: float
    tv: float
    tv_bound: float
    impossible: int  # samples of categories with probability 0

    def __str__(self) -> str:
        return (
            f"N={self.num_samples} chi2 p-value={self.chi2_pvalue:.3g} TV={self.tv:.4f} (bound {self.tv_bound:.4f}) "
            f"impossible samples={self.impossible}"
        )


def merged_bins(counts: torch.Tensor, expected: torch.Tensor, min_expected: float = 5.0):
    """Groups categories, rarest first, until every group expects >= min_expected samples."""
    order = torch.argsort(expected)
    obs, exp = [], []
    acc_o = acc_e = 0.0
    for i in order.tolist():
        acc_o += float(counts[i])
        acc_e += float(expected[i])
        if acc_e >= min_expected:
            obs.append(acc_o)
            exp.append(acc_e)
            acc_o = acc_e = 0.0
    if acc_e > 0 or acc_o > 0:
        if exp:
            obs[-1] += acc_o
            exp[-1] += acc_e
        else:
            obs.append(acc_o)
            exp.append(acc_e)
    return obs, exp


def tv_bound(probs: torch.Tensor, num_samples: int, delta: float = 1e-4) -> float:
    """High-probability bound on the TV distance between N samples of ``probs`` and ``probs``:
    E[TV] <= 1/2 sum_i sqrt(p_i (1 - p_i) / N), and TV concentrates around its mean
    (McDiarmid: one sample moves it by <= 1/N), + sqrt(ln(1/delta) / 2N)."""
    p = probs.double()
    mean_bound = 0.5 * float(torch.sqrt(p * (1 - p) / num_samples).sum())
    return mean_bound + math.sqrt(math.log(1.0 / delta) / (2.0 * num_samples))


def chisquare_pvalue(observed: Sequence[float], expected: Sequence[float]) -> float:
    """Pearson's chi-square goodness-of-fit p-value (scipy.stats.chisquare's), with torch only so
    the tests need no scipy (the wheel smoke test runs them with torch, numpy and pytest): the
    chi-square survival function with k - 1 degrees of freedom is the regularized upper incomplete
    gamma function Q((k - 1) / 2, stat / 2)."""
    obs = torch.tensor(observed, dtype=torch.float64)
    exp = torch.tensor(expected, dtype=torch.float64)
    stat = ((obs - exp) ** 2 / exp).sum()
    dof = torch.tensor((obs.numel() - 1) / 2, dtype=torch.float64)
    return float(torch.special.gammaincc(dof, stat / 2))


def check_distribution(samples: torch.Tensor, probs: torch.Tensor, alpha: float = 1e-4) -> DistributionCheck:
    """Do integer ``samples`` (category codes in [0, K)) follow ``probs`` ([K])?
    Passes iff no sample hits a zero-probability category, the chi-square test (rare bins
    merged to expected >= 5) has p-value >= alpha, and TV <= tv_bound(probs, N, alpha)."""
    probs = probs.double().flatten().cpu()
    probs = probs / probs.sum()
    samples = samples.flatten().cpu().long()
    n = samples.numel()
    K = probs.numel()
    assert n > 0
    in_range = (samples >= 0) & (samples < K)
    impossible = int((~in_range).sum())
    counts = torch.bincount(samples[in_range], minlength=K).double()
    impossible += int(counts[probs == 0].sum())
    support = probs > 0
    obs, exp = merged_bins(counts[support], probs[support] * n)
    if len(obs) >= 2:
        # Rescale so both sums agree exactly; impossible samples are counted above.
        scale = sum(obs) / sum(exp) if sum(exp) > 0 else 1.0
        pvalue = chisquare_pvalue(obs, [e * scale for e in exp]) if sum(obs) > 0 else 0.0
    else:
        pvalue = 1.0  # a single category: only the impossible-sample count can fail
    tv = 0.5 * float((counts / n - probs).abs().sum()) + 0.5 * (n - float(counts.sum())) / n
    bound = tv_bound(probs, n, alpha)
    ok = impossible == 0 and pvalue >= alpha and tv <= bound
    return DistributionCheck(ok, n, pvalue, tv, bound, impossible)


def assert_matches_distribution(samples: torch.Tensor, probs: torch.Tensor, alpha: float = 1e-4) -> DistributionCheck:
    """The statistical check of every losslessness test (op and broken samplers alike)."""
    result = check_distribution(samples, probs, alpha)
    assert result.ok, f"samples do not follow the expected distribution: {result}"
    return result


def with_replaced(batch: Batch, **changes) -> Batch:
    return replace(batch, **changes)


# --------------------------------------------------------------------------- shared checks
# Used by the CPU tests and, with device="cuda", by tests/test_verify_cuda.py.

#: (lengths, vocab_size, dtype, id_dtype, strided[, integer_logits]) of the greedy-vs-reference cases.
GREEDY_CASES = [
    ([2, 3, 0, 4, 1, 2], 5000, torch.bfloat16, torch.int64, False, True),  # integer logits: tied maxima across tiles
    ([1, 2, 3, 0], 33, torch.float32, torch.int32, True, True),
    ([3, 0, 5, 1, 2, 0, 4], 1000, torch.float32, torch.int64, False),
    ([2, 4, 0, 1, 6, 3], 4099, torch.bfloat16, torch.int32, True),
    ([1, 1, 0, 7, 2], 2048, torch.float16, torch.int64, True),
    ([0, 3, 2, 5, 0, 0, 1], 6000, torch.float32, torch.int32, True),
    ([4, 0, 2, 3, 1, 5, 2, 2], 7, torch.bfloat16, torch.int64, False),  # tiny V: many ties
    ([2, 0, 3], 1, torch.float32, torch.int32, False),  # V = 1: every draft is accepted
    ([0, 0, 0], 300, torch.float16, torch.int64, False),  # no drafts at all: bonus only
    ([5, 2, 6, 1], 32003, torch.float32, torch.int64, True),  # 16 tiles
]


def greedy_case_id(case) -> str:
    lengths, vocab, dtype, id_dtype, strided, *ties = case
    return (f"V{vocab}-{str(dtype)[6:]}-{str(id_dtype)[6:]}-B{len(lengths)}{'-strided' if strided else ''}"
            f"{'-ties' if ties and ties[0] else ''}")


def greedy_case_batch(case, device: str = "cpu") -> Batch:
    lengths, vocab, dtype, id_dtype, strided, *ties = case
    batch = make_batch(lengths, vocab, dtype=dtype, id_dtype=id_dtype, strided=strided,
                       integer_logits=bool(ties and ties[0]), seed=vocab, device=device)
    if strided:
        assert batch.target_logits.stride(0) > vocab  # really a slice of a wider buffer
    return batch


def assert_greedy_matches_reference(batch: Batch) -> None:
    output, num_accepted = run_op(batch)
    check_output_format(batch, output, num_accepted)
    ref_output, ref_accepted = run_reference(batch)
    greedy = (batch.temperature.cpu() == 0)
    assert bool(greedy.any())
    torch.testing.assert_close(output.cpu()[greedy], ref_output[greedy], rtol=0, atol=0)
    torch.testing.assert_close(num_accepted.cpu()[greedy], ref_accepted[greedy], rtol=0, atol=0)


def assert_deterministic(batch: Batch) -> None:
    first = run_op(batch)
    second = run_op(batch)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])


def assert_batch_invariant(batch: Batch) -> None:
    """Each request's row is the same alone, inside the batch, and inside a reordered batch
    with repeats (other requests, other row positions)."""
    output, num_accepted = run_op(batch)
    check_output_format(batch, output, num_accepted)
    B = batch.num_requests
    for b in range(B):
        alone_out, alone_n = run_op(batch.request(b))
        assert torch.equal(alone_out[0], output[b]), (b, alone_out[0].tolist(), output[b].tolist())
        assert torch.equal(alone_n[0], num_accepted[b])
    order = list(range(B - 1, -1, -1)) + list(range(0, B, 2))
    shuffled_out, shuffled_n = run_op(batch.select(order))
    assert torch.equal(shuffled_out, output[order])
    assert torch.equal(shuffled_n, num_accepted[order])


def fraction_rows_differ(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a != b).any(dim=1).double().mean())


def sampled_stream_batch(num_requests: int = 2000, device: str = "cpu", draft_logits: bool = True) -> Batch:
    """Many requests at T = 1 over a flat-ish V = 64 vocabulary: two independent streams
    almost never emit the same row."""
    return make_batch([2] * num_requests, 64, temperature=1.0, draft_logits=draft_logits, logit_scale=0.5,
                      seed=11, device=device)


# --------------------------------------------------------------------------- lossless setups


@dataclass
class LosslessSetup:
    """N independent requests over the same rows (distinct seeds), their op/reference
    batch and the exact law of the quantity under test."""

    batch: Batch
    target_probs: List[torch.Tensor]  # p_k, k = 0..L
    draft_law: List[torch.Tensor]  # law of the draft token at k (q_k, or the one-hot proposal)
    one_hot: bool


def lossless_setup(
    length: int,
    vocab_size: int,
    temperature: float,
    one_hot: bool,
    *,
    num_samples: int = 100_000,
    dtype: torch.dtype = torch.float32,
    target_scale: float = 1.5,
    draft_scale: float = 1.5,
    seed: int = 0,
    device: str = "cpu",
    target_rows: Optional[torch.Tensor] = None,
    draft_rows: Optional[torch.Tensor] = None,
    broadcast: bool = False,
) -> LosslessSetup:
    """Target rows [L + 1, V] and draft rows [L, V] (random unless given: target * scale,
    draft = target + noise * draft_scale). Sampled drafts:
    x_k ~ softmax(draft_k / T), passed to the op with draft_logits. One-hot drafts: x_k is
    drawn from the same softmax(draft_k / T) but the op gets draft_logits=None."""
    g = torch.Generator().manual_seed(seed)
    if target_rows is None:
        target_rows = torch.randn(length + 1, vocab_size, generator=g) * target_scale
    if draft_rows is None:  # a draft model that roughly agrees with the target
        draft_rows = target_rows[:length] + torch.randn(length, vocab_size, generator=g) * draft_scale
    target_rows = target_rows.to(dtype)
    draft_rows = draft_rows.to(dtype)
    ps = [exact_probs(row, temperature) for row in target_rows]
    qs = [exact_probs(row, temperature) for row in draft_rows]
    ids = torch.stack([torch.multinomial(q, num_samples, replacement=True, generator=g) for q in qs], dim=1) \
        if length else torch.zeros(num_samples, 0, dtype=torch.int64)
    batch = repeated_request_batch(target_rows.to(device), None if one_hot else draft_rows.to(device), ids,
                                   temperature, broadcast=broadcast)
    return LosslessSetup(batch, ps, qs, one_hot)


def joint_first_two_law(setup: LosslessSetup) -> torch.Tensor:
    p0, r0, p1 = setup.target_probs[0], setup.draft_law[0], setup.target_probs[1]
    V = p0.numel()
    if not setup.one_hot:
        return joint_first_two_exact(p0, r0, p1)
    # One-hot draft x ~ r0: accepted with probability p0(x); a rejection of x emits a != x
    # with probability p0(a) / (1 - p0(x)), so P(correction = a) = p0(a) (1 - r0(a)).
    joint = torch.zeros(V, V + 1, dtype=torch.float64)
    joint[:, 0] = p0 * (1 - r0)
    joint[:, 1:] = (r0 * p0)[:, None] * p1[None, :]
    return joint


def acceptance_law(setup: LosslessSetup) -> torch.Tensor:
    if setup.one_hot:
        # min(p, one-hot_x) summed over the law of x: alpha_k = sum_x r_k(x) p_k(x).
        alphas_as_q = [r * p for p, r in zip(setup.target_probs, setup.draft_law)]
        law, survive = [], 1.0
        for a in alphas_as_q:
            alpha = float(a.sum())
            law.append(survive * (1 - alpha))
            survive *= alpha
        law.append(survive)
        return torch.tensor(law, dtype=torch.float64)
    return acceptance_length_exact(setup.target_probs[:-1], setup.draft_law)


# --------------------------------------------------------------------------- dspark::markov_draft
# Inputs, reference runs and exact sequence laws for tests/test_markov_draft.py and, with
# device="cuda", tests/test_markov_draft_cuda.py.

markov_op = torch.ops.dspark.markov_draft.default

#: Largest op-vs-reference difference of a corrected logit, by logits dtype: the float32 bias
#: is summed in another order (a few float32 ulps), and a 16-bit logit may then round to the
#: neighbouring value (one ulp of the dtype).
MARKOV_LOGIT_TOLERANCE = {
    torch.float32: dict(rtol=1e-5, atol=1e-4),
    torch.bfloat16: dict(rtol=2.0**-7, atol=1e-4),
    torch.float16: dict(rtol=2.0**-10, atol=1e-4),
}
#: Confidence: float32 dot product in another order, then a sigmoid (expf vs torch).
MARKOV_CONFIDENCE_TOLERANCE = dict(rtol=1e-5, atol=1e-6)


@dataclass
class MarkovInputs:
    """The ten arguments of dspark::markov_draft, in schema order."""

    base_logits: torch.Tensor  # [B, K, V]
    prev_token_ids: torch.Tensor  # [B] int64
    markov_w1: torch.Tensor  # [V, r]
    markov_w2: torch.Tensor  # [V, r]
    temperature: torch.Tensor  # [B] float32
    seed: torch.Tensor  # [B] int64
    offset: torch.Tensor  # [B] int64
    conf_base: Optional[torch.Tensor] = None  # [B, K] float32
    conf_w_prev: Optional[torch.Tensor] = None  # [r] float32
    conf_temperature: Optional[torch.Tensor] = None  # [K] float32

    #: Arguments with one entry per request (dim 0 = B).
    PER_REQUEST = ("base_logits", "prev_token_ids", "temperature", "seed", "offset", "conf_base")

    def args(self) -> tuple:
        return tuple(getattr(self, f.name) for f in fields(self))

    @property
    def num_requests(self) -> int:
        return self.base_logits.shape[0]

    @property
    def num_draft(self) -> int:
        return self.base_logits.shape[1]

    @property
    def vocab_size(self) -> int:
        return self.base_logits.shape[2]

    @property
    def rank(self) -> int:
        return self.markov_w1.shape[1]

    def to(self, device) -> "MarkovInputs":
        return MarkovInputs(*(None if a is None else a.to(device) for a in self.args()))

    def select(self, order: Sequence[int]) -> "MarkovInputs":
        """A new batch holding requests ``order`` (in that order, repeats allowed)."""
        index = torch.tensor(list(order), dtype=torch.int64, device=self.base_logits.device)
        return replace(self, **{name: getattr(self, name).index_select(0, index)
                                for name in self.PER_REQUEST if getattr(self, name) is not None})


def make_markov_inputs(
    num_requests: int,
    num_draft: int,
    vocab_size: int,
    rank: int,
    *,
    dtype: torch.dtype = torch.float32,
    weight_dtype: Optional[torch.dtype] = None,
    temperature: Union[float, Sequence[float]] = 0.0,
    confidence: bool = False,
    conf_w_prev: bool = True,
    conf_temperature: bool = True,
    exact_weights: bool = False,
    logit_scale: float = 2.0,
    markov_scale: float = 1.5,
    seed: int = 0,
    device: str = "cpu",
) -> MarkovInputs:
    """Random inputs for B = ``num_requests`` rows, K = ``num_draft`` positions, V = ``vocab_size``.

    ``weight_dtype`` (default: ``dtype``) is the dtype of W1 and W2. Random weights give a
    bias W2 . W1[p] of standard deviation about ``markov_scale``. ``exact_weights`` draws W1
    from {-2..2} and W2 from {-0.5, -0.25, 0, 0.25, 0.5}: every product and partial sum is
    exact in float32, so the op and the reference agree bitwise whatever their summation
    order (and so do the CPU and CUDA kernels and the instruction-set builds).
    ``confidence`` adds conf_base (and conf_w_prev / conf_temperature unless disabled)."""
    g = torch.Generator().manual_seed(seed)
    B, K, V, r = num_requests, num_draft, vocab_size, rank
    weight_dtype = dtype if weight_dtype is None else weight_dtype
    temps = [float(temperature)] * B if isinstance(temperature, (int, float)) else [float(t) for t in temperature]
    assert len(temps) == B
    base = (torch.randn(B, K, V, generator=g) * logit_scale).to(dtype)
    if exact_weights:
        w1 = torch.randint(-2, 3, (V, r), generator=g).float()
        w2 = torch.randint(-2, 3, (V, r), generator=g).float() / 4
    else:
        w1 = torch.randn(V, r, generator=g)
        w2 = torch.randn(V, r, generator=g) * (markov_scale / math.sqrt(r))
    inputs = MarkovInputs(
        base,
        torch.randint(0, V, (B,), generator=g),
        w1.to(weight_dtype),
        w2.to(weight_dtype),
        torch.tensor(temps, dtype=torch.float32),
        torch.randint(0, 2**62, (B,), generator=g, dtype=torch.int64),
        torch.randint(0, 2**40, (B,), generator=g, dtype=torch.int64),
    )
    if confidence:
        inputs.conf_base = torch.randn(B, K, generator=g)
        if conf_w_prev:
            inputs.conf_w_prev = torch.randn(r, generator=g) * 0.5
        if conf_temperature:
            inputs.conf_temperature = torch.rand(K, generator=g) + 0.5
    return inputs if device == "cpu" else inputs.to(device)


def repeated_markov_inputs(
    base_rows: torch.Tensor,
    anchor: int,
    markov_w1: torch.Tensor,
    markov_w2: torch.Tensor,
    temperature: float,
    num_samples: int,
    *,
    seed: Optional[torch.Tensor] = None,
    offset: Optional[torch.Tensor] = None,
) -> MarkovInputs:
    """``num_samples`` requests with identical rows ``base_rows`` ([K, V], broadcast with
    stride 0) and anchor: seeds default to 0..N-1 and offsets to 0, so the rows are
    independent samples of one law."""
    device = base_rows.device
    n = num_samples
    return MarkovInputs(
        base_rows[None].expand(n, *base_rows.shape),
        torch.full((n,), anchor, dtype=torch.int64, device=device),
        markov_w1,
        markov_w2,
        torch.full((n,), temperature, dtype=torch.float32, device=device),
        torch.arange(n, dtype=torch.int64, device=device) if seed is None else seed.to(device),
        torch.zeros(n, dtype=torch.int64, device=device) if offset is None else offset.to(device),
    )


def run_markov_op(inputs: MarkovInputs):
    return markov_op(*inputs.args())


def run_markov_reference(inputs: MarkovInputs, *, forced_tokens: Optional[torch.Tensor] = None, seed: int = 0,
                         variant: str = MARKOV_EXACT):
    return markov_draft_reference(*inputs.args(), forced_tokens=forced_tokens,
                                  generator=torch.Generator().manual_seed(seed), variant=variant)


def check_markov_output_format(inputs: MarkovInputs, token_ids: torch.Tensor, draft_logits: torch.Tensor,
                               confidence: torch.Tensor) -> None:
    """Structural contract of the outputs: shapes, dtypes, device, contiguous logits, ids in
    [0, V), confidence in [0, 1] (or shape [0] without conf_base)."""
    B, K, V = inputs.num_requests, inputs.num_draft, inputs.vocab_size
    device = inputs.base_logits.device
    assert token_ids.shape == (B, K) and token_ids.dtype == torch.int64, (token_ids.shape, token_ids.dtype)
    assert draft_logits.shape == (B, K, V) and draft_logits.dtype == inputs.base_logits.dtype
    assert draft_logits.is_contiguous()
    for t in (token_ids, draft_logits, confidence):
        assert t.device == device, (t.device, device)
    ids = token_ids.cpu()
    assert bool(((ids >= 0) & (ids < V)).all()), f"draft ids outside [0, {V}): {ids.unique().tolist()}"
    if inputs.conf_base is None:
        assert confidence.shape == (0,) and confidence.dtype == torch.float32, (confidence.shape, confidence.dtype)
    else:
        assert confidence.shape == (B, K) and confidence.dtype == torch.float32, (confidence.shape, confidence.dtype)
        c = confidence.cpu()
        assert bool(((c >= 0) & (c <= 1)).all()), "confidence outside [0, 1]"


def _clear_greedy_margin(logits: torch.Tensor) -> torch.Tensor:
    """Rows (last dim) whose largest logit beats every other by more than twice the dtype's
    tolerance: their argmax cannot move under the op's rounding."""
    tol = MARKOV_LOGIT_TOLERANCE[logits.dtype]
    x = torch.nan_to_num(logits.double(), nan=float("-inf"))
    top2 = x.topk(min(2, x.shape[-1]), dim=-1).values
    if top2.shape[-1] < 2:
        return torch.ones(x.shape[:-1], dtype=torch.bool)
    best, second = top2[..., 0], top2[..., 1]
    margin = 2 * (tol["atol"] + tol["rtol"] * best.abs())
    return torch.isfinite(best) & (best - second > margin)


def assert_markov_matches_reference(inputs: MarkovInputs, outputs=None, *, exact: bool = False):
    """The op against dspark_ext.reference.markov_draft_reference.

    Along the op's own tokens (the reference teacher-forced with them): every corrected logit
    equals round(U_k + W2 . W1[x_{k-1}]) (bitwise with ``exact``, else within the dtype's
    tolerance) and the confidence equals its formula. Greedy rows: each token is the first
    argmax (NaN never wins) of the op's own logits row; with ``exact`` or float32 logits the
    free-running reference drafts the same tokens, otherwise tokens are compared wherever the
    reference row's maximum is unique by a clear margin. Sampled rows: every token has
    positive probability under softmax(l_k / T). Returns the op's outputs."""
    token_ids, draft_logits, confidence = run_markov_op(inputs) if outputs is None else outputs
    check_markov_output_format(inputs, token_ids, draft_logits, confidence)
    ids, logits, conf = token_ids.cpu(), draft_logits.cpu(), confidence.cpu()
    ref_ids, ref_logits, ref_conf = run_markov_reference(inputs, forced_tokens=ids)
    assert torch.equal(ref_ids, ids)
    tolerance = dict(rtol=0, atol=0) if exact else MARKOV_LOGIT_TOLERANCE[logits.dtype]
    torch.testing.assert_close(logits, ref_logits, equal_nan=True, **tolerance)
    torch.testing.assert_close(conf, ref_conf, equal_nan=True, **MARKOV_CONFIDENCE_TOLERANCE)

    temps = inputs.temperature.cpu()
    greedy = ~(temps > 0)
    if bool(greedy.any()):
        assert torch.equal(ids[greedy], greedy_tokens(logits[greedy])), "a greedy token is not the argmax of its row"
        if exact or logits.dtype == torch.float32:
            free_ids, _, _ = run_markov_reference(inputs)
            assert torch.equal(ids[greedy], free_ids[greedy]), "greedy tokens differ from the reference"
        else:
            clear = _clear_greedy_margin(ref_logits[greedy])
            assert float(clear.double().mean()) > 0.3, "too few rows with a clear argmax to compare"
            assert torch.equal(ids[greedy][clear], greedy_tokens(ref_logits[greedy])[clear])
    sampled = ~greedy
    if bool(sampled.any()):
        probs = markov_probabilities(logits[sampled], temps[sampled][:, None])
        no_mass = torch.isnan(probs).any(dim=-1)
        chosen = probs.nan_to_num(0.0).gather(-1, ids[sampled][..., None])[..., 0]
        assert bool(((chosen > 0) | (no_mass & (ids[sampled] == 0))).all()), "a sampled token has probability 0"
        first_no_mass = no_mass[:, 0]  # position 0 conditions on prev_token_ids in both: same rows
        if bool(first_no_mass.any()):
            free_ids, _, _ = run_markov_reference(inputs)
            assert free_ids[sampled][first_no_mass, 0].tolist() == [0] * int(first_no_mass.sum()), (
                "the reference drafts a token from a row without mass")
    return token_ids, draft_logits, confidence


def markov_sequence_law(base_rows: torch.Tensor, anchor: int, markov_w1: torch.Tensor, markov_w2: torch.Tensor,
                        temperature: float) -> torch.Tensor:
    """Exact law of (x_1, ..., x_K) for one request (rows ``base_rows`` [K, V], anchor x_0):
    prod_k softmax(l_k(x_{k-1}) / T)[x_k] with l_k(p) = round(U_k + W2 . W1[p]), enumerated
    over all V^K sequences. Flat float64 [V^K], index sum_k x_k V^(K-1-k) (``sequence_codes``)."""
    rows = base_rows.detach().cpu()
    K, V = rows.shape
    w1, w2 = markov_w1.detach().cpu().float(), markov_w2.detach().cpu().float()
    # x_0 is fixed: position 0 needs the anchor's row only, later ones every previous token's.
    law = markov_probabilities((rows[0].float() + w1[anchor] @ w2.T).to(rows.dtype), temperature)
    if K > 1:
        all_bias = w1 @ w2.T  # [previous, next]
    for k in range(1, K):
        step = markov_probabilities((rows[k].float() + all_bias).to(rows.dtype), temperature)  # [previous, next]
        law = (law.reshape(-1, V)[:, :, None] * step[None]).reshape(-1)
    return law


def sequence_codes(token_ids: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Category code of each row of ``token_ids`` [N, K], matching markov_sequence_law()."""
    ids = token_ids.cpu().long()
    codes = torch.zeros(ids.shape[0], dtype=torch.int64)
    for k in range(ids.shape[1]):
        codes = codes * vocab_size + ids[:, k]
    return codes


def markov_step(base_logits, prev_token_ids, markov_w1, markov_w2, temperature, seed, offset, conf_base, conf_w_prev):
    """dspark::markov_draft with a little arithmetic around it, as a serving step would do
    (what the torch.compile tests trace)."""
    ids, logits, confidence = torch.ops.dspark.markov_draft(
        base_logits, prev_token_ids, markov_w1, markov_w2, temperature, seed, offset + 1, conf_base, conf_w_prev, None)
    return ids, logits, confidence, (confidence > 0.3).sum(dim=1), ids[:, -1]


def non_finite_markov_inputs(dtype: torch.dtype) -> "MarkovInputs":
    """B = 10 mixed-temperature requests (exact weights, confidence) whose base logits hold
    random NaN / -inf / +inf entries and whole non-finite rows: the NaN/inf safety case."""
    temps = [0.0, 1.0, 0.0, 0.7, 1.0, 0.0, 2.0, 0.0, 1.0, 0.5]
    inputs = make_markov_inputs(10, 3, 2100, 8, dtype=dtype, temperature=temps, confidence=True,
                                exact_weights=True, seed=16)
    g = torch.Generator().manual_seed(17)
    base = inputs.base_logits.clone()
    u = torch.rand(base.shape, generator=g)
    base[u < 0.1] = float("nan")
    base[(u >= 0.1) & (u < 0.12)] = float("-inf")
    base[(u >= 0.12) & (u < 0.1203)] = float("inf")
    base[3, 1] = float("nan")  # whole rows
    base[7, 0] = float("-inf")
    base[9, 2, :1000] = float("nan")
    return with_replaced(inputs, base_logits=base)


# --------------------------------------------------------------------------- dspark::schedule
# Inputs, the brute-force optimum and the end-to-end engine of the losslessness tests for
# tests/test_schedule.py, tests/test_schedule_lossless.py and, with device="cuda",
# tests/test_schedule_cuda.py.

schedule_op = torch.ops.dspark.schedule.default


@dataclass
class ScheduleInputs:
    """The three arguments of dspark::schedule, in schema order."""

    confidence: torch.Tensor  # [R, K] float32
    sps: torch.Tensor  # [N + 1] float32
    max_len: Optional[torch.Tensor] = None  # [R] int32

    def args(self) -> tuple:
        return (self.confidence, self.sps, self.max_len)

    @property
    def num_requests(self) -> int:
        return self.confidence.shape[0]

    @property
    def num_draft(self) -> int:
        return self.confidence.shape[1]

    @property
    def max_batch(self) -> int:
        return self.sps.shape[0] - 1

    def to(self, device) -> "ScheduleInputs":
        return ScheduleInputs(*(None if a is None else a.to(device) for a in self.args()))

    def strided(self) -> "ScheduleInputs":
        """The same values read through non-contiguous views: confidence as the transpose of
        a [K, R] buffer, sps as every other entry of a buffer twice as long (the others NaN),
        max_len as every other entry of an int32 buffer (the others -7)."""
        device = self.confidence.device
        confidence = self.confidence.t().contiguous().t()
        sps_buffer = torch.full((2 * self.sps.shape[0],), float("nan"), device=device)
        sps_buffer[::2] = self.sps
        max_len = None
        if self.max_len is not None:
            max_len_buffer = torch.full((2 * self.max_len.shape[0],), -7, dtype=torch.int32, device=device)
            max_len_buffer[::2] = self.max_len
            max_len = max_len_buffer[::2]
        return ScheduleInputs(confidence, sps_buffer[::2], max_len)


def random_sps(num_requests: int, max_batch: int, g: torch.Generator, *, jagged: bool = True,
               quadratic: Optional[bool] = None) -> torch.Tensor:
    """[N + 1] float32 steps-per-second curve 1 / t(n) with t(n) = t0 + t1 n (+ t2 n^2), scaled so
    that admission thresholds (a > tau (SPS(B) / SPS(B + 1) - 1)) fall inside [0, 1] for R
    requests. ``jagged`` multiplies in cliffs (a drop from some n on), flat stretches and local
    bumps (the curve is then neither monotone nor smooth). Entries below R are never read by
    the scheduler; they hold 0 here."""
    def uniform(low: float, high: float) -> float:
        return low + (high - low) * float(torch.rand((), generator=g))

    R, N = num_requests, max_batch
    n = torch.arange(N + 1, dtype=torch.float64)
    t0 = uniform(0.5, 2.0)
    t1 = t0 * uniform(0.02, 1.5) / max(R, 1)
    if quadratic is None:
        quadratic = uniform(0, 1) < 0.3
    t2 = t1 * uniform(0.0, 0.5) / max(R, 1) if quadratic else 0.0
    sps = 1.0 / (t0 + t1 * n + t2 * n * n)
    if jagged and N > R:
        def position() -> int:
            return int(torch.randint(R, N + 1, (), generator=g))

        for _ in range(int(torch.randint(0, 3, (), generator=g))):  # cliffs
            sps[position():] *= uniform(0.3, 0.95)
        for _ in range(int(torch.randint(0, 3, (), generator=g))):  # flat stretches
            begin = position()
            sps[begin:begin + int(torch.randint(2, 7, (), generator=g))] = float(sps[begin])
        bumps = torch.rand(N + 1, generator=g, dtype=torch.float64) < 0.1
        sps[bumps] *= 0.9 + 0.25 * torch.rand(int(bumps.sum()), generator=g, dtype=torch.float64)
    sps[:R] = 0.0
    if R == 0:
        sps[0] = 0.0
    return sps.float()


def random_confidence(num_requests: int, num_draft: int, g: torch.Generator, *, ties: bool = False) -> torch.Tensor:
    """[R, K] float32 in [0, 1]: uniform, or skewed towards 1 (long surviving prefixes), with
    exact 0 and 1 entries sprinkled in; ``ties`` rounds to one decimal (many exactly equal
    survival probabilities, within and across requests)."""
    c = torch.rand(num_requests, num_draft, generator=g)
    if float(torch.rand((), generator=g)) < 0.5:
        c = c ** 0.3
    if ties:
        c = (c * 10).round() / 10
    u = torch.rand(num_requests, num_draft, generator=g)
    c[u < 0.04] = 0.0
    c[(u >= 0.04) & (u < 0.1)] = 1.0
    return c


def make_schedule_inputs(num_requests: int, num_draft: int, *, seed: int, max_len: bool = False, ties: bool = False,
                         max_batch: Optional[int] = None, jagged: bool = True, device: str = "cpu") -> ScheduleInputs:
    """Random valid inputs (every value passes the CPU checks). N defaults to a random value in
    R .. R (K + 1) + 5, so the token budget sometimes binds and sometimes does not; ``max_len``
    draws caps in 0 .. K + 2 (above K means no cap)."""
    g = torch.Generator().manual_seed(seed)
    R, K = num_requests, num_draft
    if max_batch is None:
        max_batch = int(torch.randint(R, R * (K + 1) + 6, (), generator=g))
    inputs = ScheduleInputs(
        random_confidence(R, K, g, ties=ties),
        random_sps(R, max_batch, g, jagged=jagged),
        torch.randint(0, K + 3, (R,), generator=g, dtype=torch.int32) if max_len else None,
    )
    return inputs if device == "cpu" else inputs.to(device)


def near_tie_schedule_inputs(seed: int, num_requests: Optional[int] = None, num_draft: Optional[int] = None,
                             device: str = "cpu") -> ScheduleInputs:
    """SPS chosen so that Theta is the same along the whole greedy path up to a relative drift of
    1e-7 per candidate, then each entry moved by -2..+2 float32 ulps: every comparison
    Theta_after > Theta_before is decided at the last bits (tau's fixed point and the float64
    product must be exactly the kernels'). R and K default to random values in 1..8."""
    from dspark_ext.scheduling import survival_probabilities

    g = torch.Generator().manual_seed(seed)
    R = int(torch.randint(1, 9, (), generator=g)) if num_requests is None else num_requests
    K = int(torch.randint(1, 9, (), generator=g)) if num_draft is None else num_draft
    confidence = random_confidence(R, K, g, ties=seed % 2 == 0)
    max_len = torch.randint(0, K + 2, (R,), generator=g, dtype=torch.int32) if seed % 3 == 0 else None
    survival = survival_probabilities(confidence, max_len).reshape(-1)
    path = torch.sort(survival[survival > 0], descending=True).values
    scale = 2**40  # dspark_ext.reference.TAU_SCALE
    tau = R * scale + torch.cumsum((path.double() * scale).long(), 0)
    tau = torch.cat([torch.tensor([R * scale]), tau]).double() / scale
    n = torch.arange(tau.shape[0], dtype=torch.float64)
    sps = torch.zeros(R + tau.shape[0])
    sps[R:] = (R * (1 + 1e-7 * n) / tau).float()
    for _ in range(2):
        step = torch.randint(-1, 2, sps.shape, generator=g)
        sps = torch.where(step > 0, torch.nextafter(sps, torch.full_like(sps, 2.0)), sps)
        sps = torch.where(step < 0, torch.nextafter(sps, torch.zeros_like(sps)), sps)
    sps[:R] = 0.0
    inputs = ScheduleInputs(confidence, sps, max_len)
    return inputs if device == "cpu" else inputs.to(device)


def raw_schedule_inputs(num_requests: int, num_draft: int, *, seed: int, device: str = "cpu") -> ScheduleInputs:
    """Inputs the CPU op rejects and the CUDA kernel sanitizes: confidences NaN, +inf, above 1
    and below 0; max_len from -3 to K + 2; SPS entries NaN, +inf, 0 and negative among the
    batch sizes R..N. ``schedule_reference`` defines the result."""
    nan, inf = float("nan"), float("inf")
    R, K = num_requests, num_draft
    inputs = make_schedule_inputs(R, K, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    confidence = inputs.confidence.clone()
    u = torch.rand(R, K, generator=g)
    confidence[u < 0.1] = nan
    confidence[(u >= 0.1) & (u < 0.15)] = 1.5
    confidence[(u >= 0.15) & (u < 0.2)] = -0.3
    confidence[(u >= 0.2) & (u < 0.22)] = inf
    confidence[(u >= 0.22) & (u < 0.23)] = -inf
    sps = inputs.sps.clone()
    v = torch.rand(sps.shape, generator=g)
    sps[v < 0.05] = nan
    sps[(v >= 0.05) & (v < 0.08)] = inf
    sps[(v >= 0.08) & (v < 0.1)] = -1.0
    sps[(v >= 0.1) & (v < 0.11)] = 0.0
    max_len = torch.randint(-3, K + 3, (R,), generator=g, dtype=torch.int32)
    raw = ScheduleInputs(confidence, sps, max_len)
    return raw if device == "cpu" else raw.to(device)


def run_schedule_op(inputs: ScheduleInputs) -> torch.Tensor:
    return schedule_op(*inputs.args())


def check_schedule_output(inputs: ScheduleInputs, num_draft: torch.Tensor) -> None:
    """Structural contract: [R] int32 contiguous on the inputs' device, lengths within
    [0, min(K, max_len)], at most N tokens in the batch."""
    R, K = inputs.num_requests, inputs.num_draft
    assert num_draft.shape == (R,) and num_draft.dtype == torch.int32, (num_draft.shape, num_draft.dtype)
    assert num_draft.device == inputs.confidence.device and num_draft.is_contiguous()
    lengths = num_draft.cpu().long()
    cap = torch.full((R,), K, dtype=torch.int64)
    if inputs.max_len is not None:
        cap = inputs.max_len.cpu().long().clamp(0, K)
    assert bool(((lengths >= 0) & (lengths <= cap)).all()), f"lengths {lengths.tolist()} outside [0, {cap.tolist()}]"
    assert R + int(lengths.sum()) <= max(inputs.max_batch, R), "batch above N tokens"


def schedule_throughput(survival: torch.Tensor, sps: torch.Tensor, lengths: Sequence[int]) -> float:
    """Theta of the length vector ``lengths`` in float64: (R + sum of the admitted survival
    probabilities) * SPS(R + sum of lengths); -inf when the batch exceeds N."""
    R = survival.shape[0]
    batch = R + int(sum(lengths))
    if batch > sps.shape[0] - 1:
        return float("-inf")
    tau = float(R) + sum(float(survival[r, :length].double().sum()) for r, length in enumerate(lengths))
    return tau * float(sps[batch])


def brute_force_best_throughput(survival: torch.Tensor, sps: torch.Tensor, caps: Sequence[int]) -> float:
    """max over every length vector (l_1 .. l_R), l_r in [0, caps[r]], of schedule_throughput."""
    return max(schedule_throughput(survival, sps, lengths)
               for lengths in itertools.product(*(range(cap + 1) for cap in caps)))


# --------------------------------------------------------------------------- toy engine (schedule lossless)
# A V = 4 bigram target and a K = 2 Markov drafter whose confidence at position 2 depends on
# the first draft: markov_draft -> scheduler -> verify, as a serving step runs them.

TOY_A, TOY_B, TOY_C, TOY_D = range(4)
TOY_VOCAB = 4
TOY_NUM_DRAFT = 2
#: p_t(y | previous token): row = previous token. After D (the anchor of DSpark appendix A)
#: the target is (0.69, 0.29, 0.01, 0.01), i.e. appendix A's (0.7, 0.3) with a little mass on C/D.
TOY_TARGET_PROBS = torch.tensor([
    [0.20, 0.50, 0.20, 0.10],  # after A
    [0.40, 0.10, 0.30, 0.20],  # after B
    [0.25, 0.25, 0.25, 0.25],  # after C
    [0.69, 0.29, 0.01, 0.01],  # after D
], dtype=torch.float64)
TOY_TARGET_LOGITS = TOY_TARGET_PROBS.log().float()
#: Backbone logits U_k: position 1 ~ (0.49, 0.49, 0.01, 0.01) after D (W1[D] = 0: no Markov
#: bias); position 2's law is moved by the Markov bias W2 . W1[x_1].
TOY_BASE_LOGITS = torch.tensor([[0.0, 0.0, -4.0, -4.0], [0.0, 0.0, -1.0, -1.0]])
#: W1[A] = e_0, W1[B] = e_1, W1[C] = (e_0 + e_1) / 2, W1[D] = 0.
TOY_W1 = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5], [0.0, 0.0]])
#: bias after A = W2[:, 0] (favours B), after B = W2[:, 1] (favours A).
TOY_W2 = torch.tensor([[0.0, 1.5], [1.5, 0.0], [0.0, 0.0], [0.0, 0.0]])
#: c_k = sigmoid(conf_base_k + w_prev . W1[x_{k-1}]): + ln 9 after A (a 0.9 after a 0 base),
#: -30 after B (about 1e-13: "the drafter knows the second draft is hopeless after B").
TOY_CONF_W_PREV = torch.tensor([math.log(9.0), -30.0])


def logit(p: float) -> float:
    return math.log(p / (1.0 - p))


@dataclass(frozen=True)
class ToyRequest:
    anchor: int
    conf_base: tuple  # (conf_base_1, conf_base_2)


@dataclass(frozen=True)
class ToySetting:
    """R = len(requests) requests scheduled together at every engine step, and the SPS curve."""

    requests: tuple
    sps: tuple

    @property
    def num_requests(self) -> int:
        return len(self.requests)


#: Anchor D, c_1 = 0.8, c_2 = 0.9 after x_1 = A and ~1e-13 after x_1 = B (appendix A's drafter).
TOY_APPENDIX_REQUEST = ToyRequest(TOY_D, (math.log(4.0), 0.0))


def toy_exact_joint(anchor: int) -> torch.Tensor:
    """Exact law of the first two emitted tokens (y_1, y_2) after ``anchor``: p_t(y_1 | anchor)
    p_t(y_2 | y_1), from the stored float32 target logits; flat [16], code y_1 * 4 + y_2."""
    p = torch.stack([exact_probs(row, 1.0) for row in TOY_TARGET_LOGITS])  # [previous, next]
    return (p[anchor][:, None] * p).reshape(-1)


def _toy_draft(anchors: torch.Tensor, conf_base: torch.Tensor, seed: torch.Tensor, offset: int):
    n, device = anchors.shape[0], anchors.device
    base = TOY_BASE_LOGITS.to(device)[None].expand(n, TOY_NUM_DRAFT, TOY_VOCAB)
    return markov_op(base, anchors, TOY_W1.to(device), TOY_W2.to(device), torch.ones(n, device=device), seed,
                     torch.full((n,), offset, dtype=torch.int64, device=device), conf_base, TOY_CONF_W_PREV.to(device),
                     None)


def _toy_verify(anchors: torch.Tensor, draft_ids: torch.Tensor, draft_logits: torch.Tensor, lengths: torch.Tensor,
                seed: torch.Tensor, offset: int):
    """One packed verify call: request b verifies its first lengths[b] drafts against the target
    rows after (anchor, x_1, .., x_L) (the last one is the bonus row)."""
    n, device = anchors.shape[0], anchors.device
    lengths = lengths.long()
    previous = torch.cat([anchors[:, None], draft_ids], dim=1)  # [n, K + 1]
    row_mask = torch.arange(TOY_NUM_DRAFT + 1, device=device)[None] <= lengths[:, None]
    draft_mask = torch.arange(TOY_NUM_DRAFT, device=device)[None] < lengths[:, None]
    cu = torch.zeros(n + 1, dtype=torch.int32, device=device)
    cu[1:] = torch.cumsum(lengths, 0).to(torch.int32)
    return verify_op(TOY_TARGET_LOGITS.to(device)[previous[row_mask]], draft_ids[draft_mask], draft_logits[draft_mask],
                     cu, torch.ones(n, device=device), seed, torch.full((n,), offset, dtype=torch.int64, device=device),
                     TOY_NUM_DRAFT)


def _toy_schedule_steps(scheduler, confidence: torch.Tensor, lagged: torch.Tensor, sps: torch.Tensor,
                        every_step: bool) -> torch.Tensor:
    """num_draft [M, R] for M engine steps, one scheduler call per step on [R, K] confidences.
    ``every_step`` calls the scheduler on every step; otherwise once per distinct
    (confidence, lagged confidence) step (the schedulers are pure functions of their inputs, so
    this is the same result; the Python schedulers cost ~0.1 ms a call)."""
    M = confidence.shape[0]
    if every_step:
        return torch.stack([scheduler(confidence[m], lagged[m], sps) for m in range(M)])
    keys = torch.cat([confidence.reshape(M, -1), lagged.reshape(M, -1)], dim=1)
    unique, inverse = torch.unique(keys, dim=0, return_inverse=True)
    R, K = confidence.shape[1:]
    per_key = torch.stack([scheduler(key[:R * K].reshape(R, K), key[R * K:].reshape(R, K), sps) for key in unique])
    return per_key[inverse]


@dataclass
class ToyRun:
    """Per engine step m and request r: the first two emitted tokens, the first draft, the
    scheduled lengths of the first round and the first round's num_accepted."""

    y1: torch.Tensor  # [M, R]
    y2: torch.Tensor  # [M, R]
    x1: torch.Tensor  # [M, R]
    num_draft: torch.Tensor  # [M, R]
    num_accepted: torch.Tensor  # [M, R]
    second_round_num_draft: torch.Tensor  # [M, R]

    def codes(self, r: int) -> torch.Tensor:
        """Category code y_1 * 4 + y_2 of request r, matching toy_exact_joint."""
        return self.y1[:, r] * TOY_VOCAB + self.y2[:, r]


def run_toy_engine(setting: ToySetting, scheduler, num_steps: int, *, seed: int = 0, device: str = "cpu",
                   every_step: bool = False) -> ToyRun:
    """M = ``num_steps`` engine steps of R requests, two rounds each.

    Round 1: markov_draft of all M R rows at once (independent streams: seed = seed + row), one
    scheduler call per step on that step's [R, K] confidences, then one packed verify call over
    all M R requests. The first emitted token y_1 = output[:, 0]. Round 2 (anchor y_1, fresh
    offsets, same steps): its first emitted token is y_2 where round 1 accepted no draft,
    otherwise y_2 = output[:, 1] of round 1. ``scheduler(confidence [R, K], lagged [R, K],
    sps)`` -> [R] int32; ``lagged`` holds the confidences of an independent earlier draft of the
    same requests (same anchors), so asynchronous schedulers get a budget independent of the
    current drafts; synchronous ones ignore it."""
    M, R, K = num_steps, setting.num_requests, TOY_NUM_DRAFT
    rows = M * R
    seeds = torch.arange(rows, dtype=torch.int64, device=device) + seed * rows
    conf_base = torch.tensor([list(q.conf_base) for q in setting.requests], dtype=torch.float32,
                             device=device).repeat(M, 1)
    anchors = torch.tensor([q.anchor for q in setting.requests], dtype=torch.int64, device=device).repeat(M)
    sps = torch.tensor(setting.sps, dtype=torch.float32, device=device)

    def one_round(round_anchors: torch.Tensor, round_index: int):
        ids, logits, confidence = _toy_draft(round_anchors, conf_base, seeds, offset=2 * round_index)
        _, _, lagged = _toy_draft(round_anchors, conf_base, seeds, offset=2 * round_index + 1)
        lengths = _toy_schedule_steps(scheduler, confidence.reshape(M, R, K), lagged.reshape(M, R, K), sps,
                                      every_step)
        output, num_accepted = _toy_verify(round_anchors, ids, logits, lengths.reshape(-1), seeds, offset=round_index)
        return ids, lengths, output, num_accepted

    ids, lengths, output, num_accepted = one_round(anchors, 0)
    y1 = output[:, 0]
    _, second_lengths, second_output, _ = one_round(y1, 1)
    y2 = torch.where(num_accepted >= 1, output[:, 1], second_output[:, 0])
    return ToyRun(*(t.reshape(M, R).cpu() for t in (y1, y2, ids[:, 0], lengths, num_accepted, second_lengths)))


# --------------------------------------------------------------------------- CPU builds

#: The CPU builds of the kernels, in order (each CPU runs a prefix of them).
CPU_BUILDS = ["default", "avx2", "avx512"]

_RUN_OP_FOR_ONE_BUILD = r"""
import sys, torch, dspark_ext
op = getattr(torch.ops.dspark, sys.argv[1])
torch.save([op(*args) for args in torch.load(sys.argv[2])], sys.argv[3])
"""


def runnable_cpu_builds() -> List[str]:
    """The builds of ``CPU_BUILDS`` this CPU runs (ATen's capability and every build below it)."""
    best = torch.backends.cpu.get_cpu_capability().lower()
    return CPU_BUILDS[: CPU_BUILDS.index(best) + 1] if best in CPU_BUILDS else ["default"]


def op_outputs_per_cpu_build(op_name: str, cases: Sequence[tuple], builds: Sequence[str], directory) -> dict:
    """build -> [torch.ops.dspark.<op_name>(*args) for args in cases], each build in a process of
    its own (``ATEN_CPU_CAPABILITY``, which picks our kernels' build as it picks ATen's)."""
    torch.save(list(cases), directory / "inputs.pt")
    outputs = {}
    for build in builds:
        subprocess.run([sys.executable, "-c", _RUN_OP_FOR_ONE_BUILD, op_name, str(directory / "inputs.pt"),
                        str(directory / f"{build}.pt")],
                       env={"ATEN_CPU_CAPABILITY": build, "PATH": "/usr/bin:/bin"}, capture_output=True, text=True,
                       timeout=300, check=True)
        outputs[build] = torch.load(directory / f"{build}.pt")
    return outputs
