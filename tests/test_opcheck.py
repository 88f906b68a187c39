"""torch.library.opcheck and torch.compile(fullgraph=True) over dspark::verify, and opcheck and
fake-tensor shapes of dspark::schedule (its torch.compile tests: test_schedule.py), on CPU and
(when present) CUDA."""

import pytest
import torch

from helpers import make_batch, make_schedule_inputs, schedule_op, verify_op

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"))]

# (case id, make_batch keyword arguments)
OPCHECK_CASES = [
    ("sampled_draft_logits_int64", dict(lengths=[2, 0, 3, 1], vocab_size=300, temperature=1.0, draft_logits=True,
                                        id_dtype=torch.int64)),
    ("one_hot_int32", dict(lengths=[1, 4, 0, 2], vocab_size=2100, temperature=0.8, id_dtype=torch.int32)),
    ("greedy_int64_bf16", dict(lengths=[3, 1, 2], vocab_size=257, temperature=0.0, dtype=torch.bfloat16)),
    ("mixed_draft_logits_int32_fp16", dict(lengths=[2, 2, 0, 1, 3], vocab_size=130, temperature=[0.0, 1.0, 0.5, 0.0, 2.0],
                                           draft_logits=True, id_dtype=torch.int32, dtype=torch.float16)),
    ("bonus_only", dict(lengths=[0, 0, 0], vocab_size=64, temperature=[1.0, 0.0, 1.0], max_num_draft=2)),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kwargs", [c[1] for c in OPCHECK_CASES], ids=[c[0] for c in OPCHECK_CASES])
def test_opcheck(kwargs, device):
    batch = make_batch(seed=3, device=device, **kwargs)
    # Default test_utils: test_schema, test_autograd_registration, test_faketensor,
    # test_aot_dispatch_dynamic.
    torch.library.opcheck(verify_op, batch.args())


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_strided_rows(device):
    batch = make_batch([2, 1, 3], 500, temperature=[1.0, 0.0, 0.7], draft_logits=True, strided=True, seed=4,
                       device=device)
    assert batch.target_logits.stride(0) > batch.vocab_size
    torch.library.opcheck(verify_op, batch.args())


def _step(target_logits, draft_token_ids, draft_logits, cu_num_draft, temperature, seed, offset):
    """A little arithmetic around the op, as a serving step would do."""
    output, num_accepted = torch.ops.dspark.verify(
        target_logits * 1.0, draft_token_ids, draft_logits, cu_num_draft, temperature, seed + 0, offset + 1, 4
    )
    valid = output >= 0
    emitted = num_accepted.long() + 1
    return torch.where(valid, output, torch.zeros_like(output)), valid.sum(dim=1), emitted.sum(), num_accepted


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("draft_logits", [False, True], ids=["one_hot", "draft_logits"])
def test_torch_compile_fullgraph_matches_eager(device, draft_logits):
    torch._dynamo.reset()
    compiled = torch.compile(_step, fullgraph=True)
    for seed in (5, 6):  # the second call reuses the graph with new values
        batch = make_batch([3, 0, 4, 1, 2], 700, temperature=[1.0, 0.0, 0.8, 1.2, 0.0], draft_logits=draft_logits,
                           max_num_draft=4, seed=seed, device=device)
        args = batch.args()[:-1]
        expected = _step(*args)
        got = compiled(*args)
        for e, g in zip(expected, got):
            assert e.dtype == g.dtype and e.shape == g.shape
            assert torch.equal(e, g)
        # One emitted token after the accepted drafts: valid entries per row = num_accepted + 1.
        assert torch.equal(got[1], got[3].long() + 1)


@pytest.mark.parametrize("device", DEVICES)
def test_fake_tensor_shapes(device):
    """The fake kernel gives the real output metadata (shape, dtype, device)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    batch = make_batch([2, 0, 5], 100, temperature=1.0, max_num_draft=7, seed=2, device=device)
    real = verify_op(*batch.args())
    with FakeTensorMode() as mode:
        fake_args = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in batch.args()]
        fake = verify_op(*fake_args)
    for r, f in zip(real, fake):
        assert r.shape == f.shape and r.dtype == f.dtype and r.device == f.device


# --------------------------------------------------------------------------- dspark::schedule

# (case id, make_schedule_inputs keyword arguments)
SCHEDULE_OPCHECK_CASES = [
    ("no_max_len", dict(num_requests=5, num_draft=4)),
    ("max_len", dict(num_requests=7, num_draft=3, max_len=True, ties=True)),
    ("single_request", dict(num_requests=1, num_draft=6, max_len=True)),
    ("wide_batch", dict(num_requests=40, num_draft=8, max_len=True)),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kwargs", [c[1] for c in SCHEDULE_OPCHECK_CASES], ids=[c[0] for c in SCHEDULE_OPCHECK_CASES])
def test_schedule_opcheck(kwargs, device):
    inputs = make_schedule_inputs(seed=9, device=device, **kwargs)
    torch.library.opcheck(schedule_op, inputs.args())


@pytest.mark.parametrize("device", DEVICES)
def test_schedule_opcheck_strided(device):
    inputs = make_schedule_inputs(6, 5, seed=10, max_len=True, device=device).strided()
    assert not inputs.confidence.is_contiguous() and inputs.sps.stride(0) == 2
    torch.library.opcheck(schedule_op, inputs.args())


@pytest.mark.parametrize("device", DEVICES)
def test_schedule_fake_tensor_shapes(device):
    from torch._subclasses.fake_tensor import FakeTensorMode

    for max_len in (False, True):
        inputs = make_schedule_inputs(9, 3, seed=11, max_len=max_len, device=device)
        real = schedule_op(*inputs.args())
        with FakeTensorMode() as mode:
            fake = schedule_op(*(None if a is None else mode.from_tensor(a) for a in inputs.args()))
        assert real.shape == fake.shape and real.dtype == fake.dtype == torch.int32 and real.device == fake.device
