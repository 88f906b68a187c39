"""One DSpark training step (loss forward + backward, as `dspark train` runs it) over the whole
vocabulary against a draft vocabulary, interleaved in one process.

    python bench/bench_training_step.py [--threads 2] [--repeats 12] [--sizes 0,8192,16384] \
        [--lm-head-dtypes auto,bfloat16,float32]

The drafter is the shipped one (SmolLM2-135M-Instruct's), trained as the recipe trains it: a
batch of 4 answers x 32 blocks of K = 7 (896 rows), 300 rows of context features each, the
LM-head matmuls in the recipe's dtype (`train.training_lm_head_dtype`: bfloat16 where its matmul
is native, float32 elsewhere; `--lm-head-dtypes` times others beside it) and the vocabulary-wide
terms `torch.compile`d. Over a draft vocabulary the batch carries the target's whole-vocabulary
logsumexp and argmax, as the feature cache's teacher statistics give them. The batch is random
(the step's cost does not depend on the values). Prints the median time per step of each
(dtype, size) arm and its speed-up over the first arm, then the median time of the LM-head matmul
alone in each dtype (the batch's 896 rows against the first size's rows; every linear layer of
the target computing the recipe's data runs the same kind of matmul).
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
    p.add_argument("--lm-head-dtypes", default="auto",
                   help="LM-head dtypes to time (auto: the one `dspark train` picks on this machine)")
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
    recipe_dtype = train.training_lm_head_dtype(train.RecipeConfig(out_dir="."), "cpu")
    dtypes = list(dict.fromkeys(recipe_dtype if d == "auto" else getattr(torch, d) for d in args.lm_head_dtypes.split(",")))
    drafter.train()
    cfg = drafter.cfg
    batch = synthetic_batch(cfg.vocab_size, cfg.hidden_size, len(cfg.context_layers) * cfg.hidden_size, cfg.num_draft)
    with_statistics = {}
    for dtype in dtypes:  # the teacher statistics are computed in the training LM head's dtype
        with torch.no_grad():
            logits = torch.nn.functional.linear(batch["final"].to(dtype), drafter.lm_head_as(dtype)).float()
        with_statistics[dtype] = dict(batch, teacher_lse=logits.logsumexp(-1), teacher_argmax=logits.argmax(-1))
    terms, vocabulary_terms = torch.compile(train.head_terms), torch.compile(train.draft_vocabulary_terms)
    arms = [(dtype, int(size)) for dtype in dtypes for size in args.sizes.split(",")]

    def step(dtype: torch.dtype, size: int) -> float:
        drafter.training_lm_head_dtype = dtype
        drafter.set_draft_vocabulary(ranking if size else None, size)
        t0 = time.perf_counter()
        loss, _ = train.dspark_loss(drafter, with_statistics[dtype] if size else batch, train.LossWeights(), terms,
                                    vocabulary_terms)
        drafter.zero_grad(set_to_none=True)
        loss.backward()
        return time.perf_counter() - t0

    for arm in arms:  # compile and warm up
        step(*arm), step(*arm)
    times = {arm: [] for arm in arms}
    for _ in range(args.repeats):  # interleaved: the machine's drift hits every arm alike
        for arm in arms:
            times[arm].append(step(*arm))
    base = statistics.median(times[arms[0]])
    print(f"training step, {args.threads} threads, 4 x 32 blocks of K = {cfg.num_draft}, median of {args.repeats} "
          f"(the recipe's LM head here: {str(recipe_dtype).removeprefix('torch.')}):")
    for dtype, size in arms:
        median = statistics.median(times[(dtype, size)])
        name = "whole vocabulary" if size == 0 else f"draft vocabulary {size}"
        print(f"  {str(dtype).removeprefix('torch.'):>8} LM head, {name:>24}: {median * 1000:9.1f} ms  "
              f"(speed-up {base / median:.2f}x)")
    rows = batch["final"].flatten(0, 2)
    heads = {dtype: drafter.lm_head_as(dtype)[:arms[0][1] or None].contiguous() for dtype in dtypes}
    matmuls = {dtype: [] for dtype in dtypes}
    for _ in range(args.repeats + 1):  # the first round warms up
        for dtype in dtypes:
            x = rows.to(dtype)
            t0 = time.perf_counter()
            torch.nn.functional.linear(x, heads[dtype])
            matmuls[dtype].append(time.perf_counter() - t0)
    first = statistics.median(matmuls[dtypes[0]][1:])
    print(f"LM-head matmul alone, {rows.shape[0]} x {heads[dtypes[0]].shape[0]} x {rows.shape[1]}:")
    for dtype in dtypes:
        median = statistics.median(matmuls[dtype][1:])
        print(f"  {str(dtype).removeprefix('torch.'):>8}: {median * 1000:9.1f} ms  (speed-up {first / median:.2f}x)")


if __name__ == "__main__":
    main()
