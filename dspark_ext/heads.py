"""DSpark drafting heads: the Markov bias head and the confidence head.

Training uses the differentiable, teacher-forced ``forward`` of each head (every draft
position at once, from the known previous tokens). Inference drafts through
``torch.ops.dspark.markov_draft`` (``draft``), which runs the same float32 math one position
after the other on its own draft tokens.
"""

from typing import NamedTuple, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from dspark_ext.ops import markov_draft

#: A per-request argument: one value for the whole batch, or a [B] tensor.
PerRequest = Union[float, int, torch.Tensor]


class MarkovDraft(NamedTuple):
    """What ``MarkovHead.draft`` / ``ConfidenceHead.draft`` return."""

    draft_token_ids: torch.Tensor  # [B, K] int64
    draft_logits: torch.Tensor  # [B, K, V], base_logits' dtype, Markov bias included, before temperature
    confidence: Optional[torch.Tensor]  # [B, K] float32; None without a confidence head


def previous_tokens(anchor_ids: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    """The teacher-forced ``prev_token_ids`` [B, K] of tokens ``token_ids`` [B, K]: the anchor
    [B] followed by the first K - 1 tokens (position k follows token x_{k-1})."""
    return torch.cat([anchor_ids[:, None].to(token_ids.dtype), token_ids[:, :-1]], dim=1)


def _per_request(value: PerRequest, num_requests: int, dtype: torch.dtype, device: torch.device, name: str):
    tensor = torch.as_tensor(value, dtype=dtype, device=device)
    if tensor.dim() == 0:
        return tensor.expand(num_requests).contiguous()
    if tuple(tensor.shape) != (num_requests,):
        raise ValueError(f"{name} must be a scalar or have shape [{num_requests}], got {list(tensor.shape)}")
    return tensor


class MarkovHead(nn.Module):
    """Low-rank first-order Markov bias on the backbone's logits:
    ``l_k = U_k + W2 @ W1[x_{k-1}]``, W1 = ``w1.weight`` [V, r], W2 = ``w2.weight`` [V, r]."""

    def __init__(self, vocab_size: int, rank: int):
        super().__init__()
        self.w1 = nn.Embedding(vocab_size, rank)
        self.w2 = nn.Linear(rank, vocab_size, bias=False)

    @property
    def vocab_size(self) -> int:
        return self.w1.num_embeddings

    @property
    def rank(self) -> int:
        return self.w1.embedding_dim

    def bias(self, prev_token_ids: torch.Tensor) -> torch.Tensor:
        """float32 Markov bias [..., V] of the token following each of ``prev_token_ids`` [...]."""
        return F.linear(self.w1(prev_token_ids).float(), self.w2.weight.float())

    def forward(self, base_logits: torch.Tensor, prev_token_ids: torch.Tensor) -> torch.Tensor:
        """Teacher-forced drafting logits [B, K, V] float32: ``float32(base_logits) + bias(prev_token_ids)``.

        ``base_logits`` [B, K, V]; ``prev_token_ids`` [B, K] with ``prev_token_ids[:, k] = x_{k-1}``
        (see ``previous_tokens``). This is the op's math before its final rounding to
        base_logits' dtype; differentiable in w1, w2 (and base_logits if it requires grad)."""
        self._check_base_logits(base_logits)
        if tuple(prev_token_ids.shape) != tuple(base_logits.shape[:2]):
            raise ValueError(
                f"prev_token_ids must have shape [B, K] = {list(base_logits.shape[:2])}, "
                f"got {list(prev_token_ids.shape)}"
            )
        return base_logits.float() + self.bias(prev_token_ids)

    def draft(
        self,
        base_logits: torch.Tensor,
        anchor_ids: torch.Tensor,
        temperature: PerRequest,
        seed: PerRequest,
        offset: PerRequest,
        confidence_head: Optional["ConfidenceHead"] = None,
        hidden_states: Optional[torch.Tensor] = None,
    ) -> MarkovDraft:
        """Drafts K tokens per request with ``dspark::markov_draft`` (no autograd).

        ``base_logits`` [B, K, V]; ``anchor_ids`` [B], the token x_0 the drafts follow;
        ``temperature`` (0 = greedy), ``seed`` and ``offset`` (bump it every step) are scalars
        or [B] tensors. With a ``confidence_head`` and its ``hidden_states`` [B, K, H], the op
        also returns each position's calibrated confidence."""
        self._check_base_logits(base_logits)
        num_requests, num_draft, _ = base_logits.shape
        device = base_logits.device
        if tuple(anchor_ids.shape) != (num_requests,):
            raise ValueError(f"anchor_ids must have shape [B] = [{num_requests}], got {list(anchor_ids.shape)}")
        w1, w2 = self.w1.weight.detach(), self.w2.weight.detach()
        if w1.dtype not in (torch.float32, base_logits.dtype) or w2.dtype != w1.dtype:
            raise ValueError(
                f"the Markov weights must be float32 or base_logits' dtype {base_logits.dtype}, "
                f"got {w1.dtype} / {w2.dtype}"
            )
        if (confidence_head is None) != (hidden_states is None):
            raise ValueError("confidence_head and hidden_states must be given together")
        conf_args = (None, None, None)
        if confidence_head is not None:
            if confidence_head.rank != self.rank:
                raise ValueError(f"confidence_head has rank {confidence_head.rank}, the Markov head {self.rank}")
            if hidden_states.dim() != 3 or tuple(hidden_states.shape[:2]) != (num_requests, num_draft):
                raise ValueError(
                    f"hidden_states must have shape [B, K, H] with [B, K] = {[num_requests, num_draft]}, "
                    f"got {list(hidden_states.shape)}"
                )
            conf_args = confidence_head.op_arguments(hidden_states)
        token_ids, logits, confidence = markov_draft(
            base_logits.detach(),
            anchor_ids.detach().to(device=device, dtype=torch.int64),
            w1,
            w2,
            _per_request(temperature, num_requests, torch.float32, device, "temperature"),
            _per_request(seed, num_requests, torch.int64, device, "seed"),
            _per_request(offset, num_requests, torch.int64, device, "offset"),
            *conf_args,
        )
        return MarkovDraft(token_ids, logits, confidence if confidence_head is not None else None)

    def _check_base_logits(self, base_logits: torch.Tensor) -> None:
        if base_logits.dim() != 3 or base_logits.shape[-1] != self.vocab_size:
            raise ValueError(
                f"base_logits must have shape [B, K, V] with V = {self.vocab_size}, got {list(base_logits.shape)}"
            )


class ConfidenceHead(nn.Module):
    """Per-position acceptance confidence of a draft:
    ``c_k = sigmoid((w_h . h_k + w_prev . W1[x_{k-1}] + bias) / sts_k)``.

    ``linear`` holds ``[w_h, w_prev]`` and ``bias``; ``h_k`` [H] is the backbone's hidden state
    at position k and ``W1`` the Markov head's embedding. ``sts_temperature`` [K] holds the
    per-position calibration temperatures (shape [0]: uncalibrated, all 1); it is saved in
    the state dict. ``sts_bias`` [K] (shape [0]: none) adds a per-position offset after the
    temperature, ``sigmoid(z / T_k + b_k)`` (``calibrate_sts(bias=True)``); it travels in the
    drafter's config, not the state dict, so checkpoints without it load unchanged."""

    sts_temperature: torch.Tensor
    sts_bias: torch.Tensor

    def __init__(self, hidden_size: int, rank: int):
        super().__init__()
        self.hidden_size = hidden_size
        self.rank = rank
        self.linear = nn.Linear(hidden_size + rank, 1)
        self.register_buffer("sts_temperature", torch.ones(0))
        self.register_buffer("sts_bias", torch.zeros(0), persistent=False)

    def set_sts_temperature(self, temperature: Optional[Union[torch.Tensor, Sequence[float]]],
                            bias: Optional[Union[torch.Tensor, Sequence[float]]] = None) -> None:
        """Installs the calibrated per-position temperatures [K] (None or [] = uncalibrated) and,
        optionally, per-position biases [K] (None or [] = none; only with temperatures)."""
        t = torch.as_tensor([] if temperature is None else temperature, dtype=torch.float32).detach()
        if t.dim() != 1:
            raise ValueError(f"sts temperature must have shape [K], got {list(t.shape)}")
        if not bool((torch.isfinite(t) & (t > 0)).all()):
            raise ValueError(f"sts temperatures must be finite and > 0, got {t.tolist()}")
        b = torch.as_tensor([] if bias is None else bias, dtype=torch.float32).detach()
        if b.numel() and tuple(b.shape) != tuple(t.shape):
            raise ValueError(f"sts bias must have the temperatures' shape {list(t.shape)}, got {list(b.shape)}")
        if not bool(torch.isfinite(b).all()):
            raise ValueError(f"sts biases must be finite, got {b.tolist()}")
        self.sts_temperature = t.to(self.sts_temperature.device).clone()
        self.sts_bias = b.to(self.sts_temperature.device).clone()

    def forward(self, hidden_states: torch.Tensor, prev_embedding: torch.Tensor) -> torch.Tensor:
        """Confidence logits z [B, K] float32 (before STS and sigmoid), for BCE-with-logits training.

        ``hidden_states`` [B, K, H]; ``prev_embedding`` [B, K, r] = ``markov_head.w1(prev_token_ids)``
        (detach it to keep the confidence loss out of W1)."""
        self._check_hidden_states(hidden_states)
        if prev_embedding.dim() != 3 or tuple(prev_embedding.shape) != (*hidden_states.shape[:2], self.rank):
            raise ValueError(
                f"prev_embedding must have shape [B, K, r] = {[*hidden_states.shape[:2], self.rank]}, "
                f"got {list(prev_embedding.shape)}"
            )
        features = torch.cat([hidden_states.float(), prev_embedding.float()], dim=-1)
        return F.linear(features, self.linear.weight.float(), self.linear.bias.float()).squeeze(-1)

    def probability(self, hidden_states: torch.Tensor, prev_embedding: torch.Tensor) -> torch.Tensor:
        """Calibrated confidence [B, K] float32: ``sigmoid(forward(...) / sts_temperature)``."""
        z = self(hidden_states, prev_embedding)
        sts = self._sts_for(z.shape[-1])
        if sts is not None:
            z = z / sts + self._sts_bias_for(z.shape[-1]) if self.sts_bias.numel() else z / sts
        return torch.sigmoid(z)

    def op_arguments(self, hidden_states: torch.Tensor):
        """``(conf_base [B, K], conf_w_prev [r], conf_temperature [K] or None)``, float32, for
        ``dspark::markov_draft``: ``conf_base = w_h . h + bias``, ``conf_w_prev = w_prev``, and the
        STS temperatures (None when uncalibrated). Detached: drafting has no autograd."""
        self._check_hidden_states(hidden_states)
        w_h, bias, w_prev, conf_temperature, sts_offset = self._op_constants(hidden_states.shape[1], hidden_states.device)
        conf_base = hidden_states.detach().float() @ w_h + bias
        if sts_offset is not None:
            # sigmoid((z + b T) / T) = sigmoid(z / T + b): the op's temperature scaling, offset.
            conf_base = conf_base + sts_offset
        return conf_base.contiguous(), w_prev, conf_temperature

    def _op_constants(self, num_draft: int, device):
        """(w_h [H], bias [1], w_prev [r], STS temperatures [K] or None, b T [K] or None) for
        ``op_arguments``, float32 on ``device``, built once per weight version and K: drafting
        rounds call it every round, where each small op costs more than its arithmetic."""
        weight, bias, sts, sts_bias = self.linear.weight, self.linear.bias, self.sts_temperature, self.sts_bias
        key = (num_draft, str(device), *((t.data_ptr(), t._version) for t in (weight, bias, sts, sts_bias)))
        if getattr(self, "_op_constants_key", None) != key:
            w = weight.detach().float()[0]
            temperature = self._sts_for(num_draft)
            temperature = None if temperature is None else temperature.to(device)
            offset = None
            if temperature is not None and sts_bias.numel():
                offset = (self._sts_bias_for(num_draft).to(device) * temperature)
            self._op_constants_value = (w[: self.hidden_size].to(device).contiguous(),
                                        bias.detach().float().to(device), w[self.hidden_size:].to(device).contiguous(),
                                        temperature, offset)
            self._op_constants_key = key
        return self._op_constants_value

    def draft(
        self,
        markov_head: MarkovHead,
        base_logits: torch.Tensor,
        hidden_states: torch.Tensor,
        anchor_ids: torch.Tensor,
        temperature: PerRequest,
        seed: PerRequest,
        offset: PerRequest,
    ) -> MarkovDraft:
        """``markov_head.draft`` with this head's confidence (see MarkovHead.draft)."""
        return markov_head.draft(base_logits, anchor_ids, temperature, seed, offset, self, hidden_states)

    def _sts_for(self, num_draft: int) -> Optional[torch.Tensor]:
        """The temperatures of the first ``num_draft`` positions: a block shorter than the
        calibration's (a short drafting round) takes its leading positions' temperatures."""
        if self.sts_temperature.numel() == 0:
            return None
        if not 1 <= num_draft <= self.sts_temperature.shape[0]:
            raise ValueError(
                f"sts_temperature is calibrated for K = {self.sts_temperature.shape[0]} positions, got K = {num_draft}"
            )
        return self.sts_temperature.float()[:num_draft]  # module.to(half) converts buffers too

    def _sts_bias_for(self, num_draft: int) -> torch.Tensor:
        return self.sts_bias.float()[:num_draft]

    def _check_hidden_states(self, hidden_states: torch.Tensor) -> None:
        if hidden_states.dim() != 3 or hidden_states.shape[-1] != self.hidden_size:
            raise ValueError(
                f"hidden_states must have shape [B, K, H] with H = {self.hidden_size}, got {list(hidden_states.shape)}"
            )

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # The calibration's length is only known once loaded: take the saved shape instead of
        # failing on a size mismatch with the [0] placeholder.
        saved = state_dict.get(prefix + "sts_temperature")
        if saved is not None:
            self.sts_temperature = torch.empty(saved.shape, dtype=torch.float32, device=self.sts_temperature.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
