"""`checkpoint.max_overhead`: real trainer processes choose their periodic interval from what saves
are measured to cost them. The tests judge the decisions by the run's own logged measurements
(`save_policy`), never by wall-clock targets: each interval is the one its measurements call for,
within the budget, and the saves follow it; costlier saves lengthen it; busy loops started beside
the run are measured and decided on; and a run killed at a random step resumes bitwise exact,
although the steps its checkpoints were taken at depend on timing."""

from __future__ import annotations

import math
import random
import signal

from daemon.ckpt.budget import HEADROOM, SLACK
from daemon.errors import ExitCode
from trainer_proc import (
    NOT_BUILTIN,
    UNTIL_STOPPED,
    TrainerProcess,
    assert_same_training,
    busy_loops,
    final_checkpoint,
    run_to_end,
)

BALLAST_TASK = __file__.replace("test_budgeted_saves.py", "ballast_task.py")
BALLAST_MB = 64  # 13 times the MLP's checkpoint: whatever the machine, a save of it costs more
BUSY_SAVES = 3  # periodic saves measured beside the busy loops before the test moves on
BIG_SAVES = 5  # big saves that must have changed the interval by then: the whole cost window renewed


def is_periodic(record: dict) -> bool:
    return record["event"] == "checkpoint_saved" and record["kind"] == "periodic"


def in_force(policies: list[dict], step: int) -> dict | None:
    """The policy a due check at `step` used: the last one chosen at an earlier step's boundary."""
    earlier = [policy for policy in policies if policy["global_step"] < step]
    return earlier[-1] if earlier else None


def assert_decisions_follow_measurements(process: TrainerProcess, max_overhead: float) -> list[dict]:
    """Every interval is the one the measurements logged beside it call for, and keeps the saves
    within the budget by them; every change is one the rules make from them. Returns the policies."""
    policies = process.events("save_policy")
    assert policies and policies[0]["reason"] == "first", process.output()
    previous = None
    for policy in policies:
        save_ms, step_ms, interval = policy["save_ms"], policy["step_ms"], policy["interval_steps"]
        least = save_ms / (max_overhead * step_ms)
        wanted = max(least * HEADROOM, policy["young_daly_steps"] or 0)
        assert abs(interval - max(1, math.ceil(wanted))) <= 1, policy  # logged values are rounded
        assert math.isclose(policy["overhead"], save_ms / (interval * step_ms), rel_tol=1e-2, abs_tol=1e-5), policy
        assert policy["overhead"] <= max_overhead, policy
        assert policy["max_overhead"] == max_overhead
        assert policy["expected_loss_steps"] >= interval / 2, policy
        if previous is not None:
            if policy["reason"] == "over_budget":
                assert least * 1.01 > previous["interval_steps"], (previous, policy)
            else:
                assert policy["reason"] == "rarer_than_needed", policy
                assert wanted * SLACK < previous["interval_steps"] * 1.01, (previous, policy)
        previous = policy
    return policies


def assert_saves_follow_the_interval(process: TrainerProcess) -> int:
    """Each periodic save after the first was made at the first step its interval in force was
    reached, counted from the newest checkpoint of any kind. Returns how many were checked."""
    policies = process.events("save_policy")
    saves = sorted(process.events("checkpoint_saved"), key=lambda save: save["checkpoint_global_step"])
    checked = 0
    for newest, save in zip(saves, saves[1:], strict=False):
        step, since = save["checkpoint_global_step"], newest["checkpoint_global_step"]
        policy = in_force(policies, step)
        if save["kind"] != "periodic" or policy is None:
            continue  # outside the budget, or the first save, made to measure one
        assert step - since >= policy["interval_steps"], (newest, save, policy)
        before = in_force(policies, step - 1)
        assert before is not None and step - 1 - since < before["interval_steps"], (newest, save, before)
        checked += 1
    return checked


def test_the_interval_follows_the_measured_cost_of_saves(run_config):
    """Quiet at first: the first save is measured and the interval set. Then busy loops start beside
    the run: the policy measures the busy machine and decides from it (which way is the machine's:
    the loops slow the steps and the writer alike). Then the task's state grows 13-fold: the
    interval lengthens, the save cost measured higher. Throughout, every decision follows the run's
    own logged measurements and keeps the measured overhead within the budget, and the saves
    follow the interval in force."""
    trigger = run_config.workdir / "grow"
    run_config.settings = {
        **NOT_BUILTIN,
        "task.entry": f"{BALLAST_TASK}:build",
        "task.options": {"grow_when": str(trigger), "megabytes": BALLAST_MB},
        "train.epochs": UNTIL_STOPPED,  # stopped below
        "checkpoint.max_overhead": 0.05,
        "checkpoint.keep_last": 2,
        "log.progress_every_seconds": 1,
    }
    process = TrainerProcess.start(run_config)
    first = process.wait_for("save_policy")
    assert first["reason"] == "first" and first["global_step"] > 0

    with busy_loops():
        for _ in range(BUSY_SAVES):  # measured beside the loops: a change, or saves that kept the interval
            seen = process.wait_for(None, where=lambda r: r["event"] == "save_policy" or is_periodic(r))
            if seen["event"] == "save_policy":
                break
        trigger.touch()
        big = process.wait_for("checkpoint_saved", kind="periodic", where=lambda r: r["bytes"] > BALLAST_MB << 20)
        before = [r for r in process.records[: process.records.index(big)] if r["event"] == "save_policy"][-1]
        for _ in range(BIG_SAVES):  # the first change once a big save was measured
            grown = process.wait_for(None, where=lambda r: r["event"] == "save_policy" or is_periodic(r))
            if grown["event"] == "save_policy":
                break
        else:
            raise AssertionError(f"{BIG_SAVES} saves of {BALLAST_MB} MB, and the interval stayed:\n{process.output()}")
    process.signal(signal.SIGTERM)
    assert process.wait() == ExitCode.STOPPED, process.output()

    # A save now costs more of a step: the interval lengthens at once to keep the budget.
    assert grown["reason"] == "over_budget", grown
    assert grown["save_ms"] / grown["step_ms"] > before["save_ms"] / before["step_ms"], (before, grown)
    assert grown["interval_steps"] > before["interval_steps"], (before, grown)
    assert_decisions_follow_measurements(process, 0.05)
    assert assert_saves_follow_the_interval(process) >= 2, process.output()


def test_a_run_killed_at_a_random_step_resumes_exactly_whatever_steps_the_budget_saved_at(run_config, reference_runs):
    """The checkpoints' steps depend on timing, the trained weights must not: SIGKILL at a random
    step, resume, and the final state (weights, optimizer, RNG, data order) is bitwise that of the
    unbroken run every exactness test compares with, which saves at the epochs' ends only: a save
    changes nothing the training computes, wherever the budget puts it."""
    settings = {"checkpoint.max_overhead": 0.2, "log.progress_every_seconds": 0.001}  # a progress event each step
    kill_at = random.Random().randint(15, 90)  # SMALL_SETTINGS: 3 epochs of 40; the resumed run measures a save too
    run_config.settings = settings
    process = TrainerProcess.start(run_config)
    try:
        process.wait_for("checkpoint_saved")  # the first, made to measure a save: a resume from it at the least
        process.wait_for("progress", where=lambda r: r["global_step"] >= kill_at)
    finally:
        process.kill()
    killed = process.events("progress")[-1]["global_step"]
    assert_decisions_follow_measurements(process, 0.2)

    resumed_run = run_to_end(run_config)

    (resumed,) = resumed_run.events("resumed")
    assert 0 < resumed["global_step"] <= killed, (kill_at, resumed)
    assert_decisions_follow_measurements(resumed_run, 0.2)
    assert_same_training(final_checkpoint(run_config.checkpoint_dir), reference_runs())
