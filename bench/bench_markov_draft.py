"""Benchmark of torch.ops.dspark.markov_draft against its references and against a memory floor.

    python3 bench/bench_markov_draft.py --quick          # 4 small configs, well under a minute
    python3 bench/bench_markov_draft.py                  # full grid, 144 configs (< 20 min on 2 cores)
    python3 bench/bench_markov_draft.py --no-op          # references and floor only
    python3 bench/bench_markov_draft.py --vocab 151936 --rank 256 --batch 64 --k 15 --markdown out.md

The op drafts K tokens per request with a Markov head: at step k it adds the bias W2 @ W1[prev]
to the backbone logits U_k, writes the corrected row to draft_logits and picks the next token
(argmax at T = 0, a sample of softmax(l / T) at T > 0); prev is the anchor token, then the
previous draft. For every config (vocab V, Markov rank r, batch B, drafts K, dtype, mode):

  op          median time of the op (n/a with --no-op or when the build does not have it)
  floor       the memory floor: one read of the base logits plus one write of the draft logits,
              timed as a plain copy into a [B, K, V] buffer, plus K reads of W2, timed as K
              torch.sum over W2's bytes viewed as float32 (so bf16 is read at byte speed);
              both timed interleaved with the op, so op/floor is the op's cost in floors
  alloc       what producing a *new* [B, K, V] tensor adds to the copy (U.clone() minus the copy
              into a reused buffer): the first-touch page faults of the output, which the op and
              both references pay on every call; large with 4 KB pages, small when torch's
              allocator asks for huge pages (THP_MEM_ALLOC_ENABLE=1)
  compute     the op's multiply-adds (2 B K V r flops) at the peak GEMM rate of torch on this
              machine (a 2048^3 torch.mm in the weight dtype or in float32, whichever is faster,
              best of 5, measured at the start): where compute > 2x floor even a kernel at that
              rate misses the floor goal
  eager       markov_draft_loop below, "as DeepSpec does": per step W1[prev], F.linear, add to
              U_k, write the row, argmax or softmax + torch.multinomial, confidence; time-boxed,
              "(n)" = timed runs behind the median
  compiled    torch.compile(fullgraph=True) of the same loop, sampling with an exponential race
              (argmax(l / T - log E), E ~ Exp(1) from Tensor.exponential_: the same law as
              softmax + multinomial, without the multinomial fallback kernel)
  x eager, x compiled   speedup of the op over each reference
  eager/bound eager time / max(floor, compute): about the most any op can gain over eager

Every function of a config is timed round-robin (copy, clone, reads, op, eager, compiled, copy,
...): a function leaves the rotation once it has enough runs or has used its time box, but the op
and the floor passes stay in it as long as a reference does, so every ratio compares timings
taken at the same time (the machine may be shared). Compilation is never timed.

Modes: greedy (T = 0), sample (T = 1). dtypes: fp32, bf16, fp16 (logits and weights alike),
bf16-w32 (bf16 logits, fp32 weights). Inputs: U_k is N(0, 1) plus 5 hot tokens per row holding
~99% of the mass, W1 ~ N(0, 1), W2 ~ N(0, 1 / r) (bias ~ N(0, 1)), random anchors.
"""

from __future__ import annotations

import argparse
import gc
import itertools
import os
import signal
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (  # noqa: E402
    BoxedTiming,
    Table,
    Timer,
    fmt_ms,
    fmt_ratio,
    language_model_like_logits,
    machine_lines,
    op_availability,
    short_error,
)

MODES = ("greedy", "sample")
DTYPES = {  # name -> (logits dtype, Markov weight dtype)
    "fp32": (torch.float32, torch.float32),
    "bf16": (torch.bfloat16, torch.bfloat16),
    "fp16": (torch.float16, torch.float16),
    "bf16-w32": (torch.bfloat16, torch.float32),
}

# Goals (per config, on CPU).
GOAL_EAGER_SPEEDUP = 5.0
GOAL_COMPILED_SPEEDUP = 1.0  # strictly faster
GOAL_FLOOR_RATIO = 2.0


# =========================================================================== configs


@dataclass(frozen=True)
class Config:
    vocab: int
    rank: int
    batch: int
    k: int
    dtype: str
    mode: str

    @property
    def logits_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype][0]

    @property
    def weight_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype][1]

    @property
    def is_greedy(self) -> bool:
        return self.mode == "greedy"

    def label(self) -> str:
        return f"V={self.vocab} r={self.rank} B={self.batch} K={self.k} {self.dtype} {self.mode}"


def full_grid(args) -> List[Config]:
    """Run (and table) order: dtype, V, r, B, K, mode."""
    return [
        Config(v, r, b, k, d, m)
        for d, v, r, b, k, m in itertools.product(args.dtypes, args.vocab, args.rank, args.batch, args.k, args.modes)
    ]


@dataclass
class Result:
    config: Config
    op_ms: Optional[float] = None
    copy_ms: Optional[float] = None  # one read of U + one write of [B, K, V]
    clone_ms: Optional[float] = None  # the same into a new tensor
    reads_ms: Optional[float] = None  # K reads of W2
    compute_ms: Optional[float] = None  # 2 B K V r flops at the peak GEMM rate
    eager: Optional[BoxedTiming] = None
    compiled: Optional[BoxedTiming] = None
    compile_s: Optional[float] = None
    errors: Dict[str, str] = field(default_factory=dict)  # column -> reason for n/a
    check: str = "-"
    wall_s: float = 0.0  # time this config took, warm-up, compilation and check included

    @property
    def floor_ms(self) -> Optional[float]:
        return self.copy_ms + self.reads_ms if self.copy_ms and self.reads_ms else None

    @property
    def alloc_ms(self) -> Optional[float]:
        return max(0.0, self.clone_ms - self.copy_ms) if self.clone_ms and self.copy_ms else None

    @property
    def floor_ratio(self) -> Optional[float]:
        return self.op_ms / self.floor_ms if self.op_ms and self.floor_ms else None

    def speedup(self, baseline: Optional[BoxedTiming]) -> Optional[float]:
        return baseline.median_ms / self.op_ms if baseline and self.op_ms else None

    @property
    def bound_ms(self) -> Optional[float]:
        """max(memory floor, arithmetic at peak GEMM rate): no op can be much faster."""
        return max(self.floor_ms, self.compute_ms or 0.0) if self.floor_ms else None

    def eager_over_bound(self) -> Optional[float]:
        return self.eager.median_ms / self.bound_ms if self.eager and self.bound_ms else None

    def goal_failures(self) -> Optional[List[str]]:
        """Names of the goals this row misses; None when the op was not run at all."""
        if self.op_ms is None:
            return None if self.errors.get("op", "").startswith("skipped") else ["op"]
        failed = []
        if self.floor_ratio is not None and self.floor_ratio > GOAL_FLOOR_RATIO:
            failed.append("floor")
        eager = self.speedup(self.eager)
        if eager is not None and eager < GOAL_EAGER_SPEEDUP:
            failed.append("eager")
        compiled = self.speedup(self.compiled)
        if compiled is not None and compiled <= GOAL_COMPILED_SPEEDUP:
            failed.append("compiled")
        return failed


# =========================================================================== inputs


@dataclass
class DraftInputs:
    """Arguments of dspark::markov_draft for one config, in the op's order."""

    base_logits: torch.Tensor  # [B, K, V]
    prev_token_ids: torch.Tensor  # [B] int64
    markov_w1: torch.Tensor  # [V, r]
    markov_w2: torch.Tensor  # [V, r]
    temperature: torch.Tensor  # [B] float32
    seed: torch.Tensor  # [B] int64
    offset: torch.Tensor  # [B] int64
    conf_base: Optional[torch.Tensor]  # [B, K] float32
    conf_w_prev: Optional[torch.Tensor]  # [r] float32
    conf_temperature: Optional[torch.Tensor]  # [K] float32

    def args(self) -> tuple:
        return (
            self.base_logits, self.prev_token_ids, self.markov_w1, self.markov_w2, self.temperature,
            self.seed, self.offset, self.conf_base, self.conf_w_prev, self.conf_temperature,
        )

    def loop_args(self) -> tuple:
        """Arguments of markov_draft_loop (no seed / offset: the references use torch's RNG)."""
        return (
            self.base_logits, self.prev_token_ids, self.markov_w1, self.markov_w2, self.temperature,
            self.conf_base, self.conf_w_prev, self.conf_temperature,
        )


def make_base_logits(vocab: int, batch: int, k: int, device: str) -> torch.Tensor:
    """U [B, K, V] in float32, the same for every dtype and rank of one (V, B, K)."""
    gen = torch.Generator(device=device).manual_seed(4321 + vocab + 31 * batch + 7 * k)
    return language_model_like_logits(batch * k, vocab, gen, device).view(batch, k, vocab)


def make_weights(vocab: int, rank: int, dtype: torch.dtype, device: str) -> Tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator(device=device).manual_seed(987 + vocab + rank)
    w1 = torch.randn(vocab, rank, generator=gen, device=device)
    w2 = torch.randn(vocab, rank, generator=gen, device=device) / rank**0.5
    return w1.to(dtype), w2.to(dtype)


def make_inputs(config: Config, base_fp32: torch.Tensor, weights, confidence: bool) -> DraftInputs:
    device = base_fp32.device
    batch, k, vocab = base_fp32.shape
    gen = torch.Generator(device=device).manual_seed(55 + batch + k)
    with_conf = lambda t: t if confidence else None  # noqa: E731
    return DraftInputs(
        base_logits=base_fp32.to(config.logits_dtype),
        prev_token_ids=torch.randint(0, vocab, (batch,), generator=gen, device=device),
        markov_w1=weights[0],
        markov_w2=weights[1],
        temperature=torch.full((batch,), 0.0 if config.is_greedy else 1.0, device=device),
        seed=torch.arange(batch, dtype=torch.int64, device=device) * 7919 + 12345,
        offset=torch.full((batch,), 3, dtype=torch.int64, device=device),
        conf_base=with_conf(torch.randn(batch, k, generator=gen, device=device)),
        conf_w_prev=with_conf(torch.randn(config.rank, generator=gen, device=device) / config.rank**0.5),
        conf_temperature=with_conf(torch.linspace(1.0, 2.0, k, device=device)),
    )


# =========================================================================== references


def markov_draft_loop(
    base_logits, prev_token_ids, markov_w1, markov_w2, temperature, conf_base, conf_w_prev, conf_temperature,
    greedy: bool, sampler: str = "multinomial",
):
    """The reference loop, as DeepSpec drafts: K sequential steps of gather, GEMM, add and pick.

    Same outputs as the op. The bias is computed in the weight dtype (F.linear of bf16 weights
    rounds it to bf16 before the add; the op adds in float32 and rounds once), and tokens are
    drawn with torch's generator (``sampler="multinomial"``: softmax + torch.multinomial, the
    eager reference; ``"race"``: argmax(l / T - log E) with E ~ Exp(1), used under torch.compile).
    """
    batch, num_draft, _ = base_logits.shape
    draft_logits = torch.empty_like(base_logits)
    draft_ids = torch.empty(batch, num_draft, dtype=torch.int64, device=base_logits.device)
    confidence = torch.empty(batch if conf_base is not None else 0, num_draft, dtype=torch.float32,
                             device=base_logits.device)
    prev = prev_token_ids
    for k in range(num_draft):
        a = markov_w1[prev]  # [B, r]: embedding gather
        logits = base_logits[:, k] + F.linear(a, markov_w2)  # [B, V]: U_k + W2 @ W1[prev]
        draft_logits[:, k] = logits
        if conf_base is not None:
            confidence[:, k] = torch.sigmoid((conf_base[:, k] + a.float() @ conf_w_prev) / conf_temperature[k])
        if greedy:
            prev = logits.argmax(-1)
        elif sampler == "multinomial":
            probs = torch.softmax(logits.float() / temperature[:, None], -1)
            prev = torch.multinomial(probs, 1).squeeze(1)
        else:
            race = torch.empty_like(logits, dtype=torch.float32).exponential_()
            prev = (logits.float() / temperature[:, None] - race.log()).argmax(-1)
        draft_ids[:, k] = prev
    return draft_ids, draft_logits, confidence.flatten() if conf_base is None else confidence


def check_op(inputs: DraftInputs, config: Config, op_out, reference_ids: Dict[str, torch.Tensor]) -> str:
    """Checks the op's outputs against the contract, replaying the op's own tokens (teacher forcing).

    draft_logits must equal U + W2 @ W1[prev] within float32 summation-order error, rounded to
    the logits dtype (1 ulp allowed); greedy tokens must be the first argmax of their own row;
    the confidence must match. Greedy tokens are also compared with each reference's
    (informational: the bf16 references round the bias before the add, so near-ties may differ).
    Runs on the op's device, one draft position at a time ([B, V] temporaries).
    """
    ids, logits, conf = op_out
    base = inputs.base_logits
    batch, num_draft, vocab = base.shape
    if (ids.shape, ids.dtype, logits.shape, logits.dtype) != ((batch, num_draft), torch.int64, base.shape, base.dtype):
        return f"bad outputs {tuple(ids.shape)} {ids.dtype} {tuple(logits.shape)} {logits.dtype}"
    if bool(((ids < 0) | (ids >= vocab)).any()):
        return "ids out of range"
    problems = []
    prev = torch.cat([inputs.prev_token_ids[:, None], ids[:, :-1]], 1)  # [B, K]
    a = inputs.markov_w1[prev].float()  # [B, K, r]
    w2 = inputs.markov_w2.float()
    relative = 1e-5 if base.dtype == torch.float32 else torch.finfo(base.dtype).eps  # 1 ulp
    rows_off = 0
    for k in range(num_draft):
        expected = (a[:, k] @ w2.T).add_(base[:, k]).to(base.dtype).float()
        off = (logits[:, k].float() - expected).abs() > 1e-3 + relative * expected.abs()
        rows_off += int(off.any(-1).sum())
    if rows_off:
        problems.append(f"logits {rows_off}/{batch * num_draft} rows off")
    if config.is_greedy:
        not_argmax = int((ids != logits.argmax(-1)).sum())
        if not_argmax:
            problems.append(f"{not_argmax} ids != row argmax")
    if inputs.conf_base is not None:
        z = inputs.conf_base + a @ inputs.conf_w_prev
        if not torch.allclose(conf, torch.sigmoid(z / inputs.conf_temperature), atol=1e-5, rtol=1e-5):
            problems.append("confidence off")
    parts = [", ".join(problems) or "ok"]
    if config.is_greedy:
        for name, ref_ids in reference_ids.items():
            differ = int((ref_ids != ids).any(-1).sum())
            parts.append(f"{name} {'ok' if differ == 0 else f'{differ}/{batch} differ'}")
    return ", ".join(parts)


# =========================================================================== timing


@dataclass
class Box:
    """When a function leaves the timing rotation: after `target_runs` runs once `min_time_s`
    seconds are spent, or once `budget_s` seconds are spent (after at least `min_runs` runs)."""

    target_runs: int
    min_time_s: float
    budget_s: float
    min_runs: int = 1
    max_runs: int = 2000

    def full(self, samples: List[float]) -> bool:
        runs, spent_s = len(samples), sum(samples) / 1e3
        return (
            runs >= self.max_runs
            or (runs >= self.target_runs and spent_s >= self.min_time_s)
            or (runs >= self.min_runs and spent_s >= self.budget_s)
        )


def interleaved_boxed(
    timer: Timer, fns: Dict[str, Callable[[], object]], boxes: Dict[str, Box], anchors: Tuple[str, ...],
    samples: Optional[Dict[str, List[float]]] = None,
) -> Dict[str, BoxedTiming]:
    """Round-robin timing (fn1, fn2, ..., fn1, fn2, ...) of already warmed-up functions.

    Each round times every function whose box is not full; the `anchors` (the op and the
    floor passes) are also timed in every round while any other function still is, so the
    ratios to a slow reference compare samples from the same stretch of time. `samples`
    seeds measurements taken before (a slow reference's first run)."""
    samples = {name: list((samples or {}).get(name, [])) for name in fns}
    while True:
        active = [name for name in fns if not boxes[name].full(samples[name])]
        if not active:
            break
        if any(name not in anchors for name in active):
            active = [name for name in fns if name in anchors or name in active]
        for name in active:
            samples[name].append(timer.time_ms(fns[name]))
    return {name: BoxedTiming(statistics.median(s), len(s)) for name, s in samples.items() if s}


def as_float32_words(t: torch.Tensor) -> torch.Tensor:
    """The tensor's bytes viewed as float32 when possible, so a sum reads them at byte speed."""
    if t.dtype != torch.float32 and t.is_contiguous() and (t.shape[-1] * t.element_size()) % 4 == 0:
        return t.view(torch.float32)
    return t


class Bench:
    def __init__(self, args, op_reason: Optional[str], gemm_peaks: Dict[torch.dtype, float]):
        self.args = args
        self.timer = Timer(args.device)
        self.op_reason = op_reason  # why the op is skipped (None: run it)
        self.gemm_peaks = gemm_peaks  # weight dtype -> flop/s
        self.compiled_loop = None
        if args.compile and not args.compile_static:
            self.compiled_loop = torch.compile(markov_draft_loop, fullgraph=True, dynamic=True)

    def run(self, config: Config, inputs: DraftInputs) -> Result:
        """Warms every function up (keeping the first outputs), times them round-robin, checks."""
        args, result = self.args, Result(config)
        start = time.perf_counter()
        flops = 2 * config.batch * config.k * config.vocab * config.rank
        result.compute_ms = flops / self.gemm_peaks[config.weight_dtype] * 1e3
        fast = Box(args.repeats, args.min_time, args.op_budget, min_runs=3)
        fns = self._floor_fns(config, inputs)
        boxes: Dict[str, Box] = {name: fast for name in fns}
        first: Dict[str, List[float]] = {}  # samples taken during the warm-up
        outputs: Dict[str, tuple] = {}  # first outputs, for the check

        for name, fn in self._candidates(config, inputs, result).items():
            try:
                first_ms, outputs[name] = self._first_call(fn)
            except Exception as error:
                result.errors[name] = short_error(error)
                continue
            fns[name] = fn
            if name != "op":
                outputs[name] = outputs[name][:1]  # the check needs only the references' ids
            if name == "eager":
                boxes[name] = Box(args.eager_repeats, 0.0, args.ref_budget)
                if first_ms / 1e3 >= args.ref_budget:  # a slow loop has nothing to warm up: keep the sample
                    first[name] = [first_ms]
            elif name == "compiled":
                boxes[name] = Box(args.repeats, args.min_time, args.ref_budget)
                result.compile_s = first_ms / 1e3
            else:
                boxes[name] = fast
                if first_ms < 100:  # a second warm-up run where it is cheap
                    fn()
        for name in ("copy", "clone", "reads"):
            fns[name]()  # warm-up

        timings = interleaved_boxed(self.timer, fns, boxes, anchors=("op", "copy", "clone", "reads"),
                                     samples=first)
        median = lambda name: timings[name].median_ms if name in timings else None  # noqa: E731
        result.op_ms, result.copy_ms, result.clone_ms, result.reads_ms = map(median, ("op", "copy", "clone", "reads"))
        result.eager, result.compiled = timings.get("eager"), timings.get("compiled")
        result.check = self._check(config, inputs, outputs)
        result.wall_s = time.perf_counter() - start
        return result

    def _candidates(self, config: Config, inputs: DraftInputs, result: Result) -> Dict[str, Callable[[], tuple]]:
        """The op and the references that this run measures (the others get an n/a reason)."""
        args, candidates = self.args, {}
        if self.op_reason is None:
            op_args = inputs.args()
            candidates["op"] = lambda: torch.ops.dspark.markov_draft(*op_args)
        else:
            result.errors["op"] = self.op_reason
        greedy, loop_args = config.is_greedy, inputs.loop_args()
        if args.eager:
            candidates["eager"] = lambda: markov_draft_loop(*loop_args, greedy=greedy)
        else:
            result.errors["eager"] = "--no-eager"
        if args.compile:
            compiled, sampler = self._compiled_loop(), args.compiled_sampler
            candidates["compiled"] = lambda: compiled(*loop_args, greedy=greedy, sampler=sampler)
        else:
            result.errors["compiled"] = "skipped in --quick (add --compile)" if args.quick else "--no-compile"
        return candidates

    def _first_call(self, fn: Callable[[], tuple]) -> Tuple[float, tuple]:
        start = time.perf_counter()
        out = fn()
        self.timer.synchronize()
        return (time.perf_counter() - start) * 1e3, out

    @staticmethod
    def _floor_fns(config: Config, inputs: DraftInputs) -> Dict[str, Callable[[], object]]:
        """The memory floor's passes: copy U into a [B, K, V] buffer, read W2 K times; and a clone of U."""
        base, scratch = inputs.base_logits, torch.empty_like(inputs.base_logits)
        w2_words, k = as_float32_words(inputs.markov_w2), config.k

        def reads():
            for _ in range(k):
                torch.sum(w2_words)

        return {"copy": lambda: scratch.copy_(base), "clone": base.clone, "reads": reads}

    def _compiled_loop(self):
        if self.compiled_loop is not None:
            return self.compiled_loop  # one dynamic-shape graph per (K, dtype, mode, B == 1, confidence)
        torch._dynamo.reset()  # --compile-static: one static graph for this config
        return torch.compile(markov_draft_loop, fullgraph=True, dynamic=False)

    @staticmethod
    def _check(config: Config, inputs: DraftInputs, outputs: Dict[str, tuple]) -> str:
        reference_ids = {name: outputs[name][0] for name in ("eager", "compiled") if name in outputs}
        if "op" in outputs:
            return check_op(inputs, config, outputs["op"], reference_ids)
        if config.is_greedy and len(reference_ids) == 2:  # no op: at least check the references agree
            differ = int((reference_ids["eager"] != reference_ids["compiled"]).any(-1).sum())
            return "compiled = eager" if differ == 0 else f"compiled: {differ}/{config.batch} differ from eager"
        return "-"


# =========================================================================== report


def result_table(results: List[Result]) -> Table:
    table = Table([
        "V", "r", "B", "K", "dtype", "mode", "op ms", "floor ms", "alloc ms", "compute ms", "op/floor",
        "eager ms (runs)", "compiled ms", "compile s", "x eager", "x compiled", "eager/bound", "goals", "check",
    ])
    for r in results:
        c = r.config
        failures = r.goal_failures()
        goals = "n/a" if failures is None else ("PASS" if not failures else "FAIL(" + ",".join(failures) + ")")
        table.add([
            c.vocab, c.rank, c.batch, c.k, c.dtype, c.mode,
            fmt_ms(r.op_ms), fmt_ms(r.floor_ms), fmt_ms(r.alloc_ms), fmt_ms(r.compute_ms),
            fmt_ratio(r.floor_ratio),
            f"{fmt_ms(r.eager.median_ms)} ({r.eager.runs})" if r.eager else "n/a",
            fmt_ms(r.compiled.median_ms) if r.compiled else "n/a",
            "n/a" if r.compile_s is None else f"{r.compile_s:.1f}",
            fmt_ratio(r.speedup(r.eager), 1), fmt_ratio(r.speedup(r.compiled), 1),
            fmt_ratio(r.eager_over_bound(), 1),
            goals, r.check,
        ])
    return table


def notes(results: List[Result], args, gemm_peaks: Dict[torch.dtype, float]) -> List[str]:
    peaks = ", ".join(f"{str(dtype).replace('torch.', '')} {rate / 1e9:.0f}" for dtype, rate in gemm_peaks.items())
    lines = [
        "floor = copy U -> [B, K, V] buffer (one read of the base logits, one write of the draft logits)",
        "  + K x torch.sum over W2 (bytes viewed as float32), each timed interleaved with the op;",
        "alloc = U.clone() - that copy: first-touch cost of a new [B, K, V] output, paid by the op and both",
        "  references, not part of the floor (THP_MEM_ALLOC_ENABLE="
        f"{os.environ.get('THP_MEM_ALLOC_ENABLE', 'unset')}: 1 makes torch ask for huge pages);",
        "compute = 2 B K V r flops at torch's peak GEMM rate here (2048^3 torch.mm in the weight dtype or",
        f"  in float32, whichever is faster; GFLOP/s: {peaks});",
        "eager = markov_draft_loop in this file (W1[prev], F.linear, add, row write, argmax or",
        "  softmax + torch.multinomial, confidence), time-boxed: '(n)' = timed runs behind the median;",
        "x eager, x compiled = reference time / op time; eager/bound = eager time / max(floor, compute);",
        "check = op outputs vs U + W2 @ W1[op's own previous tokens] (1 ulp), greedy ids vs the row argmax",
        "  and the confidence; then greedy ids of each reference (bf16 references round the bias first);",
        "  without the op: greedy ids of the compiled loop vs the eager loop.",
    ]
    if args.compile:
        graphs = ("one static graph per config (--compile-static)" if args.compile_static else
                  "dynamic=True: one graph per K, dtype, mode and B == 1 vs B > 1, reused across V, r, B")
        lines += [
            f"compiled = torch.compile(markov_draft_loop, fullgraph=True), sampler={args.compiled_sampler!r},",
            f"  {graphs};",
            "  'compile s' = its first call (compilation included when it made a new graph), not timed.",
            "  The race sampler draws argmax(l/T - log E), E ~ Exp(1) (Tensor.exponential_), the same law as",
            "  softmax + multinomial; multinomial is also captured by fullgraph=True (--compiled-sampler multinomial)",
            "  but runs as the eager multinomial kernel.",
        ]
    reasons = sorted({f"{column}: {reason}" for r in results for column, reason in r.errors.items()})
    lines += [f"n/a {reason}" for reason in reasons]
    return lines


def goal_summary(results: List[Result]) -> List[str]:
    def summarize(name: str, value: Callable[[Result], Optional[float]], ok: Callable[[float], bool],
                  worst_is_max: bool) -> str:
        measured = [(r, v) for r in results if (v := value(r)) is not None]
        if not measured:
            return f"{name}: n/a (not measured)"
        passed = sum(ok(v) for _, v in measured)
        values = [v for _, v in measured]
        worst_row, worst = (max if worst_is_max else min)(measured, key=lambda item: item[1])
        verdict = "PASS" if passed == len(measured) else "FAIL"
        return (f"{verdict} {name}: met in {passed}/{len(measured)} configs; range {min(values):.2f}x-"
                f"{max(values):.2f}x; worst at {worst_row.config.label()}")

    def headroom(name: str, value: Callable[[Result], Optional[float]], bad: Callable[[float], bool],
                 meaning: str) -> str:
        values = [v for r in results if (v := value(r)) is not None]
        if not values:
            return f"{name}: n/a"
        return (f"{name}: {min(values):.2f}x-{max(values):.2f}x; {sum(bad(v) for v in values)}/{len(values)} "
                f"configs {meaning}")

    return [
        summarize(f">= {GOAL_EAGER_SPEEDUP:g}x faster than the eager loop", lambda r: r.speedup(r.eager),
                  lambda v: v >= GOAL_EAGER_SPEEDUP, worst_is_max=False),
        summarize("faster than the compiled loop", lambda r: r.speedup(r.compiled),
                  lambda v: v > GOAL_COMPILED_SPEEDUP, worst_is_max=False),
        summarize(f"<= {GOAL_FLOOR_RATIO:g}x the memory floor", lambda r: r.floor_ratio,
                  lambda v: v <= GOAL_FLOOR_RATIO, worst_is_max=True),
        headroom("alloc/floor", lambda r: r.alloc_ms / r.floor_ms if r.alloc_ms is not None and r.floor_ms else None,
                 lambda v: v > GOAL_FLOOR_RATIO - 1.0,
                 f"> {GOAL_FLOOR_RATIO - 1:g}x (there a new output alone costs more than the floor goal leaves)"),
        headroom("compute/floor", lambda r: r.compute_ms / r.floor_ms if r.floor_ms else None,
                 lambda v: v > GOAL_FLOOR_RATIO,
                 f"> {GOAL_FLOOR_RATIO:g}x (there the floor goal needs arithmetic faster than torch's peak GEMM)"),
        headroom("eager/bound", Result.eager_over_bound, lambda v: v < GOAL_EAGER_SPEEDUP,
                 f"< {GOAL_EAGER_SPEEDUP:g}x (there an op at max(floor, compute) is not {GOAL_EAGER_SPEEDUP:g}x faster "
                 "than eager)"),
    ]


def load_line(when: str) -> List[str]:
    if not hasattr(os, "getloadavg"):
        return []
    load = os.getloadavg()
    line = f"load average (1/5/15 min) at {when}: " + " ".join(f"{x:.2f}" for x in load)
    if when == "end" and load[1] > 1.5 * (os.cpu_count() or 1):
        line += " -- WARNING: other processes competed for the CPU; rerun on an idle machine"
    return [line]


def progress_line(r: Result) -> str:
    eager = fmt_ms(r.eager.median_ms) if r.eager else "n/a"
    compiled = fmt_ms(r.compiled.median_ms) if r.compiled else "n/a"
    return (f"  {r.config.label():42} op {fmt_ms(r.op_ms):>7} ms  floor {fmt_ms(r.floor_ms):>7} ms "
            f"({fmt_ratio(r.floor_ratio)})  compute {fmt_ms(r.compute_ms):>7}  eager {eager:>7}  "
            f"compiled {compiled:>7}  [{r.wall_s:.0f} s]  {r.check}")


# =========================================================================== main


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="V=49152, r=64, B in {1, 8}, K=4, fp32, both modes")
    p.add_argument("--device", default="cpu")
    p.add_argument("--vocab", nargs="+", type=int, default=[49152, 151936])
    p.add_argument("--rank", nargs="+", type=int, default=[64, 256], help="Markov rank r")
    p.add_argument("--batch", nargs="+", type=int, default=[1, 8, 64])
    p.add_argument("--k", nargs="+", type=int, default=[4, 7, 15], help="drafts per request")
    p.add_argument("--dtypes", nargs="+", choices=list(DTYPES), default=["fp32", "bf16"])
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    p.add_argument("--no-confidence", dest="confidence", action="store_false",
                   help="no confidence head (conf_* = None; the loops skip it too)")
    p.add_argument("--no-op", dest="op", action="store_false", help="skip the op (references and floor only)")
    p.add_argument("--no-eager", dest="eager", action="store_false", help="do not run the eager loop")
    p.add_argument("--compile", dest="compile", action="store_true", default=None,
                   help="run the compiled loop (default: on, except with --quick)")
    p.add_argument("--no-compile", dest="compile", action="store_false", help="do not run torch.compile")
    p.add_argument("--compile-static", action="store_true", help="one static graph per config (slow: ~10-30 s each)")
    p.add_argument("--compiled-sampler", choices=("race", "multinomial"), default="race")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--repeats", type=int, default=20, help="target timed runs of op / floor / compiled")
    p.add_argument("--min-time", type=float, default=0.2, help="seconds of timed runs op / floor / compiled aim for")
    p.add_argument("--op-budget", type=float, default=1.5, help="seconds per op / floor pass per config (>= 3 runs)")
    p.add_argument("--eager-repeats", type=int, default=3, help="timed runs of the eager loop at most")
    p.add_argument("--ref-budget", type=float, default=1.5, help="seconds per reference per config (>= 1 run)")
    p.add_argument("--markdown", metavar="FILE", help="also write the report as Markdown")
    p.add_argument("--time-limit", type=float, default=None,
                   help="start no new config after this many seconds; report what was measured")
    args = p.parse_args(argv)
    if args.quick:
        args.vocab, args.rank, args.batch, args.k, args.dtypes = [49152], [64], [1, 8], [4], ["fp32"]
    if args.compile is None:
        args.compile = not args.quick  # each new graph costs ~10-20 s on a 2-core CPU
    return args


def gemm_peaks(dtypes, device: str) -> Dict[torch.dtype, float]:
    """flop/s the op's arithmetic could reach per weight dtype: the faster of torch's GEMM in that
    dtype and in float32 (a kernel can always widen to float32), each the best of 5 runs of a
    square torch.mm of size 2048 (smaller where the dtype is slow: fp16 on most CPUs)."""
    timer, measured = Timer(device), {}
    for dtype in {torch.float32, *dtypes}:
        for size in (256, 2048):
            a, b = (torch.randn(size, size, device=device).to(dtype) for _ in range(2))
            torch.mm(a, b)
            best_ms = min(timer.time_ms(lambda: torch.mm(a, b)) for _ in range(5))
            measured[dtype] = 2 * size**3 / (best_ms / 1e3)
            if best_ms > 5.0:  # < 7 GFLOP/s: no fast GEMM in this dtype, do not spend seconds on it
                break
    return {dtype: max(measured[dtype], measured[torch.float32]) for dtype in dtypes}




def main(argv=None) -> int:
    args = parse_args(argv)
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        sys.exit(f"--device {args.device}: torch {torch.__version__} sees no CUDA device")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    # One dynamic graph per (K, dtype, mode, B == 1): more than Dynamo's default of 8 per function.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 256)
    torch._dynamo.config.accumulated_recompile_limit = max(torch._dynamo.config.accumulated_recompile_limit, 1024)

    op_reason, build = op_availability("markov_draft", args.op)
    header = ["dspark::markov_draft benchmark", *machine_lines(args.device), f"dspark_ext build: {build}"]
    if op_reason:
        header.append(f"op: {op_reason}")
    print("\n".join(header), flush=True)
    configs = full_grid(args)
    print(f"{len(configs)} configs; confidence head {'on' if args.confidence else 'off'}; op and floor: median of "
          f">= {args.repeats} interleaved runs, references time-boxed to {args.ref_budget:g} s each\n", flush=True)

    start = time.perf_counter()
    peaks = gemm_peaks(sorted({DTYPES[d][1] for d in args.dtypes}, key=str), args.device)
    results = run_configs(configs, args, Bench(args, op_reason, peaks))
    elapsed = time.perf_counter() - start
    if len(results) < len(configs):
        print(f"\nstopped after {len(results)}/{len(configs)} configs (--time-limit or SIGTERM)")

    table = result_table(results)
    footer = notes(results, args, peaks) + [""] + goal_summary(results) + [""] + load_line("end")
    footer.append(f"wall time: {elapsed:.0f} s for {len(results)} configs")
    print("\n" + table.text() + "\n\n" + "\n".join(footer))
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write("# dspark::markov_draft benchmark\n\n")
            f.write("\n".join(f"- {line}" for line in header[1:]) + "\n\n")
            f.write(table.markdown() + "\n\n" + "\n".join(f"{line}  " for line in footer) + "\n")
        print(f"\nwrote {args.markdown}")
    return 0 if all(r.goal_failures() != ["op"] for r in results) else 1


def run_configs(configs: List[Config], args, bench: Bench) -> List[Result]:
    """Runs the configs in order, caching the current U (up to 583 MB) and the weights of the current V."""
    signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)  # `timeout` still gets a table
    start = time.perf_counter()
    results: List[Result] = []
    base_cache: Dict[tuple, torch.Tensor] = {}
    weight_cache: Dict[tuple, Tuple[torch.Tensor, torch.Tensor]] = {}
    try:
        for config in configs:
            if args.time_limit is not None and time.perf_counter() - start > args.time_limit:
                break
            base_key = (config.vocab, config.batch, config.k)
            weight_key = (config.vocab, config.rank, config.weight_dtype)
            if base_key not in base_cache:
                base_cache.clear()
                base_cache[base_key] = make_base_logits(*base_key, args.device)
            if weight_key not in weight_cache:
                if any(key[0] != config.vocab for key in weight_cache):
                    weight_cache.clear()
                weight_cache[weight_key] = make_weights(*weight_key, args.device)
            inputs = make_inputs(config, base_cache[base_key], weight_cache[weight_key], args.confidence)
            results.append(bench.run(config, inputs))
            print(progress_line(results[-1]), flush=True)
            del inputs
            gc.collect()
    except KeyboardInterrupt:
        print("interrupted", flush=True)
    return results


def _raise_keyboard_interrupt(signum, frame):
    raise KeyboardInterrupt


if __name__ == "__main__":
    sys.exit(main())
