"""Prompt lookup's datastore (dspark_ext/drafters/datastore.py) and the lookup drafting from it.

* ``TokenDatastore.continuation`` against a brute-force search (the longest held suffix, its
  most frequent next token, from that token's most recent occurrence, never across a sequence
  end), on random corpora; exact keys and wrapped ones (a large vocabulary);
* bad input is refused in one line; save / load round trip;
* ``NgramDrafter`` with a datastore: its own text first (a match of >= 2 tokens), the store's
  continuation otherwise, no confidence past a continuation's end, calibrated per source;
* at T > 0 a planned hybrid whose lookup drafts from a datastore still follows the target's
  exact joint law; greedy equals plain decoding.
"""

import collections

import pytest
import torch

from dspark_ext.drafters import NgramDrafter
from dspark_ext.drafters.datastore import SEPARATOR, TokenDatastore, shares_a_window, token_windows
from dspark_ext.drafters.hybrid import HybridDrafter
from dspark_ext.drafters.lookup import NUM_RECORDS, PROMPT, STORE, LookupCalibration
from dspark_ext.generate import generate
from dspark_ext.protocols import DraftContext
from helpers import assert_matches_distribution, sequence_codes
from test_hybrid import COSTS, LAW_PROMPT, LAW_SAMPLES, LAW_TOKENS, K, V, law_target, toy_calibration, toy_markov
from toy_targets import TrigramTarget

pytestmark = pytest.mark.usefixtures("one_thread")


def brute_force(corpus, sequence, num_tokens, min_ngram, max_ngram):
    for n in range(min(max_ngram, len(sequence)), min_ngram - 1, -1):
        suffix = list(sequence[len(sequence) - n:])
        starts = [i for i in range(len(corpus) - n) if corpus[i:i + n] == suffix and corpus[i + n] != SEPARATOR]
        if starts:
            counts = collections.Counter(corpus[i + n] for i in starts)
            best = max(counts.values())
            start = max(i for i in starts if counts[corpus[i + n]] == best)
            following = corpus[start + n:start + n + num_tokens]
            if SEPARATOR in following:
                following = following[:following.index(SEPARATOR)]
            return following, n
    return [], 0


@pytest.mark.parametrize("vocab", [3, 7, 1 << 20])
def test_continuation_matches_brute_force(vocab):
    g = torch.Generator().manual_seed(vocab)
    for trial in range(12):
        alphabet = min(vocab, 6)  # small alphabets: many repeats; 1 << 20 ids: wrapped keys
        offset = vocab - alphabet
        sequences = [(torch.randint(0, alphabet, (int(torch.randint(1, 30, (1,), generator=g)),), generator=g)
                      + offset).tolist() for _ in range(int(torch.randint(1, 6, (1,), generator=g)))]
        min_ngram = int(torch.randint(1, 3, (1,), generator=g))
        max_ngram = min_ngram + int(torch.randint(0, 3, (1,), generator=g))
        store = TokenDatastore.from_sequences(sequences, vocab, min_ngram=min_ngram, max_ngram=max_ngram)
        corpus = store.tokens.tolist()
        for _ in range(20):
            query = (torch.randint(0, alphabet, (int(torch.randint(0, 8, (1,), generator=g)),), generator=g)
                     + offset).tolist()
            num_tokens = int(torch.randint(1, 9, (1,), generator=g))
            assert store.continuation(query, num_tokens) == brute_force(corpus, query, num_tokens, min_ngram,
                                                                         max_ngram), (trial, query)


def test_continuation_examples():
    store = TokenDatastore.from_sequences([[1, 2, 3, 4, 5], [9, 2, 3, 7], [2, 3, 7, 8]], vocab_size=10,
                                          min_ngram=2, max_ngram=3)
    assert store.continuation([0, 2, 3], 3) == ([7, 8], 2)  # "2 3" goes on with 7 twice, with 4 once
    assert store.continuation([1, 2, 3], 5) == ([4, 5], 3)  # the longer match wins; stops at the end
    assert store.continuation([5, 6], 3) == ([], 0)
    assert store.continuation([3], 3) == ([], 0)  # shorter than min_ngram
    assert store.continuation([], 3) == ([], 0)
    empty = TokenDatastore.from_sequences([], vocab_size=10)
    assert empty.continuation([1, 2, 3], 4) == ([], 0)


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match=r"token ids must be in \[0, 10\)"):
        TokenDatastore(torch.tensor([1, 2, 10]), vocab_size=10)
    with pytest.raises(ValueError, match=r"token ids must be in \[0, 10\)"):
        TokenDatastore(torch.tensor([1, -2, 3]), vocab_size=10)
    with pytest.raises(ValueError, match="tokens must be 1-D"):
        TokenDatastore(torch.zeros(2, 3, dtype=torch.int64), vocab_size=10)
    with pytest.raises(ValueError, match="min_ngram <= max_ngram"):
        TokenDatastore(torch.tensor([1, 2]), vocab_size=10, min_ngram=3, max_ngram=2)
    with pytest.raises(ValueError, match="max_continuation >= 1"):
        TokenDatastore(torch.tensor([1, 2]), vocab_size=10, max_continuation=0)
    store = TokenDatastore.from_sequences([[2, 4, 5], [12 % 10, 3, 1]], vocab_size=10, min_ngram=2, max_ngram=2)
    assert store.continuation([2, 4], 2) == ([5], 2)
    assert store.continuation([12, 3], 2) == ([], 0)  # 12 is no id here: never the key of [2, 4]
    assert store.continuation([-1, 3], 2) == ([], 0)
    with pytest.raises(ValueError, match="a 10-token vocabulary; the target has 12"):
        store.check_vocabulary(12, "the target")
    with pytest.raises(ValueError, match="give source and store_max_ngram together"):
        LookupCalibration.fit(*(torch.zeros(1, dtype=torch.int64),) * 5, max_ngram=3, num_draft=3, store_max_ngram=3)


def test_save_and_load(tmp_path):
    from safetensors.torch import save_file

    store = TokenDatastore.from_sequences([[1, 2, 3, 4], [2, 3, 5]], vocab_size=6, min_ngram=1, max_ngram=2,
                                          notes={"source": "test"})
    store.save(tmp_path / "s.safetensors")
    loaded = TokenDatastore.load(tmp_path / "s.safetensors")
    assert torch.equal(loaded.tokens, store.tokens) and loaded.notes == {"source": "test"}
    assert (loaded.vocab_size, loaded.min_ngram, loaded.max_ngram) == (6, 1, 2)
    for query in ([2, 3], [3], [9 % 6, 1]):
        assert loaded.continuation(query, 4) == store.continuation(query, 4)
    save_file({"weight": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="not a TokenDatastore file"):
        TokenDatastore.load(tmp_path / "other.safetensors")


def test_token_windows():
    long_text, short_text, tiny_text = list(range(20)), [30 + i for i in range(9)], [7, 8]
    windows = token_windows([long_text, short_text, tiny_text], 16)
    assert set(windows) == {16, 9} and len(windows[16]) == 5  # the tiny text marks nothing
    assert shares_a_window([99] + long_text[3:19] + [98], windows)
    assert not shares_a_window(long_text[3:18], windows)  # 15 tokens of it: not enough
    assert shares_a_window([1, 2] + short_text + [5], windows)  # a short text, whole
    assert not shares_a_window(short_text[1:] + tiny_text, windows)


def _context(sequences, temperature=0.0):
    width = max(map(len, sequences))
    tokens = torch.tensor([s + [0] * (width - len(s)) for s in sequences])
    B = len(sequences)
    return DraftContext(tokens=tokens, lengths=torch.tensor([len(s) for s in sequences]), anchor_hidden=None,
                        temperature=torch.full((B,), temperature), seed=torch.zeros(B, dtype=torch.int64),
                        offset=torch.zeros(B, dtype=torch.int64), new_from=torch.zeros(B, dtype=torch.int64))


def store_calibration(prompt=0.6, store=0.3, max_ngram=3, store_max_ngram=3, store_min_ngram=1):
    calibration = toy_calibration(prompt, max_ngram)
    table = torch.full((2, store_max_ngram + 1, NUM_RECORDS, K), store)
    table[:, 0] = 0.0
    calibration.store_table = table
    calibration.notes["datastore"] = {"min_ngram": store_min_ngram, "max_ngram": store_max_ngram}
    return calibration


def test_lookup_drafts_from_its_own_text_first_then_the_datastore():
    store = TokenDatastore.from_sequences([[5, 6, 7, 1], [4, 5, 6]], vocab_size=V, min_ngram=2, max_ngram=3)
    drafter = NgramDrafter(num_draft=K, max_ngram=3, min_ngram=1, calibration=store_calibration(), datastore=store)
    own = [1, 2, 3, 1, 2]  # "1 2" earlier in its own text (2 tokens): goes on 3 1 2
    stored = [0, 3, 5, 6]  # nothing of its own; "5 6" in the store goes on 7 1, then that sequence ends
    short = [2, 4, 5]  # "4 5" in the store goes on 6, then ends
    plain = [0, 1, 0, 3, 0]  # its own "0" (1 token) and nothing in the store: its own match
    nothing = [7, 2]
    draft = drafter.propose(_context([own, stored, short, plain, nothing]))
    assert draft.token_ids.tolist() == [[3, 1, 2], [7, 1, 1], [6, 6, 6], [3, 0, 3], [2, 2, 2]]
    assert drafter.last_source.tolist() == [PROMPT, STORE, STORE, PROMPT, PROMPT]
    # Calibrated per source (first call: no record yet); nothing past a continuation's end.
    expected = torch.tensor([[0.6] * 3, [0.3, 0.3, 0.0], [0.3, 0.0, 0.0], [0.6] * 3, [0.0] * 3])
    torch.testing.assert_close(draft.confidence, expected)
    uncalibrated = NgramDrafter(num_draft=K, max_ngram=3, min_ngram=1, datastore=store)
    assert uncalibrated.propose(_context([stored, short])).confidence.tolist() == [[1, 1, 0], [1, 0, 0]]


def test_a_one_token_store_match_drafts_only_where_the_request_has_none():
    store = TokenDatastore.from_sequences([[5, 6, 7, 1], [2, 4, 5]], vocab_size=V, min_ngram=1, max_ngram=3)
    drafter = NgramDrafter(num_draft=K, max_ngram=3, min_ngram=1,
                           calibration=store_calibration(store_max_ngram=3), datastore=store)
    unseen = [0, 3, 7]  # no earlier "7" of its own; the store's "7" goes on 1, then ends
    own_single = [6, 0, 6]  # its own "6" goes on 0; the store's "6" (also 1 token) does not replace it
    longer_in_store = [3, 1, 5, 6]  # its own "6": no; the store's "5 6" (2 tokens) beats no own match
    draft = drafter.propose(_context([unseen, own_single, longer_in_store]))
    assert draft.token_ids.tolist() == [[1, 1, 1], [0, 6, 0], [7, 1, 1]]
    assert drafter.last_source.tolist() == [STORE, PROMPT, STORE]
    torch.testing.assert_close(draft.confidence, torch.tensor([[0.3, 0.0, 0.0], [0.6] * 3, [0.3, 0.3, 0.0]]))


def test_lookup_refuses_a_calibration_without_datastore_rows():
    store = TokenDatastore.from_sequences([[1, 2, 3]], vocab_size=V, min_ngram=2, max_ngram=3)
    with pytest.raises(ValueError, match="no table for datastore matches"):
        NgramDrafter(num_draft=K, max_ngram=3, min_ngram=1, calibration=toy_calibration(), datastore=store)
    with pytest.raises(ValueError, match="covers datastore matches up to 2 tokens"):
        NgramDrafter(num_draft=K, max_ngram=3, min_ngram=1, calibration=store_calibration(store_max_ngram=2),
                     datastore=store)
    one_token_keys = TokenDatastore.from_sequences([[1, 2, 3]], vocab_size=V, min_ngram=1, max_ngram=3)
    with pytest.raises(ValueError, match="fitted with datastore matches from 2 tokens on, the datastore matches 1"):
        NgramDrafter(num_draft=K, max_ngram=3, min_ngram=1, calibration=store_calibration(store_min_ngram=2),
                     datastore=one_token_keys)


def test_calibration_fits_each_source_and_round_trips(tmp_path):
    ones = torch.ones(4, dtype=torch.int64)
    source = torch.tensor([PROMPT, PROMPT, STORE, STORE])
    calibration = LookupCalibration.fit(ones, torch.tensor([2, 2, 3, 3]), torch.full((4,), 3), torch.full((4,), 3),
                                        torch.tensor([3, 1, 0, 2]), max_ngram=3, num_draft=3, prior_weight=0.0,
                                        source=source, store_max_ngram=4)
    assert calibration.table[1, 2, 3].tolist() == pytest.approx([1.0, 0.5, 1.0])
    assert calibration.store_table.shape == (2, 5, NUM_RECORDS, 3) and calibration.store_max_ngram == 4
    assert calibration.store_table[1, 3, 3].tolist() == pytest.approx([0.5, 1.0, 0.0])
    assert calibration.notes["samples"] == 2 and calibration.notes["store_samples"] == 2
    calibration.save(tmp_path / "c.json")
    loaded = LookupCalibration.load(tmp_path / "c.json")
    assert torch.equal(loaded.store_table, calibration.store_table) and torch.equal(loaded.table, calibration.table)


def toy_store(target, seed=0, sequences=40, length=12):
    """Text of the toy target itself (its samples from random prompts), as a datastore."""
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(0, V, (3,), generator=g) for _ in range(sequences)]
    result = generate(target, NgramDrafter(num_draft=K, min_ngram=1), prompts, length, temperature=1.0, seed=seed)
    return TokenDatastore.from_sequences([t.tolist() for t in result.tokens], V, min_ngram=1, max_ngram=3)


class StoreHybrid(HybridDrafter):
    """The hybrid of tests/test_hybrid.py, its lookup drafting from a datastore."""

    def __init__(self, target):
        lookup = NgramDrafter(num_draft=K, max_ngram=3, min_ngram=1, calibration=store_calibration(0.7, 0.5),
                              datastore=toy_store(target))
        super().__init__(toy_markov(), lookup)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_planned_hybrid_with_a_datastore_follows_target_law(temperature):
    target = law_target()
    drafter = StoreHybrid(target)
    result = generate(target, drafter, [LAW_PROMPT] * LAW_SAMPLES, LAW_TOKENS + 1, temperature=temperature,
                      seed=1000, cost=COSTS["cheap"])
    stored = drafter.lookup.proposals[STORE]  # proposals made from the store (not their forecasts)
    assert stored > 0.05 * LAW_SAMPLES, drafter.lookup.proposals
    assert int(result.position_accepted.sum()) > 0.01 * LAW_SAMPLES, result.summary()
    codes = sequence_codes(torch.stack([t[:LAW_TOKENS] for t in result.tokens]), V)
    assert_matches_distribution(codes, target.exact_joint(LAW_PROMPT, LAW_TOKENS, temperature))


@pytest.mark.parametrize("cost", [None, "cheap"])
def test_greedy_with_a_datastore_equals_plain_decoding(cost):
    target = TrigramTarget(V, seed=6, scale=3.0, period=1)
    prompts = [torch.tensor([1, 2, 3, 1, 2, 3, 1, 2, 3, 1]), torch.tensor([4, 5]), torch.tensor([0, 6, 7, 0, 6, 7, 2])]
    max_new = [30, 9, 21]
    drafter = StoreHybrid(target)
    result = generate(target, drafter, prompts, max_new, cost=None if cost is None else COSTS[cost])
    for b, prompt in enumerate(prompts):
        assert torch.equal(result.tokens[b], target.greedy_reference(prompt, max_new[b])), b


def test_cli_build_datastore_skips_evaluation_prompts(tmp_path, monkeypatch, capsys):
    """`dspark build-datastore`: the target's greedy answers to the recipe's ShareGPT prompts,
    minus any prompt that shares 16 tokens with an evaluation set or is a calibration prompt,
    written as a datastore."""
    from dspark_ext import cli
    from dspark_ext.drafters import datastore as datastore_module
    import dspark_ext.train as train

    class Tokenizer:
        eos_token_id = None

        def encode(self, text, add_special_tokens=False):
            return [ord(c) % V for c in text]

    evaluation_prompt = Tokenizer().encode(cli.load_eval_prompts("gsm8k", 1)[0])[:20]
    calibration_prompt = [3, 1, 4, 1, 5, 2, 6, 5, 3, 5, 0, 7, 2, 3, 7, 4, 6, 2]
    kept = [[1, 2, 3], [4, 5, 6, 7]]
    records = [{"prompt": kept[0]}, {"prompt": evaluation_prompt}, {"prompt": calibration_prompt},
               {"prompt": kept[1]}, {"prompt": [0, 1]}]
    target = TrigramTarget(V, seed=6, scale=3.0, period=1)
    monkeypatch.setattr(cli, "_load_target", lambda args: (target, Tokenizer()))
    monkeypatch.setattr(train, "prepare_sharegpt_answers", lambda tokenizer, tokens, cache, seed=0: records)
    # The lookup's calibration prompts: the 2 after the first 3 (as --calibration-skip 3).
    monkeypatch.setattr(train, "prepare_prompts", lambda tokenizer, n, cache, seed=0: [[0]] * 3 + [calibration_prompt, [5]])
    out = tmp_path / "store.safetensors"
    assert cli.main(["build-datastore", "--out", str(out), "--prompts", "4", "--max-new-tokens", "6",
                     "--batch-size", "2", "--calibration-skip", "3", "--calibration-prompts", "2"]) == 0
    store = datastore_module.TokenDatastore.load(out)
    expected = [target.greedy_reference(torch.tensor(p), 6).tolist() for p in kept]
    assert store.tokens.tolist() == expected[0] + [SEPARATOR] + expected[1] + [SEPARATOR]
    notes = store.notes
    assert notes["excluded_for_evaluation_overlap"] == 1 and notes["excluded_for_calibration_overlap"] == 1
    assert notes["prompts"] == 2 and notes["answered"] == 4
    assert "2 of the first 4 prompts (1 share text with an evaluation set, 1 are calibration prompts" in capsys.readouterr().err


def test_cli_datastore_argument(tmp_path):
    from dspark_ext import cli

    assert cli._datastore_arg("none") is None
    with pytest.raises(cli.CliError, match="--datastore nowhere.safetensors: no such file"):
        cli._datastore_arg("nowhere.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"\xff" * 64)
    with pytest.raises(cli.CliError, match="junk.safetensors: not a datastore"):
        cli._datastore_arg(str(tmp_path / "junk.safetensors"))
    TokenDatastore.from_sequences([[1, 2, 3]], vocab_size=V).save(tmp_path / "s.safetensors")
    assert cli._datastore_arg(str(tmp_path / "s.safetensors")).tokens.tolist() == [1, 2, 3, SEPARATOR]
