"""dspark::draft_context: a DSpark drafting round's context feed (the target's features through the
context projection and norm, then every layer's k/v projection, key norm and RoPE, into its caches)
in one CPU call.

Its contract, checked here:
- it writes what ``DSparkBackbone.project_context`` + ``context_kv`` compute (the Python path)
  within float32 rounding, for one and two layers, GQA ratios 1-3, with and without Qwen3's key
  norm, float32 and bfloat16 packing, features read through strides, rows in any order;
- it writes at ``[rows[i], positions[i]]`` of every layer's caches and nowhere else;
- bad input raises naming the argument, out-of-range ids included; opcheck.
A drafter's rounds using it are checked in tests/test_drafter.py.
"""

import pytest
import torch

from dspark_ext.drafters.dspark import DrafterConfig, DSparkBackbone
from dspark_ext.ops import draft_context


def _backbone(H, KVH, hd, qk_norm, layers, seed):
    cfg = DrafterConfig(vocab_size=32, hidden_size=48, intermediate_size=80, num_heads=H, num_kv_heads=KVH,
                        head_dim=hd, context_layers=[0, 1], num_layers=layers, num_draft=4, qk_norm=qk_norm,
                        feature_norm="scale")
    torch.manual_seed(seed)
    backbone = DSparkBackbone(cfg)
    with torch.no_grad():
        for p in backbone.parameters():
            p.normal_(0, 0.2) if p.dim() == 2 else p.uniform_(0.5, 1.5)
        backbone.feature_scale.uniform_(0.1, 2.0)
    return cfg, backbone


def _case(cfg, B, L, C, seed):
    g = torch.Generator().manual_seed(seed)
    # A wider buffer, viewed: the op reads features through their strides.
    features = torch.randn(B, L + 3, 2 * cfg.hidden_size + 5, generator=g)[:, 2:L + 2, 3:3 + 2 * cfg.hidden_size]
    caches = [torch.full((B, C, cfg.num_kv_heads, cfg.head_dim), float("nan")) for _ in range(2 * cfg.num_layers)]
    return features, caches[:cfg.num_layers], caches[cfg.num_layers:]


def _python_path(backbone, packed, features, rows, positions, keys, values):
    with torch.no_grad():
        context = backbone.project_context(features[rows, positions], packed)[None]
        for i, (k, v) in enumerate(backbone.context_kv(context, positions[None], packed)):
            keys[i][rows, positions] = k[0]
            values[i][rows, positions] = v[0]


def _op(backbone, packed, features, rows, positions, keys, values, largest=None):
    cos, sin = backbone.rope_table(int(positions.max()) if largest is None else largest, features.device)
    k_norms = [layer.k_norm.weight.detach() for layer in backbone.layers] if backbone.cfg.qk_norm else []
    draft_context(features, rows, positions, packed.context_proj.packed, backbone.context_norm.weight.detach(), cos, sin,
                  [p.context_kv.packed for p in packed.layers], k_norms, keys, values, backbone.context_norm.eps)


CASES = [  # (H, KVH, hd, qk_norm, layers, packed dtype, rows, positions)
    (6, 2, 16, True, 1, torch.float32, [0, 0, 2, 1, 1, 1], [3, 4, 0, 7, 8, 9]),
    (4, 4, 8, False, 2, torch.float32, [1, 0], [5, 2]),
    (9, 3, 16, True, 2, torch.bfloat16, [2, 2, 2, 0], [11, 12, 13, 1]),
    (6, 2, 16, True, 1, torch.bfloat16, [1], [0]),
]


@pytest.mark.parametrize("H,KVH,hd,qk_norm,layers,dtype,rows,positions", CASES)
def test_writes_what_the_python_path_writes(H, KVH, hd, qk_norm, layers, dtype, rows, positions):
    cfg, backbone = _backbone(H, KVH, hd, qk_norm, layers, seed=H + layers)
    packed = backbone.packed(dtype)
    assert packed.scale_folded
    features, keys, values = _case(cfg, 3, 14, 16, seed=hd)
    rows, positions = torch.tensor(rows), torch.tensor(positions)
    expected_keys, expected_values = [k.clone() for k in keys], [v.clone() for v in values]
    _python_path(backbone, packed, features, rows, positions, expected_keys, expected_values)
    _op(backbone, packed, features, rows, positions, keys, values)
    written = torch.zeros(keys[0].shape[:2], dtype=torch.bool)
    written[rows, positions] = True
    for got, want in zip(keys + values, expected_keys + expected_values):
        torch.testing.assert_close(got[written], want[written], rtol=2e-5, atol=2e-5)
        assert bool(got[~written].isnan().all())  # nothing else written


def test_a_wrong_position_is_told_apart():
    """The check above is sharp: RoPE at a position one off moves the keys far beyond its
    tolerance (and leaves the values alone)."""
    cfg, backbone = _backbone(6, 2, 16, True, 1, seed=1)
    packed = backbone.packed(torch.float32)
    features, keys, values = _case(cfg, 2, 8, 10, seed=2)
    rows, positions = torch.tensor([0, 1]), torch.tensor([3, 5])
    expected_keys, expected_values = [k.clone() for k in keys], [v.clone() for v in values]
    _python_path(backbone, packed, features, rows, positions, expected_keys, expected_values)
    shifted_keys, shifted_values = [k.clone() for k in keys], [v.clone() for v in values]
    cos, sin = backbone.rope_table(8, features.device)
    draft_context(features, rows, positions, packed.context_proj.packed, backbone.context_norm.weight.detach(),
                  cos[1:], sin[1:], [packed.layers[0].context_kv.packed], [backbone.layers[0].k_norm.weight.detach()],
                  shifted_keys, shifted_values, backbone.context_norm.eps)
    assert not torch.allclose(shifted_keys[0][rows, positions], expected_keys[0][rows, positions], rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(shifted_values[0][rows, positions], expected_values[0][rows, positions],
                               rtol=2e-5, atol=2e-5)


def test_no_rows_writes_nothing():
    cfg, backbone = _backbone(6, 2, 16, True, 1, seed=1)
    packed = backbone.packed(torch.float32)
    features, keys, values = _case(cfg, 2, 8, 10, seed=2)
    empty = torch.zeros(0, dtype=torch.int64)
    _op(backbone, packed, features, empty, empty, keys, values, largest=0)
    assert bool(keys[0].isnan().all()) and bool(values[0].isnan().all())


def test_bad_input_names_the_argument():
    cfg, backbone = _backbone(6, 2, 16, True, 2, seed=1)
    packed = backbone.packed(torch.float32)
    features, keys, values = _case(cfg, 3, 8, 10, seed=2)
    cos, sin = backbone.rope_table(20, features.device)
    rows, positions = torch.tensor([0, 2]), torch.tensor([3, 7])

    def call(**change):
        args = dict(features=features, rows=rows, positions=positions, context_weight=packed.context_proj.packed,
                    context_norm=backbone.context_norm.weight.detach(), rope_cos=cos, rope_sin=sin,
                    kv_weights=[p.context_kv.packed for p in packed.layers],
                    k_norms=[layer.k_norm.weight.detach() for layer in backbone.layers],
                    key_caches=[k.clone() for k in keys], value_caches=[v.clone() for v in values], eps=1e-5)
        args.update(change)
        draft_context(**args)

    call()  # the unchanged arguments are fine
    with pytest.raises(RuntimeError, match=r"rows\[1\] = 3 must be a request in \[0, 3\)"):
        call(rows=torch.tensor([0, 3]))
    with pytest.raises(RuntimeError, match=r"rows\[0\] = -1"):
        call(rows=torch.tensor([-1, 0]))
    with pytest.raises(RuntimeError, match=r"positions\[1\] = 8 must be in \[0, 8\)"):
        call(positions=torch.tensor([3, 8]))
    with pytest.raises(RuntimeError, match=r"positions\[1\] = 7 must be in \[0, 4\)"):
        call(rope_cos=cos[:4], rope_sin=sin[:4])
    with pytest.raises(RuntimeError, match=r"positions\[0\] = -2"):
        call(positions=torch.tensor([-2, 0]))
    with pytest.raises(RuntimeError, match="positions must have size 2"):
        call(positions=torch.tensor([3]))
    with pytest.raises(RuntimeError, match="rows must be Long"):
        call(rows=rows.int())
    with pytest.raises(RuntimeError, match="features must be Float"):
        call(features=features.double())
    with pytest.raises(RuntimeError, match="features must be contiguous along its last dim"):
        call(features=features.transpose(1, 2).contiguous().transpose(1, 2))
    with pytest.raises(RuntimeError, match="context_weight"):
        call(context_weight=packed.layers[0].context_kv.packed)
    with pytest.raises(RuntimeError, match=r"kv_weights\[1\]"):
        call(kv_weights=[packed.layers[0].context_kv.packed, packed.context_proj.packed])
    with pytest.raises(RuntimeError, match="one entry per layer"):
        call(key_caches=[keys[0].clone()])
    with pytest.raises(RuntimeError, match="k_norms must be empty or have one entry per layer"):
        call(k_norms=[backbone.layers[0].k_norm.weight.detach()])
    with pytest.raises(RuntimeError, match=r"k_norms\[0\] must have size 16"):
        call(k_norms=[backbone.layers[0].k_norm.weight.detach()[:8], backbone.layers[1].k_norm.weight.detach()])
    with pytest.raises(RuntimeError, match=r"key_caches\[1\] must be \[B, C, KVH, head dim\]"):
        call(key_caches=[keys[0].clone(), keys[1][:, :9].clone()], value_caches=[values[0].clone(), values[1][:, :9].clone()])
    with pytest.raises(RuntimeError, match="value_cache must have key_cache's shape"):
        call(value_caches=[values[0][:, :9].clone(), values[1].clone()])
    with pytest.raises(RuntimeError, match="must be contiguous"):
        call(key_caches=[keys[0].transpose(2, 3).contiguous().transpose(2, 3), keys[1].clone()])
    with pytest.raises(RuntimeError, match="rope_sin must be"):
        call(rope_sin=sin[:, :8])
    with pytest.raises(RuntimeError, match="eps must be finite"):
        call(eps=float("nan"))


def test_opcheck():
    cfg, backbone = _backbone(6, 2, 16, True, 2, seed=3)
    packed = backbone.packed(torch.float32)
    features, keys, values = _case(cfg, 3, 8, 10, seed=4)
    keys, values = [k.nan_to_num(0.0) for k in keys], [v.nan_to_num(0.0) for v in values]
    cos, sin = backbone.rope_table(8, features.device)
    args = (features.contiguous(), torch.tensor([0, 2, 2]), torch.tensor([3, 7, 0]), packed.context_proj.packed,
            backbone.context_norm.weight.detach(), cos, sin, [p.context_kv.packed for p in packed.layers],
            [layer.k_norm.weight.detach() for layer in backbone.layers], keys, values, 1e-5)
    torch.library.opcheck(torch.ops.dspark.draft_context, args)
