"""Losslessness of dspark::verify (CPU): the emitted tokens follow the target's exact
distribution, checked with chi-square + total variation on >= 1e5 samples per case
(N independent requests over the same rows, distinct seeds or offsets, in one op call).

Power: the same check must reject deliberately broken samplers (dspark_ext.reference with
rule="sqrt_accept" / "correction_from_target") on the same setup and sample count, and
accept the exact reference."""

import dataclasses

import pytest
import torch

from dspark_ext.reference import RULE_CORRECTION_FROM_TARGET, RULE_EXACT, RULE_SQRT_ACCEPT
from helpers import (
    FLOAT_DTYPES,
    VOCAB_TILE,
    acceptance_law,
    assert_matches_distribution,
    check_distribution,
    check_output_format,
    joint_codes,
    joint_first_two_law,
    lossless_setup,
    repeated_request_batch,
    run_op,
    run_reference,
)

N = 100_000
TEMPERATURES = [0.5, 1.0, 2.0]
DRAFT_KINDS = [False, True]  # one_hot
KIND_IDS = ["draft_logits", "one_hot"]


def _acceptance_rate(num_accepted: torch.Tensor) -> float:
    return float((num_accepted > 0).double().mean())


@pytest.mark.parametrize("temperature", TEMPERATURES)
@pytest.mark.parametrize("one_hot", DRAFT_KINDS, ids=KIND_IDS)
@pytest.mark.parametrize("length", [1, 3])
def test_first_token_follows_target(length, one_hot, temperature):
    """output[:, 0] (the accepted draft or the correction) ~ softmax(target_row_0 / T)."""
    setup = lossless_setup(length, 24, temperature, one_hot, num_samples=N, seed=100 + length)
    output, num_accepted = run_op(setup.batch)
    check_output_format(setup.batch, output, num_accepted)
    # Both branches (accept and correction) must be exercised for the check to mean much.
    assert 0.05 < _acceptance_rate(num_accepted) < 0.95
    assert_matches_distribution(output[:, 0], setup.target_probs[0])


@pytest.mark.parametrize("temperature", [0.7, 1.5])
@pytest.mark.parametrize("one_hot", DRAFT_KINDS, ids=KIND_IDS)
def test_joint_of_first_two_tokens(one_hot, temperature):
    """(output[:, 0], output[:, 1]) for L = 2: accepted a then ~p1, or correction a then -1,
    with the exact weights min(p0, q0) * p1 and max(0, p0 - q0)."""
    V = 12
    setup = lossless_setup(2, V, temperature, one_hot, num_samples=N, seed=7)
    output, _ = run_op(setup.batch)
    assert_matches_distribution(joint_codes(output, V), joint_first_two_law(setup).flatten())


@pytest.mark.parametrize("one_hot", DRAFT_KINDS, ids=KIND_IDS)
def test_acceptance_length_law(one_hot):
    """num_accepted for L = 3: position k accepts with alpha_k = sum min(p_k, q_k)."""
    setup = lossless_setup(3, 10, 1.0, one_hot, num_samples=N, seed=21, target_scale=1.0, draft_scale=1.0)
    _, num_accepted = run_op(setup.batch)
    assert_matches_distribution(num_accepted, acceptance_law(setup))


@pytest.mark.parametrize("temperature", TEMPERATURES)
def test_bonus_token_when_every_draft_is_accepted(temperature):
    """Draft logits == target logits (p == q, the residual is empty): every draft is
    accepted and the bonus at position L follows softmax(last row / T)."""
    L, V = 2, 20
    g = torch.Generator().manual_seed(31)
    rows = torch.randn(L + 1, V, generator=g) * 2.0
    setup = lossless_setup(L, V, temperature, False, num_samples=N, seed=32, target_rows=rows, draft_rows=rows[:L])
    output, num_accepted = run_op(setup.batch)
    assert bool((num_accepted == L).all())
    assert_matches_distribution(output[:, L], setup.target_probs[L])


def test_bonus_token_after_accepted_one_hot_draft():
    """One-hot drafts: conditioned on the draft being accepted, the bonus ~ p_1."""
    V = 15
    g = torch.Generator().manual_seed(41)
    rows = torch.randn(2, V, generator=g)
    rows[0, 3] = 4.0  # the draft proposes 3 (p0(3) ~ 0.8) or 5
    draft = torch.full((1, V), -30.0)
    draft[0, 3], draft[0, 5] = 2.0, 0.0
    setup = lossless_setup(1, V, 1.0, True, num_samples=N, seed=42, target_rows=rows, draft_rows=draft)
    output, num_accepted = run_op(setup.batch)
    accepted = num_accepted == 1
    assert int(accepted.sum()) > 50_000
    assert_matches_distribution(output[accepted, 1], setup.target_probs[1])
    assert_matches_distribution(output[:, 0], setup.target_probs[0])


@pytest.mark.parametrize("temperature", [0.5, 1.5])
def test_correction_follows_the_residual(temperature):
    """Conditioned on a rejection at position 0, the correction ~ norm(max(0, p0 - q0))."""
    setup = lossless_setup(1, 20, temperature, False, num_samples=N, seed=131)
    output, num_accepted = run_op(setup.batch)
    rejected = num_accepted == 0
    assert int(rejected.sum()) > 20_000
    residual = (setup.target_probs[0] - setup.draft_law[0]).clamp(min=0)
    assert_matches_distribution(output[rejected, 0], residual / residual.sum())


def test_draft_token_outside_the_draft_support_is_always_rejected():
    """q(x) = 0 for the proposed x (a draft that could not have produced it): never
    accepted, and the correction follows the residual."""
    L, V = 1, 16
    g = torch.Generator().manual_seed(141)
    target = torch.randn(L + 1, V, generator=g)
    draft = target[:L] + torch.randn(L, V, generator=g)
    draft[0, 5] = float("-inf")
    target[0, 5] = 2.0  # the target likes it: p(5) > 0 = q(5)
    setup = lossless_setup(L, V, 1.0, False, num_samples=N, seed=142, target_rows=target, draft_rows=draft)
    setup.batch.draft_token_ids.fill_(5)
    output, num_accepted = run_op(setup.batch)
    assert int(num_accepted.sum()) == 0
    residual = (setup.target_probs[0] - setup.draft_law[0]).clamp(min=0)
    assert_matches_distribution(output[:, 0], residual / residual.sum())


@pytest.mark.parametrize("one_hot", DRAFT_KINDS, ids=KIND_IDS)
def test_draft_without_mass_where_target_has_mass(one_hot):
    """q is zero on half the vocabulary (including the target's favourite tokens): the
    correction must restore exactly that mass."""
    L, V = 2, 20
    g = torch.Generator().manual_seed(51)
    target = torch.randn(L + 1, V, generator=g) * 1.5
    draft = target[:L].clone() + torch.randn(L, V, generator=g) * 0.5
    no_mass = torch.zeros(V, dtype=torch.bool)
    no_mass[torch.randperm(V, generator=g)[: V // 2]] = True
    no_mass[target[0].argmax()] = True
    draft[:, no_mass] = float("-inf")
    setup = lossless_setup(L, V, 1.0, one_hot, num_samples=N, seed=52, target_rows=target, draft_rows=draft)
    output, _ = run_op(setup.batch)
    assert_matches_distribution(output[:, 0], setup.target_probs[0])
    assert_matches_distribution(joint_codes(output, V), joint_first_two_law(setup).flatten())


@pytest.mark.parametrize("one_hot", DRAFT_KINDS, ids=KIND_IDS)
def test_target_without_mass_where_draft_has_mass(one_hot):
    """p is zero (-inf logits) on a third of the vocabulary where q has mass: such drafts
    are never accepted and never emitted."""
    L, V = 1, 18
    g = torch.Generator().manual_seed(61)
    target = torch.randn(L + 1, V, generator=g)
    target[0, ::3] = float("-inf")
    draft = torch.randn(L, V, generator=g)
    draft[0, ::3] += 2.0  # the draft likes exactly the impossible tokens
    setup = lossless_setup(L, V, 1.0, one_hot, num_samples=N, seed=62, target_rows=target, draft_rows=draft)
    output, num_accepted = run_op(setup.batch)
    drafted_impossible = (setup.batch.draft_token_ids % 3) == 0
    assert bool(drafted_impossible.any())
    assert int(num_accepted[drafted_impossible].sum()) == 0
    assert_matches_distribution(output[:, 0], setup.target_probs[0])


@pytest.mark.parametrize("dtype", FLOAT_DTYPES[1:], ids=str)
def test_first_token_follows_target_low_precision(dtype):
    """bf16 / fp16 logits: the exact law is the softmax of the stored (rounded) values."""
    setup = lossless_setup(2, 40, 1.0, False, num_samples=N, seed=71, dtype=dtype)
    output, num_accepted = run_op(setup.batch)
    assert 0.05 < _acceptance_rate(num_accepted) < 0.95
    assert_matches_distribution(output[:, 0], setup.target_probs[0])


def test_distinct_offsets_are_independent_samples():
    """Same seed for every request, offsets 0..N-1 (how a server advances one stream)."""
    base = lossless_setup(1, 24, 1.0, False, num_samples=N, seed=81)
    batch = repeated_request_batch(base.batch.target_logits[:2], base.batch.draft_logits[:1],
                                   base.batch.draft_token_ids.reshape(N, 1), 1.0,
                                   seed=torch.full((N,), 987654321), offset=torch.arange(N))
    output, _ = run_op(batch)
    assert_matches_distribution(output[:, 0], base.target_probs[0])
    assert_matches_distribution(joint_codes(output, 24), joint_first_two_law(base).flatten())


@pytest.mark.parametrize("one_hot", DRAFT_KINDS, ids=KIND_IDS)
def test_lossless_across_vocab_tiles(one_hot):
    """V = 2048 + 300: the emitted token is drawn by a race between two vocabulary tiles and
    then inside the winner; the mass is split between the tiles (stride-0 broadcast rows)."""
    V = VOCAB_TILE + 300
    g = torch.Generator().manual_seed(91)
    row = torch.randn(1, V, generator=g)
    row[0, [100, 700, VOCAB_TILE + 50, VOCAB_TILE + 250]] += 7.0  # each tile holds about half of the mass
    draft = row + torch.randn(1, V, generator=g)
    setup = lossless_setup(1, V, 1.0, one_hot, num_samples=N, seed=92, target_rows=row.repeat(2, 1),
                           draft_rows=draft, broadcast=True)
    output, num_accepted = run_op(setup.batch)
    assert 0.05 < _acceptance_rate(num_accepted) < 0.95
    p = setup.target_probs[0]
    assert_matches_distribution(output[:, 0], p)
    tile_probs = torch.stack([p[:VOCAB_TILE].sum(), p[VOCAB_TILE:].sum()])
    assert_matches_distribution(output[:, 0] // VOCAB_TILE, tile_probs)


def _sparse_draft_rows(L, V, g):
    """Draft logits with mass on ~10% of the ids, most of them low (as a frequency-ranked draft
    vocabulary's), so that most vector-width stretches of a row are -inf; every tile keeps some."""
    keep = torch.rand(L, V, generator=g) < torch.where(torch.arange(V) < 400, 0.8, 0.02)
    keep[:, ::VOCAB_TILE] = True
    return torch.where(keep, torch.randn(L, V, generator=g) * 1.5, torch.tensor(float("-inf")))


@pytest.mark.parametrize("temperature", [0.7, 1.0])
def test_sparse_draft_rows_match_finite_stand_ins_bit_for_bit(temperature):
    """Draft rows that are -inf over whole vector-width stretches take a shortcut (their exp
    terms, exactly 0, are skipped in the draft rows' sums and the residual): the same tokens and
    acceptances, bit for bit, as the same rows with -1e30 there (q exactly 0, computed)."""
    L, V, B = 3, 2 * VOCAB_TILE + 300, 256
    g = torch.Generator().manual_seed(171)
    target = torch.randn(L + 1, V, generator=g) * 1.5
    draft = _sparse_draft_rows(L, V, g)
    assert float((draft[:, :V - V % 16].reshape(L, -1, 16) == float("-inf")).all(-1).float().mean()) > 0.5
    setup = lossless_setup(L, V, temperature, False, num_samples=B, seed=172, target_rows=target, draft_rows=draft)
    finite = dataclasses.replace(setup.batch, draft_logits=setup.batch.draft_logits.nan_to_num(neginf=-1e30))
    output, num_accepted = run_op(setup.batch)
    finite_output, finite_accepted = run_op(finite)
    assert 0 < int((num_accepted == 0).sum()) < B  # rejections (the residual) and acceptances
    assert torch.equal(output, finite_output) and torch.equal(num_accepted, finite_accepted)


def test_sparse_draft_rows_are_lossless():
    """The same sparse draft law over three tiles: the first token follows the target, and after
    a rejection the correction follows the residual norm(max(0, p - q))."""
    L, V = 1, 2 * VOCAB_TILE + 300
    g = torch.Generator().manual_seed(181)
    target = torch.randn(L + 1, V, generator=g)
    target[:, :40] += 4.0  # the draft's ids hold most of the target's mass too
    draft = _sparse_draft_rows(L, V, g)
    setup = lossless_setup(L, V, 1.0, False, num_samples=N, seed=182, target_rows=target, draft_rows=draft)
    output, num_accepted = run_op(setup.batch)
    assert_matches_distribution(output[:, 0], setup.target_probs[0])
    rejected = num_accepted == 0
    assert int(rejected.sum()) > 20_000
    residual = (setup.target_probs[0] - setup.draft_law[0]).clamp(min=0)
    assert_matches_distribution(output[rejected, 0], residual / residual.sum())


# --------------------------------------------------------------------------- power


def _power_setup():
    # p and q clearly different, so that every broken rule shifts the law by far more
    # than the sampling noise of N = 1e5.
    return lossless_setup(1, 16, 1.0, False, num_samples=N, seed=123, target_scale=1.5, draft_scale=1.5)


def test_statistical_check_accepts_the_exact_reference():
    setup = _power_setup()
    output, _ = run_reference(setup.batch, seed=5, rule=RULE_EXACT)
    assert_matches_distribution(output[:, 0], setup.target_probs[0])
    assert_matches_distribution(joint_codes(output, 16), joint_first_two_law(setup).flatten())


@pytest.mark.parametrize("rule", [RULE_SQRT_ACCEPT, RULE_CORRECTION_FROM_TARGET])
def test_statistical_check_rejects_a_broken_sampler(rule):
    setup = _power_setup()
    output, _ = run_reference(setup.batch, seed=5, rule=rule)
    marginal = check_distribution(output[:, 0], setup.target_probs[0])
    assert not marginal.ok, f"the check did not notice rule={rule}: {marginal}"
    # Both criteria reject on their own, not just one of them.
    assert marginal.chi2_pvalue < 1e-4 and marginal.tv > marginal.tv_bound, str(marginal)
    with pytest.raises(AssertionError):
        assert_matches_distribution(joint_codes(output, 16), joint_first_two_law(setup).flatten())


@pytest.mark.parametrize("fill", [float("-inf"), float("nan")], ids=["neg_inf", "nan"])
@pytest.mark.parametrize("vocab_size", [64, 5000], ids=["one_tile", "three_tiles"])
def test_draft_row_without_any_mass_means_q_is_zero(fill, vocab_size):
    """A draft row with no finite logit is q = 0 everywhere: the draft is rejected and the
    correction is the residual max(0, p - 0) = p, sampled over the whole vocabulary."""
    g = torch.Generator().manual_seed(5)
    target_rows = torch.randn(2, vocab_size, generator=g)
    draft_rows = torch.full((1, vocab_size), fill)
    ids = torch.full((N, 1), 5, dtype=torch.int64)
    output, num_accepted = run_op(repeated_request_batch(target_rows, draft_rows, ids, 1.0))
    assert bool((num_accepted == 0).all())
    p = torch.softmax(target_rows[0].double(), -1)
    if vocab_size > 64:  # compare tile masses: 5000 ids are too many bins for 1e5 samples
        tiles = torch.arange(vocab_size) // VOCAB_TILE
        assert_matches_distribution(tiles[output[:, 0]], torch.zeros(3, dtype=torch.float64).index_add_(0, tiles, p))
    else:
        assert_matches_distribution(output[:, 0], p)
