"""dspark::markov_draft on CUDA: the CPU checks on the device (reference, exact law,
determinism, batch invariance, NaN/inf), CPU/CUDA agreement, CUDA-graph capture and replay,
torch.compile and opcheck, structural errors and device mismatches, and malformed values
(which CUDA does not check on the host) handled on the device without out-of-bounds reads."""

import pytest
import torch

from dspark_ext.reference import greedy_tokens
from helpers import (
    FLOAT_DTYPES,
    MARKOV_CONFIDENCE_TOLERANCE,
    MARKOV_LOGIT_TOLERANCE,
    VOCAB_TILE,
    assert_markov_matches_reference,
    assert_matches_distribution,
    check_markov_output_format,
    fraction_rows_differ,
    make_markov_inputs,
    markov_op,
    markov_sequence_law,
    markov_step,
    non_finite_markov_inputs,
    repeated_markov_inputs,
    run_markov_op,
    sequence_codes,
    with_replaced,
)

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

DEVICE = "cuda"
N = 100_000
INF, NAN = float("inf"), float("nan")
MIXED = [0.0, 1.0, 0.0, 0.7, 2.0, 0.0, 1.3, 0.0, 0.5]


def _cpu_outputs(outputs):
    return tuple(t.cpu() for t in outputs)


def _same_prefix(ids: torch.Tensor, other_ids: torch.Tensor) -> torch.Tensor:
    """[B, K] mask of the positions whose previous drafts agree (their logits are comparable)."""
    agree = (ids == other_ids).cumprod(dim=1).bool()
    return torch.cat([torch.ones(ids.shape[0], 1, dtype=torch.bool), agree[:, :-1]], dim=1)


# --------------------------------------------------------------------------- against the reference


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("weight_dtype", ["float32", "same"])
def test_greedy_exact_weights_match_reference_bitwise(dtype, weight_dtype):
    inputs = make_markov_inputs(6, 4, 3001, 5, dtype=dtype, exact_weights=True, confidence=True, seed=1,
                                weight_dtype=torch.float32 if weight_dtype == "float32" else dtype, device=DEVICE)
    assert inputs.base_logits.device.type == DEVICE
    assert_markov_matches_reference(inputs, exact=True)


# (B, K, V, r, dtype, weight dtype, temperatures, confidence); V * element size and r * weight
# size multiples of 16 bytes take the kernel's 16-byte loads, the others the scalar path.
SHAPE_CASES = [
    (1, 4, 4096, 16, torch.float32, torch.float32, [0.0], True),  # 16-byte loads
    (3, 3, 257, 5, torch.float32, torch.float32, [0.0, 1.0, 0.0], True),  # scalar loads, odd V
    (9, 2, 4099, 37, torch.bfloat16, torch.float32, MIXED, True),
    (9, 3, 4096, 8, torch.bfloat16, torch.bfloat16, MIXED, False),  # 16-byte loads, 16-bit weights
    (40, 3, 200, 5, torch.float16, torch.float16, (MIXED * 5)[:40], True),  # V < 256
    (40, 1, VOCAB_TILE + 1, 64, torch.bfloat16, torch.bfloat16, (MIXED * 5)[:40], False),  # K = 1
    (4, 2, 1, 2, torch.float32, torch.float32, [0.0, 1.0, 0.0, 1.0], True),  # V = 1
    (300, 2, 1000, 130, torch.float32, torch.float32, (MIXED * 34)[:300], True),  # r > the kernel's rank chunk
]


def _shape_case_id(case) -> str:
    B, K, V, r, dtype, weight_dtype, temps, confidence = case
    return f"B{B}-K{K}-V{V}-r{r}-{str(dtype)[6:]}-w{str(weight_dtype)[6:]}{'-conf' if confidence else ''}"


@pytest.mark.parametrize("exact", [True, False], ids=["exact_weights", "random_weights"])
@pytest.mark.parametrize("case", SHAPE_CASES, ids=_shape_case_id)
def test_shapes_and_mixed_batches_match_reference(case, exact):
    B, K, V, r, dtype, weight_dtype, temps, confidence = case
    inputs = make_markov_inputs(B, K, V, r, dtype=dtype, weight_dtype=weight_dtype, temperature=temps,
                                confidence=confidence, exact_weights=exact, seed=B * 1000 + V, device=DEVICE)
    assert_markov_matches_reference(inputs, exact=exact)


def test_empty_batch():
    inputs = make_markov_inputs(0, 3, 40, 4, confidence=True, seed=6, device=DEVICE)
    outputs = run_markov_op(inputs)
    check_markov_output_format(inputs, *outputs)
    assert outputs[0].shape == (0, 3) and outputs[1].shape == (0, 3, 40) and outputs[2].shape == (0, 3)


# --------------------------------------------------------------------------- CPU vs CUDA


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_cpu_and_cuda_agree_exact_weights(dtype):
    """Dyadic weights make every logit exact on both backends: logits bitwise equal along the
    common prefix, greedy drafts identical, sampled rows identical except where the races
    round differently (>= 99% of rows)."""
    B = 600
    inputs = make_markov_inputs(B, 3, 3000, 16, dtype=dtype, temperature=(MIXED * 67)[:B], confidence=True,
                                exact_weights=True, seed=30, device=DEVICE)
    cuda_ids, cuda_logits, cuda_conf = _cpu_outputs(run_markov_op(inputs))
    cpu_ids, cpu_logits, cpu_conf = run_markov_op(inputs.to("cpu"))
    greedy = inputs.temperature.cpu() == 0
    assert torch.equal(cuda_ids[greedy], cpu_ids[greedy])
    prefix = _same_prefix(cpu_ids, cuda_ids)
    assert torch.equal(cuda_logits[prefix], cpu_logits[prefix])
    torch.testing.assert_close(cuda_conf[prefix], cpu_conf[prefix], **MARKOV_CONFIDENCE_TOLERANCE)
    equal_rows = float((cuda_ids == cpu_ids).all(dim=1).double().mean())
    assert equal_rows >= 0.99, f"only {equal_rows:.2%} of rows agree"


@pytest.mark.parametrize("dtype, weight_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                                 (torch.float16, torch.float16), (torch.bfloat16, torch.float32)],
                         ids=str)
def test_cpu_and_cuda_agree_random_weights(dtype, weight_dtype):
    """Gaussian weights: the bias is summed in another order on each backend, so logits agree
    within the dtype's tolerance; float32 greedy drafts are identical; drafts (whole rows)
    agree in >= 99% of rows."""
    B = 400
    inputs = make_markov_inputs(B, 3, 3001, 24, dtype=dtype, weight_dtype=weight_dtype, temperature=(MIXED * 45)[:B],
                                confidence=True, seed=31, device=DEVICE)
    cuda_ids, cuda_logits, cuda_conf = _cpu_outputs(run_markov_op(inputs))
    cpu_ids, cpu_logits, cpu_conf = run_markov_op(inputs.to("cpu"))
    prefix = _same_prefix(cpu_ids, cuda_ids)
    torch.testing.assert_close(cuda_logits[prefix], cpu_logits[prefix], **MARKOV_LOGIT_TOLERANCE[dtype])
    torch.testing.assert_close(cuda_conf[prefix], cpu_conf[prefix], **MARKOV_CONFIDENCE_TOLERANCE)
    greedy = inputs.temperature.cpu() == 0
    if dtype == torch.float32:
        assert torch.equal(cuda_ids[greedy], cpu_ids[greedy])
    assert torch.equal(cuda_ids[greedy], greedy_tokens(cuda_logits[greedy]))
    equal_rows = float((cuda_ids == cpu_ids).all(dim=1).double().mean())
    assert equal_rows >= 0.99, f"only {equal_rows:.2%} of rows agree"


# --------------------------------------------------------------------------- exact law on the device


def _joint_setup(temperature: float):
    K, V, r, anchor = 3, 6, 3, 2
    g = torch.Generator().manual_seed(7)
    rows = torch.randn(K, V, generator=g) * 0.7
    w1 = torch.randn(V, r, generator=g)
    w2 = torch.randn(V, r, generator=g) * 1.4
    return rows, anchor, w1, w2, markov_sequence_law(rows, anchor, w1, w2, temperature)


@pytest.mark.parametrize("temperature, streams", [(1.0, "seeds"), (0.7, "offsets")])
def test_joint_of_three_drafts_follows_the_exact_law(temperature, streams):
    rows, anchor, w1, w2, law = _joint_setup(temperature)
    seed = torch.full((N,), 424242) if streams == "offsets" else None
    offset = torch.arange(N) * 3 if streams == "offsets" else None
    inputs = repeated_markov_inputs(rows.to(DEVICE), anchor, w1.to(DEVICE), w2.to(DEVICE), temperature, N, seed=seed,
                                    offset=offset)
    ids, _, _ = run_markov_op(inputs)
    assert_matches_distribution(sequence_codes(ids, rows.shape[1]), law)


def test_first_draft_across_vocab_tiles():
    """V = 3 tiles + 300 ids (units of 256 merged into tiles of 2048 for the race), the mass
    in every tile: x_1's marginal and its tile follow the exact law (1e5 samples)."""
    V, r, anchor = 3 * VOCAB_TILE + 300, 8, 17
    g = torch.Generator().manual_seed(8)
    rows = torch.randn(1, V, generator=g) * 0.5
    favourites = [5, 900, VOCAB_TILE + 3, VOCAB_TILE + 1800, 2 * VOCAB_TILE + 700, 3 * VOCAB_TILE + 1,
                  3 * VOCAB_TILE + 299]
    rows[0, favourites] += 7.0
    w1 = torch.randn(V, r, generator=g)
    w2 = torch.zeros(V, r)
    w2[favourites] = torch.randn(len(favourites), r, generator=g) * 0.5
    inputs = repeated_markov_inputs(rows.to(DEVICE), anchor, w1.to(DEVICE), w2.to(DEVICE), 1.0, N)
    ids, _, _ = run_markov_op(inputs)
    p = markov_sequence_law(rows, anchor, w1, w2, 1.0)
    tiles = torch.arange(V) // VOCAB_TILE
    tile_law = torch.zeros(4, dtype=torch.float64).index_add_(0, tiles, p)
    assert float(tile_law.min()) > 0.02, tile_law
    assert_matches_distribution(ids[:, 0].cpu() // VOCAB_TILE, tile_law)
    assert_matches_distribution(ids[:, 0], p)


def test_positive_inf_entries_share_the_mass():
    V, n = 5000, 20_000
    row = torch.randn(1, V)
    row[0, [3, 4500]] = INF
    inputs = repeated_markov_inputs(row.to(DEVICE), 11, torch.randn(V, 3, device=DEVICE),
                                    torch.randn(V, 3, device=DEVICE), 1.0, n)
    ids, _, _ = run_markov_op(inputs)
    probs = torch.zeros(V, dtype=torch.float64)
    probs[[3, 4500]] = 0.5
    assert_matches_distribution(ids[:, 0], probs)


# --------------------------------------------------------------------------- determinism, streams, invariance


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_deterministic(dtype):
    inputs = make_markov_inputs(240, 3, 9000, 32, dtype=dtype, temperature=[1.0, 0.0, 0.6, 1.5] * 60,
                                confidence=True, seed=9, device=DEVICE)
    first, second = run_markov_op(inputs), run_markov_op(inputs)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype, weight_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16)],
                         ids=["fp32", "bf16"])
def test_separate_launches_match_the_cooperative_kernel(dtype, weight_dtype, monkeypatch):
    """The 1 + 2K launch path (taken where cooperative launches are unavailable) runs the same
    device functions: bitwise the same outputs as the one cooperative launch."""
    inputs = make_markov_inputs(20, 4, 5000, 24, dtype=dtype, weight_dtype=weight_dtype,
                                temperature=[1.0, 0.0, 0.7, 1.3] * 5, confidence=True, seed=31, device=DEVICE)
    cooperative = run_markov_op(inputs)
    monkeypatch.setenv("DSPARK_MARKOV_SEPARATE_LAUNCHES", "1")
    separate = run_markov_op(inputs)
    for a, b in zip(cooperative, separate):
        assert torch.equal(a, b)


@pytest.mark.parametrize("rank", [5, 16, 37])
def test_batch_invariance(rank):
    """Alone, inside the batch and inside a reordered batch with repeats: bitwise the same."""
    temps = [1.0, 0.8, 0.0, 1.2, 2.0, 1.0, 0.5, 0.0, 1.0, 0.9, 0.0, 1.1]
    inputs = make_markov_inputs(12, 3, 2300, rank, dtype=torch.bfloat16, weight_dtype=torch.float32,
                                temperature=temps, confidence=True, logit_scale=1.0, seed=10 + rank, device=DEVICE)
    ids, logits, confidence = run_markov_op(inputs)
    order = list(range(11, -1, -1)) + list(range(0, 12, 2))
    s_ids, s_logits, s_confidence = run_markov_op(inputs.select(order))
    assert torch.equal(s_ids, ids[order]) and torch.equal(s_logits, logits[order])
    assert torch.equal(s_confidence, confidence[order])
    for b in range(12):
        a_ids, a_logits, a_confidence = run_markov_op(inputs.select([b]))
        assert torch.equal(a_ids[0], ids[b]) and torch.equal(a_logits[0], logits[b]), b
        assert torch.equal(a_confidence[0], confidence[b])


@pytest.mark.parametrize("field", ["seed", "offset"])
def test_seed_and_offset_change_the_stream(field):
    inputs = make_markov_inputs(2000, 3, 64, 4, temperature=1.0, logit_scale=0.3, markov_scale=0.3, seed=12,
                                device=DEVICE)
    ids, _, _ = run_markov_op(inputs)
    changed = with_replaced(inputs, **{field: getattr(inputs, field) + 1})
    assert fraction_rows_differ(ids, run_markov_op(changed)[0]) > 0.5
    assert torch.equal(run_markov_op(with_replaced(changed, **{field: getattr(inputs, field)}))[0], ids)


# --------------------------------------------------------------------------- NaN / inf


def test_greedy_nan_inf_rules():
    rows = torch.tensor([
        [1.0, NAN, 0.5, NAN],
        [NAN, NAN, NAN, NAN],
        [-INF, -INF, -INF, -INF],
        [-INF, 2.0, INF, INF],
        [NAN, INF, NAN, 3.0],
    ], device=DEVICE)
    B, V = rows.shape
    zeros = torch.zeros(V, 2, device=DEVICE)
    ids, logits, _ = markov_op(rows[:, None], torch.zeros(B, dtype=torch.int64, device=DEVICE), zeros, zeros,
                               torch.zeros(B, device=DEVICE), torch.zeros(B, dtype=torch.int64, device=DEVICE),
                               torch.zeros(B, dtype=torch.int64, device=DEVICE), None, None, None)
    assert ids[:, 0].tolist() == [0, 0, 0, 2, 1]
    torch.testing.assert_close(logits[:, 0], rows, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_nan_inf_sprinkled_batch_is_safe(dtype):
    noisy = non_finite_markov_inputs(dtype).to(DEVICE)
    assert_markov_matches_reference(noisy, exact=True)


# --------------------------------------------------------------------------- CUDA graphs, torch.compile, opcheck


@pytest.mark.parametrize("confidence", [False, True], ids=["no_confidence", "confidence"])
def test_cuda_graph_capture_and_replay(confidence):
    """Capture the op once, copy new values (logits, anchors, weights, temperatures, seeds,
    confidence inputs) into the static inputs, replay: equals eager on the new values."""
    B, K, V, r = 12, 3, 2500, 16
    temps = [1.0, 0.0, 0.7, 1.3, 0.0, 2.0] * 2

    def make(seed):
        return make_markov_inputs(B, K, V, r, temperature=temps, confidence=confidence, seed=seed, device=DEVICE)

    static = make(1)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            run_markov_op(static)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_outputs = run_markov_op(static)

    for seed in (2, 3):
        new = make(seed)
        new.temperature = new.temperature.flip(0)
        for dst, src in zip(static.args(), new.args()):
            if dst is not None:
                dst.copy_(src)
        graph.replay()
        torch.cuda.synchronize()
        expected = run_markov_op(new)
        for got, want in zip(static_outputs, expected):
            assert torch.equal(got, want)
        check_markov_output_format(new, *static_outputs)


def test_torch_compile_fullgraph_matches_eager():
    torch._dynamo.reset()
    compiled = torch.compile(markov_step, fullgraph=True)
    for seed in (22, 23):
        inputs = make_markov_inputs(6, 3, 700, 8, dtype=torch.bfloat16, weight_dtype=torch.float32,
                                    temperature=[1.0, 0.0, 0.8, 1.2, 0.0, 2.0], confidence=True, seed=seed,
                                    device=DEVICE)
        args = inputs.args()[:9]
        for e, g in zip(markov_step(*args), compiled(*args)):
            assert e.dtype == g.dtype and e.shape == g.shape and e.device == g.device
            assert torch.equal(e, g)


@pytest.mark.parametrize("kwargs", [
    dict(num_requests=4, num_draft=3, vocab_size=300, rank=5, temperature=1.0, confidence=True),
    dict(num_requests=3, num_draft=2, vocab_size=2100, rank=8, temperature=0.0),
    dict(num_requests=9, num_draft=2, vocab_size=257, rank=3, dtype=torch.bfloat16, weight_dtype=torch.float32,
         temperature=MIXED, confidence=True, conf_w_prev=False),
], ids=["sampled_confidence", "greedy", "mixed_bf16"])
def test_opcheck(kwargs):
    torch.library.opcheck(markov_op, make_markov_inputs(seed=20, device=DEVICE, **kwargs).args())


# --------------------------------------------------------------------------- bad input


def test_structural_errors_on_cuda():
    """Shapes and dtypes are checked on the host for CUDA tensors too, naming the argument."""
    import re

    from test_markov_draft import STRUCTURAL_CASES, _valid

    for case, mutate, pattern in STRUCTURAL_CASES:
        bad = mutate(_valid()).to(DEVICE)
        with pytest.raises(RuntimeError, match=r"dspark::markov_draft") as info:
            markov_op(*bad.args())
        assert re.search(pattern, str(info.value).splitlines()[0]), (case, str(info.value))


@pytest.mark.parametrize("argument", ["prev_token_ids", "markov_w1", "markov_w2", "temperature", "seed", "offset",
                                      "conf_base", "conf_w_prev", "conf_temperature"])
def test_tensors_on_different_devices(argument):
    inputs = make_markov_inputs(3, 2, 10, 4, temperature=[1.0, 0.0, 0.5], confidence=True, seed=19, device=DEVICE)
    bad = with_replaced(inputs, **{argument: getattr(inputs, argument).cpu()})
    with pytest.raises(RuntimeError, match=argument):
        markov_op(*bad.args())


def test_base_logits_on_cpu_rest_on_cuda():
    inputs = make_markov_inputs(3, 2, 10, 4, temperature=[1.0, 0.0, 0.5], confidence=True, seed=19, device=DEVICE)
    with pytest.raises(RuntimeError, match=r"dspark::markov_draft"):
        markov_op(*with_replaced(inputs, base_logits=inputs.base_logits.cpu()).args())


def _guarded_w1(w1: torch.Tensor, guard_rows: int = 64) -> torch.Tensor:
    """W1 as the middle of a larger buffer whose other rows hold 1e30: any row read outside
    [0, V) would turn the bias (and the logits) into +-inf or huge values."""
    V, r = w1.shape
    big = torch.full((V + 2 * guard_rows, r), 1e30, dtype=w1.dtype, device=w1.device)
    big[guard_rows:guard_rows + V] = w1
    view = big[guard_rows:guard_rows + V]
    assert view.is_contiguous()  # passed in place: the op reads this very buffer
    return view


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_out_of_range_anchors_have_no_transition_bias(dtype):
    """Documented for CUDA (values are not checked on the host): an anchor outside [0, V)
    gives a = 0, so l_1 = U_1 and c_1 = sigmoid(conf_base / sts), and nothing outside W1 is read."""
    V = 300
    anchors = [-1, V, V + 63, -64, 2**40, -(2**62), 5, 2**63 - 1]
    B = len(anchors)
    inputs = make_markov_inputs(B, 3, V, 8, dtype=dtype, weight_dtype=torch.float32, temperature=MIXED[:B],
                                confidence=True, seed=40, device=DEVICE)
    inputs = with_replaced(inputs, prev_token_ids=torch.tensor(anchors, device=DEVICE),
                           markov_w1=_guarded_w1(inputs.markov_w1))
    for _ in range(2):
        ids, logits, confidence = run_markov_op(inputs)
        torch.cuda.synchronize()
        check_markov_output_format(inputs, ids, logits, confidence)
        bad = torch.tensor([a < 0 or a >= V for a in anchors])
        assert torch.equal(logits.cpu()[bad, 0], inputs.base_logits.cpu()[bad, 0])
        expected_conf = torch.sigmoid(inputs.conf_base[:, 0] / inputs.conf_temperature[0]).cpu()
        torch.testing.assert_close(confidence.cpu()[bad, 0], expected_conf[bad], **MARKOV_CONFIDENCE_TOLERANCE)
        assert bool(torch.isfinite(logits.float()).all()) and bool((logits.float().abs() < 1e3).all())
    # The in-range row and the later positions are as usual (the drafts are valid anchors).
    valid = inputs.select([6])
    assert_markov_matches_reference(valid)


def test_malformed_temperatures_do_not_crash():
    """A negative or NaN temperature means greedy on CUDA (not (T > 0)); +inf and tiny ones
    sample from something; non-positive or NaN conf_temperature gives some confidence. No
    crash, valid ids, and the device stays healthy."""
    temps = [-1.0, NAN, INF, 1e-30, -INF, 0.0, 1.0, 1e30]
    B = len(temps)
    inputs = make_markov_inputs(B, 3, 2100, 8, confidence=True, seed=41, device=DEVICE)
    bad = with_replaced(inputs, temperature=torch.tensor(temps, device=DEVICE),
                        conf_temperature=torch.tensor([0.0, -1.0, NAN], device=DEVICE))
    for _ in range(2):
        ids, logits, confidence = run_markov_op(bad)
        torch.cuda.synchronize()
        assert ids.shape == (B, 3) and bool(((ids >= 0) & (ids < 2100)).all())
    greedy = torch.tensor([not (t > 0) for t in temps])
    assert torch.equal(ids.cpu()[greedy], greedy_tokens(logits.cpu()[greedy]))
    good = run_markov_op(inputs)
    check_markov_output_format(inputs, *good)
    assert_markov_matches_reference(inputs, outputs=good)


def test_large_batch_and_vocabulary_against_cpu():
    """A serving-sized step (B = 64, V = 32003, r = 64, bf16) agrees with the CPU kernel."""
    B = 64
    inputs = make_markov_inputs(B, 4, 32003, 64, dtype=torch.bfloat16, weight_dtype=torch.float32,
                                temperature=(MIXED * 8)[:B], confidence=True, exact_weights=True, seed=42,
                                device=DEVICE)
    cuda_ids, cuda_logits, _ = _cpu_outputs(run_markov_op(inputs))
    cpu_ids, cpu_logits, _ = run_markov_op(inputs.to("cpu"))
    greedy = inputs.temperature.cpu() == 0
    assert torch.equal(cuda_ids[greedy], cpu_ids[greedy])
    prefix = _same_prefix(cpu_ids, cuda_ids)
    assert torch.equal(cuda_logits[prefix], cpu_logits[prefix])
    assert float((cuda_ids == cpu_ids).all(dim=1).double().mean()) >= 0.95
