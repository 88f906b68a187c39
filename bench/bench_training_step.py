"""One DSpark training step (loss forward + backward, as `dspark train` runs it) over the whole
vocabulary against a draft vocabulary, interleaved in one process.

    python bench/bench_training_step.py [--threads 2] [--repeats 12] [--sizes 0,8192,16384]

The drafter is the shipped one (SmolLM2-135M-Instruct's), trained as the recipe trains it: a
batch of 4 answers x 32 blocks of K = 7 (896 rows), 300 rows of context features each, the
LM-head matmuls in bfloat16 and the vocabulary-wide terms `torch.compile`d. Over a draft
vocabulary the batch carries the target's whole-vocabulary logsumexp and argmax, as the feature
cache's teacher statistics give them. The batch is random (the step's cost does not depend on
the values). Prints the median time per step of each size and its speed-up over the first size.
"""

import argparse
import statistics
import time

import torch


def synthetic_batch(vocab_size: int, hidden: int, width: int, num_draft: int, sequences=4, blocks=32, context=300):
    g = torch.Generator().manual_seed(0)
    anchors = torch.stack([torch.sort(torch.randint(50, context, (blocks,), generator=g)).values
                           for _ in range(sequences)])
    shape = (sequences, blocks, num_draft)
    return {"context": torch.randn(sequences, context, width, generator=g) * 5,
            "context_positions": torch.arange(context)[None].expand(sequences, -1),
            "anchor_ids": torch.randint(vocab_size, (sequences, blocks), generator=g), "anchor_positions": anchors,
            "context_mask": torch.arange(context)[None, None] < anchors[:, :, None],
            "targets": torch.randint(vocab_size, shape, generator=g),
            "prev": torch.randint(vocab_size, shape, generator=g),
            "valid": torch.ones(shape, dtype=torch.bool), "final": torch.randn(*shape, hidden, generator=g),
            "data_labels": torch.ones(sequences, dtype=torch.bool)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=12, help="timed steps per size (after 2 warm-up steps each)")
    p.add_argument("--sizes", default="0,8192,16384", help="draft vocabulary sizes (0 = the whole vocabulary)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    from safetensors.torch import load_file

    from dspark_ext import train
    from dspark_ext.defaults import default_drafter_path
    from dspark_ext.drafters.dspark import DSparkDrafter
    from dspark_ext.targets import default_cache_dir, load_default_model

    load_default_model()  # the dequantized target's weights, cached
    weights = load_file(str(default_cache_dir() / "SmolLM2-135M-Instruct" / "model.safetensors"))
    embed = weights["model.embed_tokens.weight"].float()
    drafter = DSparkDrafter.load(default_drafter_path(), embed, embed)
    ranking = drafter.draft_vocab_ranking
    drafter.training_lm_head_dtype = train.TRAINING_LM_HEAD_DTYPE
    drafter.train()
    cfg = drafter.cfg
    batch = synthetic_batch(cfg.vocab_size, cfg.hidden_size, len(cfg.context_layers) * cfg.hidden_size, cfg.num_draft)
    with torch.no_grad():
        logits = torch.nn.functional.linear(batch["final"].to(drafter.training_lm_head_dtype),
                                            drafter.lm_head_as(drafter.training_lm_head_dtype)).float()
    with_statistics = dict(batch, teacher_lse=logits.logsumexp(-1), teacher_argmax=logits.argmax(-1))
    terms, vocabulary_terms = torch.compile(train.head_terms), torch.compile(train.draft_vocabulary_terms)
    sizes = [int(s) for s in args.sizes.split(",")]

    def step(size: int) -> float:
        drafter.set_draft_vocabulary(ranking if size else None, size)
        t0 = time.perf_counter()
        loss, _ = train.dspark_loss(drafter, with_statistics if size else batch, train.LossWeights(), terms,
                                    vocabulary_terms)
        drafter.zero_grad(set_to_none=True)
        loss.backward()
        return time.perf_counter() - t0

    for size in sizes:  # compile and warm up
        step(size), step(size)
    times = {size: [] for size in sizes}
    for _ in range(args.repeats):  # interleaved: the machine's drift hits every size alike
        for size in sizes:
            times[size].append(step(size))
    base = statistics.median(times[sizes[0]])
    print(f"training step, {args.threads} threads, 4 x 32 blocks of K = {cfg.num_draft}, median of {args.repeats}:")
    for size in sizes:
        median = statistics.median(times[size])
        name = "whole vocabulary" if size == 0 else f"draft vocabulary {size}"
        print(f"  {name:>24}: {median * 1000:7.1f} ms  (speed-up {base / median:.2f}x)")


if __name__ == "__main__":
    main()
