"""Benchmark of torch.ops.dspark.verify against its references and against a plain read.

    python3 bench/bench_verify.py --quick            # 6 small configs, well under a minute
    python3 bench/bench_verify.py                    # full grid (slow on a small CPU)
    python3 bench/bench_verify.py --device cuda --no-compile --markdown out.md

For every config (vocab V, batch B, drafts per request K, dtype, mode) it reports:
  op          median time of the op (after warm-up)
  read        median time of one read over the logits the op must read:
              torch.amax(target_logits, -1) (+ torch.amax(draft_logits, -1)), timed
              interleaved with the op, so op/read is the op's cost in "memory passes"
  eager       dspark_ext.reference.verify_reference (loops over requests and positions),
              time-boxed: few runs where it is slow; "(n)" = number of timed runs
  compiled    torch.compile(fullgraph=True) of a reference, compiled once per config
              outside the timing (see the note printed under the table for which one)
  x eager / x compiled    speedup of the op over each reference
  GB/s        (CUDA only) bytes of logits the op reads / op time

Modes: greedy             T = 0, no draft logits
       sample-onehot      T = 1, drafts were sampled, draft logits not given (one-hot q)
       sample-draftlogits T = 1, drafts were sampled, draft logits given (residual sampling)

Inputs look like a decoding step: target logits are N(0, 1) plus 5 hot tokens per row that
hold ~99% of the probability, draft logits = target logits + N(0, 1) noise, sampled drafts
are drawn from softmax(draft logits), greedy drafts hit the target argmax 70% of the time.
"""

from __future__ import annotations

import argparse
import itertools
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (  # noqa: E402
    BoxedTiming,
    Table,
    Timer,
    fmt_ms,
    fmt_ratio,
    interleaved_medians,
    language_model_like_logits,
    machine_lines,
    short_error,
    time_boxed,
)

MODES = ("greedy", "sample-onehot", "sample-draftlogits")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

# Goals (checked per row; the op must beat them on CPU).
GOAL_GREEDY_READ_RATIO = 1.2
GOAL_SAMPLING_READ_RATIO = 2.0
GOAL_EAGER_SPEEDUP = 10.0
GOAL_COMPILED_SPEEDUP = 1.0
# The op reads every logit the read pass reads, so op/read well below 1 means the read pass
# was disturbed (e.g. an OpenMP thread descheduled by another process): not a measurement.


# =========================================================================== configs


@dataclass(frozen=True)
class Config:
    vocab: int
    batch: int
    k: int  # drafts per request; every request has exactly k, max_num_draft = k
    dtype: str
    mode: str

    @property
    def num_drafts(self) -> int:
        return self.batch * self.k

    @property
    def uses_draft_logits(self) -> bool:
        return self.mode == "sample-draftlogits"

    @property
    def is_greedy(self) -> bool:
        return self.mode == "greedy"

    def logits_bytes(self) -> int:
        """Bytes of logits the op must read: every target row, plus every draft row if given."""
        rows = self.num_drafts + self.batch + (self.num_drafts if self.uses_draft_logits else 0)
        return rows * self.vocab * DTYPES[self.dtype].itemsize


@dataclass
class Result:
    config: Config
    accepted: Optional[float] = None  # mean num_accepted / K reported by the op
    op_ms: Optional[float] = None
    read_ms: Optional[float] = None
    eager: Optional[BoxedTiming] = None
    compiled: Optional[BoxedTiming] = None
    compile_s: Optional[float] = None
    errors: Dict[str, str] = field(default_factory=dict)  # column -> reason for n/a
    agreement: str = "-"

    @property
    def read_ratio(self) -> Optional[float]:
        return self.op_ms / self.read_ms if self.op_ms and self.read_ms else None

    def speedup(self, baseline: Optional[BoxedTiming]) -> Optional[float]:
        return baseline.median_ms / self.op_ms if baseline and self.op_ms else None

    def gb_per_s(self) -> Optional[float]:
        return self.config.logits_bytes() / (self.op_ms * 1e-3) / 1e9 if self.op_ms else None

    def goal_failures(self) -> List[str]:
        """Names of the goals this row misses ('n/a' measurements are not failures)."""
        failed = []
        limit = GOAL_GREEDY_READ_RATIO if self.config.is_greedy else GOAL_SAMPLING_READ_RATIO
        if self.op_ms is None:
            return ["op"]
        if self.read_ratio is not None and self.read_ratio > limit:
            failed.append("read")
        eager_speedup = self.speedup(self.eager)
        if eager_speedup is not None and eager_speedup < GOAL_EAGER_SPEEDUP:
            failed.append("eager")
        compiled_speedup = self.speedup(self.compiled)
        if compiled_speedup is not None and compiled_speedup <= GOAL_COMPILED_SPEEDUP:
            failed.append("compiled")
        return failed


def full_grid(args) -> List[Config]:
    return [
        Config(v, b, k, d, m)
        for v, b, k, d, m in itertools.product(args.vocab, args.batch, args.k, args.dtypes, args.modes)
    ]


# =========================================================================== inputs


@dataclass
class VerifyInputs:
    """Arguments of dspark::verify for one config, in the op's order."""

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


@dataclass
class ShapeData:
    """Logits and drafts shared by every mode of one (V, B, K, dtype)."""

    target_logits: torch.Tensor  # [D + B, V]
    draft_logits: torch.Tensor  # [D, V], aligned with the target rows of the same position
    greedy_ids: torch.Tensor  # [D] int64
    sampled_ids: torch.Tensor  # [D] int64, drawn from softmax(draft_logits)
    cu_num_draft: torch.Tensor  # [B + 1] int32


def make_shape_data(vocab: int, batch: int, k: int, dtype: torch.dtype, device: str,
                    all_accepted: bool = False) -> ShapeData:
    """``all_accepted``: every draft token gets +40 in its target and draft rows (p = q = 1 to
    float precision), so every draft is accepted and the op reads every row: its worst case."""
    gen = torch.Generator(device=device).manual_seed(1234 + vocab + 31 * batch + 7 * k)
    num_drafts = batch * k
    cu = torch.arange(0, num_drafts + 1, k, dtype=torch.int32, device=device)
    target = language_model_like_logits(num_drafts + batch, vocab, gen, device)
    # Target row of draft d = cu[b] + j is d + b (each request also has a bonus row).
    draft_rows = torch.arange(num_drafts, device=device) + torch.arange(batch, device=device).repeat_interleave(k)
    draft = target[draft_rows] + torch.randn(num_drafts, vocab, generator=gen, device=device)
    sampled_ids = torch.multinomial(torch.softmax(draft, -1), 1, generator=gen).squeeze(1)
    random_ids = torch.randint(0, vocab, (num_drafts,), generator=gen, device=device)
    hit = torch.rand(num_drafts, generator=gen, device=device) < 0.7
    greedy_ids = torch.where(hit, target[draft_rows].argmax(-1), random_ids)
    if all_accepted:
        target[draft_rows, sampled_ids] += 40.0
        draft[torch.arange(num_drafts, device=device), sampled_ids] += 40.0
        greedy_ids = sampled_ids
    return ShapeData(target.to(dtype), draft.to(dtype), greedy_ids, sampled_ids, cu)


def make_inputs(data: ShapeData, config: Config) -> VerifyInputs:
    device = data.target_logits.device
    batch = config.batch
    temperature = 0.0 if config.is_greedy else 1.0
    return VerifyInputs(
        target_logits=data.target_logits,
        draft_token_ids=data.greedy_ids if config.is_greedy else data.sampled_ids,
        draft_logits=data.draft_logits if config.uses_draft_logits else None,
        cu_num_draft=data.cu_num_draft,
        temperature=torch.full((batch,), temperature, dtype=torch.float32, device=device),
        seed=torch.arange(batch, dtype=torch.int64, device=device) * 7919 + 12345,
        offset=torch.full((batch,), 3, dtype=torch.int64, device=device),
        max_num_draft=config.k,
    )


# =========================================================================== vectorized reference
#
# A batched, loop-free implementation of the op contract for torch.compile (the loop
# reference, dspark_ext.reference.verify_reference, converts logits to Python lists and
# branches per request and position, so it cannot be captured as one graph). It samples the
# same distributions as the loop reference, and it reproduces the op's draws exactly: the
# same Philox streams, the same two-level (vocabulary tile, then token) exponential race,
# the same one-hot exclusion and log-space residual. Only summation order differs from the
# op, so a decision sitting within float rounding of its threshold could differ.

_MASK32 = 0xFFFFFFFF
_VOCAB_TILE = 2048  # csrc/core/sampling.h kVocabTile
_PURPOSE_ACCEPT, _PURPOSE_TILE, _PURPOSE_TOKEN, _PURPOSE_FALLBACK_TILE, _PURPOSE_FALLBACK_TOKEN = 0x11, 0x12, 0x13, 0x14, 0x15


def _mulhilo32(a: int, b: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(low, high) 32-bit halves of a * b for a, b < 2^32, in int64 without overflow."""
    p_low, p_high = a * (b & 0xFFFF), a * (b >> 16)  # each < 2^48; a * b = p_low + p_high * 2^16
    low = (p_low + ((p_high & 0xFFFF) << 16)) & _MASK32
    high = ((p_low >> 16) + p_high) >> 16
    return low, high


def _philox4x32_10(c0, c1, c2, c3, k0, k1) -> Tuple[torch.Tensor, ...]:
    for _ in range(10):
        low0, high0 = _mulhilo32(0xD2511F53, c0)
        low1, high1 = _mulhilo32(0xCD9E8D57, c2)
        c0, c1, c2, c3 = high1 ^ c1 ^ k0, low1, high0 ^ c3 ^ k1, low0
        k0, k1 = (k0 + 0x9E3779B9) & _MASK32, (k1 + 0xBB67AE85) & _MASK32
    return c0, c1, c2, c3


def _random_blocks(seed, offset, position, group, purpose) -> Tuple[torch.Tensor, ...]:
    """csrc/core/rng.h random_block for broadcastable int64 tensors: four 32-bit lanes."""
    c1 = (purpose << 24) | (position & 0xFFFFFF)
    c2, c3 = offset & _MASK32, (offset >> 32) & _MASK32
    k0, k1 = seed & _MASK32, (seed >> 32) & _MASK32
    return _philox4x32_10(group, c1, c2, c3, k0, k1)


def _open_uniform(bits: torch.Tensor) -> torch.Tensor:
    return ((bits >> 9).to(torch.float32) + 0.5) * (1.0 / 8388608.0)


def random_word(seed, offset, position, index, purpose) -> torch.Tensor:
    """random_word(seed, offset, position, index, purpose) elementwise (int64 tensors, broadcast)."""
    lanes = _random_blocks(seed, offset, position, index >> 2, purpose)
    lane = index & 3
    return torch.where(lane == 0, lanes[0], torch.where(lane == 1, lanes[1], torch.where(lane == 2, lanes[2], lanes[3])))


def random_uniform(seed, offset, position, index, purpose) -> torch.Tensor:
    """uniform(seed, offset, position, index, purpose) elementwise (int64 tensors, broadcast)."""
    return _open_uniform(random_word(seed, offset, position, index, purpose))


def random_words_range(seed, offset, position, start, count: int, purpose) -> torch.Tensor:
    """Random words of indices start .. start + count - 1 (start % 4 == 0, count % 4 == 0): [B, count]."""
    groups = (start >> 2) + torch.arange(count // 4, device=start.device)
    lanes = _random_blocks(seed, offset, position, groups, purpose)
    return torch.stack(lanes, -1).flatten(-2)


def _race_keys(log_weight: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
    """csrc/core: race_key(log_weight, exponential_variate(bits))."""
    v = ((bits.to(torch.float32) + 0.5) * (1.0 / 4294967296.0)).clamp(max=0.99999994)
    return log_weight - torch.log(-torch.log1p(-v))


def _sanitize(scaled: torch.Tensor) -> torch.Tensor:
    return torch.where(scaled.isnan(), float("-inf"), scaled).clamp(max=torch.finfo(torch.float32).max)


def _tiled(values: torch.Tensor) -> torch.Tensor:
    """[..., V] -> [..., tiles, 2048], padded with -inf."""
    vocab = values.shape[-1]
    padded = torch.nn.functional.pad(values, (0, (-vocab) % _VOCAB_TILE), value=float("-inf"))
    return padded.unflatten(-1, (-1, _VOCAB_TILE))


@dataclass
class _Layout:
    """Where each (request b, position k) of the [B, K + 1] grid lives."""

    lengths: torch.Tensor  # [B]
    target_row: torch.Tensor  # [B, K + 1], positions past L_b clipped to the bonus row
    draft_index: torch.Tensor  # [B, K + 1], clipped into [0, D] (D indexes a padding id)
    has_draft: torch.Tensor  # [B, K + 1]: k < L_b
    drafts: torch.Tensor  # [B, K + 1] int64 draft id (0 where there is none)
    row_request: torch.Tensor  # [D + B] request of each target row
    draft_request: torch.Tensor  # [D] request of each draft


def _layout(draft_token_ids, cu_num_draft, max_num_draft: int, num_rows: int) -> _Layout:
    device = cu_num_draft.device
    cu = cu_num_draft.long()
    batch = cu.shape[0] - 1
    lengths = cu[1:] - cu[:-1]
    positions = torch.arange(max_num_draft + 1, device=device)[None, :]
    requests = torch.arange(batch, device=device)
    target_row = (cu[:-1] + requests)[:, None] + torch.minimum(positions, lengths[:, None])
    has_draft = positions < lengths[:, None]
    num_drafts = draft_token_ids.shape[0]
    draft_index = torch.clamp(cu[:-1, None] + positions, max=num_drafts)
    padded_ids = torch.cat([draft_token_ids.long(), draft_token_ids.new_zeros(1, dtype=torch.long)])
    drafts = torch.where(has_draft, padded_ids[draft_index], 0)
    row_starts = cu[1:] + requests + 1  # first target row after request b
    row_request = torch.searchsorted(row_starts, torch.arange(num_rows, device=device), right=True)
    draft_request = torch.searchsorted(cu[1:], torch.arange(num_drafts, device=device), right=True)
    return _Layout(lengths, target_row, draft_index, has_draft, drafts, row_request, draft_request)


def _first_rejection(accepted: torch.Tensor) -> torch.Tensor:
    """Number of leading accepted drafts per request ([B, K] bool -> [B] int64)."""
    return torch.cumprod(accepted.long(), -1).sum(-1)


def _write_output(layout: _Layout, num_accepted: torch.Tensor, emitted: torch.Tensor, max_num_draft: int):
    positions = torch.arange(max_num_draft + 1, device=emitted.device)[None, :]
    output = torch.where(positions < num_accepted[:, None], layout.drafts, -1)
    output = torch.where(positions == num_accepted[:, None], emitted[:, None], output)
    return output, num_accepted.to(torch.int32)


def verify_greedy_vectorized(
    target_logits, draft_token_ids, draft_logits, cu_num_draft, temperature, seed, offset, max_num_draft: int
):
    """Batched verify for all-greedy batches (temperature == 0 everywhere)."""
    layout = _layout(draft_token_ids, cu_num_draft, max_num_draft, target_logits.shape[0])
    row_argmax = torch.where(target_logits.isnan(), float("-inf"), target_logits).argmax(-1)  # first max wins
    argmax = row_argmax[layout.target_row]  # [B, K + 1]
    accepted = (layout.drafts == argmax) & layout.has_draft
    num_accepted = _first_rejection(accepted[:, :max_num_draft])
    emitted = argmax.gather(1, num_accepted[:, None]).squeeze(1)
    return _write_output(layout, num_accepted, emitted, max_num_draft)


def verify_sampling_vectorized(
    target_logits, draft_token_ids, draft_logits, cu_num_draft, temperature, seed, offset, max_num_draft: int
):
    """Batched verify for all-sampling batches (temperature > 0 everywhere)."""
    num_rows, vocab = target_logits.shape
    layout = _layout(draft_token_ids, cu_num_draft, max_num_draft, num_rows)
    inv_t = 1.0 / temperature
    vocab_ids = torch.arange(vocab, device=target_logits.device)
    onehot = draft_logits is None

    # Per target row: scaled logits; tile totals leave a one-hot draft token out (as the op does).
    scaled = _sanitize(target_logits.float() * inv_t[layout.row_request][:, None])  # [R, V]
    row_excluded = torch.full((num_rows,), -1, dtype=torch.long, device=scaled.device)
    if onehot:
        excluded_at = torch.where(layout.has_draft, layout.drafts, -1)  # [B, K + 1]
        row_excluded = row_excluded.index_put((layout.target_row.flatten(),), excluded_at.flatten())
    without_excluded = torch.where(vocab_ids[None, :] == row_excluded[:, None], float("-inf"), scaled)
    tile_lse = torch.logsumexp(_tiled(without_excluded if onehot else scaled), -1)  # [R, tiles]
    row_lse = torch.logsumexp(tile_lse, -1)  # [R]

    # Accept test of every draft position: log u < log p(x) - log q(x).
    log_p_unnorm = scaled[layout.target_row, layout.drafts]  # [B, K + 1]
    if onehot:
        log_norm_p = torch.logaddexp(row_lse[layout.target_row], log_p_unnorm)
        log_q = torch.zeros_like(log_p_unnorm)
    else:
        draft_scaled = _sanitize(draft_logits.float() * inv_t[layout.draft_request][:, None])  # [D, V]
        draft_lse = torch.logsumexp(_tiled(draft_scaled), -1).logsumexp(-1)  # [D]
        draft_index = torch.clamp(layout.draft_index, max=draft_logits.shape[0] - 1)  # D >= 1 here
        log_q = draft_scaled[draft_index, layout.drafts] - draft_lse[draft_index]
        log_norm_p = row_lse[layout.target_row]
    positions = torch.arange(max_num_draft + 1, device=scaled.device)[None, :]
    u_accept = random_uniform(seed[:, None], offset[:, None], positions, torch.zeros_like(positions), _PURPOSE_ACCEPT)
    accepted = (torch.log(u_accept) < (log_p_unnorm - log_norm_p) - log_q) & (log_q > float("-inf")) & layout.has_draft
    num_accepted = _first_rejection(accepted[:, :max_num_draft])

    # The emitted row: the bonus row if every draft was accepted, else the first rejected one,
    # sampled from p (bonus), p without the draft (one-hot) or norm(max(0, p - q)) (residual).
    emit_row = layout.target_row.gather(1, num_accepted[:, None]).squeeze(1)  # [B]
    excluded = row_excluded[emit_row]
    race_tile_lse, token_weights = tile_lse[emit_row], without_excluded[emit_row]  # [B, tiles], [B, V]
    fallback = torch.zeros_like(emit_row, dtype=torch.bool)
    if not onehot:
        emit_draft = torch.clamp(layout.draft_index.gather(1, num_accepted[:, None]).squeeze(1), max=draft_logits.shape[0] - 1)
        residual = _log_residual(scaled[emit_row] - row_lse[emit_row][:, None],
                                 draft_scaled[emit_draft] - draft_lse[emit_draft][:, None])
        residual_tile_lse = torch.logsumexp(_tiled(residual), -1)
        rejected = num_accepted < layout.lengths
        no_residual_mass = (residual_tile_lse == float("-inf")).all(-1)
        use_residual = rejected & ~no_residual_mass
        fallback = rejected & no_residual_mass  # p == q up to rounding: sample p instead
        race_tile_lse = torch.where(use_residual[:, None], residual_tile_lse, race_tile_lse)
        token_weights = torch.where(use_residual[:, None], residual, token_weights)
    token, no_mass = _two_level_race(seed, offset, num_accepted, race_tile_lse, token_weights, fallback)
    emitted = torch.where(no_mass, torch.clamp(excluded, min=0), token)
    return _write_output(layout, num_accepted, emitted, max_num_draft)


def _log_residual(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """log max(0, p - q) = log p + log(1 - q / p) (csrc/core/sampling.h log_residual)."""
    return torch.where(log_p > log_q, log_p + torch.log(-torch.expm1(log_q - log_p)), float("-inf"))


def _two_level_race(seed, offset, position, tile_lse, token_weights, fallback):
    """Exponential race between vocabulary tiles (by their totals), then between the tokens of
    the winning tile: the op's exact sampler. Returns (token [B], no finite weight [B])."""
    batch, num_tiles = tile_lse.shape
    seed, offset, position = seed[:, None], offset[:, None], position[:, None]
    tile_purpose = torch.where(fallback, _PURPOSE_FALLBACK_TILE, _PURPOSE_TILE)[:, None]
    tile_ids = torch.arange(num_tiles, device=tile_lse.device)[None, :]
    bits_tile = random_word(seed, offset, position, tile_ids, tile_purpose)
    best_tile_key, best_tile = _race_keys(tile_lse, bits_tile).max(-1)  # first max wins
    start = best_tile * _VOCAB_TILE
    token_purpose = torch.where(fallback, _PURPOSE_FALLBACK_TOKEN, _PURPOSE_TOKEN)[:, None]
    bits_token = random_words_range(seed, offset, position, start[:, None], _VOCAB_TILE, token_purpose)
    requests = torch.arange(batch, device=tile_lse.device)
    tile_weights = _tiled(token_weights)[requests, best_tile]  # [B, 2048]
    token = start + _race_keys(tile_weights, bits_token).argmax(-1)
    return token, best_tile_key == float("-inf")


VECTORIZED_REFERENCE = {
    "greedy": verify_greedy_vectorized,
    "sample-onehot": verify_sampling_vectorized,
    "sample-draftlogits": verify_sampling_vectorized,
}


# =========================================================================== measuring


def op_call(inputs: VerifyInputs) -> Callable[[], object]:
    args = inputs.args()
    return lambda: torch.ops.dspark.verify(*args)


def read_pass_call(inputs: VerifyInputs) -> Callable[[], object]:
    target, draft = inputs.target_logits, inputs.draft_logits
    if draft is None:
        return lambda: torch.amax(target, -1)
    return lambda: (torch.amax(target, -1), torch.amax(draft, -1))


def outputs_equal(a, b) -> Tuple[int, int]:
    """(requests whose outputs differ, requests) between two (output_token_ids, num_accepted) pairs."""
    same_tokens = (a[0].cpu() == b[0].cpu()).all(-1)
    same_count = a[1].cpu().to(torch.int64) == b[1].cpu().to(torch.int64)
    return int((~(same_tokens & same_count)).sum()), int(same_count.numel())


class Bench:
    def __init__(self, args):
        self.args = args
        self.timer = Timer(args.device)
        self.reference_error = ""
        self.reference = self._load_reference()
        self.compiled_cache: Dict[Tuple[str, str], Callable] = {}
        self.loop_compile_probe = self._probe_loop_reference_compile() if args.compile else None

    def _load_reference(self):
        try:
            from dspark_ext.reference import verify_reference

            return verify_reference
        except Exception as error:  # reported per row as n/a
            self.reference_error = short_error(error)
            return None

    def _probe_loop_reference_compile(self) -> str:
        """Tries torch.compile(fullgraph=True) of the loop reference on a tiny greedy input."""
        if self.reference is None:
            return "not tried (no reference)"
        tiny = make_inputs(make_shape_data(256, 1, 1, torch.float32, self.args.device), Config(256, 1, 1, "fp32", "greedy"))
        torch._dynamo.reset()
        try:
            torch.compile(self.reference, fullgraph=True)(*tiny.args())
            return "compiles at V=256, B=1, K=1 (the bench still times the vectorized reference)"
        except Exception as error:
            return f"fails even at V=256, B=1, K=1 ({short_error(error, 80)})"
        finally:
            torch._dynamo.reset()

    # ---- one config

    def run(self, config: Config, data: ShapeData) -> Result:
        result = Result(config)
        inputs = make_inputs(data, config)
        op_out = self._time_op_and_read(inputs, result)
        compiled_out = self._time_compiled(inputs, result) if self.args.compile else None
        eager_out = self._time_eager(inputs, result)
        if op_out is not None:
            result.accepted = float(op_out[1].float().mean()) / config.k
            result.agreement = self._agreement(config, op_out, {"eager": eager_out, "compiled": compiled_out})
        return result

    def _time_op_and_read(self, inputs: VerifyInputs, result: Result):
        op, read = op_call(inputs), read_pass_call(inputs)
        try:
            out = op()
        except Exception as error:
            result.errors["op"] = short_error(error)
            result.read_ms = interleaved_medians(self.timer, {"read": read}, self.args.repeats, budget_s=self.args.op_budget)["read"]
            return None
        medians = interleaved_medians(
            self.timer, {"op": op, "read": read}, self.args.repeats, budget_s=self.args.op_budget, min_time_s=self.args.min_time
        )
        result.op_ms, result.read_ms = medians["op"], medians["read"]
        return out

    def _compiled_reference(self, config: Config):
        function = VECTORIZED_REFERENCE[config.mode]
        if not self.args.compile_dynamic:
            torch._dynamo.reset()  # compile exactly once for this config (static shapes)
            return torch.compile(function, fullgraph=True, dynamic=False)
        key = (config.mode, config.dtype)  # one dynamic-shape graph per mode and dtype
        if key not in self.compiled_cache:
            self.compiled_cache[key] = torch.compile(function, fullgraph=True, dynamic=True)
        return self.compiled_cache[key]

    def _time_compiled(self, inputs: VerifyInputs, result: Result):
        compiled = self._compiled_reference(result.config)
        args = inputs.args()
        try:
            start = time.perf_counter()
            out = compiled(*args)
            self.timer.synchronize()
            result.compile_s = time.perf_counter() - start
        except Exception as error:
            result.errors["compiled"] = short_error(error)
            return None
        result.compiled = time_boxed(
            self.timer, lambda: compiled(*args), self.args.repeats, self.args.ref_budget, warmup=True
        )
        return out

    def _time_eager(self, inputs: VerifyInputs, result: Result):
        if self.reference is None:
            result.errors["eager"] = self.reference_error
            return None
        if not self.args.eager:
            result.errors["eager"] = "--no-eager"
            return None
        limit_mb = self.args.eager_max_mb
        if limit_mb is not None and result.config.logits_bytes() > limit_mb * 2**20:
            result.errors["eager"] = f"skipped: > {limit_mb} MB"
            return None
        args = inputs.args()
        try:
            start = time.perf_counter()
            out = self.reference(*args)  # doubles as the warm-up run when it is fast
            self.timer.synchronize()
            first_s = time.perf_counter() - start
        except Exception as error:
            result.errors["eager"] = short_error(error)
            return None
        if first_s >= self.args.ref_budget:
            result.eager = BoxedTiming(first_s * 1e3, 1)
        else:
            result.eager = time_boxed(
                self.timer, lambda: self.reference(*args), self.args.eager_repeats, self.args.ref_budget, warmup=False
            )
        return out

    @staticmethod
    def _agreement(config: Config, op_out, references: Dict[str, object]) -> str:
        """Token-for-token comparison with each reference that uses the op's random streams.

        The eager reference draws its uniforms from a torch.Generator, not from the op's
        Philox streams, so it can only be compared in greedy mode.
        """
        parts = []
        for name, out in references.items():
            if out is None or (name == "eager" and not config.is_greedy):
                continue
            differ, total = outputs_equal(op_out, out)
            parts.append(f"{name} {'ok' if differ == 0 else f'{differ}/{total} differ'}")
        return ", ".join(parts) or "-"


# =========================================================================== report


def result_table(results: List[Result], cuda: bool) -> Table:
    headers = ["V", "B", "K", "dtype", "mode", "acc", "op ms", "read ms", "op/read"]
    headers += ["GB/s"] if cuda else []
    headers += ["eager ms (runs)", "compiled ms", "compile s", "x eager", "x compiled", "goals", "check"]
    table = Table(headers)
    for r in results:
        c = r.config
        row = [c.vocab, c.batch, c.k, c.dtype, c.mode, "n/a" if r.accepted is None else f"{r.accepted:.2f}"]
        row += [fmt_ms(r.op_ms), fmt_ms(r.read_ms), fmt_ratio(r.read_ratio)]
        if cuda:
            row.append("n/a" if r.gb_per_s() is None else f"{r.gb_per_s():.0f}")
        row += [
            f"{fmt_ms(r.eager.median_ms)} ({r.eager.runs})" if r.eager else "n/a",
            fmt_ms(r.compiled.median_ms) if r.compiled else "n/a",
            "n/a" if r.compile_s is None else f"{r.compile_s:.1f}",
            fmt_ratio(r.speedup(r.eager), 1),
            fmt_ratio(r.speedup(r.compiled), 1),
            goals_cell(r),
            r.agreement,
        ]
        table.add(row)
    return table


def goals_cell(r: Result) -> str:
    failures = r.goal_failures()
    if not failures:
        return "PASS"
    return "FAIL(" + ",".join(failures) + ")"


def notes(results: List[Result], args, bench: "Bench") -> List[str]:
    lines = [
        "acc = mean accepted drafts / K (from the op); op/read = op time / time of torch.amax over the same logits;",
        "x eager, x compiled = reference time / op time; check = op outputs == reference outputs, request by request.",
        "eager = dspark_ext.reference.verify_reference (float64, Python loops), time-boxed: '(n)' = timed runs behind",
        "  the median; it samples with torch.Generator, not the op's Philox streams, so 'check' uses it in greedy only.",
    ]
    if args.compile:
        graphs = "one dynamic-shape graph per mode and dtype" if args.compile_dynamic else "one static graph per config"
        lines += [
            f"compiled = torch.compile(fullgraph=True) of the vectorized reference in bench/bench_verify.py ({graphs},",
            "  compile time excluded from the timing and shown as 'compile s'), NOT of dspark_ext.reference.verify_reference:",
            f"  torch.compile(verify_reference, fullgraph=True) {bench.loop_compile_probe};",
            "  allowing graph breaks, it compiled in 16 s at V=256 B=1 K=4 and then ran 300x slower than eager, and at",
            "  V=32000 B=8 K=4 it had not finished compiling after 15 min (Dynamo unrolls the Python loops over floats).",
            "  The vectorized reference uses the op's Philox streams and tile race, so 'check' compares exact tokens.",
        ]
    elif args.quick:
        lines.append("compiled: skipped in --quick (a cold torch.compile takes 20-70 s per config here); add --compile.")
    else:
        lines.append("compiled: not run (--no-compile).")
    lines.append(
        "op/read < 1 happens for bf16/fp16: torch.amax converts every element, the op reads the same bytes faster."
    )
    reasons = sorted({f"{column}: {reason}" for r in results for column, reason in r.errors.items()})
    lines += [f"n/a {reason}" for reason in reasons]
    return lines


def load_warning() -> List[str]:
    """A warning when other processes competed for the CPU (the numbers are then unreliable)."""
    if not hasattr(os, "getloadavg"):
        return []
    load = os.getloadavg()
    line = "load average (1/5/15 min) at end: " + " ".join(f"{x:.2f}" for x in load)
    if load[1] > 1.5 * (os.cpu_count() or 1):  # the bench itself keeps up to one thread per core busy
        line += " -- WARNING: other processes competed for the CPU; parallel regions can stall, rerun on an idle machine"
    return ["", line]


def goal_summary(results: List[Result]) -> List[str]:
    def summarize(name: str, rows: List[Result], value: Callable[[Result], Optional[float]], ok, worst_fn) -> str:
        measured = [(r, value(r)) for r in rows if value(r) is not None]
        if not measured:
            return f"{name}: n/a (not measured)"
        passed = sum(ok(v) for _, v in measured)
        worst_row, worst = worst_fn(measured, key=lambda item: item[1])
        c = worst_row.config
        verdict = "PASS" if passed == len(measured) else "FAIL"
        return (
            f"{verdict} {name}: {passed}/{len(measured)} configs; worst {worst:.2f}x at "
            f"V={c.vocab} B={c.batch} K={c.k} {c.dtype} {c.mode}"
        )

    greedy = [r for r in results if r.config.is_greedy]
    sampling = [r for r in results if not r.config.is_greedy]
    return [
        summarize(f"greedy op/read <= {GOAL_GREEDY_READ_RATIO}x", greedy, lambda r: r.read_ratio,
                  lambda v: v <= GOAL_GREEDY_READ_RATIO, max),
        summarize(f"sampling op/read <= {GOAL_SAMPLING_READ_RATIO}x", sampling, lambda r: r.read_ratio,
                  lambda v: v <= GOAL_SAMPLING_READ_RATIO, max),
        summarize(f">= {GOAL_EAGER_SPEEDUP:.0f}x faster than eager reference", results, lambda r: r.speedup(r.eager),
                  lambda v: v >= GOAL_EAGER_SPEEDUP, min),
        summarize("faster than compiled reference", results, lambda r: r.speedup(r.compiled),
                  lambda v: v > GOAL_COMPILED_SPEEDUP, min),
    ]


# =========================================================================== main


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="V=32000, B in {1,8}, K=4, fp32, all modes")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtypes", nargs="+", choices=list(DTYPES), default=["fp32", "bf16"])
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    p.add_argument("--vocab", nargs="+", type=int, default=[32000, 49152, 151936])
    p.add_argument("--batch", nargs="+", type=int, default=[1, 8, 64])
    p.add_argument("--k", nargs="+", type=int, default=[1, 4, 8])
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--repeats", type=int, default=25, help="timed runs of op/read and compiled (median)")
    p.add_argument("--min-time", type=float, default=0.25, help="keep timing op/read until this many seconds are spent")
    p.add_argument("--op-budget", type=float, default=3.0, help="seconds of op+read timing per config (>= 3 rounds)")
    p.add_argument("--eager-repeats", type=int, default=3, help="timed runs of the eager reference at most")
    p.add_argument("--ref-budget", type=float, default=3.0, help="seconds per reference per config (>= 1 run)")
    p.add_argument("--eager-max-mb", type=float, default=None, help="skip the eager reference above this many MB of logits")
    p.add_argument("--no-eager", dest="eager", action="store_false", help="do not run the eager reference")
    p.add_argument("--compile", dest="compile", action="store_true", default=None,
                   help="run the compiled reference (default: on, except with --quick)")
    p.add_argument("--no-compile", dest="compile", action="store_false", help="do not run torch.compile")
    p.add_argument("--compile-dynamic", action="store_true",
                   help="compile one dynamic-shape graph per (mode, dtype) instead of one static graph per config")
    p.add_argument("--all-accepted", action="store_true",
                   help="make every draft accepted (target and draft put ~all mass on it): the op then reads "
                        "every row, its worst case (by default drafts are often rejected early and the op "
                        "skips the rows after a request's first rejection)")
    p.add_argument("--markdown", metavar="FILE", help="also write the report as Markdown")
    p.add_argument("--time-limit", type=float, default=None,
                   help="start no new config after this many seconds; report what was measured")
    args = p.parse_args(argv)
    if args.quick:
        args.vocab, args.batch, args.k, args.dtypes = [32000], [1, 8], [4], ["fp32"]
    if args.compile is None:
        args.compile = not args.quick  # a cold torch.compile costs 20-70 s per config on a 2-core CPU
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    import dspark_ext  # noqa: F401  (registers torch.ops.dspark.*)

    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        sys.exit(f"--device {args.device}: torch {torch.__version__} sees no CUDA device")
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    header = ["dspark::verify benchmark", *machine_lines(args.device)]
    try:
        header.append(f"dspark_ext build: {dspark_ext.build_info()}")
    except Exception as error:
        header.append(f"dspark_ext build: n/a ({short_error(error)})")
    print("\n".join(header), flush=True)

    configs = full_grid(args)
    if args.all_accepted:
        print("inputs: every draft accepted (--all-accepted): the op reads every row")
    print(f"{len(configs)} configs; op/read: median of >= {args.repeats} interleaved runs; "
          f"references time-boxed to {args.ref_budget:g} s each\n", flush=True)
    bench = Bench(args)
    results = run_configs(configs, args, bench)
    if len(results) < len(configs):
        print(f"\nstopped after {len(results)}/{len(configs)} configs (--time-limit or SIGTERM)")

    table = result_table(results, cuda=torch.device(args.device).type == "cuda")
    footer = notes(results, args, bench) + [""] + goal_summary(results) + load_warning()
    print("\n" + table.text() + "\n\n" + "\n".join(footer))
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write("# dspark::verify benchmark\n\n")
            f.write("\n".join(f"- {line}" for line in header[1:]) + "\n\n")
            f.write(table.markdown() + "\n\n" + "\n".join(f"{line}  " for line in footer) + "\n")
        print(f"\nwrote {args.markdown}")
    return 0 if all(r.op_ms is not None for r in results) else 1


def run_configs(configs: List[Config], args, bench: Bench) -> List[Result]:
    """Runs the configs (inputs made once per shape); stops early at --time-limit or SIGTERM."""
    signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)  # `timeout` still gets a table
    start = time.perf_counter()
    results: List[Result] = []
    shape_key = lambda c: (c.vocab, c.batch, c.k, c.dtype)  # noqa: E731
    try:
        for key, group in itertools.groupby(configs, key=shape_key):
            if args.time_limit is not None and time.perf_counter() - start > args.time_limit:
                break
            data = make_shape_data(key[0], key[1], key[2], DTYPES[key[3]], args.device, args.all_accepted)
            for config in group:
                results.append(bench.run(config, data))
                print(progress_line(results[-1]), flush=True)
            del data
    except KeyboardInterrupt:
        print("interrupted", flush=True)
    return results


def _raise_keyboard_interrupt(signum, frame):
    raise KeyboardInterrupt


def progress_line(r: Result) -> str:
    c = r.config
    eager = f"{fmt_ms(r.eager.median_ms)}" if r.eager else "n/a"
    compiled = f"{fmt_ms(r.compiled.median_ms)}" if r.compiled else "n/a"
    return (
        f"  V={c.vocab:<6} B={c.batch:<2} K={c.k} {c.dtype:4} {c.mode:18} op {fmt_ms(r.op_ms):>7} ms  "
        f"read {fmt_ms(r.read_ms):>7} ms ({fmt_ratio(r.read_ratio)})  eager {eager:>7} ms  compiled {compiled:>7} ms"
    )


if __name__ == "__main__":
    sys.exit(main())
