"""The save budget's decisions (daemon/ckpt/budget.py), driven with synthetic measurements: the
interval it chooses for a cost and a step time, how it follows a change, and that noise alone
does not move it."""

from __future__ import annotations

import json
import math
import random

import pytest

from daemon.ckpt.budget import (
    COST_SAMPLES,
    FIRST_SAVE_AFTER,
    HEADROOM,
    SHORTEN_AFTER,
    STEP_SAMPLES,
    SaveBudget,
    SaveMeter,
    least_interval,
    young_daly,
)
from daemon.config.sections import CheckpointConfig
from daemon.errors import ConfigError


def measured(budget: SaveBudget, *, step_ms: float, save_ms: float, saves: int = COST_SAMPLES) -> list:
    """`saves` periodic saves of `save_ms` each, after a window's worth of steps of `step_ms`: the
    interval changes they made."""
    for _ in range(STEP_SAMPLES):
        budget.step(step_ms)
    changes = []
    for _ in range(saves):
        budget.written(2 * save_ms)
        if policy := budget.saved(save_ms):
            changes.append(policy)
    return changes


def test_the_first_save_sets_the_interval_that_keeps_its_cost_under_the_budget():
    budget = SaveBudget(0.02)
    (policy,) = measured(budget, step_ms=10.0, save_ms=20.0, saves=1)
    # 20 ms every N steps of 10 ms is 2% at N = 100; the headroom makes it 125 (1.6%).
    assert policy.reason == "first"
    assert policy.interval_steps == math.ceil(100 * HEADROOM) == 125
    assert policy.overhead == pytest.approx(20.0 / (125 * 10.0)) and policy.overhead <= 0.02
    assert policy.interval_s == pytest.approx((125 * 10.0 + 20.0) / 1e3)
    # A crash redoes half an interval on average, and the save being written when it came.
    assert policy.expected_loss_steps == pytest.approx(125 / 2 + 40.0 / 10.0)
    assert policy.expected_loss_s == pytest.approx(policy.expected_loss_steps * 10.0 / 1e3)
    assert policy.young_daly_steps is None


@pytest.mark.parametrize(
    ("change", "step_ms", "save_ms"),
    [("saves costlier", 10.0, 60.0), ("steps faster beside the same saves", 4.0, 20.0)],
)
def test_the_interval_lengthens_at_once_when_saves_cost_more_of_a_step(change, step_ms, save_ms):
    budget = SaveBudget(0.02)
    measured(budget, step_ms=10.0, save_ms=20.0)
    before = budget.policy
    assert before is not None
    changes = measured(budget, step_ms=step_ms, save_ms=save_ms)
    assert changes, change
    assert changes[0].reason == "over_budget"
    after = changes[-1]
    assert after.interval_steps > before.interval_steps
    assert after.interval_steps >= least_interval(save_ms, step_ms, 0.02)  # within the budget again


def test_the_interval_shortens_only_when_saves_got_much_cheaper_and_stay_so():
    budget = SaveBudget(0.05)
    measured(budget, step_ms=10.0, save_ms=100.0)
    before = budget.policy
    assert before is not None
    # A third cheaper: still within the band, nothing changes.
    assert measured(budget, step_ms=10.0, save_ms=66.0) == []
    # Five times cheaper: shortened, once the estimate has seen it for SHORTEN_AFTER saves in a row.
    for _ in range(STEP_SAMPLES):
        budget.step(10.0)
    results = [budget.saved(20.0) for _ in range(COST_SAMPLES + SHORTEN_AFTER)]
    changes = [policy for policy in results if policy]
    assert len(changes) == 1 and changes[0].reason == "rarer_than_needed"
    assert results[0] is None  # one cheap save is not enough
    assert changes[0].interval_steps < before.interval_steps


def test_noise_alone_does_not_move_the_interval_back_and_forth():
    budget, rng = SaveBudget(0.02), random.Random(24)
    intervals = []
    for _ in range(400):
        for _ in range(20):
            budget.step(10.0 * rng.uniform(0.7, 1.3))
        budget.written(30.0)
        if policy := budget.saved(20.0 * rng.uniform(0.7, 1.3)):
            intervals.append(policy.interval_steps)
    settled = intervals[1:]  # past the first decision, made from one save
    assert len(settled) <= 3, intervals
    assert settled == sorted(settled), f"the interval went back down on noise: {intervals}"
    assert all(interval >= least_interval(20.0 * 1.3, 10.0, 0.02) * 0.9 for interval in settled)


def test_young_daly_sets_a_longer_interval_and_the_budget_clips_a_shorter_one():
    # Rare failures: Young/Daly's interval is longer than the budget needs, and is taken.
    budget = SaveBudget(0.05, mtbf_hours=24.0)
    (policy,) = measured(budget, step_ms=10.0, save_ms=20.0, saves=1)
    fitting = young_daly(20.0, 10.0, 24.0)  # sqrt(2 * 0.02 s * 86400 s) = 58.8 s = 5879 steps
    assert fitting == pytest.approx(math.sqrt(2 * 0.02 * 24 * 3600) / 0.01)
    assert policy.interval_steps == math.ceil(fitting) == policy.young_daly_steps
    # Frequent failures would want saves more often than the budget allows: the budget wins.
    budget = SaveBudget(0.01, mtbf_hours=0.001)
    (policy,) = measured(budget, step_ms=10.0, save_ms=20.0, saves=1)
    assert policy.young_daly_steps is not None
    assert policy.young_daly_steps < least_interval(20.0, 10.0, 0.01)
    assert policy.interval_steps == math.ceil(least_interval(20.0, 10.0, 0.01) * HEADROOM)
    assert policy.overhead <= 0.01


def test_the_meter_charges_a_save_the_excess_of_the_steps_it_touched():
    """Steps of 10 ms; a save stalls its boundary 3 ms and slows the two steps its write overlaps
    by 2 ms each: it costs 3 + 2 + 2 ms. Its window runs to the first boundary that knows the write
    finished; a save outside the budget and the step holding it are not measured."""
    meter, clock = SaveMeter(SaveBudget(0.01)), 0.0

    def step(ms: float):
        nonlocal clock
        clock += ms / 1e3
        return meter.boundary(clock)

    for _ in range(FIRST_SAVE_AFTER + 1):  # the first boundary only starts the clock
        assert not meter.due(steps_since_save=5)
        step(10.0)
    assert meter.due(steps_since_save=5)
    assert meter.periodic() is None
    meter.stalled(3.0)
    assert not meter.due(steps_since_save=5)  # the first save is still being measured
    step(10.0 + 3.0 + 2.0)
    step(10.0 + 2.0)
    meter.written(25.0)  # reported at this boundary, before it is timed
    policy = step(10.0)
    assert policy is not None and policy.save_ms == pytest.approx(7.0) and policy.write_ms == 25.0
    assert policy.interval_steps == math.ceil(7.0 / (0.01 * 10.0) * HEADROOM)
    assert meter.budget.step_ms == pytest.approx(10.0)
    meter.other_save()  # an epoch's save: the step holding it (and its evaluation) is no measurement
    step(5000.0)
    assert meter.budget.step_ms == pytest.approx(10.0)
    assert meter.due(steps_since_save=policy.interval_steps)
    assert not meter.due(steps_since_save=policy.interval_steps - 1)


def test_a_save_whose_steps_came_out_faster_costs_at_least_its_stall():
    meter, clock = SaveMeter(SaveBudget(0.01)), 0.0
    for _ in range(FIRST_SAVE_AFTER + 1):
        clock += 0.010
        meter.boundary(clock)
    meter.periodic()
    meter.stalled(1.5)
    meter.written(5.0)
    clock += 0.008  # faster than the median: noise, not a gain
    policy = meter.boundary(clock)
    assert policy is not None and policy.save_ms == pytest.approx(1.5)


@pytest.mark.parametrize(
    ("settings", "key"),
    [
        ({"max_overhead": 0.0}, "checkpoint.max_overhead"),
        ({"max_overhead": 2.0}, "checkpoint.max_overhead"),  # a percentage meant as a fraction
        ({"max_overhead": 0.02, "every_steps": 50}, "checkpoint.every_steps"),
        ({"max_overhead": 0.02, "mtbf_hours": 0.0}, "checkpoint.mtbf_hours"),
        ({"mtbf_hours": 24.0}, "checkpoint.mtbf_hours"),  # Young/Daly without the budget that clips it
    ],
)
def test_budget_settings_that_cannot_mean_anything_are_refused(settings, key):
    with pytest.raises(ConfigError, match=key):
        CheckpointConfig(**settings)


def test_a_budget_replaces_the_fixed_intervals():
    assert CheckpointConfig(max_overhead=0.02, mtbf_hours=24.0).every_steps == 0


def test_status_shows_the_policy_the_run_left_and_reports_a_file_that_is_not_one(tmp_path, capsys):
    from daemon.ckpt.layout import SAVE_POLICY_FILE
    from daemon.config.sections import Config
    from daemon.ops.status import _save_policy, _show_save_policy

    cfg = Config(checkpoint=CheckpointConfig(dir=str(tmp_path), max_overhead=0.02))
    assert _save_policy(cfg, tmp_path)["chosen"] is None  # no save measured yet
    budget = SaveBudget(0.02)
    (policy,) = measured(budget, step_ms=10.0, save_ms=20.0, saves=1)
    record = {**policy.fields(), "global_step": 50, "time": 1.0}
    (tmp_path / SAVE_POLICY_FILE).write_text(json.dumps(record))
    shown = _save_policy(cfg, tmp_path)
    assert shown["chosen"]["interval_steps"] == 125 and shown["unusable"] is None
    _show_save_policy(shown)
    assert "every 125 steps" in capsys.readouterr().out
    for planted, reason in [
        (json.dumps({**record, "save_ms": float("nan")}), "not a save policy"),
        (json.dumps({**record, "interval_steps": True}), "not a save policy"),
        ("[" * 100_000, "larger than"),
        ("{", "not JSON"),
    ]:
        (tmp_path / SAVE_POLICY_FILE).write_text(planted)
        assert reason in _save_policy(cfg, tmp_path)["unusable"]
    (tmp_path / SAVE_POLICY_FILE).unlink()
    (tmp_path / SAVE_POLICY_FILE).symlink_to(tmp_path / "elsewhere.json")
    assert "link" in _save_policy(cfg, tmp_path)["unusable"]
    fixed = _save_policy(Config(checkpoint=CheckpointConfig(dir=str(tmp_path), every_steps=50)), tmp_path)
    assert fixed["every_steps"] == 50 and "chosen" not in fixed  # the file is the budget's alone
