"""dspark::verify on CUDA: greedy exactness, losslessness, determinism and batch
invariance (the CPU checks, on the device), CPU/CUDA agreement, CUDA-graph capture and
malformed values (which CUDA does not check on the host) handled on the device.
opcheck / torch.compile on CUDA are the "cuda" parameters of tests/test_opcheck.py."""

import pytest
import torch

from helpers import (
    GREEDY_CASES,
    VOCAB_TILE,
    Batch,
    acceptance_law,
    assert_batch_invariant,
    assert_deterministic,
    assert_greedy_matches_reference,
    assert_matches_distribution,
    check_output_format,
    fraction_rows_differ,
    greedy_case_batch,
    greedy_case_id,
    joint_codes,
    joint_first_two_law,
    lossless_setup,
    make_batch,
    repeated_request_batch,
    run_op,
    sampled_stream_batch,
    verify_op,
    with_replaced,
)

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

DEVICE = "cuda"
N = 100_000
INF, NAN = float("inf"), float("nan")


def _on_cpu(batch: Batch) -> Batch:
    return batch.to("cpu")


# --------------------------------------------------------------------------- greedy


@pytest.mark.parametrize("case", GREEDY_CASES, ids=greedy_case_id)
def test_greedy_matches_reference(case):
    batch = greedy_case_batch(case, device=DEVICE)
    assert batch.target_logits.is_cuda
    assert_greedy_matches_reference(batch)


@pytest.mark.parametrize("draft_logits", [False, True], ids=["one_hot", "draft_logits"])
def test_mixed_greedy_and_sampled_batch(draft_logits):
    temps = [0.0, 1.0, 0.0, 0.7, 0.0, 2.0, 0.0, 0.0, 1.3, 0.0, 0.5, 0.0]
    lengths = [3, 2, 0, 4, 5, 1, 2, 0, 3, 6, 2, 1]
    batch = make_batch(lengths, 3001, temperature=temps, draft_logits=draft_logits, strided=True, seed=5, device=DEVICE)
    assert_greedy_matches_reference(batch)


def test_greedy_nan_inf_rules():
    rows = torch.tensor([
        [1.0, NAN, 0.5, NAN],
        [NAN, NAN, NAN, NAN],
        [-INF, -INF, -INF, -INF],
        [-INF, 2.0, INF, INF],
        [NAN, INF, NAN, 3.0],
    ], device=DEVICE)
    B = rows.shape[0]
    output, _ = verify_op(rows, torch.zeros(0, dtype=torch.int64, device=DEVICE), None,
                          torch.zeros(B + 1, dtype=torch.int32, device=DEVICE), torch.zeros(B, device=DEVICE),
                          torch.zeros(B, dtype=torch.int64, device=DEVICE), torch.zeros(B, dtype=torch.int64, device=DEVICE), 0)
    assert output[:, 0].tolist() == [0, 0, 0, 2, 1]


# --------------------------------------------------------------------------- lossless


@pytest.mark.parametrize("one_hot", [False, True], ids=["draft_logits", "one_hot"])
@pytest.mark.parametrize("length", [1, 3])
def test_first_token_follows_target(length, one_hot):
    setup = lossless_setup(length, 24, 1.0, one_hot, num_samples=N, seed=100 + length, device=DEVICE)
    output, num_accepted = run_op(setup.batch)
    check_output_format(setup.batch, output, num_accepted)
    assert_matches_distribution(output[:, 0], setup.target_probs[0])
    assert_matches_distribution(num_accepted, acceptance_law(setup))


@pytest.mark.parametrize("one_hot", [False, True], ids=["draft_logits", "one_hot"])
def test_joint_of_first_two_tokens(one_hot):
    setup = lossless_setup(2, 12, 0.7, one_hot, num_samples=N, seed=7, device=DEVICE)
    output, _ = run_op(setup.batch)
    assert_matches_distribution(joint_codes(output, 12), joint_first_two_law(setup).flatten())


@pytest.mark.parametrize("temperature", [0.5, 2.0])
def test_bonus_token_when_every_draft_is_accepted(temperature):
    L, V = 2, 20
    rows = torch.randn(L + 1, V, generator=torch.Generator().manual_seed(31)) * 2.0
    setup = lossless_setup(L, V, temperature, False, num_samples=N, seed=32, target_rows=rows, draft_rows=rows[:L],
                           device=DEVICE)
    output, num_accepted = run_op(setup.batch)
    assert bool((num_accepted == L).all())
    assert_matches_distribution(output[:, L], setup.target_probs[L])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_first_token_follows_target_low_precision(dtype):
    setup = lossless_setup(2, 40, 1.0, False, num_samples=N, seed=71, dtype=dtype, device=DEVICE)
    output, _ = run_op(setup.batch)
    assert_matches_distribution(output[:, 0], setup.target_probs[0])


@pytest.mark.parametrize("one_hot", [False, True], ids=["draft_logits", "one_hot"])
def test_lossless_across_vocab_tiles(one_hot):
    V = 3 * VOCAB_TILE + 300
    g = torch.Generator().manual_seed(91)
    row = torch.randn(1, V, generator=g)
    row[0, [100, VOCAB_TILE + 700, 2 * VOCAB_TILE + 50, 3 * VOCAB_TILE + 250]] += 7.5
    draft = row + torch.randn(1, V, generator=g)
    setup = lossless_setup(1, V, 1.0, one_hot, num_samples=N, seed=92, target_rows=row.repeat(2, 1),
                           draft_rows=draft, broadcast=True, device=DEVICE)
    output, _ = run_op(setup.batch)
    p = setup.target_probs[0]
    assert_matches_distribution(output[:, 0], p)
    tiles = torch.stack([p[t * VOCAB_TILE:(t + 1) * VOCAB_TILE].sum() for t in range(4)])
    assert_matches_distribution(output[:, 0] // VOCAB_TILE, tiles)


def test_positive_inf_entries_share_the_mass():
    V, n = 5000, 20000
    row = torch.randn(1, V)
    row[0, [3, 4500]] = INF
    batch = repeated_request_batch(row.to(DEVICE), None, torch.zeros(n, 0, dtype=torch.int64), 1.0, broadcast=True)
    output, _ = run_op(batch)
    probs = torch.zeros(V, dtype=torch.float64)
    probs[[3, 4500]] = 0.5
    assert_matches_distribution(output[:, 0], probs)


# --------------------------------------------------------------------------- determinism, streams


@pytest.mark.parametrize("draft_logits", [False, True], ids=["one_hot", "draft_logits"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_deterministic(draft_logits, dtype):
    batch = make_batch([2, 5, 0, 3, 1, 4] * 40, 9000, temperature=[1.0, 0.0, 0.6, 1.5] * 60,
                       draft_logits=draft_logits, dtype=dtype, seed=8, device=DEVICE)
    assert_deterministic(batch)


@pytest.mark.parametrize("draft_logits", [False, True], ids=["one_hot", "draft_logits"])
def test_batch_invariance(draft_logits):
    lengths = [3, 0, 2, 5, 1, 4, 0, 2]
    temps = [1.0, 0.8, 0.0, 1.2, 2.0, 1.0, 0.5, 0.0]
    batch = make_batch(lengths, 4500, temperature=temps, draft_logits=draft_logits, max_num_draft=6,
                       logit_scale=1.0, draft_noise=2.0, seed=9, device=DEVICE)
    assert_batch_invariant(batch)


@pytest.mark.parametrize("field", ["offset", "seed"])
def test_offset_and_seed_change_the_stream(field):
    batch = sampled_stream_batch(device=DEVICE)
    output, _ = run_op(batch)
    changed = with_replaced(batch, **{field: getattr(batch, field) + 1})
    assert fraction_rows_differ(output, run_op(changed)[0]) > 0.5


# --------------------------------------------------------------------------- CPU vs CUDA


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("draft_logits", [False, True], ids=["one_hot", "draft_logits"])
def test_cpu_and_cuda_agree(dtype, draft_logits):
    """Same inputs -> same outputs: identical for greedy rows; for sampled rows the
    decisions use the same keyed streams and tiling, so only float rounding at a decision
    boundary may differ (>= 99.9% identical rows)."""
    g = torch.Generator().manual_seed(17)
    num = 4000
    lengths = torch.randint(0, 5, (num,), generator=g).tolist()
    temps = [0.0 if i % 4 == 0 else float(t) for i, t in enumerate(torch.rand(num, generator=g) * 1.5 + 0.3)]
    batch = make_batch(lengths, 3000, dtype=dtype, temperature=temps, draft_logits=draft_logits, strided=True,
                       logit_scale=1.5, seed=18, device=DEVICE)
    cuda_out, cuda_n = run_op(batch)
    cpu_batch = _on_cpu(batch)
    cpu_out, cpu_n = run_op(cpu_batch)
    check_output_format(batch, cuda_out, cuda_n)
    greedy = cpu_batch.temperature == 0
    assert torch.equal(cuda_out.cpu()[greedy], cpu_out[greedy])
    assert torch.equal(cuda_n.cpu()[greedy], cpu_n[greedy])
    sampled = ~greedy
    equal_rows = (cuda_out.cpu()[sampled] == cpu_out[sampled]).all(dim=1).double().mean()
    assert float(equal_rows) >= 0.999, f"only {float(equal_rows):.4%} of sampled rows agree"


# --------------------------------------------------------------------------- CUDA graphs


@pytest.mark.parametrize("draft_logits", [False, True], ids=["one_hot", "draft_logits"])
def test_cuda_graph_capture_and_replay(draft_logits):
    """Capture the op once, copy new values (logits, drafts, lengths with the same B and
    D, temperatures, seeds) into the static inputs, replay: equals eager on the new values."""
    lengths = [3, 0, 2, 4, 1, 2]
    temps = [1.0, 0.0, 0.7, 1.3, 0.0, 2.0]
    static = make_batch(lengths, 2500, temperature=temps, draft_logits=draft_logits, max_num_draft=4, seed=1,
                        device=DEVICE)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            verify_op(*static.args())
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out, static_n = verify_op(*static.args())

    for seed, order in ((2, [4, 2, 0, 3, 1, 5]), (3, [5, 4, 3, 2, 1, 0])):
        new = make_batch([lengths[i] for i in order], 2500, temperature=[temps[i] for i in order],
                         draft_logits=draft_logits, max_num_draft=4, seed=seed, device=DEVICE)
        for name in ("target_logits", "draft_token_ids", "draft_logits", "cu_num_draft", "temperature", "seed", "offset"):
            dst = getattr(static, name)
            if dst is not None:
                dst.copy_(getattr(new, name))
        graph.replay()
        torch.cuda.synchronize()
        expected_out, expected_n = verify_op(*new.args())
        assert torch.equal(static_out, expected_out)
        assert torch.equal(static_n, expected_n)
        check_output_format(new, static_out, static_n)


# --------------------------------------------------------------------------- malformed values


def _check_loose(batch: Batch, output: torch.Tensor, num_accepted: torch.Tensor) -> None:
    """Malformed requests may emit nothing, but every entry is a real id or -1."""
    torch.cuda.synchronize()
    out = output.cpu()
    V = batch.vocab_size
    assert out.shape == (batch.num_requests, batch.max_num_draft + 1)
    assert bool((((out >= 0) & (out < V)) | (out == -1)).all()), out
    n = num_accepted.cpu()
    assert bool(((n >= 0) & (n <= batch.max_num_draft)).all()), n


MALFORMED = [
    ("cu_not_starting_at_0", dict(cu_num_draft=[1, 2, 2, 3])),
    ("cu_decreasing", dict(cu_num_draft=[0, 2, 1, 3])),
    ("cu_negative", dict(cu_num_draft=[0, -5, 1, 3])),
    ("cu_last_not_D", dict(cu_num_draft=[0, 1, 1, 2])),
    ("cu_beyond_D", dict(cu_num_draft=[0, 2, 2, 50])),
    ("cu_huge", dict(cu_num_draft=[0, 2**31 - 1, 2, 3])),
    ("length_above_max_num_draft", dict(cu_num_draft=[0, 3, 3, 3])),
    ("ids_out_of_range_int64", dict(draft_token_ids=[-1, 10, 2**40])),
    ("ids_out_of_range_int32", dict(draft_token_ids=[-7, 10, 2**31 - 1], id_dtype=torch.int32)),
    ("temperature_negative_or_nan", dict(temperature=[-1.0, NAN, 1.0])),
]


@pytest.mark.parametrize("draft_logits", [False, True], ids=["one_hot", "draft_logits"])
@pytest.mark.parametrize("change", [m[1] for m in MALFORMED], ids=[m[0] for m in MALFORMED])
def test_malformed_values_do_not_crash(change, draft_logits):
    # B = 3, L = [2, 0, 1], D = 3, V = 10, max_num_draft = 2; mixed temperatures.
    batch = make_batch([2, 0, 1], 10, temperature=[1.0, 0.0, 0.5], draft_logits=draft_logits, max_num_draft=2,
                       seed=1, device=DEVICE)
    changes = {}
    if "cu_num_draft" in change:
        changes["cu_num_draft"] = torch.tensor(change["cu_num_draft"], dtype=torch.int32, device=DEVICE)
    if "draft_token_ids" in change:
        changes["draft_token_ids"] = torch.tensor(change["draft_token_ids"], dtype=change.get("id_dtype", torch.int64),
                                                  device=DEVICE)
    if "temperature" in change:
        changes["temperature"] = torch.tensor(change["temperature"], dtype=torch.float32, device=DEVICE)
    bad = with_replaced(batch, **changes)
    for _ in range(2):
        _check_loose(bad, *verify_op(*bad.args()))
    # The device is still healthy: a valid call afterwards gives the usual result.
    good_out, good_n = verify_op(*batch.args())
    check_output_format(batch, good_out, good_n)
    assert torch.equal(good_out.cpu()[1], run_op(_on_cpu(batch))[0][1])  # request 1 is greedy


def test_nan_inf_sprinkled_batch_is_safe():
    lengths = [2, 0, 4, 1, 3, 5, 0, 2, 1, 3]
    temps = [0.0, 1.0, 0.0, 0.7, 1.0, 0.0, 2.0, 0.0, 1.0, 0.5]
    batch = make_batch(lengths, 2100, temperature=temps, draft_logits=True, seed=12)
    g = torch.Generator().manual_seed(13)
    u = torch.rand(batch.target_logits.shape, generator=g)
    target = batch.target_logits.clone()
    target[u < 0.1] = NAN
    target[(u >= 0.1) & (u < 0.12)] = -INF
    target[(u >= 0.12) & (u < 0.1203)] = INF
    target[3] = NAN
    target[7] = -INF
    noisy = with_replaced(batch, target_logits=target).to(DEVICE)
    output, num_accepted = run_op(noisy)
    check_output_format(noisy, output, num_accepted)
    assert_greedy_matches_reference(noisy)
