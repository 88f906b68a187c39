"""Prompt lookup + DSpark, chosen per request and round (the way Arctic Inference pairs suffix
decoding with its model speculator).

Each round, before anything is drafted, every request gets two forecasts of how many of its
drafts will survive verification: the lookup's, from its calibrated confidences (a function of
the sequence so far: match length and record, see ``lookup.py``), and DSpark's, *lagged*
(``dspark_ext.forecast.SurvivalForecast``): the mean survival its confidence head gave the
drafts it proposed for that request so far, pooled with its mean over every request, which
starts from the survival the drafter's held-out rollouts measured (its config's
``heldout_survival``). A request takes the proposal with the higher expected accepted length.
Neither forecast looks at a token this round samples, so the choice cannot bias what verify
accepts (choosing on DSpark's sampled drafts would: ``tests/test_hybrid.py`` shows it).

Three plans reach the loop (``plans``): "lookup" (DSpark does not run this round: every request
uses its lookup proposal), "hybrid" (DSpark runs, each request takes its choice) and, for a
DSpark drafter that can draft a shorter block (``propose_block``) and a batch of several requests,
"hybrid-short": DSpark drafts only its first ``SHORT_BLOCK`` positions, a round that costs ~70%
of a full block's at batch 4 (3.8 ms against 5.6 on SmolLM2's drafter: the backbone's rows are
the cost), for rounds where only the first drafts would be verified anyway. For one request the
saving is ~2% (3.25 ms against 3.31) and the plan is not offered: planned on mean survivals it
took rounds from the full block, whose lengths each round's own confidences pick, and the
batch-1, T = 1 cells lost 1-2%. The loop prices every plan with the cost profile and may also skip
drafting altogether. DSpark's forecast only refreshes when DSpark runs, so the loop probes its
plans every few planned rounds (``DraftPlan.fresh``).
"""

from pathlib import Path
from typing import Sequence

import torch

from dspark_ext.drafters.lookup import NgramDrafter
from dspark_ext.forecast import SurvivalForecast
from dspark_ext.protocols import Draft, DraftContext, DraftPlan


#: Positions DSpark drafts in a "hybrid-short" round.
SHORT_BLOCK = 2


class ShortBlockDrafter:
    """DSpark drafting only its first ``block`` positions, padded to K for the loop (the padding
    has confidence 0, so it is never verified). Its own cost entry in the cost profile."""

    def __init__(self, dspark, block: int = SHORT_BLOCK):
        self.dspark, self.block = dspark, int(block)
        self.num_draft = int(dspark.num_draft)
        self.cost_name = f"{getattr(dspark, 'cost_name', 'dspark')}-short"

    def __getattr__(self, name: str):
        # What the cost profile keys a drafter by (its config and drafting dtypes) is DSpark's.
        if name in ("cfg", "inference_backbone_dtype", "inference_lm_head_dtype"):
            return getattr(self.dspark, name)
        raise AttributeError(name)

    def reset(self, batch_size: int) -> None:
        self.dspark.reset(batch_size)

    def propose(self, context: DraftContext) -> Draft:
        drafted = self.dspark.propose_block(context, self.block)
        pad = self.num_draft - self.block
        if pad == 0:
            return drafted
        # Past the block: the last drafted position's token and law, and confidence 0 (never verified).
        token_ids = torch.cat([drafted.token_ids, drafted.token_ids[:, -1:].expand(-1, pad)], 1)
        logits = torch.cat([drafted.logits, drafted.logits[:, -1:].expand(-1, pad, -1)], 1)
        confidence = None
        if drafted.confidence is not None:
            confidence = torch.cat([drafted.confidence, drafted.confidence.new_zeros(drafted.confidence.shape[0], pad)], 1)
        return Draft(token_ids=token_ids, logits=logits, confidence=confidence, logit_ids=drafted.logit_ids,
                     point_mass=drafted.point_mass)


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
        self.short = ShortBlockDrafter(dspark) if hasattr(dspark, "propose_block") and self.num_draft > SHORT_BLOCK else None
        self.dspark_survival = SurvivalForecast.for_drafter(dspark)
        self._dspark_fed = torch.zeros(0, dtype=torch.int64)  # context features DSpark has been given
        self.rounds = {"lookup": 0, "hybrid": 0, "hybrid-short": 0}
        self.chose_dspark = 0
        self.chose_lookup = 0
        self._cached_choice = None

    def _state_for(self, context: DraftContext) -> None:
        B = context.tokens.shape[0]
        if self._dspark_fed.shape[0] != B:
            self._dspark_fed = torch.zeros(B, dtype=torch.int64)
        self.dspark_survival.resize(B)
        if context.new_from is not None:
            fresh = context.new_from.cpu() == 0
            self.dspark_survival.restart(fresh)
            self._dspark_fed[fresh] = 0

    def _choice(self, context: DraftContext):
        """{plan: (use DSpark [B] bool, survival [B, K] of the requests' choices)} for "lookup",
        "hybrid" and "hybrid-short" (DSpark's lagged forecast cut after the short block), once
        per context."""
        if self._cached_choice is not None and self._cached_choice[0] is context:
            return self._cached_choice[1]
        self._state_for(context)
        (lookup_plan,) = self.lookup.plans(context)
        lookup_survival = lookup_plan.survival
        dspark_survival = self.dspark_survival.forecast().to(lookup_survival.device)
        choices = {"lookup": (torch.zeros_like(lookup_survival[:, 0], dtype=torch.bool), lookup_survival)}
        forecasts = {"hybrid": dspark_survival}
        if self.short is not None:
            block = self.short.block
            forecasts["hybrid-short"] = torch.cat([dspark_survival[:, :block],
                                                   dspark_survival.new_zeros(dspark_survival[:, block:].shape)], 1)
        for plan, forecast in forecasts.items():
            use_dspark = forecast.sum(1) > lookup_survival.sum(1)
            choices[plan] = (use_dspark, torch.where(use_dspark[:, None], forecast, lookup_survival))
        self._cached_choice = (context, choices)
        return choices

    def plans(self, context: DraftContext) -> Sequence[DraftPlan]:
        choices = self._choice(context)
        lookup_part = self.lookup.cost_name
        plans = [DraftPlan("lookup", survival=choices["lookup"][1], parts=(lookup_part,)),
                 DraftPlan("hybrid", survival=choices["hybrid"][1], parts=(lookup_part, self.dspark_cost_name), fresh=False)]
        if self.short is not None and context.tokens.shape[0] > 1:
            plans.append(DraftPlan("hybrid-short", survival=choices["hybrid-short"][1],
                                   parts=(lookup_part, self.short.cost_name), fresh=False))
        return plans

    def _dspark_context(self, context: DraftContext) -> DraftContext:
        """The loop's context, with ``new_from`` counting what DSpark itself has been fed (it
        does not run in every round the hybrid is called)."""
        return DraftContext(tokens=context.tokens, lengths=context.lengths, anchor_hidden=context.anchor_hidden,
                            temperature=context.temperature, seed=context.seed, offset=context.offset,
                            hidden_states=context.hidden_states, new_from=self._dspark_fed.to(context.tokens.device),
                            plan=context.plan)

    def propose(self, context: DraftContext) -> Draft:
        plan = context.plan or "hybrid"
        short_round = plan == "hybrid-short"
        if short_round and self.short is None:
            raise ValueError("plan 'hybrid-short' needs a DSpark drafter with propose_block")
        choices = self._choice(context)  # every round: it also follows the requests' restarts
        self._cached_choice = None
        lookup = self.lookup.propose(context)
        self.rounds[plan] = self.rounds.get(plan, 0) + 1
        if plan == "lookup":
            self.chose_lookup += int(context.tokens.shape[0])
            return lookup
        use_dspark = choices["hybrid-short" if short_round else "hybrid"][0]
        drafter = self.short if short_round else self.dspark
        drafted = drafter.propose(self._dspark_context(context))
        if drafted.confidence is None or drafted.logits is None:
            raise ValueError("the hybrid's DSpark drafter must report its drafting logits and confidences "
                             "(a DSparkDrafter with a confidence head)")
        self._dspark_fed = torch.tensor([max(length - 1, 0) for length in context.lengths.tolist()], dtype=torch.int64)
        drafted_positions = self.short.block if short_round else self.num_draft
        self.dspark_survival.update(drafted.confidence[:, :drafted_positions].float().cumprod(1))
        chose_dspark = int(use_dspark.sum())
        self.chose_dspark += chose_dspark
        self.chose_lookup += int(use_dspark.numel()) - chose_dspark
        if chose_dspark == use_dspark.numel():
            return drafted
        # Lookup rows verify as one-hot proposals (point masses at their drafts).
        pick = use_dspark[:, None]
        point_mass = ~use_dspark if drafted.point_mass is None else drafted.point_mass | ~use_dspark
        return Draft(token_ids=torch.where(pick, drafted.token_ids, lookup.token_ids), logits=drafted.logits,
                     confidence=torch.where(pick, drafted.confidence, lookup.confidence),
                     logit_ids=drafted.logit_ids, point_mass=point_mass)

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
            drafters = {self.lookup.cost_name: self.lookup, self.dspark_cost_name: self.dspark}
            if self.short is not None:
                drafters[self.short.cost_name] = self.short
            return load_or_measure(target, drafters, list(requests), self.num_draft, target_name=self.dspark.cfg.target or "target",
                                   remeasure=remeasure, fallback=fallback, **kwargs)
        finally:
            target.hidden_layers = layers


def shipped_lookup_calibration_path(target_name: str = "SmolLM2-135M-Instruct") -> Path:
    """The lookup calibration shipped for the default target (package data)."""
    from importlib import resources

    return Path(str(resources.files("dspark_ext") / "data" / "lookup" / f"{target_name}.json"))


def shipped_datastore_path(target_name: str = "SmolLM2-135M-Instruct") -> Path:
    """The lookup datastore shipped for the default target (package data): its greedy answers to
    held-out ShareGPT prompts (``dspark build-datastore``)."""
    from importlib import resources

    return Path(str(resources.files("dspark_ext") / "data" / "lookup" / f"{target_name}.store.safetensors"))


def default_hybrid_drafter(target, dspark_folder=None, calibration_path=None, datastore_path=None) -> HybridDrafter:
    """The ``dspark generate`` default: the shipped DSpark drafter, and prompt lookup with the
    shipped calibration and (where the calibration was fitted with one) datastore of the default
    target, on ``target``; it sets ``target.hidden_layers`` to the layers the DSpark drafter
    reads."""
    from dspark_ext.drafters.datastore import TokenDatastore
    from dspark_ext.drafters.dspark import DSparkDrafter, shipped_drafter_path
    from dspark_ext.drafters.lookup import LookupCalibration

    dspark = DSparkDrafter.for_target(dspark_folder or shipped_drafter_path(), target)
    target.hidden_layers = list(dspark.cfg.context_layers)
    calibration = LookupCalibration.load(calibration_path or shipped_lookup_calibration_path())
    datastore = None
    if calibration.store_table is not None:
        datastore = TokenDatastore.load(datastore_path or shipped_datastore_path())
        datastore.check_vocabulary(dspark.cfg.vocab_size, "the target")
    elif datastore_path is not None:
        raise ValueError("a datastore needs a calibration fitted with it (dspark calibrate-lookup --datastore)")
    lookup = NgramDrafter(num_draft=dspark.num_draft, max_ngram=calibration.max_ngram,
                          min_ngram=int(calibration.notes.get("min_ngram", 1)), calibration=calibration,
                          datastore=datastore)
    return HybridDrafter(dspark, lookup)
