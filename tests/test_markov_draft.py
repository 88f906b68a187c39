"""dspark::markov_draft on CPU: corrected logits, tokens and confidence against the
reference, the exact joint law of the drafted sequence (with a power check on the broken
"Markov term dropped" drafter), determinism, batch invariance, seed/offset streams, shapes
and layouts, NaN/inf, malformed arguments, opcheck and torch.compile.
CUDA: tests/test_markov_draft_cuda.py. Instruction-set builds: tests/test_cpu_isa.py."""

import re

import pytest
import torch

import dspark_ext
from dspark_ext.reference import MARKOV_DROPPED, greedy_tokens, markov_draft_reference, markov_probabilities
from helpers import (
    FLOAT_DTYPES,
    VOCAB_TILE,
    MarkovInputs,
    assert_markov_matches_reference,
    assert_matches_distribution,
    check_distribution,
    check_markov_output_format,
    fraction_rows_differ,
    make_markov_inputs,
    markov_op,
    markov_sequence_law,
    markov_step,
    non_finite_markov_inputs,
    repeated_markov_inputs,
    run_markov_op,
    run_markov_reference,
    sequence_codes,
    with_replaced,
)

INF, NAN = float("inf"), float("nan")
N = 100_000


def _assert_same_outputs(a, b) -> None:
    """Bitwise-equal op outputs (NaN logits compare equal)."""
    for x, y in zip(a, b):
        assert x.dtype == y.dtype and x.shape == y.shape
        torch.testing.assert_close(x, y, rtol=0, atol=0, equal_nan=True)


# --------------------------------------------------------------------------- against the reference


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("weight_dtype", ["float32", "same"])
def test_greedy_exact_weights_match_reference_bitwise(dtype, weight_dtype):
    """Weights whose float32 sums are exact in any order: the op's logits equal the
    reference's bitwise and the greedy drafts are the reference's, token for token."""
    inputs = make_markov_inputs(6, 4, 2100, 5, dtype=dtype, exact_weights=True, confidence=True, seed=1,
                                weight_dtype=torch.float32 if weight_dtype == "float32" else dtype)
    ids, _, _ = assert_markov_matches_reference(inputs, exact=True)
    # The Markov term matters: the drafts without it are different.
    dropped, _, _ = run_markov_reference(inputs, variant=MARKOV_DROPPED)
    assert not torch.equal(ids, dropped)


@pytest.mark.parametrize("dtype, weight_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                                 (torch.float16, torch.float16), (torch.bfloat16, torch.float32),
                                                 (torch.float16, torch.float32)], ids=str)
def test_greedy_random_weights_match_reference(dtype, weight_dtype):
    """Gaussian weights: logits within the dtype's tolerance along the op's own tokens; fp32
    greedy drafts equal the reference's token for token, 16-bit ones wherever the reference
    row's maximum is clear (and always the first argmax of the op's own row)."""
    inputs = make_markov_inputs(12, 3, 2500, 24, dtype=dtype, weight_dtype=weight_dtype, confidence=True, seed=2)
    assert_markov_matches_reference(inputs)


# (B, K, V, r, dtype, weight dtype, temperatures, confidence) of the shape / code-path cases.
MIXED = [0.0, 1.0, 0.0, 0.7, 2.0, 0.0, 1.3, 0.0, 0.5]
SHAPE_CASES = [
    (1, 4, 1000, 5, torch.float32, torch.float32, [0.0], True),  # B = 1: a block of one row
    (1, 3, 700, 16, torch.bfloat16, torch.float32, [1.0], False),
    (3, 3, 257, 16, torch.float32, torch.float32, [0.0, 1.0, 0.0], True),  # odd V
    (9, 2, 4099, 37, torch.bfloat16, torch.float32, MIXED, True),  # two row blocks of 4 and a tail; 3 tiles, odd V
    (9, 5, 7, 3, torch.float32, torch.float32, MIXED, True),  # tiny V
    (40, 3, 200, 5, torch.float16, torch.float16, (MIXED * 5)[:40], True),  # V < 256, r = 5
    (40, 1, VOCAB_TILE + 1, 64, torch.bfloat16, torch.bfloat16, (MIXED * 5)[:40], False),  # K = 1
    (4, 2, 1, 2, torch.float32, torch.float32, [0.0, 1.0, 0.0, 1.0], True),  # V = 1
    (5, 2, 131, 1, torch.float16, torch.float32, [1.0, 0.0, 0.0, 0.8, 0.0], True),  # r = 1
]


def _shape_case_id(case) -> str:
    B, K, V, r, dtype, weight_dtype, temps, confidence = case
    return f"B{B}-K{K}-V{V}-r{r}-{str(dtype)[6:]}-w{str(weight_dtype)[6:]}{'-conf' if confidence else ''}"


@pytest.mark.parametrize("exact", [True, False], ids=["exact_weights", "random_weights"])
@pytest.mark.parametrize("case", SHAPE_CASES, ids=_shape_case_id)
def test_shapes_and_mixed_batches_match_reference(case, exact):
    """Greedy and sampled rows together; B in {1, 3, 4, 5, 9, 40} (both bias code paths), odd
    V, V < 256, V = 1, several tiles, r not a multiple of 16, K = 1."""
    B, K, V, r, dtype, weight_dtype, temps, confidence = case
    inputs = make_markov_inputs(B, K, V, r, dtype=dtype, weight_dtype=weight_dtype, temperature=temps,
                                confidence=confidence, exact_weights=exact, seed=B * 1000 + V)
    assert_markov_matches_reference(inputs, exact=exact)


def test_sampled_tokens_follow_their_row():
    """Sampled rows draw from softmax(l_k / T): with one dominant id per row (placed by the
    Markov-corrected logits, not by U) every draft is that id."""
    B, K, V, r = 20, 3, 300, 4
    inputs = make_markov_inputs(B, K, V, r, temperature=1.0, seed=3, logit_scale=0.1)
    # W1[p] = e_0 for every p and W2[v, 0] = 30 [v == 123]: the bias adds 30 to id 123 only.
    w1 = torch.zeros(V, r)
    w1[:, 0] = 1.0
    w2 = torch.zeros(V, r)
    w2[123, 0] = 30.0
    ids, logits, _ = run_markov_op(with_replaced(inputs, markov_w1=w1, markov_w2=w2))
    assert bool((ids == 123).all())
    torch.testing.assert_close(logits[:, :, 123], inputs.base_logits[:, :, 123] + 30.0)


@pytest.mark.parametrize("conf_w_prev", [False, True], ids=["no_w_prev", "w_prev"])
@pytest.mark.parametrize("conf_temperature", [False, True], ids=["no_sts", "sts"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_confidence_formula(conf_w_prev, conf_temperature, dtype):
    """confidence[b, k] = sigmoid((conf_base[b, k] + conf_w_prev . W1[x_{k-1}]) / conf_temperature[k]),
    x_{k-1} the anchor or the op's own previous draft; missing terms are 0 / 1."""
    B, K, V, r = 10, 4, 120, 6
    inputs = make_markov_inputs(B, K, V, r, dtype=dtype, temperature=[0.0, 1.0] * 5, confidence=True,
                                conf_w_prev=conf_w_prev, conf_temperature=conf_temperature, seed=4)
    ids, _, confidence = run_markov_op(inputs)
    previous = torch.cat([inputs.prev_token_ids[:, None], ids[:, :-1]], dim=1)
    z = inputs.conf_base.clone()
    if conf_w_prev:
        z += inputs.markov_w1[previous].float() @ inputs.conf_w_prev
    if conf_temperature:
        z /= inputs.conf_temperature
    torch.testing.assert_close(confidence, torch.sigmoid(z), rtol=1e-5, atol=1e-6)
    assert_markov_matches_reference(inputs)


def test_no_conf_base_gives_empty_confidence():
    inputs = make_markov_inputs(3, 2, 50, 4, seed=5)
    _, _, confidence = run_markov_op(inputs)
    assert confidence.shape == (0,) and confidence.dtype == torch.float32


def test_empty_batch():
    inputs = make_markov_inputs(0, 3, 40, 4, confidence=True, seed=6)
    ids, logits, confidence = run_markov_op(inputs)
    check_markov_output_format(inputs, ids, logits, confidence)
    assert ids.shape == (0, 3) and logits.shape == (0, 3, 40) and confidence.shape == (0, 3)


# --------------------------------------------------------------------------- exact law of the drafts


def _joint_setup(temperature: float, dtype: torch.dtype = torch.float32):
    """K = 3 drafts over V = 6 ids, rank 3, U flat-ish and a strong Markov term (the joint of
    (x_1, x_2, x_3) over 216 sequences is far from what U alone gives)."""
    K, V, r, anchor = 3, 6, 3, 2
    g = torch.Generator().manual_seed(7)
    rows = (torch.randn(K, V, generator=g) * 0.7).to(dtype)
    w1 = torch.randn(V, r, generator=g)
    w2 = torch.randn(V, r, generator=g) * 1.4
    law = markov_sequence_law(rows, anchor, w1, w2, temperature)
    without_markov = markov_sequence_law(rows, anchor, torch.zeros(V, r), w2, temperature)
    assert 0.5 * float((law - without_markov).abs().sum()) > 0.15  # the Markov term clearly matters
    return rows, anchor, w1, w2, law


@pytest.mark.parametrize("temperature, streams", [(1.0, "seeds"), (0.7, "offsets"), (1.6, "seeds")])
def test_joint_of_three_drafts_follows_the_exact_law(temperature, streams):
    """1e5 identical requests (distinct seeds, or one seed and distinct offsets) in one call:
    the sequences (x_1, x_2, x_3) follow prod_k softmax(l_k(x_{k-1}) / T) by chi-square and TV."""
    rows, anchor, w1, w2, law = _joint_setup(temperature)
    if streams == "seeds":
        inputs = repeated_markov_inputs(rows, anchor, w1, w2, temperature, N)
    else:
        inputs = repeated_markov_inputs(rows, anchor, w1, w2, temperature, N, seed=torch.full((N,), 424242),
                                        offset=torch.arange(N) * 3)
    ids, _, _ = run_markov_op(inputs)
    assert_matches_distribution(sequence_codes(ids, rows.shape[1]), law)


def test_joint_of_three_drafts_bf16_logits():
    """bf16 logits, fp32 weights: the law is the softmax of the rounded corrected logits."""
    rows, anchor, w1, w2, law = _joint_setup(1.0, torch.bfloat16)
    ids, logits, _ = run_markov_op(repeated_markov_inputs(rows, anchor, w1, w2, 1.0, N))
    assert logits.dtype == torch.bfloat16
    assert_matches_distribution(sequence_codes(ids, rows.shape[1]), law)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_statistical_check_rejects_the_markov_dropped_drafter(temperature):
    """Power: the same check on the same setup rejects the samples of the broken drafter that
    drops the Markov term (both criteria), and accepts the exact reference's (at T = 1)."""
    rows, anchor, w1, w2, law = _joint_setup(temperature)
    inputs = repeated_markov_inputs(rows, anchor, w1, w2, temperature, N)
    V = rows.shape[1]
    if temperature == 1.0:
        exact_ids, _, _ = run_markov_reference(inputs, seed=11)
        assert_matches_distribution(sequence_codes(exact_ids, V), law)
    broken_ids, _, _ = run_markov_reference(inputs, seed=11, variant=MARKOV_DROPPED)
    result = check_distribution(sequence_codes(broken_ids, V), law)
    assert not result.ok, f"the check did not notice the dropped Markov term: {result}"
    assert result.chi2_pvalue < 1e-4 and result.tv > result.tv_bound, str(result)


def test_first_draft_across_vocab_tiles():
    """V = 4100 (tiles of 2048, 2048 and 4 ids), the mass spread over all three tiles and moved
    between them by the Markov term: x_1's marginal and its tile follow the exact law."""
    V, r, anchor, n = 2 * VOCAB_TILE + 4, 4, 17, 20_000
    g = torch.Generator().manual_seed(8)
    rows = torch.randn(1, V, generator=g) * 0.5
    favourites = [5, 900, VOCAB_TILE + 3, VOCAB_TILE + 1800, 2 * VOCAB_TILE + 1, 2 * VOCAB_TILE + 3]
    rows[0, favourites] += 7.0
    w1 = torch.randn(V, r, generator=g)
    w2 = torch.zeros(V, r)
    w2[favourites] = torch.randn(len(favourites), r, generator=g) * 0.5  # reweighs the favourites
    inputs = repeated_markov_inputs(rows, anchor, w1, w2, 1.0, n)
    ids, _, _ = run_markov_op(inputs)
    p = markov_sequence_law(rows, anchor, w1, w2, 1.0)
    tiles = torch.arange(V) // VOCAB_TILE
    tile_law = torch.zeros(3, dtype=torch.float64).index_add_(0, tiles, p)
    without_markov = markov_sequence_law(rows, anchor, torch.zeros(V, r), w2, 1.0)
    tile_law_without_markov = torch.zeros(3, dtype=torch.float64).index_add_(0, tiles, without_markov)
    assert float(tile_law.min()) > 0.08, tile_law  # every tile takes part in the race...
    assert float((tile_law - tile_law_without_markov).abs().max()) > 0.1  # ...with masses set by the Markov term
    assert_matches_distribution(ids[:, 0] // VOCAB_TILE, tile_law)
    assert_matches_distribution(ids[:, 0], p)


# --------------------------------------------------------------------------- determinism, streams, invariance


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_deterministic(dtype):
    inputs = make_markov_inputs(24, 3, 2100, 20, dtype=dtype, temperature=[1.0, 0.0, 0.6, 1.5] * 6,
                                confidence=True, seed=9)
    _assert_same_outputs(run_markov_op(inputs), run_markov_op(inputs))


def _assert_batch_invariant(inputs: MarkovInputs) -> None:
    """Each request's outputs are the same alone, inside the batch and inside a reordered
    batch with repeats (other rows, other positions)."""
    ids, logits, confidence = run_markov_op(inputs)
    B = inputs.num_requests
    order = list(range(B - 1, -1, -1)) + list(range(0, B, 2))
    s_ids, s_logits, s_confidence = run_markov_op(inputs.select(order))
    assert torch.equal(s_ids, ids[order])
    assert torch.equal(s_logits, logits[order]), "logits change with the batch composition"
    assert torch.equal(s_confidence, confidence[order])
    for b in range(B):
        a_ids, a_logits, a_confidence = run_markov_op(inputs.select([b]))
        assert torch.equal(a_ids[0], ids[b]), (b, a_ids[0].tolist(), ids[b].tolist())
        diff = (a_logits[0].double() - logits[b].double()).abs().max().item()
        assert torch.equal(a_logits[0], logits[b]), (
            f"request {b}: its logits alone (B = 1) differ from those in the batch (B = {B}) by up to {diff:.3g}")
        assert torch.equal(a_confidence[0], confidence[b])


@pytest.mark.parametrize("rank", [5, 16, 37])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_batch_invariance(rank, dtype):
    """In a batch of B = 10 (and its reordering, B = 15) a request's bias is computed in a block
    of 4 rows (or a tail block), alone (B = 1) in a block of 1: its tokens, logits and
    confidence must not depend on which (bitwise)."""
    temps = [1.0, 0.8, 0.0, 1.2, 2.0, 1.0, 0.5, 0.0, 1.0, 0.9]
    inputs = make_markov_inputs(10, 3, 2300, rank, dtype=dtype, weight_dtype=torch.float32, temperature=temps,
                                confidence=True, logit_scale=1.0, seed=10 + rank)
    _assert_batch_invariant(inputs)


def test_batch_invariance_at_a_greedy_near_tie():
    """A greedy row whose two best logits would be one float32 ulp apart if the bias were summed
    in another order alone (B = 1) than inside a batch of 8 drafts the same token both ways
    (with a batch-invariant op there is no such id and the test degenerates to a tie)."""
    B, V, r = 8, 64, 16
    g = torch.Generator().manual_seed(24)
    base = torch.randn(B, 1, V, generator=g)
    w1, w2 = torch.randn(V, r, generator=g), torch.randn(V, r, generator=g)
    w2[V - 1] = 0.0  # id V - 1 gets no bias: its logit is its U
    inputs = MarkovInputs(base, torch.arange(B), w1, w2, torch.zeros(B), torch.zeros(B, dtype=torch.int64),
                          torch.zeros(B, dtype=torch.int64))
    _, in_batch, _ = run_markov_op(inputs)
    _, alone, _ = run_markov_op(inputs.select([0]))
    differ = (in_batch[0, 0] != alone[0, 0]).nonzero()[:, 0]
    v = int(differ[0]) if differ.numel() else 0  # an id whose logit depends on the path, if any
    tie = torch.maximum(in_batch[0, 0, v], alone[0, 0, v])
    u_v = float(base[0, 0, v])
    base[0, 0] = -1e4  # only ids v and V - 1 compete; l[V - 1] = tie == max of l[v] on both paths
    base[0, 0, v] = u_v
    base[0, 0, V - 1] = tie
    ids_in_batch, _, _ = run_markov_op(inputs)
    ids_alone, _, _ = run_markov_op(inputs.select([0]))
    assert int(ids_alone[0, 0]) == int(ids_in_batch[0, 0]), (
        f"row 0 drafts {int(ids_alone[0, 0])} alone but {int(ids_in_batch[0, 0])} in a batch of {B}: "
        f"l[{v}] = {alone[0, 0, v].item()!r} alone, {in_batch[0, 0, v].item()!r} in the batch")


@pytest.mark.parametrize("field", ["seed", "offset"])
def test_seed_and_offset_change_the_stream(field):
    inputs = make_markov_inputs(2000, 3, 64, 4, temperature=1.0, logit_scale=0.3, markov_scale=0.3, seed=12)
    ids, _, _ = run_markov_op(inputs)
    changed = with_replaced(inputs, **{field: getattr(inputs, field) + 1})
    ids2, _, _ = run_markov_op(changed)
    assert fraction_rows_differ(ids, ids2) > 0.5
    # ...while the same values give the same rows.
    assert torch.equal(run_markov_op(with_replaced(changed, **{field: getattr(inputs, field)}))[0], ids)


def test_identical_requests_with_the_same_stream_draft_the_same_tokens():
    rows = torch.randn(3, 64) * 0.3
    inputs = repeated_markov_inputs(rows, 5, torch.randn(64, 4), torch.randn(64, 4), 1.0, 50,
                                    seed=torch.full((50,), 99), offset=torch.full((50,), 3))
    ids, _, _ = run_markov_op(inputs)
    assert bool((ids == ids[:1]).all())


def test_greedy_ignores_seed_and_offset():
    inputs = make_markov_inputs(5, 3, 900, 8, confidence=True, seed=13)
    expected = run_markov_op(inputs)
    got = run_markov_op(with_replaced(inputs, seed=inputs.seed * 3 + 1, offset=inputs.offset + 99))
    _assert_same_outputs(expected, got)


def test_mixed_batch_greedy_rows_do_not_depend_on_sampled_ones():
    inputs = make_markov_inputs(12, 3, 1500, 10, temperature=MIXED + [0.0, 1.0, 0.0], seed=14)
    ids, logits, _ = run_markov_op(inputs)
    reseeded = with_replaced(inputs, seed=inputs.seed + 1, offset=inputs.offset + 7)
    ids2, logits2, _ = run_markov_op(reseeded)
    greedy = inputs.temperature == 0
    assert torch.equal(ids[greedy], ids2[greedy]) and torch.equal(logits[greedy], logits2[greedy])
    assert not torch.equal(ids[~greedy], ids2[~greedy])


# --------------------------------------------------------------------------- layouts


def _strided_copy(inputs: MarkovInputs) -> MarkovInputs:
    """The same values in non-contiguous layouts: logits a slice of a wider buffer (and every
    other row), transposed weights, per-request vectors with stride 2, conf_base transposed."""
    def every_other(t):
        wide = torch.empty((t.shape[0] * 2, *t.shape[1:]), dtype=t.dtype)
        wide[::2] = t
        return wide[::2]

    B, K, V = inputs.base_logits.shape
    wide = torch.full((B, K, V + 29), NAN, dtype=inputs.base_logits.dtype)
    wide[:, :, 3:V + 3] = inputs.base_logits
    strided = MarkovInputs(
        wide[:, :, 3:V + 3],
        every_other(inputs.prev_token_ids),
        inputs.markov_w1.t().contiguous().t(),
        inputs.markov_w2.t().contiguous().t(),
        every_other(inputs.temperature),
        every_other(inputs.seed),
        every_other(inputs.offset),
        inputs.conf_base.t().contiguous().t(),
        every_other(inputs.conf_w_prev),
        every_other(inputs.conf_temperature),
    )
    for t in strided.args():
        assert not t.is_contiguous()
    return strided


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_non_contiguous_inputs_give_the_same_result(dtype):
    inputs = make_markov_inputs(9, 3, 777, 12, dtype=dtype, temperature=MIXED, confidence=True, seed=15)
    _assert_same_outputs(run_markov_op(inputs), run_markov_op(_strided_copy(inputs)))
    # Broadcast (stride-0) rows, as the distribution tests use.
    row = inputs.select([0])
    repeated = row.select([0] * 5)
    broadcast = with_replaced(repeated, base_logits=row.base_logits.expand(5, -1, -1))
    _assert_same_outputs(run_markov_op(repeated), run_markov_op(broadcast))


# --------------------------------------------------------------------------- NaN / inf


def _single_step(rows, temperature=0.0, seed=0, weights=None):
    """One draft position for each row of ``rows`` [B, V] with a zero Markov term (or ``weights``)."""
    rows = torch.as_tensor(rows, dtype=torch.float32)
    B, V = rows.shape
    w1, w2 = (torch.zeros(V, 2), torch.zeros(V, 2)) if weights is None else weights
    return markov_op(rows[:, None], torch.zeros(B, dtype=torch.int64), w1, w2, torch.full((B,), float(temperature)),
                     torch.full((B,), seed, dtype=torch.int64), torch.zeros(B, dtype=torch.int64), None, None, None)


def test_greedy_nan_inf_rules():
    rows = [
        [1.0, NAN, 0.5, NAN],  # torch.argmax would answer 1
        [NAN, NAN, NAN, NAN],  # no finite logit
        [-INF, -INF, -INF, -INF],
        [NAN, -INF, NAN, -INF],
        [-INF, 2.0, INF, INF],  # +inf is the largest; first of equals
        [NAN, INF, NAN, 3.0],
        [-INF, NAN, -2.0, -3.0],
    ]
    ids, logits, _ = _single_step(rows)
    assert ids[:, 0].tolist() == [0, 0, 0, 0, 2, 1, 2]
    assert torch.equal(greedy_tokens(logits[:, 0]), ids[:, 0])
    torch.testing.assert_close(logits[:, 0], torch.tensor(rows), rtol=0, atol=0, equal_nan=True)


def test_greedy_nan_rule_across_tiles():
    V = 5000
    row = torch.randn(1, V)
    row[0, 10] = NAN
    row[0, 4500] = 50.0
    row[0, 100] = NAN
    assert _single_step(row)[0].item() == 4500
    row[0, 4500] = INF
    row[0, 4999] = INF
    assert _single_step(row)[0].item() == 4500
    row[0, 2100] = INF
    assert _single_step(row)[0].item() == 2100


@pytest.mark.parametrize("fill", [-INF, NAN], ids=["neg_inf", "nan"])
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_row_without_mass_answers_zero(fill, temperature):
    """Documented: a row with nothing above -inf drafts token 0 (whatever the seed), and the
    next position conditions on it."""
    V, r = 3000, 4
    base = torch.full((8, 2, V), fill)
    base[:, 1] = torch.randn(8, V)
    w1, w2 = torch.randn(V, r), torch.randn(V, r)
    inputs = MarkovInputs(base, torch.arange(8) * 37, w1, w2, torch.full((8,), temperature), torch.arange(8),
                          torch.zeros(8, dtype=torch.int64))
    ids, logits, _ = run_markov_op(inputs)
    assert ids[:, 0].tolist() == [0] * 8
    expected = base[:, 1] + w2 @ w1[0]  # x_1 = 0 is the previous token of x_2
    torch.testing.assert_close(logits[:, 1], expected, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("temperature", [0.0, 1.0, 0.5])
def test_row_without_mass_reference_agrees_with_the_op(temperature):
    """Found by fuzzing: the reference mapped -inf to -FLT_MAX (nan_to_num without neginf),
    so an all -inf row got a uniform law and drafted e.g. [0, 6, 1, 1] where the op drafts 0."""
    U = torch.full((4, 1, 8), -INF)
    w = torch.zeros(8, 2)
    z = torch.zeros(4, dtype=torch.int64)
    temps = torch.full((4,), temperature)
    op_ids = markov_op(U, z, w, w, temps, z, z, None, None, None)[0]
    for seed in range(3):
        ref_ids = markov_draft_reference(U, z, w, w, temps, z, z, generator=torch.Generator().manual_seed(seed))[0]
        assert ref_ids.tolist() == op_ids.tolist() == [[0]] * 4
    assert bool(markov_probabilities(U[:, 0], temperature or 1.0).isnan().all())
    # Mixed with rows that have mass, through the generic comparison.
    base = torch.randn(6, 2, 8)
    base[::2, 0] = -INF
    base[1, 0, 3] = NAN
    inputs = MarkovInputs(base, torch.arange(6) % 8, torch.randn(8, 2), torch.randn(8, 2), torch.full((6,), temperature),
                          torch.arange(6), torch.zeros(6, dtype=torch.int64))
    ids, _, _ = assert_markov_matches_reference(inputs)
    assert ids[::2, 0].tolist() == [0, 0, 0]


@pytest.mark.parametrize("temperature, layout", [(1.0, "same_tile"), (0.5, "same_tile"), (1.0, "across_tiles")])
def test_positive_inf_entries_share_the_mass(temperature, layout):
    """+inf logits (in U, so also after the bias) are treated as the largest finite value:
    the +inf entries share the row's mass equally and nothing else is drafted."""
    V, n = (300, 5000) if layout == "same_tile" else (5000, 5000)
    infinite = [3, 7] if layout == "same_tile" else [3, 4500]
    row = torch.randn(1, V)
    row[0, infinite] = INF
    w1, w2 = torch.randn(V, 3), torch.randn(V, 3)
    ids, logits, _ = run_markov_op(repeated_markov_inputs(row, 11, w1, w2, temperature, n))
    assert bool(torch.isposinf(logits[0, 0, infinite]).all())
    probs = torch.zeros(V, dtype=torch.float64)
    probs[infinite] = 0.5
    assert_matches_distribution(ids[:, 0], probs)
    assert _single_step(row, 0.0, weights=(w1, w2))[0].item() == infinite[0]


def test_sampled_never_drafts_zero_probability_tokens():
    V, n = 300, 20_000
    row = torch.randn(1, V)
    banned = torch.zeros(V, dtype=torch.bool)
    banned[::3] = True
    row[0, banned] = -INF
    row[0, 1::6] = NAN
    ids, _, _ = run_markov_op(repeated_markov_inputs(row, 4, torch.randn(V, 2), torch.randn(V, 2), 1.0, n))
    assert not bool(banned[ids[:, 0]].any())
    assert not bool(((ids[:, 0] % 6) == 1).any())  # NaN entries carry no probability either


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_nan_inf_sprinkled_batch_is_safe(dtype):
    """Random NaN / +inf / -inf entries in U and whole non-finite rows: no crash, valid ids,
    logits and greedy tokens as the reference's."""
    noisy = non_finite_markov_inputs(dtype)
    for _ in range(2):
        assert_markov_matches_reference(noisy, exact=True)


def test_nan_in_the_weights_does_not_crash():
    inputs = make_markov_inputs(9, 3, 500, 6, temperature=MIXED, seed=18)
    w1, w2 = inputs.markov_w1.clone(), inputs.markov_w2.clone()
    w1[::7, 2] = NAN
    w2[::5, 1] = INF
    outputs = run_markov_op(with_replaced(inputs, markov_w1=w1, markov_w2=w2))
    check_markov_output_format(inputs, *outputs)


# --------------------------------------------------------------------------- bad input


def _valid(device: str = "cpu") -> MarkovInputs:
    # B = 3, K = 2, V = 10, r = 4, with confidence.
    return make_markov_inputs(3, 2, 10, 4, temperature=[1.0, 0.0, 0.5], confidence=True, seed=19, device=device)


def _subject(pattern: str) -> str:
    """The message starts with the op name and then names the argument."""
    return rf"^dspark::markov_draft: {pattern}"


# (case id, function inputs -> bad inputs, regex the message's first line must match)
BAD_INPUTS = [
    # base_logits
    ("base_2d", lambda m: with_replaced(m, base_logits=m.base_logits[:, 0]), _subject("base_logits")),
    ("base_4d", lambda m: with_replaced(m, base_logits=m.base_logits[None]), _subject("base_logits")),
    ("base_int", lambda m: with_replaced(m, base_logits=m.base_logits.to(torch.int32)), _subject("base_logits")),
    ("base_float64", lambda m: with_replaced(m, base_logits=m.base_logits.double()), _subject("base_logits")),
    ("base_empty_vocab", lambda m: with_replaced(m, base_logits=torch.randn(3, 2, 0)), _subject("base_logits")),
    # prev_token_ids
    ("prev_int32", lambda m: with_replaced(m, prev_token_ids=m.prev_token_ids.to(torch.int32)),
     _subject("prev_token_ids")),
    ("prev_float", lambda m: with_replaced(m, prev_token_ids=m.prev_token_ids.float()), _subject("prev_token_ids")),
    ("prev_2d", lambda m: with_replaced(m, prev_token_ids=m.prev_token_ids[None]), _subject("prev_token_ids")),
    ("prev_size", lambda m: with_replaced(m, prev_token_ids=torch.zeros(4, dtype=torch.int64)),
     _subject("prev_token_ids")),
    ("prev_negative", lambda m: with_replaced(m, prev_token_ids=torch.tensor([1, -1, 2])), _subject("prev_token_ids")),
    ("prev_too_large", lambda m: with_replaced(m, prev_token_ids=torch.tensor([1, 2, 10])), _subject("prev_token_ids")),
    ("prev_huge", lambda m: with_replaced(m, prev_token_ids=torch.tensor([2**40, 2, 3])), _subject("prev_token_ids")),
    # markov_w1
    ("w1_1d", lambda m: with_replaced(m, markov_w1=m.markov_w1[:, 0]), _subject("markov_w1")),
    ("w1_3d", lambda m: with_replaced(m, markov_w1=m.markov_w1[None]), _subject("markov_w1")),
    ("w1_float64", lambda m: with_replaced(m, markov_w1=m.markov_w1.double(), markov_w2=m.markov_w2.double()),
     _subject("markov_w1")),
    ("w1_bf16_with_fp32_logits", lambda m: with_replaced(m, markov_w1=m.markov_w1.bfloat16(),
                                                         markov_w2=m.markov_w2.bfloat16()), _subject("markov_w1")),
    ("w1_vocab", lambda m: with_replaced(m, markov_w1=torch.randn(11, 4)), _subject("markov_w1")),
    ("w1_rank_0", lambda m: with_replaced(m, markov_w1=torch.randn(10, 0), markov_w2=torch.randn(10, 0),
                                          conf_w_prev=None), _subject("markov_w1")),
    # markov_w2
    ("w2_1d", lambda m: with_replaced(m, markov_w2=m.markov_w2[:, 0]), _subject("markov_w2")),
    ("w2_dtype_mismatch", lambda m: with_replaced(m, markov_w2=m.markov_w2.half()), _subject(r"markov_w2.*dtype")),
    ("w2_vocab", lambda m: with_replaced(m, markov_w2=torch.randn(9, 4)), _subject("markov_w2")),
    ("w2_rank", lambda m: with_replaced(m, markov_w2=torch.randn(10, 5)), _subject("markov_w2")),
    ("w2_transposed_shape", lambda m: with_replaced(m, markov_w2=torch.randn(4, 10)), _subject("markov_w2")),
    # temperature
    ("temperature_float64", lambda m: with_replaced(m, temperature=m.temperature.double()), _subject("temperature")),
    ("temperature_size", lambda m: with_replaced(m, temperature=torch.ones(4)), _subject("temperature")),
    ("temperature_2d", lambda m: with_replaced(m, temperature=m.temperature[None]), _subject("temperature")),
    ("temperature_negative", lambda m: with_replaced(m, temperature=torch.tensor([1.0, -0.5, 1.0])),
     _subject("temperature")),
    ("temperature_nan", lambda m: with_replaced(m, temperature=torch.tensor([1.0, 0.0, NAN])), _subject("temperature")),
    ("temperature_inf", lambda m: with_replaced(m, temperature=torch.tensor([INF, 0.0, 1.0])), _subject("temperature")),
    # seed / offset
    ("seed_int32", lambda m: with_replaced(m, seed=m.seed.to(torch.int32)), _subject("seed")),
    ("seed_size", lambda m: with_replaced(m, seed=m.seed[:2]), _subject("seed")),
    ("seed_2d", lambda m: with_replaced(m, seed=m.seed[None]), _subject("seed")),
    ("offset_int32", lambda m: with_replaced(m, offset=m.offset.to(torch.int32)), _subject("offset")),
    ("offset_float", lambda m: with_replaced(m, offset=m.offset.float()), _subject("offset")),
    ("offset_size", lambda m: with_replaced(m, offset=torch.zeros(5, dtype=torch.int64)), _subject("offset")),
    # conf_base
    ("conf_base_float64", lambda m: with_replaced(m, conf_base=m.conf_base.double()), _subject("conf_base")),
    ("conf_base_bf16", lambda m: with_replaced(m, conf_base=m.conf_base.bfloat16()), _subject("conf_base")),
    ("conf_base_1d", lambda m: with_replaced(m, conf_base=m.conf_base[:, 0]), _subject("conf_base")),
    ("conf_base_rows", lambda m: with_replaced(m, conf_base=torch.randn(4, 2)), _subject("conf_base")),
    ("conf_base_positions", lambda m: with_replaced(m, conf_base=torch.randn(3, 3)), _subject("conf_base")),
    # conf_w_prev
    ("conf_w_prev_float64", lambda m: with_replaced(m, conf_w_prev=m.conf_w_prev.double()), _subject("conf_w_prev")),
    ("conf_w_prev_2d", lambda m: with_replaced(m, conf_w_prev=m.conf_w_prev[None]), _subject("conf_w_prev")),
    ("conf_w_prev_rank", lambda m: with_replaced(m, conf_w_prev=torch.randn(5)), _subject("conf_w_prev")),
    ("conf_w_prev_without_conf_base", lambda m: with_replaced(m, conf_base=None, conf_temperature=None),
     _subject("conf_w_prev")),
    # conf_temperature
    ("conf_temperature_float64", lambda m: with_replaced(m, conf_temperature=m.conf_temperature.double()),
     _subject("conf_temperature")),
    ("conf_temperature_2d", lambda m: with_replaced(m, conf_temperature=m.conf_temperature[None]),
     _subject("conf_temperature")),
    ("conf_temperature_size", lambda m: with_replaced(m, conf_temperature=torch.ones(3)), _subject("conf_temperature")),
    ("conf_temperature_without_conf_base", lambda m: with_replaced(m, conf_base=None, conf_w_prev=None),
     _subject(".*conf_temperature")),
    ("conf_temperature_zero", lambda m: with_replaced(m, conf_temperature=torch.tensor([1.0, 0.0])),
     _subject("conf_temperature")),
    ("conf_temperature_negative", lambda m: with_replaced(m, conf_temperature=torch.tensor([-1.0, 1.0])),
     _subject("conf_temperature")),
    ("conf_temperature_nan", lambda m: with_replaced(m, conf_temperature=torch.tensor([1.0, NAN])),
     _subject("conf_temperature")),
    ("conf_temperature_inf", lambda m: with_replaced(m, conf_temperature=torch.tensor([INF, 1.0])),
     _subject("conf_temperature")),
]

#: Cases that need the tensors' values: checked on the host for CPU only; CUDA handles them
#: on the device instead (tests/test_markov_draft_cuda.py).
VALUE_CASES = {
    "prev_negative", "prev_too_large", "prev_huge", "temperature_negative", "temperature_nan", "temperature_inf",
    "conf_temperature_zero", "conf_temperature_negative", "conf_temperature_nan", "conf_temperature_inf",
}
STRUCTURAL_CASES = [c for c in BAD_INPUTS if c[0] not in VALUE_CASES]


def test_valid_inputs_are_valid():
    inputs = _valid()
    check_markov_output_format(inputs, *run_markov_op(inputs))


@pytest.mark.parametrize("mutate, pattern", [c[1:] for c in BAD_INPUTS], ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_raises_naming_the_argument(mutate, pattern):
    bad = mutate(_valid())
    with pytest.raises(RuntimeError, match=r"dspark::markov_draft") as info:
        markov_op(*bad.args())
    first_line = str(info.value).splitlines()[0]
    assert re.search(pattern, first_line), f"message does not name the argument ({pattern}): {info.value}"


def test_bad_input_through_the_python_wrapper():
    bad = with_replaced(_valid(), seed=torch.zeros(3, dtype=torch.int32))
    with pytest.raises(RuntimeError, match="seed"):
        dspark_ext.markov_draft(*bad.args())


def test_python_wrapper_matches_the_op():
    inputs = _valid()
    _assert_same_outputs(dspark_ext.markov_draft(*inputs.args()), run_markov_op(inputs))
    no_confidence = with_replaced(inputs, conf_base=None, conf_w_prev=None, conf_temperature=None)
    _assert_same_outputs(dspark_ext.markov_draft(*no_confidence.args()[:7]), run_markov_op(no_confidence))


# --------------------------------------------------------------------------- opcheck, torch.compile

# (case id, make_markov_inputs keyword arguments)
OPCHECK_CASES = [
    ("sampled_confidence", dict(num_requests=4, num_draft=3, vocab_size=300, rank=5, temperature=1.0, confidence=True)),
    ("greedy_no_confidence", dict(num_requests=3, num_draft=2, vocab_size=2100, rank=8, temperature=0.0)),
    ("mixed_bf16_fp32_weights", dict(num_requests=9, num_draft=2, vocab_size=257, rank=3, dtype=torch.bfloat16,
                                     weight_dtype=torch.float32, temperature=MIXED, confidence=True,
                                     conf_w_prev=False)),
    ("fp16_confidence_no_sts", dict(num_requests=2, num_draft=4, vocab_size=64, rank=16, dtype=torch.float16,
                                    temperature=[0.0, 0.8], confidence=True, conf_temperature=False)),
]


@pytest.mark.parametrize("kwargs", [c[1] for c in OPCHECK_CASES], ids=[c[0] for c in OPCHECK_CASES])
def test_opcheck(kwargs):
    inputs = make_markov_inputs(seed=20, **kwargs)
    torch.library.opcheck(markov_op, inputs.args())


def test_fake_kernel_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    for confidence in (False, True):
        inputs = make_markov_inputs(3, 4, 100, 6, dtype=torch.bfloat16, temperature=1.0, confidence=confidence, seed=21)
        real = run_markov_op(inputs)
        with FakeTensorMode() as mode:
            fake = markov_op(*(None if a is None else mode.from_tensor(a) for a in inputs.args()))
        for r, f in zip(real, fake):
            assert r.shape == f.shape and r.dtype == f.dtype and r.device == f.device


def test_torch_compile_fullgraph_matches_eager():
    torch._dynamo.reset()
    compiled = torch.compile(markov_step, fullgraph=True)
    for seed in (22, 23):  # the second call reuses the graph with new values
        inputs = make_markov_inputs(6, 3, 700, 8, temperature=[1.0, 0.0, 0.8, 1.2, 0.0, 2.0], confidence=True,
                                    seed=seed)
        args = inputs.args()[:9]
        expected = markov_step(*args)
        got = compiled(*args)
        for e, g in zip(expected, got):
            assert e.dtype == g.dtype and e.shape == g.shape
            assert torch.equal(e, g)


# --------------------------------------------------------------------------- reference sanity


def test_law_helper_matches_hand_computation():
    """markov_sequence_law on K = 2, V = 3 against a hand-written product of softmaxes."""
    rows = torch.tensor([[0.0, 1.0, -1.0], [0.5, 0.0, 0.2]])
    w1 = torch.tensor([[1.0], [0.0], [-1.0]])
    w2 = torch.tensor([[2.0], [0.0], [1.0]])
    law = markov_sequence_law(rows, 0, w1, w2, 1.0)
    p0 = torch.softmax(rows[0].double() + torch.tensor([2.0, 0.0, 1.0], dtype=torch.float64), -1)
    for x1 in range(3):
        p1 = torch.softmax(rows[1].double() + w2[:, 0].double() * float(w1[x1, 0]), -1)
        for x2 in range(3):
            assert abs(float(law[x1 * 3 + x2]) - float(p0[x1] * p1[x2])) < 1e-6
    assert torch.equal(sequence_codes(torch.tensor([[2, 1], [0, 0]]), 3), torch.tensor([7, 0]))
    assert abs(float(markov_probabilities(rows[0], 1.0).sum()) - 1) < 1e-12
