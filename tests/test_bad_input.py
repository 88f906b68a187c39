"""Malformed arguments: dspark::verify and dspark::schedule raise RuntimeError naming the
argument (CPU checks everything, values included); CUDA-only cases live at the bottom of each
op's section."""

import re

import pytest
import torch

from helpers import (
    Batch,
    ScheduleInputs,
    check_output_format,
    check_schedule_output,
    cuda_only,
    make_batch,
    make_schedule_inputs,
    run_op,
    schedule_op,
    verify_op,
    with_replaced,
)

NAN = float("nan")


def valid_batch(device: str = "cpu") -> Batch:
    # B = 3 requests with L = [2, 0, 1]: D = 3 drafts, D + B = 6 target rows, V = 10.
    return make_batch([2, 0, 1], 10, temperature=[1.0, 0.0, 0.5], draft_logits=True, max_num_draft=2, seed=1,
                      device=device)


def subject(pattern: str) -> str:
    """The message starts with the op name and then names the argument."""
    return rf"^dspark::verify: {pattern}"


def _cu(values):
    return torch.tensor(values, dtype=torch.int32)


# (case id, function batch -> bad batch, regex the message must match)
BAD_INPUTS = [
    # target_logits
    ("target_1d", lambda b: with_replaced(b, target_logits=b.target_logits[0]), subject("target_logits")),
    ("target_3d", lambda b: with_replaced(b, target_logits=b.target_logits[None]), subject("target_logits")),
    ("target_int", lambda b: with_replaced(b, target_logits=b.target_logits.to(torch.int32)), subject("target_logits")),
    ("target_float64", lambda b: with_replaced(b, target_logits=b.target_logits.double(),
                                               draft_logits=b.draft_logits.double()), subject("target_logits")),
    ("target_too_many_rows", lambda b: with_replaced(b, target_logits=torch.randn(7, 10)), subject(r"target_logits.*D \+ B")),
    ("target_too_few_rows", lambda b: with_replaced(b, target_logits=torch.randn(5, 10)), subject(r"target_logits.*D \+ B")),
    ("target_empty_vocab", lambda b: with_replaced(b, target_logits=torch.randn(6, 0), draft_logits=None),
     subject("target_logits")),
    # draft_token_ids
    ("ids_float", lambda b: with_replaced(b, draft_token_ids=b.draft_token_ids.float()), subject("draft_token_ids")),
    ("ids_int16", lambda b: with_replaced(b, draft_token_ids=b.draft_token_ids.to(torch.int16)), subject("draft_token_ids")),
    ("ids_2d", lambda b: with_replaced(b, draft_token_ids=b.draft_token_ids[None]), subject("draft_token_ids")),
    ("ids_negative", lambda b: with_replaced(b, draft_token_ids=torch.tensor([1, -1, 2])), subject("draft_token_ids")),
    ("ids_too_large", lambda b: with_replaced(b, draft_token_ids=torch.tensor([1, 2, 10])), subject("draft_token_ids")),
    ("ids_too_large_int32", lambda b: with_replaced(b, draft_token_ids=torch.tensor([99, 2, 3], dtype=torch.int32)),
     subject("draft_token_ids")),
    # draft_logits
    ("draft_logits_vocab", lambda b: with_replaced(b, draft_logits=torch.randn(3, 11)), subject(r"draft_logits.*vocab")),
    ("draft_logits_rows", lambda b: with_replaced(b, draft_logits=torch.randn(4, 10)), subject("draft_logits")),
    ("draft_logits_1d", lambda b: with_replaced(b, draft_logits=torch.randn(30)), subject("draft_logits")),
    ("draft_logits_dtype", lambda b: with_replaced(b, draft_logits=b.draft_logits.half()), subject(r"draft_logits.*dtype")),
    # cu_num_draft
    ("cu_int64", lambda b: with_replaced(b, cu_num_draft=b.cu_num_draft.long()), subject("cu_num_draft")),
    ("cu_2d", lambda b: with_replaced(b, cu_num_draft=b.cu_num_draft[None]), subject("cu_num_draft")),
    ("cu_empty", lambda b: with_replaced(b, cu_num_draft=_cu([])), subject("cu_num_draft")),
    ("cu_not_starting_at_0", lambda b: with_replaced(b, cu_num_draft=_cu([1, 2, 2, 3])), subject("cu_num_draft")),
    ("cu_decreasing", lambda b: with_replaced(b, cu_num_draft=_cu([0, 2, 1, 3])), subject("cu_num_draft")),
    ("cu_last_not_D", lambda b: with_replaced(b, cu_num_draft=_cu([0, 1, 1, 2])), subject("cu_num_draft")),
    ("cu_last_beyond_D", lambda b: with_replaced(b, cu_num_draft=_cu([0, 2, 2, 4])), subject("cu_num_draft")),
    # max_num_draft
    ("length_above_max_num_draft", lambda b: with_replaced(b, max_num_draft=1), r"^dspark::verify: .*max_num_draft"),
    ("max_num_draft_negative", lambda b: with_replaced(b, max_num_draft=-1), subject("max_num_draft")),
    # temperature
    ("temperature_float64", lambda b: with_replaced(b, temperature=b.temperature.double()), subject("temperature")),
    ("temperature_size", lambda b: with_replaced(b, temperature=torch.ones(4)), subject("temperature")),
    ("temperature_2d", lambda b: with_replaced(b, temperature=b.temperature[None]), subject("temperature")),
    ("temperature_negative", lambda b: with_replaced(b, temperature=torch.tensor([1.0, -0.5, 1.0])), subject("temperature")),
    ("temperature_nan", lambda b: with_replaced(b, temperature=torch.tensor([1.0, 0.0, NAN])), subject("temperature")),
    # seed / offset
    ("seed_int32", lambda b: with_replaced(b, seed=b.seed.to(torch.int32)), subject("seed")),
    ("seed_size", lambda b: with_replaced(b, seed=b.seed[:2]), subject("seed")),
    ("offset_int32", lambda b: with_replaced(b, offset=b.offset.to(torch.int32)), subject("offset")),
    ("offset_float", lambda b: with_replaced(b, offset=b.offset.float()), subject("offset")),
    ("offset_size", lambda b: with_replaced(b, offset=torch.zeros(5, dtype=torch.int64)), subject("offset")),
]


def test_valid_batch_is_valid():
    batch = valid_batch()
    check_output_format(batch, *run_op(batch))


@pytest.mark.parametrize("mutate, pattern", [c[1:] for c in BAD_INPUTS], ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_raises_naming_the_argument(mutate, pattern):
    bad = mutate(valid_batch())
    with pytest.raises(RuntimeError, match=r"dspark::verify") as info:
        verify_op(*bad.args())
    assert re.search(pattern, str(info.value).splitlines()[0]), f"message does not name the argument ({pattern}): {info.value}"


def test_bad_input_through_the_python_wrapper():
    import dspark_ext

    bad = with_replaced(valid_batch(), seed=torch.zeros(3, dtype=torch.int32))
    with pytest.raises(RuntimeError, match="seed"):
        dspark_ext.verify(*bad.args())


# --------------------------------------------------------------------------- CUDA only


@cuda_only
@pytest.mark.parametrize("argument", ["draft_token_ids", "draft_logits", "cu_num_draft", "temperature", "seed", "offset"])
def test_tensors_on_different_devices(argument):
    batch = valid_batch("cuda")
    bad = with_replaced(batch, **{argument: getattr(batch, argument).cpu()})
    with pytest.raises(RuntimeError, match=argument):
        verify_op(*bad.args())


@cuda_only
def test_target_on_cpu_rest_on_cuda():
    batch = valid_batch("cuda")
    bad = with_replaced(batch, target_logits=batch.target_logits.cpu())
    with pytest.raises(RuntimeError, match=r"dspark::verify"):
        verify_op(*bad.args())


#: Cases that need the tensors' values: checked on the host for CPU only (a check on CUDA
#: would need a device-to-host copy); CUDA handles them on the device instead.
VALUE_CASES = {
    "ids_negative", "ids_too_large", "ids_too_large_int32", "cu_not_starting_at_0", "cu_decreasing", "cu_last_not_D",
    "cu_last_beyond_D", "length_above_max_num_draft", "temperature_negative", "temperature_nan",
}
STRUCTURAL_CASES = [c for c in BAD_INPUTS if c[0] not in VALUE_CASES]


@cuda_only
@pytest.mark.parametrize("mutate, pattern", [c[1:] for c in STRUCTURAL_CASES], ids=[c[0] for c in STRUCTURAL_CASES])
def test_structural_errors_on_cuda(mutate, pattern):
    """Shapes and dtypes are checked on the host for CUDA tensors too (values are not:
    see test_verify_cuda.py for malformed values)."""
    bad = mutate(valid_batch())
    bad = Batch(*(a.cuda() if isinstance(a, torch.Tensor) else a for a in bad.args()))
    with pytest.raises(RuntimeError, match=pattern):
        verify_op(*bad.args())


# --------------------------------------------------------------------------- dspark::schedule


def valid_schedule_inputs(device: str = "cpu") -> ScheduleInputs:
    # R = 3 requests, K = 4 positions, N = 8 (sps has 9 entries), max_len given.
    return make_schedule_inputs(3, 4, seed=2, max_len=True, max_batch=8, device=device)


def schedule_subject(pattern: str) -> str:
    return rf"^dspark::schedule: {pattern}"


def _with_value(name: str, index, value):
    def mutate(inputs: ScheduleInputs) -> ScheduleInputs:
        tensor = getattr(inputs, name).clone()
        tensor[index] = value
        return with_replaced(inputs, **{name: tensor})

    return mutate


# (case id, function inputs -> bad inputs, regex the message must match)
BAD_SCHEDULE_INPUTS = [
    # confidence
    ("confidence_1d", lambda s: with_replaced(s, confidence=s.confidence[0]), schedule_subject("confidence")),
    ("confidence_3d", lambda s: with_replaced(s, confidence=s.confidence[None]), schedule_subject("confidence")),
    ("confidence_float64", lambda s: with_replaced(s, confidence=s.confidence.double()), schedule_subject("confidence")),
    ("confidence_bf16", lambda s: with_replaced(s, confidence=s.confidence.bfloat16()), schedule_subject("confidence")),
    ("confidence_int", lambda s: with_replaced(s, confidence=s.confidence.to(torch.int32)), schedule_subject("confidence")),
    ("confidence_too_many_tokens", lambda s: with_replaced(s, confidence=torch.zeros(1).expand(1, 2**22),
                                                           max_len=None), schedule_subject(r"confidence.*2\^22")),
    ("confidence_too_many_requests", lambda s: with_replaced(s, confidence=torch.zeros(1, 1).expand(2**21, 2),
                                                             sps=torch.ones(2**21 + 1), max_len=None),
     schedule_subject(r"confidence.*2\^22")),
    # sps
    ("sps_2d", lambda s: with_replaced(s, sps=s.sps[None]), schedule_subject("sps")),
    ("sps_0d", lambda s: with_replaced(s, sps=s.sps[0]), schedule_subject("sps")),
    ("sps_float64", lambda s: with_replaced(s, sps=s.sps.double()), schedule_subject("sps")),
    ("sps_half", lambda s: with_replaced(s, sps=s.sps.half()), schedule_subject("sps")),
    ("sps_empty", lambda s: with_replaced(s, sps=torch.ones(0)), schedule_subject("sps")),
    ("sps_below_R", lambda s: with_replaced(s, sps=s.sps[:3]), schedule_subject(r"sps.*R = confidence.size\(0\) = 3")),
    # max_len
    ("max_len_int64", lambda s: with_replaced(s, max_len=s.max_len.long()), schedule_subject("max_len")),
    ("max_len_float", lambda s: with_replaced(s, max_len=s.max_len.float()), schedule_subject("max_len")),
    ("max_len_2d", lambda s: with_replaced(s, max_len=s.max_len[None]), schedule_subject("max_len")),
    ("max_len_size", lambda s: with_replaced(s, max_len=s.max_len[:2]), schedule_subject(r"max_len.*size 3")),
    # values (checked on the host for CPU tensors only)
    ("confidence_nan", _with_value("confidence", (1, 2), NAN), schedule_subject(r"confidence.*\[1, 2\]")),
    ("confidence_above_1", _with_value("confidence", (0, 3), 1.0001), schedule_subject("confidence")),
    ("confidence_negative", _with_value("confidence", (2, 0), -1e-30), schedule_subject("confidence")),
    ("confidence_inf", _with_value("confidence", (2, 1), float("inf")), schedule_subject("confidence")),
    ("max_len_negative", _with_value("max_len", 1, -1), schedule_subject(r"max_len.*\[1\]")),
    ("sps_nan", _with_value("sps", 5, NAN), schedule_subject(r"sps.*\[5\]")),
    ("sps_at_R_zero", _with_value("sps", 3, 0.0), schedule_subject(r"sps.*\[3\]")),
    ("sps_at_N_negative", _with_value("sps", 8, -0.5), schedule_subject(r"sps.*\[8\]")),
    ("sps_inf", _with_value("sps", 6, float("inf")), schedule_subject("sps")),
]
SCHEDULE_VALUE_CASES = {"confidence_nan", "confidence_above_1", "confidence_negative", "confidence_inf",
                        "max_len_negative", "sps_nan", "sps_at_R_zero", "sps_at_N_negative", "sps_inf"}
SCHEDULE_STRUCTURAL_CASES = [c for c in BAD_SCHEDULE_INPUTS if c[0] not in SCHEDULE_VALUE_CASES]


def test_valid_schedule_inputs_are_valid():
    inputs = valid_schedule_inputs()
    check_schedule_output(inputs, schedule_op(*inputs.args()))
    # Values the checks allow: sps below R (never read) may hold anything; confidence 0, -0.0
    # and 1; max_len above K.
    edge = with_replaced(inputs, confidence=inputs.confidence.clone(), sps=inputs.sps.clone(),
                         max_len=torch.tensor([0, 4, 2**31 - 1], dtype=torch.int32))
    edge.confidence[0, :3] = torch.tensor([0.0, -0.0, 1.0])
    edge.sps[:3] = torch.tensor([NAN, -1.0, 0.0])
    check_schedule_output(edge, schedule_op(*edge.args()))


@pytest.mark.parametrize("mutate, pattern", [c[1:] for c in BAD_SCHEDULE_INPUTS], ids=[c[0] for c in BAD_SCHEDULE_INPUTS])
def test_bad_schedule_input_raises_naming_the_argument(mutate, pattern):
    bad = mutate(valid_schedule_inputs())
    with pytest.raises(RuntimeError, match=r"dspark::schedule") as info:
        schedule_op(*bad.args())
    assert re.search(pattern, str(info.value).splitlines()[0]), f"message does not name the argument ({pattern}): {info.value}"


def test_bad_schedule_input_through_the_python_wrapper():
    import dspark_ext

    bad = with_replaced(valid_schedule_inputs(), max_len=torch.zeros(3, dtype=torch.int64))
    with pytest.raises(RuntimeError, match="max_len"):
        dspark_ext.schedule(*bad.args())


@cuda_only
@pytest.mark.parametrize("mutate, pattern", [c[1:] for c in SCHEDULE_STRUCTURAL_CASES],
                         ids=[c[0] for c in SCHEDULE_STRUCTURAL_CASES])
def test_schedule_structural_errors_on_cuda(mutate, pattern):
    """Shapes and dtypes are checked on the host for CUDA tensors too (values are sanitized on
    the device instead: see test_schedule_cuda.py)."""
    bad = mutate(valid_schedule_inputs()).to("cuda")
    with pytest.raises(RuntimeError, match=pattern):
        schedule_op(*bad.args())


@cuda_only
@pytest.mark.parametrize("argument", ["sps", "max_len"])
def test_schedule_tensors_on_different_devices(argument):
    inputs = valid_schedule_inputs("cuda")
    bad = with_replaced(inputs, **{argument: getattr(inputs, argument).cpu()})
    with pytest.raises(RuntimeError, match=schedule_subject(argument)):
        schedule_op(*bad.args())


@cuda_only
def test_schedule_confidence_on_cpu_rest_on_cuda():
    inputs = valid_schedule_inputs("cuda")
    with pytest.raises(RuntimeError, match=r"dspark::schedule: (sps|max_len)"):
        schedule_op(*with_replaced(inputs, confidence=inputs.confidence.cpu()).args())
