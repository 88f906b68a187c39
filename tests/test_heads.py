"""MarkovHead / ConfidenceHead (dspark_ext.heads) and the Markov drafting reference; with the
compiled op, dspark::markov_draft through the heads (greedy exactness, logits and confidence
along the op's own tokens, sampling law, fake kernel)."""

import pytest
import torch
import torch.nn.functional as F

import dspark_ext.heads
from dspark_ext.heads import ConfidenceHead, MarkovHead, previous_tokens
from dspark_ext.reference import MARKOV_DROPPED, greedy_tokens, markov_draft_reference, markov_probabilities
from helpers import FLOAT_DTYPES, check_distribution

INF, NAN = float("inf"), float("nan")

requires_op = pytest.mark.skipif(not hasattr(torch.ops.dspark, "markov_draft"),
                                 reason="dspark::markov_draft is not in the compiled library")
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"))]


def make_heads(vocab_size, rank, hidden_size=8, *, integer=False, sts=None, seed=0):
    """Heads with random weights; ``integer`` Markov weights in [-2, 2] make every float32 sum
    exact (any summation order, any of the three dtypes), so op and reference agree bitwise."""
    g = torch.Generator().manual_seed(seed)
    markov, conf = MarkovHead(vocab_size, rank), ConfidenceHead(hidden_size, rank)
    with torch.no_grad():
        for w in (markov.w1.weight, markov.w2.weight):
            w.copy_(torch.randint(-2, 3, w.shape, generator=g) if integer else torch.randn(w.shape, generator=g))
        conf.linear.weight.copy_(torch.randn(conf.linear.weight.shape, generator=g) * 0.3)
        conf.linear.bias.fill_(0.25)
    conf.set_sts_temperature(sts)
    return markov, conf


def make_inputs(num_requests, num_draft, vocab_size, hidden_size=8, *, dtype=torch.float32, integer=False, seed=0):
    """(base_logits [B, K, V], hidden_states [B, K, H], anchor_ids [B]); ``integer`` base logits tie often."""
    g = torch.Generator().manual_seed(seed + 1)
    base = torch.randn(num_requests, num_draft, vocab_size, generator=g) * 4
    base = (base.round() if integer else base).to(dtype)
    hidden = torch.randn(num_requests, num_draft, hidden_size, generator=g).to(dtype)
    return base, hidden, torch.randint(vocab_size, (num_requests,), generator=g)


def naive_markov_draft(base, anchor, w1, w2, temperature, conf_base, conf_w_prev, conf_temperature, token_ids):
    """The spec, one (request, position) at a time, along the given tokens: returns the logits,
    the greedy choice of every position and the confidence."""
    B, K, V = base.shape
    logits = torch.empty(B, K, V, dtype=base.dtype)
    greedy = torch.empty(B, K, dtype=torch.int64)
    confidence = torch.empty(B, K)
    for b in range(B):
        prev = int(anchor[b])
        for k in range(K):
            a = w1[prev].float()
            logits[b, k] = (base[b, k].float() + (w2.float() * a).sum(dim=1)).to(base.dtype)
            best, greedy[b, k] = -INF, 0
            for v, value in enumerate(logits[b, k].tolist()):
                if value > best:  # strict: ties keep the first index; NaN never compares greater
                    best, greedy[b, k] = value, v
            z = (conf_base[b, k] + conf_w_prev @ a) / conf_temperature[k]
            confidence[b, k] = torch.sigmoid(z)
            prev = int(token_ids[b, k])
    return logits, greedy, confidence


# --------------------------------------------------------------------------- reference


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("weights_in_base_dtype", [False, True], ids=["w_fp32", "w_base"])
@pytest.mark.parametrize("integer", [True, False], ids=["integer", "random"])
def test_reference_matches_naive_loop(dtype, weights_in_base_dtype, integer):
    B, K, V, r = 5, 4, 37, 4
    markov, _ = make_heads(V, r, integer=integer)
    base, _, anchor = make_inputs(B, K, V, dtype=dtype, integer=integer)
    weight_dtype = dtype if weights_in_base_dtype else torch.float32
    w1, w2 = (w.detach().to(weight_dtype) for w in (markov.w1.weight, markov.w2.weight))
    temperature = torch.tensor([0.0, 1.0, 0.0, 0.7, 0.0])
    g = torch.Generator().manual_seed(1)
    conf_base, conf_w_prev = torch.randn(B, K, generator=g), torch.randn(r, generator=g)
    conf_t = torch.rand(K, generator=g) + 0.5
    args = (base, anchor, w1, w2, temperature, torch.zeros(B, dtype=torch.int64), torch.zeros(B, dtype=torch.int64))
    ids, logits, confidence = markov_draft_reference(*args, conf_base, conf_w_prev, conf_t, generator=g)
    assert ids.dtype == torch.int64 and logits.dtype == dtype and confidence.dtype == torch.float32
    naive_logits, naive_greedy, naive_confidence = naive_markov_draft(base, anchor, w1, w2, temperature, conf_base,
                                                                      conf_w_prev, conf_t, ids)
    if integer:
        torch.testing.assert_close(logits, naive_logits, rtol=0, atol=0)
    else:
        torch.testing.assert_close(logits, naive_logits)
    torch.testing.assert_close(confidence, naive_confidence)
    is_greedy = temperature == 0
    if integer:
        assert torch.equal(ids[is_greedy], naive_greedy[is_greedy])
    probs = markov_probabilities(logits[~is_greedy], temperature[~is_greedy, None])
    assert bool((probs.gather(-1, ids[~is_greedy, :, None]) > 0).all())
    # Forcing the chosen tokens reproduces the same logits; no conf_base -> an empty confidence.
    forced_ids, forced_logits, empty = markov_draft_reference(*args, forced_tokens=ids)
    assert torch.equal(forced_ids, ids) and torch.equal(forced_logits, logits) and empty.shape == (0,)


def test_reference_nonfinite_logits():
    zero = torch.zeros(5, 1)
    rows = torch.tensor([[NAN, 1.0, INF, INF, NAN],  # greedy: the first +inf
                         [NAN, NAN, NAN, NAN, NAN],  # no mass: token 0
                         [-INF, -INF, -INF, -INF, -INF],
                         [NAN, 1.0, INF, 2.0, INF],  # sampled: the +inf entries share the mass
                         [NAN, NAN, NAN, NAN, NAN]])
    temperature = torch.tensor([0.0, 0.0, 0.0, 1.0, 1.0])
    seeds = torch.zeros(5, dtype=torch.int64)
    ids, logits, _ = markov_draft_reference(rows[:, None], torch.zeros(5, dtype=torch.int64), zero, zero, temperature,
                                            seeds, seeds)
    assert ids[:, 0].tolist()[:3] == [2, 0, 0] and ids[4, 0] == 0 and int(ids[3, 0]) in (2, 4)
    torch.testing.assert_close(logits[:, 0], rows, equal_nan=True)
    torch.testing.assert_close(markov_probabilities(rows[3], 1.0),
                               torch.tensor([0, 0, 0.5, 0, 0.5], dtype=torch.float64))
    # 3e38 and 2e38 both overflow at T = 0.5: after sanitizing they share the mass.
    torch.testing.assert_close(markov_probabilities(torch.tensor([3e38, 2e38, 1.0]), 0.5),
                               torch.tensor([0.5, 0.5, 0.0], dtype=torch.float64))


def sampled_pair_law(markov, base, anchor, temperature):
    """Exact law of (x_0, x_1) for one request drafting K = 2 tokens, as a flat [V * V] vector."""
    w1, w2 = markov.w1.weight.detach().float(), markov.w2.weight.detach().float()
    all_bias = w1 @ w2.T  # [previous token, next token]
    p0 = markov_probabilities((base[0].float() + all_bias[anchor]).to(base.dtype), temperature)
    p1 = markov_probabilities((base[1].float() + all_bias).to(base.dtype), temperature)  # row a: after x_0 = a
    return (p0[:, None] * p1).flatten()


def pair_setup(num_samples, device="cpu"):
    V, temperature = 12, 0.9
    markov, _ = make_heads(V, 3, seed=4)
    base, _, _ = make_inputs(1, 2, V, seed=4)
    base = base[0] * 0.3  # flat-ish rows, so the Markov bias decides much of the law
    law = sampled_pair_law(markov, base, 5, temperature)
    batch = base.expand(num_samples, 2, V).to(device)
    return markov.to(device), batch, torch.full((num_samples,), 5, device=device), temperature, law


def test_reference_sampling_law_and_power():
    """The reference's sampled pairs follow the exact law; the variant without the Markov term
    is rejected by the same check (the check has power)."""
    markov, base, anchor, temperature, law = pair_setup(40_000)
    w = (markov.w1.weight.detach(), markov.w2.weight.detach())
    T, zeros = torch.full((base.shape[0],), temperature), torch.zeros(base.shape[0], dtype=torch.int64)
    for variant, expected in (("exact", True), (MARKOV_DROPPED, False)):
        ids, _, _ = markov_draft_reference(base, anchor, *w, T, zeros, zeros,
                                           generator=torch.Generator().manual_seed(7), variant=variant)
        result = check_distribution(ids[:, 0] * base.shape[-1] + ids[:, 1], law)
        assert result.ok == expected, f"{variant}: {result}"


# --------------------------------------------------------------------------- heads, no op needed


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_markov_head_forward_is_teacher_forced_reference(dtype):
    B, K, V = 4, 5, 300
    markov, _ = make_heads(V, 8)
    base, _, anchor = make_inputs(B, K, V, dtype=dtype)
    targets = torch.randint(V, (B, K))
    logits = markov(base, previous_tokens(anchor, targets))
    assert logits.dtype == torch.float32 and logits.shape == (B, K, V)
    torch.testing.assert_close(markov.bias(anchor), logits[:, 0] - base[:, 0].float())
    _, ref_logits, _ = markov_draft_reference(base, anchor, markov.w1.weight, markov.w2.weight, torch.zeros(B),
                                              None, None, forced_tokens=targets)
    torch.testing.assert_close(logits.to(dtype), ref_logits)


def test_gradients_reach_the_heads_only():
    B, K, V, H, r = 3, 4, 50, 8, 6
    markov, conf = make_heads(V, r, H)
    base, hidden, anchor = make_inputs(B, K, V, H)
    targets = torch.randint(V, (B, K))
    prev = previous_tokens(anchor, targets)
    F.cross_entropy(markov(base, prev).flatten(0, 1), targets.flatten()).backward()
    used = torch.zeros(V, dtype=torch.bool)
    used[prev.flatten()] = True
    w1_grad_rows = markov.w1.weight.grad.abs().sum(dim=1) > 0
    assert torch.equal(w1_grad_rows, used) and bool((markov.w2.weight.grad != 0).any())
    assert base.grad is None and hidden.grad is None

    # Confidence loss: the exact BCE gradient on [w_h, w_prev] and bias; W1 untouched when detached.
    markov.zero_grad()
    labels = torch.rand(B, K).round()
    embedding = markov.w1(prev).detach()
    z = conf(hidden, embedding)
    F.binary_cross_entropy_with_logits(z, labels).backward()
    residual = (torch.sigmoid(z.detach()) - labels) / labels.numel()
    features = torch.cat([hidden, embedding], dim=-1)
    torch.testing.assert_close(conf.linear.weight.grad[0], (residual[..., None] * features).sum(dim=(0, 1)))
    torch.testing.assert_close(conf.linear.bias.grad[0], residual.sum())
    assert markov.w1.weight.grad is None or not bool(markov.w1.weight.grad.any())
    # Not detached, the confidence loss trains W1 as well.
    F.binary_cross_entropy_with_logits(conf(hidden, markov.w1(prev)), labels).backward()
    assert bool(markov.w1.weight.grad.any())


@pytest.mark.parametrize("sts", [None, [0.5, 1.0, 2.0, 3.0]], ids=["uncalibrated", "sts"])
def test_confidence_head_formula(sts):
    B, K, V, H, r = 3, 4, 20, 8, 5
    markov, conf = make_heads(V, r, H, sts=sts)
    _, hidden, anchor = make_inputs(B, K, V, H)
    prev = previous_tokens(anchor, torch.randint(V, (B, K)))
    embedding = markov.w1(prev)
    w = conf.linear.weight[0]
    z = hidden @ w[:H] + embedding @ w[H:] + conf.linear.bias
    torch.testing.assert_close(conf(hidden, embedding), z)
    t = torch.ones(K) if sts is None else torch.tensor(sts)
    probability = conf.probability(hidden, embedding)
    torch.testing.assert_close(probability, torch.sigmoid(z / t))
    # op_arguments give the op's formula the same probability.
    conf_base, conf_w_prev, conf_temperature = conf.op_arguments(hidden)
    assert conf_base.shape == (B, K) and conf_w_prev.shape == (r,)
    assert all(x.dtype == torch.float32 for x in (conf_base, conf_w_prev) + ((conf_temperature,) if sts else ()))
    assert (conf_temperature is None) == (sts is None)
    op_t = torch.ones(K) if conf_temperature is None else conf_temperature
    op_probability = torch.sigmoid((conf_base + embedding.detach() @ conf_w_prev) / op_t)
    torch.testing.assert_close(op_probability, probability.detach())


def test_sts_temperature_state_dict_and_validation():
    _, conf = make_heads(10, 3, sts=[1.5, 2.0])
    fresh = ConfidenceHead(8, 3)
    fresh.load_state_dict(conf.state_dict())  # [2] into the [0] placeholder
    assert fresh.sts_temperature.tolist() == [1.5, 2.0]
    fresh.set_sts_temperature(None)
    assert fresh.sts_temperature.shape == (0,)
    for bad in ([0.0, 1.0], [1.0, NAN], [[1.0]], [-1.0]):
        with pytest.raises(ValueError, match="sts temperature"):
            fresh.set_sts_temperature(bad)
    with pytest.raises(ValueError, match="calibrated for K = 2"):
        conf.op_arguments(torch.zeros(1, 3, 8))


def test_shape_errors():
    markov, conf = make_heads(10, 3, 8)
    base, hidden, anchor = make_inputs(2, 4, 10, 8)
    prev = torch.zeros(2, 4, dtype=torch.int64)
    cases = [
        (lambda: markov(base[..., :9], prev), "base_logits"),
        (lambda: markov(base[0], prev), "base_logits"),
        (lambda: markov(base, prev[:, :3]), "prev_token_ids"),
        (lambda: conf(hidden[..., :7], markov.w1(prev)), "hidden_states"),
        (lambda: conf(hidden, markov.w1(prev)[..., :2]), "prev_embedding"),
        (lambda: conf(hidden, markov.w1(prev[:1])), "prev_embedding"),
        (lambda: markov.draft(base, anchor[:1], 0.0, 0, 0), "anchor_ids"),
        (lambda: markov.draft(base, anchor, torch.zeros(3), 0, 0), "temperature"),
        (lambda: markov.draft(base, anchor, 0.0, torch.zeros(2, 1), 0), "seed"),
        (lambda: markov.draft(base, anchor, 0.0, 0, 0, confidence_head=conf), "together"),
        (lambda: markov.draft(base, anchor, 0.0, 0, 0, hidden_states=hidden), "together"),
        (lambda: conf.draft(markov, base, hidden[:, :3], anchor, 0.0, 0, 0), "hidden_states"),
        (lambda: ConfidenceHead(8, 4).draft(markov, base, hidden, anchor, 0.0, 0, 0), "rank"),
        (lambda: markov.to(torch.float64).draft(base, anchor, 0.0, 0, 0), "Markov weights"),
    ]
    for call, message in cases:
        with pytest.raises(ValueError, match=message):
            call()


def test_draft_passes_the_op_its_arguments(monkeypatch):
    """head.draft's plumbing (scalar expansion, dtypes, confidence arguments), with the reference as the op."""
    calls = []

    def reference_op(*args):
        calls.append(args)
        return markov_draft_reference(*args, generator=torch.Generator().manual_seed(0))

    monkeypatch.setattr(dspark_ext.heads, "markov_draft", reference_op)
    markov, conf = make_heads(30, 4, sts=[1.0, 2.0, 0.5])
    base, hidden, anchor = make_inputs(3, 3, 30, dtype=torch.bfloat16)
    draft = conf.draft(markov, base, hidden, anchor.int(), 0.0, 7, 2)
    _, prev_ids, w1, w2, temperature, seed, offset, conf_base, conf_w_prev, conf_t = calls[0]
    assert prev_ids.dtype == torch.int64 and torch.equal(prev_ids, anchor)
    assert w1.data_ptr() == markov.w1.weight.data_ptr() and not w1.requires_grad
    assert temperature.dtype == torch.float32 and temperature.tolist() == [0.0] * 3
    assert seed.tolist() == [7] * 3 and offset.tolist() == [2] * 3 and seed.dtype == offset.dtype == torch.int64
    assert torch.equal(conf_t, conf.sts_temperature)
    prev_embedding = markov.w1(previous_tokens(anchor, draft.draft_token_ids))
    torch.testing.assert_close(draft.confidence, conf.probability(hidden, prev_embedding).detach())
    assert markov.draft(base, anchor, torch.tensor([0.0, 1.0, 0.5]), 0, 0).confidence is None


# --------------------------------------------------------------------------- through the op


def assert_draft_consistent(markov, conf, base, hidden, anchor, temperature, *, exact):
    """The op's outputs against the reference replayed along the op's own tokens; greedy rows
    also token for token against the reference's own greedy choices when ``exact``."""
    B, K, V = base.shape
    draft = conf.draft(markov, base, hidden, anchor, temperature, 1234, 56)
    ids, logits, confidence = draft
    assert ids.shape == (B, K) and ids.dtype == torch.int64 and ids.device == base.device
    assert logits.shape == (B, K, V) and logits.dtype == base.dtype and logits.is_contiguous()
    assert confidence.shape == (B, K) and confidence.dtype == torch.float32
    w = (markov.w1.weight, markov.w2.weight)
    ref_args = (base, anchor, *w, temperature, None, None, *conf.op_arguments(hidden))
    _, ref_logits, ref_confidence = markov_draft_reference(*ref_args, forced_tokens=ids)
    tolerance = dict(rtol=0, atol=0) if exact else {}
    torch.testing.assert_close(logits.cpu(), ref_logits, **tolerance, equal_nan=True)
    torch.testing.assert_close(confidence.cpu(), ref_confidence)
    expected_confidence = conf.probability(hidden, markov.w1(previous_tokens(anchor, ids))).detach()
    torch.testing.assert_close(confidence, expected_confidence)
    is_greedy = ~(temperature.cpu() > 0)
    assert torch.equal(ids.cpu()[is_greedy], greedy_tokens(logits[is_greedy]))
    if exact:
        ref_ids, _, _ = markov_draft_reference(*ref_args)
        assert torch.equal(ids.cpu()[is_greedy], ref_ids[is_greedy])
    sampled = ~is_greedy
    probs = markov_probabilities(logits.cpu()[sampled], temperature.cpu()[sampled, None])
    assert bool((probs.gather(-1, ids.cpu()[sampled, :, None]) > 0).all())
    assert torch.equal(conf.draft(markov, base, hidden, anchor, temperature, 1234, 56).draft_token_ids, ids)


@requires_op
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("weights_in_base_dtype", [False, True], ids=["w_fp32", "w_base"])
def test_op_greedy_matches_reference_exactly(device, dtype, weights_in_base_dtype):
    markov, conf = make_heads(3000, 4, integer=True, sts=[1.0, 0.5, 2.0, 1.5, 1.0, 3.0])
    markov.to(device, dtype if weights_in_base_dtype else torch.float32)
    conf.to(device)
    base, hidden, anchor = (t.to(device) for t in make_inputs(6, 6, 3000, dtype=dtype, integer=True))
    temperature = torch.tensor([0.0, 0.0, 1.0, 0.0, 0.6, 0.0], device=device)
    assert_draft_consistent(markov, conf, base, hidden, anchor, temperature, exact=True)


@requires_op
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_op_random_weights_consistent(device, dtype):
    markov, conf = make_heads(4099, 16)
    markov.to(device)
    conf.to(device)
    base, hidden, anchor = (t.to(device) for t in make_inputs(5, 4, 4099, dtype=dtype, seed=3))
    temperature = torch.tensor([0.0, 1.0, 0.0, 0.8, 1.3], device=device)
    assert_draft_consistent(markov, conf, base, hidden, anchor, temperature, exact=False)


@requires_op
@pytest.mark.parametrize("device", DEVICES)
def test_op_sampling_law(device):
    markov, base, anchor, temperature, law = pair_setup(40_000, device)
    num = base.shape[0]
    seeds = torch.arange(num, device=device)
    ids = markov.draft(base, anchor, temperature, seeds, 3).draft_token_ids.cpu()
    result = check_distribution(ids[:, 0] * base.shape[-1] + ids[:, 1], law)
    assert result.ok, str(result)


@requires_op
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("with_confidence", [False, True], ids=["no_conf", "conf"])
def test_op_fake_kernel_and_opcheck(device, with_confidence):
    from torch._subclasses.fake_tensor import FakeTensorMode

    markov, conf = make_heads(300, 4, sts=[1.0, 2.0, 0.5])
    base, hidden, anchor = make_inputs(4, 3, 300, dtype=torch.bfloat16)
    base = base.transpose(0, 1).contiguous().transpose(0, 1)  # non-contiguous input, contiguous output
    conf_args = conf.op_arguments(hidden) if with_confidence else (None, None, None)
    args = [base, anchor, markov.w1.weight.detach(), markov.w2.weight.detach(), torch.tensor([0.0, 1.0, 0.7, 0.0]),
            torch.arange(4), torch.zeros(4, dtype=torch.int64), *conf_args]
    args = [a.to(device) if a is not None else None for a in args]
    real = torch.ops.dspark.markov_draft(*args)
    with FakeTensorMode() as mode:
        fake = torch.ops.dspark.markov_draft(*[mode.from_tensor(a) if a is not None else None for a in args])
    for r, f in zip(real, fake):
        assert r.shape == f.shape and r.dtype == f.dtype and r.device == f.device and r.stride() == f.stride()
    torch.library.opcheck(torch.ops.dspark.markov_draft.default, args)
