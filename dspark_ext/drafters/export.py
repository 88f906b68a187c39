"""``dspark export --format vllm``: a DSpark drafter as a checkpoint vLLM 0.32 serves.

vLLM's dense DSpark format is ``Qwen3DSparkModel`` (``vllm/model_executor/models/qwen3_dspark.py``
on top of ``qwen3_dflash.py``): Qwen3 decoder layers whose attention reads context keys/values
made from target features (``fc`` -> ``hidden_norm`` -> each layer's own k/v projections, per-head
``k_norm``, RoPE at the context positions), queries ``embed(anchor)`` then
``embed(dspark_noise_token_id)`` x (K - 1) with every query a prediction
(``sample_from_anchor``), the target's LM head, ``markov_head.markov_w1`` / ``markov_w2`` and
``confidence_head.proj`` over ``[h_k; W1[x_{k-1}]]``. The target's embedding and LM head are
not stored: vLLM shares the target's. A drafter with a draft vocabulary of N ids exports as
vLLM's reduced-vocabulary DSpark: ``draft_vocab_size`` N in the config, the target LM head's N
rows as the draft's own ``lm_head``, W2's N rows, and ``d2t`` (draft id i drafts target id
i + d2t[i]), so vLLM drafts from the same ids as ``propose`` does here.

A drafter maps onto that format exactly when ``DrafterConfig.vllm_compatible``: per-head q/k
norms, the noise token's embedding as the mask query, and context features scaled per
dimension only, which folds into ``fc``'s columns. Two things do not travel, and the config
says so under ``dspark_ext``: the STS temperatures (vLLM's confidence is
``sigmoid(proj(.))``, one temperature for all positions) and the SPS table.
"""

import json
from pathlib import Path
from typing import Dict

import torch

#: The vLLM release whose DSpark loader this format was read from and is tested against.
VLLM_FORMAT_VERSION = "0.32.0"

_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "q.weight": "self_attn.q_proj.weight",
    "k.weight": "self_attn.k_proj.weight",
    "v.weight": "self_attn.v_proj.weight",
    "o.weight": "self_attn.o_proj.weight",
    "q_norm.weight": "self_attn.q_norm.weight",
    "k_norm.weight": "self_attn.k_norm.weight",
    "mlp_norm.weight": "post_attention_layernorm.weight",
    "gate.weight": "mlp.gate_proj.weight",
    "up.weight": "mlp.up_proj.weight",
    "down.weight": "mlp.down_proj.weight",
}


def needs_target_lm_head(folder) -> bool:
    """Whether exporting the drafter saved in ``folder`` needs its target's LM head (it drafts
    from a draft vocabulary, whose LM head rows the export stores)."""
    from dspark_ext.drafters.dspark import CONFIG_FILE

    return bool(json.loads((Path(folder) / CONFIG_FILE).read_text()).get("draft_vocab_size"))


def load_for_export(folder, lm_head: torch.Tensor = None):
    """A drafter saved by ``DSparkDrafter.save``. The target's embedding is part of neither the
    drafter folder nor the export, so a zero-stride placeholder stands in for it, and for the LM
    head unless ``lm_head`` [V, D] is given: a drafter with a draft vocabulary needs it
    (``needs_target_lm_head``)."""
    from dspark_ext.drafters.dspark import CONFIG_FILE, DSparkDrafter

    config = json.loads((Path(folder) / CONFIG_FILE).read_text())
    placeholder = torch.zeros(1, config["hidden_size"]).expand(config["vocab_size"], -1)
    if lm_head is None and config.get("draft_vocab_size"):
        raise ValueError(f"{folder} drafts from a draft vocabulary: its export stores those rows of the target's "
                         "LM head, so the target is needed")
    if lm_head is not None and tuple(lm_head.shape) != (config["vocab_size"], config["hidden_size"]):
        raise ValueError(f"the target's LM head is {list(lm_head.shape)}, the drafter's config says "
                         f"[{config['vocab_size']}, {config['hidden_size']}]: another target?")
    drafter = DSparkDrafter.load(folder, placeholder, placeholder if lm_head is None else lm_head.float())
    drafter.has_target_lm_head = lm_head is not None
    return drafter


def vllm_tensors(drafter) -> Dict[str, torch.Tensor]:
    """The drafter's weights under vLLM's ``Qwen3DSparkForCausalLM`` checkpoint names (float32)."""
    cfg = drafter.cfg
    if not cfg.vllm_compatible:
        raise ValueError(
            "this drafter cannot be exported to vLLM's Qwen3DSparkModel format: it needs qk_norm=True, "
            "a noise_token_id, feature_norm='scale' and markov_rank >= 1 (got "
            f"qk_norm={cfg.qk_norm}, noise_token_id={cfg.noise_token_id}, feature_norm={cfg.feature_norm!r}, "
            f"markov_rank={cfg.markov_rank}); train it with `dspark train` (the vLLM layout is its default)")
    backbone = drafter.backbone
    out: Dict[str, torch.Tensor] = {}
    for i, layer in enumerate(backbone.layers):
        for name, tensor in layer.state_dict().items():
            out[f"layers.{i}.{_LAYER_NAMES[name]}"] = tensor
    # fc(x) = W (x * scale) = (W diag(scale)) x: the per-dimension feature scale folds into fc.
    out["fc.weight"] = backbone.context_proj.weight * backbone.feature_scale[None, :]
    out["hidden_norm.weight"] = backbone.context_norm.weight
    out["norm.weight"] = backbone.norm.weight
    out["markov_head.markov_w1.weight"] = drafter.markov.w1.weight
    out["markov_head.markov_w2.weight"] = drafter.markov.w2.weight
    if drafter.confidence is not None:
        out["confidence_head.proj.weight"] = drafter.confidence.linear.weight
        out["confidence_head.proj.bias"] = drafter.confidence.linear.bias
    if drafter.draft_vocab is not None:
        if not getattr(drafter, "has_target_lm_head", True):
            raise ValueError("a drafter with a draft vocabulary exports its rows of the target's LM head: "
                             "load it with the target's (load_for_export(folder, lm_head))")
        ids = drafter.draft_vocab.cpu()
        out["markov_head.markov_w2.weight"] = drafter.markov.w2.weight[drafter.draft_vocab]
        out["lm_head.weight"] = drafter.lm_head[drafter.draft_vocab]
    tensors = {k: v.detach().float().cpu().contiguous() for k, v in out.items()}
    if drafter.draft_vocab is not None:
        tensors["d2t"] = ids - torch.arange(ids.numel())  # EAGLE-3's offsets: target id = i + d2t[i]
    return tensors


def vllm_config(drafter, dtype: torch.dtype) -> dict:
    """config.json of the export: a Qwen3 config with the DSpark keys vLLM 0.32 reads."""
    cfg = drafter.cfg
    if cfg.target_num_layers is None:
        raise ValueError("the drafter's config lacks target_num_layers (the target's decoder layer count); "
                         "set it in config.json")
    sts = [float(t) for t in drafter.confidence.sts_temperature] if drafter.confidence is not None else []
    sts_bias = [float(b) for b in drafter.confidence.sts_bias] if drafter.confidence is not None else []
    return {
        "architectures": ["Qwen3DSparkModel"],
        "model_type": "qwen3",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "max_position_embeddings": cfg.max_position or 8192,
        "attention_bias": False,
        "tie_word_embeddings": False,
        "layer_types": ["full_attention"] * cfg.num_layers,  # non-causal over the block
        "torch_dtype": str(dtype).replace("torch.", ""),
        # DSpark: target features, block layout, heads.
        "target_layer_ids": [int(i) - 1 for i in cfg.context_layers],  # vLLM counts layer outputs from 0
        "num_target_layers": cfg.target_num_layers,
        "target_hidden_size": cfg.hidden_size,
        "use_aux_hidden_state": True,
        "block_size": cfg.num_draft,
        "sample_from_anchor": True,
        "dspark_bonus_anchor": False,
        "dspark_noise_token_id": cfg.noise_token_id,
        "markov_rank": cfg.markov_rank,
        "markov_head_type": "vanilla",
        "enable_confidence_head": drafter.confidence is not None,
        "confidence_head_with_markov": drafter.confidence is not None,
        **({"draft_vocab_size": int(drafter.draft_vocab.numel())} if drafter.draft_vocab is not None else {}),
        "dspark_ext": {
            "format": f"vllm {VLLM_FORMAT_VERSION} Qwen3DSparkModel",
            "target": cfg.target,
            "context_layers_hf_numbering": list(cfg.context_layers),
            "sts_temperature_not_applied_by_vllm": sts,
            **({"sts_bias_not_applied_by_vllm": sts_bias} if sts_bias else {}),
            "notes": cfg.notes,
        },
    }


def export_vllm(drafter, out, dtype: torch.dtype = torch.bfloat16) -> Path:
    """Writes ``out/config.json`` and ``out/model.safetensors`` (weights in ``dtype``) for
    ``vllm serve TARGET --speculative-config '{"method": "dspark", "model": OUT,
    "num_speculative_tokens": K}'``. Returns ``out``."""
    from safetensors.torch import save_file

    tensors = vllm_tensors(drafter)
    config = vllm_config(drafter, dtype)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: (v.to(dtype) if v.is_floating_point() else v).contiguous() for k, v in tensors.items()},
              str(out / "model.safetensors"),
              metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config, indent=1))
    return out
