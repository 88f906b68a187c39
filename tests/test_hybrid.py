"""Draft-cost-aware planning and the hybrid (prompt lookup + DSpark) drafter.

Lossless: on the trigram toy target (tests/toy_targets.py), the first three tokens of 20000
requests follow the target's exact joint law at T = 1 and T = 0.7 when the loop plans rounds
from forecasts (drafting nothing, lookup only, or lookup + DSpark per request) and a cost
profile; a hybrid that chooses from DSpark's *sampled* drafts (it peeks) fails the same test.
Greedy: token for token equal to plain decoding. Plus the planning arithmetic itself."""

import itertools

import pytest
import torch

from dspark_ext.drafters import MarkovDrafter, NgramDrafter
from dspark_ext.drafters.hybrid import HybridDrafter
from dspark_ext.drafters.lookup import NUM_RECORDS, LookupCalibration
from dspark_ext.generate import generate
from dspark_ext.protocols import Draft, DraftContext, DraftPlan
from dspark_ext.scheduling import best_throughput, lead_discounts, plain_decoding_throughput
from helpers import assert_matches_distribution, check_distribution, sequence_codes
from toy_targets import TrigramTarget

V = 8
K = 3
LAW_PROMPT = torch.tensor([1, 2, 1, 2, 1])
LAW_SAMPLES = 20000
LAW_TOKENS = 3


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors (conftest.one_thread)


class ToyCost:
    """A cost profile (the two methods the loop reads): verifying n tokens of R requests costs
    ``base + per_token * n / R`` seconds, drafting costs ``draft[name]`` seconds."""

    def __init__(self, base=1.0, per_token=0.12, draft=None):
        self.base, self.per_token, self.draft = base, per_token, dict(draft or {})

    def drafter_seconds(self, name, requests):
        return self.draft.get(name, 0.0)

    def sps(self, requests, draft_seconds=0.0, max_tokens=None):
        n = torch.arange(max(max_tokens or 0, requests) + 1, dtype=torch.float64)
        table = 1.0 / (draft_seconds + self.base + self.per_token * n / requests)
        table[0] = 0.0
        return table.float()


def toy_calibration(value=0.7, max_ngram=3):
    table = torch.full((2, max_ngram + 1, NUM_RECORDS, K), value)
    table[:, :, 0] *= 0.5  # record 0 (the last proposal missed at once): less trust
    table[:, 0] = 0.0
    return LookupCalibration(table=table, notes={"toy": True})


def toy_markov(seed=2, scale=1.0):
    drafter = MarkovDrafter.random(V, K, seed=seed, scale=scale, confidence=True)
    drafter.conf_w_prev = drafter.conf_w_prev * 6.0  # c_2, c_3 depend strongly on the drafted tokens
    drafter.cost_name = "dspark"
    return drafter


def hybrid(cls=HybridDrafter, **kwargs):
    return cls(toy_markov(**kwargs), NgramDrafter(num_draft=K, max_ngram=3, min_ngram=1, calibration=toy_calibration()))


class PeekingHybrid(HybridDrafter):
    """Broken: drafts with DSpark every round and looks at the tokens it chooses between, taking
    DSpark's proposal where its sampled first draft differs from the lookup's (why verify the
    same token twice?): the choice depends on a drafted token, so verify's q is no longer the
    law of what it is shown."""

    def propose(self, context: DraftContext) -> Draft:
        lookup = self.lookup.propose(context)
        self._state_for(context)
        drafted = self.dspark.propose(self._dspark_context(context))
        self._dspark_fed = (context.lengths.cpu().to(torch.int64) - 1).clamp(min=0)
        pick = drafted.token_ids[:, :1] != lookup.token_ids[:, :1]
        one_hot = torch.full_like(drafted.logits, float("-inf")).scatter_(2, lookup.token_ids[:, :, None], 0.0)
        return Draft(token_ids=torch.where(pick, drafted.token_ids, lookup.token_ids),
                     logits=torch.where(pick[:, :, None], drafted.logits, one_hot),
                     confidence=torch.where(pick, drafted.confidence, lookup.confidence))


def law_target():
    return TrigramTarget(V, seed=5, scale=1.0, period=5)


def sampled_codes(target, drafter, temperature, cost):
    result = generate(target, drafter, [LAW_PROMPT] * LAW_SAMPLES, LAW_TOKENS + 1, temperature=temperature,
                      seed=1000, cost=cost)
    return sequence_codes(torch.stack([t[:LAW_TOKENS] for t in result.tokens]), V), result


COSTS = {
    # drafting is cheap: lookup and hybrid rounds both win somewhere
    "cheap": ToyCost(per_token=0.05, draft={"lookup": 0.01, "dspark": 0.1, "dspark-short": 0.1}),
    # DSpark is dear: mostly lookup or nothing, DSpark only when probed
    "dear": ToyCost(per_token=0.3, draft={"lookup": 0.01, "dspark": 0.6, "dspark-short": 0.6}),
    # DSpark's short block is cheap, its full block dear: short rounds
    "short": ToyCost(per_token=0.05, draft={"lookup": 0.01, "dspark": 0.6, "dspark-short": 0.05}),
}
#: The DSpark plan each cost runs (by planning, not only by probes).
COST_PLANS = {"cheap": "hybrid", "dear": "hybrid", "short": "hybrid-short"}


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("cost", list(COSTS))
def test_planned_hybrid_follows_target_law(cost, temperature):
    target = law_target()
    drafter = hybrid()
    codes, result = sampled_codes(target, drafter, temperature, COSTS[cost])
    assert int(result.position_accepted.sum()) > 0.01 * LAW_SAMPLES, result.summary()
    assert drafter.rounds.get(COST_PLANS[cost], 0) > 0, result.plan_rounds  # DSpark drafted in some rounds
    assert drafter.chose_dspark > 0 and drafter.chose_lookup > 0, (drafter.chose_dspark, drafter.chose_lookup)
    assert_matches_distribution(codes, target.exact_joint(LAW_PROMPT, LAW_TOKENS, temperature))


def test_lagged_plan_of_a_plain_drafter_follows_target_law():
    """A drafter without plans: the loop forecasts from its last confidences, skips rounds."""
    target = law_target()
    drafter = toy_markov()
    codes, result = sampled_codes(target, drafter, 1.0, ToyCost(per_token=0.2, draft={"dspark": 0.3}))
    assert result.plan_rounds.get("lagged", 0) > 0 and result.plan_rounds.get("none", 0) > 0, result.plan_rounds
    assert_matches_distribution(codes, target.exact_joint(LAW_PROMPT, LAW_TOKENS, 1.0))


def test_peeking_chooser_fails_the_law():
    target = law_target()
    codes, result = sampled_codes(target, hybrid(PeekingHybrid), 1.0, COSTS["cheap"])
    check = check_distribution(codes, target.exact_joint(LAW_PROMPT, LAW_TOKENS, 1.0))
    assert not check.ok, check


def greedy_reference(target, prompt, max_new):
    return target.greedy_reference(prompt, max_new)


@pytest.mark.parametrize("cost", [None, "cheap", "dear"])
def test_greedy_equals_plain_decoding(cost):
    target = TrigramTarget(V, seed=6, scale=3.0, period=1)
    prompts = [torch.tensor([1, 2, 3, 1, 2, 3, 1, 2, 3, 1]), torch.tensor([4, 5]), torch.tensor([0, 6, 7, 0, 6, 7, 2])]
    max_new = [30, 9, 21]
    result = generate(target, hybrid(), prompts, max_new, cost=None if cost is None else COSTS[cost])
    for b, prompt in enumerate(prompts):
        assert torch.equal(result.tokens[b], target.greedy_reference(prompt, max_new[b])), b
    assert int(result.position_accepted.sum()) > 0


def test_best_throughput_is_the_best_prefix_of_the_admission_order():
    """Unweighted and weighted (a draft of request r worth weights[r] of a token, and with
    ``weigh_base`` its round's own token too), against every set of drafts that is a prefix per
    request; the lengths returned reach the rate returned."""
    g = torch.Generator().manual_seed(0)
    for trial in range(80):
        R = int(torch.randint(1, 4, (1,), generator=g))
        survival = torch.rand(R, K, generator=g).cumprod(1)
        caps = torch.randint(0, K + 1, (R,), generator=g)
        step = torch.cat([torch.zeros(1), 1.0 + 0.1 * torch.rand(R * (K + 1), generator=g).cumsum(0)]).double()
        draft = float(torch.rand(1, generator=g))
        weights = None if trial % 2 == 0 else torch.rand(R, generator=g).tolist()
        weigh_base = trial % 4 == 3
        got, lengths = best_throughput(survival, caps, step, draft, weights, weigh_base=weigh_base)
        w = [1.0] * R if weights is None else weights

        def rate(prefix):
            base = sum(w) if weigh_base else R  # every round's own token of request r counts w[r] too
            tau = base + sum(w[r] * float(survival[r, :l].sum()) for r, l in enumerate(prefix))
            return tau / (draft + float(step[R + sum(prefix)]))

        best = max(rate(prefix) for prefix in itertools.product(*[range(int(c) + 1) for c in caps]))
        assert got == pytest.approx(best, rel=1e-6)  # float32 survivals summed in float64 or float32
        assert rate(lengths) == pytest.approx(got, rel=1e-6)
        assert all(0 <= l <= int(c) for l, c in zip(lengths, caps))
        if weights is not None and not weigh_base:  # weighting only the drafts never raises the rate
            assert got <= best_throughput(survival, caps, step, draft)[0] * (1 + 1e-12)
    assert plain_decoding_throughput(2, torch.tensor([0.0, 1.0, 4.0], dtype=torch.float64)) == 0.5


def test_lead_discounts_are_the_chance_of_being_last_relative_to_the_likeliest():
    """The quadrature against a Monte Carlo of the model it states (independent normal
    shortfalls, mean -ahead, sd spread), and its limits."""
    g = torch.Generator().manual_seed(3)
    for ahead, spread in (([0.0, 0.0, 2.0, 5.0], 3.0), ([0.0, 1.0], 0.7), ([4.0, 0.0, 0.0], 10.0)):
        shortfall = -torch.tensor(ahead, dtype=torch.float64) + spread * torch.randn(400_000, len(ahead), generator=g,
                                                                                      dtype=torch.float64)
        last = torch.bincount(shortfall.argmax(1), minlength=len(ahead)).double()
        expected = (last / last.max()).tolist()
        assert lead_discounts(ahead, spread) == pytest.approx(expected, abs=0.01)
    assert lead_discounts([0.0, 0.0, 0.0], 2.0) == pytest.approx([1.0, 1.0, 1.0])  # level: tokens per second
    assert lead_discounts([0.0, 3.0, 0.0], 0.0) == [1.0, 0.0, 1.0]  # no uncertainty: only the last count
    falling = lead_discounts([0.0, 1.0, 2.0, 4.0, 8.0], 2.0)
    assert all(a > b for a, b in zip(falling, falling[1:]))
    assert lead_discounts([], 1.0) == []


def test_lookup_calibration_fit_and_round_trip(tmp_path):
    # 3 records: greedy n=2 record=NO_RECORD: 3 verified / 1 accepted, twice; once 3 / 3.
    greedy = torch.tensor([1, 1, 1])
    calib = LookupCalibration.fit(greedy, torch.tensor([2, 2, 2]), torch.tensor([3, 3, 3]), torch.tensor([3, 3, 3]),
                                  torch.tensor([1, 1, 3]), max_ngram=3, num_draft=3, prior_weight=0.0)
    assert calib.table[1, 2, 3].tolist() == pytest.approx([1.0, 1 / 3, 1.0])
    assert bool((calib.table[:, 0] == 0).all())
    calib.save(tmp_path / "c.json")
    assert torch.equal(LookupCalibration.load(tmp_path / "c.json").table, calib.table)


def test_lookup_confidence_adapts_to_the_request():
    """Agreement of the sequence with earlier proposals moves the calibrated confidence: up for
    text that keeps repeating, down for text that never follows the lookup."""
    from dspark_ext.protocols import DraftContext

    def confidences(continuation):
        drafter = NgramDrafter(num_draft=K, max_ngram=3, min_ngram=1, calibration=toy_calibration(0.5))
        sequence = [1, 2, 3, 1, 2]
        out = []
        for step, token in enumerate(continuation):
            ctx = DraftContext(tokens=torch.tensor([sequence]), lengths=torch.tensor([len(sequence)]), anchor_hidden=None,
                               temperature=torch.zeros(1), seed=torch.zeros(1, dtype=torch.int64),
                               offset=torch.tensor([step]), new_from=torch.tensor([0 if step == 0 else len(sequence) - 1]))
            (plan,) = drafter.plans(ctx)
            out.append(float(drafter.propose(ctx).confidence[0, 0]))
            sequence.append(token)
        return out

    repeating = confidences([3, 1, 2, 3, 1, 2, 3, 1, 2, 3])  # follows the lookup's proposal every time
    breaking = confidences([7, 3, 6, 5, 4, 2, 6, 0, 5, 4])  # never follows it
    assert repeating == sorted(repeating) and repeating[-1] > 0.7, repeating  # table 0.5, then (8 * 0.5 + a) / (8 + a)
    assert max(breaking[1:]) < 0.5 and min(c for c in breaking if c > 0) < 0.4, breaking  # 0 where nothing matches


def test_incremental_ngram_index_equals_the_full_search():
    """The per-request n-gram indexes that the lookup keeps as sequences grow give the same
    (period, match length) as the whole-sequence search, round after round, and start over
    when a new request takes a row."""
    from dspark_ext.protocols import DraftContext

    g = torch.Generator().manual_seed(3)
    for trial in range(60):
        B = int(torch.randint(1, 5, (1,), generator=g))
        vocab = int(torch.randint(2, 6, (1,), generator=g))
        min_ngram = int(torch.randint(1, 3, (1,), generator=g))
        drafter = NgramDrafter(num_draft=3, max_ngram=min_ngram + int(torch.randint(0, 3, (1,), generator=g)),
                               min_ngram=min_ngram)
        tokens = torch.randint(0, vocab, (B, 40), generator=g)
        lengths = torch.randint(1, 4, (B,), generator=g)
        for step in range(8):
            ctx = DraftContext(tokens=tokens.clone(), lengths=lengths.clone(), anchor_hidden=None,
                               temperature=torch.zeros(B), seed=torch.zeros(B, dtype=torch.int64),
                               offset=torch.zeros(B, dtype=torch.int64), new_from=torch.zeros(B, dtype=torch.int64))
            period, match_length = drafter.periods(tokens, lengths)
            columns = lengths[:, None] - period[:, None] + torch.arange(3)[None] % period[:, None]
            draft, got_match_length, _ = drafter._lookup(ctx)
            assert torch.equal(got_match_length, match_length), (trial, step)
            assert torch.equal(draft, tokens.gather(1, columns)), (trial, step)
            restart = torch.rand(B, generator=g) < 0.15  # a new request takes the row
            tokens[restart] = torch.randint(0, vocab, (int(restart.sum()), 40), generator=g)
            lengths = torch.where(restart, torch.randint(1, 4, (B,), generator=g),
                                  (lengths + torch.randint(0, 5, (B,), generator=g)).clamp(max=40))


def test_hybrid_needs_dspark_confidences():
    """A DSpark side without a confidence head gets a clear error, not a crash in the middle."""
    target = law_target()
    no_confidence = MarkovDrafter.random(V, K, seed=2)
    drafter = HybridDrafter(no_confidence, NgramDrafter(num_draft=K, max_ngram=3, min_ngram=1,
                                                        calibration=toy_calibration()))
    with pytest.raises(ValueError, match="must report its drafting logits and confidences"):
        generate(target, drafter, [LAW_PROMPT], 4)


def test_a_request_ahead_of_the_batch_drafts_nothing():
    """A call ends with its last request: with a cost profile, a request more than one round
    (K + 1 tokens) ahead of the one with the most tokens left gets no drafts; without a profile
    (every drafter verifies what it proposes) only the budget caps."""
    from dspark_ext.generate import _Generation

    target = TrigramTarget(V, seed=6, scale=3.0, period=1)
    prompts = [torch.tensor([1, 2, 3]), torch.tensor([4, 5]), torch.tensor([0, 6]), torch.tensor([7])]
    for cost, expected in ((COSTS["cheap"], [K, K, 0, 0]), (None, [K, K, K, 2])):
        state = _Generation(target, hybrid(), prompts, [40, 40, 40, 40], 1.0, 0, None, None, cost, None)
        state.generated = torch.tensor([0, K, K + 1, 37])  # left: 40, 37 (within K + 1), 36, 3
        assert state.draft_caps(torch.ones(4, dtype=torch.bool)).tolist() == expected
        state.done = torch.tensor([True, False, False, False])  # it finished: 37 left is the most, 36 within K + 1
        assert state.draft_caps(~state.done).tolist() == ([0, K, K, 0] if cost is not None else [0, K, K, 2])


def _context(tokens, lengths, new_from, temperature=1.0):
    B = tokens.shape[0]
    return DraftContext(tokens=tokens, lengths=lengths, anchor_hidden=None, temperature=torch.full((B,), temperature),
                        seed=torch.arange(B), offset=torch.zeros(B, dtype=torch.int64), new_from=new_from)


def test_survival_forecast_pools_a_request_with_every_request():
    """A request's forecast is its own mean survival pooled with the mean over every request,
    weighted as PRIOR_ROUNDS of its rounds; that mean starts at the prior (PRIOR_ROUNDS rounds'
    weight) and follows every round's batch mean; without a prior, 1 until the first round.
    A restarted row (a new request) starts from the pooled mean again."""
    from dspark_ext.forecast import PRIOR_ROUNDS, SurvivalForecast

    assert torch.equal(SurvivalForecast(K).forecast(), torch.ones(0, K))
    no_prior = SurvivalForecast(K)
    no_prior.resize(2)
    assert torch.equal(no_prior.forecast(), torch.ones(2, K))
    prior = [0.4, 0.2, 0.1]
    forecast = SurvivalForecast(K, prior)
    forecast.resize(2)
    assert torch.allclose(forecast.forecast(), torch.tensor(prior).expand(2, K))
    rounds = [torch.tensor([[0.9, 0.5, 0.2], [0.1, 0.0, 0.0]]), torch.tensor([[0.7, 0.3, 0.1], [0.3, 0.1, 0.0]])]
    pooled_prior = torch.tensor(prior, dtype=torch.float64)
    for n, survival in enumerate(rounds, start=PRIOR_ROUNDS + 1):
        forecast.update(survival)
        pooled_prior = (1 - 1 / n) * pooled_prior + survival.double().mean(0) / n
    own = sum(r.double() for r in rounds) / len(rounds)
    expected = (len(rounds) * own + PRIOR_ROUNDS * pooled_prior) / (len(rounds) + PRIOR_ROUNDS)
    assert torch.allclose(forecast.forecast(), expected.float())
    forecast.restart(torch.tensor([True, False]))
    assert torch.allclose(forecast.forecast()[0], pooled_prior.float())
    assert torch.allclose(forecast.forecast()[1], expected[1].float())
    with pytest.raises(ValueError, match="the survival prior has 2 positions, expected K = 3"):
        SurvivalForecast(K, [0.5, 0.2])


def test_survival_forecast_of_a_short_round_keeps_the_later_positions():
    """A round that drafted the first n < K positions (a short block) updates only their
    forecasts; the later positions keep theirs."""
    from dspark_ext.forecast import PRIOR_ROUNDS, SurvivalForecast

    prior = [0.4, 0.2, 0.1]
    forecast = SurvivalForecast(K, prior)
    forecast.resize(2)
    forecast.update(torch.tensor([[0.9, 0.5], [0.1, 0.0]]))
    pooled = (1 - 1 / (PRIOR_ROUNDS + 1)) * torch.tensor(prior[:2]) + torch.tensor([0.5, 0.25]) / (PRIOR_ROUNDS + 1)
    own = torch.tensor([[0.9, 0.5], [0.1, 0.0]])
    expected = (own + PRIOR_ROUNDS * pooled) / (1 + PRIOR_ROUNDS)
    got = forecast.forecast()
    assert torch.allclose(got[:, :2], expected) and torch.allclose(got[:, 2], torch.tensor([0.1, 0.1]))
    assert forecast.rounds.tolist() == [1, 1] and forecast.position_rounds.tolist() == [[1, 1, 0], [1, 1, 0]]
    with pytest.raises(ValueError, match="survival must cover 1 to 3 positions"):
        forecast.update(torch.ones(2, 4))
    no_prior = SurvivalForecast(K)
    no_prior.resize(1)
    no_prior.update(torch.tensor([[0.5]]))
    assert torch.allclose(no_prior.forecast(), torch.tensor([[0.5, 1.0, 1.0]]))  # undrafted positions: try them


def test_short_block_pads_with_drafts_that_are_never_verified():
    """``ShortBlockDrafter``: the first SHORT_BLOCK drafts of the DSpark drafter (its
    ``propose_block``), padded to K with confidence 0; the hybrid offers its plan only for a
    drafter that can draft a shorter block."""
    from dspark_ext.drafters.hybrid import SHORT_BLOCK, ShortBlockDrafter

    markov = toy_markov()
    context = _context(torch.tensor([[1, 2, 3], [4, 5, 0]]), torch.tensor([3, 2]), torch.zeros(2, dtype=torch.int64))
    full = markov.propose(context)
    short = ShortBlockDrafter(markov).propose(context)
    assert short.token_ids.shape == full.token_ids.shape and short.logits.shape == full.logits.shape
    assert torch.equal(short.token_ids[:, :SHORT_BLOCK], full.token_ids[:, :SHORT_BLOCK])
    assert torch.equal(short.confidence[:, :SHORT_BLOCK], full.confidence[:, :SHORT_BLOCK])
    assert bool((short.confidence[:, SHORT_BLOCK:] == 0).all())
    assert bool(torch.isfinite(short.logits.logsumexp(-1)).all())  # the padding's laws are laws
    with pytest.raises(ValueError, match="block must be in"):
        markov.propose_block(context, K + 1)
    plans = [plan.name for plan in hybrid().plans(context)]
    assert plans == ["lookup", "hybrid", "hybrid-short"]
    no_block = hybrid()
    no_block.short = None
    assert [plan.name for plan in no_block.plans(context)] == ["lookup", "hybrid"]


def test_survival_forecast_prior_follows_every_round():
    """The mean over every request: a running mean of the rounds' batch means, then an
    exponential one with weight PRIOR_DECAY."""
    from dspark_ext.forecast import PRIOR_DECAY, SurvivalForecast

    g = torch.Generator().manual_seed(1)
    forecast = SurvivalForecast(K)
    forecast.resize(3)
    expected = None
    for n in range(1, 120):
        survival = torch.rand(3, K, generator=g).cumprod(1)
        forecast.update(survival)
        weight = max(1.0 / n, PRIOR_DECAY)
        mean = survival.mean(0)
        expected = mean if expected is None else (1 - weight) * expected + weight * mean
    assert torch.allclose(forecast.prior, expected, atol=1e-6)


def test_lagged_forecasts_start_from_the_drafters_heldout_survival():
    """Both lagged forecasts, the hybrid's of DSpark and the loop's own for a drafter with
    confidences and no plans, start from the drafter's held-out survival (its config's
    ``heldout_survival``), follow what it drafts, and restart a request that takes a row."""
    from dspark_ext.generate import _Generation

    held_out = [0.4, 0.2, 0.1]
    dspark = toy_markov()
    dspark.cfg = type("Cfg", (), {"heldout_survival": held_out})()
    drafter = HybridDrafter(dspark, hybrid().lookup)
    tokens = torch.randint(0, V, (2, 40), generator=torch.Generator().manual_seed(0))
    lengths = torch.tensor([5, 3])
    drafter._state_for(_context(tokens, lengths, torch.zeros(2, dtype=torch.int64)))
    assert torch.allclose(drafter.dspark_survival.forecast(), torch.tensor(held_out).expand(2, K))
    for r in range(3):
        ctx = _context(tokens, lengths + r, (lengths + r - 1) if r else torch.zeros(2, dtype=torch.int64))
        ctx.plan = "hybrid"
        drafter.propose(ctx)
    assert drafter.dspark_survival.rounds.tolist() == [3, 3]
    moved = drafter.dspark_survival.forecast()
    assert not torch.allclose(moved[0], torch.tensor(held_out)) and not torch.allclose(moved[0], moved[1])
    drafter._state_for(_context(tokens, lengths + 3, torch.tensor([0, int(lengths[1]) + 2])))
    assert drafter.dspark_survival.rounds.tolist() == [0, 3]

    state = _Generation(law_target(), dspark, [LAW_PROMPT, LAW_PROMPT], [10, 10], 1.0, 0, None, None,
                        COSTS["cheap"], None)
    (plan,) = state.plans(state.draft_context(), torch.ones(2, dtype=torch.bool))
    assert plan.name == "lagged" and not plan.fresh
    assert torch.allclose(plan.survival, torch.tensor(held_out).expand(2, K))


class OnePlan:
    """A drafter offering one plan, "p", priced as the cost part "a", with a fixed forecast
    (its first rows in a round of fewer requests)."""

    num_draft = K

    def __init__(self, survival, fresh=True):
        self.survival, self.fresh = survival, fresh

    def plans(self, context):
        return [DraftPlan("p", survival=self.survival[:context.tokens.shape[0]], parts=("a",), fresh=self.fresh)]


def test_plan_margin():
    """In a round of one request every plan, fresh (a calibrated forecast) or lagged (a mean of its
    drafter's own confidences on this text), only has to beat drafting nothing (PLAN_MARGIN = 1):
    a plan worth 1.03x is chosen, one worth nothing is not. In a round of several requests it must
    promise BATCH_PLAN_MARGIN (1.05): 1.03x is not enough there, 1.08x is. ``plan_gain`` records
    what the chosen plan promised (None where nothing is drafted)."""
    from dspark_ext.generate import BATCH_PLAN_MARGIN, PLAN_MARGIN, _Generation

    target = TrigramTarget(V, seed=6, scale=3.0, period=1)
    cost = ToyCost(base=1.0, per_token=0.0, draft={"a": 0.0})
    # With free verification and drafting, tau = R (1 + s): a rate of (1 + s)x drafting nothing.
    assert PLAN_MARGIN < 1.03 < BATCH_PLAN_MARGIN < 1.08

    def chosen(requests, gain, fresh=True):
        survival = torch.tensor([[gain, 0.0, 0.0]] * requests)
        state = _Generation(target, OnePlan(survival, fresh), [torch.tensor([1, 2])] * requests, [10] * requests,
                            1.0, 0, None, None, cost, None)
        plan = state.choose_plan(state.draft_context(), torch.tensor([K] * requests),
                                 torch.ones(requests, dtype=torch.bool))
        if plan is None:
            assert state.plan_gain is None
        else:
            assert state.plan_gain == pytest.approx(1.0 + gain, rel=1e-6)
        return plan is not None and plan.name == "p"

    for fresh in (True, False):
        assert chosen(1, 0.03, fresh)
        assert chosen(2, 0.08, fresh) and chosen(4, 0.08, fresh)
    for fresh in (True, False):  # a lagged plan is probed only after PROBE_INTERVAL rounds without it
        assert not chosen(2, 0.03, fresh) and not chosen(4, 0.03, fresh)
    assert not chosen(1, 0.0) and not chosen(2, 0.0)  # nothing to gain: even a fresh plan loses


def test_a_lead_nobody_can_catch_makes_drafts_worthless():
    """A call ends with its last request: with a cost profile and several requests, a draft of a
    request that is ahead counts by its chance of still being last (``lead_discounts``). When no
    round has varied yet (spread 0), only the requests with the most tokens left are planned
    drafts; once progress has varied, a small lead still counts."""
    from dspark_ext.generate import _Generation

    target = TrigramTarget(V, seed=6, scale=3.0, period=1)
    cost = ToyCost(base=1.0, per_token=0.01, draft={"a": 0.0})
    planned = OnePlan(torch.tensor([[0.9, 0.8, 0.7], [0.9, 0.8, 0.7]]))
    state = _Generation(target, planned, [torch.tensor([1, 2])] * 2, [40, 40], 1.0, 0, None, None, cost, None)
    active = torch.ones(2, dtype=torch.bool)
    state.generated = torch.tensor([3, 0])  # request 0 is 3 tokens ahead
    state.round_tokens = (20.0, 20.0, 20)  # 20 request-rounds of one token each: no spread
    assert state.choose_plan(state.draft_context(), torch.tensor([K, K]), active).name == "p"
    assert state.plan_lengths.tolist() == [0, K]
    assert state.draft_worth(active) == [0.0, 1.0]
    state.round_tokens = (40.0, 100.0, 20)  # mean 2, variance 1: over ~20 rounds a spread of ~4.4 tokens
    assert state.choose_plan(state.draft_context(), torch.tensor([K, K]), active).name == "p"
    assert state.plan_lengths.tolist() == [K, K]
    assert 0.3 < state.draft_worth(active)[0] < 1.0
    one = _Generation(target, planned, [torch.tensor([1, 2])], [40], 1.0, 0, None, None, cost, None)
    assert one.choose_plan(one.draft_context(), torch.tensor([K]), torch.ones(1, dtype=torch.bool)).name == "p"
    assert one.plan_lengths is None and one.draft_worth(torch.ones(1, dtype=torch.bool)) is None


def test_a_lagging_request_is_drafted_for_when_only_it_decides_the_calls_end(monkeypatch):
    """``CALL_END_OBJECTIVE``: every token a request makes in a round, its round's own token
    included, counts by the request's chance of being last. Request 0 is 10 tokens ahead with no
    spread (worth 0): drafting for request 1 alone brings the call's end 1.9 tokens closer per
    round for 1.625 s against 1 token per 1.01 s, so it is planned; counting request 0's own
    token at 1 (tokens per second with only the drafts weighted) prices the same round at 2.9
    tokens for 1.625 s against 2 per 1.01 s, and drafts nothing."""
    import importlib

    from dspark_ext.generate import _Generation

    generation = importlib.import_module("dspark_ext.generate")
    target = TrigramTarget(V, seed=6, scale=3.0, period=1)
    cost = ToyCost(base=1.0, per_token=0.01, draft={"a": 0.6})
    planned = OnePlan(torch.tensor([[0.5, 0.3, 0.1], [0.5, 0.3, 0.1]]))

    def plan_of_lagging_round():
        state = _Generation(target, planned, [torch.tensor([1, 2])] * 2, [40, 40], 1.0, 0, None, None, cost, None)
        state.generated = torch.tensor([10, 0])
        state.round_tokens = (20.0, 20.0, 20)  # no spread: only request 1 can be last
        plan = state.choose_plan(state.draft_context(), torch.tensor([K, K]), torch.ones(2, dtype=torch.bool))
        return plan, state.plan_lengths

    plan, lengths = plan_of_lagging_round()
    assert plan is not None and plan.name == "p" and lengths.tolist() == [0, K]
    monkeypatch.setattr(generation, "CALL_END_OBJECTIVE", False)
    assert plan_of_lagging_round()[0] is None


def test_planning_backs_off_while_nothing_is_worth_drafting():
    """After QUIET_ROUNDS planned rounds in a row drafted nothing, rounds go unplanned in
    stretches of 1, 2, 4, ... up to MAX_UNPLANNED; a plan that drafts resets the stretch; no cost
    profile, no backoff."""
    import importlib

    generation = importlib.import_module("dspark_ext.generate")
    target = TrigramTarget(V, seed=6, scale=3.0, period=1)
    worth = {"draft": False}

    class Switchable:
        num_draft = K

        def plans(self, context):
            value = 0.9 if worth["draft"] else 0.0  # a draft that never survives never pays
            return [DraftPlan("p", survival=torch.full((context.tokens.shape[0], K), value), parts=("a",))]

        def propose(self, context):
            return Draft(token_ids=torch.zeros(context.tokens.shape[0], K, dtype=torch.int64),
                         confidence=torch.full((context.tokens.shape[0], K), 0.9))

    def planned_rounds(state, rounds):
        pattern = []
        for _ in range(rounds):
            planned = state.planned()
            pattern.append(planned)
            if planned:
                state.back_off(state.choose_plan(state.draft_context(), torch.tensor([K]), torch.ones(1, dtype=torch.bool)))
        return pattern

    cost = ToyCost(base=1.0, per_token=0.01, draft={"a": 0.0})
    state = generation._Generation(target, Switchable(), [torch.tensor([1, 2])], [200], 1.0, 0, None, None, cost, None)
    assert generation.QUIET_ROUNDS == 4 and generation.MAX_UNPLANNED == 8
    pattern = planned_rounds(state, 4 + 1 + 1 + 2 + 1 + 4 + 1 + 8 + 1 + 8)
    expected = [True] * 4 + [False] + [True] + [False] * 2 + [True] + [False] * 4 + [True] + [False] * 8 + [True] + [False] * 8
    assert pattern == expected
    assert state.result.unplanned_rounds == pattern.count(False)
    worth["draft"] = True  # the text changes: the next planned round drafts, and planning resumes every round
    assert planned_rounds(state, 6) == [True] * 6
    worth["draft"] = False
    assert planned_rounds(state, 6) == [True] * 4 + [False] + [True]
    unplanned = generation._Generation(target, Switchable(), [torch.tensor([1, 2])], [200], 1.0, 0, None, None, None, None)
    assert planned_rounds(unplanned, 12) == [True] * 12


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_planning_backoff_follows_target_law(monkeypatch, temperature):
    """The backoff reads only earlier rounds' plans. Engaged after one quiet round, with drafting
    dear enough that the second round plans nothing: the first round drafts, the second plans
    nothing, the third goes unplanned. A request whose first-round drafts were all rejected makes
    its 4th token in the unplanned round; the joint law of the first 4 tokens holds."""
    import importlib

    generation = importlib.import_module("dspark_ext.generate")
    monkeypatch.setattr(generation, "QUIET_ROUNDS", 1)
    monkeypatch.setattr(generation, "MAX_UNPLANNED", 1)
    target = law_target()
    cost = ToyCost(per_token=0.2, draft={"lookup": 0.25, "dspark": 0.3, "dspark-short": 0.3})
    tokens = LAW_TOKENS + 1
    result = generate(target, hybrid(), [LAW_PROMPT] * LAW_SAMPLES, tokens + 1, temperature=temperature, seed=1000,
                      cost=cost)
    assert result.unplanned_rounds > 0 and result.plan_rounds.get("hybrid", 0) > 0, result.plan_rounds
    assert int(result.position_accepted.sum()) > 0.01 * LAW_SAMPLES, result.summary()
    codes = sequence_codes(torch.stack([t[:tokens] for t in result.tokens]), V)
    assert_matches_distribution(codes, target.exact_joint(LAW_PROMPT, tokens, temperature))
