"""vLLM's top-k / top-p as one keep-threshold per row, without sorting the vocabulary.

vLLM's `apply_top_k_top_p_pytorch` (vllm/v1/sample/ops/topk_topp_sampler.py:473) sorts every
row: top-k masks the values strictly below the k-th largest; top-p then masks, in ascending
order, the tokens whose inclusive cumulative probability (softmax of the top-k-masked row at
temperature T) is <= 1 - p, always keeping the largest. Read from the top, that keeps the token
of descending rank r iff the probability mass strictly above it is < p; the kept set is a prefix
of the descending order, so one threshold value per row describes it. Here `topk` over a window
of the largest values finds that threshold; only rows whose nucleus (or a tie at the k-th value)
reaches past the window are redone over the whole row. The one difference from vLLM's sort:
tokens whose logit exactly ties the threshold are all kept, where vLLM's unstable sort keeps an
arbitrary subset of them. Sizing the window reads k on the host (a sync on CUDA, as vLLM's own
top-k-only path has; V1's sampler runs outside CUDA graphs).
"""

from typing import Optional, Tuple

import torch

WINDOW = 256


def keep_thresholds(rows: torch.Tensor, temperature: torch.Tensor, top_k: Optional[torch.Tensor],
                    top_p: Optional[torch.Tensor]) -> torch.Tensor:
    """[N] thresholds in rows' dtype: vLLM keeps exactly the logits >= threshold[n] of row n.

    ``rows`` [N, V] are logits before temperature, ``temperature`` [N] (0 = greedy, read as 1,
    as vLLM does), ``top_k`` [N] (V or more = no top-k) and ``top_p`` [N] (1 = no top-p)."""
    num_rows, vocab = rows.shape
    k = torch.full((num_rows,), vocab, dtype=torch.long, device=rows.device) if top_k is None \
        else top_k.to(torch.long).clamp(1, vocab)
    limited = k < vocab
    largest_k = int(k[limited].max()) if bool(limited.any()) else 0
    if top_p is None or not bool((top_p < 1).any()):
        if largest_k == 0:
            return rows.new_full((num_rows,), float("-inf"))
        kth = rows.topk(largest_k, dim=1).values.gather(1, (k.clamp(max=largest_k) - 1)[:, None])[:, 0]
        return torch.where(limited, kth, torch.full_like(kth, float("-inf")))

    width = min(vocab, max(WINDOW, largest_k + 1))  # +1 sees a tie at the k-th value past rank k
    threshold, resolved = _thresholds_in_window(rows, temperature, k, top_p, width)
    if width < vocab and not bool(resolved.all()):
        redo = (~resolved).nonzero()[:, 0]
        threshold[redo], _ = _thresholds_in_window(rows[redo], temperature[redo], k[redo], top_p[redo], vocab)
    return threshold


def _thresholds_in_window(rows: torch.Tensor, temperature: torch.Tensor, k: torch.Tensor, top_p: torch.Tensor,
                          width: int) -> Tuple[torch.Tensor, torch.Tensor]:
    vocab = rows.shape[1]
    values = rows.topk(width, dim=1).values  # descending
    exact = values.double()
    limited = k < vocab
    kth = torch.where(limited, exact.gather(1, (k.clamp(max=width) - 1)[:, None])[:, 0],
                      torch.full_like(exact[:, 0], float("-inf")))
    kept_by_k = exact >= kth[:, None]
    scale = torch.where(temperature > 0, temperature, torch.ones_like(temperature)).double()[:, None]
    # The top-p softmax runs over the top-k-kept tokens: all inside the window where top-k
    # limits the row (unless a tie runs past it), the whole row otherwise.
    normalizer = torch.logsumexp(torch.where(kept_by_k, exact / scale, float("-inf")), dim=1)
    unlimited = ~limited
    if width < vocab and bool(unlimited.any()):
        whole = (rows[unlimited].double() / scale[unlimited]).logsumexp(dim=1)
        normalizer = normalizer.masked_scatter(unlimited, whole)
    probability = torch.where(kept_by_k, torch.exp(exact / scale - normalizer[:, None]), 0.0)
    mass_above = torch.cumsum(probability, dim=1) - probability
    kept = kept_by_k & (mass_above < top_p.double()[:, None])
    kept[:, 0] = True  # vLLM always keeps the largest
    last_kept = kept.sum(dim=1) - 1
    threshold = values.gather(1, last_kept[:, None])[:, 0]
    no_top_p = top_p >= 1
    threshold = torch.where(no_top_p, torch.where(limited, kth.to(values.dtype), torch.full_like(threshold, float("-inf"))),
                            threshold)
    # Past the window: the nucleus may continue (every window token kept) or a tie at the k-th
    # value may (the window's last value still equals it).
    runs_past = ~no_top_p & torch.where(limited, kept_by_k[:, -1], kept[:, -1])
    resolved = (width == vocab) | ~runs_past
    return threshold, resolved
