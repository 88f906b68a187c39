"""Lagged survival forecasts: how many of a drafter's drafts a request will see accepted, known
before the round drafts (so that planning on it keeps the output law exact).

A drafter's confidences say how likely each draft is to survive verification, but only after it
has drafted. Planning the next round needs a number before that: ``SurvivalForecast`` keeps, per
request, the mean survival (the cumulative product of the confidences) of the rounds it drafted,
pooled with the drafter's mean over every request. One round's confidences barely predict the
next round's (lag-1 correlation 0.13 for the shipped DSpark drafter on MT-Bench): forecasting from
the last round alone switched a drafter off after one unlucky round.
"""

from typing import Optional, Sequence

import torch

#: A request's own mean is pooled with the mean over every request, weighted as this many of its
#: own rounds.
PRIOR_ROUNDS = 8
#: The mean over every request is a running mean of the rounds' batch means until it has seen
#: 1 / PRIOR_DECAY rounds, then follows them with this weight.
PRIOR_DECAY = 0.02


class SurvivalForecast:
    """Per-request lagged survival forecasts [B, K] of one drafter.

    ``prior`` [K] (e.g. the drafter's held-out survival, ``DrafterConfig.heldout_survival``) is
    where the mean over every request starts, counted as ``PRIOR_ROUNDS`` rounds; without it the
    forecast is 1 until the drafter has drafted once (try it once)."""

    def __init__(self, num_draft: int, prior: Optional[Sequence[float]] = None):
        self.num_draft = int(num_draft)
        self.sums = torch.zeros(0, self.num_draft, dtype=torch.float64)  # per request: sum of survivals
        self.rounds = torch.zeros(0, dtype=torch.int64)  # per request: rounds behind the sum
        # per request and position: rounds that drafted the position (a short round drafts the
        # first few positions only; the later ones keep their forecast)
        self.position_rounds = torch.zeros(0, self.num_draft, dtype=torch.int64)
        self.prior: Optional[torch.Tensor] = None  # [K] float32: the mean over every request
        self.prior_rounds = torch.zeros(self.num_draft, dtype=torch.int64)  # per position
        self._forecast: Optional[torch.Tensor] = None
        if prior is not None:
            if len(prior) != self.num_draft:
                raise ValueError(f"the survival prior has {len(prior)} positions, expected K = {self.num_draft}")
            self.prior = torch.tensor([float(p) for p in prior], dtype=torch.float32)
            self.prior_rounds += PRIOR_ROUNDS

    @classmethod
    def for_drafter(cls, drafter) -> "SurvivalForecast":
        """The forecast of ``drafter``'s drafts, from its config's ``heldout_survival`` when it
        has one."""
        return cls(int(drafter.num_draft), getattr(getattr(drafter, "cfg", None), "heldout_survival", None))

    def resize(self, num_requests: int) -> None:
        """Forget every request when the batch size changes (a new batch)."""
        if self.rounds.shape[0] != num_requests:
            self.sums = torch.zeros(num_requests, self.num_draft, dtype=torch.float64)
            self.rounds = torch.zeros(num_requests, dtype=torch.int64)
            self.position_rounds = torch.zeros(num_requests, self.num_draft, dtype=torch.int64)
            self._forecast = None

    def restart(self, rows: torch.Tensor) -> None:
        """A new request takes each row in ``rows`` ([B] bool): it starts from the pooled mean."""
        rows = rows.cpu()
        if bool(rows.any()):
            self.sums[rows] = 0.0
            self.rounds[rows] = 0
            self.position_rounds[rows] = 0
            self._forecast = None

    def update(self, survival: torch.Tensor) -> None:
        """One drafting round's survival [B, n] (cumulative products of its confidences) of its
        first n <= K positions (a short round drafts fewer than K)."""
        survival = survival.detach().float().cpu()
        n = survival.shape[1]
        if not 1 <= n <= self.num_draft:
            raise ValueError(f"survival must cover 1 to {self.num_draft} positions, got {n}")
        self.sums[:, :n] += survival.double()
        self.rounds += 1
        self.position_rounds[:, :n] += 1
        self.prior_rounds[:n] += 1
        mean = survival.mean(0)
        weight = (1.0 / self.prior_rounds[:n].double()).clamp(min=PRIOR_DECAY).float()
        if self.prior is None:  # positions never drafted stay at 1 (try them once)
            self.prior = torch.ones(self.num_draft)
        self.prior[:n] = (1 - weight) * self.prior[:n] + weight * mean
        self._forecast = None

    def forecast(self) -> torch.Tensor:
        """[B, K] float32: each request's mean survival so far, pooled with the mean over every
        request (``PRIOR_ROUNDS`` rounds' weight); 1 everywhere before the first round without
        a prior."""
        if self.prior is None:
            return torch.ones(self.rounds.shape[0], self.num_draft)
        if self._forecast is None:  # kept until a round, a restart or a resize changes it
            pooled = (self.sums + PRIOR_ROUNDS * self.prior.double()) / (self.position_rounds + PRIOR_ROUNDS)
            self._forecast = pooled.float()
        return self._forecast.clone()
