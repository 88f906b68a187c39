"""dspark::cached_attention: causal attention of a step's few rows per request over a [B, KVH, C, D]
cache, as the default target decodes a token or verifies drafts.

Its contract, checked here:
- within float32 rounding of the float64 softmax attention, for GQA ratios 1-4, head dims that
  are and are not multiples of 16, ragged steps (empty requests, an empty context), and a check
  that tells the causal mask from a wrong one;
- batch invariance: a query's output is bit-identical alone or among any other rows, whatever
  the thread count (which splits a request's rows into pieces);
- NaN and garbage stay where they belong: a NaN query poisons only its own row and head, and
  cache positions past a query's keys are never read;
- the AVX2 and AVX-512 builds give the same bits (a subprocess per build; the plain build agrees
  within rounding);
- bad input raises naming the argument; opcheck and torch.compile(fullgraph=True).
"""

import pytest
import torch

from dspark_ext.ops import cached_attention
from dspark_ext.reference import cached_attention_reference as _reference
from helpers import op_outputs_per_cpu_build, runnable_cpu_builds


def _case(counts, contexts, H=6, KVH=2, D=64, C=None, seed=0):
    """Query rows and a cache whose positions past each request's step are NaN (never read)."""
    g = torch.Generator().manual_seed(seed)
    B = len(counts)
    counts, contexts = torch.tensor(counts, dtype=torch.int64), torch.tensor(contexts, dtype=torch.int64)
    C = C or int((counts + contexts).max()) + 3
    cu = torch.cat([torch.zeros(1, dtype=torch.int64), counts.cumsum(0)])
    q = torch.randn(int(cu[-1]), H, D, generator=g)
    k = torch.randn(B, KVH, C, D, generator=g)
    v = torch.randn(B, KVH, C, D, generator=g)
    for b in range(B):
        k[b, :, int(contexts[b] + counts[b]):] = float("nan")
        v[b, :, int(contexts[b] + counts[b]):] = float("nan")
    return q, k, v, cu, contexts


def _close(out, ref, tol=2e-6):
    return bool(((out.double() - ref).abs() <= tol * (1 + ref.abs())).all())


CASES = [  # (counts, contexts, H, KVH, D)
    ([1, 1, 1, 1], [40, 17, 3, 60], 9, 3, 64),  # SmolLM2's heads, a decoding step
    ([2, 1, 4, 0], [33, 0, 12, 5], 9, 3, 64),  # verification, an empty request, an empty context
    ([8], [100], 4, 4, 40),  # no GQA, D not a multiple of 16
    ([3, 5], [7, 20], 8, 2, 72),
    ([1, 6, 2], [1, 9, 30], 4, 1, 16),
    ([2, 2], [50, 3], 2, 2, 128),
    ([1, 3], [21, 4], 4, 2, 256),
    ([16], [0], 4, 2, 8),  # a prompt of 16 tokens: causal among its own rows
]


@pytest.mark.parametrize("counts,contexts,H,KVH,D", CASES)
def test_matches_float64_attention(counts, contexts, H, KVH, D):
    q, k, v, cu, ctx = _case(counts, contexts, H, KVH, D, seed=sum(counts) + D)
    scale = D ** -0.5
    out = cached_attention(q, k, v, cu, ctx, scale)
    assert out.shape == q.shape and out.dtype == torch.float32 and bool(out.isfinite().all())
    assert _close(out, _reference(q, k, v, cu, ctx, scale))


def test_the_check_tells_a_wrong_mask():
    """The same tolerance rejects attention that lets a row see the rest of its step."""
    q, k, v, cu, ctx = _case([3, 4], [10, 2], seed=5)
    k, v = k.nan_to_num(0.0), v.nan_to_num(0.0)
    out = cached_attention(q, k, v, cu, ctx, 0.125)
    assert _close(out, _reference(q, k, v, cu, ctx, 0.125))
    assert not _close(out, _reference(q, k, v, cu, ctx, 0.125, causal=False))


@pytest.mark.parametrize("counts,contexts,H,KVH,D", CASES)
def test_batch_invariant(counts, contexts, H, KVH, D):
    """Each query alone (its request's context extended by its offset) gives the same bits, and
    so does any subset of the requests."""
    q, k, v, cu, ctx = _case(counts, contexts, H, KVH, D, seed=7)
    out = cached_attention(q, k, v, cu, ctx, 0.3)
    B = len(counts)
    for b in range(B):
        for t in range(counts[b]):
            row = int(cu[b]) + t
            one = torch.zeros(B + 1, dtype=torch.int64)
            one[b + 1:] = 1
            shifted = ctx.clone()
            shifted[b] += t
            assert torch.equal(cached_attention(q[row:row + 1], k, v, one, shifted, 0.3)[0], out[row]), (b, t)
    keep = [b for b in range(B) if b % 2 == 0]
    rows = torch.cat([torch.arange(int(cu[b]), int(cu[b + 1])) for b in keep])
    sub_cu = torch.tensor([0] + [counts[b] for b in keep]).cumsum(0)
    assert torch.equal(cached_attention(q[rows], k[keep], v[keep], sub_cu, ctx[keep], 0.3), out[rows])


@pytest.mark.parametrize("counts,contexts,H,KVH", [([8], [300], 9, 3), ([5, 2], [40, 70], 4, 1), ([3], [0], 2, 2)])
def test_rows_shared_out_among_threads_give_the_same_bits(counts, contexts, H, KVH):
    """With fewer (request, KV head) pairs than twice the threads, a step's rows are split into
    pieces per thread count; every split gives the bits of the rows one at a time."""
    q, k, v, cu, ctx = _case(counts, contexts, H, KVH, 64, seed=11)
    alone = torch.cat([cached_attention(q[int(cu[b]) + t:int(cu[b]) + t + 1], k[b:b + 1], v[b:b + 1],
                                        torch.tensor([0, 1]), ctx[b:b + 1] + t, 0.125)
                       for b in range(len(counts)) for t in range(counts[b])])
    threads = torch.get_num_threads()
    try:
        for n in (1, 2, 3, 4, 8):
            torch.set_num_threads(n)
            assert torch.equal(cached_attention(q, k, v, cu, ctx, 0.125), alone), n
    finally:
        torch.set_num_threads(threads)


def test_nan_query_stays_in_its_row_and_head():
    q, k, v, cu, ctx = _case([2, 3], [9, 4], seed=8)
    clean = cached_attention(q, k, v, cu, ctx, 0.125)
    q[3, 1, 5] = float("nan")
    out = cached_attention(q, k, v, cu, ctx, 0.125)
    assert bool(out[3, 1].isnan().all())
    mask = torch.ones(q.shape[:2], dtype=torch.bool)
    mask[3, 1] = False
    assert torch.equal(out[mask], clean[mask])


def test_a_nan_key_reaches_only_the_queries_that_see_it():
    """Key position context + 1 of request 0 is seen by its rows 1 and 2, not by row 0."""
    q, k, v, cu, ctx = _case([3], [6], H=4, KVH=2, seed=9)
    clean = cached_attention(q, k, v, cu, ctx, 0.125)
    k[0, 1, 7] = float("nan")
    out = cached_attention(q, k, v, cu, ctx, 0.125)
    assert torch.equal(out[0], clean[0]) and torch.equal(out[1:, :2], clean[1:, :2])
    assert bool(out[1:, 2:].isnan().all())


def test_strided_query():
    q, k, v, cu, ctx = _case([2, 1], [5, 8], H=4, KVH=2, D=32, seed=10)
    wide = torch.randn(q.shape[0], q.shape[1], 50)
    wide[:, :, 3:35] = q
    strided = wide[:, :, 3:35]
    assert not strided.is_contiguous()
    assert torch.equal(cached_attention(strided, k, v, cu, ctx, 0.2), cached_attention(q, k, v, cu, ctx, 0.2))
    heads_first = q.transpose(0, 1).contiguous().transpose(0, 1)  # unit stride along D, rows strided
    assert torch.equal(cached_attention(heads_first, k, v, cu, ctx, 0.2), cached_attention(q, k, v, cu, ctx, 0.2))


def test_empty_sizes():
    q, k, v, cu, ctx = _case([0, 0], [3, 0], seed=11)
    assert cached_attention(q, k, v, cu, ctx, 0.1).shape == (0, 6, 64)
    nothing = torch.empty(0, 6, 64)
    no_requests = torch.empty(0, 2, 4, 64)
    assert cached_attention(nothing, no_requests, no_requests, torch.zeros(1, dtype=torch.int64),
                            torch.zeros(0, dtype=torch.int64), 0.1).shape == (0, 6, 64)


def _good():
    q, k, v, cu, ctx = _case([2, 1], [3, 4], H=4, KVH=2, D=16, C=8, seed=12)
    return [q, k.nan_to_num(0.0), v.nan_to_num(0.0), cu, ctx, 0.25]


def _with(index, value):
    args = _good()
    args[index] = value(args[index]) if callable(value) else value
    return args


BAD_CASES = [
    ("query float64", lambda: _with(0, lambda q: q.double()), "query must be Float"),
    ("query 2-D", lambda: _with(0, lambda q: q[0]), "query must be 3-D"),
    ("key_cache 3-D", lambda: _with(1, lambda k: k[0]), "key_cache must be 4-D"),
    ("key_cache bfloat16", lambda: _with(1, lambda k: k.bfloat16()), "key_cache must be Float"),
    ("value_cache dtype", lambda: _with(2, lambda v: v.half()), "value_cache must be Float"),
    ("value_cache shape", lambda: _with(2, lambda v: v[:, :, :7]), "value_cache must have key_cache's shape"),
    ("head dim", lambda: _with(0, lambda q: q[..., :8]), "key_cache must have size 8"),
    ("heads not a multiple", lambda: _with(0, lambda q: q[:, :3]), "multiple of key_cache's 2 KV heads"),
    ("head dim too large", lambda: [torch.randn(3, 2, 264), torch.zeros(2, 1, 8, 264), torch.zeros(2, 1, 8, 264),
                                    torch.tensor([0, 2, 3]), torch.tensor([3, 4]), 0.1], "must be <= 256"),
    ("scale inf", lambda: _with(5, float("inf")), "scale must be finite"),
    ("cu_seqlens int32", lambda: _with(3, lambda cu: cu.int()), "cu_seqlens must be Long"),
    ("cu_seqlens size", lambda: _with(3, lambda cu: cu[:2]), "cu_seqlens must have size 3"),
    ("cu_seqlens end", lambda: _with(3, torch.tensor([0, 2, 2])), "cu_seqlens must run from 0 to T"),
    ("cu_seqlens start", lambda: _with(3, torch.tensor([1, 2, 3])), "cu_seqlens must run from 0 to T"),
    ("cu_seqlens decreasing", lambda: _with(3, torch.tensor([0, 4, 3])), "cu_seqlens must be nondecreasing"),
    ("context_lengths dtype", lambda: _with(4, lambda c: c.float()), "context_lengths must be Long"),
    ("context_lengths size", lambda: _with(4, lambda c: c[:1]), "context_lengths must have size 2"),
    ("context past the cache", lambda: _with(4, torch.tensor([7, 4])), "must fit the cache's 8 positions"),
    ("negative context", lambda: _with(4, torch.tensor([-1, 4])), "context_lengths\\[0\\] \\+ its 2 query rows"),
]


@pytest.mark.parametrize("make,message", [c[1:] for c in BAD_CASES], ids=[c[0] for c in BAD_CASES])
def test_bad_input_names_the_argument(make, message):
    with pytest.raises(RuntimeError, match=message):
        torch.ops.dspark.cached_attention(*make())


@pytest.mark.parametrize("counts,contexts", [([2, 1], [3, 4]), ([0, 3], [5, 0]), ([1], [0])])
def test_opcheck(counts, contexts):
    q, k, v, cu, ctx = _case(counts, contexts, H=4, KVH=2, D=16, seed=13)
    torch.library.opcheck(torch.ops.dspark.cached_attention, (q, k.nan_to_num(0.0), v.nan_to_num(0.0), cu, ctx, 0.25))


def test_torch_compile_fullgraph():
    q, k, v, cu, ctx = _case([2, 3], [4, 1], H=4, KVH=2, D=32, seed=14)

    def block(q):
        return cached_attention(q * 2, k, v, cu, ctx, 0.1).sum(-1)

    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled(q), block(q))


@pytest.mark.skipif(len(runnable_cpu_builds()) < 3, reason="needs a CPU that runs both the AVX2 and AVX-512 builds")
def test_avx2_and_avx512_builds_give_the_same_bits(tmp_path):
    """The plain build (no FMA) rounds each product, so it agrees only within rounding."""
    cases = []
    for i, (counts, contexts, H, KVH, D) in enumerate(CASES):
        q, k, v, cu, ctx = _case(counts, contexts, H, KVH, D, seed=20 + i)
        cases.append((q, k, v, cu, ctx, D ** -0.5))
    outputs = op_outputs_per_cpu_build("cached_attention", cases, ["default", "avx2", "avx512"], tmp_path)
    for case, avx2, avx512, plain in zip(cases, outputs["avx2"], outputs["avx512"], outputs["default"]):
        assert torch.equal(avx2, avx512)
        assert _close(plain, _reference(*case))
