"""Timing and reporting helpers shared by the dspark benchmarks.

Conventions:
  * every time is in milliseconds, every summary statistic is a median;
  * functions that are compared with each other are timed *interleaved* (A, B, A, B, ...)
    so that a noisy neighbour or a frequency change hits all of them alike;
  * CUDA work is timed with CUDA events after a synchronize, and the L2 cache is
    flushed before every timed call (otherwise small inputs are served from L2);
  * slow functions (eager references) are *time-boxed*: they run until either the
    repeat count or the time budget is reached, but always at least once.
"""

from __future__ import annotations

import contextlib
import math
import os
import platform
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

import torch

@contextlib.contextmanager
def patched(module, name: str, value):
    """``module.name`` set to ``value`` for the duration (an arm's variant of the library)."""
    saved = getattr(module, name)
    setattr(module, name, value)
    try:
        yield
    finally:
        setattr(module, name, saved)


# --------------------------------------------------------------------------- timers


class Timer:
    """Times one call of a function on one device, in milliseconds."""

    def __init__(self, device: str):
        self.device = torch.device(device)
        self.is_cuda = self.device.type == "cuda"
        self._l2_flush: Optional[torch.Tensor] = None
        if self.is_cuda:
            # Larger than any current L2 (H100/H200: 50 MiB, B200: 126 MiB).
            self._l2_flush = torch.empty(256 * 1024 * 1024, dtype=torch.uint8, device=self.device)

    def synchronize(self) -> None:
        if self.is_cuda:
            torch.cuda.synchronize(self.device)

    def time_ms(self, fn: Callable[[], object]) -> float:
        if not self.is_cuda:
            start = time.perf_counter()
            fn()
            return (time.perf_counter() - start) * 1e3
        self._l2_flush.zero_()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        self.synchronize()
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)


def interleaved_medians(
    timer: Timer,
    fns: Dict[str, Callable[[], object]],
    repeats: int,
    warmup: int = 2,
    budget_s: Optional[float] = None,
    min_time_s: float = 0.0,
    max_rounds: int = 2000,
) -> Dict[str, float]:
    """Median time (ms) of each function, timed round-robin: fn1, fn2, ..., fn1, fn2, ...

    Runs at least ``repeats`` rounds and keeps going until ``min_time_s`` seconds of timed
    work are spent (more samples for fast functions make the median robust to bursts of
    load), but stops once ``budget_s`` is spent (after at least 3 rounds) or after
    ``max_rounds`` rounds.
    """
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    timer.synchronize()
    samples: Dict[str, List[float]] = {name: [] for name in fns}
    spent_s, rounds = 0.0, 0
    while True:
        for name, fn in fns.items():
            elapsed = timer.time_ms(fn)
            samples[name].append(elapsed)
            spent_s += elapsed / 1e3
        rounds += 1
        if rounds >= max_rounds or (budget_s is not None and rounds >= 3 and spent_s >= budget_s):
            break
        if rounds >= repeats and spent_s >= min_time_s:
            break
    return {name: statistics.median(values) for name, values in samples.items()}


@dataclass
class BoxedTiming:
    """Median of a time-boxed measurement and how many timed runs it is based on."""

    median_ms: float
    runs: int


def time_boxed(
    timer: Timer,
    fn: Callable[[], object],
    max_repeats: int,
    budget_s: float,
    warmup: bool = True,
) -> BoxedTiming:
    """Median of up to ``max_repeats`` timed runs, stopping once ``budget_s`` is spent.

    The warm-up run is skipped automatically when it alone already used the whole budget
    (then it *is* the single measurement: a slow Python reference has no cache to warm).
    """
    samples: List[float] = []
    if warmup:
        first = timer.time_ms(fn)
        if first / 1e3 >= budget_s:
            return BoxedTiming(first, 1)
    spent_s = 0.0
    while len(samples) < max(1, max_repeats):
        samples.append(timer.time_ms(fn))
        spent_s += samples[-1] / 1e3
        if spent_s >= budget_s:
            break
    return BoxedTiming(statistics.median(samples), len(samples))


# --------------------------------------------------------------------------- inputs


def language_model_like_logits(rows: int, vocab: int, gen: torch.Generator, device: str) -> torch.Tensor:
    """N(0, 1) background plus 5 "hot" tokens per row holding ~99% of the mass (top-1 ~ 55%)."""
    logits = torch.randn(rows, vocab, generator=gen, device=device)
    hot_ids = torch.randint(0, vocab, (rows, 5), generator=gen, device=device)
    hot_logits = math.log(vocab) + 0.5 + torch.tensor([4.5, 3.5, 3.0, 2.5, 2.0], device=device)
    return logits.scatter_(1, hot_ids, hot_logits.expand(rows, 5).contiguous())


# --------------------------------------------------------------------------- machine


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_flags_summary() -> str:
    """The widest x86 vector extension the CPU reports (what ATen's CPU dispatch picks from)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return "unknown"
    for flag in ("avx512f", "avx2"):
        if flag in flags:
            return flag
    return "no avx2"


def machine_lines(device: str) -> List[str]:
    lines = [
        f"cpu: {cpu_model()} ({cpu_flags_summary()}), {os.cpu_count()} cores, "
        f"torch.get_num_threads() = {torch.get_num_threads()}",
        f"torch: {torch.__version__}, python {platform.python_version()}, {platform.system()} {platform.release()}",
    ]
    if hasattr(os, "getloadavg"):
        lines.append("load average (1/5/15 min) at start: " + " ".join(f"{x:.2f}" for x in os.getloadavg()))
    capability = os.environ.get("ATEN_CPU_CAPABILITY")
    if capability:
        lines.append(f"ATEN_CPU_CAPABILITY={capability}")
    if torch.device(device).type == "cuda":
        props = torch.cuda.get_device_properties(torch.device(device))
        lines.append(
            f"gpu: {props.name}, {props.total_memory / 2**30:.0f} GiB, {props.multi_processor_count} SMs, "
            f"CUDA {torch.version.cuda}"
        )
    return lines


# --------------------------------------------------------------------------- tables


@dataclass
class Table:
    """A list of rows of strings rendered as aligned text or as Markdown."""

    headers: Sequence[str]
    rows: List[Sequence[str]] = field(default_factory=list)

    def add(self, row: Sequence[str]) -> None:
        assert len(row) == len(self.headers), (row, self.headers)
        self.rows.append([str(cell) for cell in row])

    def _widths(self) -> List[int]:
        return [max(len(str(cell)) for cell in column) for column in zip(self.headers, *self.rows)]

    def text(self) -> str:
        widths = self._widths()
        fmt = lambda cells: "  ".join(str(c).rjust(w) for c, w in zip(cells, widths))  # noqa: E731
        rule = "  ".join("-" * w for w in widths)
        return "\n".join([fmt(self.headers), rule] + [fmt(r) for r in self.rows])

    def markdown(self) -> str:
        header = "| " + " | ".join(self.headers) + " |"
        rule = "|" + "|".join("---:" for _ in self.headers) + "|"
        return "\n".join([header, rule] + ["| " + " | ".join(r) + " |" for r in self.rows])

    def write_markdown(self, path: str, header_lines: Sequence[str]) -> None:
        """``path``: the header lines indented as a code block (the machine, the setup), then the table."""
        with open(path, "w") as out:
            out.write("\n".join(f"    {line}" for line in header_lines) + "\n\n" + self.markdown() + "\n")


def fmt_ms(value: Optional[float]) -> str:
    if value is None:
        return "n/a"
    if value >= 100:
        return f"{value:.0f}"
    if value >= 1:
        return f"{value:.2f}"
    return f"{value:.3f}"


def fmt_ratio(value: Optional[float], digits: int = 2) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}x"


def short_error(error: BaseException, limit: int = 60) -> str:
    """One-line reason for an n/a cell: exception type and the start of its first line."""
    message = str(error).strip().splitlines()[0] if str(error).strip() else ""
    text = f"{type(error).__name__}: {message}" if message else type(error).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def op_availability(op_name: str, enabled: bool = True) -> "tuple[Optional[str], str]":
    """(why ``torch.ops.dspark.<op_name>`` is skipped, or None; the build description)."""
    try:
        import dspark_ext  # noqa: F401  (registers torch.ops.dspark.*)
    except Exception as error:
        return f"skipped: dspark_ext does not import ({short_error(error)})", "n/a"
    try:
        build = f"{dspark_ext.build_info()}"
    except Exception as error:
        build = f"n/a ({short_error(error)})"
    if not enabled:
        return "skipped: --no-op", build
    if not hasattr(torch.ops.dspark, op_name):
        return f"skipped: torch.ops.dspark.{op_name} is not in this build", build
    return None, build

