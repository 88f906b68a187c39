"""Training data and training loop of the DSpark drafter (dspark_ext/train.py), on a tiny random
Llama target: ShareGPT parsing and prompt preparation (fake tokenizer), regeneration and the
feature cache, the training batches against a naive construction, the loss going down,
checkpoint/resume determinism, the time budget, and the held-out rollouts."""

import json
import shutil

import pytest
import torch

pytest.importorskip("transformers")

from dspark_ext import train  # noqa: E402
from dspark_ext.drafters.dspark import DrafterConfig, DSparkDrafter  # noqa: E402
from dspark_ext.train import (  # noqa: E402
    FeatureCache, TrainConfig, cache_features, dspark_loss, heldout_rollouts, iter_sharegpt, prepare_prompts,
    regenerate, train_drafter,
)
from test_drafter import randomize  # noqa: E402
from test_generate import tiny_llama  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors (conftest.one_thread)


# --------------------------------------------------------------------------- ShareGPT and prompts


def conversation(i, first_human, *, first_from="human"):
    turns = [{"from": "system", "value": "be nice"}] if i % 2 else []
    turns += [{"from": first_from, "value": first_human}, {"from": "gpt", "value": "an answer ] } {"}]
    if first_from != "human":
        turns.append({"from": "human", "value": f"late question {i}"})
    return {"id": f"c{i}", "conversations": turns}


def write_truncated_sharegpt(path, records, tail='{"id": "torn", "conversations": [{"from": "human", "val'):
    body = ",\n  ".join(json.dumps(r) for r in records)
    path.write_text(f"[\n  {body},\n  {tail}")
    return path


def test_iter_sharegpt_drops_the_torn_tail(tmp_path):
    records = [conversation(i, f"question {i} with brackets ]}}[{{ and \\\"quotes\\\"") for i in range(5)]
    path = write_truncated_sharegpt(tmp_path / "sg.json", records)
    assert list(iter_sharegpt(path)) == records
    # Cut inside the last complete record's closing braces: that record is torn too.
    text = path.read_text()
    cut = text.index('{"id": "c4"') + 40
    (tmp_path / "cut.json").write_text(text[:cut])
    assert list(iter_sharegpt(tmp_path / "cut.json")) == records[:4]
    # An intact file (no torn tail) yields everything; an empty array nothing.
    (tmp_path / "whole.json").write_text(json.dumps(records, indent=2))
    assert list(iter_sharegpt(tmp_path / "whole.json")) == records
    (tmp_path / "empty.json").write_text("[ ]")
    assert list(iter_sharegpt(tmp_path / "empty.json")) == []


class FakeTokenizer:
    """apply_chat_template -> [BOS, one id per word, EOT]; optionally as a BatchEncoding-like dict."""

    def __init__(self, as_dict=False):
        self.as_dict = as_dict
        self.calls = 0

    def apply_chat_template(self, messages, add_generation_prompt):
        assert add_generation_prompt and len(messages) == 1 and messages[0]["role"] == "user"
        self.calls += 1
        ids = [1] + [3 + len(w) for w in messages[0]["content"].split()] + [2]
        return {"input_ids": ids} if self.as_dict else ids


@pytest.mark.parametrize("as_dict", [False, True])
def test_prepare_prompts_filters_and_caches(tmp_path, monkeypatch, as_dict):
    records = [
        conversation(0, "one two three four five"),  # 7 tokens
        conversation(1, "short"),  # 3 tokens: below min_prompt_tokens = 4
        conversation(2, " ".join(["word"] * 20)),  # 22 tokens: above max_prompt_tokens = 12
        conversation(3, "   "),  # blank: skipped
        conversation(4, "gpt speaks first here", first_from="gpt"),  # the first *human* turn counts
        conversation(5, "a b c"),  # 5 tokens
        {"id": "no-turns"},
        conversation(6, "x y z w v u"),  # 8 tokens
    ]
    path = write_truncated_sharegpt(tmp_path / "sg.json", records, tail=json.dumps(conversation(7, "torn away"))[:-25])
    monkeypatch.setattr(train, "sharegpt_path", lambda: path)
    tok = FakeTokenizer(as_dict)
    ids = FakeTokenizer().apply_chat_template
    expected = [ids([{"role": "user", "content": t}], add_generation_prompt=True)
                for t in ("one two three four five", "late question 4", "a b c", "x y z w v u")]
    out = tmp_path / "cache" / "prompts.json"
    prompts = prepare_prompts(tok, 10, out, max_prompt_tokens=12, min_prompt_tokens=4, seed=3)
    assert sorted(prompts) == sorted(expected)
    assert json.loads(out.read_text()) == prompts  # cached
    # The cache is the answer to the same request from now on (no tokenizer, no ShareGPT needed).
    monkeypatch.setattr(train, "sharegpt_path", lambda: (_ for _ in ()).throw(AssertionError("read ShareGPT")))
    assert prepare_prompts(None, 10, out, max_prompt_tokens=12, min_prompt_tokens=4, seed=3) == prompts
    # num_prompts caps the count; the seed fixes which (a shuffle of the conversations).
    monkeypatch.setattr(train, "sharegpt_path", lambda: path)
    few = prepare_prompts(tok, 2, tmp_path / "few.json", max_prompt_tokens=12, min_prompt_tokens=4, seed=3)
    assert few == prompts[:2]
    others = [prepare_prompts(tok, 10, tmp_path / f"s{seed}.json", max_prompt_tokens=12, min_prompt_tokens=4,
                              seed=seed) for seed in range(4, 8)]
    assert all(sorted(o) == sorted(expected) for o in others) and any(o != prompts for o in others)


def test_prepare_prompts_unique_and_a_cache_only_for_the_request_it_answered(tmp_path, monkeypatch):
    texts = ["aa bbb", "cccc d", "aa bbb", "e ff ggg", "cccc d", "hhhhh ii"]  # two repeats
    path = write_truncated_sharegpt(tmp_path / "sg.json", [conversation(2 * i, t) for i, t in enumerate(texts)])
    monkeypatch.setattr(train, "sharegpt_path", lambda: path)
    monkeypatch.setattr(train.random, "Random", lambda seed: type("R", (), {"shuffle": lambda self, x: None})())
    tok = FakeTokenizer()
    ids = [tok.apply_chat_template([{"role": "user", "content": t}], add_generation_prompt=True) for t in texts]
    out = tmp_path / "prompts.json"
    assert prepare_prompts(tok, 4, out) == ids[:4]
    assert prepare_prompts(tok, 4, out, unique=True) == [ids[0], ids[1], ids[3], ids[5]]
    assert prepare_prompts(tok, 2, out, unique=True) == [ids[0], ids[1]]
    # More prompts than the cache holds extend the same shuffle instead of reusing the cache.
    assert prepare_prompts(tok, 5, out) == ids[:5]
    calls = tok.calls
    assert prepare_prompts(tok, 5, out) == ids[:5] and tok.calls == calls  # the same request: cached
    # A cache written before the request was recorded beside it is trusted only for as many prompts
    # as it holds (and, asked for unique ones, if it has no repeat).
    train._selection_file(out).unlink()
    assert prepare_prompts(tok, 5, out) == ids[:5] and tok.calls == calls
    train._selection_file(out).unlink()
    assert prepare_prompts(tok, 6, out) == ids and tok.calls > calls
    train._selection_file(out).unlink()
    assert prepare_prompts(tok, 6, out, unique=True) == [ids[0], ids[1], ids[3], ids[5]]


# --------------------------------------------------------------------------- regenerate + features

NUM_PROMPTS = 15
MAX_NEW = 14
CONTEXT_LAYERS = [1, 2]
K = 4


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """(target, records, feature shard paths, FeatureCache) for 15 prompts of a tiny Llama."""
    from dspark_ext.llama import Llama
    from dspark_ext.targets import LlamaTarget

    root = tmp_path_factory.mktemp("data")
    target = LlamaTarget(Llama.from_hf(tiny_llama()))
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(1, 96, (int(torch.randint(2, 9, (1,), generator=g)),), generator=g).tolist()
               for _ in range(NUM_PROMPTS)]
    eos = 7
    records = regenerate(target, prompts, root / "answers", MAX_NEW, 4, eos)
    target.hidden_layers = CONTEXT_LAYERS + [-1]
    paths = cache_features(target, records, root / "features", 4)
    return target, prompts, records, paths, FeatureCache(paths, heldout_every=5), root


def test_regenerate_and_cache_features(dataset):
    target, prompts, records, paths, data, root = dataset
    assert [r["prompt"] for r in records] == prompts
    assert [r["temperature"] for r in records] == [0.0, 1.0] * (NUM_PROMPTS // 2) + [0.0]
    assert len(list((root / "answers").glob("answers_*.json"))) == 4 and len(paths) == 4
    from dspark_ext.drafters import AutoregressiveDrafter
    from dspark_ext.generate import generate

    for r in records:
        assert 1 <= len(r["answer"]) <= MAX_NEW and (len(r["answer"]) == MAX_NEW or r["answer"][-1] == 7)
    stale = root / "stale"
    saved_layers = target.hidden_layers
    target.hidden_layers = None
    try:
        greedy = [i for i, r in enumerate(records) if r["temperature"] == 0.0]
        ref = generate(target, AutoregressiveDrafter(), [torch.tensor(prompts[i]) for i in greedy], MAX_NEW,
                       eos_token_id=7)
        assert [records[i]["answer"] for i in greedy] == [t.tolist() for t in ref.tokens]
        # Resumable: finished shards are read back, not regenerated (the target is not called).
        again = regenerate(None, prompts, root / "answers", MAX_NEW, 4, 7)
        assert again == records
        assert cache_features(None, records, root / "features", 4) == paths
        # A folder reused for other prompts: only the files that answer other prompts are redone,
        # and the new answer is the target's own (request 4 is greedy).
        shutil.copytree(root / "answers", stale / "answers")
        other = prompts[:4] + [[3, 4, 5]] + prompts[5:]
        redone = regenerate(target, other, stale / "answers", MAX_NEW, 4, 7)
        assert [r["prompt"] for r in redone] == other and redone[:4] == records[:4] and redone[8:] == records[8:]
        ref = generate(target, AutoregressiveDrafter(), [torch.tensor([3, 4, 5])], MAX_NEW, eos_token_id=7)
        assert redone[4]["answer"] == ref.tokens[0].tolist()
    finally:
        target.hidden_layers = saved_layers

    # ... and so are the feature shards over them, and their teacher statistics.
    feature_dir = stale / "features"
    shutil.copytree(root / "features", feature_dir)
    for p in paths:
        (feature_dir / f"{p.stem}.teacher-bfloat16.pt").write_bytes(b"stale")
    moved = cache_features(target, redone, feature_dir, 4)
    assert [torch.equal(torch.load(a)["tokens"], torch.load(b)["tokens"]) for a, b in zip(paths, moved)] == \
        [True, False, True, True]
    assert sorted(p.name for p in feature_dir.glob("*.teacher-*.pt")) == [
        f"{paths[i].stem}.teacher-bfloat16.pt" for i in (0, 2, 3)]
    fresh = cache_features(target, redone, stale / "fresh", 4)
    for a, b in zip(moved, fresh):
        x, y = torch.load(a), torch.load(b)
        assert all(torch.equal(x[k], y[k]) for k in x)

    # Shards: tokens / offsets / prompt lengths and the target's features of every position.
    i = 5  # shard 1, sequence 1
    shard = torch.load(paths[1])
    seq = torch.tensor(records[i]["prompt"] + records[i]["answer"])
    start, end = int(shard["cu_seqlens"][1]), int(shard["cu_seqlens"][2])
    assert torch.equal(shard["tokens"][start:end].long(), seq)
    assert int(shard["prompt_lengths"][1]) == len(records[i]["prompt"])
    assert shard["context"].dtype == shard["final"].dtype == torch.float16
    out = target.start([seq])
    D = 64
    assert shard["context"].shape[1] == 2 * D and shard["final"].shape[1] == D
    torch.testing.assert_close(shard["context"][start:end].float(), out.hidden_states[:, :2 * D], rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(shard["final"][start:end].float(), out.hidden_states[:, 2 * D:], rtol=2e-3, atol=2e-3)
    # The LM head on the cached final states gives the target's logits back (p_t in the loss).
    w = target.model.weights
    logits = shard["final"][start:end].float() @ w.lm_head.float().T
    assert torch.equal(logits.argmax(-1), out.logits.argmax(-1))


def raw_sequences(records):
    return [(torch.tensor(r["prompt"] + r["answer"]), len(r["prompt"])) for r in records]


def test_feature_cache_split_and_batch(dataset):
    target, prompts, records, paths, data, root = dataset
    seqs = raw_sequences(records)
    assert data.num_tokens == sum(len(s) for s, _ in seqs)
    usable = [i for i, (s, p) in enumerate(seqs) if len(s) - p >= 2]
    assert data.heldout_ids == [i for i in usable if i % 5 == 4]
    assert data.train_ids == [i for i in usable if i % 5 != 4]
    assert data.answer_tokens([0, 3]) == len(records[0]["answer"]) + len(records[3]["answer"])

    # Every shard's rows, per sequence, as one flat list (the naive source of truth).
    shards = [torch.load(p) for p in paths]
    flat_context = torch.cat([s["context"] for s in shards])
    flat_final = torch.cat([s["final"] for s in shards])
    offsets = torch.tensor([0] + [len(s) for s, _ in seqs]).cumsum(0)

    ids = [2, 7, 13]
    anchors = [torch.tensor([a, b, c]) for a, b, c in ((3, 9, 5), (4, 6, 11), (2, 3, 8))]
    lengths = [len(seqs[i][0]) for i in ids]
    anchors = [a.clamp(max=n - 2) for a, n in zip(anchors, lengths)]
    batch = data.batch(ids, anchors, K)
    S = max(int(a.max()) for a in anchors)
    assert batch["context"].shape == (3, S, 2 * 64) and batch["final"].shape == (3, 3, K, 64)
    for i, (sid, a) in enumerate(zip(ids, anchors)):
        tok, n, base = seqs[sid][0], lengths[i], int(offsets[sid])
        assert torch.equal(batch["context_positions"][i], torch.arange(S))
        for j, anchor in enumerate(a.tolist()):
            assert int(batch["anchor_ids"][i, j]) == int(tok[anchor])
            assert int(batch["anchor_positions"][i, j]) == anchor
            assert batch["context_mask"][i, j].tolist() == [s < anchor for s in range(S)]
            for k in range(K):
                ok = anchor + k + 1 < n
                assert bool(batch["valid"][i, j, k]) == ok
                if ok:  # block position k predicts token anchor + k + 1 from row anchor + k
                    assert int(batch["targets"][i, j, k]) == int(tok[anchor + k + 1])
                    assert int(batch["prev"][i, j, k]) == int(tok[anchor + k])
                    assert torch.equal(batch["final"][i, j, k], flat_final[base + anchor + k].float())
        rows = int(a.max())
        assert torch.equal(batch["context"][i, :rows], flat_context[base:base + rows].float())
        # Rows past a sequence's last anchor are padding: masked for every block of that row.
        assert not bool(batch["context_mask"][i, :, rows:].any())


def test_feature_cache_sample_anchors_in_answer(dataset):
    target, prompts, records, paths, data, root = dataset
    g = torch.Generator().manual_seed(1)
    for sid in data.train_ids[:4]:
        batch = data.sample(g, 2, 200, K, ids=[sid])
        seq, prompt_len = raw_sequences(records)[sid]
        pos = batch["anchor_positions"]
        assert pos.shape == (2, 200)
        # Anchors lie in the answer (the prompt's last token included: it predicts the first
        # answer token) and leave at least one target: prompt_len <= a <= len - 2 ...
        assert int(pos.min()) >= prompt_len and int(pos.max()) <= len(seq) - 2
        # ... and cover that whole range.
        assert set(pos.flatten().tolist()) == set(range(prompt_len, len(seq) - 1))
        assert bool(batch["valid"][..., 0].all())
        assert torch.equal(batch["anchor_ids"], seq[pos])
    batch = data.sample(torch.Generator().manual_seed(2), 64, 4, K)
    assert batch["anchor_ids"].shape == (64, 4) and batch["targets"].shape == (64, 4, K)


# --------------------------------------------------------------------------- training


def new_drafter(target, seed=0, **kwargs):
    torch.manual_seed(seed)
    kwargs = {"num_draft": K, "markov_rank": 8, **kwargs}
    cfg = DrafterConfig.for_llama(target.model.config, CONTEXT_LAYERS, **kwargs)
    w = target.model.weights
    return DSparkDrafter(cfg, w.embed, w.lm_head)


def fixed_batch(data):
    return data.sample(torch.Generator().manual_seed(123), 8, 16, K)


def test_training_reduces_the_loss(dataset, tmp_path):
    target, prompts, records, paths, data, root = dataset
    drafter = new_drafter(target)
    batch = fixed_batch(data)
    with torch.no_grad():
        loss0, m0 = dspark_loss(drafter, batch)
    out = train_drafter(drafter, data, TrainConfig(steps=40, warmup_steps=5, checkpoint_every=20, lr=3e-3,
                                                   sequences_per_step=4, anchors_per_sequence=16),
                        tmp_path / "ckpt.pt")
    assert out["steps"] == 40 and not out["stopped_early"]
    assert [h["step"] for h in out["history"]] == [10, 20, 30, 40]
    assert not drafter.training  # back in eval mode
    with torch.no_grad():
        loss1, m1 = dspark_loss(drafter, batch)
    assert float(loss1) < 0.7 * float(loss0), (float(loss0), float(loss1))
    assert m1["tv"] < m0["tv"] - 0.05 and m1["ce"] < m0["ce"]
    first, last = out["history"][0], out["history"][-1]
    assert last["loss"] < 0.8 * first["loss"] and last["tv"] < first["tv"]
    assert len(last["accept_t1"]) == len(last["greedy_match"]) == K
    # Training touched the Markov and confidence heads (zero-initialised), not the target's
    # frozen embedding / LM head.
    assert float(drafter.markov.w2.weight.abs().max()) > 0 and float(drafter.confidence.linear.weight.abs().max()) > 0
    assert torch.equal(drafter.lm_head, target.model.weights.lm_head.float())
    assert torch.equal(drafter.embedding, target.model.weights.embed.float())


class Killed(Exception):
    pass


class CrashAfter:
    """A FeatureCache whose ``sample`` fails after ``calls`` calls (a killed training job)."""

    def __init__(self, data, calls):
        self.data, self.left = data, calls

    def sample(self, *args, **kwargs):
        if self.left == 0:
            raise Killed()
        self.left -= 1
        return self.data.sample(*args, **kwargs)


def test_resume_from_checkpoint_is_deterministic(dataset, tmp_path):
    target, prompts, records, paths, data, root = dataset
    cfg = dict(steps=24, warmup_steps=4, checkpoint_every=8, lr=3e-3, sequences_per_step=2, anchors_per_sequence=8)
    whole = new_drafter(target, seed=3)
    run = train_drafter(whole, data, TrainConfig(**cfg), tmp_path / "whole.pt")

    part = new_drafter(target, seed=3)
    with pytest.raises(Killed):
        train_drafter(part, CrashAfter(data, 13), TrainConfig(**cfg), tmp_path / "part.pt")  # checkpoint at 8
    assert torch.load(tmp_path / "part.pt", weights_only=False)["step"] == 8
    resumed = new_drafter(target, seed=99)  # other initial weights: everything comes from the checkpoint
    run2 = train_drafter(resumed, data, TrainConfig(**cfg), tmp_path / "part.pt")
    assert run2["steps"] == 24
    final, final2 = whole.state_dict(), resumed.state_dict()
    assert final.keys() == final2.keys()
    for name in final:
        assert torch.equal(final[name], final2[name]), name
    # The logged means agree from the first window that lies wholly after the resume (the
    # window of step 10 only saw steps 9-10 after resuming at 8).
    assert [h["step"] for h in run2["history"]] == [h["step"] for h in run["history"]] == [10, 20, 24]
    assert [(h["loss"], h["tv"], h["accept_t1"]) for h in run["history"][1:]] == \
        [(h["loss"], h["tv"], h["accept_t1"]) for h in run2["history"][1:]]
    # A finished run resumes to nothing.
    again = train_drafter(new_drafter(target, seed=5), data, TrainConfig(**cfg), tmp_path / "whole.pt")
    assert again["steps"] == 24 and again["history"] == run["history"]


class FakeClock:
    """``time`` for dspark_ext.train: every step (two perf_counter calls) lasts ``duration(step)`` s."""

    def __init__(self, duration):
        self.duration, self.calls, self.now = duration, 0, 0.0

    def perf_counter(self):
        self.calls += 1
        if self.calls % 2 == 0:
            self.now += self.duration(self.calls // 2)
        return self.now


@pytest.mark.parametrize("slowdown", [False, True])
def test_time_budget(dataset, tmp_path, monkeypatch, slowdown):
    """After 10 steps the schedule is fitted to the budget (steps = budget / pace); a run that
    slows down stops early at 1.1 x the budget."""
    target, prompts, records, paths, data, root = dataset
    monkeypatch.setattr(train, "time", FakeClock(lambda step: 3.0 if slowdown and step > 10 else 1.0))
    drafter = new_drafter(target)
    cfg = TrainConfig(steps=100, warmup_steps=2, checkpoint_every=1000, sequences_per_step=1,
                      anchors_per_sequence=4, time_budget_s=15.0)
    out = train_drafter(drafter, data, cfg, tmp_path / "ckpt.pt")
    # 10 steps of 1 s, then 3 s each: 13, 16, 19 > 16.5 -> stop after step 13.
    assert (out["steps"], out["stopped_early"]) == ((13, True) if slowdown else (15, False))
    assert out["train_seconds"] == (19.0 if slowdown else 15.0)
    assert torch.load(tmp_path / "ckpt.pt", weights_only=False)["planned_steps"] == 15


def test_time_budget_leaves_a_slow_first_step_out_of_the_pace(dataset, tmp_path, monkeypatch):
    """The first step also pays for torch.compile: 10 s, then 1 s a step, 30 s of budget -> 21 steps."""
    target, prompts, records, paths, data, root = dataset
    monkeypatch.setattr(train, "time", FakeClock(lambda step: 10.0 if step == 1 else 1.0))
    cfg = TrainConfig(steps=100, warmup_steps=2, checkpoint_every=1000, sequences_per_step=1,
                      anchors_per_sequence=4, time_budget_s=30.0)
    out = train_drafter(new_drafter(target), data, cfg, tmp_path / "ckpt.pt")
    assert (out["steps"], out["stopped_early"], out["train_seconds"]) == (21, False, 30.0)


@pytest.mark.parametrize("old_checkpoint", [False, True])
def test_warm_restart_trains_a_finished_run_longer(dataset, tmp_path, monkeypatch, old_checkpoint):
    """A finished run (15 steps in its 15 s budget) resumed with restart_budget_s = 20 s trains a
    second warmup + cosine cycle fitted to that budget (20 more steps), peaking at restart_lr;
    checkpoints written before cycles existed resume into it too. Done in one call, the two cycles
    give the same weights."""
    target, prompts, records, paths, data, root = dataset
    cfg = dict(steps=100, warmup_steps=2, checkpoint_every=1000, sequences_per_step=1, anchors_per_sequence=4,
               time_budget_s=15.0)
    monkeypatch.setattr(train, "time", FakeClock(lambda step: 1.0))
    first = new_drafter(target, seed=4)
    out = train_drafter(first, data, TrainConfig(**cfg), tmp_path / "ckpt.pt")
    assert (out["steps"], out["restart_step"]) == (15, None)
    if old_checkpoint:
        state = torch.load(tmp_path / "ckpt.pt", weights_only=False)
        del state["cycle"]
        torch.save(state, tmp_path / "ckpt.pt")
    lrs = []
    real_lr_at = train._lr_at
    monkeypatch.setattr(train, "_lr_at", lambda *a: lrs.append(real_lr_at(*a)) or lrs[-1])
    monkeypatch.setattr(train, "time", FakeClock(lambda step: 1.0))
    restarted = new_drafter(target, seed=7)  # everything comes from the checkpoint
    out = train_drafter(restarted, data, TrainConfig(**cfg, restart_budget_s=20.0, restart_lr=5e-4),
                        tmp_path / "ckpt.pt")
    assert (out["steps"], out["restart_step"], out["stopped_early"], out["cycles"]) == (35, 15, False, 2)
    assert out["train_seconds"] == 35.0
    assert lrs[0] == pytest.approx(5e-4 / 2) and max(lrs) == pytest.approx(5e-4)  # warmup of 2 steps, then peak
    assert lrs[-1] < 5e-4 * 0.2
    assert [h["step"] for h in out["history"]][-3:] == [20, 30, 35]
    # Resuming again does nothing more.
    again = train_drafter(new_drafter(target, seed=8), data, TrainConfig(**cfg, restart_budget_s=20.0,
                                                                         restart_lr=5e-4), tmp_path / "ckpt.pt")
    assert again["steps"] == 35
    # Both cycles in one call.
    monkeypatch.setattr(train, "time", FakeClock(lambda step: 1.0))
    both = new_drafter(target, seed=4)
    out2 = train_drafter(both, data, TrainConfig(**cfg, restart_budget_s=20.0, restart_lr=5e-4), tmp_path / "one.pt")
    assert out2["steps"] == 35
    for name, value in restarted.state_dict().items():
        assert torch.equal(value, both.state_dict()[name]), name


def test_a_second_warm_restart_resumes_a_restarted_run(dataset, tmp_path, monkeypatch):
    """restart_budget_s = [20, 12]: a run that finished its first restart (35 steps) resumes
    into a third cycle of 12 steps, with its own warmup; done in one call, the three cycles
    give the same weights."""
    target, prompts, records, paths, data, root = dataset
    cfg = dict(steps=100, warmup_steps=2, checkpoint_every=1000, sequences_per_step=1, anchors_per_sequence=4,
               time_budget_s=15.0, restart_lr=5e-4)
    monkeypatch.setattr(train, "time", FakeClock(lambda step: 1.0))
    out = train_drafter(new_drafter(target, seed=4), data, TrainConfig(**cfg, restart_budget_s=20.0),
                        tmp_path / "ckpt.pt")
    assert (out["steps"], out["cycles"]) == (35, 2)
    lrs = []
    real_lr_at = train._lr_at
    monkeypatch.setattr(train, "_lr_at", lambda *a: lrs.append(real_lr_at(*a)) or lrs[-1])
    monkeypatch.setattr(train, "time", FakeClock(lambda step: 1.0))
    resumed = new_drafter(target, seed=7)
    out = train_drafter(resumed, data, TrainConfig(**cfg, restart_budget_s=[20.0, 12.0]), tmp_path / "ckpt.pt")
    assert (out["steps"], out["restart_step"], out["stopped_early"], out["cycles"]) == (47, 35, False, 3)
    assert len(lrs) == 12 and lrs[0] == pytest.approx(5e-4 / 2) and max(lrs) == pytest.approx(5e-4)
    monkeypatch.setattr(train, "_lr_at", real_lr_at)
    monkeypatch.setattr(train, "time", FakeClock(lambda step: 1.0))
    at_once = new_drafter(target, seed=4)
    out = train_drafter(at_once, data, TrainConfig(**cfg, restart_budget_s=[20.0, 12.0]), tmp_path / "one.pt")
    assert (out["steps"], out["cycles"]) == (47, 3)
    for name, value in resumed.state_dict().items():
        assert torch.equal(value, at_once.state_dict()[name]), name


def test_time_budget_real_clock(dataset, tmp_path):
    target, prompts, records, paths, data, root = dataset
    out = train_drafter(new_drafter(target), data, TrainConfig(steps=50, time_budget_s=1e-6, sequences_per_step=1,
                                                               anchors_per_sequence=4), tmp_path / "ckpt.pt")
    assert out["stopped_early"] and out["steps"] < 50


# --------------------------------------------------------------------------- held-out rollouts


def bigram_markov(drafter, records, value=30.0):
    """Markov head (rank V, W1 = I) pushed towards the data's bigrams: some drafts right, some wrong."""
    V = drafter.cfg.vocab_size
    table = torch.zeros(V, V)
    for r in records:
        seq = r["prompt"] + r["answer"]
        for x, y in zip(seq[:-1], seq[1:]):
            table[:, x] = 0.0
            table[y, x] = value
    with torch.no_grad():
        drafter.markov.w1.weight.copy_(torch.eye(V))
        drafter.markov.w2.weight.copy_(table)
    return drafter


@torch.no_grad()
def test_heldout_rollouts(dataset):
    """z and the T = 0 indicators equal an independent per-anchor computation from the raw
    shards (each returned row is matched to its anchor by z): draft k accepted iff the argmax
    of the teacher-forced Markov logits is the data token. Only whole blocks, only held-out
    sequences."""
    target, prompts, records, paths, data, root = dataset
    drafter = randomize(new_drafter(target, markov_rank=96), seed=4, scale=0.1)
    drafter = bigram_markov(drafter, records[:8]).eval()
    z, acc = heldout_rollouts(drafter, data, anchors_per_sequence=12, seed=3)
    assert z.dim() == 2 and z.shape[1] == K and acc.shape == z.shape and acc.dtype == torch.float32
    assert 0 < z.shape[0] <= 12 * len(data.heldout_ids)

    seqs = raw_sequences(records)
    shards = [torch.load(p) for p in paths]
    flat_context = torch.cat([s["context"] for s in shards]).float()
    offsets = torch.tensor([0] + [len(s) for s, _ in seqs]).cumsum(0)
    candidates = []  # (sequence, z [K], indicators [K]) for every whole block of every sequence
    for sid, (tok, p) in enumerate(seqs):
        for a in range(p, len(tok) - K):  # whole blocks: a + K <= len - 1
            ctx = flat_context[int(offsets[sid]):int(offsets[sid]) + a][None]
            U, h = drafter.block_forward(ctx, torch.arange(a)[None], tok[[a]][None], torch.tensor([[a]]),
                                         torch.ones(1, 1, a, dtype=torch.bool))
            prev = tok[a:a + K][None]
            logits = drafter.markov(U[0], prev)
            cz = drafter.confidence(h[0], drafter.markov.w1(prev))[0]
            candidates.append((sid, cz, (logits[0].argmax(-1) == tok[a + 1:a + K + 1]).float()))
    all_z = torch.stack([c[1] for c in candidates])
    for row in range(z.shape[0]):
        dist = (all_z - z[row]).abs().amax(-1)
        best = int(dist.argmin())
        assert float(dist[best]) < 1e-4, float(dist[best])
        sid, _, indicators = candidates[best]
        assert sid in data.heldout_ids
        assert torch.equal(acc[row], indicators), (row, acc[row], indicators)
    assert 0.05 < float(acc.mean()) < 0.95  # both outcomes occur: the check compares something

    # Sampled sequences (T = 1): indicators are 0/1 draws.
    z1, acc1 = heldout_rollouts(drafter, data, anchors_per_sequence=12, seed=3, temperature_of=lambda sid: 1.0)
    assert z1.shape[1] == K and acc1.shape == z1.shape and set(acc1.unique().tolist()) <= {0.0, 1.0}
    with pytest.raises(ValueError, match="confidence"):
        heldout_rollouts(new_drafter(target, confidence=False), data)

    # A draft vocabulary: every id changes nothing; one id that no answer holds accepts nothing.
    drafter.set_draft_vocabulary({"ranked_ids": list(range(drafter.cfg.vocab_size))}, drafter.cfg.vocab_size)
    z_all, acc_all = heldout_rollouts(drafter, data, anchors_per_sequence=12, seed=3)
    assert torch.equal(z_all, z) and torch.equal(acc_all, acc)
    unused = min(set(range(drafter.cfg.vocab_size)) - {int(t) for tok, _ in seqs for t in tok})
    drafter.set_draft_vocabulary({"ranked_ids": [unused]}, 1)
    z_one, acc_one = heldout_rollouts(drafter, data, anchors_per_sequence=12, seed=3)
    assert torch.equal(z_one, z) and not bool(acc_one.any())
