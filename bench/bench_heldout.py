"""DSpark drafters side by side on the held-out data of a `dspark train` run folder: what the
recipe's own yardsticks say, on the same sequences and anchors for every drafter.

    python bench/bench_heldout.py --run runs/smollm2-more \
        --drafters new=runs/smollm2-more/dspark/drafter,shipped=runs/shipped-drafter [--batches 48]

Per drafter:
- teacher-forced 1 - TV and greedy agreement by position on ``--batches`` fixed batches of held-out
  sequences (4 x 16 blocks each; the learning-rate sweep's yardstick, `train.heldout_acceptance`);
- rollouts on the held-out answers the target wrote itself (`train.heldout_rollouts`, every block
  or ``--anchors-per-sequence`` random ones, the same for every drafter):
  the fraction of blocks whose first k drafts are all accepted, k = 1..3 (the Markov chain
  teacher-forced on the target's own continuation is the path verification walks while drafts are
  accepted), and the same on the run's STS answers (`--sts-prompts`) where the folder has them.

Held-out means never trained on by the run in ``--run`` (every 20th sequence); a drafter trained
on another run's data may have seen some of these sequences. Prints a markdown table.
"""

import argparse
import json
from pathlib import Path

import torch


def shard_files(folder: Path, name_format: str) -> list:
    """The files ``name_format.format(0)``, ``.format(1)``, ... a recipe stage wrote in ``folder``."""
    paths = []
    while (folder / name_format.format(len(paths))).is_file():
        paths.append(folder / name_format.format(len(paths)))
    return paths


def answer_records(folder: Path) -> list:
    from dspark_ext.train import ANSWER_FILE

    return [r for path in shard_files(folder, ANSWER_FILE) for r in json.loads(path.read_text())]


def feature_paths(folder: Path) -> list:
    from dspark_ext.train import FEATURE_FILE

    return shard_files(folder, FEATURE_FILE)


def survival(acc: torch.Tensor, depth: int = 3) -> list:
    """Fraction of blocks whose first k drafts were all accepted, k = 1..depth."""
    if acc.numel() == 0:
        return [float("nan")] * depth
    alive = acc.cumprod(-1)
    return [float(alive[:, k].mean()) for k in range(depth)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, help="a `dspark train --out` folder whose data stage has finished")
    p.add_argument("--drafters", required=True, help="LABEL=FOLDER,... saved DSpark drafters")
    p.add_argument("--batches", type=int, default=48, help="teacher-forced batches of 4 x 16 held-out blocks")
    p.add_argument("--anchors-per-sequence", type=int, default=0,
                   help="rollouts from this many random blocks per answer (0 = every block, as STS does)")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    from dspark_ext import train
    from dspark_ext.drafters.dspark import DSparkDrafter
    from dspark_ext.targets import load_target

    run = Path(args.run)
    records = answer_records(run / "answers")
    paths = feature_paths(run / "features") + feature_paths(run / "features_sharegpt")
    if not records or not paths:
        raise SystemExit(f"{run}: no regenerated answers or features (run the recipe's data stage first)")
    data = train.FeatureCache(paths)  # the recipe's order: regenerated answers first, same held-out ids
    sts_records = answer_records(run / "sts_answers")
    sts_paths = feature_paths(run / "sts_features")
    sts_data = train.FeatureCache(sts_paths, heldout_every=1, seen_by=data) if sts_records and sts_paths else None

    anchors = args.anchors_per_sequence or None
    target, _ = load_target(None)
    rows = []
    for spec in args.drafters.split(","):
        label, folder = spec.split("=", 1)
        drafter = DSparkDrafter.for_target(folder, target).eval()
        tf = train.heldout_acceptance(drafter, data, num_batches=args.batches)
        _, acc = train.heldout_rollouts(drafter, data, anchors, temperature_of=lambda i: records[i]["temperature"])
        row = {"label": label, "tf": tf, "rollouts": int(acc.shape[0]), "survival": survival(acc)}
        if sts_data is not None:
            _, sts_acc = train.heldout_rollouts(drafter, sts_data, anchors,
                                                temperature_of=lambda i: sts_records[i]["temperature"])
            row["sts_rollouts"], row["sts_survival"] = int(sts_acc.shape[0]), survival(sts_acc)
        rows.append(row)

    fmt = lambda xs: ", ".join(f"{x:.3f}" for x in xs)  # noqa: E731
    print(f"Held-out data of {run.name}: {len(data.heldout_ids)} sequences "
          f"({data.answer_tokens(data.heldout_ids)} answer tokens); teacher-forced over {args.batches} x 4 x 16 "
          "blocks; rollouts over " + (f"{anchors} random blocks" if anchors else "every block")
          + " of each held-out answer the target wrote"
          + (f" and of {len(sts_data.heldout_ids)} STS answers" if sts_data is not None else "") + ".\n")
    print("| drafter | teacher-forced 1 - TV by position | teacher-forced greedy agreement | rollouts: first k accepted, k = 1, 2, 3 | blocks |"
          + (" STS answers: first k accepted | blocks |" if sts_data is not None else ""))
    print("|---|---|---|---|---:|" + ("---|---:|" if sts_data is not None else ""))
    for r in rows:
        print(f"| {r['label']} | {fmt(r['tf']['accept_t1'])} | {fmt(r['tf']['greedy_match'])} | {fmt(r['survival'])} "
              f"| {r['rollouts']} |" + (f" {fmt(r['sts_survival'])} | {r['sts_rollouts']} |" if sts_data is not None else ""))


if __name__ == "__main__":
    main()
