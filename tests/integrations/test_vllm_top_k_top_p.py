"""The plugin's sort-free top-k / top-p (dspark_ext/integrations/vllm/top_k_top_p.py) against
vLLM's own `apply_top_k_top_p_pytorch`, on random rows with ties, greedy rows, rows without
top-k or top-p, and vocabularies past the window (the redo path)."""

import pytest
import torch

pytest.importorskip("vllm", reason="vLLM is not installed (the vLLM test venv of .ci/run has it)")

from vllm.v1.sample.ops.topk_topp_sampler import apply_top_k_top_p_pytorch  # noqa: E402

from dspark_ext.integrations.vllm import top_k_top_p  # noqa: E402


def random_case(g, vocab):
    n = int(torch.randint(1, 9, (1,), generator=g))
    rows = torch.randn(n, vocab, generator=g) * float(torch.rand(1, generator=g) * 8 + 0.1)
    if torch.rand(1, generator=g) < 0.3:
        rows = rows.round()  # many exact ties
    temperature = torch.rand(n, generator=g) * 1.5
    temperature[0] = 0.0  # greedy: vLLM reads it as 1
    k = torch.randint(1, vocab + 1, (n,), generator=g)
    k[torch.rand(n, generator=g) < 0.3] = vocab  # vLLM's "no top-k" for a row
    p = torch.rand(n, generator=g) * 0.99 + 0.01
    p[torch.rand(n, generator=g) < 0.3] = 1.0
    return rows, temperature, k, p


def unexplained_disagreements(keep, rows, temperature, k, p):
    """Entries where `keep` differs from vLLM's kept set for a reason other than: the token's
    float32 probability is 0 (vLLM's cumsum masks underflowed tokens, verify's exp never draws
    them), an exact tie with another logit (vLLM's unstable sort), or a top-p boundary within
    float32 rounding of the cumulative mass."""
    scaled = rows / torch.where(temperature > 0, temperature, torch.ones_like(temperature))[:, None]
    theirs = apply_top_k_top_p_pytorch(scaled.clone(), k, p) > float("-inf")
    top_k_only = apply_top_k_top_p_pytorch(scaled.clone(), k, None)
    unexplained = 0
    differ = (keep != theirs) & (torch.softmax(top_k_only, dim=1) > 0)  # underflowed tokens: no mass
    for r, c in differ.nonzero().tolist():
        probability = torch.softmax(top_k_only[r].double(), 0)
        tie = int((rows[r] == rows[r, c]).sum()) > 1
        mass_above = float(probability[probability > probability[c]].sum())
        boundary = p is not None and abs(mass_above - float(p[r])) < 1e-5
        if not (tie or boundary):
            unexplained += 1
    return unexplained


@pytest.mark.parametrize("vocab", [50, 300, 1000, 5000])
def test_thresholds_keep_what_vllm_keeps(vocab):
    g = torch.Generator().manual_seed(vocab)
    for _ in range(10):
        rows, temperature, k, p = random_case(g, vocab)
        for kk, pp in ((k, p), (k, None), (None, p)):
            keep = rows >= top_k_top_p.keep_thresholds(rows, temperature, kk, pp)[:, None]
            assert unexplained_disagreements(keep, rows, temperature, kk, pp) == 0


def test_window_redo_path_is_taken_and_exact(monkeypatch):
    monkeypatch.setattr(top_k_top_p, "WINDOW", 8)  # a nucleus of hundreds of tokens runs past it
    g = torch.Generator().manual_seed(3)
    rows = torch.randn(4, 2000, generator=g) * 0.5
    temperature = torch.ones(4)
    p = torch.tensor([0.9, 0.5, 0.99, 1.0])
    keep = rows >= top_k_top_p.keep_thresholds(rows, temperature, None, p)[:, None]
    assert int(keep[0].sum()) > 8
    assert unexplained_disagreements(keep, rows, temperature, None, p) == 0


def test_broken_threshold_is_caught():
    """Broken variant: top-p keeping a token only while the mass up to and including it is
    < p (vLLM keeps the token that crosses p)."""
    g = torch.Generator().manual_seed(11)
    rows = torch.randn(4, 300, generator=g) * 2  # no ties
    temperature = torch.tensor([0.0, 0.7, 1.0, 1.3])
    p = torch.full((4,), 0.6)
    scaled = rows / torch.where(temperature > 0, temperature, torch.ones_like(temperature))[:, None]
    probs = torch.softmax(scaled.double(), dim=1)
    values, order = probs.sort(dim=1, descending=True)
    inclusive = values.cumsum(1)
    keep_sorted = inclusive < p.double()[:, None]
    keep = torch.zeros_like(keep_sorted).scatter(1, order, keep_sorted)
    assert unexplained_disagreements(keep, rows, temperature, None, p) > 0
