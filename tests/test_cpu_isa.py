"""The CPU kernel is built once per instruction set (plain C++, AVX2, AVX-512) and picked
at run time from ATen's capability. Each build must take the same decisions: greedy
outputs identical, sampled outputs identical except at floating-point near-ties."""

import json
import subprocess
import sys

import pytest
import torch

CAPABILITIES = ["default", "avx2", "avx512"]

_RUN_ONE_CAPABILITY = r"""
import json, torch, dspark_ext
torch.manual_seed(0)
B, K, V = 512, 3, 4099
D = B * K
target = torch.randn(D + B, V) * 3
draft = target[:D].clone() + torch.randn(D, V)
ids = torch.distributions.Categorical(logits=draft).sample()
cu = torch.arange(0, D + 1, K, dtype=torch.int32)
seed, offset = torch.arange(B), torch.full((B,), 7)
results = {}
for name, temperature, draft_logits in [("greedy", 0.0, None), ("onehot", 1.0, None), ("draft_logits", 0.8, draft)]:
    for dtype in (torch.float32, torch.bfloat16):
        out, accepted = torch.ops.dspark.verify(target.to(dtype), ids, None if draft_logits is None else draft_logits.to(dtype),
                                                cu, torch.full((B,), temperature), seed, offset, K)
        results[f"{name}/{dtype}"] = out.tolist()
print(json.dumps(results))
"""


def _outputs_with(capability: str) -> dict:
    env = {"ATEN_CPU_CAPABILITY": capability, "PATH": "/usr/bin:/bin"}
    completed = subprocess.run(
        [sys.executable, "-c", _RUN_ONE_CAPABILITY], env=env, capture_output=True, text=True, timeout=300, check=True
    )
    return json.loads(completed.stdout)


def _supported_capabilities() -> list:
    best = torch.backends.cpu.get_cpu_capability().lower()
    return CAPABILITIES[: CAPABILITIES.index(best) + 1] if best in CAPABILITIES else ["default"]


@pytest.fixture(scope="module")
def outputs_by_capability():
    return {capability: _outputs_with(capability) for capability in _supported_capabilities()}


@pytest.mark.parametrize("capability", ["default", "avx2"])
def test_instruction_set_builds_agree(outputs_by_capability, capability):
    best = _supported_capabilities()[-1]
    if capability == best or capability not in outputs_by_capability:
        pytest.skip(f"this CPU's best build is {best}: nothing to compare {capability} with")
    reference, other = outputs_by_capability[best], outputs_by_capability[capability]
    for case, rows in reference.items():
        if case.startswith("greedy"):
            assert other[case] == rows, case
        else:
            equal = sum(a == b for a, b in zip(rows, other[case]))
            assert equal >= 0.998 * len(rows), f"{case}: only {equal}/{len(rows)} rows agree"
