"""Benchmark of torch.ops.dspark.schedule against its torch composition and against a read pass.

    python3 bench/bench_schedule.py --quick          # 8 configs, no torch.compile, a few seconds
    python3 bench/bench_schedule.py                  # full grid, 40 configs (~75 s on an idle 2-core CPU)
    python3 bench/bench_schedule.py --wait-quiet 60  # on a shared machine: time each config when it is quiet
    python3 bench/bench_schedule.py --device cuda --no-compile --markdown out.md

The op is DSpark Algorithm 1: given the conditional acceptances c [R, K] of R requests with K
drafts each and the profiled steps per second sps [N + 1] of the target model, it admits the
candidates (r, j) in descending survival a_{r,j} = prod_{i<=j} c_{r,i} while the throughput
Theta = tau * SPS(B) strictly improves, and returns num_draft [R] int32. For every config
(load regime, R requests, K drafts per request, N = R * (K + 1)) it reports:

  drafts      admitted drafts, sum(num_draft), and their share of the R * K candidates: how far
              the scan ran (the CPU op walks a heap and stops at the first candidate that does
              not improve Theta; the eager composition always sorts all R * K candidates)
  op          median time of the op
  read        median time of one read pass over the confidences (confidence.sum()), timed
              interleaved with the op: op/read is the op's cost in "reads of its input"
  eager       dspark_ext.scheduling.schedule_eager (survival by a loop of K products, a stable
              sort of all R * K candidates, cumsum, ...; bitwise equal to the op)
  compiled    torch.compile(schedule_eager, fullgraph=True) (default mode), compiled once per
              shape outside the timing ("compile s" = its first call) and reused by both regimes
  x eager, x compiled   speedup of the op over each (reference time / op time)
  busy        (CPU) cores that other processes used while the config was timed; above
              --max-other-load the config is timed again (--retries), the quietest attempt kept

All four are timed round-robin (op, read, eager, compiled, op, ...) after warm-up, so every
ratio compares timings taken in the same stretch of time. Before timing, the op's output is
compared with schedule_eager's (torch.equal); a mismatch is printed at once, marked in the
table and makes the script exit with status 1.

Load regimes (step time t(B) of a target forward over B tokens, sps[n] = 1 / t(n)):
  light   t(B) = 1 + B / 2048: extra tokens are cheap, Theta keeps improving, many drafts are
          admitted (the long scan: the worst case for the op's early stop)
  heavy   t(B) = 1 + B / 32: extra tokens are expensive, few drafts are admitted

Confidences: sigmoid(N(1.5, 1.5)) per position (mean ~0.76), drawn on the CPU from a fixed
seed per (R, K) and copied to the device, so both regimes and both devices see the same values.
"""

from __future__ import annotations

import argparse
import itertools
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (  # noqa: E402
    Table,
    Timer,
    fmt_ratio,
    interleaved_medians,
    machine_lines,
    op_availability,
    short_error,
)

#: regime -> B0 of the affine step time t(B) = 1 + B / B0
REGIMES = {"light": 2048.0, "heavy": 32.0}
#: R * K up to which the CUDA op uses its single-block kernel (above: device-wide sort + scan)
CUDA_SINGLE_BLOCK_MAX = 4096
#: op/read below this is not a CPU measurement (see Result.disturbed)
DISTURBED_READ_RATIO = 0.5


# =========================================================================== configs


@dataclass(frozen=True)
class Config:
    regime: str
    requests: int  # R
    k: int  # drafts per request

    @property
    def max_batch(self) -> int:  # N: every request's anchor and all its drafts fit
        return self.requests * (self.k + 1)

    @property
    def candidates(self) -> int:
        return self.requests * self.k

    def label(self) -> str:
        return f"{self.regime:5} R={self.requests:<4} K={self.k:<2}"


def full_grid(args) -> List[Config]:
    """Run order: shape (R, K) outer, regime inner, so both regimes share inputs and a compiled graph."""
    return [Config(g, r, k) for r, k, g in itertools.product(args.requests, args.k, args.regimes)]


@dataclass
class Result:
    config: Config
    drafts: Optional[int] = None  # sum(num_draft)
    op_ms: Optional[float] = None
    read_ms: Optional[float] = None
    eager_ms: Optional[float] = None
    compiled_ms: Optional[float] = None
    compile_s: Optional[float] = None
    errors: Dict[str, str] = field(default_factory=dict)  # column -> reason for n/a
    check: str = "-"
    mismatch: bool = False  # the op's output differs from schedule_eager's
    warnings: List[str] = field(default_factory=list)
    other_load: Optional[float] = None  # cores other processes used while this config was timed (CPU)

    @property
    def read_ratio(self) -> Optional[float]:
        return self.op_ms / self.read_ms if self.op_ms and self.read_ms else None

    @property
    def disturbed(self) -> bool:
        """The op reads at least what the read pass reads; far below it, the parallel read pass
        (and the references, torch ops too) lost a thread to another process."""
        return self.read_ratio is not None and self.read_ratio < DISTURBED_READ_RATIO

    def speedup(self, baseline_ms: Optional[float]) -> Optional[float]:
        return baseline_ms / self.op_ms if baseline_ms and self.op_ms else None


# =========================================================================== inputs


@dataclass
class ShapeInputs:
    confidence: torch.Tensor  # [R, K] float32
    max_len: Optional[torch.Tensor]  # [R] int32 or None


def make_shape_inputs(requests: int, k: int, max_len: str, device: str) -> ShapeInputs:
    gen = torch.Generator().manual_seed(2024 + 7919 * requests + 31 * k)
    confidence = torch.sigmoid(torch.randn(requests, k, generator=gen) * 1.5 + 1.5)
    caps = torch.randint(0, k + 1, (requests,), generator=gen, dtype=torch.int32) if max_len == "random" else None
    return ShapeInputs(confidence.to(device), None if caps is None else caps.to(device))


def make_sps(max_batch: int, regime: str, device: str) -> torch.Tensor:
    """sps[n] = 1 / t(n), t(n) = 1 + n / B0, for n = 0..N (index 0 is unused by the op)."""
    n = torch.arange(max_batch + 1, dtype=torch.float64)
    return (1.0 / (1.0 + n / REGIMES[regime])).float().to(device)


# =========================================================================== measuring


class OtherLoad:
    """CPU time other processes used while a block ran, in cores (Linux /proc/stat; None elsewhere).

    The references and the read pass are parallel torch ops: when another process takes one of
    the cores, their threads wait for each other and they run several times slower (the op, one
    thread, hardly notices). Medians do not help when the other process runs for seconds, so a
    config timed while others used the CPU is timed again."""

    def __init__(self):
        self.tick_s = 1.0 / os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 0.01

    def _busy_s(self) -> Optional[float]:
        try:
            with open("/proc/stat") as f:
                fields = [int(x) for x in f.readline().split()[1:]]
        except (OSError, ValueError):
            return None
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
        guest = sum(fields[8:10]) if len(fields) > 9 else 0  # already counted in user / nice
        return (sum(fields) - idle - guest) * self.tick_s

    def start(self):
        return self._busy_s(), time.process_time(), time.perf_counter()

    def wait_quiet(self, max_cores: float, max_wait_s: float, window_s: float = 0.5) -> float:
        """Waits (up to max_wait_s) for a window in which others used at most max_cores; returns the wait."""
        start = time.perf_counter()
        while time.perf_counter() - start < max_wait_s:
            started = self.start()
            time.sleep(window_s)
            cores = self.cores(started)
            if cores is None or cores <= max_cores:
                break
        return time.perf_counter() - start

    def cores(self, started) -> Optional[float]:
        busy0, own0, wall0 = started
        busy1 = self._busy_s()
        if busy0 is None or busy1 is None:
            return None
        wall = time.perf_counter() - wall0
        return max(0.0, (busy1 - busy0) - (time.process_time() - own0)) / max(wall, 1e-9)


def fmt_us(ms: Optional[float]) -> str:
    if ms is None:
        return "n/a"
    us = ms * 1e3
    if us >= 100:
        return f"{us:.0f}"
    if us >= 10:
        return f"{us:.1f}"
    return f"{us:.2f}"


def describe_mismatch(op_out: torch.Tensor, eager_out: torch.Tensor) -> str:
    op_out, eager_out = op_out.cpu(), eager_out.cpu()
    if op_out.shape != eager_out.shape or op_out.dtype != eager_out.dtype:
        return f"op returned {tuple(op_out.shape)} {op_out.dtype}, eager {tuple(eager_out.shape)} {eager_out.dtype}"
    differ = (op_out != eager_out).nonzero().flatten()
    first = ", ".join(f"r={int(r)}: op {int(op_out[r])} eager {int(eager_out[r])}" for r in differ[:4])
    return (f"{differ.numel()}/{op_out.numel()} requests differ (sum op {int(op_out.sum())}, eager "
            f"{int(eager_out.sum())}); {first}")


class Bench:
    def __init__(self, args, op_reason: Optional[str]):
        self.args = args
        self.timer = Timer(args.device)
        self.op_reason = op_reason
        self.dynamic_cache: Dict[tuple, Callable] = {}
        self.load = OtherLoad()
        self.waited_s = 0.0  # spent in --wait-quiet

    def compiled_for_shape(self):
        """A compiled schedule_eager for the next shape (None without --compile)."""
        if not self.args.compile:
            return None
        from dspark_ext.scheduling import schedule_eager

        if not self.args.compile_dynamic:
            torch._dynamo.reset()  # one static graph per shape, shared by the regimes
            return torch.compile(schedule_eager, fullgraph=True, dynamic=False)
        if "fn" not in self.dynamic_cache:  # one graph per K (the survival loop is unrolled)
            self.dynamic_cache["fn"] = torch.compile(schedule_eager, fullgraph=True, dynamic=True)
        return self.dynamic_cache["fn"]

    def run(self, config: Config, inputs: ShapeInputs, compiled: Optional[Callable]) -> Result:
        from dspark_ext.scheduling import schedule_eager

        args, result = self.args, Result(config)
        confidence, max_len = inputs.confidence, inputs.max_len
        sps = make_sps(config.max_batch, config.regime, args.device)
        fns: Dict[str, Callable[[], object]] = {"read": lambda: confidence.sum()}
        outputs: Dict[str, torch.Tensor] = {}

        candidates: Dict[str, Callable[[], torch.Tensor]] = {}
        if self.op_reason is None:
            candidates["op"] = lambda: torch.ops.dspark.schedule(confidence, sps, max_len)
        else:
            result.errors["op"] = self.op_reason
        if args.eager:
            candidates["eager"] = lambda: schedule_eager(confidence, sps, max_len)
        else:
            result.errors["eager"] = "--no-eager"
        if compiled is not None:
            candidates["compiled"] = lambda: compiled(confidence, sps, max_len)
        else:
            result.errors["compiled"] = "skipped in --quick (add --compile)" if args.quick else "--no-compile"

        for name, fn in candidates.items():
            try:
                start = time.perf_counter()
                outputs[name] = fn()
                self.timer.synchronize()
            except Exception as error:
                result.errors[name] = short_error(error)
                continue
            if name == "compiled":
                result.compile_s = time.perf_counter() - start
            fns[name] = fn

        reference = outputs.get("eager")
        main = outputs.get("op", reference)
        if main is not None:
            result.drafts = int(main.sum())
        result.check = self._check(config, outputs, result)

        best = None  # (other load, medians) of the quietest attempt
        for attempt in range(1 + (0 if self.timer.is_cuda else args.retries)):
            if attempt:
                time.sleep(args.retry_wait)
            if args.wait_quiet > 0 and not self.timer.is_cuda:
                self.waited_s += self.load.wait_quiet(args.max_other_load, args.wait_quiet)
            started = self.load.start()
            medians = interleaved_medians(
                self.timer, fns, args.repeats, warmup=2, budget_s=args.op_budget, min_time_s=args.min_time,
                max_rounds=args.max_rounds,
            )
            load = None if self.timer.is_cuda else self.load.cores(started)
            if best is None or (load is not None and load < best[0]):
                best = (load, medians)
            if load is None or load <= args.max_other_load:
                break
        result.other_load, medians = best
        result.op_ms, result.read_ms = medians.get("op"), medians.get("read")
        result.eager_ms, result.compiled_ms = medians.get("eager"), medians.get("compiled")
        if result.other_load is not None and result.other_load > args.max_other_load:
            result.warnings.append(f"{config.label().strip()}: other processes used {result.other_load:.2f} cores "
                                   f"in each of {1 + args.retries} attempts: the references and read are slowed")
        elif result.disturbed:
            result.warnings.append(f"{config.label().strip()}: op/read {result.read_ratio:.2f}x < "
                                   f"{DISTURBED_READ_RATIO}x: the read pass was disturbed")
        return result

    @staticmethod
    def _check(config: Config, outputs: Dict[str, torch.Tensor], result: Result) -> str:
        reference = outputs.get("eager")
        if reference is None:
            return "-"
        parts = []
        for name in ("op", "compiled"):
            out = outputs.get(name)
            if out is None:
                continue
            if torch.equal(out, reference):
                parts.append(f"{name} ok")
                continue
            detail = describe_mismatch(out, reference)
            if name == "op":
                result.mismatch = True
                print(f"!! MISMATCH {config.label()}: dspark::schedule != schedule_eager: {detail}",
                      file=sys.stderr, flush=True)
                parts.append("op MISMATCH")
            else:
                parts.append("compiled differs")
                result.warnings.append(f"compiled schedule_eager differs from eager at {config.label().strip()}: {detail}")
        return ", ".join(parts) or "-"


# =========================================================================== report


def result_table(results: List[Result]) -> Table:
    table = Table([
        "regime", "R", "K", "N", "drafts", "of R*K", "op us", "read us", "op/read",
        "eager us", "compiled us", "compile s", "x eager", "x compiled", "busy", "check",
    ])
    for r in sorted(results, key=lambda r: (list(REGIMES).index(r.config.regime), r.config.requests, r.config.k)):
        c = r.config
        table.add([
            c.regime, c.requests, c.k, c.max_batch,
            "n/a" if r.drafts is None else r.drafts,
            "n/a" if r.drafts is None else f"{100 * r.drafts / c.candidates:.0f}%",
            fmt_us(r.op_ms), fmt_us(r.read_ms), fmt_ratio(r.read_ratio, 1),
            fmt_us(r.eager_ms), fmt_us(r.compiled_ms),
            "n/a" if r.compile_s is None else f"{r.compile_s:.1f}",
            fmt_ratio(r.speedup(r.eager_ms), 1), fmt_ratio(r.speedup(r.compiled_ms), 1),
            "-" if r.other_load is None else f"{r.other_load:.2f}",
            r.check,
        ])
    return table


def notes(results: List[Result], args) -> List[str]:
    lines = [
        "times in microseconds, medians of round-robin runs (op, read, eager, compiled) after 2 warm-up rounds;",
        "drafts = sum(num_draft) of the op (of R*K = share of the candidates admitted); N = R * (K + 1);",
        "light: sps[n] = 1 / (1 + n/2048), heavy: sps[n] = 1 / (1 + n/32); confidence = sigmoid(N(1.5, 1.5)),",
        f"  max_len = {'None' if args.max_len == 'none' else 'uniform in [0, K] per request'};",
        "read = confidence.sum() (one pass over the R*K float32 the op must read); op/read = op / read;",
        "eager = dspark_ext.scheduling.schedule_eager; x eager, x compiled = reference time / op time;",
        "check = op output torch.equal to schedule_eager's (then the compiled output likewise).",
    ]
    if torch.device(args.device).type == "cpu":
        lines.append("the CPU op also validates every confidence and sps entry it may read (it raises on bad"
                     " values); the references do not.")
        lines.append(f"busy = cores other processes used while the config was timed (/proc/stat); above "
                     f"{args.max_other_load:g} the config was timed again (up to {args.retries}x, the quietest kept):")
        lines.append("  the references and read are parallel torch ops, which slow down several-fold when another"
                     " process takes a core.")
    else:
        lines.append(f"CUDA op: single-block kernel for R*K <= {CUDA_SINGLE_BLOCK_MAX}, device-wide sort + scan above;"
                     " every call is timed with CUDA events after an L2 flush.")
    if args.compile:
        graphs = ("dynamic=True (one graph per K, reused across R)" if args.compile_dynamic
                  else "one static graph per (R, K), shared by both regimes")
        lines.append(f"compiled = torch.compile(schedule_eager, fullgraph=True), default mode, {graphs};"
                     " 'compile s' = its first call, not timed")
        lines.append("  (about 0 for the second regime of a shape, and small where Inductor's on-disk cache already"
                     " held the graph).")
    reasons = sorted({f"{column}: {reason}" for r in results for column, reason in r.errors.items()})
    lines += [f"n/a {reason}" for reason in reasons]
    lines += [f"!! {warning}" for r in results for warning in r.warnings]
    return lines


def summary(results: List[Result]) -> List[str]:
    def speed_line(name: str, value: Callable[[Result], Optional[float]]) -> str:
        measured = [(r, v) for r in results if (v := value(r)) is not None]
        if not measured:
            return f"op vs {name}: n/a (not measured)"
        slower = [(r, v) for r, v in measured if v <= 1.0]
        worst_row, worst = min(measured, key=lambda item: item[1])
        best = max(v for _, v in measured)
        line = (f"op vs {name}: faster in {len(measured) - len(slower)}/{len(measured)} configs, {worst:.2f}x-{best:.1f}x;"
                f" slowest at {worst_row.config.label().strip()}")
        if slower:
            line += "; NOT faster at: " + ", ".join(f"{r.config.label().strip()} ({v:.2f}x)" for r, v in slower)
        return line

    ratios = [(r, r.read_ratio) for r in results if r.read_ratio is not None]
    lines = [speed_line("eager", lambda r: r.speedup(r.eager_ms)),
             speed_line("compiled", lambda r: r.speedup(r.compiled_ms))]
    if ratios:
        worst_row, worst = max(ratios, key=lambda item: item[1])
        lines.append(f"op/read: {min(v for _, v in ratios):.1f}x-{worst:.1f}x; worst at {worst_row.config.label().strip()}")
    mismatches = [r for r in results if r.mismatch]
    checked = [r for r in results if r.check.startswith("op ")]
    if mismatches:
        lines.append(f"FAIL: dspark::schedule != schedule_eager in {len(mismatches)}/{len(checked)} configs: "
                     + ", ".join(r.config.label().strip() for r in mismatches))
    elif checked:
        lines.append(f"PASS: dspark::schedule == schedule_eager (torch.equal) in {len(checked)}/{len(checked)} configs")
    else:
        lines.append("dspark::schedule not checked (no op or no schedule_eager output)")
    return lines


def load_line(when: str) -> List[str]:
    if not hasattr(os, "getloadavg"):
        return []
    load = os.getloadavg()
    line = f"load average (1/5/15 min) at {when}: " + " ".join(f"{x:.2f}" for x in load)
    if when == "end" and load[1] > 1.5 * (os.cpu_count() or 1):
        line += " -- WARNING: other processes competed for the CPU; rerun on an idle machine"
    return [line]


def progress_line(r: Result) -> str:
    drafts = "n/a" if r.drafts is None else str(r.drafts)
    return (f"  {r.config.label()} drafts {drafts:>6}  op {fmt_us(r.op_ms):>6} us  read {fmt_us(r.read_ms):>6} us "
            f"({fmt_ratio(r.read_ratio, 1)})  eager {fmt_us(r.eager_ms):>6} us  compiled {fmt_us(r.compiled_ms):>6} us"
            f"  {r.check}")


# =========================================================================== main


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="R in {1, 64, 512, 4096}, K = 8, both regimes (both CUDA paths: R*K = 4096 and above)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--requests", "-R", nargs="+", type=int, default=[1, 8, 64, 512, 4096], help="R")
    p.add_argument("--k", nargs="+", type=int, default=[4, 8, 16, 32], help="drafts per request")
    p.add_argument("--regimes", nargs="+", choices=list(REGIMES), default=list(REGIMES))
    p.add_argument("--max-len", choices=("none", "random"), default="none",
                   help="max_len argument: None, or a random cap in [0, K] per request")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--repeats", type=int, default=30, help="timed round-robin rounds at least (median)")
    p.add_argument("--min-time", type=float, default=0.15, help="keep timing until this many seconds are spent")
    p.add_argument("--op-budget", type=float, default=1.5,
                   help="stop timing a config after this many seconds (>= 3 rounds)")
    p.add_argument("--max-rounds", type=int, default=400, help="timed rounds at most per config")
    p.add_argument("--max-other-load", type=float, default=0.2,
                   help="CPU: time a config again when other processes used more cores than this meanwhile")
    p.add_argument("--retries", type=int, default=2, help="CPU: timing attempts after the first on a busy machine")
    p.add_argument("--retry-wait", type=float, default=2.0, help="seconds to wait before timing a config again")
    p.add_argument("--wait-quiet", type=float, default=0.0, metavar="S",
                   help="CPU: before each timing attempt, wait up to S seconds for a 0.5 s window in which other "
                        "processes use at most --max-other-load cores (for shared machines)")
    p.add_argument("--no-eager", dest="eager", action="store_false",
                   help="do not run schedule_eager (then nothing checks the op)")
    p.add_argument("--no-op", dest="op", action="store_false", help="skip the op (references and read only)")
    p.add_argument("--compile", dest="compile", action="store_true", default=None,
                   help="run torch.compile(schedule_eager) (default: on, except with --quick)")
    p.add_argument("--no-compile", dest="compile", action="store_false", help="do not run torch.compile")
    p.add_argument("--compile-dynamic", action="store_true",
                   help="one dynamic-shape graph per K instead of one static graph per (R, K)")
    p.add_argument("--markdown", metavar="FILE", help="also write the report as Markdown")
    p.add_argument("--time-limit", type=float, default=None,
                   help="start no new shape after this many seconds; report what was measured")
    args = p.parse_args(argv)
    if args.quick:
        args.requests, args.k = [1, 64, 512, 4096], [8]
    if args.compile is None:
        args.compile = not args.quick  # ~3-6 s per static graph on a 2-core CPU, far more with CUDA
    return args




def main(argv=None) -> int:
    args = parse_args(argv)
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        sys.exit(f"--device {args.device}: torch {torch.__version__} sees no CUDA device")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    torch._dynamo.config.accumulated_recompile_limit = max(torch._dynamo.config.accumulated_recompile_limit, 256)

    op_reason, build = op_availability("schedule", args.op)
    header = ["dspark::schedule benchmark", *machine_lines(args.device), f"dspark_ext build: {build}"]
    if op_reason:
        header.append(f"op: {op_reason}")
    print("\n".join(header), flush=True)
    configs = full_grid(args)
    print(f"{len(configs)} configs; op, read, eager and compiled: medians of >= {args.repeats} round-robin runs "
          f"(>= {args.min_time:g} s, <= {args.op_budget:g} s per config)\n", flush=True)

    start = time.perf_counter()
    bench = Bench(args, op_reason)
    results = run_configs(configs, args, bench)
    elapsed = time.perf_counter() - start
    if len(results) < len(configs):
        print(f"\nstopped after {len(results)}/{len(configs)} configs (--time-limit or SIGTERM)")

    table = result_table(results)
    footer = notes(results, args) + [""] + summary(results) + [""] + load_line("end")
    footer.append(f"wall time: {elapsed:.0f} s for {len(results)} configs"
                  + (f" ({bench.waited_s:.0f} s of it waiting for a quiet machine)" if bench.waited_s >= 1 else ""))
    print("\n" + table.text() + "\n\n" + "\n".join(footer))
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write("# dspark::schedule benchmark\n\n")
            f.write("\n".join(f"- {line}" for line in header[1:]) + "\n\n")
            f.write(table.markdown() + "\n\n" + "\n".join(f"{line}  " for line in footer) + "\n")
        print(f"\nwrote {args.markdown}")
    op_failed = op_reason is None and any(r.op_ms is None for r in results)
    return 1 if op_failed or any(r.mismatch for r in results) else 0


def run_configs(configs: List[Config], args, bench: Bench) -> List[Result]:
    """Runs the configs shape by shape (inputs and compiled graph shared by the regimes);
    stops early at --time-limit or SIGTERM."""
    signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)  # `timeout` still gets a table
    start = time.perf_counter()
    results: List[Result] = []
    try:
        for (requests, k), group in itertools.groupby(configs, key=lambda c: (c.requests, c.k)):
            if args.time_limit is not None and time.perf_counter() - start > args.time_limit:
                break
            inputs = make_shape_inputs(requests, k, args.max_len, args.device)
            compiled = bench.compiled_for_shape()
            for config in group:
                results.append(bench.run(config, inputs, compiled))
                print(progress_line(results[-1]), flush=True)
    except KeyboardInterrupt:
        print("interrupted", flush=True)
    return results


def _raise_keyboard_interrupt(signum, frame):
    raise KeyboardInterrupt


if __name__ == "__main__":
    sys.exit(main())
