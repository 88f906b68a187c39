"""dspark::schedule on CPU (DSpark Algorithm 1): bitwise agreement with the line-by-line
reference and with the torch-ops scheduler ``schedule_eager`` (random, tied, near-tied,
strided and large inputs), the fixed-point tau, the appendix A counterexample, when the early
stop finds the global optimum (and when it does not), edge cases, determinism and batch
order, torch.compile, and the asynchronous scheduler ``schedule_async``.
End-to-end losslessness: tests/test_schedule_lossless.py. CUDA: tests/test_schedule_cuda.py.
Malformed arguments: tests/test_bad_input.py; opcheck: tests/test_opcheck.py."""

import pytest
import torch

import dspark_ext
from dspark_ext.reference import schedule_async_reference, schedule_reference
from dspark_ext.scheduling import schedule_async, schedule_eager, survival_probabilities
from helpers import (
    ScheduleInputs,
    brute_force_best_throughput,
    check_schedule_output,
    make_schedule_inputs,
    near_tie_schedule_inputs,
    random_confidence,
    random_sps,
    raw_schedule_inputs,
    run_schedule_op,
    schedule_op,
    schedule_throughput,
)


def _i32(values):
    return torch.tensor(values, dtype=torch.int32)


def _f32(values):
    return torch.tensor(values, dtype=torch.float32)


def _candidates(inputs: ScheduleInputs) -> int:
    """Number of candidates (a > 0 within the cap) Algorithm 1 could admit, budget aside."""
    return int((survival_probabilities(inputs.confidence, inputs.max_len) > 0).sum())


def assert_all_agree(inputs: ScheduleInputs, *, reference: bool = True) -> torch.Tensor:
    """op == schedule_eager (== schedule_reference) bitwise; returns the op's output."""
    got = run_schedule_op(inputs)
    check_schedule_output(inputs, got)
    eager = schedule_eager(*inputs.args())
    assert torch.equal(got, eager), f"op {got.tolist()} != schedule_eager {eager.tolist()}"
    if reference:
        ref = schedule_reference(*inputs.args())
        assert torch.equal(got, ref), f"op {got.tolist()} != schedule_reference {ref.tolist()}"
    return got


# --------------------------------------------------------------------------- against the references


@pytest.mark.parametrize("max_len", [False, True], ids=["no_max_len", "max_len"])
@pytest.mark.parametrize("ties", [False, True], ids=["continuous", "one_decimal_ties"])
def test_matches_reference_and_eager_on_random_inputs(ties, max_len):
    """R in 1..64, K in 1..32, confidences with exact 0/1 entries (rounded to one decimal for
    exact ties), jagged SPS curves (cliffs, flat stretches, bumps), N in R .. R (K + 1) + 5."""
    stopped_by_theta = differs_from_global_search = admitted_something = 0
    num_cases = 75
    for case in range(num_cases):
        g = torch.Generator().manual_seed(case)
        R, K = int(torch.randint(1, 65, (), generator=g)), int(torch.randint(1, 33, (), generator=g))
        seed = 1000 * case + 10 * ties + max_len
        inputs = make_schedule_inputs(R, K, seed=seed, ties=ties, max_len=max_len)
        try:
            got = assert_all_agree(inputs)
        except AssertionError as e:
            raise AssertionError(f"case {case} (R={R}, K={K}, seed={seed}): {e}") from None
        admitted = int(got.sum())
        admitted_something += admitted > 0
        stopped_by_theta += 0 < admitted < min(_candidates(inputs), inputs.max_batch - R)
        differs_from_global_search += not torch.equal(got, schedule_reference(*inputs.args(), early_stop=False))
    # The random inputs exercise the early stop itself, not just "all" or "nothing".
    assert admitted_something >= 0.7 * num_cases
    assert stopped_by_theta >= 0.5 * num_cases
    assert differs_from_global_search >= 0.2 * num_cases


def test_matches_reference_and_eager_at_near_ties():
    lengths_seen = set()
    for seed in range(200):
        inputs = near_tie_schedule_inputs(seed)
        try:
            got = assert_all_agree(inputs)
        except AssertionError as e:
            raise AssertionError(f"seed {seed}: {e}") from None
        lengths_seen.add(min(int(got.sum()), 3))
    assert lengths_seen == {0, 1, 2, 3}  # the coin flips at the last bit go both ways


def test_exact_theta_tie_is_not_an_improvement():
    """Strictly improves: an exactly equal Theta stops the scan; one ulp more admits."""
    one = _f32([[1.0]])
    assert schedule_op(one, _f32([0.0, 1.0, 0.5]), None).tolist() == [0]  # 2 * 0.5 == 1 * 1
    above = torch.nextafter(_f32(0.5), _f32(1.0)).item()
    assert schedule_op(one, _f32([0.0, 1.0, above]), None).tolist() == [1]
    # R = 2, all survivals 1: Theta = 2, 3 * 0.75 = 2.25, then 4 * 0.5625 = 2.25 (a tie: stop).
    ones = torch.ones(2, 2)
    sps = _f32([0.0, 0.0, 1.0, 0.75, 0.5625])
    assert schedule_op(ones, sps, None).tolist() == [1, 0]
    sps[4] = torch.nextafter(sps[4], _f32(1.0))
    assert schedule_op(ones, sps, None).tolist() == [2, 0]  # ties: lower request, then lower position
    for c, s in [(one, _f32([0.0, 1.0, 0.5])), (ones, sps)]:
        assert_all_agree(ScheduleInputs(c, s))


def test_tau_is_summed_in_truncated_fixed_point():
    """tau grows by trunc(a * 2^40) * 2^-40: a survival below 2^-40 adds nothing, so with a flat
    SPS Theta does not strictly improve (a float64 sum, 1 + 1e-13 > 1, would admit it)."""
    flat = _f32([0.0, 1.0, 1.0])
    assert schedule_op(_f32([[2.0**-40]]), flat, None).tolist() == [1]  # tau = 1 + 2^-40 > 1
    assert schedule_op(_f32([[2.0**-41]]), flat, None).tolist() == [0]
    assert schedule_op(_f32([[1e-13]]), flat, None).tolist() == [0]
    assert schedule_reference(_f32([[1e-13]]), flat, None).tolist() == [0]
    # Such a candidate is still in the candidate space: a rising SPS admits it.
    assert schedule_op(_f32([[1e-13]]), _f32([0.0, 1.0, 1.5]), None).tolist() == [1]
    for c in (2.0**-40, 2.0**-41, 1e-13, 3 * 2.0**-42):
        assert_all_agree(ScheduleInputs(_f32([[c, 0.5]]), flat))


def test_subnormal_survival_is_a_candidate():
    """a = 1e-20 * 1e-20 is a float32 subnormal (not flushed to zero): still a candidate (a > 0)
    that a rising SPS admits, with a zero tau increment."""
    confidence = _f32([[1e-20, 1e-20]])
    survival = survival_probabilities(confidence)
    assert 0.0 < float(survival[0, 1]) < torch.finfo(torch.float32).tiny
    sps = _f32([0.0, 1.0, 2.0, 3.0])
    assert schedule_op(confidence, sps, None).tolist() == [2]
    assert_all_agree(ScheduleInputs(confidence, sps))


@pytest.mark.parametrize("R, K, max_len", [(4096, 32, False), (4096, 32, True), (1000, 8, False), (1000, 8, True),
                                           (16384, 4, True)])  # tau above 2^53 units: rounded to double
def test_large_inputs_match_eager(R, K, max_len):
    """Serving-sized steps against schedule_eager only (the Python reference is slow here):
    smooth SPS curves (thousands of drafts admitted, with and without exact ties) and a jagged one
    (its bumps stop the scan early)."""
    for seed, jagged, ties in [(0, False, False), (1, False, True), (2, True, True)]:
        inputs = make_schedule_inputs(R, K, seed=R + K + seed, max_len=max_len, ties=ties, jagged=jagged)
        got = assert_all_agree(inputs, reference=False)
        if not jagged:
            assert int(got.sum()) > R // 10


def test_strided_inputs_give_the_same_result():
    """A transposed confidence view, sps as every other entry of a buffer (NaN in between) and
    a max_len slice with step 2 are read in place through their strides."""
    for seed in range(20):
        inputs = make_schedule_inputs(13, 7, seed=300 + seed, max_len=seed % 2 == 0, ties=seed % 3 == 0)
        strided = inputs.strided()
        assert not strided.confidence.is_contiguous() and strided.sps.stride(0) == 2
        if strided.max_len is not None:
            assert strided.max_len.stride(0) == 2
        assert torch.equal(run_schedule_op(strided), run_schedule_op(inputs))
        assert_all_agree(strided)
    # Broadcast rows (stride 0): every request has the same confidences.
    row = torch.tensor([[0.9, 0.8, 0.5]])
    broadcast = ScheduleInputs(row.expand(4, 3), random_sps(4, 16, torch.Generator().manual_seed(3), jagged=False))
    assert torch.equal(run_schedule_op(broadcast), run_schedule_op(ScheduleInputs(row.repeat(4, 1), broadcast.sps)))


def test_sps_entries_below_R_are_never_read():
    """Only batch sizes R..N are ever looked up (every request verifies its anchor): entries
    below R may hold anything, NaN and negative values included, without an error."""
    inputs = make_schedule_inputs(5, 4, seed=7, max_len=True)
    expected = run_schedule_op(inputs)
    garbage = inputs.sps.clone()
    garbage[:5] = torch.tensor([float("nan"), -1.0, float("inf"), 0.0, float("-inf")])
    assert torch.equal(schedule_op(inputs.confidence, garbage, inputs.max_len), expected)
    assert torch.equal(schedule_reference(inputs.confidence, garbage, inputs.max_len), expected)
    assert torch.equal(schedule_eager(inputs.confidence, garbage, inputs.max_len), expected)


def test_python_wrapper_matches_the_op():
    inputs = make_schedule_inputs(6, 3, seed=8, max_len=True)
    assert torch.equal(dspark_ext.schedule(*inputs.args()), run_schedule_op(inputs))
    without_max_len = schedule_op(inputs.confidence, inputs.sps, None)
    assert torch.equal(dspark_ext.schedule(inputs.confidence, inputs.sps), without_max_len)


def test_references_agree_on_the_cuda_sanitization_semantics():
    """schedule_reference and schedule_eager both read raw values like the CUDA kernel (NaN
    confidence -> 0, clamped to [0, 1]; max_len clamped to [0, K]; a NaN SPS makes the comparison
    false): they agree on such inputs (the CPU op rejects them, see test_bad_input.py)."""
    for seed in range(40):
        g = torch.Generator().manual_seed(seed)
        R, K = int(torch.randint(1, 9, (), generator=g)), int(torch.randint(1, 6, (), generator=g))
        raw = raw_schedule_inputs(R, K, seed=100 + seed)
        ref = schedule_reference(*raw.args())
        assert torch.equal(schedule_eager(*raw.args()), ref), seed
        # With valid SPS values, the sanitized confidences and caps are valid CPU op inputs that
        # give the same answer.
        sps = make_schedule_inputs(R, K, seed=100 + seed).sps
        assert raw.sps.shape == sps.shape
        clean = ScheduleInputs(torch.nan_to_num(raw.confidence, nan=0.0).clamp(0, 1), sps, raw.max_len.clamp(0, K))
        assert torch.equal(schedule_reference(raw.confidence, sps, raw.max_len), run_schedule_op(clean)), seed


def test_largest_problem_is_accepted():
    """R (K + 1) == 2^22 tokens is the largest allowed problem (test_bad_input.py: one more fails)."""
    R, K = 2**21, 1
    confidence = torch.zeros(1, 1).expand(R, K)
    assert run_schedule_op(ScheduleInputs(confidence, torch.ones(R + 1))).eq(0).all()
    confidence = torch.full((1, 1), 0.5).expand(R, K)
    out = run_schedule_op(ScheduleInputs(confidence, torch.ones(R + 4)))  # 3 drafts: the lowest requests
    assert out[:3].tolist() == [1, 1, 1] and int(out.sum()) == 3


# --------------------------------------------------------------------------- the early stop


def test_appendix_a_counterexample():
    """DSpark appendix A: c_1 = 0.8, c_2 = 0.9 after x_1 = A and 0 after x_1 = B, SPS = (1, 0.5,
    0.45). Theta = 1 (no draft), 1.8 * 0.5 = 0.9 (one), 2.52 * 0.45 = 1.134 (two, after A): the
    early stop drafts nothing whatever x_1 is, the global search drafts 2 after A and 0 after B,
    i.e. it verifies x_1 exactly when x_1 = A (which turns a (0.7, 0.3) target into (0.85, 0.15):
    tests/test_schedule_lossless.py)."""
    sps = _f32([0.0, 1.0, 0.5, 0.45])
    after_a, after_b = _f32([[0.8, 0.9]]), _f32([[0.8, 0.0]])
    for confidence in (after_a, after_b):
        assert schedule_op(confidence, sps, None).tolist() == [0]
        assert schedule_eager(confidence, sps).tolist() == [0]
        assert schedule_reference(confidence, sps).tolist() == [0]
    assert schedule_reference(after_a, sps, early_stop=False).tolist() == [2]
    assert schedule_reference(after_b, sps, early_stop=False).tolist() == [0]


def test_non_increasing_sps_is_not_enough_for_the_global_optimum():
    """A documented limitation: with SPS = (1, 0.5, 0.5) (non-increasing, but the step time
    1 / SPS = (1, 2, 2) is not convex) the greedy path's Theta goes 1, 0.9, 1.26: the early stop
    keeps Theta = 1 with no draft although two drafts give 2.52 * 0.5 = 1.26. The scheduler is
    lossless, not optimal, on such curves (the global search finds 1.26 and leaks)."""
    confidence, sps = _f32([[0.8, 0.9]]), _f32([0.0, 1.0, 0.5, 0.5])
    assert schedule_op(confidence, sps, None).tolist() == [0]
    survival = survival_probabilities(confidence)
    assert schedule_throughput(survival, sps, [0]) == 1.0
    best = brute_force_best_throughput(survival, sps, [2])
    assert best == pytest.approx(2.52 * 0.5) and best > 1.0
    assert schedule_reference(confidence, sps, early_stop=False).tolist() == [2]


@pytest.mark.parametrize("quadratic", [False, True], ids=["affine_step_time", "quadratic_step_time"])
def test_convex_step_time_gives_the_global_optimum(quadratic):
    """SPS(B) = 1 / t(B) with t(B) = t0 + t1 B (+ t2 B^2), convex and increasing: Theta along
    the greedy path is unimodal (concave tau over convex t), and for each batch size the greedy
    prefix has the largest tau, so the early stop is globally optimal. Brute force over every
    length vector (l_1..l_R) in [0..cap]^R with B <= N, R <= 3, K <= 3."""
    nontrivial = 0
    num_cases = 120
    for case in range(num_cases):
        seed = 7000 + 1000 * quadratic + case
        g = torch.Generator().manual_seed(seed)
        R, K = int(torch.randint(1, 4, (), generator=g)), int(torch.randint(1, 4, (), generator=g))
        max_batch = int(torch.randint(R, R * (K + 1) + 4, (), generator=g))
        confidence = random_confidence(R, K, g)
        sps = random_sps(R, max_batch, g, jagged=False, quadratic=quadratic)
        max_len = torch.randint(0, K + 2, (R,), generator=g, dtype=torch.int32) if case % 2 else None
        inputs = ScheduleInputs(confidence, sps, max_len)
        got = assert_all_agree(inputs)
        survival = survival_probabilities(confidence)
        caps = [K] * R if max_len is None else max_len.clamp(0, K).tolist()
        best = brute_force_best_throughput(survival, sps, caps)
        theta = schedule_throughput(survival, sps, got.tolist())
        assert theta >= best * (1 - 1e-12), f"seed {seed}: Theta {theta} < optimum {best} with {got.tolist()}"
        nontrivial += 0 < int(got.sum()) < sum(caps)
    assert nontrivial >= 0.3 * num_cases


# --------------------------------------------------------------------------- edge cases


def test_no_requests():
    for sps in (_f32([1.0]), _f32([0.0, 1.0, 0.5])):
        for K in (0, 3):
            out = schedule_op(torch.empty(0, K), sps, None)
            assert out.shape == (0,) and out.dtype == torch.int32
            assert schedule_op(torch.empty(0, K), sps, torch.empty(0, dtype=torch.int32)).shape == (0,)
            assert torch.equal(schedule_reference(torch.empty(0, K), sps), out)
            assert torch.equal(schedule_eager(torch.empty(0, K), sps), out)


def test_no_draft_positions():
    out = schedule_op(torch.empty(3, 0), _f32([0.0, 1.0, 1.0, 1.0, 1.0]), _i32([1, 0, 5]))
    assert out.dtype == torch.int32 and out.tolist() == [0, 0, 0]
    assert_all_agree(ScheduleInputs(torch.empty(3, 0), _f32([0.0, 1.0, 1.0, 1.0, 1.0])))


def test_batch_of_exactly_R_tokens_admits_nothing():
    """N == R: the anchors fill the batch."""
    inputs = ScheduleInputs(torch.ones(4, 3), _f32([0.0, 0.0, 0.0, 0.0, 1.0]))
    assert assert_all_agree(inputs).tolist() == [0, 0, 0, 0]


def test_all_zero_confidence_admits_nothing():
    inputs = ScheduleInputs(torch.zeros(5, 4), torch.ones(30))
    assert assert_all_agree(inputs).tolist() == [0] * 5
    # A zero in the middle ends the request's candidates.
    assert assert_all_agree(ScheduleInputs(_f32([[0.9, 0.0, 0.9]]), torch.ones(5))).tolist() == [1]


@pytest.mark.parametrize("extra, expected", [(6, [4, 2, 0]), (12, [4, 4, 4]), (100, [4, 4, 4]), (1, [1, 0, 0])])
def test_all_ones_with_constant_sps_fill_the_batch(extra, expected):
    """Every candidate has a = 1 and Theta = tau * const strictly grows: admitted until N tokens,
    in request order (ties: lower request, then lower position)."""
    R, K = 3, 4
    inputs = ScheduleInputs(torch.ones(R, K), torch.ones(R + extra + 1))
    assert assert_all_agree(inputs).tolist() == expected


def test_max_len_caps():
    inputs = make_schedule_inputs(6, 5, seed=21, max_batch=40, jagged=False)
    inputs.confidence.fill_(0.95)
    zero = ScheduleInputs(inputs.confidence, inputs.sps, torch.zeros(6, dtype=torch.int32))
    assert assert_all_agree(zero).tolist() == [0] * 6
    above = ScheduleInputs(inputs.confidence, inputs.sps, _i32([5, 6, 100, 2**31 - 1, 5, 7]))
    assert torch.equal(assert_all_agree(above), run_schedule_op(ScheduleInputs(inputs.confidence, inputs.sps)))
    mixed = ScheduleInputs(inputs.confidence, torch.ones(41), _i32([0, 1, 2, 3, 4, 5]))
    assert assert_all_agree(mixed).tolist() == [0, 1, 2, 3, 4, 5]


def test_output_is_a_fresh_tensor():
    inputs = make_schedule_inputs(8, 4, seed=22, max_len=True)
    saved = [None if a is None else a.clone() for a in inputs.args()]
    first, second = run_schedule_op(inputs), run_schedule_op(inputs)
    assert first.data_ptr() != second.data_ptr()
    for a, b in zip(inputs.args(), saved):
        assert (a is None and b is None) or torch.equal(a, b)  # inputs untouched


# --------------------------------------------------------------------------- determinism and batch order


def test_deterministic():
    for seed in range(10):
        inputs = make_schedule_inputs(40, 16, seed=400 + seed, max_len=seed % 2 == 1, ties=True)
        assert torch.equal(run_schedule_op(inputs), run_schedule_op(inputs))


def test_permuting_requests_permutes_the_output():
    """With pairwise distinct survival probabilities the admission order does not depend on the
    request index, so num_draft is equivariant under a permutation of the requests."""
    checked = 0
    for seed in range(30):
        g = torch.Generator().manual_seed(500 + seed)
        R, K = 24, 6
        confidence = torch.rand(R, K, generator=g) ** 0.5
        survival = survival_probabilities(confidence)
        assert torch.unique(survival).numel() == R * K  # no ties anywhere
        sps = random_sps(R, R * (K + 1), g)
        max_len = torch.randint(0, K + 1, (R,), generator=g, dtype=torch.int32)
        out = schedule_op(confidence, sps, max_len)
        perm = torch.randperm(R, generator=g)
        assert torch.equal(schedule_op(confidence[perm], sps, max_len[perm]), out[perm])
        checked += int(out.sum()) > 0
    assert checked >= 20


def test_ties_are_broken_by_request_index():
    """Equal survival probabilities go to the lower request, then the lower position, so
    swapping two requests does not swap their lengths when they tie."""
    flat = torch.ones(5)  # N = 4: R = 2 anchors + 2 drafts
    confidence = _f32([[1.0, 0.5], [0.5, 0.5]])  # a: (1, 0.5) and (0.5, 0.25)
    assert schedule_op(confidence, flat, None).tolist() == [2, 0]  # 1.0, then the 0.5 tie to request 0
    assert schedule_op(confidence.flip(0), flat, None).tolist() == [1, 1]  # 1.0 (request 1), then request 0
    same = _f32([[0.5, 0.5], [0.5, 0.9]])  # tie at 0.5 for position 0
    assert schedule_op(same, torch.ones(4), None).tolist() == [1, 0]
    assert schedule_op(same.flip(0), torch.ones(4), None).tolist() == [1, 0]
    for c, s in [(confidence, flat), (confidence.flip(0), flat), (same, torch.ones(4)), (same.flip(0), torch.ones(4))]:
        assert_all_agree(ScheduleInputs(c, s))


# --------------------------------------------------------------------------- torch.compile


def _step(confidence, sps, max_len):
    """A little arithmetic around the op, as a serving step would do."""
    num_draft = torch.ops.dspark.schedule(confidence.clamp(0, 1), sps, max_len)
    cu = torch.cumsum(num_draft.long() + 1, 0)
    return num_draft, cu, num_draft.sum()


def test_torch_compile_fullgraph():
    """The op compiles without graph breaks (fake kernel), and so does schedule_eager (pure
    torch ops, no host sync): both equal the eager op, also on new values of the same shapes."""
    torch._dynamo.reset()
    compiled_step = torch.compile(_step, fullgraph=True)
    compiled_eager = torch.compile(schedule_eager, fullgraph=True)
    for seed in (31, 32):
        inputs = make_schedule_inputs(12, 5, seed=seed, max_len=True, max_batch=50, ties=seed == 32)
        for e, g in zip(_step(*inputs.args()), compiled_step(*inputs.args())):
            assert e.dtype == g.dtype and torch.equal(e, g)
        assert torch.equal(compiled_eager(*inputs.args()), run_schedule_op(inputs))


# --------------------------------------------------------------------------- schedule_async


def test_async_matches_reference_on_random_inputs():
    """Budget = the batch size B* = R' + drafts of the global search on the lagged confidences
    [R', K'] (R', K' independent of the current R, K); the current candidates are admitted in
    descending survival, up to B* - R of them."""
    for seed in range(60):
        g = torch.Generator().manual_seed(600 + seed)
        R, K = int(torch.randint(1, 17, (), generator=g)), int(torch.randint(1, 9, (), generator=g))
        lagged_R, lagged_K = int(torch.randint(1, 17, (), generator=g)), int(torch.randint(1, 9, (), generator=g))
        max_batch = int(torch.randint(max(R, lagged_R), max(R, lagged_R) * 6 + 4, (), generator=g))
        confidence = random_confidence(R, K, g, ties=seed % 2 == 0)
        lagged = random_confidence(lagged_R, lagged_K, g, ties=seed % 3 == 0)
        sps = random_sps(max(R, lagged_R), max_batch, g)
        sps[:max(R, lagged_R)] = 1.0  # below max(R, R') only one of the two reads it
        max_len = torch.randint(0, K + 2, (R,), generator=g, dtype=torch.int32) if seed % 2 else None
        got = schedule_async(confidence, lagged, sps, max_len)
        expected = schedule_async_reference(confidence, lagged, sps, max_len)
        assert got.dtype == torch.int32 and torch.equal(got, expected), (seed, got.tolist(), expected.tolist())


def test_async_budget_semantics():
    R, K = 4, 8
    g = torch.Generator().manual_seed(61)
    confidence = torch.rand(R, K, generator=g) * 0.5 + 0.5
    flat = torch.ones(R + 6)  # N = R + 5
    # Lagged all ones with a flat SPS: the global search fills the batch, B* = N = 9 tokens
    # (7 drafts for R' = 2), which leaves the 4 current requests 5 drafts.
    full_batch = schedule_async(confidence, torch.ones(2, 4), flat)
    assert int(full_batch.sum()) == 5
    assert torch.equal(full_batch, schedule_op(confidence, flat, None))  # the same 5 best candidates
    # A budget below N: B* = 7 tokens, i.e. 3 drafts for R = 4 (lagged 0.9 for 4 requests, SPS
    # stepping down above 7 tokens: Theta 4, 4.9, 5.8, 6.7, then 3.8 and at most 5.0 up to N = 11).
    stepped = _f32([0.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.5, 0.5, 0.5, 0.5])
    lagged = torch.full((R, 4), 0.9)
    assert int(schedule_reference(lagged, stepped, early_stop=False).sum()) == 3
    out = schedule_async(confidence, lagged, stepped)
    assert int(out.sum()) == 3
    # The budget does not depend on the current confidences: any current batch gets 3 drafts,
    # its 3 best candidates.
    for seed in range(5):
        current = torch.rand(R, K, generator=g) * 0.9 + 0.1
        got = schedule_async(current, lagged, stepped)
        assert int(got.sum()) == 3
        assert torch.equal(got, schedule_op(current, torch.ones(R + 4), None))
    # The budget is a batch size: with 2 lagged requests B* = 2 + 3 drafts = 5 tokens, which
    # leaves the 4 current requests one draft; 8 lagged requests without drafts give B* = 8,
    # i.e. 4 drafts for 4 current requests.
    two_lagged = torch.full((2, 4), 0.9)
    assert int(schedule_reference(two_lagged, stepped, early_stop=False).sum()) == 5
    assert int(schedule_async(confidence, two_lagged, stepped).sum()) == 2 + 5 - R
    assert int(schedule_async(confidence, torch.zeros(8, 4), stepped).sum()) == 8 - R
    # Fewer candidates than the budget: all of them; lagged all zero: budget 0.
    sparse = torch.zeros(R, K)
    sparse[1, :2] = 0.7
    assert schedule_async(sparse, torch.ones(2, 4), flat).tolist() == [0, 2, 0, 0]
    assert schedule_async(confidence, torch.zeros(2, 4), flat).tolist() == [0] * R
    # max_len caps the current candidates.
    assert schedule_async(confidence, torch.ones(2, 4), flat, _i32([0, 1, 0, 1])).tolist() == [0, 1, 0, 1]
    for args in [(confidence, torch.ones(2, 4), flat), (confidence, lagged, stepped), (sparse, torch.ones(2, 4), flat)]:
        assert torch.equal(schedule_async(*args), schedule_async_reference(*args))


@pytest.mark.parametrize("nan_at", [1, 2, 3])
def test_async_nan_sps_is_never_the_budget(nan_at):
    """A NaN SPS value fails every comparison, as in the synchronous scan: argmax must not pick
    a NaN Theta (at index 1, Theta_0 itself is NaN and the budget is 0)."""
    confidence = torch.full((1, 3), 0.9)
    sps = _f32([0.0, 1.0, 0.9, 0.9, 0.8])
    sps[nan_at] = float("nan")
    got = schedule_async(confidence, confidence, sps)
    assert torch.equal(got, schedule_async_reference(confidence, confidence, sps))
    assert got.tolist() == ([0] if nan_at == 1 else [3])


def test_async_compiles_fullgraph():
    """Dynamo traces schedule_async without graph breaks (no host sync, no data-dependent
    shape); the AOT backend keeps the file fast (schedule_eager, which it shares its
    building blocks with, is compiled with inductor in test_torch_compile_fullgraph)."""
    torch._dynamo.reset()
    compiled = torch.compile(schedule_async, fullgraph=True, backend="aot_eager")
    for seed in (62, 63):
        g = torch.Generator().manual_seed(seed)
        confidence, lagged = random_confidence(6, 4, g), random_confidence(5, 3, g)
        sps = random_sps(6, 30, g)
        sps[:6] = 1.0
        max_len = torch.randint(0, 5, (6,), generator=g, dtype=torch.int32)
        assert torch.equal(compiled(confidence, lagged, sps, max_len), schedule_async(confidence, lagged, sps, max_len))
