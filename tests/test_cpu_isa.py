"""The CPU kernels are built once per instruction set (plain C++, AVX2, AVX-512) and picked
at run time from ATen's capability. Each build must take the same decisions: greedy
outputs identical, sampled outputs identical except at floating-point near-ties.

The inputs are made once, in this process, and handed to every build: torch's own random
generators (torch.randn) take vectorized paths too, so inputs drawn under another
capability would differ in the last bits.

dspark::markov_draft also computes: its float32 bias W2 . W1[x] is summed in an order that
depends on the vector width, so the corrected logits agree bitwise when every partial sum is
exact (small dyadic weights), and within rounding otherwise."""

import subprocess
import sys

import pytest
import torch

from helpers import MARKOV_LOGIT_TOLERANCE, runnable_cpu_builds

_RUN_ONE_CAPABILITY = r"""
import sys, torch, dspark_ext
inputs = torch.load(sys.argv[1])
results = {}
v = inputs["verify"]
for name, temperature, draft_logits in [("greedy", 0.0, None), ("onehot", 1.0, None),
                                       ("draft_logits", 0.8, v["draft"])]:
    for dtype in (torch.float32, torch.bfloat16):
        out, accepted = torch.ops.dspark.verify(v["target"].to(dtype), v["ids"],
                                                None if draft_logits is None else draft_logits.to(dtype), v["cu"],
                                                torch.full((v["B"],), temperature), v["seed"], v["offset"], v["K"])
        results[f"{name}/{dtype}"] = out
for case, args in inputs["markov"].items():
    ids, logits, confidence = torch.ops.dspark.markov_draft(*args)
    results[f"markov/{case}"] = dict(ids=ids, logits=logits, confidence=confidence)
torch.save(results, sys.argv[2])
"""


def _verify_inputs() -> dict:
    g = torch.Generator().manual_seed(0)
    B, K, V = 512, 3, 4099
    D = B * K
    target = torch.randn(D + B, V, generator=g) * 3
    draft = target[:D].clone() + torch.randn(D, V, generator=g)
    ids = torch.multinomial(torch.softmax(draft, dim=-1), 1, generator=g)[:, 0]
    return dict(B=B, K=K, target=target, draft=draft, ids=ids, cu=torch.arange(0, D + 1, K, dtype=torch.int32),
                seed=torch.arange(B), offset=torch.full((B,), 7))


def _markov_inputs() -> dict:
    """dspark::markov_draft argument tuples: B = 256 rows (blocks of 4 rows) and B = 3
    (a tail block), mixed temperatures, confidence; exact (dyadic) and Gaussian weights."""
    g = torch.Generator().manual_seed(1)
    K, V, r = 3, 4099, 24
    weights = {
        "exact": (torch.randint(-2, 3, (V, r), generator=g).float(),
                  torch.randint(-2, 3, (V, r), generator=g).float() / 4),
        "random": (torch.randn(V, r, generator=g), torch.randn(V, r, generator=g) * 0.3),
    }
    cases = {}
    for B in (256, 3):
        base = torch.randn(B, K, V, generator=g) * 2
        prev = torch.randint(0, V, (B,), generator=g)
        temperature = torch.tensor(([0.0, 1.0, 0.7, 0.0] * B)[:B])
        seed, offset = torch.arange(B), torch.full((B,), 3)
        conf = (torch.randn(B, K, generator=g), torch.randn(r, generator=g), torch.rand(K, generator=g) + 0.5)
        for weights_name, (w1, w2) in weights.items():
            for dtype in (torch.float32, torch.bfloat16):
                cases[f"B{B}/{weights_name}/{dtype}"] = (base.to(dtype), prev, w1, w2, temperature, seed, offset, *conf)
            # bf16 weights: AVX-512 CPUs with AVX512_BF16 sum them with vdpbf16ps.
            cases[f"B{B}/{weights_name}/bf16-weights"] = (base.to(torch.bfloat16), prev, w1.bfloat16(), w2.bfloat16(),
                                                          temperature, seed, offset, *conf)
    return cases


#: The AVX-512 build without its vdpbf16ps path for bf16 Markov weights.
AVX512_WITHOUT_BF16_DOT = "avx512-without-bf16-dot"


def _outputs_with(capability: str, inputs_path, outputs_path) -> dict:
    env = {"ATEN_CPU_CAPABILITY": capability.split("-")[0], "PATH": "/usr/bin:/bin"}
    if capability == AVX512_WITHOUT_BF16_DOT:
        env["DSPARK_DISABLE_AVX512_BF16"] = "1"
    subprocess.run([sys.executable, "-c", _RUN_ONE_CAPABILITY, str(inputs_path), str(outputs_path)], env=env,
                   capture_output=True, text=True, timeout=300, check=True)
    return torch.load(outputs_path)


def _supported_capabilities() -> list:
    """The builds this CPU can run, best last."""
    supported = runnable_cpu_builds()
    if supported[-1] == "avx512" and "avx512_bf16" in open("/proc/cpuinfo").read():
        supported.insert(-1, AVX512_WITHOUT_BF16_DOT)
    return supported


@pytest.fixture(scope="module")
def markov_inputs():
    return _markov_inputs()


@pytest.fixture(scope="module")
def outputs_by_capability(tmp_path_factory, markov_inputs):
    directory = tmp_path_factory.mktemp("isa")
    torch.save(dict(verify=_verify_inputs(), markov=markov_inputs), directory / "inputs.pt")
    return {capability: _outputs_with(capability, directory / "inputs.pt", directory / f"{capability}.pt")
            for capability in _supported_capabilities()}


def _reference_and_other(outputs_by_capability, capability):
    best = _supported_capabilities()[-1]
    if capability == best or capability not in outputs_by_capability:
        pytest.skip(f"this CPU's best build is {best}: nothing to compare {capability} with")
    return outputs_by_capability[best], outputs_by_capability[capability]


@pytest.mark.parametrize("capability", ["default", "avx2"])
def test_instruction_set_builds_agree(outputs_by_capability, capability):
    reference, other = _reference_and_other(outputs_by_capability, capability)
    for case, rows in reference.items():
        if case.startswith("markov/"):
            continue
        if case.startswith("greedy"):
            assert torch.equal(other[case], rows), case
        else:
            equal = int((rows == other[case]).all(dim=1).sum())
            assert equal >= 0.998 * len(rows), f"{case}: only {equal}/{len(rows)} rows agree"


def test_default_and_avx2_builds_take_the_same_accept_decisions(outputs_by_capability):
    """Both sum in 8 lanes in the same order with the same exp bits (csrc/core/exp.h), so every
    accept decision is the same: the number of accepted drafts of every request and the greedy
    rows. (The emitted sampled token goes through log/log1p, which differ in their last bits
    between the builds: the bar of test_instruction_set_builds_agree applies to it.)"""
    if "avx2" not in outputs_by_capability:
        pytest.skip("this CPU has no AVX2 build to compare with")
    default, avx2 = outputs_by_capability["default"], outputs_by_capability["avx2"]
    for case, rows in avx2.items():
        if case.startswith("markov/"):
            continue
        if case.startswith("greedy"):
            assert torch.equal(default[case], rows), case
        accepted = (rows != -1).sum(dim=1) - 1  # accepted drafts, then the emitted token, then -1
        assert torch.equal((default[case] != -1).sum(dim=1) - 1, accepted), case
        prefix = torch.arange(rows.shape[1]) < accepted[:, None]
        assert torch.equal(default[case][prefix], rows[prefix]), case


@pytest.mark.parametrize("capability", ["default", "avx2", AVX512_WITHOUT_BF16_DOT])
def test_instruction_set_builds_agree_on_markov_draft(outputs_by_capability, markov_inputs, capability):
    """Exact weights: logits and greedy drafts identical, sampled drafts identical except at
    near-ties of the race (the bar of verify). Gaussian weights: logits equal within rounding
    and whole rows of drafts identical with the same bar (the drafts condition on each other)."""
    reference, other = _reference_and_other(outputs_by_capability, capability)
    for case, args in markov_inputs.items():
        expected, got = reference[f"markov/{case}"], other[f"markov/{case}"]
        ids, other_ids = expected["ids"], got["ids"]
        greedy = args[4] == 0
        # Logits and confidence along the prefix both builds drafted alike: a sampled draft
        # that differs changes everything after it.
        same_prefix = torch.cat([torch.ones(ids.shape[0], 1, dtype=torch.bool),
                                 (ids == other_ids).cumprod(dim=1).bool()[:, :-1]], dim=1)
        torch.testing.assert_close(got["confidence"][same_prefix], expected["confidence"][same_prefix], rtol=1e-5,
                                   atol=1e-6, msg=case)
        if case.split("/")[1] == "exact":
            assert torch.equal(got["logits"][same_prefix], expected["logits"][same_prefix]), case
            assert torch.equal(other_ids[greedy], ids[greedy]), case
        else:
            torch.testing.assert_close(got["logits"][same_prefix], expected["logits"][same_prefix], msg=case,
                                       **MARKOV_LOGIT_TOLERANCE[expected["logits"].dtype])
        equal = int((ids == other_ids).all(dim=1).sum())
        assert equal >= 0.998 * ids.shape[0], f"{case}: only {equal}/{ids.shape[0]} rows agree"
