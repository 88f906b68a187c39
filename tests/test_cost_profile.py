"""The per-machine cost profile (dspark_ext/cost_profile.py): what it measures, how the loop
reads it, the cache, the busy-machine guard and the shipped fallback. Timings run on a fake
clock that the fake target and drafter advance by known amounts, so every number is exact."""

import random

import pytest
import torch

from dspark_ext import cost_profile
from dspark_ext.cost_profile import BUSY_SPREAD, CostProfile, load_or_measure, measure
from dspark_ext.drafters import NgramDrafter
from dspark_ext.protocols import Draft
from toy_targets import TrigramTarget


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


class TimedTarget(TrigramTarget):
    """A forward of n tokens takes 10 ms + 2 ms * n on the fake clock (+ jitter, if any)."""

    def __init__(self, clock, jitter=0.0):
        super().__init__(8, seed=0)
        self.clock, self.jitter, self.rng = clock, jitter, random.Random(0)

    def forward(self, token_ids, cu_seqlens):
        self.clock.now += 0.010 + 0.002 * token_ids.shape[0] + self.jitter * self.rng.random()
        return super().forward(token_ids, cu_seqlens)


class TimedDrafter:
    """Proposes K tokens; a round costs 1 ms per request on the fake clock."""

    num_draft = 3

    def __init__(self, clock, target=None):
        self.clock, self.calls, self.target = clock, 0, target
        self.forwards_seen = []  # the target's forward count at each call

    def propose(self, context):
        self.calls += 1
        if self.target is not None:
            self.forwards_seen.append(self.target.forward_calls)
        B = context.tokens.shape[0]
        assert context.hidden_states is not None and context.new_from is not None
        self.clock.now += 0.001 * B
        return Draft(token_ids=torch.zeros(B, self.num_draft, dtype=torch.int64))


def measured(jitter=0.0, requests=(1, 2)):
    clock = Clock()
    target = TimedTarget(clock, jitter)
    drafter = TimedDrafter(clock, target)
    profile = measure(target, {"toy": drafter}, list(requests), 3, context=8, repeats=5, progress=False,
                      time_fn=clock)
    return profile, target, drafter


def test_measures_step_and_drafting_times_exactly():
    profile, _, drafter = measured()
    # Every drafting round right after a target step (untimed), as in the loop.
    assert drafter.calls == 2 * 6 and all(later > earlier for earlier, later in
                                           zip(drafter.forwards_seen, drafter.forwards_seen[1:]))
    assert profile.step_seconds[1] == pytest.approx([0.0] + [0.010 + 0.002 * n for n in range(1, 5)])
    # R = 2 measures n = 2, 3, 4, 6, 8 (others interpolated, below R: the step of R tokens)
    assert profile.step_seconds[2] == pytest.approx([0.0, 0.014] + [0.010 + 0.002 * n for n in range(2, 9)])
    assert profile.draft_seconds["toy"] == pytest.approx({1: 0.001, 2: 0.002})
    assert profile.spread < 1e-9 and profile.source == "measured"


def test_sps_counts_the_drafting_cost():
    profile, _, _ = measured()
    sps = profile.sps(1, draft_seconds=0.005, max_tokens=6)
    assert sps.dtype == torch.float32 and sps.shape == (7,) and float(sps[0]) == 0.0
    expected = [1.0 / (0.005 + 0.010 + 0.002 * n) for n in range(1, 7)]  # n = 5, 6 extrapolated linearly
    assert sps[1:].tolist() == pytest.approx(expected, rel=1e-6)
    # a batch size that was not measured reads the nearest one at the same tokens per request
    assert profile.target_seconds(4, 8) == pytest.approx(profile.target_seconds(2, 4))
    assert profile.drafter_seconds("toy", 4) == pytest.approx(0.004)
    assert profile.drafter_seconds("unknown", 1) == 0.0


def cached_setup(tmp_path):
    """A timed target and drafter on one fake clock, and load_or_measure's arguments around them."""
    clock = Clock()
    kwargs = dict(target_name="toy", cache_dir=tmp_path, log=lambda m: None, context=8, repeats=3,
                  progress=False, time_fn=clock)
    return TimedTarget(clock), {"toy": TimedDrafter(clock)}, kwargs


def test_cache_hit_remeasure_and_key(tmp_path):
    target, drafters, kwargs = cached_setup(tmp_path)
    first = load_or_measure(target, drafters, [1], 3, **kwargs)
    calls = target.forward_calls
    assert "saved" in first.source and calls > 0
    second = load_or_measure(target, drafters, [1], 3, **kwargs)
    assert target.forward_calls == calls and "cached" in second.source
    assert second.step_seconds == first.step_seconds and second.draft_seconds == first.draft_seconds
    load_or_measure(target, drafters, [1], 3, remeasure=True, **kwargs)
    assert target.forward_calls > calls
    key = first.key
    assert key["threads"] == torch.get_num_threads() and key["torch"] == torch.__version__
    assert key["drafters"] == {"toy": "TimedDrafter"} and key["requests"] == [1] and "machine" in key


def test_another_kernel_build_measures_again(tmp_path, monkeypatch):
    """A profile is keyed by the hash of the kernel sources the extension was built from
    (setup.py writes it into dspark_ext/_build_info.py): rebuilt kernels are measured again."""
    from dspark_ext import _build_info, cost_profile

    assert len(_build_info.KERNEL_SOURCES_SHA256) == 64
    target, drafters, kwargs = cached_setup(tmp_path)
    first = load_or_measure(target, drafters, [1], 3, **kwargs)
    assert first.key["kernels"] == _build_info.KERNEL_SOURCES_SHA256
    calls = target.forward_calls
    monkeypatch.setattr(_build_info, "KERNEL_SOURCES_SHA256", "0" * 64)
    assert cost_profile.kernel_build() == "0" * 64
    rebuilt = load_or_measure(target, drafters, [1], 3, **kwargs)
    assert target.forward_calls > calls and "saved" in rebuilt.source
    monkeypatch.undo()
    again = load_or_measure(target, drafters, [1], 3, **kwargs)
    assert "cached" in again.source and again.step_seconds == first.step_seconds


def test_busy_machine_profile_is_used_but_not_saved(tmp_path):
    clock = Clock()
    target = TimedTarget(clock, jitter=0.5)  # jitter far above the 10-18 ms steps
    lines = []
    profile = load_or_measure(target, {}, [1], 3, target_name="toy", cache_dir=tmp_path, log=lines.append,
                              context=8, repeats=5, progress=False, time_fn=clock)
    assert profile.spread > BUSY_SPREAD and "not saved" in profile.source
    assert any("busy" in line for line in lines)
    assert not list((tmp_path / "profiles").glob("*.json"))


def test_shipped_table_is_only_a_fallback(tmp_path, monkeypatch):
    shipped = CostProfile.from_sps([0.0, 50.0, 40.0], source="shipped (test)")
    assert shipped.sps(1, max_tokens=2).tolist() == pytest.approx([0.0, 50.0, 40.0])
    clock = Clock()
    target = TimedTarget(clock)
    lines = []
    kwargs = dict(target_name="toy", cache_dir=tmp_path, log=lines.append, context=8, repeats=3, progress=False,
                  time_fn=clock)
    assert load_or_measure(target, {}, [1], 3, fallback=shipped, **kwargs).source.startswith("measured")
    monkeypatch.setenv("DSPARK_NO_PROFILE", "1")
    used = load_or_measure(target, {}, [1], 3, fallback=shipped, **kwargs)
    assert used is shipped and "shipped (test)" in lines[-1]


def test_real_clock_with_a_real_drafter():
    target = TrigramTarget(8, seed=0)
    profile = measure(target, {"lookup": NgramDrafter(num_draft=3, min_ngram=1)}, [2], 3, context=16, repeats=3,
                      progress=False)
    assert len(profile.step_seconds[2]) == 2 * 4 + 1 and all(t > 0 for t in profile.step_seconds[2][1:])
    assert profile.draft_seconds["lookup"][2] > 0
    assert CostProfile.from_json(profile.to_json()).step_seconds == profile.step_seconds
    assert "R = 2" in profile.describe() and cost_profile.machine_description("cpu")


def test_each_batch_size_is_cached_on_its_own(tmp_path):
    """`dspark profile --batch-sizes 1,2` serves a later run at batch 1; a run at 2 and 3 measures only 3."""
    target, drafters, kwargs = cached_setup(tmp_path)
    both = load_or_measure(target, drafters, [1, 2], 3, **kwargs)
    calls = target.forward_calls
    one = load_or_measure(target, drafters, [1], 3, **kwargs)
    assert target.forward_calls == calls and "cached" in one.source
    assert one.step_seconds == {1: both.step_seconds[1]} and one.draft_seconds == {"toy": {1: both.draft_seconds["toy"][1]}}
    more = load_or_measure(target, drafters, [2, 3], 3, **kwargs)
    measured_sizes = target.forward_calls - calls
    assert set(more.step_seconds) == {2, 3} and more.step_seconds[2] == both.step_seconds[2]
    # batch 3 only: warm-up, the timed steps, and a step before each of the drafter's 3 + 1 rounds
    assert measured_sizes == 2 + len(cost_profile._measured_sizes(3, 3)) * 3 + 4
    assert len(list((tmp_path / "profiles").glob("*.json"))) == 3


def test_a_draft_vocabulary_or_dtype_gets_its_own_profile():
    """A DSpark drafter's cost depends on its shape, on how many ids it drafts from and on the
    dtypes its round reads its weights in."""
    from types import SimpleNamespace

    from dspark_ext.cost_profile import drafter_identity

    def drafter(size):
        return SimpleNamespace(cfg=SimpleNamespace(num_layers=1, hidden_size=8, intermediate_size=16, num_heads=2,
                                                   num_kv_heads=1, markov_rank=4, num_draft=3, confidence=True,
                                                   qk_norm=True, draft_vocab_size=size))

    assert drafter_identity(drafter(0)) != drafter_identity(drafter(8192))
    assert drafter_identity(drafter(8192)) == drafter_identity(drafter(8192))
    bfloat16 = drafter(8192)
    bfloat16.inference_backbone_dtype = torch.bfloat16
    assert drafter_identity(bfloat16) != drafter_identity(drafter(8192))


def test_a_lookup_with_a_datastore_gets_its_own_profile():
    from dspark_ext.cost_profile import drafter_identity
    from dspark_ext.drafters import NgramDrafter
    from dspark_ext.drafters.datastore import TokenDatastore

    store = TokenDatastore.from_sequences([[1, 2, 3]], vocab_size=4)
    assert drafter_identity(NgramDrafter()) == "NgramDrafter"
    assert drafter_identity(NgramDrafter(datastore=store)) == "NgramDrafter+datastore"
