"""DSpark drafters' acceptance at T = 0 on the evaluation sets, without timing anything: the
target's own greedy answers to each set's first prompts, then every drafter teacher-forced along
them.

    python bench/bench_greedy_tau.py --drafters new=runs/smollm2-self/dspark/drafter,shipped=default \
        [--datasets mt-bench,gsm8k,humaneval] [--num-prompts 20] [--max-new-tokens 96]

At T = 0 a verified draft is accepted iff it is the target's greedy token, and while drafts are
accepted the Markov chain is fed exactly the target's tokens, so the drafter's argmax along the
target's own answer (over its draft vocabulary, as `propose` drafts) decides every round. Rounds
are walked as the loop walks them with all K drafts verified: a round anchored at position a that
accepts n drafts emits n + 1 tokens, and the next round is anchored at a + n + 1. Per set and
drafter this prints tau (tokens per round), the acceptance of the first draft over those rounds
and over every answer position, and the conditional acceptance by position.

The answers and the features (the loop's float32 target, one prefill per answer) are cached under
``--cache``: evaluation data, never a training folder. Seconds per drafter and set instead of the
minutes of `bench/bench_e2e.py`, whose DSpark arm measures the same tau (bench/RESULTS.md).
"""

import argparse
import json
from pathlib import Path

import torch


def greedy_answers(target, tokenizer, dataset: str, num_prompts: int, max_new_tokens: int, path: Path) -> list:
    """Records {prompt, answer, temperature: 0} of the target's greedy answers, cached in ``path``."""
    from dspark_ext.cli import load_eval_prompts
    from dspark_ext.defaults import encode_prompt
    from dspark_ext.drafters import AutoregressiveDrafter
    from dspark_ext.generate import generate

    if path.is_file():
        records = json.loads(path.read_text())
        if len(records) >= num_prompts:
            return records[:num_prompts]
    records = []
    for text in load_eval_prompts(dataset, num_prompts):
        prompt = encode_prompt(tokenizer, text)
        result = generate(target, AutoregressiveDrafter(), [prompt], max_new_tokens, temperature=0.0,
                          eos_token_id=tokenizer.eos_token_id)
        records.append({"prompt": prompt.tolist(), "answer": result.tokens[0].tolist(), "temperature": 0.0})
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(records))
    return records


@torch.no_grad()
def walk_rounds(drafter, data) -> dict:
    """tau, first-draft acceptance over the loop's rounds and over every anchor, and conditional
    acceptance by position, of ``drafter`` along every (greedy) answer of ``data``."""
    from dspark_ext import train

    K = drafter.num_draft
    every_anchor, rounds = [], []
    for sid in data.heldout_ids:
        lo, hi = int(data.prompt_lengths[sid]), int(data.lengths[sid]) - 2
        if hi < lo:
            continue
        batch = data.batch([sid], [torch.arange(lo, hi + 1)], K)
        logits = train.within_draft_vocabulary(drafter, train.teacher_forced(drafter, batch)[0])
        # Past the answer's end nothing is accepted (the loop stops there too).
        accepted = ((logits.argmax(-1) == batch["targets"]) & batch["valid"])[0]
        every_anchor.append(accepted[:, 0].float())
        j = 0
        while j < accepted.shape[0]:
            row = accepted[j].long().cumprod(0)
            rounds.append(row)
            j += int(row.sum()) + 1
    rounds = torch.stack(rounds).float()
    reached = torch.cat([torch.ones(len(rounds), 1), rounds[:, :-1]], 1).sum(0)
    return {"tau": float(rounds.sum(1).mean() + 1), "rounds": len(rounds),
            "first_loop": float(rounds[:, 0].mean()), "first_every": float(torch.cat(every_anchor).mean()),
            "conditional": [float(a / r) if r > 0 else float("nan") for a, r in zip(rounds.sum(0), reached)]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--drafters", required=True, help="LABEL=FOLDER,... saved DSpark drafters ('default': the shipped one)")
    p.add_argument("--datasets", default="mt-bench,gsm8k,humaneval")
    p.add_argument("--num-prompts", type=int, default=20)
    p.add_argument("--max-new-tokens", type=int, default=96)
    p.add_argument("--cache", default="runs/greedy-eval", help="where the answers and features are kept")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    from dspark_ext import train
    from dspark_ext.defaults import default_drafter_path
    from dspark_ext.drafters.dspark import DSparkDrafter
    from dspark_ext.targets import drafter_context_layers, load_target

    specs = [s.split("=", 1) for s in args.drafters.split(",")]
    specs = [(label, str(default_drafter_path()) if folder == "default" else folder) for label, folder in specs]
    layers = {tuple(drafter_context_layers(folder)) for _, folder in specs}
    if len(layers) != 1:
        raise SystemExit(f"the drafters read different target layers {sorted(layers)}: compare them in separate runs")
    target, tokenizer = load_target(None)
    drafters = [(label, DSparkDrafter.for_target(path, target).eval()) for label, path in specs]
    print(f"T = 0, the first {args.num_prompts} prompts of each set, up to {args.max_new_tokens} greedy tokens each; "
          "tau = tokens per round with all drafts verified.\n")
    print("| set | drafter | tau | first draft accepted (rounds / every position) | conditional acceptance by position | rounds |")
    print("|---|---|---:|---:|---|---:|")
    for dataset in args.datasets.split(","):
        folder = Path(args.cache) / f"{dataset}_{args.num_prompts}x{args.max_new_tokens}"
        records = greedy_answers(target, tokenizer, dataset, args.num_prompts, args.max_new_tokens,
                                 folder / "answers.json")
        paths = train.context_features(train.RecipeConfig(out_dir=folder, context_layers=next(iter(layers))),
                                       target, records, folder / "features", batch_size=8)
        data = train.FeatureCache(paths, heldout_every=1)
        for label, drafter in drafters:
            r = walk_rounds(drafter, data)
            cond = ", ".join("-" if c != c else f"{c:.2f}" for c in r["conditional"])
            print(f"| {dataset} | {label} | {r['tau']:.2f} | {r['first_loop']:.3f} / {r['first_every']:.3f} "
                  f"| {cond} | {r['rounds']} |", flush=True)


if __name__ == "__main__":
    main()
