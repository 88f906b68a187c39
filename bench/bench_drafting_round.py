"""What a drafting round of ``dspark generate``'s default costs on this machine, by batch size:
the DSpark drafter's ``propose`` and the loop's planning, on real contexts (the shipped drafter on
SmolLM2-135M-Instruct, MT-Bench prompts, 24 rounds into a greedy generation).

    python bench/bench_drafting_round.py [--batch-sizes 1,4] [--compile] [--markdown FILE]

``propose`` (feed the round's new context row, draft one block of K) is timed interleaved as:

* **draft vocabulary** (shipped): the drafter samples from its ``draft_vocab_size`` most frequent
  ids, so its LM head and Markov head read that many rows, and its backbone's projections are
  packed in bfloat16 for ``dspark::skinny_linear``;
* **unfused layers**: the same with each backbone layer run as its own ops (its norms, RoPE,
  attention and MLP from Python) instead of one ``dspark::draft_layer`` call;
* **Python context feed**: the same with the round's context feed (context projection and norm,
  each layer's k/v, key norm and RoPE, the cache writes) as its own ops instead of one
  ``dspark::draft_context`` call;
* **float32 backbone**: the same with the backbone's projections packed in float32;
* **module backbone** (what it ran before): the backbone's own ``nn.Linear`` matmuls;
* **whole vocabulary** (the reference): every id;
* **compiled** (``--compile``): the shipped form with ``torch.compile(dynamic=True)`` of the
  backbone's forward;
* **read**: one pass over the weights the shipped round reads (backbone, LM head and Markov W2
  rows of the draft vocabulary), the floor of a memory-bound round.

A round drafts right after the target's step has streamed ~540 MB of weights through the caches,
so every timed call starts from caches flushed the same way (a 1 GiB read); warm, the form timed
after another would find the drafter's weights in the cache. ``--warm`` times them warm anyway:
what is left is the round's own work and framework overhead, without the memory traffic.

Then the planning the loop adds to every round of the default (``choose_plan``, which runs the
prompt lookup and the forecasts), measured inside a real call at T = 1 (``generate``'s own
rounds), per round.
"""

import argparse
import dataclasses
import importlib
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import Table, machine_lines, patched  # noqa: E402

from dspark_ext.cli import _encode, load_eval_prompts  # noqa: E402
from dspark_ext.drafters.dspark import DSparkDrafter, shipped_drafter_path  # noqa: E402
from dspark_ext.drafters.hybrid import default_hybrid_drafter  # noqa: E402
from dspark_ext.protocols import DraftContext  # noqa: E402
from dspark_ext.targets import load_target  # noqa: E402

generation = importlib.import_module("dspark_ext.generate")
dspark_module = importlib.import_module("dspark_ext.drafters.dspark")

#: Bytes read before every timed call to evict the caches (these machines have up to 480 MiB of
#: last-level cache).
FLUSH_BYTES = 1 << 30


def round_context(target, drafter, prompts, at_round: int) -> DraftContext:
    """Round ``at_round`` of a greedy DSpark-only generation with ``drafter``, with its last
    context row new again: a round after a rejection."""
    captured = {}
    propose = generation._Generation.propose

    def spy(self, context, plan):
        if self.result.num_rounds == at_round:
            captured["context"], captured["features"] = context, self.features.clone()
        return propose(self, context, plan)

    generation._Generation.propose = spy
    try:
        generation.generate(target, drafter, prompts, 64, temperature=0.0, seed=0)
    finally:
        generation._Generation.propose = propose
    c = captured["context"]
    return DraftContext(tokens=c.tokens, lengths=c.lengths, anchor_hidden=c.anchor_hidden, temperature=c.temperature,
                        seed=c.seed, offset=c.offset, hidden_states=captured["features"],
                        new_from=(c.lengths - 2).clamp(min=0))


def round_weights(drafter: DSparkDrafter):
    """The weights a drafting round of ``drafter`` reads."""
    dtype = drafter.inference_lm_head_dtype or torch.float32
    if drafter.inference_backbone_dtype is None:
        weights = [p.detach() for p in drafter.backbone.parameters()]
    else:  # the projections as the round reads them (packed), and the norms
        packed = drafter.backbone.packed(drafter.inference_backbone_dtype)
        linears = [packed.context_proj] + [getattr(layer, name) for layer in packed.layers
                                           for name in ("qkv", "o", "gate_up", "down", "context_kv")]
        weights = [linear.packed for linear in linears]
        weights += [p.detach() for name, p in drafter.backbone.named_parameters() if "norm" in name]
    if drafter.draft_vocab is None:
        weights.append(drafter.packed_lm_head(dtype))
    else:
        weights.append(drafter.drafting_head(dtype)[1])
    if drafter.markov is not None:
        weights.append(drafter.drafting_markov_weights(torch.bfloat16 if dtype == torch.bfloat16 else torch.float32)[1])
    return weights


@torch.no_grad()
def time_propose(target, shipped: DSparkDrafter, folder, prompts, compile_backbone: bool, repeats: int,
                 flush_caches: bool = True):
    """Median ms of each form (``shipped`` loaded from ``folder``), and the share of its drafts
    the whole vocabulary, the module backbone and the unfused layers propose alike (one greedy
    round)."""
    whole = DSparkDrafter.for_target(folder, target)
    whole.set_draft_vocabulary(None, 0)
    drafters = {"draft vocabulary": shipped, "whole vocabulary": whole}
    for name, dtype in (("float32 backbone", torch.float32), ("module backbone", None)):
        drafters[name] = DSparkDrafter.for_target(folder, target)
        drafters[name].inference_backbone_dtype = dtype
    if compile_backbone:
        compiled = DSparkDrafter.for_target(folder, target)
        compiled.backbone.forward = torch.compile(compiled.backbone.forward, dynamic=True)
        drafters["compiled"] = compiled
    context = round_context(target, shipped, prompts, at_round=24)
    everything = dataclasses.replace(context, new_from=torch.zeros_like(context.new_from))
    for drafter in drafters.values():  # every drafter's context cache holds the same context
        drafter.propose(everything)

    def form(name):
        drafter = drafters[name]

        def propose():
            drafter._cache_len = context.new_from.cpu().clone()  # the last context row is new again
            return drafter.propose(context)
        return propose

    forms = {name: form(name) for name in drafters}

    def unfused():  # the shipped form with each backbone layer as its own ops, not one draft_layer call
        with patched(dspark_module, "FUSED_DRAFT_LAYERS", False):
            return forms["draft vocabulary"]()
    forms["unfused layers"] = unfused

    def python_feed():  # the shipped form with the context feed as its own ops, not one draft_context call
        with patched(dspark_module, "FUSED_CONTEXT_FEED", False):
            return forms["draft vocabulary"]()
    forms["Python context feed"] = python_feed
    weights = round_weights(shipped)
    forms["read"] = lambda: [w.sum() for w in weights]
    for fn in forms.values():  # compile, pack, warm
        fn()
    shipped_ids = forms["draft vocabulary"]().token_ids
    agree = {other: float((shipped_ids == forms[other]().token_ids).float().mean())
             for other in ("whole vocabulary", "module backbone", "unfused layers", "Python context feed")}
    flush = torch.ones(FLUSH_BYTES // 4 if flush_caches else 1)
    samples = {name: [] for name in forms}
    for _ in range(repeats):
        for name, fn in forms.items():
            flush.sum()
            start = time.perf_counter()
            fn()
            samples[name].append(1e3 * (time.perf_counter() - start))
    return {name: statistics.median(values) for name, values in samples.items()}, agree


def planning_per_round(target, default, cost, prompts, repeats: int):
    """Median over ``repeats`` calls of (ms of ``choose_plan`` per round, rounds) in a default
    generation at T = 1."""
    times, rounds = [], []
    choose_plan = generation._Generation.choose_plan
    spent = [0.0]

    def timed(self, *args):
        start = time.perf_counter()
        try:
            return choose_plan(self, *args)
        finally:
            spent[0] += time.perf_counter() - start

    generation._Generation.choose_plan = timed
    try:
        for repeat in range(repeats):
            spent[0] = 0.0
            result = generation.generate(target, default, prompts, 96, temperature=1.0, seed=repeat, cost=cost)
            times.append(1e3 * spent[0] / result.num_rounds)
            rounds.append(result.num_rounds)
    finally:
        generation._Generation.choose_plan = choose_plan
    return statistics.median(times), statistics.median(rounds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-sizes", default="1,4")
    parser.add_argument("--repeats", type=int, default=40)
    parser.add_argument("--planning-calls", type=int, default=3)
    parser.add_argument("--compile", action="store_true", help="also time torch.compile of the backbone")
    parser.add_argument("--warm", action="store_true",
                        help="time every call without flushing the caches first (the weights stay cached)")
    parser.add_argument("--markdown", default=None)
    args = parser.parse_args()

    started = time.perf_counter()
    target, tokenizer = load_target(None)
    default = default_hybrid_drafter(target)
    shipped = default.dspark
    lines = machine_lines("cpu")
    lines.append(f"draft vocabulary: {shipped.cfg.draft_vocab_size or 'every id'} of {shipped.cfg.vocab_size} ids")
    propose_table = Table(["B", "draft vocabulary ms", "unfused layers ms", "Python context feed ms", "float32 backbone ms",
                           "module backbone ms", "whole vocabulary ms", "compiled ms", "read ms",
                           "unfused / draft vocabulary", "Python feed / draft vocabulary", "module / draft vocabulary", "whole / draft vocabulary",
                           "compiled / draft vocabulary", "draft vocabulary / read", "same drafts: whole vocabulary",
                           "same drafts: module backbone", "same drafts: unfused layers",
                           "same drafts: Python context feed"])
    planning_table = Table(["B", "choose_plan ms per round", "rounds per call"])
    for batch_size in map(int, args.batch_sizes.split(",")):
        prompts = [_encode(tokenizer, text, True) for text in load_eval_prompts("mt-bench", batch_size)]
        target.hidden_layers = list(shipped.cfg.context_layers)
        medians, agree = time_propose(target, shipped, shipped_drafter_path(), prompts, args.compile, args.repeats,
                                      flush_caches=not args.warm)
        mine, whole, read = medians["draft vocabulary"], medians["whole vocabulary"], medians["read"]
        compiled = medians.get("compiled")
        modules = medians["module backbone"]
        unfused, python_feed = medians["unfused layers"], medians["Python context feed"]
        propose_table.add([batch_size, f"{mine:.2f}", f"{unfused:.2f}", f"{python_feed:.2f}",
                           f"{medians['float32 backbone']:.2f}",
                           f"{modules:.2f}", f"{whole:.2f}", "-" if compiled is None else f"{compiled:.2f}",
                           f"{read:.2f}", f"{unfused / mine:.2f}x", f"{python_feed / mine:.2f}x", f"{modules / mine:.2f}x", f"{whole / mine:.2f}x",
                           "-" if compiled is None else f"{compiled / mine:.2f}x", f"{mine / read:.2f}x",
                           f"{agree['whole vocabulary']:.0%}", f"{agree['module backbone']:.0%}",
                           f"{agree['unfused layers']:.0%}", f"{agree['Python context feed']:.0%}"])
        cost = default.cost_profile(target, requests=[batch_size])
        plan_ms, rounds = planning_per_round(target, default, cost, prompts, args.planning_calls)
        planning_table.add([batch_size, f"{plan_ms:.3f}", f"{rounds:g}"])
        print(propose_table.text(), "\n", planning_table.text(), flush=True)
    report = "\n".join(["    " + line for line in lines] + [
        f"    run time {time.perf_counter() - started:.0f} s", "",
        f"DSpark `propose`, one round {'with warm caches' if args.warm else 'after a flushed cache'} "
        "(context cache fed one row, K = 7 drafted):", "",
        propose_table.markdown(), "",
        "The loop's planning in a default generation at T = 1 (MT-Bench, 96 tokens per request):", "",
        planning_table.markdown(), ""])
    print(report)
    if args.markdown:
        Path(args.markdown).write_text(report)


if __name__ == "__main__":
    main()
