"""core::exp_two_ulp (csrc/core/exp.h), the exp of the CPU sampling passes, and its vector
forms as each CPU build compiled them (dspark::_exp_for_testing runs one build's own
instructions): within 2 ulp of exp computed in float64, for inputs of every float32 exponent
and both signs, with inf, NaN, overflow and underflow exact; and bitwise the same in every
build, so the builds' sampling decisions cannot drift apart through the exp."""

import math

import pytest
import torch

import dspark_ext  # noqa: F401  (registers torch.ops.dspark.*)


def _supported_isas() -> list:
    isas = ["scalar", "default"]
    best = torch.backends.cpu.get_cpu_capability().lower()
    if best in ("avx2", "avx512"):
        isas.append("avx2")
    if best == "avx512":
        isas.append("avx512")
    return isas


ISAS = _supported_isas()


def every_exponent_inputs(per_exponent: int = 256) -> torch.Tensor:
    """Finite float32 values of every biased exponent (0 = subnormals .. 254), both signs:
    random mantissas plus the smallest and largest of each binade."""
    g = torch.Generator().manual_seed(0)
    exponents = torch.arange(0, 255, dtype=torch.int64).repeat_interleave(per_exponent)
    mantissas = torch.randint(0, 1 << 23, (exponents.numel(),), generator=g, dtype=torch.int64)
    mantissas.view(255, per_exponent)[:, 0] = 0
    mantissas.view(255, per_exponent)[:, 1] = (1 << 23) - 1
    bits = (exponents << 23) | mantissas
    positive = bits.to(torch.int32).view(torch.float32)
    return torch.cat([positive, -positive])


def ulp_error(result: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """|result - exp(x)| in units of the float32 spacing at exp(x) (exp in float64), where
    exp(x) lies in float32's finite range; the spacing below the smallest normal is 2^-149."""
    exact = torch.exp(x.double())
    magnitude = exact.clamp(min=2.0 ** -126)
    spacing = torch.exp2(torch.floor(torch.log2(magnitude)) - 23)
    return (result.double() - exact).abs() / spacing


def in_float32_range(x: torch.Tensor) -> torch.Tensor:
    exact = torch.exp(x.double())
    return exact < torch.finfo(torch.float32).max


@pytest.mark.parametrize("isa", ISAS)
def test_within_two_ulp_for_every_exponent(isa):
    x = every_exponent_inputs()
    got = torch.ops.dspark._exp_for_testing(x, isa)
    finite = in_float32_range(x)
    errors = ulp_error(got[finite], x[finite])
    worst = int(errors.argmax())
    assert errors.max() <= 2.0, f"{isa}: {float(errors.max()):.2f} ulp at x = {float(x[finite][worst])!r}"
    # Beyond float32's range: inf, never a wrong finite number.
    assert torch.isinf(got[~finite]).all() and (got[~finite] > 0).all()


@pytest.mark.parametrize("isa", ISAS)
def test_dense_over_the_range_the_sampling_passes_use(isa):
    """Every 61st float32 of [-104, 0] (the passes take exp(x - max) <= 1), with the
    subnormal results included: 2 ulp there is 2^-148 absolute."""
    lo = torch.tensor(104.0).view(torch.int32).item()  # the bits of |x|; the sign bit is set below
    bits = torch.arange(0, lo + 1, 61, dtype=torch.int64).to(torch.int32) | torch.tensor(-(1 << 31), dtype=torch.int32)
    x = bits.view(torch.float32)
    assert x.numel() > 15_000_000 and x.min() >= -104.0 and x.max() <= 0.0
    errors = ulp_error(torch.ops.dspark._exp_for_testing(x, isa), x)
    assert errors.max() <= 2.0, f"{isa}: {float(errors.max()):.2f} ulp at x = {float(x[int(errors.argmax())])!r}"


@pytest.mark.parametrize("isa", ISAS)
def test_the_nonpositive_form_equals_the_general_one_where_it_applies(isa):
    """exp_nonpositive (what the sampling passes call on x/T - max <= 0) gives the same bits
    as exp_two_ulp for every x <= 0 (every exponent, the subnormal results, -inf), and maps
    NaN to 0 (a NaN logit carries no probability)."""
    x = every_exponent_inputs()
    x = torch.cat([-x.abs(), torch.linspace(-104, 0, 200_003), torch.tensor([float("-inf"), -0.0])])
    general = torch.ops.dspark._exp_for_testing(x, isa)
    nonpositive = torch.ops.dspark._exp_for_testing(x, isa, True)
    assert torch.equal(general.view(torch.int32), nonpositive.view(torch.int32))
    assert torch.ops.dspark._exp_for_testing(torch.tensor([float("nan")] * 9), isa, True).eq(0).all()


@pytest.mark.parametrize("isa", ISAS)
def test_special_values(isa):
    x = torch.tensor([0.0, -0.0, float("-inf"), float("inf"), float("nan"), -1e30, 1e30, 88.72283, 88.72284,
                      -103.97, -104.0, -87.33655, -150.0, 1.0])
    got = torch.ops.dspark._exp_for_testing(x, isa)
    assert got[0] == 1.0 and got[1] == 1.0  # exactly: the sums rescale by exp(0) where a max did not move
    assert got[2] == 0.0 and got[5] == 0.0 and got[12] == 0.0
    assert torch.isinf(got[3]) and torch.isinf(got[6]) and torch.isinf(got[8])
    assert torch.isnan(got[4])
    assert math.isfinite(got[7]) and got[7] > 3.4e38
    assert got[9] > 0 and got[10] == 0.0  # exp(-103.97) rounds up to the smallest subnormal, exp(-104) to 0
    assert got[11] == pytest.approx(2.0 ** -126, rel=1e-6)
    assert got[13] == torch.tensor(math.e, dtype=torch.float32)


def test_every_build_gives_the_same_bits():
    x = torch.cat([every_exponent_inputs(64), torch.linspace(-104, 89, 100_003)])
    results = {isa: torch.ops.dspark._exp_for_testing(x, isa) for isa in ISAS}
    for isa, got in results.items():
        assert torch.equal(got.view(torch.int32), results["scalar"].view(torch.int32)), isa


def test_the_ulp_check_rejects_a_worse_exp():
    """The same measure fails ATen's float32 exp_u20-class error (here: the exp perturbed by 3 ulp),
    so a passing build is not an artefact of a lax measure."""
    x = every_exponent_inputs(32)
    finite = in_float32_range(x) & (x.abs() < 80)
    good = torch.ops.dspark._exp_for_testing(x, "scalar")[finite]
    worse = good * (1 + 3 * 2.0 ** -23)
    assert ulp_error(good, x[finite]).max() <= 2.0
    assert ulp_error(worse, x[finite]).max() > 2.0


def test_bad_arguments():
    with pytest.raises(RuntimeError, match="nonpositive=True takes x <= 0"):
        torch.ops.dspark._exp_for_testing(torch.tensor([-1.0, 0.5]), "scalar", True)
    with pytest.raises(RuntimeError, match="isa must be one of"):
        torch.ops.dspark._exp_for_testing(torch.zeros(3), "sse9")
    with pytest.raises(RuntimeError, match="x must be float32"):
        torch.ops.dspark._exp_for_testing(torch.zeros(3, dtype=torch.float64), "scalar")


def test_opcheck():
    torch.library.opcheck(torch.ops.dspark._exp_for_testing.default, (torch.randn(37), "scalar"))
