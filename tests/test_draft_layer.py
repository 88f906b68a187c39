"""dspark::draft_layer: one pre-norm decoder layer of a DSpark drafter's backbone over a drafting
round's block, in one CPU call.

Its contract, checked here:
- it computes what the layer's own ops compute (``BackboneLayer.forward``, packed projections)
  within float32 rounding, for GQA ratios 1-3, with and without Qwen3's q/k norms, float32 and
  bfloat16 packing, ragged contexts (an empty one included) and stale cache rows between a
  request's context and the block slot, which the mask must hide;
- it writes the block's keys and values at ``block_slot .. block_slot + Q`` and nowhere else;
- with ``final_norm`` (the backbone's last layer) its output is that norm of the layer's;
- bad input raises naming the argument; opcheck.
"""

import pytest
import torch

from dspark_ext.drafters.dspark import BackboneLayer, DrafterConfig, rotary_tables
from dspark_ext.ops import draft_layer


def _layer(H, KVH, hd, qk_norm, seed):
    cfg = DrafterConfig(vocab_size=32, hidden_size=48, intermediate_size=80, num_heads=H, num_kv_heads=KVH,
                        head_dim=hd, context_layers=[0], num_layers=1, num_draft=4, qk_norm=qk_norm)
    torch.manual_seed(seed)
    layer = BackboneLayer(cfg)
    with torch.no_grad():
        for norm in (layer.attn_norm, layer.mlp_norm, layer.q_norm, layer.k_norm):
            if norm is not None:
                norm.weight.uniform_(0.5, 1.5)
    return cfg, layer


def _case(cfg, lengths, block_slot, Q, seed):
    g = torch.Generator().manual_seed(seed)
    B = len(lengths)
    C = block_slot + Q + 3
    keys = torch.randn(B, C, cfg.num_kv_heads, cfg.head_dim, generator=g)
    values = torch.randn(B, C, cfg.num_kv_heads, cfg.head_dim, generator=g)
    for b, n in enumerate(lengths):
        keys[b, n:block_slot], values[b, n:block_slot] = 1e4, -1e4  # stale rows the mask must hide
    keys[:, block_slot + Q:], values[:, block_slot + Q:] = float("nan"), float("nan")  # never read
    x = torch.randn(B, Q, cfg.hidden_size, generator=g)
    positions = torch.tensor(lengths)[:, None] + torch.arange(Q)
    return x, positions, keys, values, torch.tensor(lengths, dtype=torch.int64)


def _reference(layer, packed, x, positions, keys, values, lengths, block_slot):
    """The layer's own ops on the same packing (the concatenating path, no draft_layer)."""
    B, Q = x.shape[:2]
    mask = torch.cat([(torch.arange(block_slot)[None] < lengths[:, None])[:, None].expand(B, Q, block_slot),
                      torch.ones(B, Q, Q, dtype=torch.bool)], 2)
    inv_freq = 1.0 / (100000.0 ** (torch.arange(0, layer.head_dim, 2).float() / layer.head_dim))
    with torch.no_grad():
        out = layer(x, positions, inv_freq, keys[:, :block_slot].clone(), values[:, :block_slot].clone(), mask, packed)
    return out, inv_freq


def _call(layer, packed, x, positions, inv_freq, keys, values, lengths, block_slot, final_norm=None):
    cos, sin = rotary_tables(positions, inv_freq)
    return draft_layer(x, cos.squeeze(-2), sin.squeeze(-2), keys, values, lengths, block_slot,
                       layer.attn_norm.weight.detach(), packed.qkv.packed,
                       None if layer.q_norm is None else layer.q_norm.weight.detach(),
                       None if layer.k_norm is None else layer.k_norm.weight.detach(), packed.o.packed,
                       layer.mlp_norm.weight.detach(), packed.gate_up.packed, packed.down.packed, layer.num_heads,
                       layer.attn_norm.eps, final_norm)


CASES = [  # (H, KVH, hd, qk_norm, lengths, block_slot, Q, packed dtype)
    (6, 2, 16, True, [5, 0, 9], 9, 4, torch.float32),
    (4, 4, 8, False, [3, 7], 12, 7, torch.float32),
    (9, 3, 16, True, [1], 1, 2, torch.float32),
    (6, 2, 16, True, [4, 11, 2, 8], 11, 7, torch.bfloat16),
]


@pytest.mark.parametrize("H,KVH,hd,qk_norm,lengths,block_slot,Q,dtype", CASES)
def test_matches_the_layers_own_ops(H, KVH, hd, qk_norm, lengths, block_slot, Q, dtype):
    cfg, layer = _layer(H, KVH, hd, qk_norm, seed=H + Q)
    packed = layer.packed(dtype)
    x, positions, keys, values, ctx = _case(cfg, lengths, block_slot, Q, seed=block_slot)
    expected, inv_freq = _reference(layer, packed, x, positions, keys, values, ctx, block_slot)
    before_keys, before_values = keys.clone(), values.clone()
    out = _call(layer, packed, x, positions, inv_freq, keys, values, ctx, block_slot)
    assert out.shape == x.shape and out.dtype == torch.float32
    torch.testing.assert_close(out, expected, rtol=2e-5, atol=2e-5)
    # The block's keys and values went to block_slot .. block_slot + Q, and nothing else moved.
    outside = torch.ones(keys.shape[1], dtype=torch.bool)
    outside[block_slot:block_slot + Q] = False
    assert torch.equal(keys[:, outside].nan_to_num(7.0), before_keys[:, outside].nan_to_num(7.0))
    assert torch.equal(values[:, outside].nan_to_num(7.0), before_values[:, outside].nan_to_num(7.0))
    assert bool(torch.isfinite(keys[:, block_slot:block_slot + Q]).all())
    assert not torch.equal(keys[:, block_slot:block_slot + Q], before_keys[:, block_slot:block_slot + Q])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_final_norm_is_the_norm_of_the_layers_output(dtype):
    """``final_norm``: the backbone's final RMSNorm of the layer's output, in the same call; a
    norm weight of ones is told apart from the real one."""
    cfg, layer = _layer(6, 2, 16, True, seed=11)
    packed = layer.packed(dtype)
    x, positions, keys, values, ctx = _case(cfg, [5, 0, 9], 9, 4, seed=12)
    _, inv_freq = _reference(layer, packed, x, positions, keys, values, ctx, 9)
    norm = torch.nn.RMSNorm(cfg.hidden_size, eps=layer.attn_norm.eps)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)

    def call(final_norm=None):
        return _call(layer, packed, x, positions, inv_freq, keys.clone(), values.clone(), ctx, 9, final_norm)

    plain = call()
    normed = call(norm.weight.detach())
    with torch.no_grad():
        torch.testing.assert_close(normed, norm(plain), rtol=2e-5, atol=2e-5)
        assert not torch.allclose(normed, torch.nn.functional.rms_norm(plain, (cfg.hidden_size,), eps=norm.eps),
                                  rtol=1e-3, atol=1e-3)
    with pytest.raises(RuntimeError, match="final_norm must have size 48"):
        call(norm.weight.detach()[:40])


def test_a_wrong_mask_is_told_apart():
    """The check above is sharp: reading the stale rows between a context and the block slot (a
    context length past the request's real one) moves the output far beyond its tolerance."""
    cfg, layer = _layer(6, 2, 16, True, seed=1)
    packed = layer.packed(torch.float32)
    x, positions, keys, values, ctx = _case(cfg, [5, 0, 9], 9, 4, seed=2)
    expected, inv_freq = _reference(layer, packed, x, positions, keys, values, ctx, 9)
    out = _call(layer, packed, x, positions, inv_freq, keys, values, torch.tensor([6, 0, 9]), 9)
    assert not torch.allclose(out[0], expected[0], rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(out[1:], expected[1:], rtol=2e-5, atol=2e-5)


def test_bad_input_names_the_argument():
    cfg, layer = _layer(6, 2, 16, True, seed=1)
    packed = layer.packed(torch.float32)
    x, positions, keys, values, ctx = _case(cfg, [5, 0, 9], 9, 4, seed=2)
    _, inv_freq = _reference(layer, packed, x, positions, keys, values, ctx, 9)

    def call(**change):
        args = dict(x=x, keys=keys, values=values, ctx=ctx, block_slot=9, packed=packed)
        args.update(change)
        return _call(layer, args["packed"], args["x"], positions, inv_freq, args["keys"], args["values"], args["ctx"],
                     args["block_slot"])

    with pytest.raises(RuntimeError, match="block_slot"):
        call(block_slot=keys.shape[1] - 3)
    with pytest.raises(RuntimeError, match=r"context_lengths\[1\]"):
        call(ctx=torch.tensor([5, 10, 9]))
    with pytest.raises(RuntimeError, match="context_lengths\\[0\\]"):
        call(ctx=torch.tensor([-1, 0, 9]))
    with pytest.raises(RuntimeError, match="x must be Float"):
        call(x=x.double())
    with pytest.raises(RuntimeError, match="key_cache must be 4-D"):
        call(keys=keys[0])
    with pytest.raises(RuntimeError, match="value_cache must have key_cache's shape"):
        call(values=values[:, :-1].contiguous())
    with pytest.raises(RuntimeError, match="must be contiguous"):
        call(keys=keys.transpose(2, 3).contiguous().transpose(2, 3))
    with pytest.raises(RuntimeError, match="key_cache must have size 3"):
        call(keys=keys[:2].contiguous(), values=values[:2].contiguous())
    other = _layer(6, 2, 16, True, seed=1)[1]
    other.up = torch.nn.Linear(48, 96, bias=False)
    other.gate = torch.nn.Linear(48, 96, bias=False)
    with pytest.raises(RuntimeError, match="gate_up_weight"):
        call(packed=type(packed)(qkv=packed.qkv, o=packed.o, gate_up=other.packed(torch.float32).gate_up,
                                 down=packed.down, context_kv=packed.context_kv))
    with pytest.raises(RuntimeError, match="context_lengths must be"):
        call(ctx=ctx.int())


def test_opcheck():
    cfg, layer = _layer(6, 2, 16, True, seed=3)
    packed = layer.packed(torch.float32)
    x, positions, keys, values, ctx = _case(cfg, [5, 0, 9], 9, 4, seed=4)
    keys, values = keys.nan_to_num(0.0), values.nan_to_num(0.0)
    _, inv_freq = _reference(layer, packed, x, positions, keys, values, ctx, 9)
    cos, sin = rotary_tables(positions, inv_freq)
    args = (x, cos.squeeze(-2).contiguous(), sin.squeeze(-2).contiguous(), keys, values, ctx, 9,
            layer.attn_norm.weight.detach(), packed.qkv.packed, layer.q_norm.weight.detach(),
            layer.k_norm.weight.detach(), packed.o.packed, layer.mlp_norm.weight.detach(), packed.gate_up.packed,
            packed.down.packed, 6, 1e-5)
    torch.library.opcheck(torch.ops.dspark.draft_layer, args)
    torch.library.opcheck(torch.ops.dspark.draft_layer, args + (layer.mlp_norm.weight.detach(),))


def test_strided_operands_read_as_their_values():
    """Norm weights, packed weights and the input as strided views (every operand is read as
    its values, not as its memory)."""
    cfg, layer = _layer(6, 2, 16, True, seed=5)
    packed = layer.packed(torch.bfloat16)
    x, positions, keys, values, ctx = _case(cfg, [5, 0, 9], 9, 4, seed=6)
    _, inv_freq = _reference(layer, packed, x, positions, keys, values, ctx, 9)
    cos, sin = rotary_tables(positions, inv_freq)

    def strided(t):  # the same values in a transposed (non-contiguous) layout
        return t.transpose(0, -1).contiguous().transpose(0, -1) if t.dim() > 1 else t.repeat_interleave(2)[::2]

    def run(view):
        args = [x, cos.squeeze(-2), sin.squeeze(-2), keys.clone(), values.clone(), ctx, 9, layer.attn_norm.weight.detach(),
                packed.qkv.packed, layer.q_norm.weight.detach(), layer.k_norm.weight.detach(), packed.o.packed,
                layer.mlp_norm.weight.detach(), packed.gate_up.packed, packed.down.packed, 6, 1e-5]
        for i in (0, 1, 2, 7, 8, 9, 10, 11, 12, 13, 14):
            args[i] = view(args[i])
        assert view is not strided or not args[8].is_contiguous()
        return draft_layer(*args)

    assert torch.equal(run(strided), run(lambda t: t))
