"""Benchmark of torch.ops.dspark.skinny_linear: the linear layers of one target step over M rows
(M = tokens in the step: 1 when decoding, B x (drafts + 1) when verifying).

    python3 bench/bench_skinny_linear.py                       # SmolLM2-135M's layers, M = 1..48
    ATEN_CPU_CAPABILITY=avx2 python3 bench/bench_skinny_linear.py --markdown out.md

One "step" is every projection of the model in order, as LlamaTarget runs them: per layer the
fused q/k/v [960, 576], o [576, 576], the fused gate/up [3072, 576] and down [576, 1536], then
the LM head [49152, 576] (SmolLM2-135M-Instruct's shapes, random weights; --layers changes the
depth). The working set is the whole model's weights (425 MB + 113 MB), as in a real step: the
layers are not timed one at a time out of a warm cache. Per M it reports

  skinny    the step through dspark::skinny_linear on the packed weights
  gemm      the same step through F.linear (the eager reference: oneDNN/MKL GEMM)
  compiled  torch.compile of that F.linear step (default mode, compiled per M outside timing)
  read      one read pass over the packed weights (a sum per tensor): what a step must cost
  skinny/read, gemm/skinny, compiled/skinny   ratios of medians timed interleaved

and checks, before timing, that skinny_linear agrees with F.linear (float32 rounding) for
each M. The figure of merit for speculative decoding is how skinny(M) grows with M: verifying
M - 1 drafts costs skinny(M) / skinny(1) of one decoding step.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import Table, Timer, fmt_ms, fmt_ratio, interleaved_medians, machine_lines  # noqa: E402

SMOLLM2_LAYER = [(960, 576), (576, 576), (3072, 576), (576, 1536)]
SMOLLM2_HEAD = (49152, 576)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", default="1,2,4,8,12,16,24,32,48", help="M values (default: %(default)s)")
    parser.add_argument("--layers", type=int, default=30, help="decoder layers (default: %(default)s, SmolLM2-135M)")
    parser.add_argument("--repeats", type=int, default=15, help="timed rounds per M (default: %(default)s)")
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile of the F.linear step")
    parser.add_argument("--markdown", help="also write the table as Markdown to this file")
    args = parser.parse_args()

    import dspark_ext  # noqa: F401  (registers torch.ops.dspark.*)
    from dspark_ext.ops import pack_skinny_weight

    g = torch.Generator().manual_seed(0)
    shapes = SMOLLM2_LAYER * args.layers + [SMOLLM2_HEAD]
    weights = [torch.randn(n, k, generator=g) * 0.02 for n, k in shapes]
    packed = [pack_skinny_weight(w) for w in weights]
    megabytes = sum(p.numel() for p in packed) * 4 / 1e6

    def skinny_step(inputs):
        return [torch.ops.dspark.skinny_linear(inputs[w.shape[1]], p, w.shape[0], None) for w, p in zip(weights, packed)]

    def gemm_step(inputs):
        return [F.linear(inputs[w.shape[1]], w) for w in weights]

    timer = Timer("cpu")
    table = Table(["M", "skinny ms", "gemm ms", "compiled ms", "read ms", "skinny/read", "skinny/skinny(1)",
                   "gemm/gemm(1)", "gemm/skinny", "compiled/skinny"])
    first = {}
    started = time.perf_counter()
    for rows in [int(r) for r in args.rows.split(",")]:
        inputs = {k: torch.randn(rows, k, generator=g) for k in {k for _, k in shapes}}
        for ours, theirs in zip(skinny_step(inputs)[:5] + skinny_step(inputs)[-1:], gemm_step(inputs)[:5] + gemm_step(inputs)[-1:]):
            torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)
        fns = {"skinny": lambda: skinny_step(inputs), "gemm": lambda: gemm_step(inputs),
               "read": lambda: [p.sum() for p in packed]}
        if not args.no_compile:
            compiled = torch.compile(gemm_step)
            compiled(inputs)
            fns["compiled"] = lambda: compiled(inputs)
        t = interleaved_medians(timer, fns, repeats=args.repeats)
        first.setdefault("skinny", t["skinny"])
        first.setdefault("gemm", t["gemm"])
        table.add([rows, fmt_ms(t["skinny"]), fmt_ms(t["gemm"]), fmt_ms(t.get("compiled")), fmt_ms(t["read"]),
                   fmt_ratio(t["skinny"] / t["read"]), fmt_ratio(t["skinny"] / first["skinny"]),
                   fmt_ratio(t["gemm"] / first["gemm"]), fmt_ratio(t["gemm"] / t["skinny"]),
                   fmt_ratio(t["compiled"] / t["skinny"]) if "compiled" in t else "n/a"])
        print(table.text().splitlines()[-1], flush=True)
    header = machine_lines("cpu") + [
        f"capability: {torch.backends.cpu.get_cpu_capability()}; {args.layers} layers + LM head, "
        f"{megabytes:.0f} MB of packed weights; run time {time.perf_counter() - started:.0f} s"]
    print("\n".join(header))
    print(table.text())
    if args.markdown:
        table.write_markdown(args.markdown, header)
    return 0


if __name__ == "__main__":
    sys.exit(main())
