"""dspark::verify on CPU: greedy exactness against the reference, output format,
determinism, batch invariance, seed/offset streams, NaN/inf robustness."""

import pytest
import torch

from dspark_ext.reference import greedy_tokens, verify_reference
from helpers import (
    FLOAT_DTYPES,
    GREEDY_CASES,
    ID_DTYPES,
    assert_batch_invariant,
    assert_deterministic,
    assert_greedy_matches_reference,
    assert_matches_distribution,
    check_output_format,
    fraction_rows_differ,
    greedy_case_batch,
    greedy_case_id,
    make_batch,
    repeated_request_batch,
    run_op,
    run_reference,
    sampled_stream_batch,
    verify_op,
    with_replaced,
)

INF, NAN = float("inf"), float("nan")


# --------------------------------------------------------------------------- greedy


@pytest.mark.parametrize("case", GREEDY_CASES, ids=greedy_case_id)
def test_greedy_matches_reference(case):
    batch = greedy_case_batch(case)
    assert_greedy_matches_reference(batch)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("id_dtype", ID_DTYPES, ids=str)
@pytest.mark.parametrize("strided", [False, True], ids=["dense", "strided"])
def test_greedy_dtypes_and_layouts(dtype, id_dtype, strided):
    lengths = [3, 0, 2, 6, 1, 0, 4, 2, 5, 1]
    batch = make_batch(lengths, 4099, dtype=dtype, id_dtype=id_dtype, strided=strided, seed=3, logit_scale=2.0)
    output, num_accepted = run_op(batch)
    # The construction must exercise both decisions, otherwise the comparison proves little.
    assert 0 < int(num_accepted.sum()) < sum(lengths)
    assert_greedy_matches_reference(batch)


def test_greedy_accepts_and_rejects_exactly():
    """Hand-built request: accept, accept, reject -> correction = argmax, then padding."""
    V = 10
    target = torch.full((4, V), -1.0)
    target[0, 3] = 5.0
    target[1, 7] = 5.0
    target[2, 1] = 5.0  # the draft says 2: rejected, the correction is 1
    target[3, 9] = 5.0
    args = (target, torch.tensor([3, 7, 2]), None, torch.tensor([0, 3], dtype=torch.int32),
            torch.zeros(1), torch.tensor([5]), torch.tensor([0]), 4)
    output, num_accepted = verify_op(*args)
    assert output.tolist() == [[3, 7, 1, -1, -1]]
    assert num_accepted.tolist() == [2]
    # All accepted: the bonus is the argmax of the last row.
    output, num_accepted = verify_op(target, torch.tensor([3, 7, 1]), *args[2:])
    assert output.tolist() == [[3, 7, 1, 9, -1]]
    assert num_accepted.tolist() == [3]


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_greedy_ties_take_first_index_across_tiles(dtype):
    V = 3 * 2048 + 5
    target = torch.zeros(2, V, dtype=dtype)
    for col in (6000, 2500, 4097):  # equal maxima in three tiles: the lowest id wins
        target[0, col] = 4.0
    target[1, V - 1] = 4.0
    target[1, V - 3] = 4.0
    output, _ = verify_op(target, torch.tensor([2500]), None, torch.tensor([0, 1], dtype=torch.int32),
                          torch.zeros(1), torch.tensor([0]), torch.tensor([0]), 1)
    assert output.tolist() == [[2500, V - 3]]
    output, _ = verify_op(target, torch.tensor([4097]), None, torch.tensor([0, 1], dtype=torch.int32),
                          torch.zeros(1), torch.tensor([0]), torch.tensor([0]), 1)
    assert output.tolist() == [[2500, -1]]


@pytest.mark.parametrize("draft_logits", [False, True], ids=["one_hot", "draft_logits"])
def test_mixed_greedy_and_sampled_batch(draft_logits):
    temps = [0.0, 1.0, 0.0, 0.7, 0.0, 2.0, 0.0, 0.0, 1.3, 0.0, 0.5, 0.0]
    lengths = [3, 2, 0, 4, 5, 1, 2, 0, 3, 6, 2, 1]
    batch = make_batch(lengths, 3001, temperature=temps, draft_logits=draft_logits, strided=True, seed=5)
    assert_greedy_matches_reference(batch)  # compares the greedy rows only
    output, num_accepted = run_op(batch)
    # Greedy rows do not depend on the seed; sampled rows are valid whatever they are.
    reseeded = with_replaced(batch, seed=batch.seed + 1, offset=batch.offset + 7)
    output2, num_accepted2 = run_op(reseeded)
    greedy = batch.temperature == 0
    assert torch.equal(output[greedy], output2[greedy]) and torch.equal(num_accepted[greedy], num_accepted2[greedy])
    check_output_format(reseeded, output2, num_accepted2)


def test_larger_max_num_draft_pads_with_minus_one():
    batch = make_batch([2, 0, 1], 100, max_num_draft=6, seed=1)
    output, num_accepted = run_op(batch)
    assert output.shape == (3, 7)
    check_output_format(batch, output, num_accepted)
    assert_greedy_matches_reference(batch)


def test_empty_batch():
    target = torch.zeros(0, 10)
    output, num_accepted = verify_op(target, torch.zeros(0, dtype=torch.int64), None, torch.zeros(1, dtype=torch.int32),
                                     torch.zeros(0), torch.zeros(0, dtype=torch.int64), torch.zeros(0, dtype=torch.int64), 3)
    assert output.shape == (0, 4) and output.dtype == torch.int64
    assert num_accepted.shape == (0,) and num_accepted.dtype == torch.int32


def test_non_unit_vocab_stride_is_accepted():
    """A transposed (column-major) logits tensor is copied by the op: same result."""
    batch = make_batch([2, 3, 0, 1], 777, temperature=[0.0, 1.0, 0.0, 0.8], draft_logits=True, seed=2)
    column_major = batch.target_logits.t().contiguous().t()
    draft_column_major = batch.draft_logits.t().contiguous().t()
    assert column_major.stride(1) != 1
    expected = run_op(batch)
    got = run_op(with_replaced(batch, target_logits=column_major, draft_logits=draft_column_major))
    assert torch.equal(expected[0], got[0]) and torch.equal(expected[1], got[1])


# --------------------------------------------------------------------------- determinism, streams


@pytest.mark.parametrize("draft_logits", [False, True], ids=["one_hot", "draft_logits"])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_deterministic(draft_logits, dtype):
    batch = make_batch([2, 5, 0, 3, 1, 4] * 4, 2500, temperature=[1.0, 0.0, 0.6, 1.5] * 6, draft_logits=draft_logits,
                       dtype=dtype, seed=8)
    assert_deterministic(batch)


@pytest.mark.parametrize("draft_logits", [False, True], ids=["one_hot", "draft_logits"])
def test_batch_invariance(draft_logits):
    lengths = [3, 0, 2, 5, 1, 4, 0, 2]
    temps = [1.0, 0.8, 0.0, 1.2, 2.0, 1.0, 0.5, 0.0]
    batch = make_batch(lengths, 4500, temperature=temps, draft_logits=draft_logits, max_num_draft=6,
                       logit_scale=1.0, draft_noise=2.0, seed=9)
    assert_batch_invariant(batch)


def test_batch_invariance_same_request_everywhere():
    """One request repeated at every slot of a batch (same seed/offset) emits the same row;
    the batch mixes in other requests, so the repeats sit at different row offsets."""
    base = make_batch([3, 1, 0, 2, 4], 1500, temperature=1.0, draft_logits=True, logit_scale=0.7, seed=10)
    batch = base.select([0, 1, 0, 2, 0, 3, 4, 0])
    output, num_accepted = run_op(batch)
    for slot in (2, 4, 7):
        assert torch.equal(output[slot], output[0])
        assert num_accepted[slot] == num_accepted[0]


@pytest.mark.parametrize("field", ["offset", "seed"])
@pytest.mark.parametrize("draft_logits", [False, True], ids=["one_hot", "draft_logits"])
def test_offset_and_seed_change_the_stream(field, draft_logits):
    batch = sampled_stream_batch(draft_logits=draft_logits)
    output, _ = run_op(batch)
    changed = with_replaced(batch, **{field: getattr(batch, field) + 1})
    output2, num_accepted2 = run_op(changed)
    check_output_format(changed, output2, num_accepted2)
    assert fraction_rows_differ(output, output2) > 0.5
    # ...while the same values give the same rows.
    assert torch.equal(run_op(with_replaced(changed, **{field: getattr(batch, field)}))[0], output)


def test_requests_with_distinct_offsets_are_independent_streams():
    """Same logits, same seed, offsets 0..N-1: the emitted tokens are spread, not copies."""
    V = 64
    rows = torch.randn(1, V) * 0.3
    batch = repeated_request_batch(rows, None, torch.zeros(4000, 0, dtype=torch.int64), 1.0,
                                   seed=torch.full((4000,), 1234), offset=torch.arange(4000), broadcast=True)
    output, _ = run_op(batch)
    assert_matches_distribution(output[:, 0], torch.softmax(rows[0].double(), -1))


def test_greedy_ignores_seed_and_offset():
    batch = make_batch([2, 3, 1, 0], 900, seed=4)
    expected = run_op(batch)
    got = run_op(with_replaced(batch, seed=batch.seed * 3 + 1, offset=batch.offset + 99))
    assert torch.equal(expected[0], got[0])


# --------------------------------------------------------------------------- NaN / inf


def _single(row_logits, draft_ids, temperature, draft_logits=None, seed=0):
    rows = torch.as_tensor(row_logits, dtype=torch.float32)
    n = len(draft_ids)
    return verify_op(rows, torch.tensor(draft_ids, dtype=torch.int64), draft_logits,
                     torch.tensor([0, n], dtype=torch.int32), torch.tensor([temperature]),
                     torch.tensor([seed]), torch.tensor([0]), max(n, 1))


@pytest.mark.parametrize(
    "row, expected",
    [
        ([1.0, NAN, 0.5, NAN], 0),  # torch.argmax would answer 1
        ([NAN, NAN, NAN, NAN], 0),  # no finite logit
        ([-INF, -INF, -INF, -INF], 0),
        ([NAN, -INF, NAN, -INF], 0),
        ([-INF, 2.0, INF, INF], 2),  # +inf is the largest; first of equals
        ([NAN, INF, NAN, 3.0], 1),
        ([-INF, NAN, -2.0, -3.0], 2),
    ],
)
def test_greedy_nan_inf_rules(row, expected):
    rows = torch.tensor([row])
    output, num_accepted = _single(rows, [], 0.0)
    assert output[0, 0].item() == expected
    assert greedy_tokens(rows)[0].item() == expected  # the reference implements the same rule


def test_greedy_nan_rule_across_tiles():
    V = 5000
    row = torch.randn(1, V)
    row[0, 10] = NAN
    row[0, 4500] = 50.0
    row[0, 100] = NAN
    assert _single(row, [], 0.0)[0][0, 0].item() == 4500
    row[0, 4500] = INF
    row[0, 4999] = INF
    assert _single(row, [], 0.0)[0][0, 0].item() == 4500
    row[0, 2100] = INF
    assert _single(row, [], 0.0)[0][0, 0].item() == 2100


@pytest.mark.parametrize("draft_kind", ["one_hot", "draft_logits", "bonus"])
def test_sampled_row_without_finite_logit_emits_token_zero(draft_kind):
    """Documented: a row with no finite logit emits token 0 (whatever the draft)."""
    V = 10
    rows = torch.full((2, V), NAN)
    rows[0, :3] = -INF
    for seed in range(5):
        if draft_kind == "bonus":
            output, n = _single(rows[:1], [], 1.0, seed=seed)
        else:
            draft_logits = torch.randn(1, V) if draft_kind == "draft_logits" else None
            output, n = _single(rows, [5], 1.0, draft_logits=draft_logits, seed=seed)
        assert n.tolist() == [0]
        assert output[0, 0].item() == 0, f"seed {seed}: emitted {output[0].tolist()}"


def test_sampled_never_emits_zero_probability_tokens():
    V, N = 300, 20000
    row = torch.randn(1, V)
    banned = torch.zeros(V, dtype=torch.bool)
    banned[::3] = True
    row[0, banned] = -INF
    row[0, 1::6] = NAN
    batch = repeated_request_batch(row, None, torch.zeros(N, 0, dtype=torch.int64), 1.0, broadcast=True)
    output, _ = run_op(batch)
    emitted = output[:, 0]
    assert not bool(banned[emitted].any())
    assert not bool(((emitted % 6) == 1).any())  # NaN entries carry no probability either


@pytest.mark.parametrize("layout", ["same_tile", "across_tiles"])
def test_positive_inf_entries_share_the_mass(layout):
    """Documented: +inf logits are treated as the largest finite value, so several +inf
    entries share the row's mass equally (bonus sampling, T = 1)."""
    V, N = 5000, 20000
    infinite = [3, 7] if layout == "same_tile" else [3, 4500]
    row = torch.randn(1, V)
    row[0, infinite] = INF
    batch = repeated_request_batch(row, None, torch.zeros(N, 0, dtype=torch.int64), 1.0, broadcast=True)
    output, _ = run_op(batch)
    emitted = output[:, 0]
    assert bool(torch.isin(emitted, torch.tensor(infinite)).all())
    probs = torch.zeros(V, dtype=torch.float64)
    probs[infinite] = 0.5
    assert_matches_distribution(emitted, probs)


def test_one_hot_draft_on_one_of_two_positive_inf_entries_is_accepted_half_the_time():
    """p(x) = 1/2 when x is one of two +inf entries: accept with probability 1/2."""
    V, N = 16, 20000
    rows = torch.zeros(2, V)
    rows[0, [2, 9]] = INF
    batch = repeated_request_batch(rows, None, torch.full((N, 1), 2, dtype=torch.int64), 1.0)
    output, num_accepted = run_op(batch)
    probs = torch.zeros(V, dtype=torch.float64)
    probs[[2, 9]] = 0.5
    assert_matches_distribution(output[:, 0], probs)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("draft_logits", [False, True], ids=["one_hot", "draft_logits"])
def test_nan_inf_sprinkled_batch_is_safe(dtype, draft_logits):
    """Random NaN / +inf / -inf entries and whole non-finite rows: no crash, valid ids,
    greedy rows still equal the reference."""
    lengths = [2, 0, 4, 1, 3, 5, 0, 2, 1, 3]
    temps = [0.0, 1.0, 0.0, 0.7, 1.0, 0.0, 2.0, 0.0, 1.0, 0.5]
    batch = make_batch(lengths, 2100, dtype=dtype, temperature=temps, draft_logits=draft_logits, seed=12)
    g = torch.Generator().manual_seed(13)

    def sprinkle(t):
        t = t.clone()
        u = torch.rand(t.shape, generator=g)
        t[u < 0.1] = NAN
        t[(u >= 0.1) & (u < 0.12)] = -INF
        t[(u >= 0.12) & (u < 0.1203)] = INF
        t[3] = NAN  # whole rows
        t[7] = -INF
        t[9, :1000] = NAN
        return t

    target = sprinkle(batch.target_logits)
    drafts = None if batch.draft_logits is None else sprinkle(batch.draft_logits)
    noisy = with_replaced(batch, target_logits=target, draft_logits=drafts)
    for _ in range(2):
        output, num_accepted = run_op(noisy)
        check_output_format(noisy, output, num_accepted)
    assert_greedy_matches_reference(noisy)


def test_draft_logits_with_nan_at_the_draft_token_rejects():
    """q(x) is NaN -> treated as probability 0 -> the draft is always rejected."""
    V, N = 12, 3000
    rows = torch.randn(2, V)
    draft = torch.randn(1, V)
    draft[0, 4] = NAN
    batch = repeated_request_batch(rows, draft, torch.full((N, 1), 4, dtype=torch.int64), 1.0)
    output, num_accepted = run_op(batch)
    assert int(num_accepted.sum()) == 0
    check_output_format(batch, output, num_accepted)


# --------------------------------------------------------------------------- reference sanity


def test_reference_matches_hand_computed_greedy():
    target = torch.tensor([[0.0, 2.0, 1.0], [3.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    output, num_accepted = verify_reference(target, torch.tensor([1, 0]), None, torch.tensor([0, 2], dtype=torch.int32),
                                            torch.zeros(1), torch.zeros(1, dtype=torch.int64),
                                            torch.zeros(1, dtype=torch.int64), 3)
    assert output.tolist() == [[1, 0, 2, -1]]
    assert num_accepted.tolist() == [2]


def test_reference_respects_its_generator():
    batch = make_batch([2, 3, 1] * 20, 50, temperature=1.0, draft_logits=True, seed=14)
    a = run_reference(batch, seed=1)
    b = run_reference(batch, seed=1)
    c = run_reference(batch, seed=2)
    assert torch.equal(a[0], b[0]) and not torch.equal(a[0], c[0])
    check_output_format(batch, *a)


# --------------------------------------------------------------------------- rows after a rejection


@pytest.mark.parametrize("draft_logits", [False, True], ids=["one_hot", "draft_logits"])
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_rows_after_the_first_rejection_change_nothing(draft_logits, temperature):
    """Whatever the rows after a request's first rejection hold (NaN, +inf, other values), every
    output is the same (the contract: they cannot matter). That the CPU kernel does not even
    read them is checked by the two tests below."""
    batch = make_batch([5, 3, 6, 0, 4, 2] * 3, 4500, temperature=temperature, draft_logits=draft_logits,
                       logit_scale=1.0, draft_noise=2.0, seed=21)
    output, num_accepted = run_op(batch)
    assert (num_accepted < torch.tensor(batch.lengths)).sum() >= 6  # many requests reject early
    target = batch.target_logits.clone()
    draft = None if batch.draft_logits is None else batch.draft_logits.clone()
    cu = batch.cu_num_draft.tolist()
    g = torch.Generator().manual_seed(5)
    changed = 0
    for b, accepted in enumerate(num_accepted.tolist()):
        for k in range(accepted + 1, batch.lengths[b] + 1):  # past the emitted row
            target[cu[b] + b + k] = torch.where(torch.rand(target.shape[1], generator=g) < 0.5, NAN, INF)
            if draft is not None and k < batch.lengths[b]:
                draft[cu[b] + k] = torch.randn(draft.shape[1], generator=g) * 50
            changed += 1
    assert changed >= 20
    output2, num_accepted2 = run_op(with_replaced(batch, target_logits=target, draft_logits=draft))
    assert torch.equal(output2, output) and torch.equal(num_accepted2, num_accepted)


_RUN_WITH_POISONED_SCRATCH = r"""
import sys, torch, dspark_ext
batches = torch.load(sys.argv[1])
torch.save([torch.ops.dspark.verify(*args) for args in batches], sys.argv[2])
"""


def test_no_stage_reads_a_row_no_wave_computed(tmp_path):
    """With DSPARK_VERIFY_POISON_SCRATCH the kernel's scratch starts as 0xFF bytes (NaN stats,
    -1 ids): a stage that read the summary or tile stats of a row after a request's first
    rejection would decide on NaN. Every output equals the run with ordinary scratch."""
    import subprocess
    import sys

    batches = []
    for draft_logits in (False, True):
        batches.append(make_batch([5, 3, 6, 0, 4, 2] * 3, 4500, temperature=[0.0, 1.0, 0.7] * 6,
                                  draft_logits=draft_logits, logit_scale=1.0, draft_noise=2.0, seed=23))
    args = [b.args() for b in batches]
    expected = [run_op(b) for b in batches]
    assert sum(int((e[1] < torch.tensor(b.lengths)).sum()) for e, b in zip(expected, batches)) >= 12
    torch.save(args, tmp_path / "in.pt")
    subprocess.run([sys.executable, "-c", _RUN_WITH_POISONED_SCRATCH, str(tmp_path / "in.pt"), str(tmp_path / "out.pt")],
                   env={"DSPARK_VERIFY_POISON_SCRATCH": "1", "PATH": "/usr/bin:/bin"}, check=True, timeout=300)
    for (out, acc), (out2, acc2) in zip(expected, torch.load(tmp_path / "out.pt")):
        assert torch.equal(out, out2) and torch.equal(acc, acc2)


def test_stage_ranges_show_one_wave_per_reached_position():
    """tile_stats runs once per draft position some request still reaches: one wave when every
    first draft is rejected, K + 1 when every draft is accepted (torch.profiler ranges)."""
    from torch.profiler import ProfilerActivity, profile

    def waves(batch) -> int:
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            run_op(batch)
        return sum(e.count for e in prof.key_averages() if e.key == "dspark::verify/tile_stats")

    vocab, K = 3000, 4
    target = torch.zeros(3 * (K + 1), vocab)
    accepted_ids = torch.arange(3 * K) % vocab + 1
    rows = torch.arange(3 * K) + torch.arange(3).repeat_interleave(K)
    target[rows, accepted_ids] = 10.0  # the greedy argmax of every draft row is its draft
    batch = make_batch([K] * 3, vocab, temperature=0.0, seed=0)
    all_accepted = with_replaced(batch, target_logits=target, draft_token_ids=accepted_ids)
    assert run_op(all_accepted)[1].tolist() == [K] * 3
    assert waves(all_accepted) == K + 1
    first_rejected = with_replaced(all_accepted, draft_token_ids=accepted_ids + 1)
    assert run_op(first_rejected)[1].tolist() == [0] * 3
    assert waves(first_rejected) == 1
