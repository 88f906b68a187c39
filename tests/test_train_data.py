"""The larger training recipe of dspark_ext/train.py (`dspark train` with ShareGPT answers, a
learning-rate sweep and the vLLM layout), on a tiny random Llama target:

* ShareGPT's own answers as prefill-only records (start, token budget, answer cut, filters, cache);
* prefill features without the LM head == the target's own forward; shards written from the end
  are the same shards; ``target_written`` flags which answers the target wrote;
* the loss takes the data token as the CE label only for target-written sequences (else the
  target's argmax) -- a loss that trusts ShareGPT's tokens is told apart;
* held-out rollouts (STS) use target-written sequences only;
* ``new_drafter``: the vLLM layout, the noise token, the target's last layer as initialisation;
* ``lr_sweep``: every arm trained, the best held-out one chosen, a best lr at the grid's edge said.
"""

from dataclasses import replace
import json

import pytest
import torch

pytest.importorskip("transformers")

from dspark_ext import train  # noqa: E402
from dspark_ext.train import (  # noqa: E402
    FeatureCache, RecipeConfig, TrainConfig, cache_features, default_noise_token_id, dspark_loss, head_terms,
    heldout_rollouts, lr_sweep, new_drafter, prepare_sharegpt_answers, teacher_forced,
)
from test_generate import tiny_llama  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors (conftest.one_thread)

CONTEXT_LAYERS = [1, 2]


class ChatTokenizer:
    """apply_chat_template: [1] + per message (role id, one id per word, 2) + [4] for the generation prompt."""

    bos_token_id, eos_token_id, pad_token_id, unk_token_id = 1, 2, 0, None
    all_special_ids = [0, 1, 2, 9, 11]

    def apply_chat_template(self, messages, add_generation_prompt=False):
        ids = [1]
        for m in messages:
            ids += [5 if m["role"] == "user" else 6] + [20 + len(w) for w in m["content"].split()] + [2]
        return ids + ([6] if add_generation_prompt else [])


def sharegpt(i, question, answer):
    return {"id": f"c{i}", "conversations": [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]}


def test_prepare_sharegpt_answers(tmp_path, monkeypatch):
    convs = [sharegpt(0, "skipped by start", "x " * 30),
             sharegpt(1, "q one", "a " * 40),  # 41 answer tokens, cut to 12
             sharegpt(2, "q two", "short"),  # 2 tokens: below min 4
             {"id": "gpt-first", "conversations": [{"from": "gpt", "value": "hi"}, {"from": "human", "value": "q"}]},
             sharegpt(3, " ".join(["long"] * 50), "a b c d e"),  # prompt too long
             sharegpt(4, "q four", "a b c d e f"),  # 7 answer tokens
             sharegpt(5, "q five", "a b c d e f g h i j")]
    monkeypatch.setattr(train, "iter_sharegpt", lambda path=None: iter(convs))
    monkeypatch.setattr(train.random, "Random", lambda seed: type("R", (), {"shuffle": lambda self, x: None})())
    tok = ChatTokenizer()
    out = tmp_path / "answers.json"
    records = prepare_sharegpt_answers(tok, 15, out, max_prompt_tokens=20, max_answer_tokens=12, min_answer_tokens=4,
                                       start=1)
    prompt1 = tok.apply_chat_template([{"role": "user", "content": "q one"}], add_generation_prompt=True)
    assert records[0]["prompt"] == prompt1 and records[0]["answer"] == [21] * 12 and records[0]["temperature"] is None
    assert records[1]["answer"] == [21] * 6 + [2]  # the assistant turn's end is part of the answer
    assert len(records) == 2  # 12 + 7 >= 15: the budget is reached
    assert json.loads(out.read_text()) == records
    request = dict(max_prompt_tokens=20, max_answer_tokens=12, min_answer_tokens=4, start=1)
    monkeypatch.setattr(train, "iter_sharegpt", lambda path=None: (_ for _ in ()).throw(AssertionError("re-read")))
    assert prepare_sharegpt_answers(tok, 15, out, **request) == records  # cached
    # Another budget is another selection, not the cache; so is a cache from before the request was
    # recorded beside it, unless its last record is the one that reached the budget.
    monkeypatch.setattr(train, "iter_sharegpt", lambda path=None: iter(convs))
    assert len(prepare_sharegpt_answers(tok, 20, out, **request)) == 3
    monkeypatch.setattr(train, "iter_sharegpt", lambda path=None: (_ for _ in ()).throw(AssertionError("re-read")))
    train._selection_file(out).unlink()
    assert len(prepare_sharegpt_answers(tok, 25, out, **request)) == 3  # 12 + 7 < 25 <= 12 + 7 + 10
    train._selection_file(out).unlink()
    with pytest.raises(AssertionError, match="re-read"):
        prepare_sharegpt_answers(tok, 15, out, **request)  # 12 + 7 already reach 15


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    """A tiny target, 6 regenerated-style records (target-written) and 6 ShareGPT-style ones."""
    from dspark_ext.llama import Llama
    from dspark_ext.targets import LlamaTarget

    root = tmp_path_factory.mktemp("mixed")
    target = LlamaTarget(Llama.from_hf(tiny_llama()))
    g = torch.Generator().manual_seed(1)
    records = []
    for i in range(12):
        prompt = torch.randint(1, 96, (int(torch.randint(2, 7, (1,), generator=g)),), generator=g).tolist()
        answer = torch.randint(1, 96, (int(torch.randint(8, 20, (1,), generator=g)),), generator=g).tolist()
        records.append({"prompt": prompt, "answer": answer, "temperature": (0.0 if i % 2 else 1.0) if i < 6 else None})
    target.hidden_layers = CONTEXT_LAYERS + [-1]
    paths = cache_features(target, records, root / "features", 4)
    return target, records, paths, root


def test_prefill_features_and_shards_from_the_end(mixed):
    target, records, paths, root = mixed
    seqs = [torch.tensor(r["prompt"] + r["answer"]) for r in records[:4]]
    expected = target.start(seqs).hidden_states
    torch.testing.assert_close(train._prefill_features(target, seqs), expected, rtol=0, atol=0)
    again = cache_features(target, records, root / "backwards", 4, from_the_end=True)
    for a, b in zip(paths, again):
        x, y = torch.load(a), torch.load(b)
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
    data = FeatureCache(paths, heldout_every=4)
    assert data.target_written.tolist() == [True] * 6 + [False] * 6


def test_loss_labels_sharegpt_text_with_the_target_argmax(mixed):
    target, records, paths, root = mixed
    data = FeatureCache(paths, heldout_every=100)
    cfg = RecipeConfig(out_dir=root, context_layers=CONTEXT_LAYERS)
    drafter = new_drafter(cfg, target, "dspark", data.feature_statistics(), noise_token_id=3)
    drafter.training_lm_head_dtype = None
    sharegpt_ids = [i for i in data.train_ids if not bool(data.target_written[i])]
    batch = data.batch(sharegpt_ids[:2], [torch.tensor([4, 6]), torch.tensor([5, 7])], drafter.num_draft)
    assert not bool(batch["data_labels"].any())
    h = drafter.block_hidden(batch["context"], batch["context_positions"], batch["anchor_ids"],
                             batch["anchor_positions"], batch["context_mask"]).reshape(-1, drafter.cfg.hidden_size)
    prev = drafter.markov.w1(batch["prev"]).reshape(h.shape[0], -1)
    final = batch["final"].reshape(h.shape[0], -1)
    labels = batch["targets"].reshape(-1)
    argmax = (final @ drafter.lm_head.T).argmax(-1)
    assert bool((argmax != labels).any())  # the text is not the target's greedy path
    w2 = drafter.markov.w2.weight
    for flag, expected_labels in ((False, argmax), (True, labels)):
        tv, ce, hit = head_terms(h, prev, w2, drafter.lm_head, final, labels, torch.full_like(labels, flag, dtype=torch.bool))
        log_pd = torch.log_softmax(h @ drafter.lm_head.T + prev @ w2.T, -1)
        torch.testing.assert_close(ce, -log_pd.gather(-1, expected_labels[:, None])[:, 0])
        assert torch.equal(hit, log_pd.argmax(-1) == argmax)
    loss, _ = dspark_loss(drafter, batch)
    trusting = dict(batch, data_labels=torch.ones_like(batch["data_labels"]))  # the broken variant
    assert abs(float(dspark_loss(drafter, trusting)[0]) - float(loss)) > 1e-4


def test_heldout_rollouts_use_target_written_answers_only(mixed):
    target, records, paths, root = mixed
    data = FeatureCache(paths, heldout_every=3)  # held out: 2, 5 (target-written), 8, 11 (ShareGPT)
    drafter = new_drafter(RecipeConfig(out_dir=root, context_layers=CONTEXT_LAYERS), target, "dspark", data.feature_statistics(), 3)
    drafter.training_lm_head_dtype = None
    z, acc = heldout_rollouts(drafter, data)
    K = drafter.num_draft
    whole_blocks = sum(max(0, int(data.lengths[i]) - 2 - K + 1 - int(data.prompt_lengths[i]) + 1) for i in (2, 5))
    assert z.shape == (whole_blocks, K) and acc.shape == (whole_blocks, K)
    # Called with autograd on (as the recipe's calibration stage calls it), it keeps no graph:
    # one per held-out answer ran a 9,216-prompt recipe out of memory.
    assert torch.is_grad_enabled() and not z.requires_grad and z.grad_fn is None


def test_a_heldout_answer_to_a_prompt_the_target_answered_in_training_is_neither(mixed, tmp_path):
    target = mixed[0]
    a, b, c = [5, 6, 7], [8, 9], [10, 11, 12]

    def rec(prompt, temperature):
        return {"prompt": prompt, "answer": list(range(30, 40)), "temperature": temperature}

    records = [rec(a, 0.0), rec(b, None), rec(a, 0.0),  # held out: 2 (the target answered its prompt in 0), 5, 8
               rec(c, None), rec([13], 1.0), rec(b, 1.0),  # 5: its prompt only in a ShareGPT-written training sequence
               rec([14, 15], 0.0), rec([16], 0.0), rec([17], 0.0)]
    data = FeatureCache(cache_features(target, records, tmp_path / "features", 3), heldout_every=3)
    assert data.heldout_ids == [5, 8] and data.train_ids == [0, 1, 3, 4, 6, 7]
    sts_paths = cache_features(target, [rec(a, 0.0), rec([18], 0.0), rec(c, 0.0)], tmp_path / "sts", 3)
    assert FeatureCache(sts_paths, heldout_every=1, seen_by=data).heldout_ids == [1, 2]
    assert FeatureCache(sts_paths, heldout_every=1).heldout_ids == [0, 1, 2]


def test_new_drafter_layout_and_init_from_target(mixed):
    target, records, paths, root = mixed
    data = FeatureCache(paths)
    stats = data.feature_statistics()
    cfg = RecipeConfig(out_dir=root, context_layers=CONTEXT_LAYERS)
    drafter = new_drafter(cfg, target, "dspark", stats, noise_token_id=9)
    assert drafter.cfg.vllm_compatible and drafter.cfg.noise_token_id == 9 and drafter.backbone.mask_embedding is None
    assert drafter.cfg.target_num_layers == 2
    last = target.model.weights.layers[-1]
    assert not torch.equal(drafter.backbone.layers[0].q.weight, last.wq.float())
    copied = new_drafter(cfg, target, "dspark", stats, noise_token_id=9, init_from_target=True)
    assert torch.equal(copied.backbone.layers[0].q.weight, last.wq.float())
    assert torch.equal(copied.backbone.layers[0].down.weight, last.w_down.float())
    assert not new_drafter(RecipeConfig(out_dir=root, layout="v1", context_layers=CONTEXT_LAYERS), target, "dspark", stats, 9).cfg.vllm_compatible
    assert default_noise_token_id(ChatTokenizer()) == 11


def test_lr_sweep_picks_the_best_arm_and_flags_the_grid_edge(mixed, monkeypatch):
    target, records, paths, root = mixed
    data = FeatureCache(paths, heldout_every=4)
    cfg = RecipeConfig(out_dir=root / "sweep-run", context_layers=CONTEXT_LAYERS, sweep_lrs=(1e-4, 1e-3, 1e-2), sweep_minutes=0.001,
                       train=TrainConfig(steps=3, sequences_per_step=2, anchors_per_sequence=3, checkpoint_every=100))
    # A held-out score that prefers the largest lr: the choice and the edge report are what is tested.
    monkeypatch.setattr(train, "heldout_acceptance", lambda drafter, data: {
        "accept_t1": [drafter_lr[0]] * drafter.num_draft, "greedy_match": [0.0] * drafter.num_draft})
    drafter_lr = [0.0]
    real_train = train.train_drafter

    def recording_train(drafter, data, tcfg, checkpoint, **kw):
        drafter_lr[0] = tcfg.lr
        return real_train(drafter, data, tcfg, checkpoint, **kw)

    monkeypatch.setattr(train, "train_drafter", recording_train)
    (root / "sweep-run").mkdir(exist_ok=True)
    summary = lr_sweep(cfg, target, data, data.feature_statistics(), 3, root / "sweep-run", log=lambda m: None)
    assert [a["lr"] for a in summary["arms"]] == [1e-4, 1e-3, 1e-2]
    assert summary["lr"] == 1e-2 and summary["best_at_grid_edge"]
    assert json.loads((root / "sweep-run" / "sweep.json").read_text())["best"] == "lr0.01"
    # Resumable: the arms' results are read back, nothing retrains.
    monkeypatch.setattr(train, "train_drafter", lambda *a, **k: (_ for _ in ()).throw(AssertionError("retrained")))
    assert lr_sweep(cfg, target, data, data.feature_statistics(), 3, root / "sweep-run", log=lambda m: None)["lr"] == 1e-2


def test_prepare_prompts_from_the_end_skips_excluded_prompts(tmp_path, monkeypatch):
    convs = [sharegpt(i, f"question number {'x ' * i}", "answer") for i in range(8)]
    monkeypatch.setattr(train, "iter_sharegpt", lambda path=None: iter(convs))
    monkeypatch.setattr(train.random, "Random", lambda seed: type("R", (), {"shuffle": lambda self, x: None})())
    tok = ChatTokenizer()

    def ids(i):
        return tok.apply_chat_template([{"role": "user", "content": convs[i]["conversations"][0]["value"]}],
                                       add_generation_prompt=True)

    assert train.prepare_prompts(tok, 3, tmp_path / "first.json") == [ids(0), ids(1), ids(2)]
    got = train.prepare_prompts(tok, 3, tmp_path / "last.json", from_end=True, exclude={tuple(ids(6))})
    assert got == [ids(7), ids(5), ids(4)]


def test_recipe_calibrates_sts_on_the_extra_heldout_answers(tmp_path, monkeypatch):
    """``sts_prompts``: the target answers that many more ShareGPT prompts (from the end of the
    shuffle, none of the training prompts); every one of them is held out and only calibrates
    STS, next to the held-out part of the regenerated answers; the drafter's config keeps the
    held-out survival (accepted prefixes / rollouts)."""
    from dspark_ext.drafters.dspark import DSparkDrafter
    from dspark_ext.llama import Llama
    from dspark_ext.targets import LlamaTarget

    convs = [sharegpt(i, " ".join(["w" * (1 + (i * 7 + j) % 9) for j in range(3)]), "a b") for i in range(12)]
    monkeypatch.setattr(train, "iter_sharegpt", lambda path=None: iter(convs))
    rollouts = []
    real_rollouts = train.heldout_rollouts

    def counting_rollouts(drafter, data, **kw):
        z, acc = real_rollouts(drafter, data, **kw)
        rollouts.append(z.shape[0])
        return z, acc

    monkeypatch.setattr(train, "heldout_rollouts", counting_rollouts)
    target = LlamaTarget(Llama.from_hf(tiny_llama()))
    tok = ChatTokenizer()
    tok.eos_token_id = None  # every answer runs to max_new_tokens
    cfg = RecipeConfig(out_dir=tmp_path / "run", num_prompts=4, max_new_tokens=12, generation_batch_size=4,
                       context_layers=CONTEXT_LAYERS, variants=["dspark"], sts_prompts=3, sps_max_tokens=4,
                       train=TrainConfig(steps=2, sequences_per_step=1, anchors_per_sequence=2, checkpoint_every=100))
    summary = train.run_recipe(cfg, target, tok, log=lambda m: None)
    sts_prompts = json.loads((tmp_path / "run" / "sts_prompts.json").read_text())
    training = json.loads((tmp_path / "run" / "prompts.json").read_text())
    assert len(sts_prompts) == 3 and not {tuple(p) for p in sts_prompts} & {tuple(p) for p in training}
    assert summary["data"]["sts_sequences"] == 3
    assert len(rollouts) == 2 and rollouts[1] > 0  # the regenerated held-out part, then the STS answers
    info = summary["variants"]["dspark"]["sts"]
    assert info["rollouts"] == sum(rollouts)
    saved = DSparkDrafter.load(tmp_path / "run" / "dspark" / "drafter", target.model.weights.embed.float(),
                               target.model.weights.lm_head.float())
    assert saved.cfg.heldout_survival == pytest.approx([p / info["rollouts"] for p in info["positives"]])
    assert saved.cfg.sts_bias is None

    # --recalibrate --sts-bias: the saved drafter, refitted on the same held-out and STS answers
    # (read from the folder, nothing regenerated), keeps its weights and gains per-position biases.
    weights = {k: v.clone() for k, v in saved.state_dict().items() if k != "confidence.sts_temperature"}
    rollouts.clear()
    info = train.recalibrate_saved(replace(cfg, sts_bias=True), target, tok, log=lambda m: None)
    assert len(rollouts) == 2 and info["rollouts"] == sum(rollouts) and len(info["biases"]) == len(info["temperatures"])
    again = DSparkDrafter.load(tmp_path / "run" / "dspark" / "drafter", target.model.weights.embed.float(),
                               target.model.weights.lm_head.float())
    assert again.cfg.sts_bias == pytest.approx(info["biases"]) and again.confidence.sts_bias.tolist() == pytest.approx(
        info["biases"])
    assert again.cfg.sts_temperature == pytest.approx(info["temperatures"])
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in weights.items())


# --------------------------------------------------------------------------- draft vocabulary


def vocabulary_drafter(target, data, root, size, seed=0, num_layers=1, init_from_target=False):
    """A DSpark drafter over the ``size`` ids of a fixed ranking, its Markov head random (the
    recipe's starts at zero, which would hide W2's rows from the loss)."""
    cfg = RecipeConfig(out_dir=root, context_layers=CONTEXT_LAYERS, draft_vocab_size=size, seed=seed,
                       num_layers=num_layers)
    ranking = {"ranked_ids": torch.randperm(96, generator=torch.Generator().manual_seed(5)).tolist()}
    drafter = new_drafter(cfg, target, "dspark", data.feature_statistics(), noise_token_id=3,
                          init_from_target=init_from_target, draft_vocab_ranking=ranking)
    drafter.training_lm_head_dtype = None
    with torch.no_grad():
        drafter.markov.w2.weight.normal_(0, 0.5, generator=torch.Generator().manual_seed(seed))
    return drafter


def recorded_terms(batch_terms):
    """A ``vocabulary_terms`` that keeps what ``draft_vocabulary_terms`` returned."""
    def terms(*args):
        batch_terms.append(train.draft_vocabulary_terms(*args))
        return batch_terms[-1]
    return terms


def test_draft_vocabulary_loss_is_tv_between_the_drafted_law_and_the_full_target_law(mixed):
    """Over a draft vocabulary, the loss's TV is between q (softmax over the N ids, zero
    elsewhere: what ``propose`` samples) and the target's whole-vocabulary law; CE is q's at
    the label (0 where the label is outside the ids); greedy agreement is q's argmax against
    the target's. A TV that forgets the target's mass outside the ids is told apart."""
    target, records, paths, root = mixed
    data = FeatureCache(paths, heldout_every=100)
    drafter = vocabulary_drafter(target, data, root, size=40)
    ids = data.train_ids[:6]  # target-written (data labels) and ShareGPT (argmax labels) sequences
    batch = data.batch(ids, [torch.tensor([4, 6, 5]) for _ in ids], drafter.num_draft)
    got = []
    with torch.no_grad():
        dspark_loss(drafter, batch, vocabulary_terms=recorded_terms(got))
        tv, ce, hit = got[0]
        h = drafter.block_hidden(batch["context"], batch["context_positions"], batch["anchor_ids"],
                                 batch["anchor_positions"], batch["context_mask"]).reshape(-1, drafter.cfg.hidden_size)
        logits = h @ drafter.lm_head.T + drafter.markov.w1(batch["prev"]).reshape(h.shape[0], -1) @ drafter.markov.w2.weight.T
        outside = torch.ones(96, dtype=torch.bool)
        outside[drafter.draft_vocab] = False
        q = torch.softmax(logits.masked_fill(outside, float("-inf")), -1)
        p = torch.softmax(batch["final"].reshape(h.shape[0], -1) @ drafter.lm_head.T, -1)
        data_labels = batch["data_labels"][:, None].expand(-1, h.shape[0] // len(ids)).reshape(-1)
        labels = torch.where(data_labels, batch["targets"].reshape(-1), p.argmax(-1))
    assert 0.3 < float(p[:, outside].sum(-1).mean()) < 0.8 and bool(outside[labels].any()) and bool((~outside[labels]).any())
    expected_tv = 0.5 * (q - p).abs().sum(-1)
    torch.testing.assert_close(tv, expected_tv, rtol=1e-5, atol=1e-5)
    expected_ce = torch.where(outside[labels], 0.0, -torch.log(q.gather(-1, labels[:, None])[:, 0]))
    torch.testing.assert_close(ce, expected_ce, rtol=1e-5, atol=1e-5)
    assert torch.equal(hit, q.argmax(-1) == p.argmax(-1))
    forgetful = 0.5 * (q - p)[:, ~outside].abs().sum(-1)  # the broken variant
    assert not torch.allclose(forgetful, expected_tv, atol=1e-2)


def test_a_draft_vocabulary_of_every_id_is_the_whole_vocabulary_loss(mixed):
    target, records, paths, root = mixed
    data = FeatureCache(paths, heldout_every=100)
    everything = vocabulary_drafter(target, data, root, size=96)
    whole = vocabulary_drafter(target, data, root, size=96)
    whole.set_draft_vocabulary(None, 0)
    batch = data.sample(torch.Generator().manual_seed(2), 4, 6, everything.num_draft)
    with torch.no_grad():
        (a, ma), (b, mb) = dspark_loss(everything, batch), dspark_loss(whole, batch)
    assert float(a) == pytest.approx(float(b), rel=1e-5)
    assert ma["accept_t1"] == pytest.approx(mb["accept_t1"], abs=1e-6) and ma["greedy_match"] == mb["greedy_match"]


def test_teacher_statistics_are_cached_beside_the_shards_and_change_nothing(mixed, tmp_path):
    import shutil

    target, records, paths, root = mixed
    copies = [shutil.copy(p, tmp_path / p.name) for p in paths]
    data = FeatureCache([tmp_path / p.name for p in paths], heldout_every=100)
    drafter = vocabulary_drafter(target, data, root, size=40)
    batch = data.sample(torch.Generator().manual_seed(3), 4, 6, drafter.num_draft)
    data.load_teacher_statistics(drafter.lm_head)
    sides = sorted(tmp_path.glob("*.teacher-float32.pt"))
    assert len(sides) == len(copies)
    with_stats = data.sample(torch.Generator().manual_seed(3), 4, 6, drafter.num_draft)
    logits = with_stats["final"] @ drafter.lm_head.T
    torch.testing.assert_close(with_stats["teacher_lse"], torch.logsumexp(logits, -1), rtol=1e-5, atol=1e-5)
    assert torch.equal(with_stats["teacher_argmax"], logits.argmax(-1))
    with torch.no_grad():
        assert float(dspark_loss(drafter, with_stats)[0]) == pytest.approx(float(dspark_loss(drafter, batch)[0]), rel=1e-5)
    stamps = [s.stat().st_mtime_ns for s in sides]
    again = FeatureCache([tmp_path / p.name for p in paths], heldout_every=100)
    again.load_teacher_statistics(drafter.lm_head)  # read, not recomputed
    assert [s.stat().st_mtime_ns for s in sides] == stamps and torch.equal(again.teacher_lse, data.teacher_lse)
    # Statistics of another dtype than the drafter's training LM head are refused.
    drafter.training_lm_head_dtype = torch.bfloat16
    with pytest.raises(ValueError, match="teacher statistics were computed in torch.float32"):
        train.train_drafter(drafter, data, TrainConfig(steps=1), tmp_path / "ckpt.pt")


def test_training_over_a_draft_vocabulary_reduces_its_loss(mixed, tmp_path):
    target, records, paths, root = mixed
    data = FeatureCache(paths, heldout_every=100)
    drafter = vocabulary_drafter(target, data, root, size=40)
    data.load_teacher_statistics(drafter.lm_head)
    try:
        batch = data.sample(torch.Generator().manual_seed(4), 8, 8, drafter.num_draft)
        with torch.no_grad():
            loss0, m0 = dspark_loss(drafter, batch)
        train.train_drafter(drafter, data, TrainConfig(steps=40, warmup_steps=5, checkpoint_every=100, lr=3e-3,
                                                        sequences_per_step=4, anchors_per_sequence=8),
                            tmp_path / "ckpt.pt")
        with torch.no_grad():
            loss1, m1 = dspark_loss(drafter, batch)
    finally:
        for side in root.glob("features/*.teacher-*.pt"):  # the module's other tests read the shards without them
            side.unlink()
    assert float(loss1) < 0.8 * float(loss0) and m1["tv"] < m0["tv"], (float(loss0), float(loss1))
    outside = torch.ones(96, dtype=torch.bool)
    outside[drafter.draft_vocab] = False
    untouched = vocabulary_drafter(target, data, root, size=40).markov.w2.weight[outside]
    assert torch.equal(drafter.markov.w2.weight.detach()[outside], untouched.detach())  # rows the loss never reads


def test_warm_start_loads_a_saved_drafter_of_the_same_architecture(mixed, tmp_path):
    target, records, paths, root = mixed
    data = FeatureCache(paths, heldout_every=100)
    saved = vocabulary_drafter(target, data, root, size=40, seed=1)
    saved.confidence.sts_temperature = torch.full((saved.num_draft,), 2.0)  # a calibrated drafter
    saved.save(tmp_path / "saved")
    fresh = vocabulary_drafter(target, data, root, size=40, seed=2)
    train.warm_start(fresh, tmp_path / "saved")
    assert fresh.confidence.sts_temperature.numel() == 0  # the calibration is not carried over
    for name, value in saved.state_dict().items():
        if name == "confidence.sts_temperature":
            continue
        expected = value.to(torch.float16).float() if value.is_floating_point() and name != "confidence.sts_temperature" else value
        assert torch.equal(fresh.state_dict()[name], expected), name
    cfg = RecipeConfig(out_dir=root, context_layers=CONTEXT_LAYERS)
    other = new_drafter(cfg, target, "parallel", data.feature_statistics(), noise_token_id=3)
    with pytest.raises(ValueError, match="another architecture"):
        train.warm_start(other, tmp_path / "saved")
    # The parallel-only ablation may take the saved backbone, leaving out the heads it lacks.
    other.set_draft_vocabulary(saved.draft_vocab_ranking, 40)
    assert train.warm_start(other, tmp_path / "saved", drop_heads=True) == ["markov", "confidence"]
    assert set(other.state_dict()) == {k for k in saved.state_dict() if k.split(".")[0] not in ("markov", "confidence")}
    for name, value in other.state_dict().items():
        assert torch.equal(value, fresh.state_dict()[name]), name
    assert train.warm_start(fresh, tmp_path / "saved", drop_heads=True) == []  # nothing to leave out


def test_warm_start_grows_a_saved_drafter_by_layers_that_start_silent(mixed, tmp_path):
    """A 2-layer drafter warm-started from a saved 1-layer one: layer 0 is the saved layer, the
    extra layer keeps its own initialisation with ``o`` and ``down`` zeroed, so its drafting
    logits and confidences equal the saved drafter's; it then trains (its output projections
    get gradients). A saved drafter with more layers than the new one is refused."""
    target, records, paths, root = mixed
    data = FeatureCache(paths, heldout_every=100)
    saved = vocabulary_drafter(target, data, root, size=40, seed=1)
    saved.save(tmp_path / "saved")
    reloaded = vocabulary_drafter(target, data, root, size=40, seed=1)
    train.warm_start(reloaded, tmp_path / "saved")  # the saved weights as float16 rounds them
    grown = vocabulary_drafter(target, data, root, size=40, seed=2, num_layers=2, init_from_target=True)
    fresh_q = grown.backbone.layers[1].q.weight.detach().clone()
    train.warm_start(grown, tmp_path / "saved")
    extra = grown.backbone.layers[1]
    assert torch.count_nonzero(extra.o.weight) == 0 and torch.count_nonzero(extra.down.weight) == 0
    assert torch.equal(extra.q.weight, fresh_q) and torch.count_nonzero(fresh_q) > 0
    for name, value in reloaded.state_dict().items():
        assert torch.equal(grown.state_dict()[name], value), name
    batch = data.sample(torch.Generator().manual_seed(4), 4, 4, grown.num_draft)
    with torch.no_grad():
        (logits, z), (logits_saved, z_saved) = teacher_forced(grown, batch), teacher_forced(reloaded, batch)
    assert torch.allclose(logits, logits_saved, atol=1e-5) and torch.allclose(z, z_saved, atol=1e-5)
    loss, _ = dspark_loss(grown, batch)
    loss.backward()
    assert extra.o.weight.grad.abs().sum() > 0 and extra.down.weight.grad.abs().sum() > 0
    grown.save(tmp_path / "grown")
    with pytest.raises(ValueError, match="another architecture"):
        train.warm_start(reloaded, tmp_path / "grown")


def test_recipe_trains_over_a_draft_vocabulary_and_warm_starts(tmp_path, monkeypatch):
    """``draft_vocab_size``: the recipe ranks the training answers' ids, trains over the first N
    (teacher statistics cached beside the shards, in the training LM head's bfloat16) and saves
    a drafter that drafts from them; ``init_drafter``: a second run starts from that drafter's
    weights and records it in its notes."""
    from dspark_ext.drafters.dspark import DSparkDrafter
    from dspark_ext.llama import Llama
    from dspark_ext.targets import LlamaTarget

    convs = [sharegpt(i, " ".join(["w" * (1 + (i * 7 + j) % 9) for j in range(3)]), "a b") for i in range(12)]
    monkeypatch.setattr(train, "iter_sharegpt", lambda path=None: iter(convs))
    target = LlamaTarget(Llama.from_hf(tiny_llama()))
    tok = ChatTokenizer()
    tok.eos_token_id = None
    cfg = RecipeConfig(out_dir=tmp_path / "first", num_prompts=4, max_new_tokens=12, generation_batch_size=4,
                       context_layers=CONTEXT_LAYERS, variants=["dspark"], sts_prompts=3, sps_max_tokens=4, draft_vocab_size=16,
                       lm_head_dtype=torch.bfloat16,  # pinned: the machine's own choice is float32 on AVX2-only CPUs
                       train=TrainConfig(steps=3, sequences_per_step=2, anchors_per_sequence=2, checkpoint_every=100))
    train.run_recipe(cfg, target, tok, log=lambda m: None)
    assert len(list((tmp_path / "first" / "features").glob("*.teacher-bfloat16.pt"))) == 1
    embed, head = target.model.weights.embed.float(), target.model.weights.lm_head.float()
    first = DSparkDrafter.load(tmp_path / "first" / "dspark" / "drafter", embed, head)
    assert first.cfg.draft_vocab_size == 16 and first.draft_vocab.numel() == 16
    ranked = first.draft_vocab_ranking["ranked_ids"]
    assert sorted(ranked[:16]) == first.draft_vocab.tolist()

    summary = train.run_recipe(replace(cfg, out_dir=tmp_path / "second", init_drafter=tmp_path / "first" / "dspark" / "drafter",
                                       variants=["dspark", "parallel"], train=replace(cfg.train, steps=1)),
                               target, tok, log=lambda m: None)
    assert summary["variants"]["dspark"]["init_drafter"] == "drafter"
    assert "init_drafter_heads_left_out" not in summary["variants"]["dspark"]
    second = DSparkDrafter.load(tmp_path / "second" / "dspark" / "drafter", embed, head)
    assert second.cfg.notes["init_drafter"]["notes"]["train_steps"] == 3 and second.cfg.notes["train_steps"] == 1
    # The parallel-only ablation continues from the same trunk, without the Markov and confidence heads.
    assert summary["variants"]["parallel"]["init_drafter_heads_left_out"] == ["markov", "confidence"]
    ablation = DSparkDrafter.load(tmp_path / "second" / "parallel" / "drafter", embed, head)
    assert ablation.markov is None and ablation.cfg.notes["init_drafter"]["heads_left_out"] == ["markov", "confidence"]
