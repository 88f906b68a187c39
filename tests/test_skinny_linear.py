"""dspark::skinny_linear: F.linear for the few rows of a verification step, on a weight packed by
``pack_skinny_weight``.

Its contract, checked here:
- every output is one chain over k = 0 .. K-1, in order, then + bias: bit-exact against that
  chain where the products are exact (so every build must agree with it), and within the
  chain's error bound of the float64 product otherwise;
- batch invariance: a row's output is bit-identical whatever the other rows or their number
  (NaN rows included);
- the AVX2 and AVX-512 builds give the same bits on any input (a subprocess per build);
- shapes as F.linear ([*, K] -> [*, N]), strided rows, empty sizes; bad input raises naming
  the argument; opcheck and torch.compile(fullgraph=True).
"""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dspark_ext.ops import SKINNY_BLOCK, pack_skinny_weight, skinny_linear
from helpers import op_outputs_per_cpu_build, runnable_cpu_builds

# (M, N, K): tails of the register tiles (8 or 3 rows; on AVX-512, 9-12 rows run one 2 x 12 tile),
# of the block (16 features) and of the pair of blocks; K = 1 and odd K; 35 blocks of K = 576 split
# over the threads (a range of odd length ends with a block alone).
SHAPES = [(1, 7, 5), (3, 33, 17), (8, 576, 64), (9, 192, 96), (13, 5, 31), (40, 100, 64), (2, 16, 1), (17, 48, 130),
          (12, 40, 9), (10, 33, 1), (11, 17, 20), (10, 560, 576), (24, 80, 33), (25, 17, 3)]


def _inputs(M, N, K, seed=0, bias=True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=g)
    w = torch.randn(N, K, generator=g)
    b = torch.randn(N, generator=g) if bias else None
    return x, w, b


def _chain_bound(x, w, b):
    """|error| of a chain of K roundings of float32 partial sums (each fma or add rounds once),
    plus the bias addition: (K + 1) u (|x| @ |w|.T + |b|), u = 2^-24."""
    scale = x.double().abs() @ w.double().abs().T
    if b is not None:
        scale = scale + b.double().abs()
    return (x.shape[-1] + 1) * 2.0**-24 * scale * 1.0001 + 1e-38


@pytest.mark.parametrize("M,N,K", SHAPES)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("weight_dtype", [torch.float32, torch.bfloat16])
def test_within_the_chain_error_bound(M, N, K, bias, weight_dtype):
    """A bfloat16 weight is widened exactly, so the same bound holds against its own values."""
    x, w, b = _inputs(M, N, K, seed=M * 1000 + N + K, bias=bias)
    w = w.to(weight_dtype)
    out = skinny_linear(x, pack_skinny_weight(w), N, b)
    w = w.float()
    assert out.shape == (M, N) and out.dtype == torch.float32
    exact = x.double() @ w.double().T + (b.double() if b is not None else 0)
    assert bool(((out.double() - exact).abs() <= _chain_bound(x, w, b)).all())


def test_error_bound_rejects_a_wrong_layout():
    """The same check fails for a weight packed the wrong way round (features and k swapped
    within a block), so it can tell a wrong answer."""
    M, N, K = 4, 32, 16
    x, w, b = _inputs(M, N, K, seed=5)
    wrong = w.view(N // SKINNY_BLOCK, SKINNY_BLOCK, K).contiguous()  # [blocks, 16, K]: not transposed
    out = skinny_linear(x, wrong, N, b)
    exact = x.double() @ w.double().T + b.double()
    assert not bool(((out.double() - exact).abs() <= _chain_bound(x, w, b)).all())


def _exact_product_inputs(M, N, K, seed):
    """Inputs with 12-bit and weights with 7-bit significands (exact in bfloat16), varied
    exponents: every product is exact in float32, so an fma and a multiply-then-add round the
    same and only the order of the sums decides the bits."""
    g = torch.Generator().manual_seed(seed)

    def draw(bound, *shape):
        mantissa = torch.randint(-bound, bound, shape, generator=g).float()
        return mantissa * torch.exp2(torch.randint(-14, 4, shape, generator=g).float())

    return draw(2048, M, K), draw(128, N, K), draw(2048, N)


def _sequential_chain(x, w, b, order=None):
    """float32 partial sums over k in ``order`` (default 0 .. K-1) from 0, then + bias."""
    x, w, b = x.numpy(), w.numpy(), b.numpy()
    acc = np.zeros((x.shape[0], w.shape[0]), dtype=np.float32)
    for k in (range(x.shape[1]) if order is None else order):
        acc = (acc + np.outer(x[:, k], w[:, k]).astype(np.float32)).astype(np.float32)
    return torch.from_numpy((acc + b[None, :]).astype(np.float32))


# (7, 33, 257) and (4, 16, 256): on AVX2, 3 + 3 + 1 (3 + 1) rows meet each block pair 128 values
# of k at a time (two whole stretches and one of a single k; two whole stretches), resuming the
# partial sums they leave in the output.
@pytest.mark.parametrize("M,N,K", [(5, 40, 33), (12, 17, 200), (7, 33, 257), (4, 16, 256)])
@pytest.mark.parametrize("weight_dtype", [torch.float32, torch.bfloat16])
def test_bits_are_the_sequential_chain(M, N, K, weight_dtype):
    x, w, b = _exact_product_inputs(M, N, K, seed=M + K)
    assert torch.equal(w.to(weight_dtype).float(), w)
    out = skinny_linear(x, pack_skinny_weight(w.to(weight_dtype)), N, b)
    assert torch.equal(out, _sequential_chain(x, w, b))
    # The check tells orders apart: the same sums taken from k = K-1 down differ.
    assert not torch.equal(out, _sequential_chain(x, w, b, order=range(K - 1, -1, -1)))


@pytest.mark.parametrize("M,N,K", SHAPES)
@pytest.mark.parametrize("weight_dtype", [torch.float32, torch.bfloat16])
def test_batch_invariant(M, N, K, weight_dtype):
    x, w, b = _inputs(M, N, K, seed=7)
    packed = pack_skinny_weight(w.to(weight_dtype))
    out = skinny_linear(x, packed, N, b)
    for m in range(M):
        assert torch.equal(skinny_linear(x[m:m + 1], packed, N, b), out[m:m + 1])
    # Any subset, in any order, gives the same rows.
    perm = torch.randperm(M, generator=torch.Generator().manual_seed(M))[: max(1, M // 2)]
    assert torch.equal(skinny_linear(x[perm], packed, N, b), out[perm])


def test_nan_stays_in_its_row():
    x, w, b = _inputs(10, 40, 24, seed=8)
    packed = pack_skinny_weight(w)
    clean = skinny_linear(x, packed, 40, b)
    x[3, 5] = float("nan")
    x[7, 0] = float("inf")
    out = skinny_linear(x, packed, 40, b)
    assert bool(out[3].isnan().all())
    assert torch.equal(out[[0, 1, 2, 4, 5, 6, 8, 9]], clean[[0, 1, 2, 4, 5, 6, 8, 9]])


def test_shapes_like_f_linear():
    x, w, b = _inputs(6, 20, 12, seed=9)
    packed = pack_skinny_weight(w)
    assert packed.shape == (2, 12, 16)
    assert bool((packed[1, :, 4:] == 0).all())  # features 20..31: zero padding
    x3 = x.view(2, 3, 12)
    out3 = skinny_linear(x3, packed, 20, b)
    assert out3.shape == (2, 3, 20) and torch.equal(out3.reshape(6, 20), skinny_linear(x, packed, 20, b))
    out1 = skinny_linear(x[0], packed, 20, b)
    assert out1.shape == (20,) and torch.equal(out1, skinny_linear(x[:1], packed, 20, b)[0])
    torch.testing.assert_close(out3, F.linear(x3, w, b), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rows", [5, 11])
def test_strided_rows(rows):
    wide = torch.randn(rows, 50)
    x = wide[:, 3:27]  # row stride 50
    t = wide.T.contiguous().T[:, 3:27]  # column-major: unit stride across rows
    w, b = torch.randn(30, 24), torch.randn(30)
    packed = pack_skinny_weight(w)
    ref = skinny_linear(x.contiguous(), packed, 30, b)
    assert torch.equal(skinny_linear(x, packed, 30, b), ref)
    assert torch.equal(skinny_linear(t, packed, 30, b), ref)


def test_empty_sizes():
    w, b = torch.randn(20, 8), torch.randn(20)
    assert skinny_linear(torch.empty(0, 8), pack_skinny_weight(w), 20, b).shape == (0, 20)
    assert skinny_linear(torch.randn(3, 8), pack_skinny_weight(torch.empty(0, 8)), 0, None).shape == (3, 0)
    for rows in (3, 10):
        no_features = skinny_linear(torch.empty(rows, 0), pack_skinny_weight(torch.empty(20, 0)), 20, b)
        assert torch.equal(no_features, b.expand(rows, 20))


BAD_CASES = [
    ("input float64", lambda x, p, b: (x.double(), p, 20, b), "input must be Float"),
    ("weight float16", lambda x, p, b: (x, p.half(), 20, b), "packed_weight must be Float or BFloat16"),
    ("weight 2-D", lambda x, p, b: (x, p[0], 20, b), "packed_weight must be 3-D"),
    ("unpacked", lambda x, p, b: (x, torch.randn(20, 8).view(20, 8, 1), 20, b), "packed_weight must have shape"),
    ("out_features off", lambda x, p, b: (x, p, 40, None), "packed_weight must have shape"),
    ("K off", lambda x, p, b: (x[:, :7], p, 20, b), "packed_weight must have shape"),
    ("negative out_features", lambda x, p, b: (x, p, -1, None), "out_features must be >= 0"),
    ("bias size", lambda x, p, b: (x, p, 20, b[:19]), "bias must have size 20"),
    ("bias 2-D", lambda x, p, b: (x, p, 20, b[None]), "bias must be 1-D"),
    ("bias dtype", lambda x, p, b: (x, p, 20, b.half()), "bias must be Float"),
    ("scalar input", lambda x, p, b: (x[0, 0], p, 20, b), "input must have at least 1 dimension"),
]


@pytest.mark.parametrize("make,message", [c[1:] for c in BAD_CASES], ids=[c[0] for c in BAD_CASES])
def test_bad_input_names_the_argument(make, message):
    x, w, b = _inputs(3, 20, 8, seed=10)
    with pytest.raises(RuntimeError, match=message.replace("(", r"\(")):
        torch.ops.dspark.skinny_linear(*make(x, pack_skinny_weight(w), b))


def test_bfloat16_weight_is_widened_exactly():
    x, w, b = _inputs(6, 50, 40, seed=13)
    wb = w.bfloat16()
    assert torch.equal(skinny_linear(x, pack_skinny_weight(wb), 50, b), skinny_linear(x, pack_skinny_weight(wb.float()), 50, b))


def test_pack_rejects_non_matrices():
    with pytest.raises(ValueError, match="weight must be 2-D"):
        pack_skinny_weight(torch.randn(3, 4, 5))


@pytest.mark.parametrize("shape,bias", [((4, 24), True), ((2, 3, 24), False), ((0, 24), True)])
def test_opcheck(shape, bias):
    w = torch.randn(37, 24)
    args = (torch.randn(shape), pack_skinny_weight(w), 37, torch.randn(37) if bias else None)
    torch.library.opcheck(torch.ops.dspark.skinny_linear, args)


def test_torch_compile_fullgraph():
    x, w, b = _inputs(5, 40, 32, seed=11)
    packed = pack_skinny_weight(w)

    def mlp(x):
        return torch.relu(skinny_linear(x, packed, 40, b)) * 2

    compiled = torch.compile(mlp, fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled(x), mlp(x))


@pytest.mark.skipif(len(runnable_cpu_builds()) < 3, reason="needs a CPU that runs both the AVX2 and AVX-512 builds")
def test_avx2_and_avx512_builds_give_the_same_bits(tmp_path):
    cases = []
    for M, N, K in SHAPES:
        x, w, b = _inputs(M, N, K, seed=M + N)
        cases += [(x, pack_skinny_weight(w), N, b), (x, pack_skinny_weight(w.bfloat16()), N, b)]
    outputs = op_outputs_per_cpu_build("skinny_linear", cases, ["avx2", "avx512"], tmp_path)
    for avx2, avx512 in zip(outputs["avx2"], outputs["avx512"]):
        assert torch.equal(avx2, avx512)


def test_fused_linear_matches_its_layers():
    from dspark_ext.packed_linear import FusedLinear

    g = torch.Generator().manual_seed(12)
    parts = [(torch.randn(24, 40, generator=g), torch.randn(24, generator=g)), (torch.randn(8, 40, generator=g), None),
             (torch.randn(19, 40, generator=g), torch.randn(19, generator=g))]
    fused = FusedLinear(parts, max_skinny_rows=6)
    assert fused.packed is not None and fused.packed.shape == (4, 40, 16)
    for rows in (1, 6, 7, 30):  # 1 and 6 rows: skinny_linear; 7 and 30: F.linear per layer
        x = torch.randn(rows, 40, generator=g)
        outs = fused(x)
        assert [o.shape for o in outs] == [(rows, 24), (rows, 8), (rows, 19)]
        for out, (w, b) in zip(outs, parts):
            torch.testing.assert_close(out, F.linear(x, w, b), rtol=1e-5, atol=1e-5)


def test_fused_linear_packs_bfloat16_weights():
    """``packed_dtype=bfloat16``: the layers' weights rounded to bfloat16 (half the bytes), the
    rows and the sums in float32; past ``max_skinny_rows``, F.linear on the same rounded weights."""
    from dspark_ext.packed_linear import FusedLinear

    g = torch.Generator().manual_seed(13)
    parts = [(torch.randn(24, 40, generator=g), None), (torch.randn(9, 40, generator=g), torch.randn(9, generator=g))]
    fused = FusedLinear(parts, max_skinny_rows=6, packed_dtype=torch.bfloat16)
    assert fused.packed.dtype == torch.bfloat16
    x = torch.randn(5, 40, generator=g)
    for out, (w, b) in zip(fused(x), parts):
        rounded = F.linear(x, w.bfloat16().float(), b)
        torch.testing.assert_close(out, rounded, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(out, F.linear(x, w, b), rtol=1e-5, atol=1e-5)  # the rounding is real
    x = torch.randn(7, 40, generator=g)  # past max_skinny_rows: F.linear on the same rounded weights
    for out, (w, b) in zip(fused(x), parts):
        torch.testing.assert_close(out, F.linear(x, w.bfloat16().float(), b), rtol=1e-5, atol=1e-5)


def test_fused_linear_falls_back_where_skinny_linear_does_not_run():
    from dspark_ext.packed_linear import FusedLinear

    w = torch.randn(16, 8, dtype=torch.bfloat16)
    fused = FusedLinear([(w, None)])
    assert fused.packed is None and fused.max_skinny_rows == 0
    x = torch.randn(2, 8, dtype=torch.bfloat16)
    assert torch.equal(fused(x)[0], F.linear(x, w))
    with pytest.raises(ValueError, match="share their input features"):
        FusedLinear([(torch.randn(4, 8), None), (torch.randn(4, 9), None)])
