"""Offline calibration for DSpark scheduling: the target's throughput table and the confidence
head's Sequential Temperature Scaling (STS, paper Sec. 3.2.1).

* ``profile_sps`` times the target's verify step for 1..max_tokens tokens and returns the
  steps-per-second table ``sps`` [max_tokens + 1] that ``torch.ops.dspark.schedule`` reads
  (``save_sps`` / ``load_sps`` store it).
* ``calibrate_sts`` fits one temperature per draft position on held-out rollouts so that the
  cumulative confidence ``P_k = prod_{i<=k} sigmoid(z_i / T_i)`` matches the observed prefix
  acceptance ``y_k = 1[first k drafts accepted]``; ``STSCalibration.temperatures`` goes to
  ``ConfidenceHead.set_sts_temperature``. With ``bias=True`` each position also gets an offset,
  ``sigmoid(z_i / T_i + b_i)``: one temperature cannot remove a head's offset (bench/RESULTS.md).
* ``reliability_diagram`` plots P_k against y_k before and after STS (needs matplotlib).

Everything here is plain torch on the CPU in float64; nothing needs the compiled library.
"""

import math
import operator
import os
import pathlib
import statistics
import time
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import torch

#: The STS search range: temperatures are searched log-uniformly in [STS_MIN_T, STS_MAX_T].
STS_MIN_T, STS_MAX_T = 0.02, 50.0
#: Points of the fine log grid between the coarse grid neighbours of the best temperature.
STS_REFINE_SIZE = 101
#: ECEs closer than this count as a tie (broken toward T = 1).
_ECE_TIE = 1e-12
#: How many probabilities one chunk of the grid search holds (bounds its memory).
_CHUNK_ELEMENTS = 1 << 22

Metadata = Dict[str, Union[str, int, float]]
Temperatures = Union[torch.Tensor, Sequence[float]]


# --------------------------------------------------------------------------- throughput table


def profile_sps(
    forward_fn: Callable[[int], object],
    max_tokens: int,
    *,
    sizes: Optional[Iterable[int]] = None,
    warmup: int = 3,
    repeats: int = 7,
    device: Optional[Union[str, torch.device]] = None,
    time_fn: Callable[[], float] = time.perf_counter,
) -> torch.Tensor:
    """The target's steps per second for verify batches of n = 1..max_tokens tokens.

    ``forward_fn(n)`` runs one target forward over n tokens. Each measured size gets ``warmup``
    untimed calls, then ``repeats`` timed ones; its step time is their median. ``sizes``
    (default: all) picks the sizes to measure, 1 and max_tokens always included; the others
    get the step time linearly interpolated between their measured neighbours. Step times are
    first made non-decreasing in n by isotonic regression, so noise inversions go and real
    cliffs stay. With a CUDA ``device``, the device is synchronized around the timed calls.

    Returns float32 ``sps`` [max_tokens + 1] on the CPU, ``sps[n] = 1 / time(n)``; ``sps[0] = 0``
    is unused (a verify step has at least one token).
    """
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise ValueError(f"max_tokens must be an int >= 1, got {max_tokens!r}")
    if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
        raise ValueError(f"warmup must be an int >= 0, got {warmup!r}")
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"repeats must be an int >= 1, got {repeats!r}")
    measured = {1, max_tokens}
    for n in [] if sizes is None else sizes:
        try:
            size = operator.index(n)  # ints, and integer numpy/torch scalars
        except TypeError:
            size = None
        if isinstance(n, bool) or size is None or not 1 <= size <= max_tokens:
            raise ValueError(f"sizes must hold ints in [1, max_tokens = {max_tokens}], got {n!r}")
        measured.add(size)
    measured_sizes = sorted(measured if sizes is not None else range(1, max_tokens + 1))

    sync = _synchronizer(device)
    step_times = []
    for n in measured_sizes:
        for _ in range(warmup):
            forward_fn(n)
        sync()  # queued warmup work must not land in the first timed call
        samples = []
        for _ in range(repeats):
            start = time_fn()
            forward_fn(n)
            sync()
            samples.append(time_fn() - start)
        step_time = statistics.median(samples)
        if not all(math.isfinite(s) and s >= 0 for s in samples) or step_time <= 0:
            raise ValueError(
                f"measured step time for n = {n} must be finite and > 0, got samples {samples}; "
                "give forward_fn more work per call or use a finer time_fn clock"
            )
        step_times.append(step_time)

    step_times = _isotonic_non_decreasing(step_times)
    times = _interpolate(measured_sizes, step_times, max_tokens)
    sps = torch.zeros(max_tokens + 1, dtype=torch.float64)
    sps[1:] = 1.0 / torch.tensor(times, dtype=torch.float64)
    return sps.float()


def _synchronizer(device: Optional[Union[str, torch.device]]) -> Callable[[], None]:
    if device is None or torch.device(device).type != "cuda":
        return lambda: None
    device = torch.device(device)
    return lambda: torch.cuda.synchronize(device)


def _isotonic_non_decreasing(values: List[float]) -> List[float]:
    """Least-squares non-decreasing fit of ``values`` (pool adjacent violators, equal weights)."""
    blocks: List[List[float]] = []  # [mean, count] of each pooled block
    for v in values:
        blocks.append([v, 1])
        while len(blocks) > 1 and blocks[-2][0] > blocks[-1][0]:
            mean, count = blocks.pop()
            prev_mean, prev_count = blocks[-1]
            blocks[-1] = [(prev_mean * prev_count + mean * count) / (prev_count + count), prev_count + count]
    return [mean for mean, count in blocks for _ in range(count)]


def _interpolate(sizes: List[int], values: List[float], max_tokens: int) -> List[float]:
    """``values`` at every n in 1..max_tokens, linear between the measured ``sizes``."""
    out = []
    j = 0
    for n in range(1, max_tokens + 1):
        while sizes[j] < n:
            j += 1
        if sizes[j] == n:
            out.append(values[j])
        else:
            lo, hi = sizes[j - 1], sizes[j]
            out.append(values[j - 1] + (values[j] - values[j - 1]) * (n - lo) / (hi - lo))
    return out


def save_sps(path: Union[str, os.PathLike], sps: torch.Tensor, **metadata: Union[str, int, float]) -> None:
    """Saves an ``sps`` table with ``metadata`` (e.g. model, GPU, dtype) for ``load_sps``."""
    _check_sps(sps, "sps")
    for key, value in metadata.items():
        if not isinstance(value, (str, int, float)):
            raise ValueError(f"metadata {key!r} must be a str, int or float, got {type(value).__name__}")
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"sps": sps.detach().cpu().clone(), "metadata": dict(metadata)}, path)


def load_sps(path: Union[str, os.PathLike]) -> Tuple[torch.Tensor, Metadata]:
    """``(sps, metadata)`` as written by ``save_sps``."""
    data = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(data, dict) or set(data) != {"sps", "metadata"} or not isinstance(data["metadata"], dict):
        raise ValueError(f"{path} does not hold a save_sps table")
    _check_sps(data["sps"], f"the sps table in {path}")
    return data["sps"], data["metadata"]


def _check_sps(sps: torch.Tensor, name: str) -> None:
    if not isinstance(sps, torch.Tensor) or sps.dim() != 1 or sps.numel() < 2 or sps.dtype != torch.float32:
        what = f"{sps.dtype} {list(sps.shape)}" if isinstance(sps, torch.Tensor) else type(sps).__name__
        raise ValueError(f"{name} must be a 1-D float32 tensor of shape [max_tokens + 1] >= [2], got {what}")
    if not bool((torch.isfinite(sps[1:]) & (sps[1:] > 0)).all()):
        raise ValueError(f"{name} must be finite and > 0 at n = 1..max_tokens")


# --------------------------------------------------------------------------- metrics


def expected_calibration_error(probs: torch.Tensor, labels: torch.Tensor, num_bins: int = 20) -> float:
    """ECE of ``probs`` [N] in [0, 1] against 0/1 ``labels`` [N], with ``num_bins`` equal-width bins:
    ``sum_b (n_b / N) |mean(p in b) - mean(y in b)|``, bin ``min(floor(p * num_bins), num_bins - 1)``."""
    probs, labels = _check_scores(probs, labels, "probs", probability=True)
    _check_num_bins(num_bins)
    return _ece(probs[None], labels, num_bins)[0].item()


def auroc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """Area under the ROC curve of ``scores`` [N] for 0/1 ``labels`` [N] (Mann-Whitney rank sum,
    ties get average ranks); NaN when ``labels`` has a single class."""
    scores, labels = _check_scores(scores, labels, "scores")
    return _auroc(scores, labels)


def brier_score(probs: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean squared error ``mean((p - y)^2)`` of ``probs`` [N] against 0/1 ``labels`` [N]."""
    probs, labels = _check_scores(probs, labels, "probs", probability=True)
    return (probs - labels).square().mean().item()


def _ece(probs: torch.Tensor, labels: torch.Tensor, num_bins: int) -> torch.Tensor:
    """ECE of each row of ``probs`` [G, N] against ``labels`` [N]: float64 [G]."""
    bins = (probs * num_bins).long().clamp_(max=num_bins - 1)  # probs >= 0: truncation is floor
    gaps = torch.zeros(probs.shape[0], num_bins, dtype=torch.float64).scatter_add_(1, bins, probs - labels)
    # (n_b / N) |sum_p / n_b - sum_y / n_b| = |sum_b (p - y)| / N: empty bins add nothing.
    return gaps.abs().sum(1) / probs.shape[1]


def _auroc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    num_pos = labels.sum().item()
    num_neg = labels.numel() - num_pos
    if num_pos == 0 or num_neg == 0:
        return float("nan")
    _, inverse, counts = torch.unique(scores, return_inverse=True, return_counts=True)
    counts = counts.double()
    average_rank = counts.cumsum(0) - (counts - 1) / 2  # 1-based, averaged over each tie group
    rank_sum = average_rank[inverse][labels.bool()].sum().item()
    return (rank_sum - num_pos * (num_pos + 1) / 2) / (num_pos * num_neg)


def _check_scores(scores, labels, name: str, probability: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
    scores, labels = torch.as_tensor(scores), torch.as_tensor(labels)
    if scores.dim() != 1 or scores.numel() == 0:
        raise ValueError(f"{name} must be a non-empty 1-D tensor, got shape {list(scores.shape)}")
    if tuple(labels.shape) != tuple(scores.shape):
        raise ValueError(f"labels must have the shape of {name} {list(scores.shape)}, got {list(labels.shape)}")
    scores = scores.detach().cpu().double()
    if not bool(torch.isfinite(scores).all()) or (probability and not bool(((scores >= 0) & (scores <= 1)).all())):
        raise ValueError(f"{name} must be finite" + (" and in [0, 1]" if probability else ""))
    return scores, _check_binary(labels, "labels")


def _check_binary(labels: torch.Tensor, name: str) -> torch.Tensor:
    labels = labels.detach().cpu()
    if labels.dtype != torch.bool and not bool(((labels == 0) | (labels == 1)).all()):
        raise ValueError(f"{name} must be bool or hold only 0 and 1")
    return labels.double()


def _check_num_bins(num_bins: int) -> None:
    if isinstance(num_bins, bool) or not isinstance(num_bins, int) or num_bins < 1:
        raise ValueError(f"num_bins must be an int >= 1, got {num_bins!r}")


# --------------------------------------------------------------------------- STS


@dataclass(frozen=True, eq=False)
class STSCalibration:
    """What ``calibrate_sts`` returns. ``temperatures`` float32 [K] goes to
    ``ConfidenceHead.set_sts_temperature``; the metrics are float64 [K], per position k, of the
    cumulative confidence P_k against the prefix acceptance y_k, before (all T = 1) and after STS.
    ``biases`` float32 [K] (``calibrate_sts(bias=True)``; None without) goes with them."""

    temperatures: torch.Tensor
    ece_before: torch.Tensor
    ece_after: torch.Tensor
    auroc_before: torch.Tensor
    auroc_after: torch.Tensor
    brier_before: torch.Tensor
    brier_after: torch.Tensor
    num_bins: int = 20
    #: bool [K]: an end of the search range [0.02, 50] is as good as T_k (the ECE is flat or
    #: still falling there, typically at a position with almost no accepted prefixes), so T_k
    #: is not a real optimum.
    at_grid_edge: Optional[torch.Tensor] = None
    #: int [K]: held-out rollouts whose first k drafts were all accepted (the positives of P_k).
    positives: Optional[torch.Tensor] = None
    biases: Optional[torch.Tensor] = None

    @property
    def edge_positions(self) -> list:
        """1-based positions whose temperature sits at an end of the search range."""
        return [] if self.at_grid_edge is None else [k + 1 for k in range(self.at_grid_edge.numel())
                                                     if bool(self.at_grid_edge[k])]

    @property
    def mean_ece_before(self) -> float:
        return self.ece_before.mean().item()

    @property
    def mean_ece_after(self) -> float:
        return self.ece_after.mean().item()

    def summary(self) -> str:
        """A Markdown table of the per-position temperatures and metrics."""
        lines = [
            f"| position | T | ECE ({self.num_bins} bins) before → after "
            "| AUROC before / after | Brier before / after | accepted prefixes |",
            "|---:|---:|---:|---:|---:|---:|",
        ]
        for k in range(self.temperatures.numel()):
            edge = " (grid edge)" if k + 1 in self.edge_positions else ""
            count = "" if self.positives is None else str(int(self.positives[k]))
            offset = "" if self.biases is None else f", b = {self.biases[k].item():+.3f}"
            lines.append(
                f"| {k + 1} | {self.temperatures[k].item():.3f}{offset}{edge} "
                f"| {self.ece_before[k].item():.4f} → {self.ece_after[k].item():.4f} "
                f"| {self.auroc_before[k].item():.4f} / {self.auroc_after[k].item():.4f} "
                f"| {self.brier_before[k].item():.4f} / {self.brier_after[k].item():.4f} | {count} |"
            )
        lines.append(
            f"| mean | | {self.mean_ece_before:.4f} → {self.mean_ece_after:.4f} "
            f"| {self.auroc_before.nanmean().item():.4f} / {self.auroc_after.nanmean().item():.4f} "
            f"| {self.brier_before.mean().item():.4f} / {self.brier_after.mean().item():.4f} | |"
        )
        return "\n".join(lines)


def cumulative_confidence(conf_logits: torch.Tensor, temperatures: Optional[Temperatures] = None,
                          biases: Optional[Temperatures] = None) -> torch.Tensor:
    """``P`` [N, K] float64: ``P[:, k] = prod_{i<=k} sigmoid(z_i / T_i + b_i)``, the probability
    that the first k + 1 drafts are all accepted, from raw confidence logits ``conf_logits``
    [N, K] (``temperatures`` [K], default all 1; ``biases`` [K], default all 0)."""
    z = _check_conf_logits(conf_logits)
    t = _check_temperatures(temperatures, z.shape[1])
    b = torch.zeros(z.shape[1], dtype=torch.float64) if biases is None else torch.as_tensor(biases).detach().double()
    if tuple(b.shape) != (z.shape[1],) or not bool(torch.isfinite(b).all()):
        raise ValueError(f"biases must be finite with shape [K] = [{z.shape[1]}], got {b.tolist()}")
    return torch.sigmoid(z / t + b).cumprod(dim=1)


def prefix_acceptance(accepted: torch.Tensor, num_rollouts: int, num_draft: int) -> torch.Tensor:
    """``y`` [N, K] float64, ``y[:, k] = 1[first k + 1 drafts accepted]``, from accepted lengths [N]
    (integers in 0..K) or per-position acceptance indicators [N, K] (bool or 0/1)."""
    accepted = torch.as_tensor(accepted).detach().cpu()
    if tuple(accepted.shape) == (num_rollouts,):
        if accepted.dtype == torch.bool or accepted.is_floating_point() or accepted.is_complex():
            raise ValueError(f"accepted lengths [N] must be an integer tensor, got {accepted.dtype}")
        if not bool(((accepted >= 0) & (accepted <= num_draft)).all()):
            raise ValueError(f"accepted lengths must be in [0, K = {num_draft}], got min {accepted.min().item()} "
                             f"max {accepted.max().item()}")
        return (accepted[:, None] > torch.arange(num_draft)).double()
    if tuple(accepted.shape) == (num_rollouts, num_draft):
        return _check_binary(accepted, "accepted indicators [N, K]").cumprod(dim=1)
    raise ValueError(
        f"accepted must have shape [N] = [{num_rollouts}] (lengths) or [N, K] = [{num_rollouts}, {num_draft}] "
        f"(indicators), got {list(accepted.shape)}"
    )


def calibrate_sts(
    conf_logits: torch.Tensor, accepted: torch.Tensor, *, num_bins: int = 20, grid_size: int = 241,
    bias: bool = False,
) -> STSCalibration:
    """Sequential Temperature Scaling on held-out rollouts.

    ``conf_logits`` [N, K]: the raw confidence logits z (before STS); ``accepted``: accepted
    lengths [N] or per-position acceptance indicators [N, K] (see ``prefix_acceptance``). For
    k = 1..K in order, with T_1..T_{k-1} fixed, T_k minimises the ECE (``num_bins`` bins) of
    P_k against y_k: over ``grid_size`` log-spaced temperatures in [0.02, 50] (T = 1 always
    among them), then a finer log grid between the best one's neighbours. Ties go to the T
    closest to 1 in log space. A temperature keeps each position's ranking, so P_1's AUROC
    does not change.

    ``bias``: each position then also gets an offset b_k, fitted with T_k in the same order:
    (1 / T_k, b_k) minimise the binary cross-entropy of P_{k-1} sigmoid(z_k / T_k + b_k)
    against y_k (Platt scaling inside the product, from the ECE-best T_k and b_k = 0; T_k kept
    in [STS_MIN_T, STS_MAX_T]). An offset can move a position's ranking only together with the
    earlier positions' product, so P_1's AUROC still does not change.
    """
    z = _check_conf_logits(conf_logits)
    num_rollouts, num_draft = z.shape
    y = prefix_acceptance(accepted, num_rollouts, num_draft)
    _check_num_bins(num_bins)
    if isinstance(grid_size, bool) or not isinstance(grid_size, int) or grid_size < 2:
        raise ValueError(f"grid_size must be an int >= 2, got {grid_size!r}")

    coarse = torch.linspace(math.log(STS_MIN_T), math.log(STS_MAX_T), grid_size, dtype=torch.float64).exp()
    coarse = torch.cat([coarse, torch.ones(1, dtype=torch.float64)]).unique()  # sorted
    temperatures = torch.ones(num_draft, dtype=torch.float32)  # what the head applies: later positions see it
    biases = torch.zeros(num_draft, dtype=torch.float32)
    at_edge = torch.zeros(num_draft, dtype=torch.bool)
    prev = torch.ones(num_rollouts, dtype=torch.float64)  # P_{k-1} with the temperatures found so far
    for k in range(num_draft):
        coarse_ece = _ece_over_temperatures(prev, z[:, k], y[:, k], coarse, num_bins)
        best = _pick(coarse, coarse_ece)
        i = int((coarse == best).nonzero()[0])
        lo, hi = coarse[max(i - 1, 0)].log(), coarse[min(i + 1, coarse.numel() - 1)].log()
        fine = torch.linspace(lo.item(), hi.item(), STS_REFINE_SIZE, dtype=torch.float64).exp()
        fine_ece = _ece_over_temperatures(prev, z[:, k], y[:, k], fine, num_bins)
        eces = torch.cat([coarse_ece, fine_ece])
        temperatures[k] = _pick(torch.cat([coarse, fine]), eces)
        # An end of the range that is as good as the choice: the ECE is flat or still falling there.
        at_edge[k] = bool(torch.minimum(coarse_ece[0], coarse_ece[-1]) <= eces.min() + _ECE_TIE)
        if bias:
            temperatures[k], biases[k] = _fit_offset(prev, z[:, k], y[:, k], float(temperatures[k]))
            at_edge[k] = bool(temperatures[k] <= STS_MIN_T * (1 + 1e-6) or temperatures[k] >= STS_MAX_T * (1 - 1e-6))
        prev = prev * torch.sigmoid(z[:, k] / temperatures[k].double() + biases[k].double())

    before = _position_metrics(z, y, None, num_bins)
    after = _position_metrics(z, y, temperatures, num_bins, biases if bias else None)
    return STSCalibration(temperatures, before[0], after[0], before[1], after[1], before[2], after[2], num_bins,
                          at_edge, y.sum(dim=0).to(torch.int64), biases.clone() if bias else None)


def _fit_offset(prev: torch.Tensor, z: torch.Tensor, y: torch.Tensor, temperature: float) -> Tuple[float, float]:
    """(T, b) minimising the binary cross-entropy of ``prev * sigmoid(z / T + b)`` against ``y``,
    from (``temperature``, 0), T clamped to [STS_MIN_T, STS_MAX_T] (LBFGS in float64)."""
    low, high = math.log(1 / STS_MAX_T), math.log(1 / STS_MIN_T)
    params = torch.tensor([math.log(1 / temperature), 0.0], dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([params], max_iter=200, tolerance_grad=1e-10, tolerance_change=1e-12,
                                  line_search_fn="strong_wolfe")

    def loss():
        optimizer.zero_grad()
        scale = params[0].clamp(low, high).exp()
        p = (prev * torch.sigmoid(z * scale + params[1])).clamp(1e-12, 1 - 1e-12)
        value = torch.nn.functional.binary_cross_entropy(p, y)
        value.backward()
        return value

    with torch.enable_grad():
        optimizer.step(loss)
    scale = float(params[0].detach().clamp(low, high).exp())
    return 1.0 / scale, float(params[1].detach())


def _ece_over_temperatures(
    prev: torch.Tensor, z: torch.Tensor, y: torch.Tensor, temperatures: torch.Tensor, num_bins: int
) -> torch.Tensor:
    """ECE [G] of ``prev * sigmoid(z / T)`` against ``y`` for each of ``temperatures`` [G]."""
    chunk = max(1, _CHUNK_ELEMENTS // z.numel())
    return torch.cat([_ece(prev * torch.sigmoid(z / t[:, None]), y, num_bins) for t in temperatures.split(chunk)])


def _pick(temperatures: torch.Tensor, eces: torch.Tensor) -> torch.Tensor:
    """The temperature of least ECE; among ties, the one closest to 1 in log space."""
    tied = eces <= eces.min() + _ECE_TIE
    distance = torch.where(tied, temperatures.log().abs(), torch.inf)
    return temperatures[distance.argmin()]


def _position_metrics(
    z: torch.Tensor, y: torch.Tensor, temperatures: Optional[torch.Tensor], num_bins: int,
    biases: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-position (ECE, AUROC, Brier), float64 [K] each, of P_k against y_k."""
    p = cumulative_confidence(z, temperatures, biases)
    ece = torch.cat([_ece(p[None, :, k], y[:, k], num_bins) for k in range(z.shape[1])])
    roc = torch.tensor([_auroc(p[:, k], y[:, k]) for k in range(z.shape[1])], dtype=torch.float64)
    brier = (p - y).square().mean(dim=0)
    return ece, roc, brier


def _check_conf_logits(conf_logits: torch.Tensor) -> torch.Tensor:
    z = torch.as_tensor(conf_logits)
    if not z.is_floating_point():
        raise ValueError(f"conf_logits must be a floating-point tensor, got {z.dtype}")
    if z.dim() != 2 or z.shape[0] < 1 or z.shape[1] < 1:
        raise ValueError(f"conf_logits must have shape [N, K] with N, K >= 1, got {list(z.shape)}")
    z = z.detach().cpu().double()
    if not bool(torch.isfinite(z).all()):
        raise ValueError("conf_logits must be finite (found NaN or inf)")
    return z


def _check_temperatures(temperatures: Optional[Temperatures], num_draft: int) -> torch.Tensor:
    if temperatures is None:
        return torch.ones(num_draft, dtype=torch.float64)
    t = torch.as_tensor(temperatures).detach().cpu().double()
    if tuple(t.shape) != (num_draft,):
        raise ValueError(f"temperatures must have shape [K] = [{num_draft}], got {list(t.shape)}")
    if not bool((torch.isfinite(t) & (t > 0)).all()):
        raise ValueError(f"temperatures must be finite and > 0, got {t.tolist()}")
    return t


# --------------------------------------------------------------------------- reliability diagram


def reliability_diagram(
    conf_logits: torch.Tensor,
    accepted: torch.Tensor,
    calibration_or_temperatures: Union[STSCalibration, Temperatures],
    path: Union[str, os.PathLike],
    *,
    num_bins: int = 20,
    title: Optional[str] = None,
) -> pathlib.Path:
    """Saves a PNG of the per-position reliability diagrams of P_k against y_k, before (T = 1) and
    after STS, with each position's ECE and bin counts; returns its path. Needs matplotlib."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as e:
        raise ImportError("reliability_diagram needs matplotlib: pip install matplotlib") from e

    z = _check_conf_logits(conf_logits)
    num_rollouts, num_draft = z.shape
    y = prefix_acceptance(accepted, num_rollouts, num_draft)
    _check_num_bins(num_bins)
    biases = None
    if isinstance(calibration_or_temperatures, STSCalibration):
        temperatures, biases = calibration_or_temperatures.temperatures, calibration_or_temperatures.biases
    else:
        temperatures = calibration_or_temperatures
    temperatures = _check_temperatures(temperatures, num_draft)
    curves = {
        "before (T = 1)": ("tab:red", cumulative_confidence(z)),
        "after STS": ("tab:blue", cumulative_confidence(z, temperatures, biases)),
    }

    num_cols = min(4, num_draft)
    num_rows = math.ceil(num_draft / num_cols)
    # Our own Agg canvas, not pyplot: the user's interactive backend is left alone.
    fig = Figure(figsize=(3.4 * num_cols, 3.2 * num_rows), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(num_rows, num_cols, squeeze=False).flatten()
    width = 1.0 / num_bins
    edges = [b * width for b in range(num_bins)]  # left edge of each bin
    for k, ax in enumerate(axes):
        if k >= num_draft:
            ax.set_visible(False)
            continue
        counts_ax = ax.twinx()
        ax.set_zorder(counts_ax.get_zorder() + 1)  # curves above the count background
        ax.patch.set_visible(False)
        ax.plot([0, 1], [0, 1], color="0.5", linestyle="--", linewidth=1)
        for label, (color, p) in curves.items():
            mean_p, mean_y, counts = _bin_stats(p[:, k], y[:, k], num_bins)
            ece = _ece(p[None, :, k], y[:, k], num_bins).item()
            nonempty = counts > 0
            ax.plot(mean_p[nonempty].tolist(), mean_y[nonempty].tolist(), marker="o", markersize=3, color=color,
                    label=f"{label}: ECE {ece:.3f}")
            counts_ax.bar(edges, counts.tolist(), width=width, align="edge", color=color, alpha=0.12, linewidth=0)
        t = temperatures[k].item()
        ax.set(xlim=(0, 1), ylim=(0, 1), title=f"position {k + 1} (T = {t:.2f})")
        ax.set_xlabel(f"predicted P_{k + 1}")
        ax.set_ylabel("observed prefix acceptance")
        ax.legend(loc="upper left", fontsize=7)
        counts_ax.set_ylabel("count", color="0.5")
        counts_ax.tick_params(axis="y", labelsize=7, colors="0.5")
    fig.suptitle(title if title is not None else f"Reliability of the cumulative confidence ({num_rollouts} rollouts)")

    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, format="png")
    return path


def _bin_stats(probs: torch.Tensor, labels: torch.Tensor, num_bins: int):
    """Per-bin (mean prediction, observed frequency, count), float64 [num_bins] each; 0 where empty."""
    bins = (probs * num_bins).floor().clamp_(0, num_bins - 1).long()
    counts = torch.bincount(bins, minlength=num_bins).double()
    sum_p = torch.bincount(bins, weights=probs, minlength=num_bins)
    sum_y = torch.bincount(bins, weights=labels, minlength=num_bins)
    safe = counts.clamp(min=1)
    return sum_p / safe, sum_y / safe, counts
