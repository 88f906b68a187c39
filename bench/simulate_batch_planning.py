"""The loop's planning of batch rounds, simulated with exact forecasts and exact prices.

Every round of a simulated call goes through the loop's own steps (``_Generation.draft_caps``,
``planned``, ``choose_plan``, ``back_off``, then ``dspark::schedule`` on the round's
confidences under the planned caps); only the target and the drafter are replaced: each
request r accepts each of its drafts with a fixed chance p_r (a prefix, as verification
accepts), and the drafter's forecast and confidences are exactly those chances. A round costs
what the cost profile prices it at, plus ``--unpriced-ms`` for a round that drafts (the loop's
own work for drafts that no profile measures: 1.6-1.8 ms on the AVX2-only EPYC, bench/RESULTS.md).
So what separates the arms is the objective alone, not forecast or price errors, and a call's
time is its rounds' prices summed: no machine noise.

    python bench/simulate_batch_planning.py                        # this machine's profile, batch 4
    python bench/simulate_batch_planning.py --profile linear:49.7,3.4,5.2 --unpriced-ms 1.7

``--profile linear:STEP,PER_TOKEN,DRAFT`` (milliseconds): a step of n tokens over R requests costs
STEP + PER_TOKEN * max(n - R, 0), every batch size alike, and a short DSpark block DRAFT (the
AVX2-only EPYC's prices above). Arms: drafting nothing, the default planning, tokens per
second with only the drafts weighted (``CALL_END_OBJECTIVE = False``) and each batch-round
margin in ``--batch-margins`` (``BATCH_PLAN_MARGIN``). Each call's acceptance chances are drawn
uniformly from a range in ``--acceptance``, the same calls for every arm; ``--redraw N`` draws
them again every N rounds (which request lags then changes during a call; the forecast stays
exact). Under each table, per arm: the median (10th-90th percentile) of what the drafted batch
rounds promised, the planned rate over drafting nothing's in the arm's own objective
(``_Generation.plan_gain``), to set against what the calls measured.
"""

import argparse
import contextlib
import importlib
import random
import sys
from pathlib import Path

import torch

from dspark_ext.cost_profile import CostProfile
from dspark_ext.drafters.hybrid import SHORT_BLOCK
from dspark_ext.protocols import Draft, DraftPlan
from dspark_ext.scheduling import survival_probabilities

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import patched  # noqa: E402

generate_module = importlib.import_module("dspark_ext.generate")  # the package's `generate` is the function

PART = "dspark-short"


class PlanningOnlyTarget:
    """What ``_Generation`` reads of a target when no round runs it."""

    device = torch.device("cpu")
    max_context = None


class ExactForecastDrafter:
    """One plan, the short DSpark block, whose forecast is each request's exact survival."""

    def __init__(self, chances, num_draft: int, block: int):
        self.num_draft, self.block = num_draft, block
        self.set_chances(chances)

    def set_chances(self, chances) -> None:
        self.chances = list(chances)
        positions = torch.arange(self.num_draft, dtype=torch.float64)
        chance = torch.tensor(self.chances, dtype=torch.float64)[:, None]
        self.confidence = torch.where(positions < self.block, chance, 0.0).float()  # [B, K] per-position chances
        self.survival = survival_probabilities(self.confidence)

    def plans(self, context):
        return [DraftPlan("short", survival=self.survival, parts=(PART,), fresh=True)]


def linear_profile(step_ms: float, per_token_ms: float, draft_ms: float, batch_size: int, max_tokens: int) -> CostProfile:
    table = [0.0] + [(step_ms + per_token_ms * max(n - batch_size, 0)) / 1e3 for n in range(1, max_tokens + 1)]
    return CostProfile(key={}, step_seconds={batch_size: table}, draft_seconds={PART: {batch_size: draft_ms / 1e3}},
                       source="linear")


def this_machines_profile(batch_size: int) -> CostProfile:
    """The default drafter's measured profile on this machine (measured once, then cached), its
    short block's drafting price under this script's part name."""
    from dspark_ext.defaults import load_default

    setup = load_default(batch_sizes=(batch_size,))
    return CostProfile(key={}, step_seconds=setup.cost.step_seconds,
                       draft_seconds={PART: setup.cost.draft_seconds[setup.drafter.short.cost_name]},
                       source="this machine")


def simulate_call(cost: CostProfile, chances, max_new: int, num_draft: int, block: int, unpriced: float,
                  rng: random.Random, draft: bool = True, redraw=None):
    """(seconds, rounds, rounds that drafted, what each drafted batch round promised) of one
    call. ``redraw``: (every N rounds, the random source and the (low, high) range the call's
    chances were drawn from), or None."""
    B = len(chances)
    drafter = ExactForecastDrafter(chances, num_draft, block)
    promises = []
    state = generate_module._Generation(PlanningOnlyTarget(), drafter, [torch.tensor([0])] * B, [max_new] * B,
                                        1.0, 0, None, None, cost, None)
    seconds, rounds, drafted = 0.0, 0, 0
    while not bool(state.done.all()):
        if redraw is not None and rounds and rounds % redraw[0] == 0:
            _, chance_rng, (low, high) = redraw
            drafter.set_chances([chance_rng.uniform(low, high) for _ in range(B)])
        active = ~state.done
        R = int(active.sum())
        caps = state.draft_caps(active)
        plan = None
        if draft and state.planned():
            plan = state.choose_plan(state.draft_context(), caps, active)
            state.back_off(plan)
        if state.plan_lengths is not None:  # as _Generation.round
            caps = torch.minimum(caps, state.plan_lengths)
        proposal = Draft(token_ids=torch.zeros(B, num_draft, dtype=torch.int64), confidence=drafter.confidence)
        num_draft_sent = state.verification_lengths(proposal, plan, caps, active)
        n = int(num_draft_sent.sum())
        seconds += cost.target_seconds(R, R + n)
        if plan is not None:
            seconds += cost.drafter_seconds(PART, R) + unpriced
            drafted += 1
            if state.plan_gain is not None and R > 1:
                promises.append(state.plan_gain)
        rounds += 1
        made = torch.zeros(B, dtype=torch.float64)
        for b in torch.nonzero(active).flatten().tolist():
            accepted = 0
            while accepted < int(num_draft_sent[b]) and rng.random() < drafter.chances[b]:
                accepted += 1
            made[b] = accepted + 1
        state.generated += made.long()
        state.count_round_tokens(made[active])
        state.done = state.generated >= state.max_new
    return seconds, rounds, drafted, promises


def quantiles(values) -> str:
    """'median (10th-90th percentile)' of ``values``, or '-'."""
    if not values:
        return "-"
    ordered = sorted(values)
    pick = lambda q: ordered[min(int(q * len(ordered)), len(ordered) - 1)]  # noqa: E731
    return f"{pick(0.5):.3f} ({pick(0.1):.3f}-{pick(0.9):.3f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", default="this", help="'this' or linear:STEP,PER_TOKEN,DRAFT in ms")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--num-draft", type=int, default=7)
    parser.add_argument("--block", type=int, default=SHORT_BLOCK, help="positions the short block drafts")
    parser.add_argument("--unpriced-ms", type=float, default=1.0)
    parser.add_argument("--acceptance", default="0.1-0.3,0.2-0.4,0.3-0.5,0.4-0.6,0.5-0.8,0.2-0.8")
    parser.add_argument("--batch-margins", default="1.0,1.05,1.1")
    parser.add_argument("--calls", type=int, default=150)
    parser.add_argument("--redraw", type=int, default=0, metavar="N",
                        help="draw each request's acceptance chance again every N rounds (0: once per call)")
    args = parser.parse_args()
    if args.batch_size < 2 or args.calls < 1 or args.max_new_tokens < 2 or args.unpriced_ms < 0 or args.redraw < 0:
        parser.error("--batch-size >= 2 (batch rounds), --calls >= 1, --max-new-tokens >= 2, --unpriced-ms >= 0, "
                     "--redraw >= 0")
    if not 1 <= args.block <= args.num_draft:
        parser.error(f"--block must be within 1..--num-draft ({args.num_draft}), got {args.block}")
    spans = []
    for span in args.acceptance.split(","):
        try:
            low, high = map(float, span.split("-"))
        except ValueError:
            low = high = float("nan")
        if not 0.0 <= low <= high <= 1.0:
            parser.error(f"--acceptance: expected ranges LOW-HIGH within 0-1, got {span!r}")
        spans.append((low, high))

    B, K = args.batch_size, args.num_draft
    if args.profile == "this":
        cost = this_machines_profile(B)
    else:
        try:
            kind, numbers = args.profile.split(":", 1)
            step_ms, per_token_ms, draft_ms = map(float, numbers.split(","))
        except ValueError:
            kind = None
        if kind != "linear":
            parser.error(f"--profile: expected 'this' or linear:STEP,PER_TOKEN,DRAFT (ms), got {args.profile!r}")
        cost = linear_profile(step_ms, per_token_ms, draft_ms, B, B * (K + 1))
    arms = {"nothing": (None, False), "default": (None, True),
            "tokens/s objective": (("CALL_END_OBJECTIVE", False), True)}
    for margin in map(float, args.batch_margins.split(",")):
        arms[f"batch margin {margin:g}"] = (("BATCH_PLAN_MARGIN", margin), True)
    print(f"profile: {cost.source}; batch {B}, {args.max_new_tokens} tokens per request, short block of "
          f"{args.block}, {args.unpriced_ms:g} ms unpriced per drafted round, {args.calls} calls per cell, "
          f"chances drawn {f'every {args.redraw} rounds' if args.redraw else 'once per call'}; "
          f"default: BATCH_PLAN_MARGIN = {generate_module.BATCH_PLAN_MARGIN:g}, "
          f"CALL_END_OBJECTIVE = {generate_module.CALL_END_OBJECTIVE}")
    promise_lines = []
    print("| acceptance | " + " | ".join(name for name in arms if name != "nothing") + " |")
    print("|---|" + "---:|" * (len(arms) - 1))
    for low, high in spans:
        times, shares, promised = {}, {}, {}
        for name, (variant, draft) in arms.items():
            total = rounds = drafted = 0
            promised[name] = []
            for call in range(args.calls):
                chance_rng = random.Random(1000 + call)
                chances = [chance_rng.uniform(low, high) for _ in range(B)]
                redraw = (args.redraw, chance_rng, (low, high)) if args.redraw else None
                with patched(generate_module, *variant) if variant else contextlib.nullcontext():
                    s, r, d, p = simulate_call(cost, chances, args.max_new_tokens, K, args.block,
                                               args.unpriced_ms / 1e3, random.Random(call), draft, redraw)
                total, rounds, drafted = total + s, rounds + r, drafted + d
                promised[name] += p
            times[name], shares[name] = total, drafted / rounds
        cells = [f"{times['nothing'] / times[name]:.3f}x ({shares[name]:.0%})" for name in arms if name != "nothing"]
        print(f"| {low:g}-{high:g} | " + " | ".join(cells) + " |", flush=True)
        promise_lines.append(f"{low:g}-{high:g}: " + "; ".join(f"{name} {quantiles(promised[name])}"
                                                                for name in arms if name != "nothing"))
    print("\nEach cell: tokens per second over drafting nothing's (same calls), and the share of rounds "
          "that drafted.\nWhat the drafted batch rounds promised (their planned rate over drafting nothing's, "
          "median (10th-90th percentile)):")
    for line in promise_lines:
        print(f"- {line}")


if __name__ == "__main__":
    main()
