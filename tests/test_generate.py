"""The generation loop (dspark_ext.generate) with every drafter, on a toy trigram target with an
explicit per-request cache (tests/toy_targets.py) and, when dspark_ext.targets is available, a
tiny random Llama.

* greedy speculative decoding == plain greedy decoding, token for token, ragged batch, eos;
* at temperature > 0 the first three tokens follow the target's exact law (chi-square + TV),
  and a drafter that misreports its logits fails the same check (the test has power);
* a request's output does not depend on the rest of its batch (greedy and sampled);
* stop conditions, streaming, statistics, the n-gram search itself.
"""

import functools

import pytest
import torch

from dspark_ext.drafters import AutoregressiveDrafter, MarkovDrafter
from dspark_ext.generate import GenerationResult, generate
from dspark_ext.drafters import NgramDrafter
from dspark_ext.protocols import Draft, Drafter, DraftContext, Target
from helpers import assert_matches_distribution, check_distribution, sequence_codes
from toy_targets import MisreportingDrafter, TrigramTarget

V = 8
K = 4
#: A falling steps-per-second curve: the scheduler admits drafts while they pay off.
def falling_sps(max_tokens: int, slope: float = 0.05) -> torch.Tensor:
    return torch.cat([torch.zeros(1), 100.0 / (1.0 + slope * torch.arange(1, max_tokens + 1).float())])


SPS = falling_sps(4096)

PROMPTS = [
    torch.tensor([1, 2, 3, 1, 2, 3, 1, 2, 3, 1]),  # repetitive: the n-gram drafter has matches
    torch.tensor([4, 5]),
    torch.tensor([0, 6, 7, 0, 6, 7, 2]),
]
MAX_NEW = [30, 9, 21]


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors (conftest.one_thread)


def make_drafter(name: str, vocab_size: int):
    if name == "autoregressive":
        return AutoregressiveDrafter(), None
    if name == "ngram":
        return NgramDrafter(num_draft=K, max_ngram=3, min_ngram=1), None
    if name == "markov":
        return MarkovDrafter.random(vocab_size, K, seed=1), None
    if name == "markov_scheduled":
        return MarkovDrafter.random(vocab_size, K, seed=1, confidence=True), SPS
    raise ValueError(name)


DRAFTERS = ["autoregressive", "ngram", "markov", "markov_scheduled"]


def greedy_by_protocol(target, prompt: torch.Tensor, max_new: int, eos=None) -> torch.Tensor:
    """Plain greedy decoding of one request through the Target protocol (argmax of each last row)."""
    out = target.start([prompt])
    token = int(torch.argmax(out.logits[-1]))
    tokens = [token]
    while len(tokens) < max_new and token != eos:
        out = target.forward(torch.tensor([token], device=target.device),
                             torch.tensor([0, 1], dtype=torch.int32, device=target.device))
        token = int(torch.argmax(out.logits[-1]))
        tokens.append(token)
    return torch.tensor(tokens[:max_new], dtype=torch.int64)


def toy_target(positional: bool) -> TrigramTarget:
    # period 1: no position term, greedy runs fall into short cycles (n-gram drafts get accepted);
    # period 5: the logits depend on the cached length too (a wrong rewind shows).
    return TrigramTarget(V, seed=6, scale=3.0, period=5 if positional else 1)


def pick_eos(references):
    """An eos id that stops request 1 early and no other request: the first of its greedy
    tokens (after the first) that the others never produce."""
    others = set(references[0].tolist()) | set(references[2].tolist())
    candidates = [int(t) for t in references[1][1:-1] if int(t) not in others]
    assert candidates, "no eos candidate: change the target's seed"
    return candidates[0]


# --------------------------------------------------------------------------- greedy == autoregressive


@pytest.mark.parametrize("positional", [False, True], ids=["bigram-cycles", "positional"])
@pytest.mark.parametrize("drafter_name", DRAFTERS)
def test_greedy_matches_autoregressive_toy(drafter_name, positional):
    target = toy_target(positional)
    assert isinstance(target, Target)
    plain = [target.greedy_reference(p, m) for p, m in zip(PROMPTS, MAX_NEW)]
    eos = pick_eos(plain)
    references = [target.greedy_reference(p, m, eos=eos) for p, m in zip(PROMPTS, MAX_NEW)]
    assert len(references[1]) < MAX_NEW[1] and int(references[1][-1]) == eos  # request 1 stops at eos
    assert [len(r) for r in references[::2]] == MAX_NEW[::2]  # the others at max_new_tokens
    for b in range(3):  # the protocol-level greedy loop agrees with the law
        assert torch.equal(greedy_by_protocol(target, PROMPTS[b], MAX_NEW[b], eos), references[b])

    drafter, sps = make_drafter(drafter_name, V)
    assert isinstance(drafter, Drafter)
    result = generate(target, drafter, PROMPTS, MAX_NEW, eos_token_id=eos, sps=sps)
    for b in range(3):
        assert torch.equal(result.tokens[b], references[b]), (b, result.tokens[b].tolist(), references[b].tolist())
    assert result.mean_accepted_length >= 1.0
    if drafter_name == "autoregressive":
        assert result.mean_accepted_length == 1.0 and result.position_accepted.numel() == 0
    if drafter_name == "ngram" and not positional:
        assert int(result.position_accepted.sum()) > 0 and result.mean_accepted_length > 1.5, result.summary()


@functools.lru_cache(maxsize=None)
def tiny_llama(seed: int = 0, vocab_size: int = 96):
    """A randomly initialised 2-layer transformers Llama (built once per session)."""
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False, bos_token_id=None,
        eos_token_id=None, pad_token_id=0)
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(config).eval()
    torch.random.set_rng_state(generator_state)
    with torch.no_grad():
        model.lm_head.weight.mul_(40.0)  # large greedy margins: batch-shape rounding cannot flip an argmax
    return model


def llama_target(kind: str):
    targets = pytest.importorskip("dspark_ext.targets")
    name = {"llama": "LlamaTarget", "hf": "HFTarget"}[kind]
    if not hasattr(targets, name):
        pytest.skip(f"dspark_ext.targets.{name} is not available")
    model = tiny_llama()
    if kind == "llama":
        from dspark_ext.llama import Llama

        return targets.LlamaTarget(Llama.from_hf(model))
    return targets.HFTarget(model)


LLAMA_PROMPTS = [
    torch.tensor([5, 17, 33, 5, 17, 33, 5, 17]),
    torch.tensor([70, 2, 9]),
    torch.tensor([11, 12, 13, 14, 15, 16, 40, 41, 42, 43, 1]),
]
LLAMA_MAX_NEW = [20, 8, 14]


@functools.lru_cache(maxsize=None)
def llama_references(kind: str):
    """(eos, greedy references with that eos) through the protocol, one request at a time."""
    target = llama_target(kind)
    plain = [greedy_by_protocol(target, p, m) for p, m in zip(LLAMA_PROMPTS, LLAMA_MAX_NEW)]
    eos = pick_eos(plain)
    return eos, [greedy_by_protocol(target, p, m, eos) for p, m in zip(LLAMA_PROMPTS, LLAMA_MAX_NEW)]


def test_llama_protocol_greedy_matches_transformers():
    """The reference itself: greedy decoding through LlamaTarget == transformers' generate."""
    target = llama_target("llama")
    model = tiny_llama()
    for p, m in zip(LLAMA_PROMPTS, LLAMA_MAX_NEW):
        hf = model.generate(p[None], max_new_tokens=m, do_sample=False, attention_mask=torch.ones(1, len(p)))[0, len(p):]
        assert torch.equal(hf, greedy_by_protocol(target, p, m))


@pytest.mark.parametrize("kind,drafter_name", [("llama", name) for name in DRAFTERS]
                         + [("hf", "autoregressive"), ("hf", "ngram")])
def test_greedy_matches_autoregressive_llama(kind, drafter_name):
    eos, references = llama_references(kind)
    assert len(references[1]) < LLAMA_MAX_NEW[1]  # request 1 stops at eos
    target = llama_target(kind)
    assert isinstance(target, Target)
    drafter, sps = make_drafter(drafter_name, target.vocab_size)
    result = generate(target, drafter, LLAMA_PROMPTS, LLAMA_MAX_NEW, eos_token_id=eos, sps=sps)
    for b in range(3):
        assert torch.equal(result.tokens[b], references[b]), (b, result.tokens[b].tolist(), references[b].tolist())
    assert result.mean_accepted_length >= 1.0


# --------------------------------------------------------------------------- the sampling law

LAW_V = 6
LAW_PROMPT = torch.tensor([1, 2, 1, 2, 1])
LAW_SAMPLES = 20000
LAW_TOKENS = 3  # y_1 (prefill), y_2 and y_3 (verified drafts, corrections and bonuses)


def law_target() -> TrigramTarget:
    return TrigramTarget(LAW_V, seed=5, scale=1.0, period=5)


def sampled_codes(target, drafter, temperature: float, *, sps=None, seed: int = 1000) -> torch.Tensor:
    result = generate(target, drafter, [LAW_PROMPT] * LAW_SAMPLES, LAW_TOKENS + 1, temperature=temperature,
                      seed=seed, sps=sps)
    return sequence_codes(torch.stack([t[:LAW_TOKENS] for t in result.tokens]), LAW_V), result


LAW_CASES = {
    "ngram": (lambda: NgramDrafter(num_draft=3, min_ngram=1), 1.0, None),  # short sequences: unigram matches
    "markov": (lambda: MarkovDrafter.random(LAW_V, 3, seed=2), 1.0, None),
    "markov-T0.7": (lambda: MarkovDrafter.random(LAW_V, 3, seed=2, scale=2.0), 0.7, None),
    "markov-scheduled": (lambda: MarkovDrafter.random(LAW_V, 3, seed=2, confidence=True), 1.0,
                         falling_sps(4 * LAW_SAMPLES, slope=5e-5)),
}


@pytest.mark.parametrize("case", list(LAW_CASES))
def test_sampling_follows_target_law(case):
    make, temperature, sps = LAW_CASES[case]
    target = law_target()
    codes, result = sampled_codes(target, make(), temperature, sps=sps)
    assert int(result.position_accepted.sum()) > 0.05 * LAW_SAMPLES, result.summary()  # drafts do get verified
    assert_matches_distribution(codes, target.exact_joint(LAW_PROMPT, LAW_TOKENS, temperature))


def test_sampling_check_has_power():
    """A drafter that samples from one law and reports another must fail the same check."""
    target = law_target()
    honest = MarkovDrafter.random(LAW_V, 3, seed=2)
    broken = MisreportingDrafter(honest.head, honest.base_logits)
    codes, _ = sampled_codes(target, broken, 1.0)
    check = check_distribution(codes, target.exact_joint(LAW_PROMPT, LAW_TOKENS, 1.0))
    assert not check.ok, check


# --------------------------------------------------------------------------- batch invariance


@pytest.mark.parametrize("drafter_name,temperature", [("ngram", 0.0), ("ngram", 1.0), ("markov", 0.0),
                                                       ("markov", 1.0), ("markov_scheduled", 0.0)])
def test_request_independent_of_batch(drafter_name, temperature):
    """Alone or among others (and in any position), a request gets the same tokens. With the
    scheduler the draft lengths depend on the batch, which must not change the tokens at T = 0;
    at T > 0 they change which random numbers are used (the law stays the target's, the sample
    does not), so that case is greedy only."""
    target = toy_target(positional=True)
    seeds = [101, 202, 303]
    batch = generate(target, make_drafter(drafter_name, V)[0], PROMPTS, MAX_NEW, temperature=temperature,
                     seed=seeds, sps=make_drafter(drafter_name, V)[1])
    for b in range(3):
        alone = generate(target, make_drafter(drafter_name, V)[0], [PROMPTS[b]], MAX_NEW[b], temperature=temperature,
                         seed=[seeds[b]], sps=make_drafter(drafter_name, V)[1])
        assert torch.equal(alone.tokens[0], batch.tokens[b]), b
    order = [2, 0, 1]
    shuffled = generate(target, make_drafter(drafter_name, V)[0], [PROMPTS[b] for b in order],
                        [MAX_NEW[b] for b in order], temperature=temperature, seed=[seeds[b] for b in order],
                        sps=make_drafter(drafter_name, V)[1])
    for i, b in enumerate(order):
        assert torch.equal(shuffled.tokens[i], batch.tokens[b])


def test_llama_batch_invariance():
    target = llama_target("llama")
    drafter = NgramDrafter(num_draft=K)
    batch = generate(target, drafter, LLAMA_PROMPTS, LLAMA_MAX_NEW)
    for b in range(3):
        alone = generate(target, drafter, [LLAMA_PROMPTS[b]], LLAMA_MAX_NEW[b])
        assert torch.equal(alone.tokens[0], batch.tokens[b])


# --------------------------------------------------------------------------- stop conditions, streaming, stats


@pytest.mark.parametrize("drafter_name", ["autoregressive", "ngram", "markov"])
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_stop_conditions(drafter_name, temperature):
    target = toy_target(positional=True)
    prompts = [PROMPTS[0], PROMPTS[1], PROMPTS[2], PROMPTS[0], PROMPTS[2]] * 8
    max_new = [0, 1, 2, 7, 33] * 8
    eos = 3
    result = generate(target, make_drafter(drafter_name, V)[0], prompts, max_new, temperature=temperature,
                      seed=7, eos_token_id=eos)
    saw_eos = False
    for b, tokens in enumerate(result.tokens):
        assert tokens.dtype == torch.int64 and tokens.dim() == 1
        assert len(tokens) <= max_new[b]
        eos_at = (tokens == eos).nonzero().flatten().tolist()
        if eos_at:  # stops right after the first eos
            assert eos_at == [len(tokens) - 1]
            saw_eos = True
        else:
            assert len(tokens) == max_new[b]
        assert bool(((tokens >= 0) & (tokens < V)).all())
    assert saw_eos
    # Never more than the budget through the target: finished requests send empty segments,
    # the others anchor + at most (max_new - generated - 1) drafts.
    for segments in target.segment_log[-result.num_rounds:]:
        assert segments[0] == 0  # max_new = 0: never forwarded
        assert all(s <= K + 1 for s in segments)
    final = target.lengths()
    for b in range(len(prompts)):
        assert int(final[b]) <= len(prompts[b]) + max(max_new[b] - 1, 0)  # the last token is never forwarded


def test_eos_list_and_no_eos():
    target = toy_target(positional=True)
    plain = generate(target, NgramDrafter(K), PROMPTS, MAX_NEW)
    assert [len(t) for t in plain.tokens] == MAX_NEW
    stops = [int(plain.tokens[0][4]), int(plain.tokens[2][3])]
    result = generate(target, NgramDrafter(K), PROMPTS, MAX_NEW, eos_token_id=stops)
    for b in range(3):
        hits = torch.isin(plain.tokens[b], torch.tensor(stops)).nonzero().flatten()
        end = int(hits[0]) + 1 if hits.numel() else MAX_NEW[b]
        assert torch.equal(result.tokens[b], plain.tokens[b][:end])


@pytest.mark.parametrize("drafter_name", ["autoregressive", "ngram", "markov"])
def test_streaming_callback(drafter_name):
    target = toy_target(positional=False)
    events = []
    result = generate(target, make_drafter(drafter_name, V)[0], PROMPTS, MAX_NEW, temperature=0.5, seed=3,
                      on_tokens=lambda b, ids: events.append((b, ids.clone())))
    streamed = {b: [] for b in range(3)}
    for b, ids in events:
        assert ids.dtype == torch.int64 and ids.numel() >= 1
        streamed[b].extend(ids.tolist())
    for b in range(3):
        assert streamed[b] == result.tokens[b].tolist()
    # The first event of every request is its prefill token; each round streams requests in order.
    assert [b for b, _ in events[:3]] == [0, 1, 2]
    assert len(events) <= 3 * (result.num_rounds + 1)


@pytest.mark.parametrize("drafter_name", DRAFTERS)
def test_statistics(drafter_name):
    target = toy_target(positional=False)
    drafter, sps = make_drafter(drafter_name, V)
    result = generate(target, drafter, PROMPTS, MAX_NEW, sps=sps)
    assert isinstance(result, GenerationResult)
    assert result.target_forwards == result.num_rounds + 1 == target.forward_calls + 1
    assert len(result.accepted_lengths) == result.num_rounds
    assert result.num_generated == sum(MAX_NEW)
    assert result.mean_accepted_length >= 1.0
    # Every round emits accepted + 1 tokens per participating request (no eos here).
    emitted = sum(int((a[a >= 0] + 1).sum()) for a in result.accepted_lengths) + len(PROMPTS)
    assert emitted == result.num_generated
    assert result.request_forwards == len(PROMPTS) + sum(int((a >= 0).sum()) for a in result.accepted_lengths)
    k = drafter.num_draft
    assert result.position_verified.shape == result.position_reached.shape == result.position_accepted.shape == (k,)
    assert bool((result.position_verified >= result.position_reached).all())
    assert bool((result.position_reached >= result.position_accepted).all())
    assert int(result.position_accepted.sum()) == sum(int(a[a >= 0].sum()) for a in result.accepted_lengths)
    for name in ("time_total", "time_prefill", "time_target", "time_draft", "time_overhead"):
        assert getattr(result, name) >= 0.0, name
    assert result.time_total >= result.time_target + result.time_draft
    assert abs(result.time_target + result.time_draft + result.time_overhead - result.time_total) < 1e-9
    assert "tokens/forward" in result.summary()


def test_scheduler_caps_and_skips():
    """With confidences and an SPS table the lengths come from dspark::schedule. When the step
    time grows like the square of the batch, no draft ever pays off: plain decoding."""
    target = toy_target(positional=False)
    drafter = MarkovDrafter.random(V, K, seed=1, confidence=True)
    quadratic = torch.cat([torch.zeros(1), 1.0 / torch.arange(1, 64).float() ** 2])
    result = generate(target, drafter, PROMPTS, MAX_NEW, sps=quadratic)
    assert int(result.position_verified.sum()) == 0 and result.mean_accepted_length == 1.0
    references = [target.greedy_reference(p, m) for p, m in zip(PROMPTS, MAX_NEW)]
    assert all(torch.equal(a, b) for a, b in zip(result.tokens, references))


# --------------------------------------------------------------------------- the n-gram drafter


def ngram_propose(sequences, num_draft=4, max_ngram=3, min_ngram=1):
    width = max(len(s) for s in sequences) + 3
    tokens = torch.full((len(sequences), width), 99, dtype=torch.int64)  # junk after each sequence
    for b, s in enumerate(sequences):
        tokens[b, : len(s)] = torch.tensor(s)
    lengths = torch.tensor([len(s) for s in sequences])
    n = len(sequences)
    context = DraftContext(tokens, lengths, None, torch.zeros(n), torch.zeros(n, dtype=torch.int64),
                           torch.zeros(n, dtype=torch.int64))
    draft = NgramDrafter(num_draft, max_ngram, min_ngram).propose(context)
    assert draft.logits is None and draft.token_ids.dtype == torch.int64
    # Confidence 1 on every draft of a request with a match, 0 on the filler of one without.
    found = draft.confidence[:, 0] == 1
    assert torch.equal(draft.confidence, found[:, None].float().expand(n, num_draft))
    return draft.token_ids.tolist(), found.tolist()


def test_ngram_drafter():
    got, found = ngram_propose([
        [1, 2, 3, 4, 5, 1, 2, 3],  # trigram 1 2 3 seen at 0: follow 4 5 then continue periodically (1 2)
        [7, 8, 9],  # no match: repeat the last token
        [5, 6, 5, 6, 5],  # most recent occurrence of "5 6 5" is at 0 (period 2)
        [1, 9, 2, 9, 3, 2, 9],  # "3 2 9" unseen, "2 9" at 2 -> 3 2 9 3
        [4],  # a single token
        [3, 3, 3, 3],  # period 1
        [1, 2, 8, 1, 2, 7, 2],  # only the unigram "2": most recent earlier at 4 -> 7 2 7 2
    ])
    assert got == [
        [4, 5, 1, 2],
        [9, 9, 9, 9],
        [6, 5, 6, 5],
        [3, 2, 9, 3],
        [4, 4, 4, 4],
        [3, 3, 3, 3],
        [7, 2, 7, 2],
    ]
    assert found == [True, False, True, True, False, True, True]
    # min_ngram = 2: unigram matches do not count.
    assert ngram_propose([[1, 2, 8, 1, 2, 7, 2]], min_ngram=2) == ([[2, 2, 2, 2]], [False])
    # Longest n wins over a more recent shorter match.
    assert ngram_propose([[1, 2, 3, 9, 2, 3, 8, 1, 2, 3]], num_draft=2) == ([[9, 2]], [True])


# --------------------------------------------------------------------------- what the drafter sees


class RecordingDrafter(NgramDrafter):
    """An n-gram drafter that records every DraftContext it is given."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.contexts = []

    def propose(self, context: DraftContext):
        self.contexts.append(DraftContext(*(None if t is None else t.clone() for t in (
            context.tokens, context.lengths, context.anchor_hidden, context.temperature, context.seed,
            context.offset))))
        return super().propose(context)


def test_draft_verified_logits_expand_only_the_selected_drafts():
    """A compact draft (logits over a draft vocabulary, deterministic rows as point masses)
    expands to the whole vocabulary only for the drafts verify reads."""
    V = 10
    ids = torch.tensor([1, 4, 7])
    logits = torch.randn(2, 3, 3)
    token_ids = torch.tensor([[4, 1, 7], [9, 2, 3]])
    draft = Draft(token_ids=token_ids, logits=logits, logit_ids=ids, point_mass=torch.tensor([False, True]))
    mask = torch.tensor([[True, True, False], [True, False, False]])
    rows = draft.verified_logits(mask, V)
    expected = torch.full((3, V), float("-inf"))
    expected[0, ids] = logits[0, 0]
    expected[1, ids] = logits[0, 1]
    expected[2, 9] = 0.0  # request 1 is deterministic: a point mass at its draft 9, whatever its logits
    assert torch.equal(rows, expected)
    assert torch.equal(draft.dense_logits(V)[mask], rows)
    # Without a draft vocabulary too; the point masses are written into a copy, never the draft.
    dense = torch.randn(2, 3, V)
    kept = dense.clone()
    rows = Draft(token_ids=token_ids, logits=dense, point_mass=torch.tensor([False, True])).verified_logits(mask, V)
    assert torch.equal(rows[:2], dense[0, :2]) and torch.equal(rows[2], expected[2]) and torch.equal(dense, kept)
    assert Draft(token_ids=token_ids).verified_logits(mask, V) is None
    with pytest.raises(ValueError, match="logit_ids"):
        Draft(token_ids=token_ids, logits=logits, logit_ids=ids[:2]).verified_logits(mask, V)
    with pytest.raises(ValueError, match="vocabulary"):
        Draft(token_ids=token_ids, logits=logits).verified_logits(mask, V)


def test_draft_context():
    """tokens[b, :lengths[b]] = prompt + everything emitted so far (anchor last); offset = tokens
    generated so far; anchor_hidden = the target's hidden state at the anchor's predecessor row
    (the toy's hidden state is the embedding of the input token: the token before the anchor)."""
    target = toy_target(positional=True)
    drafter = RecordingDrafter(num_draft=K)
    result = generate(target, drafter, PROMPTS, MAX_NEW, temperature=[0.0, 1.0, 0.5], seed=[4, 5, 6])
    assert len(drafter.contexts) >= 1
    full = [torch.cat([p, t]) for p, t in zip(PROMPTS, result.tokens)]
    for ctx in drafter.contexts:
        assert ctx.temperature.tolist() == [0.0, 1.0, 0.5] and ctx.seed.tolist() == [4, 5, 6]
        for b in range(3):
            length = int(ctx.lengths[b])
            assert torch.equal(ctx.tokens[b, :length], full[b][:length])
            assert int(ctx.offset[b]) == length - len(PROMPTS[b])
            assert torch.equal(ctx.anchor_hidden[b], target.embedding[full[b][length - 2]])


def test_mixed_temperatures():
    """Greedy and sampled requests in one batch: the greedy ones are plain greedy decoding."""
    target = toy_target(positional=True)
    result = generate(target, MarkovDrafter.random(V, K, seed=1), PROMPTS, MAX_NEW, temperature=[0.0, 1.0, 0.0],
                      seed=9)
    for b in (0, 2):
        assert torch.equal(result.tokens[b], target.greedy_reference(PROMPTS[b], MAX_NEW[b]))
    assert len(result.tokens[1]) == MAX_NEW[1]


def test_bad_arguments():
    target = toy_target(positional=False)
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(target, AutoregressiveDrafter(), PROMPTS, [1, 2])
    with pytest.raises(ValueError, match="at least one token"):
        generate(target, AutoregressiveDrafter(), [torch.tensor([], dtype=torch.int64)], 3)
    assert generate(target, AutoregressiveDrafter(), [], 3).tokens == []
    with pytest.raises(ValueError, match="temperature"):
        generate(target, AutoregressiveDrafter(), PROMPTS, 3, temperature=-1.0)
    target.max_context = 12  # PROMPTS[0] has 10 tokens
    with pytest.raises(ValueError, match="request 0: prompt \\(10 tokens\\) \\+ max_new_tokens \\(3\\) exceeds"):
        generate(target, AutoregressiveDrafter(), PROMPTS, 3)
    assert generate(target, AutoregressiveDrafter(), PROMPTS, 2).num_generated == 6


def test_sps_as_a_list_like_a_saved_drafter_config():
    """``sps`` may be the list a saved drafter's config holds; it schedules exactly like the tensor."""
    target = toy_target(positional=False)
    drafter = MarkovDrafter.random(V, K, seed=1, confidence=True)
    table = falling_sps(64)
    as_tensor = generate(target, drafter, PROMPTS, MAX_NEW, sps=table)
    as_list = generate(target, drafter, PROMPTS, MAX_NEW, sps=table.tolist())
    assert all(torch.equal(a, b) for a, b in zip(as_tensor.tokens, as_list.tokens))
    assert torch.equal(as_tensor.position_verified, as_list.position_verified)
    with pytest.raises(ValueError, match="sps must be a 1-D table"):
        generate(target, drafter, PROMPTS, MAX_NEW, sps=[[1.0, 2.0]])


# --------------------------------------------------------------------------- law on a tiny Llama

LLAMA_LAW_V = 8
LLAMA_LAW_PROMPT = torch.tensor([1, 2, 3, 1, 2])


def tiny_llama_law():
    """A randomly initialised 2-layer Llama with V = 8 (LM head scaled x 1.5 so its laws are far
    from uniform) and the exact law of its first two sampled tokens after LLAMA_LAW_PROMPT,
    computed with full-sequence transformers forwards: p(y1) p(y2 | y1), [V * V]."""
    model = tiny_llama(seed=5, vocab_size=LLAMA_LAW_V)
    with torch.no_grad():
        first = torch.softmax(model(LLAMA_LAW_PROMPT[None]).logits[0, -1].double() / 40.0 * 1.5, -1)
        sequences = torch.cat([LLAMA_LAW_PROMPT.expand(LLAMA_LAW_V, -1), torch.arange(LLAMA_LAW_V)[:, None]], 1)
        second = torch.softmax(model(sequences).logits[:, -1].double() / 40.0 * 1.5, -1)
    return model, (first[:, None] * second).flatten()


def test_sampling_follows_tiny_llama_law():
    """The first two generated tokens of a tiny random Llama (through LlamaTarget) follow its own
    sampling law, with the n-gram drafter and with a random Markov drafter (2e4 samples each)."""
    targets = pytest.importorskip("dspark_ext.targets")
    from dspark_ext.llama import Llama

    model, law = tiny_llama_law()
    target = targets.LlamaTarget(Llama.from_hf(model))
    samples = 20000
    # The LM head of tiny_llama is scaled x 40 for greedy margins; T = 40 / 1.5 samples from
    # softmax(1.5 x the unscaled head).
    temperature = 40.0 / 1.5
    drafters = {"ngram": NgramDrafter(num_draft=3, min_ngram=1), "markov": MarkovDrafter.random(LLAMA_LAW_V, 3, seed=3)}
    for name, drafter in drafters.items():
        # 3 tokens: y2 comes from a round that verifies one draft (the cap is max_new - 1 - generated).
        result = generate(target, drafter, [LLAMA_LAW_PROMPT] * samples, 3, temperature=temperature, seed=77)
        assert_matches_distribution(sequence_codes(torch.stack([t[:2] for t in result.tokens]), LLAMA_LAW_V), law)
        assert int(result.position_verified.sum()) > 0, name  # drafts were really verified
