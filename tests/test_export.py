"""``dspark export --format vllm`` (dspark_ext/drafters/export.py).

The export is checked against vLLM 0.32's Qwen3DSparkModel semantics written out here from the
exported tensors alone (fc -> hidden_norm -> per-layer k/v with per-head k_norm and neox RoPE on
the context; queries embed(anchor), embed(noise) x (K - 1); q/k norms; non-causal attention;
the target's LM head; Markov bias W2 W1[x_{k-1}]; confidence sigmoid(proj([h_k; W1[x_{k-1}]]))):
the greedy drafts, their logits and confidences equal the drafter's own ``propose``. A drafter
whose feature scale is not folded into fc fails the same comparison. vLLM's own config parser
and weight loader read the export in tests/integrations/test_vllm_export.py.
"""

import json

import pytest
import torch

pytest.importorskip("safetensors")

from dspark_ext.drafters.export import export_vllm, vllm_tensors  # noqa: E402
from test_drafter import LAYERS, V, context_of, random_batch, small_drafter  # noqa: E402

VLLM_LAYOUT = dict(qk_norm=True, noise_token_id=5, feature_norm="scale", target_num_layers=3, max_position=64)


def rms(x, weight, eps):
    return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def neox_rope(x, positions, theta):
    """x [S, heads, hd] rotated at positions [S] (vLLM is_neox_style=True)."""
    hd = x.shape[-1]
    inv = 1.0 / theta ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd)
    ang = positions.float()[:, None] * inv
    cos, sin = torch.cat([ang.cos(), ang.cos()], -1)[:, None], torch.cat([ang.sin(), ang.sin()], -1)[:, None]
    x1, x2 = x[..., : hd // 2], x[..., hd // 2:]
    return x * cos + torch.cat([-x2, x1], -1) * sin


def vllm_semantics_draft(t, config, embed, lm_head, features, anchor, anchor_pos):
    """Greedy drafts [K], logits [K, V] and confidences [K] of one request, as vLLM's
    Qwen3DSparkModel computes them from the exported tensors ``t`` and ``config``. A
    reduced-vocabulary export (``draft_vocab_size``) brings its own ``lm_head`` rows; its logits
    are over those N ids, and draft id i is target id i + ``d2t[i]`` (which W1 embeds next)."""
    if "draft_vocab_size" in config:
        lm_head = t["lm_head.weight"]
    K, eps, theta = config["block_size"], config["rms_norm_eps"], config["rope_theta"]
    H, KVH, hd = config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]
    ctx = rms(features @ t["fc.weight"].T, t["hidden_norm.weight"], eps)  # [S, D]
    S = ctx.shape[0]
    x = embed[torch.tensor([anchor] + [config["dspark_noise_token_id"]] * (K - 1))]
    pos = anchor_pos + torch.arange(K)
    for i in range(config["num_hidden_layers"]):
        p = lambda n: t[f"layers.{i}.{n}"]  # noqa: E731
        h = rms(x, p("input_layernorm.weight"), eps)
        q = rms((h @ p("self_attn.q_proj.weight").T).view(K, H, hd), p("self_attn.q_norm.weight"), eps)
        k = rms((h @ p("self_attn.k_proj.weight").T).view(K, KVH, hd), p("self_attn.k_norm.weight"), eps)
        v = (h @ p("self_attn.v_proj.weight").T).view(K, KVH, hd)
        kc = rms((ctx @ p("self_attn.k_proj.weight").T).view(S, KVH, hd), p("self_attn.k_norm.weight"), eps)
        vc = (ctx @ p("self_attn.v_proj.weight").T).view(S, KVH, hd)
        q, k, kc = neox_rope(q, pos, theta), neox_rope(k, pos, theta), neox_rope(kc, torch.arange(S), theta)
        keys = torch.cat([kc, k]).repeat_interleave(H // KVH, 1)
        vals = torch.cat([vc, v]).repeat_interleave(H // KVH, 1)
        att = torch.softmax(torch.einsum("qhd,khd->hqk", q, keys) / hd ** 0.5, -1)  # non-causal
        x = x + torch.einsum("hqk,khd->qhd", att, vals).reshape(K, H * hd) @ p("self_attn.o_proj.weight").T
        h = rms(x, p("post_attention_layernorm.weight"), eps)
        gate, up = h @ p("mlp.gate_proj.weight").T, h @ p("mlp.up_proj.weight").T
        x = x + (torch.nn.functional.silu(gate) * up) @ p("mlp.down_proj.weight").T
    hidden = rms(x, t["norm.weight"], eps)
    base = hidden @ lm_head.T
    prev, tokens, logits, conf = anchor, [], [], []
    for j in range(K):
        e = t["markov_head.markov_w1.weight"][prev]
        row = base[j] + t["markov_head.markov_w2.weight"] @ e
        z = torch.cat([hidden[j], e]) @ t["confidence_head.proj.weight"][0] + t["confidence_head.proj.bias"][0]
        prev = int(row.argmax())
        if "draft_vocab_size" in config:
            prev += int(t["d2t"][prev])
        tokens.append(prev)
        logits.append(row)
        conf.append(torch.sigmoid(z))
    return torch.tensor(tokens), torch.stack(logits), torch.stack(conf)


@torch.no_grad()
@pytest.mark.parametrize("fold, vocab", [(True, 0), (False, 0), (True, 24)])
def test_export_computes_what_the_drafter_proposes(tmp_path, fold, vocab):
    drafter = small_drafter(seed=3, **VLLM_LAYOUT)
    g = torch.Generator().manual_seed(5)
    drafter.backbone.feature_scale.copy_(torch.rand(drafter.backbone.feature_scale.shape, generator=g) * 3 + 0.1)
    if vocab:  # drafts from 24 ids: vLLM's reduced-vocabulary DSpark
        drafter.set_draft_vocabulary({"ranked_ids": torch.randperm(V, generator=g).tolist()}, vocab)
    lengths = [9, 1, 5]
    tokens, features = random_batch(lengths, seed=4)
    draft = drafter.propose(context_of(tokens, lengths, features, temperature=0.0))
    from safetensors.torch import load_file

    export_vllm(drafter, tmp_path / "vllm", dtype=torch.float32)
    t = load_file(str(tmp_path / "vllm" / "model.safetensors"))
    config = json.loads((tmp_path / "vllm" / "config.json").read_text())
    if not fold:  # the broken variant: the feature scale left out of fc
        t["fc.weight"] = drafter.backbone.context_proj.weight.clone()
    for b, n in enumerate(lengths):
        ids, logits, conf = vllm_semantics_draft(t, config, drafter.embedding, drafter.lm_head, features[b, :n - 1],
                                                 int(tokens[b, n - 1]), n - 1)
        same = torch.allclose(logits, draft.logits[b], rtol=1e-4, atol=1e-3)
        if not fold and n > 1:
            assert not same
            continue
        assert same and torch.equal(ids, draft.token_ids[b])
        torch.testing.assert_close(conf, draft.confidence[b], rtol=1e-4, atol=1e-5)


def test_export_config_names_and_shapes(tmp_path):
    drafter = small_drafter(seed=4, **VLLM_LAYOUT)
    drafter.confidence.set_sts_temperature(torch.linspace(0.5, 2, drafter.num_draft))
    out = export_vllm(drafter, tmp_path / "e")
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["Qwen3DSparkModel"] and config["model_type"] == "qwen3"
    assert config["target_layer_ids"] == [i - 1 for i in LAYERS]
    assert config["block_size"] == drafter.num_draft and config["dspark_noise_token_id"] == 5
    assert config["markov_rank"] == 8 and config["enable_confidence_head"] and config["confidence_head_with_markov"]
    assert config["sample_from_anchor"] is True and config["num_target_layers"] == 3
    assert len(config["dspark_ext"]["sts_temperature_not_applied_by_vllm"]) == drafter.num_draft
    from safetensors.torch import load_file

    t = load_file(str(out / "model.safetensors"))
    assert all(v.dtype == torch.bfloat16 for v in t.values())
    D = drafter.cfg.hidden_size
    assert t["fc.weight"].shape == (D, len(LAYERS) * D)
    assert t["markov_head.markov_w1.weight"].shape == (V, 8) and t["markov_head.markov_w2.weight"].shape == (V, 8)
    assert t["confidence_head.proj.weight"].shape == (1, D + 8)
    assert "embed_tokens.weight" not in t and "lm_head.weight" not in t  # vLLM shares the target's
    assert len([k for k in t if k.startswith("layers.1.")]) == 11
    assert set(t) == set(vllm_tensors(drafter))


def test_export_refuses_a_drafter_vllm_cannot_serve(tmp_path):
    with pytest.raises(ValueError, match="qk_norm=True"):
        export_vllm(small_drafter(seed=1), tmp_path / "x")  # the first shipped layout
    with pytest.raises(ValueError, match="markov_rank"):
        export_vllm(small_drafter(seed=1, **{**VLLM_LAYOUT, "markov_rank": 0, "confidence": False}), tmp_path / "y")
    assert not (tmp_path / "x").exists()


def test_cli_export(tmp_path, capsys):
    from dspark_ext.cli import main

    drafter = small_drafter(seed=6, **VLLM_LAYOUT)
    drafter.save(tmp_path / "drafter")
    assert main(["export", "--format", "vllm", str(tmp_path / "drafter"), str(tmp_path / "out")]) == 0
    assert "num_speculative_tokens" in capsys.readouterr().err
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["block_size"] == drafter.num_draft and "draft_vocab_size" not in config
    small_drafter(seed=6).save(tmp_path / "v1")
    assert main(["export", str(tmp_path / "v1"), str(tmp_path / "out2")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") <= 2 and "qk_norm=True" in err and "Traceback" not in err
    assert main(["export", str(tmp_path / "nothing"), str(tmp_path / "out3")]) == 2
    assert "no drafter at" in capsys.readouterr().err
