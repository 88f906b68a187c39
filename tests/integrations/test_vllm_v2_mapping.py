"""The vLLM V2 runner patches (dspark_ext/integrations/vllm/v2_*.py) against vLLM 0.32's own
module objects, on CPU.

vLLM's V2 modules import on a CPU-only vLLM (their Triton kernels are placeholders that are
never launched here), so these tests patch the real modules and call the patched attributes with
CPU tensors shaped as V2 passes them (rejection_sampler.py:268-286, dspark/speculator.py:156-199):

- install_v2_patches replaces every module attribute holding `rejection_sample` and
  DSparkSpeculator._sample_sequential, once, and RejectionSampler._verify reaches verify;
- greedy verification equals the argmax walk (ragged batches, bf16 ties, a draft vocabulary
  narrower than the target's, greedy rows beside sampled ones);
- sampled verification follows the exact rejection-sampling law (chi-square + TV), and the same
  check rejects deliberately broken mappings (cu without its leading 0, drafts read one row early,
  q without the temperature, drafts taken as one-hot, temperature applied twice);
- the unsupported modes call vLLM's original function;
- DSpark's dense drafting: greedy tokens and confidences equal vLLM's own loop (it runs on CPU
  without draft logits), the probabilistic path writes the logits of vLLM's loop (teacher-forced)
  to the cache of real rows only, and draws follow softmax(l / T) (chi-square; broken variants
  rejected); the top-k / reduced-vocabulary / watermark variants run the original loop.

vLLM's placeholder drafts (-1) need CUDA (verify refuses them on CPU): that test is CUDA-only.
Run in the vLLM venv:
    PYTHONPATH=. ~/.cache/dspark-ci/venv-vllm/bin/python -m pytest -q tests/integrations/test_vllm_v2_mapping.py
"""

import inspect
import types

import pytest
import torch

pytest.importorskip("vllm", reason="vLLM is not installed (the vLLM test venv of .ci/run has it)")
rejection_sampler = pytest.importorskip("vllm.v1.worker.gpu.spec_decode.rejection_sampler")
rejection_sampler_utils = pytest.importorskip("vllm.v1.worker.gpu.spec_decode.rejection_sampler_utils")
dspark_speculator = pytest.importorskip("vllm.v1.worker.gpu.spec_decode.dspark.speculator")

from helpers import check_distribution, cuda_only, exact_probs, joint_first_two_exact  # noqa: E402

from dspark_ext.integrations.vllm import v2_markov, v2_runner, v2_verify  # noqa: E402

DSparkSpeculator = dspark_speculator.DSparkSpeculator


@pytest.fixture(scope="module", autouse=True)
def installed():
    replaced = v2_runner.install_v2_patches()
    yield replaced
    v2_runner.uninstall_v2_patches()


def original_of(function):
    return getattr(function, "__dspark_original__", function)


# --------------------------------------------------------------------------- installation


def test_install_replaces_every_holder_once(installed):
    assert installed, "install_v2_patches replaced nothing"
    patched = rejection_sampler_utils.rejection_sample
    original = patched.__dspark_original__
    assert rejection_sampler.rejection_sample is patched  # the copy RejectionSampler._verify calls
    import vllm.v1.watermarking.spec_decode as watermark_spec_decode

    assert watermark_spec_decode.rejection_sample is patched
    assert original.__module__ == rejection_sampler_utils.__name__ and original.__name__ == "rejection_sample"
    assert DSparkSpeculator._sample_sequential.__dspark_original__.__qualname__ == \
        "DSparkSpeculator._sample_sequential"
    assert any("rejection_sampler.rejection_sample" in name for name in installed)
    assert any("_sample_sequential" in name for name in installed)
    assert v2_runner.install_v2_patches() == []  # idempotent


# --------------------------------------------------------------------------- V2 verification inputs


class V2Batch(types.SimpleNamespace):
    """rejection_sample's arguments as RejectionSampler._verify passes them
    (rejection_sampler.py:268-281)."""

    def args(self, **changes):
        a = dict(vars(self), **changes)
        return (a["target_logits"], a["draft_logits"], a["draft_sampled"], a["cu_num_logits"], a["pos"],
                a["idx_mapping"], a["expanded_idx_mapping"], a["expanded_local_pos"], a["temperature"], a["seed"],
                a["num_speculative_steps"], None)


def v2_batch(lengths, vocab, num_steps, temperatures, g, *, dtype=torch.float32, draft_vocab=None,
             with_draft_logits=True, max_num_reqs=None, target_logits=None):
    """Request b has lengths[b] drafts (random ids; set them with set_drafts) and lives in a
    random request-state slot; target rows are random unless given."""
    num_requests = len(lengths)
    max_num_reqs = max_num_reqs or num_requests + 3
    idx_mapping = torch.randperm(max_num_reqs, generator=g)[:num_requests]
    rows = torch.tensor(lengths, dtype=torch.int64) + 1
    cu_num_logits = torch.zeros(num_requests + 1, dtype=torch.int32)
    cu_num_logits[1:] = torch.cumsum(rows, 0)
    num_logits = int(cu_num_logits[-1])
    local_pos = torch.cat([torch.arange(n) for n in rows.tolist()])
    pos = torch.repeat_interleave(torch.randint(5, 4000, (num_requests,), generator=g), rows) + local_pos
    temperature = torch.zeros(max_num_reqs, dtype=torch.float32)
    temperature[idx_mapping] = torch.tensor(temperatures, dtype=torch.float32)
    if target_logits is None:
        target_logits = (torch.randn(num_logits, vocab, generator=g) * 2).to(dtype)
    draft_logits = None
    if with_draft_logits:
        draft_logits = (torch.randn(max_num_reqs, num_steps, draft_vocab or vocab, generator=g) * 2).to(dtype)
    return V2Batch(
        target_logits=target_logits,
        draft_logits=draft_logits,
        draft_sampled=torch.randint(0, vocab, (num_logits,), generator=g, dtype=torch.int32),
        cu_num_logits=cu_num_logits,
        pos=pos,
        idx_mapping=idx_mapping,
        expanded_idx_mapping=torch.repeat_interleave(idx_mapping, rows),
        expanded_local_pos=local_pos.to(torch.int32),
        temperature=temperature,
        seed=torch.randint(-(1 << 62), 1 << 62, (max_num_reqs,), generator=g, dtype=torch.int64),
        num_speculative_steps=num_steps,
    )


def request_rows(batch, b):
    return int(batch.cu_num_logits[b]), int(batch.cu_num_logits[b + 1])


def set_argmax_drafts(batch, g, vocab, hit=0.7):
    """Each draft is the argmax of its target row with probability `hit` (so some are accepted)."""
    rows = batch.target_logits[:, :vocab].float()
    for b in range(batch.idx_mapping.shape[0]):
        start, end = request_rows(batch, b)
        for r in range(start, end - 1):
            take_argmax = float(torch.rand((), generator=g)) < hit
            batch.draft_sampled[r + 1] = int(rows[r].argmax()) if take_argmax else \
                int(torch.randint(0, vocab, (), generator=g))


def greedy_expectation(batch, b, vocab):
    """Accepted drafts while each equals its row's argmax (first index on ties), then the argmax."""
    rows = batch.target_logits[:, :vocab].float()
    start, end = request_rows(batch, b)
    out = []
    for r in range(start, end - 1):
        if int(batch.draft_sampled[r + 1]) != int(rows[r].argmax()):
            break
        out.append(int(batch.draft_sampled[r + 1]))
    out.append(int(rows[start + len(out)].argmax()))
    return out


def run_patched(batch, **changes):
    sampled, num_sampled = rejection_sampler.rejection_sample(*batch.args(**changes))
    assert sampled.dtype == torch.int64 and num_sampled.dtype == torch.int32
    assert sampled.shape == (batch.idx_mapping.shape[0], batch.num_speculative_steps + 1)
    return sampled, num_sampled


def assert_greedy_rows(batch, sampled, num_sampled, vocab, requests=None):
    for b in requests if requests is not None else range(batch.idx_mapping.shape[0]):
        expected = greedy_expectation(batch, b, vocab)
        assert int(num_sampled[b]) == len(expected), (b, expected, sampled[b])
        assert sampled[b, :len(expected)].tolist() == expected, (b, expected, sampled[b])


# --------------------------------------------------------------------------- greedy verification

GREEDY_CASES = {
    # (lengths, vocab, steps, dtype, with_draft_logits, draft_vocab, integer_logits)
    "fp32-processed-with-q": ([3, 0, 4, 1, 2, 4, 0], 50, 4, torch.float32, True, None, False),
    "bf16-raw-ngram-ties": ([2, 3, 0, 5, 1, 5], 300, 5, torch.bfloat16, False, None, True),
    "narrow-draft-vocab": ([2, 1, 3, 0], 60, 3, torch.float32, True, 52, False),
    "no-drafts-at-all": ([0, 0, 0], 40, 2, torch.float32, True, None, False),
    "one-request": ([3], 70, 3, torch.bfloat16, True, None, False),
}


@pytest.mark.parametrize("case", list(GREEDY_CASES))
def test_greedy_equals_argmax_walk(case):
    lengths, vocab, steps, dtype, with_q, draft_vocab, integer_logits = GREEDY_CASES[case]
    g = torch.Generator().manual_seed(1)
    target = None
    if integer_logits:  # few distinct values: tied maxima everywhere
        target = torch.randint(-3, 4, (sum(lengths) + len(lengths), vocab), generator=g).to(dtype)
    batch = v2_batch(lengths, vocab, steps, [0.0] * len(lengths), g, dtype=dtype, with_draft_logits=with_q,
                     draft_vocab=draft_vocab, target_logits=target)
    effective_vocab = min(vocab, draft_vocab or vocab)
    if draft_vocab:  # columns past the draft vocabulary do not count (rejection_sampler_utils.py:1093)
        batch.target_logits[:, draft_vocab:] = 100.0
    set_argmax_drafts(batch, g, effective_vocab)
    sampled, num_sampled = run_patched(batch)
    assert_greedy_rows(batch, sampled, num_sampled, effective_vocab)
    if sum(lengths):
        assert int(num_sampled.sum()) > len(lengths), "no draft was accepted: the case tests nothing"


def test_greedy_rows_beside_sampled_rows():
    lengths = [3, 2, 4, 1, 3, 0, 4]
    temperatures = [0.0, 0.8, 0.0, 1.0, 0.0, 0.5, 1.3]
    g = torch.Generator().manual_seed(2)
    batch = v2_batch(lengths, 40, 4, temperatures, g)
    set_argmax_drafts(batch, g, 40)
    sampled, num_sampled = run_patched(batch)
    assert_greedy_rows(batch, sampled, num_sampled, 40, [b for b, t in enumerate(temperatures) if t == 0])
    for b, length in enumerate(lengths):  # sampled rows: the accepted drafts, then one token in range
        start, _ = request_rows(batch, b)
        n = int(num_sampled[b])
        assert 1 <= n <= length + 1
        assert sampled[b, :n - 1].tolist() == batch.draft_sampled[start + 1:start + n].tolist()
        assert 0 <= int(sampled[b, n - 1]) < 40


def test_rejection_sampler_verify_reaches_dspark():
    """vLLM's own RejectionSampler._verify (rejection_sampler.py:244) with a sampler stub."""
    g = torch.Generator().manual_seed(3)
    lengths = [2, 4, 0, 3]
    batch = v2_batch(lengths, 30, 4, [0.0] * 4, g)
    set_argmax_drafts(batch, g, 30)
    sampler = types.SimpleNamespace(
        apply_sampling_params=lambda logits, *args: logits,
        sampling_states=types.SimpleNamespace(temperature=types.SimpleNamespace(gpu=batch.temperature),
                                              seeds=types.SimpleNamespace(gpu=batch.seed)),
        use_fp64_gumbel=False)
    rs = rejection_sampler.RejectionSampler.__new__(rejection_sampler.RejectionSampler)
    rs.sampler, rs.watermark_key, rs.num_speculative_steps = sampler, None, 4
    rs.synthetic_conditional_rates, rs.use_block_verification = None, False
    calls = dict(v2_verify.call_counts)
    _, sampled, num_sampled = rs._verify(
        batch.target_logits, batch.draft_logits, batch.draft_sampled, batch.pos, batch.cu_num_logits,
        batch.idx_mapping, batch.idx_mapping.numpy(), batch.expanded_idx_mapping, batch.expanded_local_pos,
        None, batch.draft_sampled)
    assert v2_verify.call_counts["verify"] == calls["verify"] + 1
    assert_greedy_rows(batch, sampled, num_sampled, 30)


# --------------------------------------------------------------------------- sampled law

LAW_REQUESTS = 3000
LAW_VOCAB = 5
#: Target rows (draft position, bonus) and three draft rows, pre-temperature; far apart so
#: every broken mapping moves the law by much more than the test's resolution.
P0 = torch.tensor([2.0, 0.5, -1.0, 1.0, 0.0])
P1 = torch.tensor([-1.0, 1.5, 0.0, 0.3, 1.0])
Q_VARIANTS = torch.tensor([[0.0, 2.0, 1.0, -1.0, 0.5], [1.5, -0.5, 0.5, 0.0, -1.5], [-1.0, 0.0, 2.0, 1.0, 0.0]])


def law_batch(temperature, dtype, processed):
    """LAW_REQUESTS requests with one draft each, drawn from q of its slot's variant (slot % 3).
    `processed`: the target rows are divided by T as Sampler.apply_sampling_params does
    (float32); otherwise they are raw (the unprocessed case: bf16 at T = 1)."""
    g = torch.Generator().manual_seed(4)
    n = LAW_REQUESTS
    batch = v2_batch([1] * n, LAW_VOCAB, 2, [temperature] * n, g, dtype=dtype, max_num_reqs=n)
    raw = torch.stack([P0, P1]).repeat(n, 1)
    batch.target_logits = (raw / temperature if processed else raw).to(dtype)
    variant = batch.idx_mapping % 3
    cache = (torch.randn(n, 2, LAW_VOCAB, generator=g) * 3).to(dtype)  # step 1 is never read (L = 1)
    cache[:, 0] = Q_VARIANTS[torch.arange(n) % 3].to(dtype)
    batch.draft_logits = cache
    q_laws = [exact_probs(Q_VARIANTS[v].to(dtype), temperature) for v in range(3)]
    draws = torch.stack([torch.multinomial(q_laws[v].float(), 1, generator=g)[0] for v in variant.tolist()])
    batch.draft_sampled[1::2] = draws.to(torch.int32)
    p0 = exact_probs(batch.target_logits[0], 1.0)
    p1 = exact_probs(batch.target_logits[1], 1.0)
    counts = torch.bincount(variant, minlength=3).double() / n
    expected = sum(counts[v] * joint_first_two_exact(p0, q_laws[v], p1) for v in range(3))
    return batch, expected


def law_check(batch, expected):
    sampled, num_sampled = run_patched(batch)
    second = torch.where(num_sampled >= 2, sampled[:, 1], -1)
    codes = sampled[:, 0] * (LAW_VOCAB + 1) + second + 1
    return check_distribution(codes, expected.flatten())


LAW_CASES = {"fp32-processed-T0.7": (0.7, torch.float32, True), "bf16-raw-T1": (1.0, torch.bfloat16, False)}


def broken_mappings(temperature):
    real = {name: getattr(v2_verify, name) for name in (
        "cu_num_draft_from_cu_num_logits", "draft_token_ids_for_verify", "draft_logits_for_verify",
        "verify_temperature")}
    broken = {
        # vLLM's cumulative counts shifted by one request: the leading 0 dropped, the last repeated
        "cu_without_leading_zero": ("cu_num_draft_from_cu_num_logits", lambda cu: torch.cat(
            [real["cu_num_draft_from_cu_num_logits"](cu)[1:], real["cu_num_draft_from_cu_num_logits"](cu)[-1:]])),
        # the input token of the draft's own row (the previous token) taken as the draft
        "drafts_one_row_early": ("draft_token_ids_for_verify", lambda ids, layout: ids[layout.logits_row]),
        # drafts taken as deterministic: the correction is drawn from p without the draft, not from p - q
        "drafts_as_one_hot": ("draft_logits_for_verify", lambda *args, **kwargs: None),
    }
    if temperature != 1.0:
        # q from the pre-temperature logits as they are
        broken["q_without_temperature"] = ("draft_logits_for_verify", lambda d, s, layout, t, ids, v, dtype:
                                           real["draft_logits_for_verify"](d, s, layout, torch.ones_like(t), ids,
                                                                           v, dtype))
        # the processed rows divided by T a second time
        broken["temperature_twice"] = ("verify_temperature", lambda t: t.clone())
    return broken


@pytest.mark.parametrize("case", list(LAW_CASES))
def test_sampled_law_and_broken_mappings(case, monkeypatch):
    temperature, dtype, processed = LAW_CASES[case]
    batch, expected = law_batch(temperature, dtype, processed)
    result = law_check(batch, expected)
    assert result.ok, f"the patched rejection_sample does not follow the rejection-sampling law: {result}"
    for name, (attribute, broken) in broken_mappings(temperature).items():
        with monkeypatch.context() as m:
            m.setattr(v2_verify, attribute, broken)
            try:
                result = law_check(batch, expected)
            except RuntimeError:  # verify's own argument checks refused it (CPU checks cu's values)
                continue
        assert not result.ok, f"the law check accepts the broken mapping {name}: {result}"


def test_sampled_reproducible_and_keyed_by_seed_and_position():
    batch, _ = law_batch(0.7, torch.float32, True)
    first, n_first = run_patched(batch)
    again, n_again = run_patched(batch)
    assert torch.equal(first, again) and torch.equal(n_first, n_again)
    shifted, _ = run_patched(batch, pos=batch.pos + 1)
    reseeded, _ = run_patched(batch, seed=batch.seed + 1)
    assert (shifted[:, 0] != first[:, 0]).float().mean() > 0.2
    assert (reseeded[:, 0] != first[:, 0]).float().mean() > 0.2


# --------------------------------------------------------------------------- mapping details, fallbacks


def test_mapping_of_placeholders_and_layout():
    """-1 placeholder drafts stay out of the vocabulary (verify rejects them) and their q rows are
    -inf (q = 0: the token is drawn from p, as vLLM does, rejection_sampler_utils.py:835-838)."""
    g = torch.Generator().manual_seed(5)
    batch = v2_batch([2, 0, 3], 20, 3, [0.9, 0.0, 1.2], g)
    batch.draft_sampled[batch.cu_num_logits[2] + 2] = -1  # request 2, draft 1
    args = v2_verify.map_rejection_sample_arguments(
        batch.target_logits, batch.draft_logits, batch.draft_sampled, batch.cu_num_logits, batch.pos,
        batch.idx_mapping, batch.temperature, batch.seed, batch.num_speculative_steps)
    assert args.cu_num_draft.tolist() == [0, 2, 2, 5] and args.cu_num_draft.dtype == torch.int32
    assert args.draft_token_ids.tolist() == (batch.draft_sampled[[1, 2, 5, 6, 7]]).tolist()
    assert args.draft_token_ids[3] == -1 and torch.isneginf(args.draft_logits[3]).all()
    state = batch.idx_mapping[[0, 0, 2, 2, 2]]
    steps = torch.tensor([0, 1, 0, 1, 2])
    q = batch.draft_logits[state, steps] / batch.temperature[state][:, None]
    keep = torch.tensor([True, True, True, False, True])
    assert torch.equal(args.draft_logits[keep], q[keep])
    assert args.temperature.tolist() == [1.0, 0.0, 1.0]
    assert torch.equal(args.seed, batch.seed[batch.idx_mapping])
    assert torch.equal(args.offset, batch.pos[batch.cu_num_logits[:-1].long()])
    assert args.max_num_draft == 3


FALLBACKS = {
    "synthetic": {"synthetic_conditional_rates": torch.ones(4)},
    "block": {"use_block_verification": True},
    "fp64": {"use_fp64": True},
    "watermark": {"contexts": torch.zeros(1, 1, dtype=torch.int64), "watermarking": torch.zeros(1, dtype=torch.bool),
                  "watermark_key": 7},
    "unknown_argument": {"a_future_option": 1},
}


@pytest.mark.parametrize("case", list(FALLBACKS))
def test_unsupported_modes_call_the_original(case):
    calls = []

    def original(*args, **kwargs):  # the signature of vLLM's rejection_sample
        calls.append((args, kwargs))
        return "original"

    original.__signature__ = inspect.signature(original_of(rejection_sampler_utils.rejection_sample))
    replacement = v2_verify.make_rejection_sample_replacement(original)
    g = torch.Generator().manual_seed(6)
    batch = v2_batch([1, 2], 10, 4, [0.0, 0.0], g)
    args = batch.args()[:11]
    assert replacement(*args, **FALLBACKS[case]) == "original" and len(calls) == 1
    assert calls[0] == (args, FALLBACKS[case])
    sampled, _ = replacement(*args)  # the plain call runs verify
    assert len(calls) == 1 and sampled.shape == (2, 5)


def test_low_precision_target_beside_float32_draft_logits_is_not_mapped():
    """q = draft / T is exact in float32 only: a bf16 target beside float32 draft logits (which
    RejectionSampler never passes) goes to the original function."""
    g = torch.Generator().manual_seed(8)
    batch = v2_batch([1, 2], 10, 4, [1.0, 1.0], g, dtype=torch.bfloat16)
    names = ("target_logits", "draft_logits", "draft_sampled", "cu_num_logits")
    assert v2_verify.fallback_reason(dict(zip(names, batch.args()[:4]))) is None
    batch.draft_logits = batch.draft_logits.float()
    assert "bfloat16" in v2_verify.fallback_reason(dict(zip(names, batch.args()[:4])))


@cuda_only
def test_cuda_placeholders_rejected_and_drawn_from_p():
    """On CUDA verify takes vLLM's -1 placeholders: greedy emits the argmax there, sampled rows
    stop there (rejection_sampler_utils.py:562-569)."""
    g = torch.Generator().manual_seed(7)
    lengths = [3, 3, 2, 4]
    batch = v2_batch(lengths, 64, 4, [0.0, 0.0, 0.9, 1.1], g)
    set_argmax_drafts(batch, g, 64, hit=1.0)
    batch.draft_sampled[batch.cu_num_logits[[0, 2, 3]].long() + 2] = -1  # second draft of requests 0, 2, 3
    cuda = V2Batch(**{k: (v.cuda() if isinstance(v, torch.Tensor) else v) for k, v in vars(batch).items()})
    sampled, num_sampled = (t.cpu() for t in run_patched(cuda))
    assert_greedy_rows(batch, sampled, num_sampled, 64, [0, 1])
    assert int(num_sampled[0]) == 2 and int(num_sampled[1]) == 4
    assert all(int(num_sampled[b]) <= 2 for b in (2, 3))


# --------------------------------------------------------------------------- DSpark drafting

VOCAB, HIDDEN, RANK = 50, 16, 4  # VOCAB is not a multiple of 64: markov_w2 is padded to 64 rows


def dspark_draft_model(g, *, vocab=VOCAB, with_markov_confidence=True):
    """vLLM's Qwen3DSparkForCausalLM methods over vLLM's own Markov head, LM head and logits
    processor, randomly initialised. The confidence head is vLLM's DSparkConfidenceHead with a
    torch Linear as `proj` (ReplicatedLinear needs a tensor-parallel group; same math)."""
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.model_executor.layers.logits_processor import LogitsProcessor
    from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead
    from vllm.model_executor.models.qwen3_dspark import (
        DSparkConfidenceHead,
        DSparkMarkovHead,
        Qwen3DSparkForCausalLM,
    )

    with set_current_vllm_config(VllmConfig()):
        model = Qwen3DSparkForCausalLM.__new__(Qwen3DSparkForCausalLM)
        torch.nn.Module.__init__(model)
        model.model = torch.nn.Module()
        model.model.markov_head = DSparkMarkovHead(vocab, vocab, RANK, prefix="model.markov_head")
        model.lm_head = ParallelLMHead(vocab, HIDDEN, prefix="lm_head", disable_tp=True)  # no TP group here
        model.logits_processor = LogitsProcessor(vocab)
    model.draft_id_to_target_id = None
    head = model.model.markov_head
    with torch.no_grad():
        for weight, scale in ((model.lm_head.weight, 0.6), (head.markov_w1.weight, 1.0),
                              (head.markov_w2.weight, 1.0)):
            weight.copy_(torch.randn(weight.shape, generator=g) * scale)
    for layer in (model.lm_head, head.markov_w2):
        layer.quant_method.process_weights_after_loading(layer)
    confidence = DSparkConfidenceHead.__new__(DSparkConfidenceHead)
    torch.nn.Module.__init__(confidence)
    confidence.with_markov = with_markov_confidence
    confidence.proj = torch.nn.Linear(HIDDEN + (RANK if with_markov_confidence else 0), 1, bias=True)
    with torch.no_grad():
        confidence.proj.weight.copy_(torch.randn(confidence.proj.weight.shape, generator=g) * 0.3)
        confidence.proj.bias.fill_(0.1)
    model.model.confidence_head = confidence
    return model


def dspark_speculator(model, g, num_reqs, num_steps, *, temperature=0.8, probabilistic=True, num_padded=0,
                      max_num_reqs=None, cache_vocab=None, same_rows=False):
    """A DSparkSpeculator (no __init__) holding what _sample_sequential reads, filled the way
    prepare_dflash_inputs fills it (dflash/speculator.py:534-722): sample_from_anchor layout,
    `num_padded` CUDA-graph padding rows (state -1, position 0) after the real ones."""
    total = num_reqs + num_padded
    max_num_reqs = max_num_reqs or total + 2
    spec = DSparkSpeculator.__new__(DSparkSpeculator)
    spec.model, spec.num_speculative_steps = model, num_steps
    spec._draft_topk = spec.draft_watermarker = spec._d2t_scatter_index = spec.acceptance_estimator = None
    spec.use_confidence_head, spec.use_fp64_gumbel = True, False
    states = torch.randperm(max_num_reqs, generator=g)[:num_reqs]
    slot_state = torch.full((total, num_steps), -1, dtype=torch.int64)
    slot_state[:num_reqs] = states[:, None]
    spec.sample_idx_mapping = slot_state.flatten()
    anchor_pos = torch.randint(10, 5000, (num_reqs,), generator=g)
    sample_pos = torch.zeros(total, num_steps, dtype=torch.int64)
    sample_pos[:num_reqs] = anchor_pos[:, None] + 1 + torch.arange(num_steps)
    spec.sample_pos = sample_pos.flatten()
    spec.sample_indices = torch.arange(total * num_steps)
    spec._anchor_idx = torch.arange(total) * num_steps
    spec._step_cols = torch.arange(num_steps, dtype=torch.int32)
    input_ids = torch.randint(0, VOCAB, (total * num_steps,), generator=g, dtype=torch.int32)
    if same_rows:
        input_ids[spec._anchor_idx] = 7
    spec.input_buffers = types.SimpleNamespace(input_ids=input_ids)
    spec.temperature = torch.rand(max_num_reqs, generator=g) + 0.5
    spec.temperature[states] = torch.as_tensor(temperature, dtype=torch.float32)
    spec.seeds = torch.randint(-(1 << 62), 1 << 62, (max_num_reqs,), generator=g)
    spec.draft_tokens = torch.zeros(max_num_reqs, num_steps, dtype=torch.int64)
    spec.draft_token_confidence_probs = torch.zeros(max_num_reqs, num_steps)
    spec.draft_logits = (torch.randn(max_num_reqs, num_steps, cache_vocab or VOCAB, generator=g)
                         if probabilistic else None)
    hidden = torch.randn(total * num_steps, HIDDEN, generator=g)
    if same_rows:
        hidden[:] = hidden[:num_steps].repeat(total, 1)
    return spec, hidden, states


def vllm_loop_teacher_forced(spec, hidden, num_reqs, tokens):
    """vLLM's dense loop (dspark/speculator.py:165-199) with the draws replaced by `tokens`:
    the logits of every step and the confidences."""
    num_steps = spec.num_speculative_steps
    model = spec.model
    sample_hidden = hidden[spec.sample_indices[:num_reqs * num_steps]]
    base = model.compute_draft_logits(sample_hidden).view(num_reqs, num_steps, -1)
    prev = spec.input_buffers.input_ids[spec._anchor_idx[:num_reqs]].long()
    logits, embeds = [], []
    for i in range(num_steps):
        embed = model.markov_embed(prev)
        embeds.append(embed)
        logits.append(base[:, i] + model.markov_bias(embed))
        prev = tokens[:, i]
    confidence = model.compute_confidence(sample_hidden, torch.stack(embeds, dim=1).flatten(0, 1))
    return torch.stack(logits, dim=1), confidence.view(num_reqs, num_steps)


@pytest.fixture(scope="module")
def draft_model():
    return dspark_draft_model(torch.Generator().manual_seed(10))


@pytest.mark.parametrize("with_markov_confidence", [True, False])
def test_dspark_greedy_equals_vllm_loop(with_markov_confidence):
    """Without a draft-logits cache vLLM drafts by argmax (speculator.py:124-126): its own loop
    runs on CPU and must give the same tokens and confidences."""
    g = torch.Generator().manual_seed(11)
    model = dspark_draft_model(g, with_markov_confidence=with_markov_confidence)
    num_reqs, num_steps = 6, 4
    spec, hidden, states = dspark_speculator(model, g, num_reqs, num_steps, probabilistic=False, num_padded=2)
    total = num_reqs + 2
    original_of(DSparkSpeculator._sample_sequential)(spec, total, hidden)
    expected_tokens = spec.draft_tokens[:num_reqs].clone()
    expected_confidence = spec.draft_token_confidence_probs[:num_reqs].clone()
    spec.draft_tokens.zero_()
    spec.draft_token_confidence_probs.zero_()
    calls = dict(v2_markov.call_counts)
    DSparkSpeculator._sample_sequential(spec, total, hidden)
    assert v2_markov.call_counts["markov_draft"] == calls["markov_draft"] + 1
    assert torch.equal(spec.draft_tokens[:num_reqs], expected_tokens)
    torch.testing.assert_close(spec.draft_token_confidence_probs[:num_reqs], expected_confidence,
                               rtol=1e-5, atol=1e-6)


def test_dspark_probabilistic_writes_vllm_logits_to_real_rows(draft_model):
    g = torch.Generator().manual_seed(12)
    num_reqs, num_steps, padded = 7, 3, 2
    temperatures = torch.tensor([0.0, 0.8, 1.0, 0.0, 1.5, 0.6, 0.0])
    spec, hidden, states = dspark_speculator(draft_model, g, num_reqs, num_steps, temperature=temperatures,
                                             num_padded=padded, cache_vocab=VOCAB + 6)
    cache_before = spec.draft_logits.clone()
    DSparkSpeculator._sample_sequential(spec, num_reqs + padded, hidden)
    tokens = spec.draft_tokens[:num_reqs]
    logits, confidence = vllm_loop_teacher_forced(spec, hidden, num_reqs, tokens)
    torch.testing.assert_close(spec.draft_logits[states, :, :VOCAB], logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(spec.draft_token_confidence_probs[:num_reqs], confidence, rtol=1e-5, atol=1e-6)
    greedy = temperatures == 0
    assert torch.equal(tokens[greedy], logits[greedy].argmax(-1))
    untouched = torch.ones(spec.draft_logits.shape[0], dtype=torch.bool)
    untouched[states] = False
    assert torch.equal(spec.draft_logits[untouched], cache_before[untouched])  # padded rows wrote nothing
    assert torch.equal(spec.draft_logits[:, :, VOCAB:], cache_before[:, :, VOCAB:])


def test_dspark_dummy_batch_writes_nothing(draft_model):
    g = torch.Generator().manual_seed(13)
    spec, hidden, _ = dspark_speculator(draft_model, g, 0, 3, num_padded=4)
    cache_before = spec.draft_logits.clone()
    DSparkSpeculator._sample_sequential(spec, 4, hidden)
    assert torch.equal(spec.draft_logits, cache_before)


def test_dspark_acceptance_estimator_sees_each_step(draft_model):
    g = torch.Generator().manual_seed(14)
    spec, hidden, states = dspark_speculator(draft_model, g, 3, 3)
    seen = []
    spec.acceptance_estimator = types.SimpleNamespace(
        predict=lambda logits, idx, step, probs, temperature: seen.append((logits.clone(), idx.clone(), int(step))))
    DSparkSpeculator._sample_sequential(spec, 3, hidden)
    assert [s for _, _, s in seen] == [0, 1, 2]
    for logits, idx, step in seen:
        assert torch.equal(idx, states)
        torch.testing.assert_close(logits, spec.draft_logits[states, step, :VOCAB])


MARKOV_LAW_REQUESTS = 6000


def markov_law(spec, hidden, temperature):
    """Exact law of (x1, x2) for the shared anchor and base rows: softmax(l1 / T), then
    softmax(l2(x1) / T) (vLLM's loop, float64)."""
    model = spec.model
    base = model.compute_draft_logits(hidden[:2]).double()
    anchor = spec.input_buffers.input_ids[0].long().view(1)
    l1 = base[0] + model.markov_bias(model.markov_embed(anchor))[0].double()
    p1 = torch.softmax(l1 / temperature, -1)
    l2 = base[1][None, :] + model.markov_bias(model.markov_embed(torch.arange(VOCAB))).double()
    p2 = torch.softmax(l2 / temperature, -1)
    return p1[:, None] * p2


def test_dspark_sampled_law_and_broken_mappings(draft_model, monkeypatch):
    g = torch.Generator().manual_seed(15)
    temperature = 0.8
    spec, hidden, _ = dspark_speculator(draft_model, g, MARKOV_LAW_REQUESTS, 2, temperature=temperature,
                                        same_rows=True)
    expected = markov_law(spec, hidden, temperature).flatten()

    def law_ok():
        DSparkSpeculator._sample_sequential(spec, MARKOV_LAW_REQUESTS, hidden)
        tokens = spec.draft_tokens[:MARKOV_LAW_REQUESTS]
        return check_distribution(tokens[:, 0] * VOCAB + tokens[:, 1], expected)

    result = law_ok()
    assert result.ok, f"DSpark drafting does not follow softmax(l / T): {result}"
    real_temperature = v2_markov.draft_temperature
    broken = {
        "temperature_one": ("draft_temperature", lambda s, state, is_request: torch.ones_like(
            real_temperature(s, state, is_request))),
        "no_anchor": ("markov_weights", lambda head, vocab: v2_markov.MarkovWeights(
            torch.zeros_like(head.markov_w1.weight[:vocab]), head.markov_w2.weight[:vocab])),
    }
    for name, (attribute, replacement) in broken.items():
        with monkeypatch.context() as m:
            m.setattr(v2_markov, attribute, replacement)
            result = law_ok()
        assert not result.ok, f"the law check accepts the broken mapping {name}: {result}"


def test_dspark_variants_run_the_original_loop(draft_model):
    g = torch.Generator().manual_seed(16)
    calls = []
    replacement = v2_markov.make_sample_sequential_replacement(lambda self, n, h: calls.append(n))
    variants = {
        "top-k": lambda s: setattr(s, "_draft_topk", 8),
        "watermark": lambda s: setattr(s, "draft_watermarker", object()),
        "reduced vocab": lambda s: setattr(s, "_d2t_scatter_index", torch.arange(VOCAB)),
        "cache dtype": lambda s: setattr(s, "draft_logits", s.draft_logits.to(torch.bfloat16)),
    }
    for name, change in variants.items():
        spec, hidden, _ = dspark_speculator(draft_model, g, 2, 3)
        change(spec)
        tokens_before = spec.draft_tokens.clone()
        replacement(spec, 2, hidden)
        assert len(calls) == 1 and calls.pop() == 2, name
        assert torch.equal(spec.draft_tokens, tokens_before), name  # nothing written before falling back
    scaled = dspark_draft_model(torch.Generator().manual_seed(17))
    scaled.logits_processor.scale = 2.0

    class OtherMarkovHead(type(draft_model.model.markov_head)):  # a model's own Markov bias
        def bias(self, markov_embed, logits_processor):
            return 2 * super().bias(markov_embed, logits_processor)

    other_head = dspark_draft_model(torch.Generator().manual_seed(18))
    other_head.model.markov_head.__class__ = OtherMarkovHead
    wide = dspark_draft_model(torch.Generator().manual_seed(19))
    wide.model.confidence_head.proj = torch.nn.Linear(HIDDEN + RANK + 8, 1)  # not hidden + rank wide
    for model in (scaled, other_head, wide):
        spec, hidden, _ = dspark_speculator(model, g, 2, 3)
        replacement(spec, 2, hidden)
        assert calls == [2]
        calls.clear()
