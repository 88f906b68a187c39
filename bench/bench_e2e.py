"""The head-to-head end-to-end benchmark: every drafter on every evaluation set, temperature and
batch size, through ``dspark bench-e2e`` (one JSON/Markdown/PNG per cell under ``--out``; within a
cell the drafters take turns batch by batch), then one summary table (``--out/SUMMARY.md``) and a
speed-up plot (``--out/speedup.png``).

    python bench/bench_e2e.py --runs runs/smollm2 --out bench/e2e

``--runs`` is the ``dspark train`` output folder holding the MTP-1 and parallel-only ablations;
the DSpark drafter is the shipped default. Evaluation prompts only (never training data).
"""

import argparse
import json
import sys
from pathlib import Path

from dspark_ext.cli import main as dspark
from dspark_ext.defaults import default_drafter_path


def run_grid(args) -> list:
    drafters = ["ar", "ngram"]
    runs = Path(args.runs) if args.runs else None
    for label in ("mtp1", "parallel"):
        if runs is not None and (runs / label / "drafter" / "config.json").is_file():
            drafters.append(f"{label}={runs / label / 'drafter'}")
    if args.dspark_drafter:  # a drafter not (yet) installed, in the dspark columns
        drafters += [f"dspark={args.dspark_drafter}", f"dspark={args.dspark_drafter}+sched"]
        if args.also_shipped:
            drafters += ["shipped=" + str(default_drafter_path()), "shipped=" + str(default_drafter_path()) + "+sched"]
    else:
        drafters += ["dspark", "dspark+sched"]
    drafters += [d for d in args.extra_drafters.split(",") if d]
    reports = []
    for dataset in args.datasets.split(","):
        for temperature in args.temperatures.split(","):
            for batch in args.batch_sizes.split(","):
                stem = f"{dataset}_b{batch}_t{float(temperature):g}"
                path = Path(args.out) / f"{stem}.json"
                if not (args.resume and path.is_file()):
                    num_prompts = args.prompts_per_batch * int(batch) if args.prompts_per_batch else args.num_prompts
                    code = dspark(["bench-e2e", "--dataset", dataset, "--temperature", temperature,
                                   "--batch-size", batch, "--num-prompts", str(num_prompts),
                                   "--max-new-tokens", str(args.max_new_tokens), "--drafters", ",".join(drafters),
                                   "--out", args.out])
                    if code:
                        sys.exit(code)
                reports.append(json.loads(path.read_text()))
    return reports


def summarize(reports: list, out: Path) -> str:
    names = list(reports[0]["results"])
    lines = ["| dataset | T | batch | " + " | ".join(f"{n} tok/s (x AR, tau)" for n in names) + " |",
             "|---|---:|---:|" + "---:|" * len(names)]
    for r in reports:
        cells = []
        for n in names:
            x = r["results"].get(n)
            cells.append("-" if x is None else f"{x['tokens_per_s']:.1f} ({x['speedup_vs_ar']:.2f}x, {x['tau']:.2f})")
        lines.append(f"| {r['dataset']} | {r['temperature']:g} | {r['batch_size']} | " + " | ".join(cells) + " |")
    text = "\n".join(lines) + "\n"
    (out / "SUMMARY.md").write_text(text)
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return text
    fig = Figure(figsize=(9, 3.8))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    width = 0.8 / len(names)
    for i, n in enumerate(names):
        ax.bar([j + i * width for j in range(len(reports))],
               [r["results"][n]["speedup_vs_ar"] if n in r["results"] else 0 for r in reports], width, label=n)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(reports))])
    ax.set_xticklabels([f"{r['dataset']}\nT={r['temperature']:g} b{r['batch_size']}" for r in reports], fontsize=6)
    ax.axhline(1.0, color="black", lw=0.6)
    ax.set_ylabel("speed-up vs autoregressive")
    ax.legend(fontsize=6, ncol=3)
    fig.tight_layout()
    fig.savefig(out / "speedup.png", dpi=110)
    return text


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", default="runs/smollm2", help="dspark train output (ablation drafters)")
    p.add_argument("--out", default="bench/e2e")
    p.add_argument("--datasets", default="mt-bench,gsm8k,humaneval")
    p.add_argument("--temperatures", default="0,1")
    p.add_argument("--batch-sizes", default="1,4")
    p.add_argument("--num-prompts", type=int, default=4)
    p.add_argument("--prompts-per-batch", type=int, default=0, help="if set: num-prompts = this x batch size")
    p.add_argument("--max-new-tokens", type=int, default=96)
    p.add_argument("--resume", action="store_true", help="keep cells already measured")
    p.add_argument("--dspark-drafter", default=None,
                   help="a DSpark drafter folder for the dspark and dspark+sched columns (default: the shipped one)")
    p.add_argument("--also-shipped", action="store_true",
                   help="with --dspark-drafter: also run the shipped drafter (columns shipped, shipped+sched)")
    p.add_argument("--extra-drafters", default="", help="comma-separated extra drafter specs (e.g. hybrid)")
    args = p.parse_args()
    reports = run_grid(args)
    print(summarize(reports, Path(args.out)))


if __name__ == "__main__":
    main()
