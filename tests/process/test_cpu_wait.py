"""`train.cpu_wait: auto`: the OpenMP waiting policy follows what other work does on the run's CPUs,
and a switch (a checkpoint, then a fresh process resuming from it) keeps the run bitwise exact.
Real processes beside real busy loops; where the machine itself decides the starting point (busy
at start, never quiet), the test says so and skips rather than guess."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

from daemon.errors import ExitCode
from daemon.ops.child import event_time
from daemon.service.contention import QUIET_CPUS, QUIET_FOR_S, SHARED_CPUS
from trainer_proc import UNTIL_STOPPED, TrainerProcess, assert_same_training, busy_loops, final_checkpoint, run_to_end

SETTINGS = {"train.cpu_wait": "auto", "train.cpu_threads": 2, "log.progress_every_seconds": 1}


def processes_running(config: Path) -> list[int]:
    """PIDs whose command line names this config: the trainer and its DataLoader workers (forks)."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and str(config).encode() in (entry / "cmdline").read_bytes():
                found.append(int(entry.name))
        except OSError:
            pass  # exited meanwhile
    return found


def test_busy_work_makes_a_spinning_run_hand_over_exactly(run_config, reference_runs):
    """Started on a quiet machine the run spins (`active`); busy loops beside it make it checkpoint
    and hand over to a fresh process (same PID) that sleeps at barriers (`bounded`), leaving no
    DataLoader worker behind. Stopped there, then resumed for a few steps more, the run ends
    bitwise equal to an unbroken one."""
    settings = {**SETTINGS, "train.epochs": UNTIL_STOPPED, "data.num_workers": 2}  # ends when the test stops it
    run_config.settings = settings
    process = TrainerProcess.start(run_config)
    start = process.wait_for("determinism")
    if start["cpu_wait_in_force"] != "active":
        process.kill()
        pytest.skip(
            f"other work used {start['others_cpus']} CPUs at start: the run chose bounded, nothing to switch from"
        )
    assert start["cpu_wait_switching"] is True
    with busy_loops():
        switch = process.wait_for("cpu_wait_switch", to="bounded")
        assert switch["from"] == "active" and switch["others_cpus"] >= SHARED_CPUS
    # Switched: the handover follows whatever the machine does now (the successor is handed its
    # policy, and HOLD_S keeps it there), and it restarts faster without the loops.
    resumed = process.wait_for("resumed", kind="handover")
    assert resumed["global_step"] == switch["global_step"] and resumed["pid"] == start["pid"]
    successor = process.wait_for("determinism")
    assert successor["cpu_wait_in_force"] == "bounded" and successor["environment"]["GOMP_SPINCOUNT"] == "1000"
    workers = set(processes_running(run_config.workdir / "config.yaml")) - {process.pid}
    assert len(workers) <= 2, f"DataLoader workers of the first image outlived it: {sorted(workers)}"
    process.signal(signal.SIGTERM)
    assert process.wait() == ExitCode.STOPPED, process.output()
    (stopped,) = process.events("stopped")

    run_config.settings = {**settings, "train.max_steps": stopped["global_step"] + 20}  # a resume may change it
    run_to_end(run_config)

    expected = reference_runs(**{**run_config.settings, "train.cpu_wait": "bounded"})
    assert_same_training(final_checkpoint(run_config.checkpoint_dir), expected)


def test_a_sleeping_run_hands_back_to_spinning_once_the_machine_is_quiet(run_config):
    """Started beside busy loops the run sleeps at barriers (`bounded`); once they are gone and the
    CPUs stay quiet for QUIET_FOR_S, it hands over to a process that spins (`active`)."""
    run_config.settings = {**SETTINGS, "data.train_subset": 20000, "train.epochs": UNTIL_STOPPED}  # stopped below
    with busy_loops():
        process = TrainerProcess.start(run_config)
        start = process.wait_for("determinism")
    assert start["cpu_wait_in_force"] == "bounded" and start["others_cpus"] >= SHARED_CPUS, start
    quiet_from = None  # the first of an unbroken run of quiet readings
    while True:
        record = process.wait_for(None, where=lambda r: r["event"] in ("progress", "cpu_wait_switch"))
        if record["event"] == "cpu_wait_switch":
            break
        others = record.get("others_cpus")
        if others is None or others >= QUIET_CPUS:  # the busy loops' last second, or other work
            quiet_from = None
        elif quiet_from is None:
            quiet_from = record
        elif event_time(record) - event_time(quiet_from) > QUIET_FOR_S + 10:
            pytest.fail(f"quiet for {QUIET_FOR_S + 10} s by the run's own readings, and no switch:\n{process.output()}")
        if event_time(record) - event_time(start) > 4 * QUIET_FOR_S:
            process.kill()
            pytest.skip("other work kept this machine's CPUs busy: the quiet direction needs a quiet machine")
    assert record["from"] == "bounded" and record["to"] == "active" and record["others_cpus"] < QUIET_CPUS
    successor = process.wait_for("determinism")
    assert successor["cpu_wait_in_force"] == "active" and "GOMP_SPINCOUNT" not in successor["environment"]
    process.wait_for("epoch_started")
    process.signal(signal.SIGTERM)
    assert process.wait() == ExitCode.STOPPED, process.output()
