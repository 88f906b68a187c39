"""This machine's cost profile: what a target forward over n tokens and a drafter's round cost,
measured where the generation runs (hardware-aware must mean the user's hardware).

``measure`` times, for every batch size R that matters (requests generated together), the
target's step over n = R .. R (K + 1) tokens on a real KV cache (prompts of ``context`` tokens,
the n tokens spread evenly over the R requests, rewound after each step), and each drafter's
``propose`` in steady state (one new token per request per round, each right after a target
step, as in the loop). Every size is timed ``repeats`` times in interleaved passes and the
median kept (the busy check reads the target's spread: sub-millisecond drafting rounds are noisy
by nature); step times are made non-decreasing in n (isotonic) and interpolated between
measured sizes.

``load_or_measure`` caches the profile as JSON under the user cache dir, keyed by the target,
the drafters, the device (CPU model and ISA, or GPU), the thread count and the torch version,
and re-measures on ``remeasure`` (``dspark profile``), one file per batch size. A profile
whose timings spread by more
than ``BUSY_SPREAD`` (the machine was busy) is used for the run but never saved. A shipped
table (``CostProfile.from_sps``) is only a fallback, used when ``DSPARK_NO_PROFILE=1``, and the
log says so.
"""

import hashlib
import json
import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import torch

from dspark_ext.protocols import DraftContext

PROFILE_VERSION = 10  # 2: the target runs few-row steps through dspark::skinny_linear; 3: the drafter's bfloat16 head takes the GEMM past 8 rows, its Markov head drafts in bfloat16; 4: skinny_linear runs 9-12 rows in one pass on AVX-512; 5: the DSpark backbone drafts through skinny_linear on bfloat16 weights; 6: drafting rounds are timed right after a target step, as in the loop; 7: the target attends without padding where a step's requests have as many tokens, and in segments where they differ; the hybrid's short DSpark block is priced; 8: drafts over a draft vocabulary stay compact (Draft.logit_ids); 9: the target's few-row steps attend through dspark::cached_attention; 10: DSpark's drafts stay in markov_draft's dtype and its anchor transition runs through skinny_linear
#: A profile whose median relative spread ((q3 - q1) / median of the repeats) exceeds this was
#: measured on a busy machine: it serves the run that measured it but is not saved.
BUSY_SPREAD = 0.25
#: ``step_seconds`` key of a table indexed by total tokens whatever the batch (a shipped SPS table).
ANY_BATCH = 0


@dataclass
class CostProfile:
    """``step_seconds[R][n]``: seconds of one target forward of n tokens spread over R requests
    (index 0 unused; entries below R copy n = R). ``draft_seconds[name][R]``: seconds of one
    drafting round of the drafter part ``name`` over R requests. ``source`` says where the
    numbers come from; ``spread`` is the worst median relative spread seen while measuring."""

    key: dict
    step_seconds: Dict[int, List[float]]
    draft_seconds: Dict[str, Dict[int, float]] = field(default_factory=dict)
    source: str = "measured"
    spread: float = 0.0

    # ------------------------------------------------------------------ reading it
    def _curve(self, requests: int):
        """(table, scale): the measured table nearest to ``requests`` and the factor that maps
        this batch's total tokens onto it (same tokens per request)."""
        if ANY_BATCH in self.step_seconds:
            return self.step_seconds[ANY_BATCH], 1.0
        nearest = min(self.step_seconds, key=lambda r: (abs(r - requests), r))
        return self.step_seconds[nearest], nearest / max(requests, 1)

    def target_seconds(self, requests: int, tokens: int) -> float:
        """One target step of ``tokens`` tokens over ``requests`` requests (linear between
        measured sizes, linear extrapolation past the last)."""
        table, scale = self._curve(requests)
        x = max(tokens * scale, 1.0)
        last = len(table) - 1
        if x >= last:
            slope = table[last] - table[last - 1] if last >= 2 else 0.0
            return table[last] + slope * (x - last)
        low = int(x)
        return table[low] + (table[low + 1] - table[low]) * (x - low)

    def sps(self, requests: int, draft_seconds: float = 0.0, max_tokens: Optional[int] = None) -> torch.Tensor:
        """float32 [N + 1] table for ``torch.ops.dspark.schedule``: sps[n] = 1 / (draft_seconds +
        step time of n tokens over ``requests`` requests), sps[0] = 0; N = ``max_tokens`` or the
        measured range."""
        table, scale = self._curve(requests)
        N = max(int(max_tokens) if max_tokens is not None else int((len(table) - 1) / scale), requests, 1)
        out = torch.zeros(N + 1, dtype=torch.float64)
        for n in range(1, N + 1):
            out[n] = 1.0 / (draft_seconds + self.target_seconds(requests, n))
        return out.float()

    def drafter_seconds(self, name: str, requests: int) -> float:
        """One drafting round of ``name`` over ``requests`` requests (nearest measured batch,
        scaled linearly in requests); 0 for a drafter the profile did not measure."""
        costs = self.draft_seconds.get(name)
        if not costs:
            return 0.0
        nearest = min(costs, key=lambda r: (abs(r - requests), r))
        return costs[nearest] * (requests / nearest if requests > nearest else 1.0)

    def describe(self) -> str:
        lines = [f"cost profile ({self.source}; spread {self.spread:.0%})"]
        for R, table in sorted(self.step_seconds.items()):
            label = "any batch" if R == ANY_BATCH else f"R = {R}"
            shown = ", ".join(f"{n}: {1e3 * table[n]:.1f}" for n in range(max(R, 1), len(table)))
            lines.append(f"  target step ms by tokens ({label}): {shown}")
        for name, costs in sorted(self.draft_seconds.items()):
            lines.append(f"  drafting {name}: " + ", ".join(f"R = {r}: {1e3 * s:.2f} ms" for r, s in sorted(costs.items())))
        return "\n".join(lines)

    # ------------------------------------------------------------------ storing it
    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    @classmethod
    def from_json(cls, text: str) -> "CostProfile":
        data = json.loads(text)
        return cls(key=data["key"], step_seconds={int(r): [float(x) for x in t] for r, t in data["step_seconds"].items()},
                   draft_seconds={name: {int(r): float(s) for r, s in costs.items()}
                                  for name, costs in data.get("draft_seconds", {}).items()},
                   source=data.get("source", "measured"), spread=float(data.get("spread", 0.0)))

    @classmethod
    def from_sps(cls, sps: Sequence[float], source: str = "shipped") -> "CostProfile":
        """A steps-per-second list (``sps[n]`` for n total tokens, ``sps[0]`` unused) as a profile
        for any batch size, without drafting costs (they count as 0)."""
        values = [float(v) for v in sps]
        seconds = [0.0] + [1.0 / v for v in values[1:]]
        return cls(key={"shipped": True}, step_seconds={ANY_BATCH: seconds}, source=source)


# ---------------------------------------------------------------------- measuring it


def machine_description(device) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu, isa = platform.processor() or platform.machine(), "?"
    try:
        with open("/proc/cpuinfo") as f:
            lines = f.read().splitlines()
        cpu = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), cpu)
        flags = next((line for line in lines if line.startswith("flags")), "").split()
        isa = "avx512f" if "avx512f" in flags else "avx2" if "avx2" in flags else "no-avx2"
    except OSError:
        pass
    return f"{cpu} ({isa})"


def drafter_identity(drafter) -> str:
    """What a drafter's cost depends on: its class, whether a prompt lookup searches a datastore,
    and for a DSpark drafter its shape, draft vocabulary and drafting dtypes (a retrained
    drafter with the same shape keeps the profile; another architecture, draft vocabulary size
    or dtype gets its own)."""
    cfg = getattr(drafter, "cfg", None)
    block = getattr(drafter, "block", None)  # a DSpark drafter drafting a shorter block
    if cfg is None:  # prompt lookup: a datastore adds its searches
        return type(drafter).__name__ + ("+datastore" if getattr(drafter, "datastore", None) is not None else "")
    shape = {k: getattr(cfg, k, None) for k in ("num_layers", "hidden_size", "intermediate_size", "num_heads",
                                                 "num_kv_heads", "markov_rank", "num_draft", "confidence", "qk_norm",
                                                 "draft_vocab_size")}
    for dtype in ("inference_backbone_dtype", "inference_lm_head_dtype"):
        shape[dtype] = str(getattr(drafter, dtype, None))
    if block is not None:
        shape["block"] = int(block)
    return type(drafter).__name__ + json.dumps(shape, sort_keys=True)


def kernel_build() -> str:
    """The hash of the kernel sources this build of the extension compiled (setup.py), or
    "unknown"."""
    try:
        from dspark_ext import _build_info
    except ImportError:
        return "unknown"
    return getattr(_build_info, "KERNEL_SOURCES_SHA256", "unknown")


def profile_key(target_name: str, drafters: Dict[str, object], requests: Sequence[int], max_draft: int,
                device) -> dict:
    return {"version": PROFILE_VERSION, "target": target_name, "device": str(device),
            "machine": machine_description(device), "threads": torch.get_num_threads(), "torch": torch.__version__,
            "kernels": kernel_build(),
            "drafters": {name: drafter_identity(d) for name, d in sorted(drafters.items())},
            "requests": sorted(int(r) for r in requests), "max_draft": int(max_draft)}


def profile_path(key: dict, cache_dir=None) -> Path:
    from dspark_ext.targets import default_cache_dir

    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return Path(cache_dir or default_cache_dir()) / "profiles" / f"{digest}.json"


def _relative_spread(samples: List[float]) -> float:
    ordered = sorted(samples)
    q1, q3 = ordered[len(ordered) // 4], ordered[(3 * len(ordered)) // 4]
    middle = statistics.median(ordered)
    return (q3 - q1) / middle if middle > 0 else 0.0


def _measured_sizes(requests: int, max_draft: int) -> List[int]:
    """Every n for one request; for more, R, R + 1, R + 2, R + 4, ... up to R (K + 1)."""
    top = requests * (max_draft + 1)
    if requests == 1:
        return list(range(1, top + 1))
    sizes, step = {requests, top}, 1
    while requests + step < top:
        sizes.add(requests + step)
        step *= 2
    return sorted(sizes)


def _packed(requests: int, tokens: int, vocab_size: int, generator: torch.Generator, device):
    per_request = torch.full((requests,), tokens // requests, dtype=torch.int32)
    per_request[: tokens % requests] += 1
    cu = torch.zeros(requests + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(per_request, 0)
    ids = torch.randint(0, vocab_size, (tokens,), generator=generator)
    return ids.to(device), cu.to(device)


def measure(target, drafters: Dict[str, object], requests: Sequence[int], max_draft: int, *, target_name: str = "target",
            context: int = 256, repeats: int = 9, progress: bool = True,
            time_fn: Callable[[], float] = time.perf_counter) -> CostProfile:
    """Measures a profile (see the module docstring). ``drafters``: name -> drafter (their
    ``propose`` is timed; the target must already return the features they read)."""
    from dspark_ext.calibration import _isotonic_non_decreasing, _interpolate
    from dspark_ext.train import progress_bar

    device = torch.device(target.device)
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    generator = torch.Generator().manual_seed(0)
    requests = sorted({int(r) for r in requests})
    total_steps = sum(len(_measured_sizes(r, max_draft)) * repeats + repeats * len(drafters) for r in requests)
    done, spreads = 0, []
    step_seconds: Dict[int, List[float]] = {}
    draft_seconds: Dict[str, Dict[int, float]] = {}

    def tick():
        nonlocal done
        done += 1
        if progress:
            progress_bar(done, total_steps, "measuring this machine's cost profile")

    for R in requests:
        prompts = [torch.randint(0, target.vocab_size, (context,), generator=generator) for _ in range(R)]
        prefill = target.start(prompts)
        base_lengths = target.lengths().clone()
        sizes = _measured_sizes(R, max_draft)
        for n in sizes[:2]:  # warm-up
            target.forward(*_packed(R, n, target.vocab_size, generator, device))
            target.rewind(base_lengths)
        samples = {n: [] for n in sizes}
        for _ in range(repeats):  # interleaved passes: a drift of the machine hits every size alike
            for n in sizes:
                ids, cu = _packed(R, n, target.vocab_size, generator, device)
                sync()
                start = time_fn()
                target.forward(ids, cu)
                sync()
                samples[n].append(time_fn() - start)
                target.rewind(base_lengths)
                tick()
        medians = _isotonic_non_decreasing([statistics.median(samples[n]) for n in sizes])
        spreads.append(statistics.median(_relative_spread(samples[n]) for n in sizes))
        if sizes[0] > 1:  # below R tokens: the step of R tokens (never verified, kept for indexing)
            sizes, medians = [1] + sizes, medians[:1] + medians
        step_seconds[R] = [0.0] + _interpolate(sizes, medians, sizes[-1])

        def target_step():  # what precedes every drafting round in the loop (it evicts the drafter's weights)
            target.forward(*_packed(R, R, target.vocab_size, generator, device))
            target.rewind(base_lengths)

        for name, drafter in drafters.items():
            draft_seconds.setdefault(name, {})[R] = _time_drafter(drafter, prompts, prefill, R, context, repeats,
                                                                  device, sync, time_fn, tick, target_step)
    return CostProfile(key=profile_key(target_name, drafters, requests, max_draft, device), step_seconds=step_seconds,
                       draft_seconds=draft_seconds, source="measured", spread=max(spreads) if spreads else 0.0)


def _time_drafter(drafter, prompts, prefill, R, context, repeats, device, sync, time_fn, tick,
                  target_step: Callable[[], None]) -> float:
    """Median seconds of a steady-state ``propose``: every round one more token per request, each
    right after an (untimed) target step, as in the loop (its features, when the target gives
    them, are the prompt's, recycled). Back to back, a drafter finds its weights in the caches
    and times 30-50% faster than it drafts in the loop, after the target has streamed its own."""
    if int(getattr(drafter, "num_draft", 0)) == 0:
        for _ in range(repeats):
            tick()
        return 0.0
    width = context + repeats + 2
    tokens = torch.zeros(R, width, dtype=torch.int64)
    for b, p in enumerate(prompts):
        tokens[b, :context] = p
        tokens[b, context:] = p[: width - context]
    tokens = tokens.to(device)
    features = None
    if prefill.hidden_states is not None:
        rows = prefill.hidden_states.view(R, context, -1)
        features = torch.cat([rows, rows[:, : width - context]], dim=1)
    shown = torch.zeros(R, dtype=torch.int64, device=device)
    samples = []
    for call in range(repeats + 1):  # call 0 feeds the prompt's features (a new request): untimed
        lengths = torch.full((R,), context + 1 + call, dtype=torch.int64, device=device)
        ctx = DraftContext(tokens=tokens[:, : int(lengths.max())], lengths=lengths,
                           anchor_hidden=None if features is None else features[:, context - 1 + call],
                           temperature=torch.zeros(R, device=device), seed=torch.arange(R, device=device),
                           offset=torch.full((R,), call, dtype=torch.int64, device=device),
                           hidden_states=None if features is None else features[:, : int(lengths.max())],
                           new_from=shown.clone())
        target_step()
        sync()
        start = time_fn()
        drafter.propose(ctx)
        sync()
        if call:
            samples.append(time_fn() - start)
            tick()
        shown = lengths - 1
    return statistics.median(samples)


def _cached(path: Path, key: dict) -> Optional[CostProfile]:
    if not path.is_file():
        return None
    try:
        profile = CostProfile.from_json(path.read_text())
    except (ValueError, KeyError, TypeError):
        return None  # unreadable: measure again
    return profile if profile.key == key else None


def load_or_measure(target, drafters: Dict[str, object], requests: Sequence[int], max_draft: int, *,
                    target_name: str, cache_dir=None, remeasure: bool = False,
                    fallback: Optional[CostProfile] = None, log: Callable[[str], None] = print,
                    **measure_kwargs) -> CostProfile:
    """The profile for this (target, drafters, machine, threads, torch) at each batch size in
    ``requests``: each batch size is cached in its own file, so a profile measured for some
    batch sizes (``dspark profile --batch-sizes 1,4``) serves any run that needs a subset;
    the missing ones (all, with ``remeasure``) are measured. ``fallback`` (e.g. a shipped
    table) only with ``DSPARK_NO_PROFILE=1``."""
    if os.environ.get("DSPARK_NO_PROFILE") == "1" and fallback is not None:
        log(f"cost profile: DSPARK_NO_PROFILE=1, using the {fallback.source} table")
        return fallback
    requests = sorted({int(r) for r in requests})
    paths = {R: profile_path(profile_key(target_name, drafters, [R], max_draft, target.device), cache_dir)
             for R in requests}
    parts = {} if remeasure else {
        R: _cached(paths[R], profile_key(target_name, drafters, [R], max_draft, target.device)) for R in requests}
    missing = [R for R in requests if parts.get(R) is None]
    folder = paths[requests[0]].parent if requests else Path(".")
    source = f"measured on this machine, cached in {folder}"
    spread = max((p.spread for p in parts.values() if p is not None), default=0.0)
    if missing:
        log(f"cost profile: measuring this machine (once per target, drafter, device, threads, torch, kernel build and batch "
            f"size; `dspark profile` re-measures)")
        measured = measure(target, drafters, missing, max_draft, target_name=target_name, **measure_kwargs)
        busy = measured.spread > BUSY_SPREAD
        spread = max(spread, measured.spread)
        for R in missing:
            parts[R] = CostProfile(key=profile_key(target_name, drafters, [R], max_draft, target.device),
                                   step_seconds={R: measured.step_seconds[R]},
                                   draft_seconds={name: {R: costs[R]} for name, costs in measured.draft_seconds.items()},
                                   spread=measured.spread)
            if not busy:
                paths[R].parent.mkdir(parents=True, exist_ok=True)
                temporary = paths[R].with_suffix(".tmp")
                temporary.write_text(parts[R].to_json())
                temporary.replace(paths[R])
        if busy:
            source = f"measured (not saved: the machine was busy, spread {measured.spread:.0%})"
            log(f"cost profile: timings spread by {measured.spread:.0%} (> {BUSY_SPREAD:.0%}): the machine is busy; "
                "this run uses them, but they are not saved")
        else:
            source = f"measured on this machine, saved to {folder}"
            log(f"cost profile: saved to {folder}")
    draft_seconds: Dict[str, Dict[int, float]] = {}
    for part in parts.values():
        for name, costs in part.draft_seconds.items():
            draft_seconds.setdefault(name, {}).update(costs)
    return CostProfile(key=profile_key(target_name, drafters, requests, max_draft, target.device),
                       step_seconds={R: parts[R].step_seconds[R] for R in requests}, draft_seconds=draft_seconds,
                       source=source, spread=spread)
