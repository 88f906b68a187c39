"""dspark_ext.calibration: the steps-per-second table (profile_sps with a fake clock, save/load),
Sequential Temperature Scaling on synthetic rollouts with known acceptance rates, the metric
helpers on hand-computed cases, input validation and the reliability diagram."""

import math
import sys
from collections import Counter

import pytest
import torch

from dspark_ext.calibration import (
    STSCalibration,
    auroc,
    brier_score,
    calibrate_sts,
    cumulative_confidence,
    expected_calibration_error,
    load_sps,
    prefix_acceptance,
    profile_sps,
    reliability_diagram,
    save_sps,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


# --------------------------------------------------------------------------- profile_sps


class FakeTarget:
    """A forward_fn that advances a fake clock by ``step_time(n, call)`` (call = 1, 2, ... per n)."""

    def __init__(self, step_time):
        self.step_time = step_time
        self.now = 0.0
        self.calls = Counter()
        self.clock_reads = 0

    def forward(self, n: int) -> None:
        self.calls[n] += 1
        self.now += self.step_time(n, self.calls[n])

    def time(self) -> float:
        self.clock_reads += 1
        return self.now


def base_time(n: int) -> float:
    return 1e-3 * (1 + n / 64) + (0.5e-3 if n >= 33 else 0.0)  # a cliff at n = 33


def step_times(sps: torch.Tensor) -> torch.Tensor:
    return 1.0 / sps[1:].double()


def test_profile_sps_shape_cliff_and_monotone():
    inverted = {10: 0.97, 11: 0.98, 40: 0.96, 64: 0.99}  # noise that makes larger batches look faster

    def step_time(n, call):
        return base_time(n) * inverted.get(n, 1.0)

    target = FakeTarget(step_time)
    sps = profile_sps(target.forward, 64, warmup=0, repeats=3, time_fn=target.time)
    assert sps.dtype == torch.float32 and tuple(sps.shape) == (65,) and sps.device.type == "cpu"
    assert sps[0].item() == 0.0
    assert bool((sps[1:-1] >= sps[2:]).all()), "sps must not increase with n"
    t = step_times(sps)
    assert t[33 - 1] - t[32 - 1] > 0.4e-3, "the cliff at n = 33 must stay"
    # Isotonic regression pools each inversion with the neighbours it undercuts into their mean.
    for pool, mean in [
        ((9, 10), (base_time(9) + 0.97 * base_time(10)) / 2),
        ((38, 39, 40), (base_time(38) + base_time(39) + 0.96 * base_time(40)) / 3),
        ((63, 64), (base_time(63) + 0.99 * base_time(64)) / 2),
    ]:
        for n in pool:
            assert t[n - 1].item() == pytest.approx(mean, rel=1e-6), n
    assert t[11 - 1].item() == pytest.approx(0.98 * base_time(11), rel=1e-6)  # slower than the pool: kept
    # Sizes away from the inversions keep their measured time.
    for n in (1, 5, 20, 33, 37, 50):
        assert t[n - 1].item() == pytest.approx(base_time(n), rel=1e-6)


def test_profile_sps_pools_adjacent_violators_exactly():
    times = {1: 1e-3, 2: 3e-3, 3: 2e-3, 4: 4e-3}
    target = FakeTarget(lambda n, call: times[n])
    sps = profile_sps(target.forward, 4, warmup=0, repeats=1, time_fn=target.time)
    expected = torch.tensor([0.0, 1 / 1e-3, 1 / 2.5e-3, 1 / 2.5e-3, 1 / 4e-3], dtype=torch.float32)
    torch.testing.assert_close(sps, expected)


def test_profile_sps_median_and_untimed_warmup():
    def step_time(n, call):
        if call <= 2:
            return 10.0  # the warmup calls: slow, and must not be timed
        return base_time(n) * (100.0 if call == 4 else 1.0)  # one outlier among the timed repeats

    target = FakeTarget(step_time)
    sps = profile_sps(target.forward, 40, warmup=2, repeats=5, time_fn=target.time)
    assert target.calls == Counter({n: 2 + 5 for n in range(1, 41)})
    assert target.clock_reads == 2 * 5 * 40
    torch.testing.assert_close(step_times(sps), torch.tensor([base_time(n) for n in range(1, 41)], dtype=torch.float64),
                               rtol=1e-6, atol=0)


def test_profile_sps_even_repeats_median_is_the_middle_mean():
    target = FakeTarget(lambda n, call: [1e-3, 2e-3, 4e-3, 100e-3][call - 1])
    sps = profile_sps(target.forward, 1, warmup=0, repeats=4, time_fn=target.time)
    assert 1 / sps[1].item() == pytest.approx(3e-3, rel=1e-6)


def test_profile_sps_interpolates_unmeasured_sizes():
    def curved(n):
        return 1e-3 * (1 + (n / 64) ** 2)

    target = FakeTarget(lambda n, call: curved(n))
    sizes = [8, 16, 16, torch.tensor(40)]  # repeats and integer tensors are fine
    sps = profile_sps(target.forward, 64, sizes=sizes, warmup=1, repeats=3, time_fn=target.time)
    assert set(target.calls) == {1, 8, 16, 40, 64}, "1 and max_tokens are always measured"
    t = step_times(sps)
    for n, lo, hi in [(4, 1, 8), (12, 8, 16), (30, 16, 40), (41, 40, 64), (63, 40, 64)]:
        expected = curved(lo) + (curved(hi) - curved(lo)) * (n - lo) / (hi - lo)
        assert t[n - 1].item() == pytest.approx(expected, rel=1e-6), n
    for n in (1, 8, 16, 40, 64):
        assert t[n - 1].item() == pytest.approx(curved(n), rel=1e-6)


def test_profile_sps_synchronizes_cuda_only(monkeypatch):
    synced = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: synced.append(device))
    target = FakeTarget(lambda n, call: base_time(n))
    profile_sps(target.forward, 4, warmup=1, repeats=3, device="cpu", time_fn=target.time)
    assert synced == []
    profile_sps(target.forward, 4, warmup=1, repeats=3, device="cuda:0", time_fn=target.time)
    assert len(synced) == 4 * (1 + 3) and set(synced) == {torch.device("cuda:0")}


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(max_tokens=0), "max_tokens"),
        (dict(max_tokens=4.0), "max_tokens"),
        (dict(max_tokens=4, warmup=-1), "warmup"),
        (dict(max_tokens=4, repeats=0), "repeats"),
        (dict(max_tokens=4, sizes=[0]), "sizes"),
        (dict(max_tokens=4, sizes=[5]), "sizes"),
        (dict(max_tokens=4, sizes=[2.5]), "sizes"),
    ],
)
def test_profile_sps_bad_arguments(kwargs, name):
    target = FakeTarget(lambda n, call: base_time(n))
    with pytest.raises(ValueError, match=name):
        profile_sps(target.forward, time_fn=target.time, **kwargs)


@pytest.mark.parametrize("bad_time", [0.0, math.nan, math.inf])
def test_profile_sps_rejects_unusable_measurements(bad_time):
    target = FakeTarget(lambda n, call: bad_time)
    with pytest.raises(ValueError, match="finite and > 0.*time_fn"):
        profile_sps(target.forward, 4, warmup=0, repeats=3, time_fn=target.time)


def test_save_load_sps_round_trip(tmp_path):
    target = FakeTarget(lambda n, call: base_time(n))
    sps = profile_sps(target.forward, 16, warmup=0, repeats=1, time_fn=target.time)
    path = tmp_path / "tables" / "sps.pt"
    save_sps(path, sps, model="toy", gpu="fake", max_len=7, tflops=1.5)
    loaded, metadata = load_sps(path)
    assert torch.equal(loaded, sps) and loaded.dtype == torch.float32
    assert metadata == {"model": "toy", "gpu": "fake", "max_len": 7, "tflops": 1.5}


def test_save_load_sps_validation(tmp_path):
    with pytest.raises(ValueError, match="sps"):
        save_sps(tmp_path / "a.pt", torch.ones(5, dtype=torch.float64))
    with pytest.raises(ValueError, match="sps"):
        save_sps(tmp_path / "a.pt", torch.ones(2, 3))
    with pytest.raises(ValueError, match="metadata 'bad'"):
        save_sps(tmp_path / "a.pt", torch.tensor([0.0, 1.0]), bad=[1, 2])
    torch.save({"sps": torch.ones(2, 3), "metadata": {}}, tmp_path / "b.pt")
    with pytest.raises(ValueError, match="sps"):
        load_sps(tmp_path / "b.pt")
    torch.save(torch.ones(3), tmp_path / "c.pt")
    with pytest.raises(ValueError, match="save_sps"):
        load_sps(tmp_path / "c.pt")


# --------------------------------------------------------------------------- metric helpers


def test_expected_calibration_error_hand_computed():
    probs, labels = torch.tensor([0.1, 0.2, 0.8, 0.9]), torch.tensor([0, 1, 1, 1])
    # bin [0, .5): mean p .15, freq .5, weight .5; bin [.5, 1]: mean p .85, freq 1, weight .5
    assert expected_calibration_error(probs, labels, num_bins=2) == pytest.approx(0.5 * 0.35 + 0.5 * 0.15)
    assert expected_calibration_error(torch.tensor([1.0]), torch.tensor([True])) == 0.0  # p = 1 is in the last bin
    assert expected_calibration_error(torch.tensor([1.0, 0.0]), torch.tensor([0, 0])) == pytest.approx(0.5)


def test_auroc_hand_computed_with_ties_and_single_class():
    assert auroc(torch.tensor([0.1, 0.4, 0.35, 0.8]), torch.tensor([0, 0, 1, 1])) == pytest.approx(0.75)
    # positive/negative pairs: (.5, .5) counts 1/2, the other three are ordered: 3.5 / 4
    assert auroc(torch.tensor([0.5, 0.5, 0.2, 0.9]), torch.tensor([1, 0, 0, 1])) == pytest.approx(0.875)
    assert auroc(torch.tensor([0.3, 0.3, 0.3]), torch.tensor([1, 0, 1])) == pytest.approx(0.5)
    assert math.isnan(auroc(torch.tensor([0.1, 0.9]), torch.tensor([1, 1])))
    assert math.isnan(auroc(torch.tensor([0.1, 0.9]), torch.tensor([False, False])))


def test_brier_score_hand_computed():
    assert brier_score(torch.tensor([0.1, 0.8]), torch.tensor([0.0, 1.0])) == pytest.approx((0.01 + 0.04) / 2)


def test_cumulative_confidence_and_prefix_acceptance():
    def sigmoid(x):
        return 1 / (1 + math.exp(-x))

    z = torch.tensor([[0.0, 0.0, 2.0]])
    p = cumulative_confidence(z)
    assert p.dtype == torch.float64
    torch.testing.assert_close(p, torch.tensor([[0.5, 0.25, 0.25 * sigmoid(2.0)]], dtype=torch.float64))
    assert cumulative_confidence(z, [1.0, 1.0, 2.0])[0, 2].item() == pytest.approx(0.25 * sigmoid(1.0))
    lengths = torch.tensor([0, 2, 3])
    indicators = torch.tensor([[0, 1, 1], [1, 1, 0], [1, 1, 1]])  # accepted after a rejection still counts 0
    expected = torch.tensor([[0, 0, 0], [1, 1, 0], [1, 1, 1]], dtype=torch.float64)
    assert torch.equal(prefix_acceptance(lengths, 3, 3), expected)
    assert torch.equal(prefix_acceptance(indicators.bool(), 3, 3), expected)
    assert torch.equal(prefix_acceptance(indicators.float(), 3, 3), expected)


@pytest.mark.parametrize(
    "fn, args, name",
    [
        (expected_calibration_error, (torch.tensor([0.5, 0.5]), torch.tensor([1])), "labels"),
        (expected_calibration_error, (torch.tensor([0.5, 1.5]), torch.tensor([1, 0])), "probs"),
        (expected_calibration_error, (torch.tensor([]), torch.tensor([])), "probs"),
        (expected_calibration_error, (torch.tensor([0.5]), torch.tensor([2])), "labels"),
        (auroc, (torch.tensor([math.nan, 0.5]), torch.tensor([1, 0])), "scores"),
        (brier_score, (torch.tensor([[0.5]]), torch.tensor([[1]])), "probs"),
        (cumulative_confidence, (torch.zeros(2, 3), [1.0, 1.0]), "temperatures"),
        (cumulative_confidence, (torch.zeros(2, 3), [1.0, 0.0, 1.0]), "temperatures"),
    ],
)
def test_metric_helpers_bad_inputs(fn, args, name):
    with pytest.raises(ValueError, match=name):
        fn(*args)


# --------------------------------------------------------------------------- STS


def synthetic_rollouts(num_rollouts: int, seed: int = 0):
    """True conditional logits z_true [N, 5] and prefix acceptance lengths drawn from them."""
    g = torch.Generator().manual_seed(seed)
    mean = torch.tensor([1.5, 1.0, 0.5, 1.2, 0.8])
    std = torch.tensor([1.5, 1.2, 1.8, 1.5, 1.0])
    z_true = mean + std * torch.randn(num_rollouts, 5, generator=g)
    indicators = torch.rand(num_rollouts, 5, generator=g) < torch.sigmoid(z_true)
    lengths = indicators.int().cumprod(dim=1).sum(dim=1)  # drafts after the first rejection never count
    return z_true, indicators, lengths


def test_sts_fixes_overconfident_scores():
    z_true, _, lengths = synthetic_rollouts(20000)
    cal = calibrate_sts(2.5 * z_true, lengths)
    assert isinstance(cal, STSCalibration)
    assert cal.temperatures.dtype == torch.float32 and tuple(cal.temperatures.shape) == (5,)
    for field in ("ece_before", "ece_after", "auroc_before", "auroc_after", "brier_before", "brier_after"):
        value = getattr(cal, field)
        assert value.dtype == torch.float64 and tuple(value.shape) == (5,), field
    assert bool((cal.ece_after < cal.ece_before).all()), cal.summary()
    assert bool((cal.ece_after < 0.02).all()), cal.summary()
    assert bool((cal.brier_after < cal.brier_before).all()), cal.summary()
    assert 2.0 <= cal.temperatures[0].item() <= 3.1, cal.summary()
    assert bool(((cal.temperatures > 1.8) & (cal.temperatures < 3.5)).all()), cal.summary()
    assert cal.edge_positions == [], cal.summary()
    assert cal.auroc_after[0].item() == pytest.approx(cal.auroc_before[0].item(), abs=1e-12), "ranking preserved"
    assert cal.mean_ece_after < cal.mean_ece_before
    # The reported metrics are those of the helpers on P_k, y_k with the float32 temperatures.
    p, y = cumulative_confidence(2.5 * z_true, cal.temperatures), prefix_acceptance(lengths, 20000, 5)
    for k in range(5):
        assert cal.ece_after[k].item() == pytest.approx(expected_calibration_error(p[:, k], y[:, k]), abs=1e-12)
        assert cal.auroc_after[k].item() == pytest.approx(auroc(p[:, k], y[:, k]), abs=1e-12)
        assert cal.brier_after[k].item() == pytest.approx(brier_score(p[:, k], y[:, k]), abs=1e-12)
    table = cal.summary().splitlines()
    assert len(table) == 2 + 5 + 1 and table[2].startswith("| 1 |") and "→" in table[2]


def test_sts_keeps_calibrated_scores():
    z_true, indicators, _ = synthetic_rollouts(20000, seed=1)
    cal = calibrate_sts(z_true.half(), indicators)  # any float dtype
    assert bool((cal.ece_after <= cal.ece_before + 1e-3).all()), cal.summary()
    assert bool(((cal.temperatures > 0.8) & (cal.temperatures < 1.25)).all()), cal.summary()


def test_sts_lengths_and_indicators_agree():
    z_true, indicators, lengths = synthetic_rollouts(3000, seed=2)
    after_rejection = torch.arange(5) > lengths[:, None]
    coin = torch.rand(3000, 5, generator=torch.Generator().manual_seed(3)) < 0.5
    noisy = torch.where(after_rejection, coin, indicators)  # drafts after the first rejection: arbitrary
    expected = calibrate_sts(2 * z_true, lengths)
    for accepted in (noisy, noisy.long(), noisy.float()):
        got = calibrate_sts(2 * z_true, accepted)
        for field in ("temperatures", "ece_before", "ece_after", "auroc_before", "auroc_after", "brier_before",
                      "brier_after"):
            torch.testing.assert_close(getattr(got, field), getattr(expected, field), rtol=0, atol=0, equal_nan=True)


def test_sts_uninformative_position_keeps_t_one():
    z_true, _, lengths = synthetic_rollouts(2000, seed=4)
    z = 2 * z_true
    z[:, 2] = 0.0  # sigmoid(0 / T) = 1/2 for every T: a flat ECE, the tie goes to T = 1
    cal = calibrate_sts(z, lengths)
    assert cal.temperatures[2].item() == 1.0
    lengths_all = torch.full((2000,), 5)
    cal = calibrate_sts(z, lengths_all)  # y_k all 1: AUROC undefined
    assert bool(cal.auroc_before.isnan().all()) and bool(cal.auroc_after.isnan().all())


@pytest.mark.parametrize(
    "conf_logits, accepted, kwargs, name",
    [
        (torch.zeros(8), torch.zeros(8, dtype=torch.long), {}, "conf_logits"),  # not [N, K]
        (torch.zeros(0, 3), torch.zeros(0, dtype=torch.long), {}, "conf_logits"),  # empty N
        (torch.zeros(8, 3, dtype=torch.long), torch.zeros(8, dtype=torch.long), {}, "conf_logits"),  # not float
        (torch.full((8, 3), math.nan), torch.zeros(8, dtype=torch.long), {}, "conf_logits"),
        (torch.zeros(8, 3), torch.zeros(7, dtype=torch.long), {}, "accepted"),  # N mismatch
        (torch.zeros(8, 3), torch.zeros(8, 4, dtype=torch.bool), {}, "accepted"),  # K mismatch
        (torch.zeros(8, 3), torch.full((8,), 4), {}, "accepted"),  # length > K
        (torch.zeros(8, 3), torch.full((8,), -1), {}, "accepted"),
        (torch.zeros(8, 3), torch.zeros(8), {}, "accepted"),  # float lengths
        (torch.zeros(8, 3), torch.full((8, 3), 2), {}, "accepted"),  # indicators not 0/1
        (torch.zeros(8, 3), torch.zeros(8, dtype=torch.long), {"num_bins": 0}, "num_bins"),
        (torch.zeros(8, 3), torch.zeros(8, dtype=torch.long), {"grid_size": 1}, "grid_size"),
    ],
)
def test_sts_bad_inputs(conf_logits, accepted, kwargs, name):
    with pytest.raises(ValueError, match=name):
        calibrate_sts(conf_logits, accepted, **kwargs)


# --------------------------------------------------------------------------- reliability diagram


def test_reliability_diagram_writes_png(tmp_path):
    pytest.importorskip("matplotlib")
    had_pyplot = "matplotlib.pyplot" in sys.modules
    z_true, _, lengths = synthetic_rollouts(2000, seed=5)
    z, lengths = 2.5 * z_true[:, :3], lengths.clamp(max=3)
    cal = calibrate_sts(z, lengths)
    for name, temperatures in [("cal", cal), ("list", [2.5, 2.5, 2.5]), ("tensor", torch.tensor([1.0, 2.0, 3.0]))]:
        path = reliability_diagram(z, lengths, temperatures, tmp_path / "plots" / f"{name}.png", title=name)
        assert path == tmp_path / "plots" / f"{name}.png"
        data = path.read_bytes()
        assert data[:8] == PNG_SIGNATURE and len(data) > 1000
    if not had_pyplot:
        assert "matplotlib.pyplot" not in sys.modules, "must not touch the user's pyplot backend"
    with pytest.raises(ValueError, match="temperatures"):
        reliability_diagram(z, lengths, [1.0, 1.0], tmp_path / "bad.png")


def test_reliability_diagram_without_matplotlib(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(ImportError, match="pip install matplotlib"):
        reliability_diagram(torch.zeros(4, 2), torch.zeros(4, dtype=torch.long), [1.0, 1.0], tmp_path / "x.png")


def test_sts_reports_temperatures_at_the_edge_of_the_search_range():
    """A position no rollout ever reaches (all prefixes rejected before it) pulls its T to an end
    of [0.02, 50]; the calibration says so instead of passing it off as an optimum, and does not
    say it of a calibrated position."""
    g = torch.Generator().manual_seed(3)
    n = 4000
    z = torch.randn(n, 3, generator=g) - 1.0
    accepted = torch.zeros(n, 3, dtype=torch.bool)
    accepted[:, 0] = torch.rand(n, generator=g) < torch.sigmoid(z[:, 0])  # position 1 calibrated as is
    cal = calibrate_sts(z, accepted)
    assert 2 in cal.edge_positions, cal.summary()
    assert "(grid edge)" in cal.summary() and cal.positives.tolist()[1:] == [0, 0]
    assert 1 not in cal.edge_positions and 0.5 < cal.temperatures[0].item() < 2.0


def test_sts_with_a_bias_removes_an_offset_one_temperature_cannot():
    """A head whose logits are the true ones scaled by 2 and shifted by +1.5: a temperature alone
    leaves an error (it can only scale), an offset per position removes it; the fit recovers
    T = 2, b = -0.75 (sigmoid(z / T + b) = sigmoid(z_true)), and the metrics it reports are
    those of the helpers on P_k with the fitted temperatures and biases."""
    z_true, _, lengths = synthetic_rollouts(40000, seed=3)
    z = 2.0 * z_true + 1.5
    plain = calibrate_sts(z, lengths)
    fitted = calibrate_sts(z, lengths, bias=True)
    assert plain.biases is None and fitted.biases.dtype == torch.float32 and tuple(fitted.biases.shape) == (5,)
    assert bool((fitted.ece_after < 0.015).all()), fitted.summary()
    assert fitted.ece_after[0].item() < 0.5 * plain.ece_after[0].item(), (plain.summary(), fitted.summary())
    # Later positions see fewer rollouts (their prefix must survive first): looser there.
    assert fitted.temperatures.tolist()[:3] == pytest.approx([2.0] * 3, rel=0.1)
    assert fitted.biases.tolist()[:3] == pytest.approx([-0.75] * 3, abs=0.1)
    assert fitted.biases.tolist() == pytest.approx([-0.75] * 5, abs=0.3)
    assert fitted.auroc_after[0].item() == pytest.approx(fitted.auroc_before[0].item(), abs=1e-12)
    p, y = cumulative_confidence(z, fitted.temperatures, fitted.biases), prefix_acceptance(lengths, 40000, 5)
    for k in range(5):
        assert fitted.ece_after[k].item() == pytest.approx(expected_calibration_error(p[:, k], y[:, k]), abs=1e-12)
    assert "b = " in fitted.summary() and "b = " not in plain.summary()
    with pytest.raises(ValueError, match="biases"):
        cumulative_confidence(z, fitted.temperatures, [0.0, 1.0])


def test_confidence_head_applies_the_bias_in_the_op_arguments():
    """``op_arguments`` folds b_k into ``conf_base`` (times T_k), so the op's
    sigmoid((conf_base + w_prev . e) / T) is ``probability``'s sigmoid(z / T + b); a bias needs
    the temperatures' shape; without one both are plain STS."""
    from dspark_ext.heads import ConfidenceHead

    torch.manual_seed(0)
    head = ConfidenceHead(8, 3)
    h, e = torch.randn(2, 4, 8), torch.randn(2, 4, 3)
    temperatures, biases = torch.tensor([0.5, 1.0, 2.0, 3.0]), torch.tensor([-1.0, 0.5, 0.0, 2.0])
    for bias in (None, biases):
        head.set_sts_temperature(temperatures, bias)
        conf_base, w_prev, conf_temperature = head.op_arguments(h)
        from_op = torch.sigmoid((conf_base + e @ w_prev) / conf_temperature)
        z = head(h, e)
        expected = torch.sigmoid(z / temperatures + (0.0 if bias is None else biases))
        assert torch.allclose(from_op, expected, atol=1e-6)
        assert torch.allclose(head.probability(h, e), expected, atol=1e-6)
    with pytest.raises(ValueError, match="sts bias must have the temperatures' shape"):
        head.set_sts_temperature(temperatures, [0.0, 1.0])
    with pytest.raises(ValueError, match="sts biases must be finite"):
        head.set_sts_temperature(temperatures, [0.0, float("nan"), 0.0, 0.0])
