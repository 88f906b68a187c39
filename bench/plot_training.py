"""Training curves of a `dspark train` run: the learning-rate sweep's arms and the trained variants.

    python bench/plot_training.py RUN_FOLDER bench/dspark_training.png

Left (when the run had a learning-rate sweep): each sweep arm's teacher-forced 1 - TV at
position 1 (training batches, 10-step means) against training time. Right: the variants' 1 - TV
at positions 1 and 4 and their greedy agreement at position 1 against steps; a dotted line marks
a variant's warm restart, and the title names the drafter a variant started from (--init-drafter).
"""

import json
import sys
from pathlib import Path


def main(run: Path, out: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    arms = sorted((run / "sweep").glob("*/result.json"))
    fig = Figure(figsize=(11, 4) if arms else (6, 4))
    FigureCanvasAgg(fig)
    sweep_ax, run_ax = fig.subplots(1, 2) if arms else (None, fig.subplots(1, 1))
    for arm in arms:
        result = json.loads(arm.read_text())
        h = result["history"]
        sweep_ax.plot([r["elapsed"] / 60 for r in h], [r["accept_t1"][0] for r in h],
                      label=f"{result['name']} (held-out {result['score']:.3f})")
    if arms:
        sweep_ax.set(xlabel="training minutes", ylabel="1 - TV, position 1 (train batches)", title="learning-rate sweep")
        sweep_ax.legend(fontsize=7)
    for variant, style in (("dspark", "-"), ("parallel", "--"), ("mtp1", ":")):
        path = run / variant / "history.json"
        if not path.is_file():
            continue
        h = json.loads(path.read_text())
        steps = [r["step"] for r in h]
        run_ax.plot(steps, [r["accept_t1"][0] for r in h], style, label=f"{variant}: 1 - TV @1")
        if len(h[0]["accept_t1"]) > 3:
            run_ax.plot(steps, [r["accept_t1"][3] for r in h], style, label=f"{variant}: 1 - TV @4")
        run_ax.plot(steps, [r["greedy_match"][0] for r in h], style, alpha=0.5, label=f"{variant}: greedy match @1")
    summary = run / "summary.json"
    variants = json.loads(summary.read_text()).get("variants", {}) if summary.is_file() else {}
    restarted: dict = {}  # --restart-minutes: the step where a second cycle began -> the variants
    for variant, info in variants.items():
        if info.get("restart_step"):
            restarted.setdefault(info["restart_step"], []).append(variant)
    for step, names in restarted.items():
        run_ax.axvline(step, color="grey", linewidth=0.8, linestyle=":")
        # One label per line, placed in axes height so it shows whatever the curves' range.
        run_ax.annotate(f"{', '.join(names)}: warm restart", (step, 0.97), xycoords=("data", "axes fraction"), va="top",
                        fontsize=7, color="grey")
    started_from = {name: info["init_drafter"] for name, info in variants.items() if info.get("init_drafter")}
    title = "variants" + "".join(f"; {name} started from {src}" for name, src in started_from.items())
    run_ax.set(xlabel="step", ylabel="teacher-forced, training batches")
    run_ax.set_title(title, fontsize=9)
    run_ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    main(Path(sys.argv[1]), Path(sys.argv[2]))
