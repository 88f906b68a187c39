"""Prompt lookup + DSpark, chosen per request and round (the way Arctic Inference pairs suffix
decoding with its model speculator).

Each round, before anything is drafted, every request gets two forecasts of how many of its
drafts will survive verification: the lookup's, from its calibrated confidences (a function of
the sequence so far: match length and record, see ``lookup.py``), and DSpark's, *lagged*: the
mean survival its confidence head gave the drafts it proposed for that request so far, pooled
with DSpark's mean over every request it drafted for (``PRIOR_ROUNDS`` rounds' worth), which
starts from the survival the drafter's held-out rollouts measured (its config's
``heldout_survival``; without it, 1 until DSpark has run: try it once). One round's confidences barely predict the next round's (lag-1 correlation
0.13 on MT-Bench): forecasting from the last round alone switched DSpark off after one unlucky
round, until the next probe. A request takes the proposal with the higher expected accepted
length.
Neither forecast looks at a token this round samples, so the choice cannot bias what verify
accepts (choosing on DSpark's sampled drafts would: ``tests/test_hybrid.py`` shows it).

Two plans reach the loop (``plans``): "lookup" (DSpark does not run this round: every request
uses its lookup proposal) and "hybrid" (DSpark runs, each request takes its choice). The loop
prices both with the cost profile and may also skip drafting altogether. A "hybrid" forecast
only refreshes when DSpark runs, so the loop probes it every few rounds (``DraftPlan.fresh``).
"""

from pathlib import Path
from typing import Optional, Sequence

import torch

from dspark_ext.drafters.lookup import NgramDrafter
from dspark_ext.protocols import Draft, DraftContext, DraftPlan


#: A request's DSpark forecast is its own mean survival pooled with DSpark's mean over every
#: request, weighted as this many of its own rounds.
PRIOR_ROUNDS = 8
#: DSpark's mean over every request follows the rounds with this weight once it has seen
#: 1 / PRIOR_DECAY rounds (a plain running mean before).
PRIOR_DECAY = 0.02


class HybridDrafter:
    def __init__(self, dspark, lookup: NgramDrafter):
        if lookup.calibration is None:
            raise ValueError("the hybrid needs a calibrated lookup (NgramDrafter(calibration=...))")
        if lookup.num_draft != dspark.num_draft:
            raise ValueError(f"both drafters must propose the same K: lookup {lookup.num_draft}, "
                             f"DSpark {dspark.num_draft}")
        self.dspark = dspark
        self.lookup = lookup
        self.num_draft = int(dspark.num_draft)
        self.dspark_cost_name = getattr(dspark, "cost_name", "dspark")
        # Per request: the sum and number of the survival vectors DSpark's confidences gave it.
        self._dspark_survival_sum = torch.zeros(0, self.num_draft, dtype=torch.float64)
        self._dspark_rounds = torch.zeros(0, dtype=torch.int64)
        self._dspark_fed = torch.zeros(0, dtype=torch.int64)  # context features DSpark has been given
        self.rounds = {"lookup": 0, "hybrid": 0}
        self.chose_dspark = 0
        self.chose_lookup = 0
        self._cached_choice = None
        # DSpark's mean survival over every request it drafted for, and the rounds behind it:
        # the forecast of a request it has not drafted for yet (before any, 1: try it once).
        # Before that, the survival its held-out rollouts measured (when its config has it),
        # counted as PRIOR_ROUNDS rounds.
        self._dspark_prior: Optional[torch.Tensor] = None
        self._prior_rounds = 0
        heldout = getattr(getattr(dspark, "cfg", None), "heldout_survival", None)
        if heldout:
            if len(heldout) != self.num_draft:
                raise ValueError(f"the DSpark drafter's heldout_survival has {len(heldout)} positions, "
                                 f"expected K = {self.num_draft}")
            self._dspark_prior = torch.tensor(heldout, dtype=torch.float32)
            self._prior_rounds = PRIOR_ROUNDS

    def _state_for(self, context: DraftContext) -> None:
        B = context.tokens.shape[0]
        if self._dspark_rounds.shape[0] != B:
            self._dspark_survival_sum = torch.zeros(B, self.num_draft, dtype=torch.float64)
            self._dspark_rounds = torch.zeros(B, dtype=torch.int64)
            self._dspark_fed = torch.zeros(B, dtype=torch.int64)
        if context.new_from is not None:
            fresh = context.new_from.cpu() == 0
            self._dspark_survival_sum[fresh] = 0.0
            self._dspark_rounds[fresh] = 0
            self._dspark_fed[fresh] = 0

    def dspark_forecast(self) -> torch.Tensor:
        """[B, K] float32: each request's mean DSpark survival so far, pooled with the mean over
        every request (``PRIOR_ROUNDS`` rounds' weight); without a held-out prior, 1 before DSpark
        has run at all."""
        if self._dspark_prior is None:
            return torch.ones(self._dspark_rounds.shape[0], self.num_draft)
        prior = self._dspark_prior.double()
        pooled = (self._dspark_survival_sum + PRIOR_ROUNDS * prior) / (self._dspark_rounds[:, None] + PRIOR_ROUNDS)
        return pooled.float()

    def _choice(self, context: DraftContext):
        """(use DSpark [B] bool, lookup survival [B, K], DSpark lagged survival [B, K]), once per
        context."""
        if self._cached_choice is not None and self._cached_choice[0] is context:
            return self._cached_choice[1]
        self._state_for(context)
        (lookup_plan,) = self.lookup.plans(context)
        lookup_survival = lookup_plan.survival
        dspark_survival = self.dspark_forecast().to(lookup_survival.device)
        use_dspark = dspark_survival.sum(1) > lookup_survival.sum(1)
        self._cached_choice = (context, (use_dspark, lookup_survival, dspark_survival))
        return use_dspark, lookup_survival, dspark_survival

    def plans(self, context: DraftContext) -> Sequence[DraftPlan]:
        use_dspark, lookup_survival, dspark_survival = self._choice(context)
        mixed = torch.where(use_dspark[:, None], dspark_survival, lookup_survival)
        lookup_part = self.lookup.cost_name
        return [DraftPlan("lookup", survival=lookup_survival, parts=(lookup_part,)),
                DraftPlan("hybrid", survival=mixed, parts=(lookup_part, self.dspark_cost_name), fresh=False)]

    def _dspark_context(self, context: DraftContext) -> DraftContext:
        """The loop's context, with ``new_from`` counting what DSpark itself has been fed (it
        does not run in every round the hybrid is called)."""
        return DraftContext(tokens=context.tokens, lengths=context.lengths, anchor_hidden=context.anchor_hidden,
                            temperature=context.temperature, seed=context.seed, offset=context.offset,
                            hidden_states=context.hidden_states, new_from=self._dspark_fed.to(context.tokens.device),
                            plan=context.plan)

    def propose(self, context: DraftContext) -> Draft:
        use_dspark, _, _ = self._choice(context)
        self._cached_choice = None
        lookup = self.lookup.propose(context)
        plan = context.plan or "hybrid"
        self.rounds[plan] = self.rounds.get(plan, 0) + 1
        if plan == "lookup":
            self.chose_lookup += int(context.tokens.shape[0])
            return lookup
        drafted = self.dspark.propose(self._dspark_context(context))
        if drafted.confidence is None or drafted.logits is None:
            raise ValueError("the hybrid's DSpark drafter must report its drafting logits and confidences "
                             "(a DSparkDrafter with a confidence head)")
        self._dspark_fed = (context.lengths.cpu().to(torch.int64) - 1).clamp(min=0)
        survival = drafted.confidence.float().cumprod(1).cpu()
        self._dspark_survival_sum += survival.double()
        self._dspark_rounds += 1
        self._prior_rounds += 1
        mean = survival.mean(0)
        weight = max(1.0 / self._prior_rounds, PRIOR_DECAY)
        self._dspark_prior = mean if self._dspark_prior is None else (1 - weight) * self._dspark_prior + weight * mean
        self.chose_dspark += int(use_dspark.sum())
        self.chose_lookup += int((~use_dspark).sum())
        # Lookup rows verify as one-hot proposals: log-probability 0 at the draft, -inf elsewhere.
        one_hot = torch.full_like(drafted.logits, float("-inf"))
        one_hot.scatter_(2, lookup.token_ids[:, :, None], 0.0)
        pick = use_dspark[:, None]
        return Draft(token_ids=torch.where(pick, drafted.token_ids, lookup.token_ids),
                     logits=torch.where(pick[:, :, None], drafted.logits, one_hot),
                     confidence=torch.where(pick, drafted.confidence, lookup.confidence))

    # ------------------------------------------------------------------ the shipped default
    def cost_profile(self, target, requests: Sequence[int], remeasure: bool = False, log=None):
        """This machine's cost profile for the target, the lookup and DSpark (measured on first
        use, about 10-20 s, then cached; ``remeasure`` measures again), measured with the target
        returning DSpark's context features, as it does when the hybrid runs."""
        from dspark_ext.cost_profile import CostProfile, load_or_measure

        fallback = None
        if self.dspark.cfg.sps:
            fallback = CostProfile.from_sps(self.dspark.cfg.sps, source="shipped (the drafter's SPS table, "
                                            "measured on another machine; drafting cost unknown)")
        kwargs = {} if log is None else {"log": log}
        layers = getattr(target, "hidden_layers", None)
        target.hidden_layers = list(self.dspark.cfg.context_layers)  # DSpark's cost includes reading them
        try:
            return load_or_measure(target, {self.lookup.cost_name: self.lookup, self.dspark_cost_name: self.dspark},
                                   list(requests), self.num_draft, target_name=self.dspark.cfg.target or "target",
                                   remeasure=remeasure, fallback=fallback, **kwargs)
        finally:
            target.hidden_layers = layers


def shipped_lookup_calibration_path(target_name: str = "SmolLM2-135M-Instruct") -> Path:
    """The lookup calibration shipped for the default target (package data)."""
    from importlib import resources

    return Path(str(resources.files("dspark_ext") / "data" / "lookup" / f"{target_name}.json"))


def default_hybrid_drafter(target, dspark_folder=None, calibration_path=None) -> HybridDrafter:
    """The ``dspark generate`` default: the shipped DSpark drafter and the shipped lookup
    calibration of the default target, on ``target``; it sets ``target.hidden_layers`` to the
    layers the DSpark drafter reads."""
    from dspark_ext.drafters.dspark import DSparkDrafter, shipped_drafter_path
    from dspark_ext.drafters.lookup import LookupCalibration

    dspark = DSparkDrafter.for_target(dspark_folder or shipped_drafter_path(), target)
    target.hidden_layers = list(dspark.cfg.context_layers)
    calibration = LookupCalibration.load(calibration_path or shipped_lookup_calibration_path())
    lookup = NgramDrafter(num_draft=dspark.num_draft, max_ngram=calibration.max_ngram,
                          min_ngram=int(calibration.notes.get("min_ngram", 1)), calibration=calibration)
    return HybridDrafter(dspark, lookup)
