"""What a verification step of the default target costs when its requests verify different numbers
of tokens, with attention in one call (every request's queries padded to the longest) against the
split that ``dspark_ext.llama.attention_segments`` chooses.

    python bench/bench_attention_split.py [--context 400] [--repeats 7] [--markdown FILE]

SmolLM2-135M-Instruct (the default target), batch 4, each request holding ``--context`` tokens of
random ids; one timed step appends the listed tokens per request (with the drafter's context
features, as in the loop) and is rewound. The two forms are timed interleaved, medians of
``--repeats`` rounds. Evenly spread steps of the same token count are listed for reference (they
always run as one call).
"""

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import Table, Timer, fmt_ratio, interleaved_medians, machine_lines  # noqa: E402

import dspark_ext.llama as llama_module  # noqa: E402
from dspark_ext.drafters.dspark import shipped_drafter_path  # noqa: E402
from dspark_ext.targets import load_target  # noqa: E402

#: Tokens per request in a step: uneven ones (a request's drafts verified, the others' not), and
#: even ones of about as many tokens.
STEPS = [(1, 1, 1, 1), (2, 1, 1, 1), (3, 1, 1, 1), (5, 1, 1, 1), (1, 5, 1, 1), (2, 2, 2, 2), (8, 1, 1, 1),
         (1, 1, 8, 1), (3, 3, 3, 2), (4, 1, 4, 1), (13, 1, 1, 1), (4, 4, 4, 4), (8, 8, 1, 1), (1, 8, 1, 8)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--context", type=int, default=400, help="tokens in each request's cache before the step")
    parser.add_argument("--repeats", type=int, default=7, help="interleaved rounds per step (medians)")
    parser.add_argument("--markdown", help="also write the table as Markdown to this file")
    args = parser.parse_args()

    target, _ = load_target(drafter_path=shipped_drafter_path())
    model, batch = target.model, 4
    cache = model.new_cache(batch, args.context + 64)
    model.forward(torch.randint(0, model.config.vocab_size, (batch * args.context,)),
                  torch.arange(batch + 1) * args.context, cache, return_logits=False)
    context_lengths = cache.lengths.clone()
    split = llama_module.attention_segments

    def step(counts, segments):
        def run():
            llama_module.attention_segments = segments
            try:
                cache.lengths = context_lengths.clone()
                cu = torch.tensor((0,) + counts).cumsum(0)
                model.forward(torch.randint(0, model.config.vocab_size, (sum(counts),)), cu, cache,
                              hidden_layers=target.hidden_layers)
            finally:
                llama_module.attention_segments = split
        return run

    def one_call(counts, key_counts, device=None):
        return [(0, len(counts))]

    print("\n".join(machine_lines("cpu")))
    table = Table(["tokens per request", "tokens", "segments chosen", "one call ms", "split ms", "split / one call"])
    timer = Timer("cpu")
    for counts in STEPS:
        chosen = split(list(counts), [args.context + c for c in counts])
        medians = interleaved_medians(timer, {"one": step(counts, one_call), "split": step(counts, split)},
                                      repeats=args.repeats)
        table.add([" + ".join(map(str, counts)), str(sum(counts)),
                   " ".join("[" + " + ".join(map(str, counts[b0:b1])) + "]" for b0, b1 in chosen),
                   f"{medians['one']:.2f}", f"{medians['split']:.2f}", fmt_ratio(medians["split"] / medians["one"], 3)])
        print(table.rows[-1])
    print(table.text())
    if args.markdown:
        Path(args.markdown).write_text(table.markdown() + "\n")


if __name__ == "__main__":
    main()
