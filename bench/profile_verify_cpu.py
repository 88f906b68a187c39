"""Where dspark::verify spends its time on CPU, stage by stage, per instruction-set build.

    python3 bench/profile_verify_cpu.py                       # V=151936, B=8, K=7, float32
    python3 bench/profile_verify_cpu.py --batch 64 --markdown out.md

The CPU kernel marks each stage as a torch.profiler range (csrc/cpu/verify_kernel.h):
  tile_stats           one pass per (row, vocabulary tile): max + sum of exp for sampled rows
                       (max only for greedy rows); run in waves, one per draft position
  row_summaries        merge of each row's tiles (greedy: the first-index argmax)
  decide               the accept rule per request, left to right
  residual_tile_stats  sampled drafts: mass of max(0, p - q) per tile of the rejected row
  race                 the emitted token: race between tiles, then inside the winning one
Each build (ATEN_CPU_CAPABILITY=default|avx2|avx512, as far as the CPU has it) runs in its
own process, on the inputs of bench/bench_verify.py: with their natural acceptance (drafts
often rejected early, so the rows after a rejection are skipped) and with every draft
accepted (--all-accepted there: every row is read, the worst case). One read pass of the
same logits (torch.amax) is timed in the same process for scale.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

_CHILD = r"""
import json, sys, time, torch
sys.path.insert(0, sys.argv[1])
import dspark_ext  # noqa: F401
from bench_verify import Config, make_inputs, make_shape_data, op_call, read_pass_call
from torch.profiler import ProfilerActivity, profile
vocab, batch, k, repeats = (int(a) for a in sys.argv[2:6])
torch.set_num_threads(int(sys.argv[6]))
out = {}
for all_accepted in (False, True):
    data = make_shape_data(vocab, batch, k, torch.float32, "cpu", all_accepted)
    for mode in ("greedy", "sample-onehot", "sample-draftlogits"):
        inputs = make_inputs(data, Config(vocab, batch, k, "fp32", mode))
        op, read = op_call(inputs), read_pass_call(inputs)
        for _ in range(5):
            op(), read()
        op_times, read_times = [], []
        for _ in range(repeats):  # interleaved, outside the profiler
            t = time.perf_counter(); op(); op_times.append(time.perf_counter() - t)
            t = time.perf_counter(); read(); read_times.append(time.perf_counter() - t)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(repeats):
                op()
        stages = {e.key.split("/")[1]: e.cpu_time_total / repeats / 1000 for e in prof.key_averages()
                  if e.key.startswith("dspark::verify/")}
        total = sum(stages.values())
        median = lambda xs: sorted(xs)[len(xs) // 2] * 1000  # noqa: E731
        out[f"{mode}{' all-accepted' if all_accepted else ''}"] = dict(
            op_ms=median(op_times), read_ms=median(read_times),
            stage_share={name: ms / total for name, ms in stages.items()})
print(json.dumps(out))
"""

STAGES = ("tile_stats", "row_summaries", "decide", "residual_tile_stats", "race")


def best_capabilities() -> list:
    import torch

    best = torch.backends.cpu.get_cpu_capability().lower()
    order = ["default", "avx2", "avx512"]
    return order[: order.index(best) + 1] if best in order else ["default"]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vocab", type=int, default=151936)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--k", type=int, default=7)
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--capabilities", nargs="+", default=None, help="default: every build this CPU runs")
    p.add_argument("--markdown", metavar="FILE")
    args = p.parse_args(argv)
    bench_dir = os.path.dirname(os.path.abspath(__file__))
    lines = [f"V={args.vocab}, B={args.batch}, K={args.k}, float32, temperature 1 (greedy: 0), "
             f"{args.threads} threads, {args.repeats} calls; stage shares from torch.profiler, op and read "
             "times are interleaved medians outside it", "",
             "| build | inputs | mode | op ms | read ms | op/read | " + " | ".join(STAGES) + " |",
             "|---|---|---|---:|---:|---:|" + "---:|" * len(STAGES)]
    for capability in args.capabilities or best_capabilities():
        env = {**os.environ, "ATEN_CPU_CAPABILITY": capability}
        result = subprocess.run([sys.executable, "-c", _CHILD, bench_dir, str(args.vocab), str(args.batch), str(args.k),
                                 str(args.repeats), str(args.threads)], env=env, capture_output=True, text=True)
        if result.returncode != 0:
            print(result.stderr, file=sys.stderr)
            return 1
        for case, r in json.loads(result.stdout.strip().splitlines()[-1]).items():
            mode, _, inputs = case.partition(" ")
            shares = [f"{100 * r['stage_share'].get(s, 0.0):.0f}%" for s in STAGES]
            lines.append(f"| {capability} | {inputs or 'natural'} | {mode} | {r['op_ms']:.3f} | {r['read_ms']:.3f} | "
                         f"{r['op_ms'] / r['read_ms']:.2f}x | " + " | ".join(shares) + " |")
        print("\n".join(lines[-6:]) if len(lines) > 10 else "\n".join(lines), flush=True)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
