"""The DSpark drafter (paper Sec. 3): a parallel backbone + Markov head + confidence head.

Backbone (DFlash-style): a small Llama-shaped transformer over the block
``[anchor, mask x (K - 1)]``. Every block position attends bidirectionally to the whole block and
to the target's *context features*: hidden states of several target layers at every committed
position, concatenated, projected to the model width and RMS-normed, then turned into extra
keys/values by each layer's own K/V projections. It shares the target's frozen token embedding
and LM head, so one forward gives K base-logit rows ``U_k`` and hidden states ``h_k``.

On top: ``MarkovHead`` (``l_k = U_k + W2 W1[x_{k-1}]``) and ``ConfidenceHead``
(``c_k = sigmoid(w . [h_k; W1[x_{k-1}]])``) from ``dspark_ext.heads``; inference samples the K
drafts left to right through ``torch.ops.dspark.markov_draft``. Ablations: ``markov_rank = 0``
is the parallel-only backbone (DFlash-like; drafted by the same op with a zero Markov head, i.e.
independently per position), ``num_draft = 1`` an MTP-1 style single-token drafter.

``DSparkDrafter`` implements the ``Drafter`` protocol. It keeps a per-request cache of the
projected context keys/values, fed incrementally from ``DraftContext.hidden_states``.
"""

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from dspark_ext.heads import ConfidenceHead, MarkovHead
from dspark_ext.llama import lm_head_logits
from dspark_ext.ops import pack_skinny_weight
from dspark_ext.packed_linear import SKINNY_MAX_ROWS, FusedLinear
from dspark_ext.protocols import Draft, DraftContext

#: A bfloat16 LM head drafts through ``dspark::skinny_linear`` up to this many rows (one
#: request's K); past it the machine's bfloat16 GEMM (AMX / AVX512-BF16) overtakes one read of
#: the packed head, which turns compute-bound (SmolLM2's head, 2 cores: 7 rows 1.7 ms against
#: 2.4 ms; 14 rows 3.0 against 2.6; 28 rows 6.4 against 3.4).
SKINNY_BFLOAT16_MAX_ROWS = 8

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
#: Token ids ranked by frequency in the drafter's training text: {"ranked_ids": [...], "notes": {...}}.
DRAFT_VOCAB_FILE = "draft_vocab.json"


@dataclass
class DrafterConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    context_layers: List[int]  # target layers (output_hidden_states numbering) the backbone reads
    num_layers: int = 1
    num_draft: int = 7  # K
    markov_rank: int = 64  # 0 = parallel-only backbone (no Markov head)
    confidence: bool = True
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    target: str = ""
    # The vLLM-servable layout (Qwen3DSparkModel, ``dspark_ext.drafters.export``): per-head q/k
    # RMSNorm (also on the context keys), the noise token's own embedding row as the query of
    # positions 2..K, and context features scaled per dimension only (foldable into ``fc``).
    # The defaults are the first shipped layout, so older checkpoints load unchanged.
    qk_norm: bool = False
    noise_token_id: Optional[int] = None  # None: a learned mask embedding
    feature_norm: str = "standardize"  # "standardize": (x - mean) / std, clamped to +-8; "scale": x / rms
    target_num_layers: Optional[int] = None
    max_position: Optional[int] = None
    sps: Optional[List[float]] = None  # measured steps/s of the target at 1..N tokens (scheduler)
    sts_temperature: Optional[List[float]] = None
    sts_bias: Optional[List[float]] = None  # per position, after the temperature: sigmoid(z / T + b)
    # Per position k: the fraction of the held-out rollouts (the STS set) whose first k drafts
    # were all accepted; where a scheduler's forecast starts before it has seen this drafter draft.
    heldout_survival: Optional[List[float]] = None
    # Drafting samples from the draft_vocab_size most frequent ids of DRAFT_VOCAB_FILE (0: the
    # whole vocabulary); training and the exported weights always cover the whole vocabulary.
    draft_vocab_size: int = 0
    notes: dict = field(default_factory=dict)

    @classmethod
    def for_llama(cls, llama_config, context_layers: Sequence[int], **kwargs) -> "DrafterConfig":
        """Backbone shaped like the target's decoder layers (``dspark_ext.llama.LlamaConfig``)."""
        c = llama_config
        return cls(vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
                   num_heads=c.num_heads, num_kv_heads=c.num_kv_heads, head_dim=c.head_dim,
                   context_layers=[int(i) for i in context_layers], rope_theta=c.rope_theta,
                   rms_norm_eps=c.rms_norm_eps, target_num_layers=c.num_layers,
                   max_position=getattr(c, "max_position", None), **kwargs)

    @property
    def vllm_compatible(self) -> bool:
        """Whether ``dspark export --format vllm`` can write this drafter exactly."""
        return (self.qk_norm and self.noise_token_id is not None and self.feature_norm == "scale"
                and self.markov_rank > 0 and self.num_layers >= 1)


def shipped_drafter_path() -> Path:
    """The DSpark drafter shipped for SmolLM2-135M-Instruct (package data)."""
    from importlib import resources

    return Path(str(resources.files("dspark_ext") / "data" / "drafters" / "SmolLM2-135M-Instruct"))


def fast_lm_head_dtype(device) -> torch.dtype:
    """bfloat16 where a bfloat16 matmul is native (CUDA; CPUs with AVX512-BF16 or AMX), else
    float32. Drafting logits are whatever the drafter reports to verification, so their
    precision changes speed and acceptance, never the output law."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.bfloat16
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return torch.float32
    return torch.bfloat16 if (" avx512_bf16" in flags or " amx_bf16" in flags) else torch.float32


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, self.weight.shape, self.weight, self.eps)


def rotary_tables(positions: torch.Tensor, inv_freq: torch.Tensor):
    """(cos, sin) [..., S, 1, hd] of rotate_half RoPE at ``positions`` [..., S]."""
    freqs = positions.to(inv_freq.dtype)[..., None] * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)[..., None, :]
    return emb.cos(), emb.sin()


def apply_rotary(x: torch.Tensor, tables) -> torch.Tensor:
    """RoPE of ``x`` [..., S, heads, hd] with ``rotary_tables`` of its positions."""
    cos, sin = tables
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


@dataclass
class PackedLayer:
    """A backbone layer's projections packed for drafting rounds (``BackboneLayer.packed``):
    q/k/v and gate/up fused, and the context's k/v."""

    qkv: FusedLinear
    o: FusedLinear
    gate_up: FusedLinear
    down: FusedLinear
    context_kv: FusedLinear


#: Drafting rounds on CPU run each backbone layer as one ``dspark::draft_layer`` call (False: the
#: layer's own ops, as training runs it; bench/bench_drafting_round.py times both).
FUSED_DRAFT_LAYERS = True

#: Drafting rounds on CPU feed the new context rows to every layer's caches in one
#: ``dspark::draft_context`` call (False: ``project_context`` and ``context_kv``, as training runs them).
FUSED_CONTEXT_FEED = True


def _weight(norm: Optional[RMSNorm]) -> Optional[torch.Tensor]:
    return None if norm is None else norm.weight.detach()


def _rows(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1])


class BackboneLayer(nn.Module):
    """A Llama decoder layer whose attention also reads the context's keys/values."""

    def __init__(self, cfg: DrafterConfig):
        super().__init__()
        D, H, KVH, hd = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = H, KVH, hd
        self.attn_norm = RMSNorm(D, cfg.rms_norm_eps)
        # Qwen3's per-head RMSNorm of queries and keys, before RoPE (context keys included).
        self.q_norm = RMSNorm(hd, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(hd, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.q = nn.Linear(D, H * hd, bias=False)
        self.k = nn.Linear(D, KVH * hd, bias=False)
        self.v = nn.Linear(D, KVH * hd, bias=False)
        self.o = nn.Linear(H * hd, D, bias=False)
        self.mlp_norm = RMSNorm(D, cfg.rms_norm_eps)
        self.gate = nn.Linear(D, cfg.intermediate_size, bias=False)
        self.up = nn.Linear(D, cfg.intermediate_size, bias=False)
        self.down = nn.Linear(cfg.intermediate_size, D, bias=False)

    def packed(self, dtype: torch.dtype) -> PackedLayer:
        """The projections packed for ``dspark::skinny_linear`` with weights in ``dtype`` (float32,
        or bfloat16: half the bytes a drafting round streams from memory)."""
        def fused(*layers):
            return FusedLinear([(layer.weight.detach(), None) for layer in layers], packed_dtype=dtype)
        return PackedLayer(qkv=fused(self.q, self.k, self.v), o=fused(self.o), gate_up=fused(self.gate, self.up),
                           down=fused(self.down), context_kv=fused(self.k, self.v))

    def context_kv(self, context: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor,
                   packed: Optional[PackedLayer] = None, rope: Optional[tuple] = None):
        """Keys/values [B, S, KVH, hd] of the (projected, normed) context features [B, S, D]
        (``rope``: ``rotary_tables`` of ``positions``, if the caller has them)."""
        B, S, _ = context.shape
        if packed is None:
            k, v = self.k(context), self.v(context)
        else:
            k, v = packed.context_kv(_rows(context))
        k = apply_rotary(self._norm_k(k.view(B, S, self.num_kv_heads, self.head_dim)),
                         rope if rope is not None else rotary_tables(positions, inv_freq))
        return k, v.view(B, S, self.num_kv_heads, self.head_dim)

    def _fused(self, x: torch.Tensor, packed: Optional[PackedLayer], context_lengths, ctx_k) -> bool:
        """Whether a drafting round's layer runs as one ``dspark::draft_layer`` call: on CPU, with
        the projections packed and the block attending to the cache in place (``block_slot`` and
        the requests' ``context_lengths`` given)."""
        return (FUSED_DRAFT_LAYERS and packed is not None and context_lengths is not None and x.device.type == "cpu"
                and packed.qkv.packed is not None and x.shape[0] * x.shape[1] <= packed.qkv.max_skinny_rows
                and ctx_k.is_contiguous())

    def _norm_q(self, q: torch.Tensor) -> torch.Tensor:
        return q if self.q_norm is None else self.q_norm(q)

    def _norm_k(self, k: torch.Tensor) -> torch.Tensor:
        return k if self.k_norm is None else self.k_norm(k)

    def forward(self, x, positions, inv_freq, ctx_k, ctx_v, mask, packed: Optional[PackedLayer] = None,
                rope: Optional[tuple] = None, block_slot: Optional[int] = None,
                context_lengths: Optional[torch.Tensor] = None, final_norm: Optional[RMSNorm] = None):
        """x [B, Q, D] block rows at ``positions`` [B, Q]; ctx_k/ctx_v [B, S, KVH, hd]; mask
        [B, Q, S + Q] bool (True = may attend) over (context keys, block keys). ``packed``: the
        projections as ``packed`` made them (drafting rounds), else the modules (training).
        ``rope``: ``rotary_tables`` of ``positions``, if the caller has them. ``block_slot`` = S:
        ctx_k/ctx_v are caches with room for Q more rows after their first S; the block's keys
        and values are written there and attended in place (no concatenated copy of the cache).
        With ``context_lengths`` [B] int64 too (the context keys each request's mask allows: a
        prefix), a drafting round on CPU runs the layer as one ``dspark::draft_layer`` call.
        ``final_norm`` (the backbone's last layer): the output goes through it too."""
        if self._fused(x, packed, context_lengths, ctx_k):
            cos, sin = rope if rope is not None else rotary_tables(positions, inv_freq)
            in_op = final_norm is not None and final_norm.eps == self.attn_norm.eps  # the op's norms share one eps
            out = torch.ops.dspark.draft_layer(
                x, cos.squeeze(-2), sin.squeeze(-2), ctx_k, ctx_v, context_lengths, block_slot,
                self.attn_norm.weight.detach(), packed.qkv.packed, _weight(self.q_norm), _weight(self.k_norm),
                packed.o.packed, self.mlp_norm.weight.detach(), packed.gate_up.packed, packed.down.packed,
                self.num_heads, self.attn_norm.eps, final_norm.weight.detach() if in_op else None)
            return out if in_op or final_norm is None else final_norm(out)
        out = self._unfused(x, positions, inv_freq, ctx_k, ctx_v, mask, packed, rope, block_slot)
        return out if final_norm is None else final_norm(out)

    def _unfused(self, x, positions, inv_freq, ctx_k, ctx_v, mask, packed, rope, block_slot):
        """``forward`` as the layer's own ops."""
        B, Q, D = x.shape
        H, KVH, hd = self.num_heads, self.num_kv_heads, self.head_dim
        h = self.attn_norm(x)
        if packed is None:
            q, k, v = self.q(h), self.k(h), self.v(h)
        else:
            q, k, v = packed.qkv(_rows(h))
        tables = rope if rope is not None else rotary_tables(positions, inv_freq)  # queries and block keys share them
        q = apply_rotary(self._norm_q(q.view(B, Q, H, hd)), tables)
        k = apply_rotary(self._norm_k(k.view(B, Q, KVH, hd)), tables)
        if block_slot is None:
            keys = torch.cat([ctx_k, k], dim=1).transpose(1, 2)  # [B, KVH, S + Q, hd]
            vals = torch.cat([ctx_v, v.view(B, Q, KVH, hd)], dim=1).transpose(1, 2)
        else:
            end = block_slot + Q
            ctx_k[:, block_slot:end] = k
            ctx_v[:, block_slot:end] = v.view(B, Q, KVH, hd)
            keys, vals = ctx_k[:, :end].transpose(1, 2), ctx_v[:, :end].transpose(1, 2)
        # enable_gqa: each group of query heads reads its K/V head in place (no repeated copy).
        o = F.scaled_dot_product_attention(q.transpose(1, 2), keys, vals, attn_mask=mask[:, None], enable_gqa=KVH != H)
        o = o.transpose(1, 2).reshape(B, Q, H * hd)
        if packed is None:
            x = x + self.o(o)
            h = self.mlp_norm(x)
            return x + self.down(F.silu(self.gate(h)) * self.up(h))
        x = x + packed.o(_rows(o))[0].view(B, Q, D)
        gate, up = packed.gate_up(_rows(self.mlp_norm(x)))
        return x + packed.down(F.silu(gate) * up)[0].view(B, Q, D)


class DSparkBackbone(nn.Module):
    """The parallel backbone: context projection, ``num_layers`` layers, final norm. Token
    embedding and LM head are the target's (frozen buffers, not saved with the drafter)."""

    def __init__(self, cfg: DrafterConfig):
        super().__init__()
        D = cfg.hidden_size
        self.cfg = cfg
        width = len(cfg.context_layers) * D
        # Target activations carry a few huge outlier dimensions (|x| ~ 500 against a typical
        # ~15 in SmolLM2's deep layers) that would swamp the projection: each dimension is
        # standardized with statistics of the training features (set_feature_statistics).
        # The exportable layout ("scale") divides each dimension by its RMS only, which folds
        # into the projection's columns (vLLM's fc has no bias and no clamp).
        if cfg.feature_norm not in ("standardize", "scale"):
            raise ValueError(f"feature_norm must be 'standardize' or 'scale', got {cfg.feature_norm!r}")
        if cfg.noise_token_id is not None and not 0 <= cfg.noise_token_id < cfg.vocab_size:
            raise ValueError(f"noise_token_id must be in [0, {cfg.vocab_size}), got {cfg.noise_token_id}")
        self.register_buffer("feature_shift", torch.zeros(width))
        self.register_buffer("feature_scale", torch.ones(width))
        self.context_proj = nn.Linear(width, D, bias=False)
        self.context_norm = RMSNorm(D, cfg.rms_norm_eps)
        # Positions 2..K read a learned mask vector, or (exportable) the noise token's embedding.
        self.mask_embedding = nn.Parameter(torch.zeros(D)) if cfg.noise_token_id is None else None
        self.layers = nn.ModuleList(BackboneLayer(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(D, cfg.rms_norm_eps)
        hd = cfg.head_dim
        self.register_buffer("inv_freq", 1.0 / (cfg.rope_theta ** (torch.arange(0, hd, 2).float() / hd)),
                             persistent=False)

    @torch.no_grad()
    def set_feature_statistics(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        """Per-dimension mean and standard deviation [L * D] of the target's context features."""
        if self.cfg.feature_norm == "scale":
            self.feature_scale.copy_(1.0 / (mean.pow(2) + std.pow(2)).sqrt().clamp(min=1e-3))
            return
        self.feature_shift.copy_(mean)
        self.feature_scale.copy_(1.0 / std.clamp(min=1e-3))

    def packed(self, dtype: torch.dtype) -> "PackedBackbone":
        """Every projection packed for ``dspark::skinny_linear`` in ``dtype`` (built once per
        weight version, then cached: optimizer steps, ``load_state_dict`` and in-place ops bump
        a tensor's version; a write through ``.data`` does not). The "scale" feature norm is
        folded into the context projection's columns, as ``dspark export --format vllm`` folds it."""
        params = list(self.parameters()) + [self.feature_scale]
        key = (dtype, tuple((t.data_ptr(), t._version) for t in params))
        if getattr(self, "_packed_key", None) != key:
            proj = self.context_proj.weight.detach()
            folded = self.cfg.feature_norm == "scale"
            if folded:
                proj = proj * self.feature_scale[None, :]
            self._packed = PackedBackbone(context_proj=FusedLinear([(proj, None)], packed_dtype=dtype),
                                          scale_folded=folded,
                                          layers=[layer.packed(dtype) for layer in self.layers])
            self._packed_key = key
        return self._packed

    def project_context(self, features: torch.Tensor, packed: Optional["PackedBackbone"] = None) -> torch.Tensor:
        """Target features [..., L * D] -> normed context rows [..., D]."""
        x = features.to(self.feature_scale.dtype)
        if self.cfg.feature_norm == "standardize":
            # Clamp the rare extreme rows (the attention-sink token reaches ~100 sigma).
            x = ((x - self.feature_shift) * self.feature_scale).clamp(-8.0, 8.0)
        elif packed is None or not packed.scale_folded:
            x = x * self.feature_scale
        if packed is None:
            return self.context_norm(self.context_proj(x))
        return self.context_norm(packed.context_proj(_rows(x))[0].view(*x.shape[:-1], -1))

    def context_kv(self, context: torch.Tensor, positions: torch.Tensor, packed: Optional["PackedBackbone"] = None,
                   largest: Optional[int] = None):
        """Each layer's context keys/values of ``context`` at ``positions`` (``largest``: their
        largest, if the caller knows it: no host read of it)."""
        layers = [None] * len(self.layers) if packed is None else packed.layers
        rope = None if packed is None else self.rotary_tables(positions, largest)
        return [layer.context_kv(context, positions, self.inv_freq, p, rope) for layer, p in zip(self.layers, layers)]

    def block_inputs(self, embedding: torch.Tensor, anchor_ids: torch.Tensor, num_draft: int) -> torch.Tensor:
        """[anchor embedding, mask x (K - 1)] for anchors [...] -> [..., K, D]."""
        dtype = self.context_proj.weight.dtype
        anchor = F.embedding(anchor_ids, embedding).to(dtype)
        mask = self.mask_embedding if self.mask_embedding is not None else embedding[self.cfg.noise_token_id].to(dtype)
        masks = mask.expand(*anchor_ids.shape, num_draft - 1, -1)
        return torch.cat([anchor[..., None, :], masks], dim=-2)

    def forward(self, x, positions, kv, mask, packed: Optional["PackedBackbone"] = None,
                block_slot: Optional[int] = None, context_lengths: Optional[torch.Tensor] = None,
                largest: Optional[int] = None) -> torch.Tensor:
        """Block rows x [B, Q, D] -> final-normed hidden states h [B, Q, D] (``block_slot``,
        ``context_lengths``: see ``BackboneLayer.forward``; ``largest``: the largest position,
        if the caller knows it)."""
        if not len(self.layers):
            return self.norm(x)
        layers = [None] * len(self.layers) if packed is None else packed.layers
        rope = None if packed is None else self.rotary_tables(positions, largest)
        last = len(self.layers) - 1
        for i, (layer, (ck, cv), p) in enumerate(zip(self.layers, kv, layers)):
            x = layer(x, positions, self.inv_freq, ck, cv, mask, p, rope, block_slot, context_lengths,
                      final_norm=self.norm if i == last else None)
        return x

    def fuses_every_layer(self, x: torch.Tensor, packed: Optional["PackedBackbone"], context_lengths, caches) -> bool:
        """Whether every layer of a drafting round over ``x`` runs as one ``dspark::draft_layer``
        call (then none reads the round's attention mask)."""
        return packed is not None and all(layer._fused(x, p, context_lengths, ck)
                                          for layer, p, (ck, _) in zip(self.layers, packed.layers, caches))

    def rotary_tables(self, positions: torch.Tensor, largest: Optional[int] = None):
        """``rotary_tables(positions, inv_freq)``, looked up in a table of every position below
        the largest seen so far (``rope_table``): two index ops where computing them takes seven,
        in every layer of every round. ``largest``: max(positions), when the caller knows it
        (else read from the tensor)."""
        if largest is None:
            largest = int(positions.max()) if positions.numel() else -1
        cos, sin = self.rope_table(largest, positions.device)
        return cos[positions][..., None, :], sin[positions][..., None, :]

    def rope_table(self, largest: int, device) -> Tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin) [P, hd] of rotate_half RoPE at positions 0 .. P - 1, P > ``largest`` (grown by
        doubling; the same products and cos/sin as ``rotary_tables``, so the same bits)."""
        needed = largest + 1
        table = getattr(self, "_rope_table", None)
        if table is None or table[0].shape[0] < needed or table[0].device != torch.device(device):
            size = max(1 << max(needed - 1, 0).bit_length(), 256)
            cos, sin = rotary_tables(torch.arange(size, device=device), self.inv_freq.to(device))
            table = self._rope_table = (cos[:, 0], sin[:, 0])  # [size, hd]
        return table

    def feed_context(self, features: torch.Tensor, rows: torch.Tensor, positions: torch.Tensor, largest: int,
                     packed: Optional["PackedBackbone"], key_caches: List[torch.Tensor],
                     value_caches: List[torch.Tensor]) -> None:
        """Writes the context keys/values of the target's features [B, L, F] at (``rows[i]``,
        ``positions[i]``) into every layer's caches [B, C, KVH, hd] (``largest``: max(positions)).
        A drafting round's few rows on CPU go through one ``dspark::draft_context`` call."""
        if self._feeds_in_one_call(features, rows, packed, key_caches, value_caches):
            cos, sin = self.rope_table(largest, features.device)
            k_norms = [layer.k_norm.weight.detach() for layer in self.layers] if self.cfg.qk_norm else []
            torch.ops.dspark.draft_context(features, rows, positions, packed.context_proj.packed,
                                           self.context_norm.weight.detach(), cos, sin,
                                           [p.context_kv.packed for p in packed.layers], k_norms, key_caches,
                                           value_caches, self.context_norm.eps)
            return
        context = self.project_context(features[rows, positions], packed)[None]  # [1, n, D]
        for i, (k, v) in enumerate(self.context_kv(context, positions[None], packed, largest=largest)):
            key_caches[i][rows, positions] = k[0]
            value_caches[i][rows, positions] = v[0]

    def _feeds_in_one_call(self, features, rows, packed, key_caches, value_caches) -> bool:
        """Whether ``feed_context`` runs as one ``dspark::draft_context`` call: on CPU, the
        projections packed (the feature scale folded in), few enough rows for skinny_linear."""
        return (FUSED_CONTEXT_FEED and packed is not None and packed.scale_folded and features.device.type == "cpu"
                and features.dtype == torch.float32 and features.stride(-1) == 1
                and packed.context_proj.packed is not None and rows.numel() <= packed.context_proj.max_skinny_rows
                and all(p.context_kv.packed is not None for p in packed.layers)
                and all(layer.k_norm is None or layer.k_norm.eps == self.context_norm.eps for layer in self.layers)
                and all(k.is_contiguous() and v.is_contiguous() for k, v in zip(key_caches, value_caches)))


@dataclass
class PackedBackbone:
    """``DSparkBackbone.packed``: the context projection (with the feature scale folded in when
    ``scale_folded``) and each layer's ``PackedLayer``."""

    context_proj: FusedLinear
    scale_folded: bool
    layers: List[PackedLayer]


class DSparkDrafter(nn.Module):
    """Backbone + Markov head + confidence head; a ``Drafter`` for ``dspark_ext.generate``.

    ``embedding`` [V, D] and ``lm_head`` [V, D] are the target's (frozen). ``sps`` (the target's
    measured steps/s at 1..N tokens) travels with the drafter so the generation loop can run the
    scheduler; ``confidence`` is None without a confidence head."""

    cost_name = "dspark"  # what the cost profile calls its drafting cost

    def __init__(self, cfg: DrafterConfig, embedding: torch.Tensor, lm_head: Optional[torch.Tensor] = None):
        super().__init__()
        if tuple(embedding.shape) != (cfg.vocab_size, cfg.hidden_size):
            raise ValueError(f"embedding must be [V, D] = {[cfg.vocab_size, cfg.hidden_size]}, got {list(embedding.shape)}")
        self.cfg = cfg
        self.num_draft = cfg.num_draft
        self.backbone = DSparkBackbone(cfg)
        self.markov = MarkovHead(cfg.vocab_size, cfg.markov_rank) if cfg.markov_rank > 0 else None
        self.confidence = ConfidenceHead(cfg.hidden_size, cfg.markov_rank) if cfg.confidence else None
        if self.confidence is not None and cfg.sts_temperature:
            self.confidence.set_sts_temperature(cfg.sts_temperature, cfg.sts_bias)
        self.register_buffer("embedding", embedding.detach().float(), persistent=False)
        self.register_buffer("lm_head", (embedding if lm_head is None else lm_head).detach().float(),
                             persistent=False)
        self._init_weights()
        self._cache_k: list = []
        self._cache_v: list = []
        self._cache_len = torch.zeros(0, dtype=torch.int64)
        # Sorted ids drafting samples from (None: all); a buffer, so it moves with the drafter.
        self.register_buffer("draft_vocab", None, persistent=False)
        self.draft_vocab_ranking: Optional[dict] = None  # DRAFT_VOCAB_FILE's content, saved with the drafter

    def _init_weights(self) -> None:
        for name, p in self.named_parameters():
            if p.dim() == 2 and not name.startswith(("markov.", "confidence.")):
                nn.init.normal_(p, std=0.02)
        if self.markov is not None:
            nn.init.normal_(self.markov.w1.weight, std=0.02)
            nn.init.zeros_(self.markov.w2.weight)  # start as the plain backbone
        if self.confidence is not None:
            nn.init.zeros_(self.confidence.linear.weight)
            nn.init.zeros_(self.confidence.linear.bias)

    @property
    def sps(self) -> Optional[torch.Tensor]:
        return None if not self.cfg.sps else torch.tensor(self.cfg.sps, dtype=torch.float32)

    # ---------------------------------------------------------------- training form
    def block_hidden(self, context_features, context_positions, anchor_ids, anchor_positions, context_mask):
        """Teacher-forced training forward for J blocks per sequence: hidden states h [B, J, K, D].

        ``context_features`` [B, S, L*D], ``context_positions`` [B, S]; ``anchor_ids`` /
        ``anchor_positions`` [B, J]; ``context_mask`` [B, J, S] bool (block j may read context
        row s: rows before its anchor)."""
        B, J = anchor_ids.shape
        K = self.num_draft
        context = self.backbone.project_context(context_features)
        kv = self.backbone.context_kv(context, context_positions)
        x = self.backbone.block_inputs(self.embedding, anchor_ids, K).reshape(B, J * K, -1)
        positions = (anchor_positions[:, :, None] + torch.arange(K, device=anchor_ids.device)).reshape(B, J * K)
        same_block = torch.eye(J, dtype=torch.bool, device=anchor_ids.device).repeat_interleave(K, 0).repeat_interleave(K, 1)
        mask = torch.cat([context_mask.repeat_interleave(K, dim=1), same_block[None].expand(B, -1, -1)], dim=2)
        return self.backbone(x, positions, kv, mask).view(B, J, K, -1)

    def block_forward(self, context_features, context_positions, anchor_ids, anchor_positions, context_mask):
        """``block_hidden`` and its base logits: (U [B, J, K, V] float32, h [B, J, K, D])."""
        h = self.block_hidden(context_features, context_positions, anchor_ids, anchor_positions, context_mask)
        return self.logits(h, self.training_lm_head_dtype), h

    #: dtype of the LM head matmul in ``block_forward`` (training): bfloat16 runs ~3x faster
    #: on CPUs with AVX512-BF16 and the loss is computed in float32 from its output.
    training_lm_head_dtype: Optional[torch.dtype] = None

    #: dtype of the LM head matmul when drafting (``propose``); see ``fast_lm_head_dtype``.
    inference_lm_head_dtype: Optional[torch.dtype] = None

    #: dtype of the backbone's weights packed for ``dspark::skinny_linear`` when drafting on CPU
    #: (``propose``); None = the modules' own matmuls.
    inference_backbone_dtype: Optional[torch.dtype] = torch.float32

    def logits(self, hidden: torch.Tensor, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """The target's LM head on ``hidden`` [..., D] -> float32 logits [..., V]. A drafting
        round's few rows on CPU go through ``dspark::skinny_linear`` on the head packed once in
        ``dtype`` (float32 or bfloat16): one read of it, where the GEMM costs ~2-3x that. Past
        ``SKINNY_BFLOAT16_MAX_ROWS`` rows a bfloat16 head goes to the GEMM."""
        return self._head_logits(hidden, dtype, self.lm_head_as, self.packed_lm_head)

    @staticmethod
    def _head_logits(hidden: torch.Tensor, dtype: Optional[torch.dtype], weight_as, packed_as,
                     widen: bool = True) -> torch.Tensor:
        """``logits`` on a head given as ``weight_as(dtype)`` [N, D] and ``packed_as(dtype)`` (its
        ``skinny_linear`` packing, asked for only when used): the whole LM head or the draft
        vocabulary's rows. ``widen=False`` leaves a bfloat16 GEMM's logits in bfloat16."""
        rows = hidden.numel() // max(hidden.shape[-1], 1)
        max_rows = SKINNY_BFLOAT16_MAX_ROWS if dtype == torch.bfloat16 else SKINNY_MAX_ROWS
        if (hidden.device.type == "cpu" and not torch.is_grad_enabled() and rows <= max_rows
                and dtype in (None, torch.float32, torch.bfloat16)):
            packed = packed_as(dtype or torch.float32)
            return torch.ops.dspark.skinny_linear(hidden.float(), packed, weight_as(dtype or torch.float32).shape[0],
                                                  None)
        if dtype is None or dtype == torch.float32:
            return lm_head_logits(hidden.float().reshape(-1, hidden.shape[-1]), weight_as(torch.float32)).view(
                *hidden.shape[:-1], -1)
        logits = F.linear(hidden.to(dtype), weight_as(dtype))
        return logits.float() if widen else logits

    def packed_lm_head(self, dtype: torch.dtype) -> torch.Tensor:
        """The frozen LM head in ``dtype``, packed for ``skinny_linear`` (once, then cached)."""
        key = (self.lm_head.data_ptr(), self.lm_head.device, dtype)
        if getattr(self, "_lm_head_packed_key", None) != key:
            self._lm_head_packed = pack_skinny_weight(self.lm_head.detach().to(dtype))
            self._lm_head_packed_key = key
        return self._lm_head_packed

    def markov_weights(self, dtype: torch.dtype):
        """The Markov head's (W1, W2) [V, r] in ``dtype``, detached (converted once per weight
        version, then cached)."""
        w1, w2 = self.markov.w1.weight, self.markov.w2.weight
        if dtype == torch.float32:
            return w1.detach(), w2.detach()
        key = (w1.data_ptr(), w1._version, w2.data_ptr(), w2._version, dtype)
        if getattr(self, "_markov_key", None) != key:
            self._markov_lowp = (w1.detach().to(dtype), w2.detach().to(dtype))
            self._markov_key = key
        return self._markov_lowp

    def lm_head_as(self, dtype: torch.dtype) -> torch.Tensor:
        """The frozen LM head [V, D] in ``dtype`` (converted once, then cached)."""
        if dtype == torch.float32:
            return self.lm_head
        cached = getattr(self, "_lm_head_lowp", None)
        if cached is None or cached.dtype != dtype or cached.device != self.lm_head.device:
            cached = self.lm_head.to(dtype)
            self._lm_head_lowp = cached
        return cached

    # ---------------------------------------------------------------- draft vocabulary
    def set_draft_vocabulary(self, ranking: Optional[dict], size: int) -> None:
        """Draft from the ``size`` first ids of ``ranking["ranked_ids"]`` (ids ranked by frequency
        in the training text), or from the whole vocabulary (``size`` 0 or no ranking). The LM
        head and the Markov head then read only those rows (FR-Spec's frequency-ranked draft
        vocabulary; the shipped drafter's round reads ~40% of the bytes at 8k of SmolLM2's 49k ids). The
        drafts' law q is zero elsewhere, which verification handles like any q: the output law
        is unchanged, and a target token outside the set is simply never drafted."""
        self._drafting_head_key = self._drafting_markov_key = None  # rebuilt for the new vocabulary
        if ranking is None or size <= 0:
            self.draft_vocab, self.draft_vocab_ranking, self.cfg.draft_vocab_size = None, ranking, 0
            return
        ranked = ranking.get("ranked_ids")
        if not isinstance(ranked, list) or len(ranked) < size:
            raise ValueError(f"draft vocabulary: need at least {size} ranked ids, got "
                             f"{len(ranked) if isinstance(ranked, list) else type(ranked).__name__}")
        ids = torch.tensor(ranked[:size], dtype=torch.int64)
        if int(ids.min()) < 0 or int(ids.max()) >= self.cfg.vocab_size or ids.unique().numel() != size:
            raise ValueError(f"draft vocabulary: ids must be distinct and in [0, {self.cfg.vocab_size})")
        self.draft_vocab = ids.sort().values.to(self.lm_head.device)
        self.draft_vocab_ranking, self.cfg.draft_vocab_size = ranking, int(size)

    def _drafting_vocabulary_key(self) -> tuple:
        return (None if self.draft_vocab is None else (self.draft_vocab.data_ptr(), self.draft_vocab.numel()),)

    def drafting_markov_weights(self, dtype: torch.dtype):
        """(W1, W2, W2 rows in float32) as drafting uses them: (W1, W2) as ``dspark::markov_draft``
        reads them, the whole [V, r] head (third item None), or over the draft vocabulary its
        rows plus one zero row (id N: the "previous token" of position 1, whose transition from
        the anchor, any id, is added before the op, from W2's rows in float32 as the op computes
        its own)."""
        w1, w2 = self.markov_weights(dtype)
        if self.draft_vocab is None:
            return w1, w2, None
        key = (w1.data_ptr(), w1._version, w2.data_ptr(), w2._version, dtype, self._drafting_vocabulary_key())
        if getattr(self, "_drafting_markov_key", None) != key:
            zero = w1.new_zeros(1, w1.shape[1])
            rows = w2[self.draft_vocab]
            self._drafting_markov = (torch.cat([w1[self.draft_vocab], zero]), torch.cat([rows, zero]), rows.float())
            self._drafting_markov_key = key
        return self._drafting_markov

    def drafting_head(self, dtype: torch.dtype):
        """(the LM head's rows of the draft vocabulary in ``dtype``, the same packed for
        ``skinny_linear`` on CPU or None), built once per vocabulary."""
        key = (self.lm_head.data_ptr(), dtype, self._drafting_vocabulary_key())
        if getattr(self, "_drafting_head_key", None) != key:
            rows = self.lm_head[self.draft_vocab].to(dtype)
            self._drafting_head = (rows, pack_skinny_weight(rows) if rows.device.type == "cpu" else None)
            self._drafting_head_key = key
        return self._drafting_head

    def drafting_logits(self, hidden: torch.Tensor, widen: bool = True) -> torch.Tensor:
        """Base logits U [..., V] of a drafting round, or [..., N] over the draft vocabulary
        (``widen=False``: a bfloat16 head's GEMM output stays bfloat16)."""
        if self.draft_vocab is None:
            return self._head_logits(hidden, self.inference_lm_head_dtype, self.lm_head_as, self.packed_lm_head, widen)
        return self._head_logits(hidden, self.inference_lm_head_dtype, lambda dtype: self.drafting_head(dtype)[0],
                                 lambda dtype: self.drafting_head(dtype)[1], widen)

    def _drafting_logits_buffer(self, leading: torch.Size, N: int, dtype: torch.dtype, device) -> torch.Tensor:
        """The markov_draft input over the draft vocabulary, [*leading, N + 1], reused from round to
        round (the op returns new tensors; nothing else keeps it): id N is the "previous token"
        row with logit -inf, set once when the buffer is made."""
        buffer = getattr(self, "_logits_buffer", None)
        if (buffer is None or buffer.shape[:-1] != leading or buffer.shape[-1] != N + 1 or buffer.dtype != dtype
                or buffer.device != torch.device(device)):
            buffer = torch.empty(*leading, N + 1, dtype=dtype, device=device)
            buffer[..., N] = float("-inf")
            self._logits_buffer = buffer
        return buffer

    def anchor_transition(self, anchor_w1: torch.Tensor, w2_rows: torch.Tensor) -> torch.Tensor:
        """W2 W1[anchor] over the draft vocabulary: ``anchor_w1`` [B, r] float32 and ``w2_rows``
        [N, r] float32 (``drafting_markov_weights``' third item) -> [B, N] float32; on CPU through
        ``dspark::skinny_linear`` on the rows packed once (one read of them, where the BLAS GEMM of
        this shape took ~0.35 ms at batch 4)."""
        if anchor_w1.device.type != "cpu" or torch.is_grad_enabled():
            return anchor_w1 @ w2_rows.T
        key = (w2_rows.data_ptr(), w2_rows.shape)
        if getattr(self, "_transition_packed_key", None) != key:
            # Rows that are bfloat16 values (a bfloat16 Markov head's) pack as bfloat16: half the
            # bytes, the same products (skinny_linear widens them exactly).
            narrow = w2_rows.to(torch.bfloat16)
            exact = torch.equal(narrow.float(), w2_rows)
            self._transition_packed = pack_skinny_weight(narrow if exact else w2_rows)
            self._transition_packed_key = key
        return torch.ops.dspark.skinny_linear(anchor_w1.contiguous(), self._transition_packed, w2_rows.shape[0], None)

    # ---------------------------------------------------------------- Drafter protocol
    def reset(self, batch_size: int) -> None:
        """Drops every request's context cache (``propose`` does it per request on new_from == 0)."""
        self._cache_k, self._cache_v = [], []
        self._cache_len = torch.zeros(batch_size, dtype=torch.int64)

    def _append_context(self, context: DraftContext, packed: Optional[PackedBackbone]) -> List[int]:
        """Projects the features of positions [new_from[b], lengths[b] - 1) into the cache
        (through ``packed``, the round's ``_packed_backbone``, or the modules); returns the
        requests' ends max(lengths[b] - 1, 0)."""
        if context.hidden_states is None:
            raise ValueError("DSparkDrafter needs the target's context features: build the target with "
                             f"hidden_layers={self.cfg.context_layers}")
        feats = context.hidden_states
        B = context.tokens.shape[0]
        device = feats.device
        # The bookkeeping in Python lists: a round's few requests, where each distinct torch op
        # costs tens of microseconds right after a target step has evicted its code from cache.
        new_from = context.new_from.tolist() if context.new_from is not None else [0] * B
        ends = [max(length - 1, 0) for length in context.lengths.tolist()]
        if self._cache_len.shape[0] != B or not self._cache_k or self._cache_k[0].device != device:
            self.reset(B)  # a new batch size, or the drafter moved to another device
        cached = [0 if start == 0 else length for start, length in zip(new_from, self._cache_len.tolist())]
        if cached != new_from:
            raise ValueError(f"context features skipped: cached up to {cached}, new features start at {new_from}")
        capacity = max(ends) + self.num_draft if B else 0  # room for a block after the context (block_slot)
        if not self._cache_k or self._cache_k[0].shape[1] < capacity:
            grown = max(capacity, 2 * (self._cache_k[0].shape[1] if self._cache_k else 128))
            shape = (B, grown, self.cfg.num_kv_heads, self.cfg.head_dim)
            old_k, old_v = self._cache_k, self._cache_v
            self._cache_k = [torch.zeros(shape, device=device) for _ in self.backbone.layers]
            self._cache_v = [torch.zeros(shape, device=device) for _ in self.backbone.layers]
            for i in range(len(old_k)):
                self._cache_k[i][:, :old_k[i].shape[1]] = old_k[i]
                self._cache_v[i][:, :old_v[i].shape[1]] = old_v[i]
        rows = [b for b in range(B) for _ in range(new_from[b], ends[b])]
        positions = [p for b in range(B) for p in range(new_from[b], ends[b])]
        self._cache_len = torch.tensor([max(c, e) for c, e in zip(cached, ends)], dtype=torch.int64)
        if not rows:
            return ends
        rows_d, pos_d = torch.tensor([rows, positions], dtype=torch.int64).to(device)
        self.backbone.feed_context(feats, rows_d, pos_d, max(positions), packed, self._cache_k, self._cache_v)
        return ends

    def propose(self, context: DraftContext) -> Draft:
        return self.propose_block(context, self.num_draft)

    @torch.no_grad()
    def propose_block(self, context: DraftContext, block: int) -> Draft:
        """Drafts ``block`` <= K positions: the backbone runs a block of that many rows (a
        cheaper round when only the first drafts will be verified). The block's rows attend to
        one another, so its drafts are not the full block's first ones; verification is shown
        the distributions they were drawn from, so either is lossless."""
        if not 1 <= block <= self.num_draft:
            raise ValueError(f"block must be in [1, {self.num_draft}], got {block}")
        B, K = context.tokens.shape[0], int(block)
        device = context.tokens.device
        packed = self._packed_backbone(device)
        ends = self._append_context(context, packed)
        last = (context.lengths - 1).to(device)
        anchors = context.tokens[torch.arange(B, device=device), last]
        S = int(self._cache_len.max())
        x = self.backbone.block_inputs(self.embedding, anchors, K)  # [B, K, D]
        positions = last[:, None] + torch.arange(K, device=device)
        caches = list(zip(self._cache_k, self._cache_v))
        context_lengths = self._cache_len.to(device)
        mask = None  # read only by layers that do not run as one dspark::draft_layer call
        if not self.backbone.fuses_every_layer(x, packed, context_lengths, caches):
            ctx_mask = torch.arange(S, device=device)[None] < context_lengths[:, None]  # [B, S]
            mask = torch.cat([ctx_mask[:, None, :].expand(B, K, S), torch.ones(B, K, K, dtype=torch.bool, device=device)], 2)
        h = self.backbone(x, positions, caches, mask, packed, block_slot=S, context_lengths=context_lengths,
                          largest=max(ends) + K - 1 if B else None)
        return self.draft_from_hidden(h, anchors, context)

    def _packed_backbone(self, device):
        """The backbone's projections packed for a drafting round on CPU (one read of each weight
        for the round's few rows; ``inference_backbone_dtype``), or None (the modules)."""
        if torch.device(device).type != "cpu" or self.inference_backbone_dtype is None:
            return None
        return self.backbone.packed(self.inference_backbone_dtype)

    def draft_from_hidden(self, h: torch.Tensor, anchors: torch.Tensor, context: DraftContext) -> Draft:
        """The block's hidden states h [B, K, D] -> base logits, then the K drafts through
        ``dspark::markov_draft`` (Markov head and confidence)."""
        device = h.device
        vocab = self.draft_vocab
        # The logits stay in the GEMM's dtype (bfloat16 on CPUs with AVX512-BF16): the op reads them
        # in its own dtype, and verify widens only the drafts it reads (Draft.verified_logits).
        base = self.drafting_logits(h, widen=vocab is None)
        previous = anchors.to(torch.int64)
        markov_dtype = torch.bfloat16 if self.inference_lm_head_dtype == torch.bfloat16 else torch.float32
        if self.markov is not None:
            # A bfloat16 Markov head reads half the bytes of W2 at each of the K steps (one
            # request: 1.0 ms against 2.0); l_k is then rounded to bfloat16, and verify is shown
            # exactly those logits, widened.
            w1, w2, w2_rows = self.drafting_markov_weights(markov_dtype)
        else:  # parallel-only: a zero Markov head = independent draws per position
            markov_dtype = torch.float32
            w1 = w2 = torch.zeros(base.shape[-1] + (vocab is not None), 1, device=device)
        conf_args = (None, None, None)
        if self.confidence is not None:
            conf_args = self.confidence.op_arguments(h)
            if self.markov is None:
                conf_args = (conf_args[0], torch.zeros(1, device=device), conf_args[2])
        if vocab is not None:
            # Over the draft vocabulary the anchor (any id) has no row: its transition and
            # confidence terms join position 1's base here, and the op sees the zero row N
            # (logit -inf) as every position's "previous token" row.
            N = vocab.numel()
            logits_in = self._drafting_logits_buffer(base.shape[:-1], N, markov_dtype, device)
            logits_in[..., :N] = base  # U rounded to the op's dtype
            if self.markov is not None:
                anchor_w1 = self.markov_weights(markov_dtype)[0][previous].float()  # [B, r]
                # As the op does it: U in the logits' dtype plus the float32 transition, rounded once
                # (add_ computes in float32, the common dtype, and rounds into the buffer).
                logits_in[:, 0, :N].add_(self.anchor_transition(anchor_w1, w2_rows))
                if conf_args[1] is not None:  # conf_base is op_arguments' own new tensor
                    conf_args[0][:, 0] += anchor_w1 @ conf_args[1]
            base = logits_in
            previous = torch.full_like(previous, N)
        token_ids, logits, confidence = torch.ops.dspark.markov_draft(
            base.to(markov_dtype), previous, w1, w2, context.temperature.float(), context.seed, context.offset,
            *conf_args)
        if vocab is not None:  # back to vocabulary ids; q = 0 outside the draft vocabulary (logit_ids)
            token_ids = vocab[token_ids.clamp(max=vocab.numel() - 1)]  # a bounds guard: the -inf id N is never drawn
            logits = logits[..., :-1]
        return Draft(token_ids=token_ids, logits=logits, logit_ids=vocab,
                     confidence=confidence if self.confidence is not None else None)

    # ---------------------------------------------------------------- persistence
    def save(self, folder, dtype: torch.dtype = torch.float16) -> None:
        """``folder/config.json`` (config, SPS profile, STS temperatures) and
        ``folder/model.safetensors`` (the drafter's own weights in ``dtype``; the target's
        embedding and LM head are not stored)."""
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        if self.confidence is not None and self.confidence.sts_temperature.numel():
            self.cfg.sts_temperature = [float(t) for t in self.confidence.sts_temperature]
            self.cfg.sts_bias = [float(b) for b in self.confidence.sts_bias] or None
        state = {k: (v.to(dtype) if v.is_floating_point() and k != "confidence.sts_temperature" else v)
                 .detach().cpu().contiguous() for k, v in self.state_dict().items()}
        save_file(state, str(folder / WEIGHTS_FILE))
        (folder / CONFIG_FILE).write_text(json.dumps(asdict(self.cfg), indent=1))
        if self.draft_vocab_ranking is not None:
            (folder / DRAFT_VOCAB_FILE).write_text(json.dumps(self.draft_vocab_ranking))

    @classmethod
    def load(cls, folder, embedding: torch.Tensor, lm_head: Optional[torch.Tensor] = None,
             device=None) -> "DSparkDrafter":
        """A drafter saved by ``save``, on the target's ``embedding`` / ``lm_head`` (float32 compute)."""
        from safetensors.torch import load_file

        folder = Path(folder)
        cfg = DrafterConfig(**json.loads((folder / CONFIG_FILE).read_text()))
        drafter = cls(cfg, embedding, lm_head)
        state = {k: (v.float() if v.is_floating_point() else v) for k, v in load_file(str(folder / WEIGHTS_FILE)).items()}
        drafter.load_state_dict(state)
        drafter = drafter.to(device or embedding.device).eval()
        drafter.inference_lm_head_dtype = fast_lm_head_dtype(drafter.embedding.device)
        # A drafting round streams the backbone's weights from memory: bfloat16 halves the bytes
        # (skinny_linear widens them exactly on any CPU), at no measurable cost in acceptance.
        drafter.inference_backbone_dtype = torch.bfloat16
        if (folder / DRAFT_VOCAB_FILE).is_file():
            drafter.set_draft_vocabulary(json.loads((folder / DRAFT_VOCAB_FILE).read_text()), cfg.draft_vocab_size)
        elif cfg.draft_vocab_size:
            raise ValueError(f"{folder}: config.json drafts from {cfg.draft_vocab_size} ids, but {DRAFT_VOCAB_FILE} is missing")
        if drafter.lm_head.device.type == "cpu":  # pack now (~60 ms), not in the first drafting round
            dtype = drafter.inference_lm_head_dtype or torch.float32
            drafter.packed_lm_head(dtype) if drafter.draft_vocab is None else drafter.drafting_head(dtype)
            drafter.backbone.packed(drafter.inference_backbone_dtype)
        return drafter

    @classmethod
    def for_target(cls, folder, target) -> "DSparkDrafter":
        """``load`` on a ``LlamaTarget``'s embedding and LM head."""
        w = target.model.weights
        return cls.load(folder, w.embed.float(), w.lm_head.float(), device=target.device)
