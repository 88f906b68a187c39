"""A small, exact Llama forward (gpt-fast style) with its own per-request KV cache.

It runs B requests at once over a *packed ragged* batch of new tokens (``token_ids`` [T] with
``cu_seqlens`` [B + 1], the layout of ``dspark_ext.protocols``): the projections, MLP and LM
head work on the packed rows [T, D]; only attention pads the queries to [B, Tmax]. Request b's
new tokens sit at positions ``cache.lengths[b] + t``; their K/V are scattered into a
preallocated cache ``[B, n_kv, capacity, head_dim]`` per layer (capacity doubles when needed),
and a boolean mask (key index < length + t + 1) hides both the future and any stale entries
left behind by a rewind, so rewinding is just setting the lengths.

Weights come from a Hugging Face ``LlamaForCausalLM`` (``Llama.from_hf(model)``); the math
follows transformers' Llama (rotate_half RoPE, RMSNorm in float32, SwiGLU, GQA), so logits
agree with it to float rounding. Static RoPE variants (default, linear, llama3, yarn) are taken
over as HF's precomputed ``inv_freq``/``attention_scaling``; position-dependent ones (dynamic,
longrope) are refused.
"""

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from dspark_ext.packed_linear import SKINNY_MAX_ROWS, FusedLinear


@dataclass
class LlamaConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = False
    max_position: int = 2048

    @classmethod
    def from_hf(cls, config) -> "LlamaConfig":
        rope = getattr(config, "rope_parameters", None) or {}
        theta = rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))
        heads = config.num_attention_heads
        return cls(
            vocab_size=config.vocab_size,
            hidden_size=config.hidden_size,
            intermediate_size=config.intermediate_size,
            num_layers=config.num_hidden_layers,
            num_heads=heads,
            num_kv_heads=getattr(config, "num_key_value_heads", None) or heads,
            head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads,
            rope_theta=float(theta),
            rms_norm_eps=config.rms_norm_eps,
            tie_word_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
            max_position=getattr(config, "max_position_embeddings", 2048),
        )


@dataclass
class LayerWeights:
    attn_norm: torch.Tensor  # [D]
    wq: torch.Tensor  # [H * hd, D]
    wk: torch.Tensor  # [n_kv * hd, D]
    wv: torch.Tensor  # [n_kv * hd, D]
    wo: torch.Tensor  # [D, H * hd]
    mlp_norm: torch.Tensor  # [D]
    w_gate: torch.Tensor  # [I, D]
    w_up: torch.Tensor  # [I, D]
    w_down: torch.Tensor  # [D, I]
    bq: Optional[torch.Tensor] = None  # attention_bias=True variants
    bk: Optional[torch.Tensor] = None
    bv: Optional[torch.Tensor] = None
    bo: Optional[torch.Tensor] = None


@dataclass
class LayerLinears:
    """A layer's projections as the forward runs them: q/k/v and gate/up fused."""

    qkv: FusedLinear
    o: FusedLinear
    gate_up: FusedLinear
    down: FusedLinear

    @classmethod
    def of(cls, lw: LayerWeights, max_skinny_rows: int) -> "LayerLinears":
        return cls(qkv=FusedLinear([(lw.wq, lw.bq), (lw.wk, lw.bk), (lw.wv, lw.bv)], max_skinny_rows),
                   o=FusedLinear([(lw.wo, lw.bo)], max_skinny_rows),
                   gate_up=FusedLinear([(lw.w_gate, None), (lw.w_up, None)], max_skinny_rows),
                   down=FusedLinear([(lw.w_down, None)], max_skinny_rows))


@dataclass
class LlamaWeights:
    embed: torch.Tensor  # [V, D]
    layers: List[LayerWeights]
    norm: torch.Tensor  # [D]
    lm_head: torch.Tensor  # [V, D] (the embedding itself when tied)


class KVCache:
    """K/V per layer as [B, n_kv, capacity, head_dim]; ``lengths`` [B] int64 valid entries."""

    def __init__(self, config: LlamaConfig, batch: int, capacity: int, dtype, device):
        shape = (batch, config.num_kv_heads, max(int(capacity), 1), config.head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_layers)]
        self.lengths = torch.zeros(batch, dtype=torch.int64, device=device)

    @property
    def batch(self) -> int:
        return self.lengths.shape[0]

    @property
    def capacity(self) -> int:
        return self.k[0].shape[2]

    def reserve(self, needed: int) -> None:
        """Grow the capacity (doubling) to hold at least ``needed`` positions per request."""
        cap = self.capacity
        if needed <= cap:
            return
        while cap < needed:
            cap *= 2
        for cache in (self.k, self.v):
            for i, old in enumerate(cache):
                new = old.new_zeros(old.shape[:2] + (cap,) + old.shape[3:])
                new[:, :, : old.shape[2]] = old
                cache[i] = new


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # As transformers' LlamaRMSNorm: normalize in float32, cast back, then scale.
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def lm_head_logits(x: torch.Tensor, lm_head: torch.Tensor) -> torch.Tensor:
    """``x @ lm_head.T`` for a few rows x [T, D] against a vocabulary-sized lm_head [V, D]. For
    T < 16, computing it as ``lm_head @ x.T`` avoids GEMM packing the whole [V, D] matrix on every
    call (oneDNN/MKL on CPU: 8 rows of SmolLM2's head take ~10 ms instead of ~35 ms)."""
    if x.dim() == 2 and x.shape[0] < 16 and x.device.type == "cpu":
        return (lm_head @ x.T).T
    return F.linear(x, lm_head)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


#: Cost model of one attention call on CPU (microseconds, one layer; SmolLM2's 9 query and 3 K/V
#: heads of 64 dimensions, torch 2.13's SDPA, a 2-core AVX-512 machine): a fixed cost per call,
#: a cost per (request, key) read and a cost per (padded query row, key). The per-key costs are
#: fitted on calls of 1-8 rows per request at 400 keys; the call cost was tuned on the target's
#: steps at batch 4 (at 25 us a step of 1 + 1 + 8 + 1 tokens splits in three and took 0.935x the
#: time of one call; at 45 us it split in two and took 0.971x).
ATTENTION_CALL_US = 25.0
ATTENTION_KEY_US = 0.034
ATTENTION_QUERY_KEY_US = 0.0142


def attention_cost(requests: int, rows: int, keys: int) -> float:
    """Modelled cost of one attention call over ``requests`` requests padded to ``rows`` queries
    and ``keys`` keys each."""
    return ATTENTION_CALL_US + requests * keys * (ATTENTION_KEY_US + rows * ATTENTION_QUERY_KEY_US)


#: Steps of at most this many new tokens per request attend through ``dspark::cached_attention``
#: on CPU in float32 (one read of each request's cache for all its rows; batch-invariant); longer
#: ones (a prompt) through SDPA. 0 = always SDPA.
MAX_CACHED_ATTENTION_ROWS = 16


#: Past this many requests in a step, attention runs as one call (the split is chosen in Python
#: every forward, in time quadratic in the batch).
MAX_SPLIT_BATCH = 32


def attention_segments(counts: Sequence[int], key_counts: Sequence[int], device=None) -> List[Tuple[int, int]]:
    """Contiguous runs [b0, b1) of requests whose attention runs as one call each, for a step that
    appends ``counts[b]`` tokens to request b (``key_counts[b]`` keys after it).

    One call pads every request's queries to the longest request's, and CPU attention pays for
    every padded row: with SmolLM2 at 400 tokens of context and batch 4, a step of 8 + 1 + 1 + 1
    tokens cost 50.9 ms in one call and 47.4 ms split as [8] [1 + 1 + 1] (3 + 3 + 3 + 2: 47.6 ms;
    ``bench/bench_attention_split.py``).
    The split that minimises ``attention_cost`` is found by dynamic programming over the split
    points. One call for steps whose requests all have as many tokens, for more than
    ``MAX_SPLIT_BATCH`` requests, and on other devices."""
    B = len(counts)
    if (B <= 1 or B > MAX_SPLIT_BATCH or len(set(counts)) == 1
            or (device is not None and torch.device(device).type != "cpu")):
        return [(0, B)]
    best = [0.0] + [float("inf")] * B  # best[b]: the cheapest cost of requests [0, b)
    split = [0] * (B + 1)
    for b1 in range(1, B + 1):
        rows = keys = 0
        for b0 in range(b1 - 1, -1, -1):  # segments [b0, b1), growing to the left
            rows, keys = max(rows, counts[b0]), max(keys, key_counts[b0])
            c = best[b0] + attention_cost(b1 - b0, rows, keys)
            if c < best[b1]:
                best[b1], split[b1] = c, b0
    segments, b1 = [], B
    while b1 > 0:
        segments.append((split[b1], b1))
        b1 = split[b1]
    return segments[::-1]


@dataclass
class _AttentionSegment:
    """Requests [b0, b1) attended in one call: their packed rows [r0, r1), each row's request and
    offset within the segment, and the mask [b1 - b0, 1, Tmax, Kmax] (query t of request b sees
    keys < length_b + t + 1; a padding query still sees key 0, so its discarded output is finite)."""

    b0: int
    b1: int
    r0: int
    r1: int
    tmax: int
    kmax: int
    row_b: Optional[torch.Tensor]  # None when every request has tmax rows: no padding
    row_t: Optional[torch.Tensor]
    mask: torch.Tensor

    @classmethod
    def of(cls, b0: int, b1: int, counts: Sequence[int], key_counts: Sequence[int], lengths: torch.Tensor,
           row_b: torch.Tensor, row_t: torch.Tensor) -> "_AttentionSegment":
        """The segment of requests [b0, b1) of a step whose packed rows belong to requests
        ``row_b`` at offsets ``row_t`` (the forward's row bookkeeping)."""
        dev = lengths.device
        tmax, kmax = max(counts[b0:b1]), max(key_counts[b0:b1])
        r0, r1 = sum(counts[:b0]), sum(counts[:b1])
        padded = r1 - r0 != (b1 - b0) * tmax
        q_limit = lengths[b0:b1, None] + torch.arange(tmax, device=dev)[None, :] + 1  # [b1 - b0, Tmax]
        mask = (torch.arange(kmax, device=dev)[None, None, :] < q_limit[:, :, None])[:, None]
        return cls(b0, b1, r0, r1, tmax, kmax, row_b[r0:r1] - b0 if padded else None,
                   row_t[r0:r1] if padded else None, mask)

    def attend(self, q: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor, gqa: bool) -> torch.Tensor:
        """Attention output [r1 - r0, H, hd] of the segment's rows of q [T, H, hd]."""
        _, H, hd = q.shape
        if self.row_b is None:
            qp = q[self.r0:self.r1].view(self.b1 - self.b0, self.tmax, H, hd)
        else:
            qp = q.new_zeros(self.b1 - self.b0, self.tmax, H, hd)
            qp[self.row_b, self.row_t] = q[self.r0:self.r1]
        # enable_gqa: the query heads share their K/V head in place (repeating the cache per
        # head copied it whole every layer: 17% of a 4-request step at 400 tokens of context).
        o = F.scaled_dot_product_attention(qp.transpose(1, 2), kc[self.b0:self.b1, :, :self.kmax],
                                           vc[self.b0:self.b1, :, :self.kmax], attn_mask=self.mask, enable_gqa=gqa)
        o = o.transpose(1, 2)
        return o.reshape(-1, H, hd) if self.row_b is None else o[self.row_b, self.row_t]


class Llama:
    """Llama weights + the packed ragged forward. ``hidden_layers`` in ``forward`` follows
    transformers' ``output_hidden_states`` numbering: 0 = embeddings, i = output of decoder
    layer i (1-based), ``num_layers`` or -1 = the final norm output.

    Float32 on CPU, steps of at most ``max_skinny_rows`` new tokens run their projections and LM
    head through ``dspark::skinny_linear`` on weights packed here (a second copy of them), so
    verifying eight tokens costs about what decoding one does; 0 = always the BLAS GEMM. Steps of
    at most ``max_cached_attention_rows`` tokens per request attend through
    ``dspark::cached_attention`` (0 = always SDPA). Both ops are batch-invariant, so a token's
    logits and features are the same bits whether the target decodes it alone or verifies it
    with others (``tests/test_targets.py``)."""

    def __init__(self, config: LlamaConfig, weights: LlamaWeights,
                 inv_freq: Optional[torch.Tensor] = None, attention_scaling: float = 1.0,
                 max_skinny_rows: int = SKINNY_MAX_ROWS, max_cached_attention_rows: int = MAX_CACHED_ATTENTION_ROWS):
        self.config = config
        self.max_cached_attention_rows = int(max_cached_attention_rows)
        self.weights = weights
        self.linears = [LayerLinears.of(lw, max_skinny_rows) for lw in weights.layers]
        self.lm_head = FusedLinear([(weights.lm_head, None)], max_skinny_rows)
        self.dtype = weights.embed.dtype
        self.device = weights.embed.device
        if inv_freq is None:
            hd = config.head_dim
            inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float) / hd))
        self.inv_freq = inv_freq.float().to(self.device)
        self.attention_scaling = float(attention_scaling)

    # ---------------------------------------------------------------- construction
    @classmethod
    def from_hf(cls, model, dtype: torch.dtype = torch.float32, device=None,
                max_skinny_rows: int = SKINNY_MAX_ROWS,
                max_cached_attention_rows: int = MAX_CACHED_ATTENTION_ROWS) -> "Llama":
        """Build from a transformers ``LlamaForCausalLM`` (its weights are copied/cast)."""
        hf = model.config
        config = LlamaConfig.from_hf(hf)
        rope = getattr(hf, "rope_parameters", None) or getattr(hf, "rope_scaling", None) or {}
        rope_type = rope.get("rope_type", rope.get("type", "default")) or "default"
        if rope_type in ("dynamic", "longrope"):
            raise ValueError(f"Llama.from_hf: rope_type {rope_type!r} (position-dependent) is not supported")
        device = torch.device(device) if device is not None else next(model.parameters()).device
        sd = model.state_dict()

        def get(name, required=True):
            t = sd.get(name)
            if t is None:
                if required:
                    raise KeyError(f"Llama.from_hf: missing weight {name!r}")
                return None
            return t.detach().to(device=device, dtype=dtype).contiguous()

        layers = []
        for i in range(config.num_layers):
            p = f"model.layers.{i}."
            layers.append(LayerWeights(
                attn_norm=get(p + "input_layernorm.weight"),
                wq=get(p + "self_attn.q_proj.weight"), wk=get(p + "self_attn.k_proj.weight"),
                wv=get(p + "self_attn.v_proj.weight"), wo=get(p + "self_attn.o_proj.weight"),
                mlp_norm=get(p + "post_attention_layernorm.weight"),
                w_gate=get(p + "mlp.gate_proj.weight"), w_up=get(p + "mlp.up_proj.weight"),
                w_down=get(p + "mlp.down_proj.weight"),
                bq=get(p + "self_attn.q_proj.bias", False), bk=get(p + "self_attn.k_proj.bias", False),
                bv=get(p + "self_attn.v_proj.bias", False), bo=get(p + "self_attn.o_proj.bias", False),
            ))
            if getattr(hf, "mlp_bias", False):
                raise ValueError("Llama.from_hf: mlp_bias=True is not supported")
        embed = get("model.embed_tokens.weight")
        lm_head = get("lm_head.weight", required=False)
        weights = LlamaWeights(embed=embed, layers=layers, norm=get("model.norm.weight"),
                               lm_head=embed if lm_head is None else lm_head)
        rotary = model.model.rotary_emb
        return cls(config, weights, inv_freq=rotary.inv_freq.detach().to(device),
                   attention_scaling=getattr(rotary, "attention_scaling", 1.0), max_skinny_rows=max_skinny_rows,
                   max_cached_attention_rows=max_cached_attention_rows)

    def new_cache(self, batch: int, capacity: int = 256) -> KVCache:
        return KVCache(self.config, batch, capacity, self.dtype, self.device)

    # ---------------------------------------------------------------- forward
    @torch.no_grad()
    def forward(self, token_ids: torch.Tensor, cu_seqlens: torch.Tensor, cache: KVCache,
                hidden_layers: Optional[Sequence[int]] = None, return_logits: bool = True
                ) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
        """Append request b's tokens ``token_ids[cu_seqlens[b]:cu_seqlens[b+1]]`` to its cache
        and return (logits [T, V] float32, or None without ``return_logits``; hidden
        [T, len(hidden_layers) * D] or None)."""
        cfg, w = self.config, self.weights
        dev = self.device
        token_ids = token_ids.to(dev, torch.int64)
        cu = cu_seqlens.to(dev, torch.int64)
        B, T = cache.batch, token_ids.shape[0]
        H, KVH, hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        n_new = cu[1:] - cu[:-1]  # [B]

        hidden_idx = None
        if hidden_layers is not None:
            hidden_idx = [cfg.num_layers if i == -1 else int(i) for i in hidden_layers]
            if any(i < 0 or i > cfg.num_layers for i in hidden_idx):
                raise ValueError(f"hidden_layers must be in [-1, {cfg.num_layers}], got {list(hidden_layers)}")
        if T == 0:
            hid = None if hidden_idx is None else torch.empty(0, len(hidden_idx) * cfg.hidden_size, device=dev)
            return torch.empty(0, cfg.vocab_size, device=dev), hid

        # Row bookkeeping: request, in-request offset and absolute position of each packed row.
        row_b = torch.repeat_interleave(torch.arange(B, device=dev), n_new, output_size=T)
        row_t = torch.arange(T, device=dev) - cu[row_b]
        row_pos = cache.lengths[row_b] + row_t
        # One host sync per forward for the shapes (each request's new tokens and keys).
        counts, key_counts = torch.stack([n_new, cache.lengths + n_new]).tolist()
        cache.reserve(max(key_counts))

        # RoPE tables for the packed rows: [T, 1, hd].
        freqs = row_pos.float()[:, None] * self.inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        cos = (emb.cos() * self.attention_scaling).to(self.dtype)[:, None, :]
        sin = (emb.sin() * self.attention_scaling).to(self.dtype)[:, None, :]

        # A step of a few rows per request attends through dspark::cached_attention; a prompt
        # (and any other device or dtype) once per segment of requests (attention_segments:
        # usually one, the whole batch), with each segment's queries padded to its longest request.
        cached_attention = (dev.type == "cpu" and self.dtype == torch.float32
                            and max(counts) <= self.max_cached_attention_rows)
        segments = [] if cached_attention else [
            _AttentionSegment.of(b0, b1, counts, key_counts, cache.lengths, row_b, row_t)
            for b0, b1 in attention_segments(counts, key_counts, dev)]
        scale = hd ** -0.5

        x = F.embedding(token_ids, w.embed)  # [T, D]
        hiddens = {}
        if hidden_idx is not None and 0 in hidden_idx:
            hiddens[0] = x
        for li, (lw, lin) in enumerate(zip(w.layers, self.linears)):
            h = _rms_norm(x, lw.attn_norm, cfg.rms_norm_eps)
            q, k, v = lin.qkv(h)
            q, k, v = q.reshape(T, H, hd), k.reshape(T, KVH, hd), v.reshape(T, KVH, hd)
            q = q * cos + _rotate_half(q) * sin
            k = k * cos + _rotate_half(k) * sin
            # Scatter the new K/V at (request, position); then attend over the first kmax slots.
            kc, vc = cache.k[li], cache.v[li]
            kc[row_b, :, row_pos] = k
            vc[row_b, :, row_pos] = v
            if cached_attention:
                o = torch.ops.dspark.cached_attention(q, kc, vc, cu, cache.lengths, scale).reshape(T, H * hd)
            else:
                outputs = [segment.attend(q, kc, vc, KVH != H) for segment in segments]
                o = (outputs[0] if len(outputs) == 1 else torch.cat(outputs)).reshape(T, H * hd)  # packed rows
            x = x + lin.o(o)[0]
            h = _rms_norm(x, lw.mlp_norm, cfg.rms_norm_eps)
            gate, up = lin.gate_up(h)
            x = x + lin.down(F.silu(gate) * up)[0]
            if hidden_idx is not None and (li + 1) in hidden_idx and li + 1 < cfg.num_layers:
                hiddens[li + 1] = x
        x = _rms_norm(x, w.norm, cfg.rms_norm_eps)
        hiddens[cfg.num_layers] = x
        cache.lengths = cache.lengths + n_new
        logits = None
        if return_logits:
            few = x.shape[0] <= self.lm_head.max_skinny_rows
            logits = (self.lm_head(x)[0] if few else lm_head_logits(x, w.lm_head)).float()
        hid = None
        if hidden_idx is not None:
            hid = torch.cat([hiddens[i] for i in hidden_idx], dim=-1)
        return logits, hid

    __call__ = forward
