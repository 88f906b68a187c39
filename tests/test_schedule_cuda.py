"""dspark::schedule on CUDA: bitwise agreement with the CPU op, schedule_eager and
schedule_reference on both kernel paths (one block up to R * K = 4096 candidates, a
device-wide radix sort above), near ties, strided inputs, the sanitization of values CUDA
does not check (equal to schedule_reference on the same raw inputs), no host sync, CUDA-graph
capture and replay, torch.compile, the current stream, the device guard, and an end-to-end
lossless run (markov_draft -> schedule -> verify on the device)."""

import pytest
import torch

from dspark_ext.reference import schedule_reference
from dspark_ext.scheduling import schedule_eager
from helpers import (
    ScheduleInputs,
    check_distribution,
    check_schedule_output,
    make_schedule_inputs,
    near_tie_schedule_inputs,
    raw_schedule_inputs,
    run_schedule_op,
    run_toy_engine,
    schedule_op,
    toy_exact_joint,
)

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

DEVICE = "cuda"
#: The CUDA launcher schedules up to this many candidates (R * K) in one block and uses a
#: device-wide CUB radix sort above.
SINGLE_BLOCK_CANDIDATES = 4096

# (R, K): both sides of the threshold, one-row and one-column shapes, serving sizes and the
# largest problem (R (K + 1) = 2^22 tokens).
SHAPES = [
    (1, 1), (3, 2), (37, 5), (64, 64), (2048, 2), (1, 4096), (4096, 1),  # <= 4096: one block
    (17, 241), (2049, 2), (4097, 1), (1, 4097), (1000, 8), (4096, 32), (65536, 63),  # > 4096: radix sort
]


def _shape_id(shape) -> str:
    R, K = shape
    return f"R{R}-K{K}-{'block' if R * K <= SINGLE_BLOCK_CANDIDATES else 'radix'}"


def assert_cuda_matches(inputs: ScheduleInputs, *, reference: bool = False) -> torch.Tensor:
    """CUDA op == CPU op == schedule_eager (== schedule_reference), bitwise. ``inputs`` on CPU."""
    cuda_inputs = inputs.to(DEVICE)
    got = run_schedule_op(cuda_inputs)
    check_schedule_output(cuda_inputs, got)
    got = got.cpu()
    cpu = run_schedule_op(inputs)
    assert torch.equal(got, cpu), f"CUDA {got.tolist()[:20]} != CPU {cpu.tolist()[:20]}"
    assert torch.equal(got, schedule_eager(*inputs.args()))
    if reference:
        assert torch.equal(got, schedule_reference(*inputs.args()))
    return got


# --------------------------------------------------------------------------- against the CPU op and the references


@pytest.mark.parametrize("shape", SHAPES, ids=_shape_id)
def test_matches_cpu_on_random_inputs(shape):
    R, K = shape
    small = R * K <= 5000
    variants = [(False, False, True), (True, True, True), (True, False, False)]  # (max_len, ties, jagged)
    for i, (max_len, ties, jagged) in enumerate(variants):
        inputs = make_schedule_inputs(R, K, seed=R * 31 + K + i, max_len=max_len, ties=ties, jagged=jagged)
        assert_cuda_matches(inputs, reference=small)


@pytest.mark.parametrize("shape", [(4, 8), (64, 64), (17, 241), (500, 20)], ids=_shape_id)
def test_matches_cpu_at_near_ties(shape):
    """Theta constant along the greedy path up to the last bits (see near_tie_schedule_inputs)."""
    for seed in range(10):
        assert_cuda_matches(near_tie_schedule_inputs(seed, *shape), reference=True)


def test_small_random_problems_match_the_reference():
    for seed in range(100):
        g = torch.Generator().manual_seed(seed)
        R, K = int(torch.randint(1, 65, (), generator=g)), int(torch.randint(1, 33, (), generator=g))
        assert_cuda_matches(make_schedule_inputs(R, K, seed=seed, max_len=seed % 2 == 0, ties=seed % 3 == 0),
                            reference=True)


@pytest.mark.parametrize("shape", [(13, 7), (300, 20)], ids=_shape_id)
def test_strided_inputs(shape):
    for seed in range(4):
        inputs = make_schedule_inputs(*shape, seed=50 + seed, max_len=seed % 2 == 0, ties=seed > 1).to(DEVICE)
        strided = inputs.strided()
        assert not strided.confidence.is_contiguous() and strided.sps.stride(0) == 2
        assert torch.equal(run_schedule_op(strided), run_schedule_op(inputs))
        assert torch.equal(run_schedule_op(strided).cpu(), run_schedule_op(inputs.to("cpu")))


def test_edge_cases():
    cases = [
        ScheduleInputs(torch.empty(0, 3), torch.ones(1)),  # R = 0
        ScheduleInputs(torch.empty(3, 0), torch.ones(5)),  # K = 0
        ScheduleInputs(torch.ones(4, 3), torch.ones(5)),  # N == R
        ScheduleInputs(torch.zeros(5, 4), torch.ones(30)),  # nothing to admit
        ScheduleInputs(torch.ones(3, 4), torch.ones(10)),  # all ones, constant SPS: [4, 2, 0]
        ScheduleInputs(torch.ones(3, 4), torch.ones(10), torch.zeros(3, dtype=torch.int32)),
        ScheduleInputs(torch.tensor([[1.0]]), torch.tensor([0.0, 1.0, 0.5])),  # exact Theta tie
        ScheduleInputs(torch.tensor([[2.0**-40], [2.0**-41]]), torch.ones(4)),  # tau's fixed point
        ScheduleInputs(torch.tensor([[1e-13]]), torch.ones(3)),
        ScheduleInputs(torch.tensor([[1e-20, 1e-20]]), torch.tensor([0.0, 1.0, 2.0, 3.0])),  # subnormal survival
        ScheduleInputs(torch.tensor([[1.0, 0.5], [0.5, 0.5]]), torch.ones(5)),  # ties: [2, 0]
        ScheduleInputs(torch.tensor([[0.8, 0.9]]), torch.tensor([0.0, 1.0, 0.5, 0.45])),  # appendix A: [0]
    ]
    for inputs in cases:
        assert_cuda_matches(inputs, reference=True)
    assert run_schedule_op(cases[4].to(DEVICE)).tolist() == [4, 2, 0]
    assert run_schedule_op(cases[9].to(DEVICE)).tolist() == [2]  # the subnormal is not flushed to zero
    assert run_schedule_op(cases[7].to(DEVICE)).tolist() == [1, 0]


# --------------------------------------------------------------------------- values CUDA does not check


@pytest.mark.parametrize("shape", [(1, 3), (7, 5), (64, 64), (17, 241), (1000, 8)], ids=_shape_id)
def test_raw_values_are_sanitized_like_the_reference(shape):
    """NaN confidence -> 0, clamped to [0, 1]; max_len clamped to [0, K]; a NaN SPS makes the
    comparison false, +inf / 0 / negative SPS values are used as they are: the op equals
    schedule_reference (and schedule_eager) on the raw inputs, and nothing raises."""
    R, K = shape
    for seed in range(5):
        raw = raw_schedule_inputs(R, K, seed=700 + 10 * seed)
        got = run_schedule_op(raw.to(DEVICE))
        torch.cuda.synchronize()
        check_schedule_output(raw.to(DEVICE), got)
        assert torch.equal(got.cpu(), schedule_eager(*raw.args()))
        if R * K <= 5000:
            assert torch.equal(got.cpu(), schedule_reference(*raw.args()))


def test_nan_sps_stops_the_scan():
    confidence = torch.full((1, 3), 0.9)
    sps = torch.tensor([0.0, 1.0, 1.0, float("nan"), 1.0])
    assert run_schedule_op(ScheduleInputs(confidence, sps).to(DEVICE)).tolist() == [1]
    assert schedule_reference(confidence, sps).tolist() == [1]


# --------------------------------------------------------------------------- no sync, graphs, compile, streams, devices


@pytest.mark.parametrize("shape", [(37, 5), (64, 64), (17, 241), (4096, 32)], ids=_shape_id)
def test_no_host_sync(shape):
    inputs = make_schedule_inputs(*shape, seed=80, max_len=True, device=DEVICE)
    expected = run_schedule_op(inputs.to("cpu"))
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        got = run_schedule_op(inputs)
        got_no_max_len = schedule_op(inputs.confidence, inputs.sps, None)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.equal(got.cpu(), expected)
    assert torch.equal(got_no_max_len.cpu(), schedule_op(inputs.confidence.cpu(), inputs.sps.cpu(), None))


@pytest.mark.parametrize("max_len", [False, True], ids=["no_max_len", "max_len"])
@pytest.mark.parametrize("shape", [(37, 5), (17, 241), (4096, 32)], ids=_shape_id)
def test_cuda_graph_capture_and_replay(shape, max_len):
    """Capture the op once, copy new values into the static inputs, replay: equals the eager op
    on the new values (no stale sizes or buffers captured from the first values)."""
    R, K = shape
    N = R * 3 + 5

    def make(seed):
        return make_schedule_inputs(R, K, seed=seed, max_len=max_len, max_batch=N, ties=seed % 2 == 0, device=DEVICE)

    static = make(90)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            run_schedule_op(static)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = run_schedule_op(static)

    for seed in (91, 92, 93):
        new = make(seed)
        for dst, src in zip(static.args(), new.args()):
            if dst is not None:
                dst.copy_(src)
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(static_out, run_schedule_op(new))
        assert torch.equal(static_out.cpu(), run_schedule_op(new.to("cpu")))


def test_torch_compile_fullgraph():
    from test_schedule import _step

    torch._dynamo.reset()
    compiled_step = torch.compile(_step, fullgraph=True)
    compiled_eager = torch.compile(schedule_eager, fullgraph=True)
    for seed in (94, 95):
        inputs = make_schedule_inputs(300, 20, seed=seed, max_len=True, max_batch=2000, device=DEVICE)
        for e, g in zip(_step(*inputs.args()), compiled_step(*inputs.args())):
            assert e.dtype == g.dtype and e.device == g.device and torch.equal(e, g)
        assert torch.equal(compiled_eager(*inputs.args()), run_schedule_op(inputs))


@pytest.mark.parametrize("max_len", [False, True], ids=["no_max_len", "max_len"])
@pytest.mark.parametrize("shape", [(37, 5), (4096, 32)], ids=_shape_id)
def test_opcheck(shape, max_len):
    inputs = make_schedule_inputs(*shape, seed=96, max_len=max_len, device=DEVICE)
    torch.library.opcheck(schedule_op, inputs.args())


@pytest.mark.parametrize("shape", [(37, 5), (4096, 32)], ids=_shape_id)
def test_runs_on_the_current_stream(shape):
    """On a side stream busy with a long kernel, the inputs are written and the op runs: the op
    must run after the write on that stream (on another stream it would read the old zeros)."""
    inputs = make_schedule_inputs(*shape, seed=97, max_len=True, jagged=False, device=DEVICE)
    expected = run_schedule_op(inputs.to("cpu"))
    assert int(expected.sum()) > 0
    confidence = torch.zeros_like(inputs.confidence)
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        torch.cuda._sleep(100_000_000)
        confidence.copy_(inputs.confidence)
        got = schedule_op(confidence, inputs.sps, inputs.max_len)
    torch.cuda.current_stream().wait_stream(side)
    assert torch.equal(got.cpu(), expected)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
@pytest.mark.parametrize("shape", [(37, 5), (4096, 32)], ids=_shape_id)
def test_inputs_on_another_device(shape):
    """Inputs on cuda:1 while cuda:0 is current: the op runs on (and returns on) cuda:1."""
    inputs = make_schedule_inputs(*shape, seed=98, max_len=True)
    with torch.cuda.device(0):
        got = run_schedule_op(inputs.to("cuda:1"))
        assert got.device == torch.device("cuda:1")
        assert torch.cuda.current_device() == 0
    torch.cuda.synchronize(1)
    assert torch.equal(got.cpu(), run_schedule_op(inputs))


# --------------------------------------------------------------------------- end to end


@pytest.mark.parametrize("setting", ["appendix_a", "variable_length", "cross_request"])
def test_lossless_end_to_end_on_the_device(setting):
    """tests/test_schedule_lossless.py's engine with markov_draft, the op and verify all on CUDA
    (the op called on every engine step): each request's (y_1, y_2) follows the target."""
    from test_schedule_lossless import NUM_STEPS, SCHEDULERS, SETTINGS

    toy = SETTINGS[setting]
    run = run_toy_engine(toy, SCHEDULERS["op"], NUM_STEPS, seed=2, device=DEVICE, every_step=True)
    R = toy.num_requests
    for r, request in enumerate(toy.requests):
        check = check_distribution(run.codes(r), toy_exact_joint(request.anchor), 1e-4 / R)
        assert check.ok, f"request {r}: {check}"
    if setting == "appendix_a":
        assert bool((run.num_draft == 0).all())
    else:
        for r in range(R):
            assert torch.unique(run.num_draft[:, r]).numel() >= 2
