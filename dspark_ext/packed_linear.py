"""Linear layers of a CPU target, packed once so that verifying drafts costs about what one token
costs: ``FusedLinear`` runs the few rows of a decoding or verification step through
``dspark::skinny_linear`` (each weight byte read once for every row, one fixed summation order
per output, so a token's result does not depend on how many tokens share the step), and the many
rows of a prompt through the BLAS GEMM on the original weights.

Several layers that read the same input (q/k/v; gate/up) are packed as one weight, so a step
makes one call for them.
"""

from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from dspark_ext.ops import pack_skinny_weight

#: Rows up to which ``skinny_linear`` beats the GEMM on the target's float32 layers
#: (bench/bench_skinny_linear.py on AVX2 and AVX-512; 32 = 4 requests x 8 verified tokens).
SKINNY_MAX_ROWS = 32


def skinny_supported(weight: torch.Tensor) -> bool:
    """``skinny_linear`` takes float32 CPU tensors."""
    return weight.device.type == "cpu" and weight.dtype == torch.float32


class FusedLinear:
    """One or more linear layers over the same input: ``__call__(x [T, K])`` returns their
    outputs ``(x @ w_i.T + b_i)`` in order. ``max_skinny_rows``: inputs of at most this many rows
    go through the packed weight (``skinny_linear``), larger ones through ``F.linear`` per layer;
    0 (or a weight ``skinny_linear`` does not take) = ``F.linear`` always. ``packed_dtype``: the
    packed weight's dtype (float32, or bfloat16 for half the bytes, rounding the weights; the
    F.linear path then uses the rounded weights too, so a row's result does not depend on how
    many rows share the call beyond the summation order)."""

    def __init__(self, parts: Sequence[Tuple[torch.Tensor, Optional[torch.Tensor]]],
                 max_skinny_rows: int = SKINNY_MAX_ROWS, packed_dtype: torch.dtype = torch.float32):
        self.parts = [(w, b) for w, b in parts]
        self.sizes = [w.shape[0] for w, _ in self.parts]
        in_features = {w.shape[1] for w, _ in self.parts}
        if len(in_features) != 1:
            raise ValueError(f"FusedLinear: the layers must share their input features, got {sorted(in_features)}")
        self.out_features = sum(self.sizes)
        usable = all(skinny_supported(w) and (b is None or skinny_supported(b)) for w, b in self.parts)
        self.max_skinny_rows = int(max_skinny_rows) if usable else 0
        self.packed = None
        self.bias = None
        if self.max_skinny_rows > 0:
            self.packed = pack_skinny_weight(torch.cat([w for w, _ in self.parts]).to(packed_dtype))
            if packed_dtype != torch.float32:  # past max_skinny_rows, F.linear on the same rounded weights
                self.parts = [(w.to(packed_dtype).float(), b) for w, b in self.parts]
            if any(b is not None for _, b in self.parts):
                self.bias = torch.cat([b if b is not None else w.new_zeros(w.shape[0]) for w, b in self.parts])

    def __call__(self, x: torch.Tensor) -> List[torch.Tensor]:
        if x.shape[0] <= self.max_skinny_rows:
            out = torch.ops.dspark.skinny_linear(x, self.packed, self.out_features, self.bias)
            return list(out.split(self.sizes, dim=-1)) if len(self.sizes) > 1 else [out]
        return [F.linear(x, w, b) for w, b in self.parts]
