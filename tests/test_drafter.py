"""The DSpark drafter (dspark_ext/drafters/dspark.py) and its drafter specs (dspark_ext/cli.py).

* train/inference parity: ``propose`` (incremental context cache + ``dspark::markov_draft``)
  gives the teacher-forced ``block_forward`` + Markov head logits and the confidence head's
  calibrated confidence, on a ragged batch, for every variant (DSpark, parallel-only, MTP-1);
* the incremental per-request context cache == a fresh drafter shown the whole context;
* save / load (safetensors, float16) round trip;
* inside ``dspark_ext.generate``: greedy output == autoregressive, the features the loop hands
  over are the target's, and at T > 0 the output follows the target's exact law (a drafter
  that misreports its logits fails the same check);
* ``DrafterSpec`` parsing.
"""

import copy
import json
from pathlib import Path

import pytest
import torch

from dspark_ext.drafters import AutoregressiveDrafter
from dspark_ext.generate import generate
from dspark_ext.heads import previous_tokens
from dspark_ext.protocols import Draft, DraftContext, Drafter
from helpers import assert_matches_distribution, check_distribution, sequence_codes

pytest.importorskip("transformers")

from dspark_ext.drafters.dspark import DrafterConfig, DSparkDrafter  # noqa: E402
from dspark_ext.ops import pack_skinny_weight  # noqa: E402
from test_generate import LLAMA_MAX_NEW, LLAMA_PROMPTS, falling_sps, llama_references, tiny_llama  # noqa: E402


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors (conftest.one_thread)


# --------------------------------------------------------------------------- helpers

V, D = 48, 32
LAYERS = [1, 2]  # two context layers: features are [.., 2 * D]


def small_config(**kwargs) -> DrafterConfig:
    base = dict(vocab_size=V, hidden_size=D, intermediate_size=64, num_heads=4, num_kv_heads=2, head_dim=8,
                context_layers=LAYERS, num_layers=2, num_draft=4, markov_rank=8, confidence=True)
    base.update(kwargs)
    return DrafterConfig(**base)


def randomize(drafter: DSparkDrafter, seed: int, *, markov_scale: float = 3.0, scale: float = 0.3) -> DSparkDrafter:
    """Random non-zero weights everywhere (``_init_weights`` zeroes W2 and the confidence head)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in drafter.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * noise)
            elif name == "markov.w1.weight":
                p.copy_(noise)
            elif name == "markov.w2.weight":
                p.copy_(noise * markov_scale / p.shape[1] ** 0.5)
            elif name.startswith("confidence."):
                p.copy_(noise * 0.5)
            else:
                p.copy_(noise * scale)
    return drafter


def small_drafter(seed: int = 0, **kwargs) -> DSparkDrafter:
    g = torch.Generator().manual_seed(1000 + seed)
    embedding = torch.randn(V, D, generator=g)
    lm_head = torch.randn(V, D, generator=g) * 0.5
    return randomize(DSparkDrafter(small_config(**kwargs), embedding, lm_head), seed).eval()


def context_of(tokens, lengths, features, temperature=0.0, new_from=None, seed=7, offset=3) -> DraftContext:
    B = tokens.shape[0]
    return DraftContext(
        tokens=tokens, lengths=torch.as_tensor(lengths, dtype=torch.int64), anchor_hidden=None,
        temperature=torch.full((B,), float(temperature)), seed=seed + torch.arange(B, dtype=torch.int64),
        offset=torch.full((B,), offset, dtype=torch.int64), hidden_states=features,
        new_from=None if new_from is None else torch.as_tensor(new_from, dtype=torch.int64))


def random_batch(lengths, width=None, seed=0, junk=True):
    """tokens [B, W] and features [B, W, 2D]; everything at or after each anchor (the rows the
    target has not produced yet) is junk the drafter must not read."""
    g = torch.Generator().manual_seed(seed)
    B, W = len(lengths), width or max(lengths) + 3
    tokens = torch.randint(V, (B, W), generator=g)
    features = torch.randn(B, W, len(LAYERS) * D, generator=g)
    if junk:
        for b, n in enumerate(lengths):
            features[b, n - 1:] = 1e3 * torch.randn(W - n + 1, features.shape[-1], generator=g)
    return tokens, features


@torch.no_grad()
def teacher_forced(drafter: DSparkDrafter, tokens, lengths, features, drafts):
    """(Markov logits [B, K, V], confidence logits z [B, K]) through the training form:
    ``block_forward`` with one block per request anchored at its last token, the context = its
    features before the anchor, then ``markov(U, prev)`` with prev = [anchor, drafts[:-1]]."""
    lengths = torch.as_tensor(lengths)
    B = tokens.shape[0]
    S = max(int((lengths - 1).max()), 1)
    anchor_pos = (lengths - 1)[:, None]
    anchor_ids = tokens[torch.arange(B), lengths - 1][:, None]
    ctx_mask = torch.arange(S)[None, None, :] < anchor_pos[:, :, None]
    U, h = drafter.block_forward(features[:, :S], torch.arange(S)[None].expand(B, -1), anchor_ids, anchor_pos,
                                 ctx_mask)
    U, h = U[:, 0], h[:, 0]
    prev = torch.cat([anchor_ids, drafts[:, :-1]], dim=1)
    logits = U if drafter.markov is None else drafter.markov(U, prev)
    z = None
    if drafter.confidence is not None:
        prev_emb = drafter.markov.w1(prev) if drafter.markov is not None else h.new_zeros(*h.shape[:-1], 0)
        z = drafter.confidence(h, prev_emb)
    return logits, z


def assert_drafts_equal(a: Draft, b: Draft, atol=1e-4):
    assert torch.equal(a.token_ids, b.token_ids)
    torch.testing.assert_close(a.logits, b.logits, rtol=1e-5, atol=atol)
    if a.confidence is None:
        assert b.confidence is None
    else:
        torch.testing.assert_close(a.confidence, b.confidence, rtol=1e-5, atol=1e-6)


VARIANTS = {
    "dspark": dict(),
    "parallel": dict(markov_rank=0, confidence=False),
    "parallel+confidence": dict(markov_rank=0, confidence=True),
    "mtp1": dict(num_draft=1, markov_rank=0, confidence=False),
    "dspark-K1": dict(num_draft=1),
    # vLLM's Qwen3DSparkModel layout (dspark export --format vllm): q/k norms, noise-token query.
    "dspark-vllm-layout": dict(qk_norm=True, noise_token_id=5, feature_norm="scale"),
}


# --------------------------------------------------------------------------- train/inference parity


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_propose_matches_teacher_forced_block_forward(variant, temperature):
    drafter = small_drafter(seed=1, **VARIANTS[variant])
    assert isinstance(drafter, Drafter)
    K = drafter.num_draft
    calibrated = temperature == 0.0  # STS temperatures at T = 0, uncalibrated (all 1) at T = 1
    sts = torch.linspace(0.5, 2.5, K) if calibrated else torch.ones(K)
    if drafter.confidence is not None and calibrated:
        drafter.confidence.set_sts_temperature(sts)
    lengths = [9, 1, 5, 13]  # ragged; request 1 has no context at all (its anchor is its prompt)
    tokens, features = random_batch(lengths, seed=2)
    draft = drafter.propose(context_of(tokens, lengths, features, temperature))
    B = len(lengths)
    assert draft.token_ids.shape == (B, K) and draft.token_ids.dtype == torch.int64
    assert draft.logits.shape == (B, K, V) and draft.logits.dtype == torch.float32
    logits, z = teacher_forced(drafter, tokens, lengths, features, draft.token_ids)
    torch.testing.assert_close(draft.logits, logits, rtol=1e-5, atol=1e-4)
    if temperature == 0:  # greedy chain: each draft is the argmax of its own (Markov) logits
        assert torch.equal(draft.token_ids, logits.argmax(-1))
    if drafter.confidence is None:
        assert draft.confidence is None
    else:
        assert draft.confidence.shape == (B, K)
        expected = torch.sigmoid(z / sts)
        torch.testing.assert_close(draft.confidence, expected, rtol=1e-5, atol=1e-6)
        assert 0.05 < float(draft.confidence.std())  # random heads: really non-trivial values
    if drafter.markov is not None:
        # The Markov bias really is in the reported logits (not the bare backbone).
        bias = drafter.markov.bias(previous_tokens(tokens[torch.arange(B), torch.tensor(lengths) - 1],
                                                   draft.token_ids))
        assert float(bias.detach().abs().max()) > 1.0


@pytest.mark.parametrize("variant", list(VARIANTS) + ["standardized-features"])
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_packed_backbone_drafts_as_the_modules(variant, temperature):
    """A drafting round runs the backbone's projections through ``dspark::skinny_linear`` on
    weights packed once (``inference_backbone_dtype``): in float32 it drafts what the modules do;
    in bfloat16 (what ``load`` picks) its logits stay within the weights' rounding."""
    config = dict(VARIANTS.get(variant, {"feature_norm": "standardize"}))
    drafter = small_drafter(seed=3, **config)
    if config.get("feature_norm") == "standardize":
        drafter.backbone.set_feature_statistics(torch.randn(len(LAYERS) * D) * 0.1, torch.rand(len(LAYERS) * D) + 0.5)
    lengths = [9, 1, 5, 13]
    tokens, features = random_batch(lengths, seed=4)
    drafts = {}
    for dtype in (None, torch.float32, torch.bfloat16):
        drafter.inference_backbone_dtype = dtype
        drafts[dtype] = drafter.propose(context_of(tokens, lengths, features, temperature, new_from=[0] * 4))
    assert_drafts_equal(drafts[torch.float32], drafts[None])
    packed = drafter.backbone.packed(torch.bfloat16)
    assert packed.layers[0].qkv.packed.dtype == torch.bfloat16
    assert packed.scale_folded == (drafter.cfg.feature_norm == "scale")
    rounded = drafts[torch.bfloat16].logits
    torch.testing.assert_close(rounded, drafts[None].logits, rtol=0.05, atol=0.15)
    assert not torch.allclose(rounded, drafts[None].logits, rtol=1e-5, atol=1e-4)  # the rounding is real


def test_packed_backbone_follows_weight_updates():
    """The packing is rebuilt when a weight changes (an optimizer step, load_state_dict), so a
    drafter drafted with, trained and drafted with again never drafts from stale weights."""
    drafter = small_drafter(seed=5)
    lengths = [6, 3]
    tokens, features = random_batch(lengths, seed=6)
    before = drafter.propose(context_of(tokens, lengths, features, new_from=[0, 0]))
    first = drafter.backbone.packed(torch.float32)
    with torch.no_grad():
        drafter.backbone.layers[1].down.weight.mul_(-2.0)
        drafter.backbone.context_proj.weight.mul_(0.5)
    after = drafter.propose(context_of(tokens, lengths, features, new_from=[0, 0]))
    assert drafter.backbone.packed(torch.float32) is not first
    drafter.inference_backbone_dtype = None
    assert_drafts_equal(after, drafter.propose(context_of(tokens, lengths, features, new_from=[0, 0])))
    assert not torch.allclose(before.logits, after.logits)


def ranking_of(ids) -> dict:
    return {"ranked_ids": [int(i) for i in ids], "notes": {"source": "test"}}


@pytest.mark.parametrize("variant", ["dspark", "parallel+confidence", "dspark-vllm-layout", "no-confidence"])
@pytest.mark.parametrize("temperature", [0.0, 1.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_draft_vocabulary_of_every_id_drafts_as_the_whole_vocabulary(variant, temperature, dtype):
    """Every id as the draft vocabulary (in a shuffled ranking) reproduces the whole-vocabulary
    drafts: the anchor's transition and confidence terms folded into position 1 outside the op
    (its zero row N) are the op's own, with the same rounding in bfloat16, and ids map back."""
    kwargs = dict(confidence=False) if variant == "no-confidence" else VARIANTS[variant]
    drafter = small_drafter(seed=3, **kwargs)
    drafter.inference_lm_head_dtype = dtype
    if drafter.confidence is not None:
        drafter.confidence.set_sts_temperature(torch.linspace(0.6, 1.8, drafter.num_draft),
                                               torch.linspace(-0.5, 0.5, drafter.num_draft))
    lengths = [9, 1, 5, 13]
    tokens, features = random_batch(lengths, seed=4)
    whole = drafter.propose(context_of(tokens, lengths, features, temperature))
    drafter.set_draft_vocabulary(ranking_of(torch.randperm(V, generator=torch.Generator().manual_seed(0))), V)
    assert drafter.cfg.draft_vocab_size == V and torch.equal(drafter.draft_vocab, torch.arange(V))
    drafter.reset(len(lengths))
    assert_drafts_equal(drafter.propose(context_of(tokens, lengths, features, temperature)), whole, atol=1e-5)


def test_anchor_transition_packs_bfloat16_rows_in_bfloat16():
    """W2's draft-vocabulary rows of a bfloat16 Markov head are bfloat16 values: the anchor's
    transition streams them packed in bfloat16 (half the bytes) with the bits of a float32
    packing; float32 rows stay float32."""
    drafter = small_drafter(seed=5)
    anchor_w1 = torch.randn(3, 8, generator=torch.Generator().manual_seed(1))
    for rows, packed_dtype in ((torch.randn(40, 8).to(torch.bfloat16).float(), torch.bfloat16),
                               (torch.randn(40, 8), torch.float32)):
        drafter._transition_packed_key = None
        with torch.no_grad():
            out = drafter.anchor_transition(anchor_w1, rows)
        assert drafter._transition_packed.dtype == packed_dtype
        expected = torch.ops.dspark.skinny_linear(anchor_w1, pack_skinny_weight(rows), rows.shape[0], None)
        assert torch.equal(out, expected)


@pytest.mark.parametrize("variant", ["dspark", "parallel+confidence"])
def test_draft_vocabulary_logits_are_the_whole_vocabularys_on_its_ids(variant):
    """A strict subset: at every position whose earlier drafts agree with the whole-vocabulary
    drafter's (position 1 always), the logits on the subset's ids and the confidence are the
    whole vocabulary's (so W1/W2 rows and the anchor's terms are looked up by the right ids)."""
    drafter = small_drafter(seed=12, **VARIANTS[variant])
    drafter.inference_lm_head_dtype = torch.float32
    drafter.confidence.set_sts_temperature(torch.linspace(0.6, 1.8, drafter.num_draft),
                                           torch.linspace(-0.5, 0.5, drafter.num_draft))
    lengths = [9, 1, 5, 13]
    tokens, features = random_batch(lengths, seed=13)
    whole = drafter.propose(context_of(tokens, lengths, features, 0.0))
    subset = torch.tensor([44, 2, 19, 7, 30, 11, 25, 38, 0, 15, 33, 5, 21, 9, 41, 27])
    drafter.set_draft_vocabulary(ranking_of(subset), len(subset))
    drafter.reset(len(lengths))
    sub = drafter.propose(context_of(tokens, lengths, features, 0.0))
    same_prefix = torch.cat([torch.ones(len(lengths), 1, dtype=torch.bool),
                             (sub.token_ids == whole.token_ids).cumprod(1)[:, :-1].bool()], dim=1)
    ids = subset.sort().values
    assert sub.logits.shape[-1] == len(subset) and torch.equal(sub.logit_ids, ids)  # compact: the draft vocabulary's ids only
    torch.testing.assert_close(sub.dense_logits(V)[same_prefix][:, ids], whole.logits[same_prefix][:, ids], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sub.confidence[same_prefix], whole.confidence[same_prefix], rtol=1e-5, atol=1e-6)
    assert int(same_prefix.sum()) > len(lengths)  # later positions were compared too


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_draft_vocabulary_drafts_only_its_ids(temperature):
    drafter = small_drafter(seed=5)
    subset = [3, 17, 40, 8, 22, 31, 5, 11, 29, 47, 0, 36]  # ranked
    drafter.set_draft_vocabulary(ranking_of(subset + [1, 2]), len(subset))
    lengths = [9, 1, 5, 13]
    tokens, features = random_batch(lengths, seed=6)
    draft = drafter.propose(context_of(tokens, lengths, features, temperature))
    inside = torch.zeros(V, dtype=torch.bool)
    inside[subset] = True
    assert bool(inside[draft.token_ids].all())
    assert draft.logits.shape == (len(lengths), drafter.num_draft, len(subset))
    logits = draft.dense_logits(V)
    assert logits.shape == (len(lengths), drafter.num_draft, V)
    assert bool((logits[..., ~inside] == float("-inf")).all()) and bool(logits[..., inside].isfinite().all())
    if temperature == 0:  # each draft is the argmax of what it reports
        assert torch.equal(draft.token_ids, logits.argmax(-1))
    assert bool(((draft.confidence > 0) & (draft.confidence < 1)).all())
    drafter.set_draft_vocabulary(None, 0)  # back to every id
    assert drafter.draft_vocab is None and drafter.cfg.draft_vocab_size == 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_draft_vocabulary_on_cuda(temperature):
    """The same drafter on CUDA (F.linear over the vocabulary's rows, the CUDA markov_draft):
    drafts only from its ids, q = 0 elsewhere, and greedy drafts equal the CPU's."""
    drafter = small_drafter(seed=5)
    drafter.inference_lm_head_dtype = torch.float32
    drafter.set_draft_vocabulary(ranking_of([3, 17, 40, 8, 22, 31, 5, 11, 29, 47, 0, 36]), 12)
    lengths = [9, 1, 5, 13]
    tokens, features = random_batch(lengths, seed=6)
    on_cpu = drafter.propose(context_of(tokens, lengths, features, temperature))
    gpu = copy.deepcopy(drafter).to("cuda")  # the draft vocabulary moves with it
    context = context_of(tokens, lengths, features, temperature)
    context = DraftContext(tokens=context.tokens.cuda(), lengths=context.lengths.cuda(), anchor_hidden=None,
                           temperature=context.temperature.cuda(), seed=context.seed.cuda(),
                           offset=context.offset.cuda(), hidden_states=features.cuda(), new_from=None)
    on_gpu = gpu.propose(context)
    inside = torch.zeros(V, dtype=torch.bool, device="cuda")
    inside[gpu.draft_vocab] = True
    assert bool(inside[on_gpu.token_ids].all())
    assert bool((on_gpu.dense_logits(V)[..., ~inside] == float("-inf")).all())
    if temperature == 0:
        assert torch.equal(on_gpu.token_ids.cpu(), on_cpu.token_ids)
        torch.testing.assert_close(on_gpu.dense_logits(V).cpu(), on_cpu.dense_logits(V), rtol=1e-4, atol=1e-3)


def test_draft_vocabulary_rejects_bad_rankings():
    drafter = small_drafter()
    for ranking, size, match in ((ranking_of([1, 2]), 3, "at least 3"), (ranking_of([1, V]), 2, "distinct and in"),
                                 (ranking_of([4, 4, 5]), 2, "distinct"), ({"ids": [1]}, 1, "at least 1")):
        with pytest.raises(ValueError, match=match):
            drafter.set_draft_vocabulary(ranking, size)


def test_draft_vocabulary_saves_and_loads(tmp_path):
    drafter = small_drafter(seed=8)
    drafter.set_draft_vocabulary(ranking_of(list(range(V - 1, -1, -1))), 20)
    drafter.save(tmp_path / "d")
    assert json.loads((tmp_path / "d" / "config.json").read_text())["draft_vocab_size"] == 20
    loaded = DSparkDrafter.load(tmp_path / "d", drafter.embedding, drafter.lm_head)
    assert torch.equal(loaded.draft_vocab, torch.arange(V - 20, V))
    (tmp_path / "d" / "draft_vocab.json").unlink()
    with pytest.raises(ValueError, match="draft_vocab.json is missing"):
        DSparkDrafter.load(tmp_path / "d", drafter.embedding, drafter.lm_head)


def test_draft_vocabulary_ranking_counts_answer_tokens():
    from dspark_ext.train import draft_vocabulary_ranking

    ranking = draft_vocabulary_ranking([{"answer": [5, 3, 5, 9]}, {"answer": [3, 5, 7]}])
    assert ranking["ranked_ids"] == [5, 3, 7, 9]  # 3 x 5, 2 x 3, then the ties by id
    assert ranking["notes"] == {"answers": 2, "answer_tokens": 7, "distinct_ids": 4}


def test_cli_draft_vocab(tmp_path, capsys):
    """``dspark draft-vocab``: --size 0 drafts from every id again (no model needed); a size past
    the vocabulary fails with one line before anything loads."""
    from dspark_ext import cli

    drafter = small_drafter(seed=9)
    drafter.set_draft_vocabulary(ranking_of(range(V)), 10)
    drafter.save(tmp_path / "d")
    assert cli.main(["draft-vocab", str(tmp_path / "d"), "--size", str(V + 1)]) == 2
    assert f"exceeds the drafter's vocabulary of {V} ids" in capsys.readouterr().err
    assert cli.main(["draft-vocab", str(tmp_path / "d"), "--size", "-1"]) == 2
    assert cli.main(["draft-vocab", str(tmp_path / "missing")]) == 2
    assert cli.main(["draft-vocab", str(tmp_path / "d"), "--size", "0"]) == 0
    assert not (tmp_path / "d" / "draft_vocab.json").exists()
    assert DSparkDrafter.load(tmp_path / "d", drafter.embedding, drafter.lm_head).draft_vocab is None


@torch.no_grad()
def test_block_forward_blocks_are_independent():
    """J blocks of one sequence in one call == each block alone (no cross-block attention, each
    block reads only the context rows before its anchor)."""
    drafter = small_drafter(seed=3)
    tokens, features = random_batch([20], junk=False, seed=4)
    anchors = torch.tensor([[3, 11, 7, 16]])
    S = 16
    mask = torch.arange(S)[None, None] < anchors[:, :, None]
    pos = torch.arange(S)[None]
    U, h = drafter.block_forward(features[:, :S], pos, tokens[:, anchors[0]], anchors, mask)
    assert U.shape == (1, 4, drafter.num_draft, V) and h.shape == (1, 4, drafter.num_draft, D)
    for j, a in enumerate(anchors[0].tolist()):
        Uj, hj = drafter.block_forward(features[:, :a], pos[:, :a], tokens[:, [a]], torch.tensor([[a]]),
                                       torch.ones(1, 1, a, dtype=torch.bool))
        torch.testing.assert_close(U[0, j], Uj[0, 0], rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(h[0, j], hj[0, 0], rtol=1e-5, atol=1e-5)
    # Changing a context row at/after an anchor leaves that block alone, changes the later ones.
    changed = features.clone()
    changed[0, 7] += 5.0
    U2, _ = drafter.block_forward(changed[:, :S], pos, tokens[:, anchors[0]], anchors, mask)
    torch.testing.assert_close(U2[0, [0, 2]], U[0, [0, 2]], rtol=1e-5, atol=1e-4)  # anchors 3 and 7
    assert float((U2[0, [1, 3]] - U[0, [1, 3]]).abs().max()) > 1e-2  # anchors 11 and 16


# --------------------------------------------------------------------------- incremental context cache


def test_bfloat16_drafting_runs_the_markov_head_in_bfloat16():
    """With a bfloat16 LM head (machines with native bfloat16), the Markov head drafts in
    bfloat16 too: the reported logits are markov_draft's bfloat16 l_k (what drew the drafts;
    verify is shown them widened exactly, so it sees the law that sampled them), the greedy
    drafts are their argmax, and the converted weights follow in-place updates of the head."""
    drafter = small_drafter(seed=5)
    drafter.inference_lm_head_dtype = torch.bfloat16
    lengths = [9, 4]
    tokens, features = random_batch(lengths, seed=3)
    draft = drafter.propose(context_of(tokens, lengths, features, 0.0))
    assert draft.logits.dtype == torch.bfloat16
    widened = draft.dense_logits(drafter.cfg.vocab_size)
    assert widened.dtype == torch.float32 and torch.equal(widened, draft.logits.float())
    assert torch.equal(draft.token_ids, widened.argmax(-1))
    fp32 = small_drafter(seed=5).propose(context_of(tokens, lengths, features, 0.0))
    assert fp32.logits.dtype == torch.float32
    assert not torch.equal(widened, fp32.logits)
    torch.testing.assert_close(widened, fp32.logits, rtol=0.02, atol=0.1)
    w1_bf16, _ = drafter.markov_weights(torch.bfloat16)
    assert drafter.markov_weights(torch.bfloat16)[0] is w1_bf16  # cached
    with torch.no_grad():
        drafter.markov.w1.weight.mul_(2.0)
    assert torch.equal(drafter.markov_weights(torch.bfloat16)[0], drafter.markov.w1.weight.bfloat16())


def test_incremental_context_cache_matches_fresh_drafter():
    """Rounds of growing ragged lengths with new_from = previous lengths - 1 (as in generate), a
    request that restarts (new_from = 0, new content, shorter), a request that does not grow, and
    a length past the cache's initial capacity: every round equals a fresh drafter shown the
    whole context at once (new_from = None)."""
    drafter = small_drafter(seed=5)
    fresh = copy.deepcopy(drafter)
    W = 300
    tokens, features = random_batch([W] * 3, width=W + 2, junk=False, seed=6)
    other_tokens, other_features = random_batch([W] * 3, width=W + 2, junk=False, seed=7)
    rounds = [[3, 1, 6], [5, 4, 6], [9, 2, 10], [12, 7, 11], [290, 8, 15]]
    restart_at = 2  # request 1 starts a new sequence (other content) in round 2
    previous = None
    g = torch.Generator().manual_seed(8)
    for r, lengths in enumerate(rounds):
        tok, feat = tokens.clone(), features.clone()
        if r >= restart_at:
            tok[1], feat[1] = other_tokens[1], other_features[1]
        for b, n in enumerate(lengths):  # rows the target has not produced yet: junk
            feat[b, n - 1:] = 1e3 * torch.randn(feat.shape[1] - n + 1, feat.shape[2], generator=g)
        if previous is None:
            new_from = [0, 0, 0]
        else:
            new_from = [n - 1 for n in previous]
            if r == restart_at:
                new_from[1] = 0
        for temperature in (0.0, 1.0):
            # The second call of a round (T = 1) is shown nothing new: new_from = lengths - 1.
            ctx = context_of(tok[:, :max(lengths)], lengths, feat[:, :max(lengths)], temperature,
                             new_from=new_from if temperature == 0.0 else [n - 1 for n in lengths])
            got = drafter.propose(ctx)
            want = fresh.propose(context_of(tok[:, :max(lengths)], lengths, feat[:, :max(lengths)], temperature))
            assert_drafts_equal(got, want)
        previous = lengths


def test_context_cache_rejects_skipped_or_missing_features():
    drafter = small_drafter(seed=9)
    tokens, features = random_batch([6, 4], width=20, seed=10)
    drafter.propose(context_of(tokens[:, :6], [6, 4], features[:, :6]))
    tokens2, features2 = random_batch([10, 8], width=20, seed=10)
    with pytest.raises(ValueError, match="skipped"):  # request 1: rows 3..4 were never shown
        drafter.propose(context_of(tokens2[:, :10], [10, 8], features2[:, :10], new_from=[5, 5]))
    with pytest.raises(ValueError, match="skipped"):  # a new drafter has nothing cached
        small_drafter(seed=9).propose(
            context_of(tokens2[:, :10], [10, 8], features2[:, :10], new_from=[2, 0]))
    with pytest.raises(ValueError, match="hidden_layers"):
        drafter.propose(context_of(tokens[:, :6], [6, 4], None))
    # The right continuation still works after the failed calls.
    fresh = small_drafter(seed=9)
    assert_drafts_equal(drafter.propose(context_of(tokens2[:, :10], [10, 8], features2[:, :10], new_from=[5, 3])),
                        fresh.propose(context_of(tokens2[:, :10], [10, 8], features2[:, :10])))


# --------------------------------------------------------------------------- save / load


def fp16_rounded(drafter: DSparkDrafter) -> DSparkDrafter:
    rounded = copy.deepcopy(drafter)
    with torch.no_grad():
        for p in rounded.parameters():
            p.copy_(p.half().float())
    return rounded


@pytest.mark.parametrize("variant", ["dspark", "parallel", "mtp1"])
def test_save_load_round_trip(tmp_path, variant):
    from safetensors import safe_open

    drafter = small_drafter(seed=11, **VARIANTS[variant])
    drafter.cfg.sps = [0.0, 50.0, 48.5, 47.25]
    drafter.cfg.notes = {"train_steps": 12, "why": "test"}
    drafter.cfg.target = "tiny"
    K = drafter.num_draft
    if drafter.confidence is not None:
        drafter.confidence.set_sts_temperature(torch.linspace(0.75, 1.5, K))
    drafter.save(tmp_path / "d")
    saved = json.loads((tmp_path / "d" / "config.json").read_text())
    assert saved["sps"] == [0.0, 50.0, 48.5, 47.25] and saved["notes"] == {"train_steps": 12, "why": "test"}
    with safe_open(str(tmp_path / "d" / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        assert keys == set(drafter.state_dict())  # the target's embedding / LM head are not stored
        assert all(f.get_tensor(k).dtype == torch.float16 for k in keys if k != "confidence.sts_temperature")

    loaded = DSparkDrafter.load(tmp_path / "d", drafter.embedding, drafter.lm_head)
    assert loaded.cfg == drafter.cfg
    assert (loaded.markov is None) == (drafter.markov is None)
    assert (loaded.confidence is None) == (drafter.confidence is None)
    assert torch.equal(loaded.sps, torch.tensor([0.0, 50.0, 48.5, 47.25]))
    if drafter.confidence is not None:
        assert saved["sts_temperature"] == pytest.approx(torch.linspace(0.75, 1.5, K).tolist())
        assert torch.equal(loaded.confidence.sts_temperature, torch.linspace(0.75, 1.5, K))
    original = drafter.state_dict()
    for name, value in loaded.state_dict().items():
        assert value.dtype == torch.float32, name
        assert torch.equal(value, original[name].half().float() if name != "confidence.sts_temperature"
                           else original[name]), name
    assert any(not torch.equal(v, v.half().float()) for v in original.values())  # the rounding is real

    from dspark_ext.drafters.dspark import fast_lm_head_dtype

    assert loaded.inference_lm_head_dtype == fast_lm_head_dtype("cpu")  # load picks the fast LM head
    assert loaded.inference_backbone_dtype == torch.bfloat16  # and a bfloat16 packed backbone
    rounded = fp16_rounded(drafter)
    rounded.inference_lm_head_dtype = loaded.inference_lm_head_dtype
    rounded.inference_backbone_dtype = loaded.inference_backbone_dtype
    lengths = [7, 2, 12]
    tokens, features = random_batch(lengths, seed=12)
    for temperature in (0.0, 1.0):
        a = loaded.propose(context_of(tokens, lengths, features, temperature))
        b = rounded.propose(context_of(tokens, lengths, features, temperature))
        assert torch.equal(a.token_ids, b.token_ids) and torch.equal(a.logits, b.logits)
        assert (a.confidence is None) == (drafter.confidence is None)
        if a.confidence is not None:
            assert torch.equal(a.confidence, b.confidence)
        # fp16 weights: close (both with a float32 backbone, which the bfloat16 one would blur)
        loaded.inference_backbone_dtype = torch.float32
        a = loaded.propose(context_of(tokens, lengths, features, temperature))
        loaded.inference_backbone_dtype = torch.bfloat16
        c = drafter.propose(context_of(tokens, lengths, features, temperature))
        torch.testing.assert_close(a.logits.float(), c.logits.float(), rtol=2e-2, atol=5e-2)


# --------------------------------------------------------------------------- inside generate

GEN_LAYERS = [1, 2]  # the tiny Llama has 2 layers: layer 2 is the final norm output


def llama_target_with_features(model=None):
    from dspark_ext.llama import Llama
    from dspark_ext.targets import LlamaTarget

    return LlamaTarget(Llama.from_hf(model if model is not None else tiny_llama()), hidden_layers=GEN_LAYERS)


def bigram_drafter(target, references, seed: int) -> DSparkDrafter:
    """A random-weight DSpark drafter on the target's embedding / LM head whose Markov head (rank
    V, W1 = I) is pushed towards the bigrams of the greedy references: some drafts are accepted,
    some rejected."""
    cfg = DrafterConfig.for_llama(target.model.config, GEN_LAYERS, num_draft=4, markov_rank=target.vocab_size)
    w = target.model.weights
    drafter = randomize(DSparkDrafter(cfg, w.embed, w.lm_head), seed, scale=0.1)
    table = torch.zeros(target.vocab_size, target.vocab_size)
    for prompt, ref in zip(LLAMA_PROMPTS, references):
        seq = torch.cat([prompt, ref]).tolist()
        for x, y in zip(seq[:-1], seq[1:]):
            table[:, x] = 0.0
            table[y, x] = 1e4
    with torch.no_grad():
        drafter.markov.w1.weight.copy_(torch.eye(target.vocab_size))
        drafter.markov.w2.weight.copy_(table)
    return drafter.eval()


class SegmentLog:
    """A Target that records each forward's segment lengths (anchor + drafts per request)."""

    def __init__(self, target):
        self.target, self.vocab_size, self.device = target, target.vocab_size, target.device
        self.segments = []

    def start(self, prompts):
        return self.target.start(prompts)

    def forward(self, token_ids, cu_seqlens):
        self.segments.append(torch.diff(cu_seqlens).tolist())
        return self.target.forward(token_ids, cu_seqlens)

    def rewind(self, lengths):
        self.target.rewind(lengths)

    def lengths(self):
        return self.target.lengths()


class RecordingDSpark(DSparkDrafter):
    """Records what the loop shows the drafter, and what it proposed."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.calls = []

    def propose(self, context: DraftContext) -> Draft:
        draft = super().propose(context)
        self.calls.append((DraftContext(*(None if t is None else t.clone() for t in (
            context.tokens, context.lengths, context.anchor_hidden, context.temperature, context.seed,
            context.offset, context.hidden_states, context.new_from))), draft))
        return draft


@pytest.mark.parametrize("scheduled", [False, True], ids=["all-drafts", "scheduler"])
def test_greedy_generation_matches_autoregressive(scheduled):
    eos, references = llama_references("llama")
    target = SegmentLog(llama_target_with_features())
    drafter = bigram_drafter(target.target, references, seed=13)
    recording = RecordingDSpark(drafter.cfg, drafter.embedding, drafter.lm_head)
    recording.load_state_dict(drafter.state_dict())
    recording.eval()
    sps = falling_sps(64) if scheduled else None
    result = generate(target, recording, LLAMA_PROMPTS, LLAMA_MAX_NEW, eos_token_id=eos, sps=sps)
    for b in range(3):
        assert torch.equal(result.tokens[b], references[b]), (b, result.tokens[b].tolist(), references[b].tolist())
    verified, accepted = int(result.position_verified.sum()), int(result.position_accepted.sum())
    assert 0 < accepted < verified, result.summary()  # both accepted and rejected drafts
    plain = generate(target, AutoregressiveDrafter(), LLAMA_PROMPTS, LLAMA_MAX_NEW, eos_token_id=eos)
    assert all(torch.equal(a, b) for a, b in zip(plain.tokens, result.tokens))
    # Drafts sent per round: all that the budget allows (cap = min(K, max_new - generated - 1))
    # without the scheduler; never more, and sometimes fewer, with it.
    shortened = 0
    for (ctx, _), segments in zip(recording.calls, target.segments):
        for b, seg in enumerate(segments):
            if seg == 0:  # finished
                continue
            cap = min(4, LLAMA_MAX_NEW[b] - int(ctx.offset[b]) - 1)
            assert seg - 1 <= cap if scheduled else seg - 1 == cap, (segments, ctx.offset)
            shortened += seg - 1 < cap
    assert (shortened > 0) == scheduled

    # What the loop showed the drafter: new_from = the previous call's lengths - 1 (0 first), and
    # the features of every position before the anchor = the target's own features of the
    # final sequence (computed here in one fresh prefill per request).
    # (The drafter is skipped only in a last round where nobody may verify a draft.)
    assert result.num_rounds - 1 <= len(recording.calls) <= result.num_rounds
    assert all(seg <= 1 for segments in target.segments[len(recording.calls):] for seg in segments)
    full = [torch.cat([p, t]) for p, t in zip(LLAMA_PROMPTS, result.tokens)]
    reference_target = llama_target_with_features()
    truth = [reference_target.start([seq]).hidden_states for seq in full]
    fresh = copy.deepcopy(drafter)
    previous = None
    for ctx, draft in recording.calls:
        assert ctx.new_from.tolist() == ([0, 0, 0] if previous is None else (previous - 1).tolist())
        for b in range(3):
            n = int(ctx.lengths[b])
            assert torch.equal(ctx.tokens[b, :n], full[b][:n])
            torch.testing.assert_close(ctx.hidden_states[b, :n - 1], truth[b][:n - 1], rtol=1e-4, atol=1e-4)
        # The cached drafter's proposal == a fresh drafter shown everything at once.
        assert_drafts_equal(draft, fresh.propose(DraftContext(
            ctx.tokens, ctx.lengths, ctx.anchor_hidden, ctx.temperature, ctx.seed, ctx.offset, ctx.hidden_states)))
        previous = ctx.lengths


# --------------------------------------------------------------------------- the sampling law

LAW_V = 8
LAW_PROMPT = torch.tensor([1, 2, 3, 1, 2])
LAW_TOKENS = 3
LAW_SAMPLES = 4000
LAW_TEMPERATURE = 40.0 / 1.5  # tiny_llama's LM head is scaled x 40: softmax(1.5 x the unscaled head)


def llama_exact_law(model, prompt: torch.Tensor, num_tokens: int, temperature: float) -> torch.Tensor:
    """Exact law [V ** n] (code y_1 V^(n-1) + ... + y_n) of the first n sampled tokens, from
    full-sequence transformers forwards over every prefix, in float64."""
    Vm = model.config.vocab_size
    law = torch.ones(1, dtype=torch.float64)
    prefixes = prompt[None]
    with torch.no_grad():
        for _ in range(num_tokens):
            p = torch.softmax(model(prefixes).logits[:, -1].double() / temperature, -1)  # [C, V]
            law = (law[:, None] * p).reshape(-1)
            prefixes = torch.cat([prefixes.repeat_interleave(Vm, 0), torch.arange(Vm).repeat(prefixes.shape[0])[:, None]], 1)
    return law


class ReportsBaseLogits(DSparkDrafter):
    """Broken: samples from the Markov-corrected logits but reports the backbone's U (the
    Markov bias removed), so verify's q is not the law the drafts came from."""

    def propose(self, context: DraftContext) -> Draft:
        draft = super().propose(context)
        B = context.tokens.shape[0]
        anchors = context.tokens[torch.arange(B), context.lengths - 1]
        base = draft.logits - self.markov.bias(previous_tokens(anchors, draft.token_ids))
        return Draft(token_ids=draft.token_ids, logits=base, confidence=draft.confidence)


class ReportsScaledLogits(DSparkDrafter):
    """Broken: reports half its logits (a flatter law than the one it sampled from)."""

    def propose(self, context: DraftContext) -> Draft:
        draft = super().propose(context)
        return Draft(token_ids=draft.token_ids, logits=0.5 * draft.logits, confidence=draft.confidence)


@pytest.fixture(scope="module")
def law_setup():
    model = tiny_llama(seed=5, vocab_size=LAW_V)
    target = llama_target_with_features(model)
    cfg = DrafterConfig.for_llama(target.model.config, GEN_LAYERS, num_draft=3, markov_rank=8)
    w = target.model.weights
    honest = randomize(DSparkDrafter(cfg, w.embed, w.lm_head), 14, scale=0.2, markov_scale=60.0).eval()
    return target, honest, llama_exact_law(model, LAW_PROMPT, LAW_TOKENS, LAW_TEMPERATURE)


def sample_codes(target, drafter, sps=None):
    # max_new = LAW_TOKENS + 1: y_1 from the prefill, y_2 and y_3 from a round verifying 2 drafts.
    result = generate(target, drafter, [LAW_PROMPT] * LAW_SAMPLES, LAW_TOKENS + 1, temperature=LAW_TEMPERATURE,
                      seed=7, sps=sps)
    return sequence_codes(torch.stack([t[:LAW_TOKENS] for t in result.tokens]), LAW_V), result


class ReportsWholeVocabularyLogits(DSparkDrafter):
    """Broken: drafts from a draft vocabulary but reports q > 0 outside it (its -inf logits
    replaced by the row's largest), so verify's q is not the law the drafts came from."""

    def propose(self, context: DraftContext) -> Draft:
        draft = super().propose(context)
        dense = draft.dense_logits(self.cfg.vocab_size)
        logits = torch.where(dense.isinf(), dense.amax(-1, keepdim=True), dense)
        return Draft(token_ids=draft.token_ids, logits=logits, confidence=draft.confidence)


#: A draft vocabulary of half the law test's ids (the target's likeliest ones included).
LAW_DRAFT_VOCAB = [0, 2, 5, 7]


@pytest.mark.parametrize("scheduled", [False, True], ids=["all-drafts", "scheduler"])
@pytest.mark.parametrize("draft_vocab", [False, True], ids=["every-id", "draft-vocab"])
def test_sampling_follows_target_law(law_setup, scheduled, draft_vocab):
    target, honest, law = law_setup
    if draft_vocab:
        honest = copy.deepcopy(honest)
        honest.set_draft_vocabulary(ranking_of(LAW_DRAFT_VOCAB), len(LAW_DRAFT_VOCAB))
    sps = falling_sps(4 * LAW_SAMPLES, slope=5e-5) if scheduled else None
    codes, result = sample_codes(target, honest, sps)
    reached, accepted = result.position_reached[:2].double(), result.position_accepted[:2].double()
    rate = accepted / reached
    # The drafter's law is clearly not the target's: drafts are accepted and rejected alike.
    # (Half the ids drafted: position 2 is reached less often; ~390 of 4000 with the scheduler.)
    reach = 0.05 if draft_vocab else 0.1
    assert bool((reached > reach * LAW_SAMPLES).all()) and bool(((rate > 0.1) & (rate < 0.9)).all()), result.summary()
    assert_matches_distribution(codes, law)


@pytest.mark.parametrize("broken_class", [ReportsBaseLogits, ReportsScaledLogits, ReportsWholeVocabularyLogits],
                         ids=["base-logits", "scaled", "q-outside-draft-vocab"])
def test_sampling_check_rejects_misreported_logits(law_setup, broken_class):
    target, honest, law = law_setup
    broken = broken_class(copy.deepcopy(honest.cfg), honest.embedding, honest.lm_head)
    broken.load_state_dict(honest.state_dict())
    if broken_class is ReportsWholeVocabularyLogits:
        broken.set_draft_vocabulary(ranking_of(LAW_DRAFT_VOCAB), len(LAW_DRAFT_VOCAB))
    codes, _ = sample_codes(target, broken.eval())
    check = check_distribution(codes, law)
    assert not check.ok, check


# --------------------------------------------------------------------------- drafter specs


def test_drafter_spec_parsing():
    from dspark_ext.cli import CliError, DrafterSpec, default_drafter_path

    ar = DrafterSpec("ar")
    assert (ar.label, ar.kind, ar.path, ar.scheduled) == ("ar", "ar", None, False)
    ng = DrafterSpec("ngram")
    assert (ng.label, ng.kind, ng.path, ng.scheduled) == ("ngram", "ngram", None, False)
    ds = DrafterSpec("dspark")
    assert (ds.label, ds.kind, ds.path, ds.scheduled) == ("dspark", "dspark", default_drafter_path(), False)
    sched = DrafterSpec("dspark+sched")
    assert (sched.label, sched.kind, sched.path, sched.scheduled) == ("dspark+sched", "dspark",
                                                                      default_drafter_path(), True)
    hybrid = DrafterSpec("hybrid")
    assert (hybrid.label, hybrid.kind, hybrid.path, hybrid.scheduled) == ("hybrid", "hybrid", default_drafter_path(), True)
    custom = DrafterSpec("mtp1=runs/smollm2/mtp1/drafter")
    assert (custom.label, custom.kind, custom.path, custom.scheduled) == (
        "mtp1", "dspark", Path("runs/smollm2/mtp1/drafter"), False)
    custom_sched = DrafterSpec("mine=/tmp/x/drafter+sched")
    assert (custom_sched.label, custom_sched.kind, custom_sched.path, custom_sched.scheduled) == (
        "mine+sched", "dspark", Path("/tmp/x/drafter"), True)
    for bad in ("foo", "", "ngram+sched", "ar+sched", "dspark+sched+sched", "Ar", "hybrid+sched"):
        with pytest.raises(CliError):
            DrafterSpec(bad)


def test_cli_loads_saved_drafter(tmp_path, monkeypatch):
    """``LABEL=PATH[+sched]`` loads a saved drafter on the target; +sched schedules it with this
    machine's cost profile (the drafter's shipped SPS table only as the fallback) and needs a
    confidence head."""
    from argparse import Namespace

    from dspark_ext import cli, cost_profile

    monkeypatch.setenv("DSPARK_NO_PROFILE", "1")  # use the fallback: no timing in tests
    target = llama_target_with_features()
    cfg = DrafterConfig.for_llama(target.model.config, GEN_LAYERS, num_draft=3, markov_rank=4)
    w = target.model.weights
    drafter = randomize(DSparkDrafter(cfg, w.embed, w.lm_head), 15)
    drafter.cfg.sps = [0.0, 10.0, 9.0]
    drafter.save(tmp_path / "withsps")
    cfg_noconf = DrafterConfig.for_llama(target.model.config, GEN_LAYERS, num_draft=3, markov_rank=4, confidence=False)
    DSparkDrafter(cfg_noconf, w.embed, w.lm_head).save(tmp_path / "noconf")
    args = Namespace(num_draft=3, max_ngram=3, min_ngram=1)
    loaded, scheduling = cli._drafter(cli.DrafterSpec(f"a={tmp_path / 'withsps'}+sched"), args, target)
    assert isinstance(loaded, DSparkDrafter) and isinstance(scheduling["cost"], cost_profile.CostProfile)
    assert scheduling["cost"].source.startswith("shipped")
    assert cli._drafter(cli.DrafterSpec(f"a={tmp_path / 'withsps'}"), args, target)[1] == {}
    with pytest.raises(cli.CliError):
        cli._drafter(cli.DrafterSpec(f"a={tmp_path / 'noconf'}+sched"), args, target)
    with pytest.raises(cli.CliError):
        cli._drafter(cli.DrafterSpec(f"a={tmp_path / 'missing'}"), args, target)
    assert cli._context_layers([cli.DrafterSpec("ar"), cli.DrafterSpec(f"a={tmp_path / 'noconf'}")]) == GEN_LAYERS


def test_lm_head_logits_matches_linear():
    from dspark_ext.llama import lm_head_logits

    g = torch.Generator().manual_seed(5)
    head = torch.randn(1000, 48, generator=g)
    for rows in (1, 7, 15, 16, 40):
        x = torch.randn(rows, 48, generator=g)
        torch.testing.assert_close(lm_head_logits(x, head), torch.nn.functional.linear(x, head), rtol=1e-5, atol=1e-4)


def test_fast_lm_head_dtype():
    from dspark_ext.drafters.dspark import fast_lm_head_dtype

    assert fast_lm_head_dtype("cpu") in (torch.float32, torch.bfloat16)
    if torch.cuda.is_available():
        assert fast_lm_head_dtype("cuda") == torch.bfloat16


def test_feature_standardization():
    """project_context standardizes each feature dimension (so outlier dimensions cannot swamp
    the projection) and clamps extreme rows; the statistics are saved with the drafter."""
    from dspark_ext.drafters.dspark import DrafterConfig, DSparkBackbone

    cfg = DrafterConfig(vocab_size=16, hidden_size=8, intermediate_size=16, num_heads=2, num_kv_heads=1,
                        head_dim=4, context_layers=[1, 2])
    backbone = DSparkBackbone(cfg)
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(50, 16, generator=g) * torch.linspace(0.5, 500, 16) + torch.linspace(-100, 100, 16)
    backbone.set_feature_statistics(feats.mean(0), feats.std(0))
    standardized = (feats - backbone.feature_shift) * backbone.feature_scale
    assert standardized.mean(0).abs().max() < 1e-3 and (standardized.std(0) - 1).abs().max() < 1e-3
    with torch.no_grad():
        expected = backbone.context_norm(backbone.context_proj(standardized.clamp(-8, 8)))
        torch.testing.assert_close(backbone.project_context(feats), expected)
        spike = feats[:1].clone()
        spike[0, 3] = 1e6  # clamped at 8 sigma
        clamped = spike.clone()
        clamped[0, 3] = float(backbone.feature_shift[3] + 8 / backbone.feature_scale[3])
        torch.testing.assert_close(backbone.project_context(spike), backbone.project_context(clamped))
    assert {"feature_shift", "feature_scale"} <= set(backbone.state_dict())


def test_drafting_logits_through_skinny_linear():
    """A drafting round's few rows on CPU take the packed LM head (dspark::skinny_linear): the
    same logits as the GEMM within float32 rounding, or within bfloat16's when the head is
    bfloat16 (float32 rows, the head widened exactly); a bfloat16 head past
    SKINNY_BFLOAT16_MAX_ROWS rows takes the bfloat16 GEMM (rows rounded to bfloat16 too);
    training (grad enabled) and many rows keep the GEMM."""
    from dspark_ext.drafters.dspark import SKINNY_BFLOAT16_MAX_ROWS

    F = torch.nn.functional
    drafter = small_drafter(seed=3)
    head = drafter.lm_head
    g = torch.Generator().manual_seed(6)
    for rows in (1, 7, SKINNY_BFLOAT16_MAX_ROWS, SKINNY_BFLOAT16_MAX_ROWS + 1, 32):
        h = torch.randn(rows, head.shape[1], generator=g)
        with torch.no_grad():
            fp32 = drafter.logits(h)
            bf16 = drafter.logits(h, torch.bfloat16)
        torch.testing.assert_close(fp32, F.linear(h, head), rtol=1e-5, atol=1e-4)
        skinny = F.linear(h, head.bfloat16().float())
        gemm = F.linear(h.bfloat16(), head.bfloat16()).float()
        if rows <= SKINNY_BFLOAT16_MAX_ROWS:
            torch.testing.assert_close(bf16, skinny, rtol=1e-5, atol=1e-4)
        else:
            torch.testing.assert_close(bf16, gemm)
            assert not torch.allclose(bf16, skinny, rtol=1e-5, atol=1e-4)  # the rows were rounded: the GEMM ran
        assert not torch.allclose(bf16, fp32, rtol=1e-6, atol=1e-6)  # the bfloat16 head is really used
    assert drafter.packed_lm_head(torch.bfloat16) is drafter.packed_lm_head(torch.bfloat16)  # packed once


def test_load_packs_the_lm_head(tmp_path):
    drafter = small_drafter(seed=4)
    drafter.save(tmp_path)
    loaded = DSparkDrafter.load(tmp_path, drafter.embedding, drafter.lm_head)
    assert loaded._lm_head_packed_key == (loaded.lm_head.data_ptr(), loaded.lm_head.device,
                                          loaded.inference_lm_head_dtype or torch.float32)


def test_propose_block_drafts_a_shorter_block():
    """``propose_block(context, K)`` is ``propose``; a shorter block drafts that many positions with
    calibrated confidences (the leading positions' STS temperatures and biases); a block outside
    [1, K] is refused."""
    lengths = [9, 6]
    tokens, features = random_batch(lengths)
    drafter = small_drafter(seed=3)
    drafter.confidence.set_sts_temperature([0.5 + 0.25 * k for k in range(drafter.num_draft)],
                               [0.1 * k for k in range(drafter.num_draft)])
    full = drafter.propose(context_of(tokens, lengths, features, 0.0, new_from=[0, 0]))
    same = drafter.propose_block(context_of(tokens, lengths, features, 0.0, new_from=[0, 0]), drafter.num_draft)
    assert torch.equal(same.token_ids, full.token_ids) and torch.equal(same.logits, full.logits)
    assert torch.equal(same.confidence, full.confidence)
    short = drafter.propose_block(context_of(tokens, lengths, features, 0.0, new_from=[0, 0]), 2)
    assert short.token_ids.shape == (2, 2) and short.confidence.shape == (2, 2)
    assert bool(((short.confidence > 0) & (short.confidence < 1)).all())
    with pytest.raises(ValueError, match="block must be in"):
        drafter.propose_block(context_of(tokens, lengths, features, 0.0, new_from=[0, 0]), drafter.num_draft + 1)


def test_drafting_rounds_read_rotary_tables_bitwise_and_attend_the_cache_in_place():
    """A drafting round looks its RoPE tables up (``DSparkBackbone.rotary_tables``, grown by
    doubling) instead of computing them: the same bits as ``rotary_tables`` at every position;
    and it writes its block's keys after the context in the cache (``block_slot``) instead of
    concatenating them to a copy: the same hidden states as the concatenation, bit for bit."""
    from dspark_ext.drafters.dspark import rotary_tables

    drafter = small_drafter(seed=5)
    backbone = drafter.backbone
    for top in (7, 300, 3000):  # grows the table twice
        positions = torch.arange(top + 1)[None].flip(1)
        cos, sin = backbone.rotary_tables(positions)
        expected_cos, expected_sin = rotary_tables(positions, backbone.inv_freq)
        assert torch.equal(cos, expected_cos) and torch.equal(sin, expected_sin)
    assert backbone._rope_table[0].shape[0] == 4096

    g = torch.Generator().manual_seed(6)
    B, S, Q = 3, 11, drafter.num_draft
    cfg = drafter.cfg
    x = torch.randn(B, Q, cfg.hidden_size, generator=g)
    positions = torch.tensor([[4], [11], [8]]) + torch.arange(Q)
    caches = [(torch.randn(B, S + Q + 2, cfg.num_kv_heads, cfg.head_dim, generator=g),
               torch.randn(B, S + Q + 2, cfg.num_kv_heads, cfg.head_dim, generator=g)) for _ in backbone.layers]
    lengths = torch.tensor([4, 11, 8])
    ctx_mask = torch.arange(S)[None] < lengths[:, None]
    mask = torch.cat([ctx_mask[:, None].expand(B, Q, S), torch.ones(B, Q, Q, dtype=torch.bool)], 2)
    packed = backbone.packed(torch.float32)
    with torch.no_grad():
        concatenated = backbone(x, positions, [(k[:, :S].clone(), v[:, :S].clone()) for k, v in caches], mask, packed)
        in_place = backbone(x, positions, caches, mask, packed, block_slot=S)
    assert torch.equal(in_place, concatenated)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_drafting_rounds_feed_the_context_in_one_call(monkeypatch, temperature):
    """A drafter's rounds on CPU feed their new context rows through one ``dspark::draft_context``
    call each and draft what the Python path (``FUSED_CONTEXT_FEED`` off) drafts, over rounds of a
    growing context; the first round's whole prompts (more rows than skinny_linear takes) go
    through the Python path."""
    import dspark_ext.drafters.dspark as dspark_module

    lengths = [9, 1, 5, 13]
    tokens, features = random_batch(lengths, seed=7)
    grown = [n + 2 for n in lengths]
    more_tokens, more_features = random_batch(grown, seed=7)
    drafts, calls = {}, []
    op = torch.ops.dspark.draft_context

    class Counting:
        def __call__(self, *args):
            calls.append(args[1].numel())
            return op(*args)

    monkeypatch.setattr(torch.ops.dspark, "draft_context", Counting(), raising=False)
    for fused in (True, False):
        monkeypatch.setattr(dspark_module, "FUSED_CONTEXT_FEED", fused)
        drafter = small_drafter(seed=8, num_layers=2, feature_norm="scale")
        drafter.inference_backbone_dtype = torch.float32
        drafter.backbone.packed(torch.float32).context_proj.max_skinny_rows = 20  # the prompts: 24 rows
        drafts[fused] = [drafter.propose(context_of(tokens, lengths, features, temperature, new_from=[0] * 4))]
        drafts[fused].append(drafter.propose(context_of(more_tokens, grown, more_features, temperature,
                                                        new_from=[n - 1 for n in lengths])))
    assert calls == [2 * len(lengths)]  # the second round's two new rows per request, in one call
    for fused, unfused in zip(drafts[True], drafts[False]):
        assert_drafts_equal(fused, unfused)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_drafting_rounds_run_each_layer_as_one_draft_layer_call(monkeypatch, temperature):
    """On CPU, with the projections packed, a round's backbone layers run as ``dspark::draft_layer``
    calls: the same drafts as the layers' own ops (``FUSED_DRAFT_LAYERS`` off), logits and
    confidences within rounding, over several rounds of a growing context."""
    import dspark_ext.drafters.dspark as dspark_module

    lengths = [9, 1, 5, 13]
    tokens, features = random_batch(lengths, seed=7)
    drafts, calls = {}, []
    op = torch.ops.dspark.draft_layer

    class Counting:
        def __call__(self, *args):
            calls.append(args[6])
            return op(*args)

    monkeypatch.setattr(torch.ops.dspark, "draft_layer", Counting(), raising=False)
    for fused in (True, False):
        monkeypatch.setattr(dspark_module, "FUSED_DRAFT_LAYERS", fused)
        drafter = small_drafter(seed=8, num_layers=2)
        drafter.inference_backbone_dtype = torch.float32
        drafts[fused] = [drafter.propose(context_of(tokens, lengths, features, temperature, new_from=[0] * 4))]
        grown = [n + 2 for n in lengths]
        more_tokens, more_features = random_batch(grown, seed=7)
        drafts[fused].append(drafter.propose(context_of(more_tokens, grown, more_features, temperature,
                                                        new_from=[n - 1 for n in lengths])))
    assert len(calls) == 2 * 2 and calls[0] == max(lengths) - 1  # two layers, two rounds; the block after the context
    for fused, unfused in zip(drafts[True], drafts[False]):
        assert_drafts_equal(fused, unfused)
