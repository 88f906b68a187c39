"""Benchmark of torch.ops.dspark.cached_attention: the attention of one target step over its
rows, as LlamaTarget runs it when it decodes (1 row per request) or verifies drafts (1 + drafts).

    python3 bench/bench_cached_attention.py                  # SmolLM2-135M's heads, batch 1 and 4
    python3 bench/bench_cached_attention.py --context 1000 --markdown out.md

One "step" is the attention of every layer in order (30 layers of 9 query and 3 KV heads of 64
dimensions: SmolLM2-135M-Instruct's shapes, random values), each layer over its own cache, so
the working set is the whole step's cache (B x 30 x 2 x 3 x context x 64 floats), as in a real
step. Requests hold context, context - 17, ... keys before the step. Per step shape (tokens per
request) it reports

  cached    the step through dspark::cached_attention
  sdpa      the same step as the target ran it before: its queries scattered into a padded
            [B, rows, H, D] block per segment of requests (dspark_ext.llama.attention_segments),
            F.scaled_dot_product_attention with the causal mask, and gathered back (the eager
            reference)
  compiled  torch.compile of that sdpa step (default mode, compiled per shape outside timing)
  read      one read pass over the keys and values the step attends to (a sum per tensor)
  cached/read, sdpa/cached, compiled/cached   ratios of medians timed interleaved

and checks, before timing, that the two agree (float32 rounding). The figure of merit for
speculative decoding is how a step grows with its rows: cached(rows) / cached(1 row each).
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import Table, Timer, fmt_ms, fmt_ratio, interleaved_medians, machine_lines  # noqa: E402

from dspark_ext.llama import _AttentionSegment, attention_segments  # noqa: E402

LAYERS, HEADS, KV_HEADS, HEAD_DIM = 30, 9, 3, 64


def step_inputs(counts, context: int, gen: torch.Generator):
    B = len(counts)
    contexts = torch.tensor([max(context - 17 * b, 1) for b in range(B)], dtype=torch.int64)
    counts_t = torch.tensor(counts, dtype=torch.int64)
    capacity = int((contexts + counts_t).max())
    cu = torch.cat([torch.zeros(1, dtype=torch.int64), counts_t.cumsum(0)])
    T = int(cu[-1])
    queries = [torch.randn(T, HEADS, HEAD_DIM, generator=gen) for _ in range(LAYERS)]
    keys = [torch.randn(B, KV_HEADS, capacity, HEAD_DIM, generator=gen) for _ in range(LAYERS)]
    values = [torch.randn(B, KV_HEADS, capacity, HEAD_DIM, generator=gen) for _ in range(LAYERS)]
    return queries, keys, values, cu, contexts


def cached_step(queries, keys, values, cu, contexts):
    scale = HEAD_DIM ** -0.5
    return [torch.ops.dspark.cached_attention(q, k, v, cu, contexts, scale) for q, k, v in zip(queries, keys, values)]


def sdpa_step_of(cu, contexts):
    """The target's previous attention step (segments, padding, SDPA, gather), for one shape."""
    counts = (cu[1:] - cu[:-1]).tolist()
    key_counts = (contexts + cu[1:] - cu[:-1]).tolist()
    B = len(counts)
    row_b = torch.repeat_interleave(torch.arange(B), cu[1:] - cu[:-1])
    row_t = torch.arange(int(cu[-1])) - cu[row_b]
    segments = [_AttentionSegment.of(b0, b1, counts, key_counts, contexts, row_b, row_t)
                for b0, b1 in attention_segments(counts, key_counts)]

    def step(queries, keys, values):
        outs = []
        for q, k, v in zip(queries, keys, values):
            parts = [segment.attend(q, k, v, KV_HEADS != HEADS) for segment in segments]
            outs.append(parts[0] if len(parts) == 1 else torch.cat(parts))
        return outs
    return step


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--context", type=int, default=400, help="keys cached before the step (longest request)")
    parser.add_argument("--batch-sizes", default="1,4")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile of the SDPA step")
    parser.add_argument("--markdown", help="also write the table as Markdown to this file")
    args = parser.parse_args()

    header = machine_lines("cpu") + [f"{LAYERS} layers x ({HEADS} query, {KV_HEADS} KV heads, D = {HEAD_DIM}); "
                                     f"context {args.context} keys (longest request)"]
    print("\n".join(header))
    timer = Timer("cpu")
    table = Table(["B", "tokens per request", "cached ms", "sdpa ms", "compiled ms", "read ms", "cached/read",
                   "cached/cached(1 each)", "sdpa/cached", "compiled/cached"])
    gen = torch.Generator().manual_seed(0)
    for B in map(int, args.batch_sizes.split(",")):
        shapes = [[1] * B, [2] + [1] * (B - 1), [2] * B, [4] * B, [8] * B] if B > 1 else [[1], [2], [4], [8]]
        first = None
        for counts in shapes:
            queries, keys, values, cu, contexts = step_inputs(counts, args.context, gen)
            sdpa_step = sdpa_step_of(cu, contexts)
            for mine, reference in zip(cached_step(queries, keys, values, cu, contexts),
                                       sdpa_step(queries, keys, values)):
                torch.testing.assert_close(mine, reference, rtol=1e-4, atol=1e-5)
            read_views = [t[:, :, :int((contexts + cu[1:] - cu[:-1]).max())] for t in keys + values]
            fns = {"cached": lambda: cached_step(queries, keys, values, cu, contexts),
                   "sdpa": lambda: sdpa_step(queries, keys, values),
                   "read": lambda: [t.sum() for t in read_views]}
            if not args.no_compile:
                compiled = torch.compile(sdpa_step)
                compiled(queries, keys, values)
                fns["compiled"] = lambda: compiled(queries, keys, values)
            t = interleaved_medians(timer, fns, repeats=args.repeats)
            first = first or t["cached"]
            table.add([B, "+".join(map(str, counts)), fmt_ms(t["cached"]), fmt_ms(t["sdpa"]), fmt_ms(t.get("compiled")),
                       fmt_ms(t["read"]), fmt_ratio(t["cached"] / t["read"]), fmt_ratio(t["cached"] / first),
                       fmt_ratio(t["sdpa"] / t["cached"]),
                       fmt_ratio(t["compiled"] / t["cached"]) if "compiled" in t else "n/a"])
            print(table.text().splitlines()[-1], flush=True)
    print()
    print(table.text())
    if args.markdown:
        table.write_markdown(args.markdown, header)
    return 0


if __name__ == "__main__":
    sys.exit(main())
