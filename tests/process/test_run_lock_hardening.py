"""The run lock where it used to give way: through a `cpu_wait` handover's exec, when `run.lock` is
deleted under a run, beside the crash-loop guard of a second start, and in a directory other users
can write (links planted as the user nobody). Real processes, real signals, real files."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import stat
import subprocess
import tempfile
from pathlib import Path

import pytest

from daemon.errors import ExitCode
from trainer_proc import (
    UNTIL_STOPPED,
    RunConfig,
    TrainerProcess,
    assert_same_training,
    final_checkpoint,
    run_to_end,
)

CPU_WAIT_AUTO = {"train.cpu_wait": "auto", "train.cpu_threads": 2, "log.progress_every_seconds": 1}
# A narrow MLP: the step in flight when the loops start must end before the run can switch, and
# beside them its two threads' every barrier waits out the loops' round-robin time slices. Epochs
# of 200 steps: an epoch's end (its evaluation and checkpoint) seldom falls among the slow steps.
NARROW = {"model.hidden": [32], "data.train_subset": 20000}
# As root, the run and the loops that make it switch run on one CPU ahead of all other work there
# (round-robin real-time scheduling, which the kernel caps at 95% of that CPU): the run measures
# that CPU alone, quiet at its start and busy once the loops run, however busy the rest of the
# machine is. Elsewhere they run as any process, and the test needs a quiet machine to start.
CPU = str(min(os.sched_getaffinity(0)))
AHEAD_ON_ONE_CPU = ("chrt", "--rr", "1", "taskset", "-c", CPU) if os.geteuid() == 0 else ()


def only_event(process: TrainerProcess) -> dict:
    (record,) = process.events()
    return record


@contextlib.contextmanager
def busy_loops_beside_the_run():
    """More runnable work than the run's two threads wherever it runs: others take most of its CPUs."""
    count = 4 if AHEAD_ON_ONE_CPU else (os.cpu_count() or 1) + 2
    loops = [subprocess.Popen([*AHEAD_ON_ONE_CPU, "sh", "-c", "while :; do :; done"]) for _ in range(count)]
    try:
        yield
    finally:
        for loop in loops:
            loop.kill()
            loop.wait()


def test_a_cpu_wait_handover_keeps_the_directory_locked_through_its_exec(run_config, reference_runs, tmp_path):
    """A second run started while the first hands over to its successor image is refused (69), and
    the first goes on in the new image, bitwise exact."""
    settings = {**CPU_WAIT_AUTO, **NARROW, "train.epochs": UNTIL_STOPPED}  # ends when the test stops it
    run_config.settings = settings
    first = TrainerProcess.start(run_config, wrapper=AHEAD_ON_ONE_CPU)
    start = first.wait_for("determinism")
    if start["cpu_wait_in_force"] != "active":
        first.kill()
        pytest.skip(
            f"other work used {start['others_cpus']} CPUs at start: the run chose bounded, nothing to switch from"
        )
    with busy_loops_beside_the_run():
        switch = first.wait_for("cpu_wait_switch", to="bounded")
        # The old image's last event: from here it closes what it has open and execs the new one, which
        # rebuilds the run before it could lock the directory again.
        first.wait_for("checkpoint_saved", kind="handover")
        # From a directory of its own (the first re-reads its config file in the new image), and with
        # an end: were it to get the directory, it would not train for ever.
        intruder = RunConfig(
            workdir=tmp_path / "second",
            data_root=run_config.data_root,
            settings={
                **settings,
                "checkpoint.dir": str(run_config.checkpoint_dir),
                "train.max_steps": switch["global_step"] + 5,
            },
        )
        intruder.workdir.mkdir()
        second = TrainerProcess.start(intruder)
        assert second.wait() == ExitCode.IN_USE, second.output()
    # The loops kept the new image rebuilding until the second run was refused; without them it
    # gets there in seconds (HOLD_S keeps it from switching back meanwhile).
    refused = only_event(second)
    assert refused["event"] == "checkpoint_dir_in_use" and refused["holder_pid"] == first.pid, refused
    resumed = first.wait_for("resumed", kind="handover")
    assert resumed["global_step"] == switch["global_step"] and resumed["pid"] == start["pid"]
    first.wait_for("progress")  # trains on in the new image
    first.signal(signal.SIGTERM)
    assert first.wait() == ExitCode.STOPPED, first.output()
    (stopped,) = first.events("stopped")

    run_config.settings = {**settings, "train.max_steps": stopped["global_step"] + 20}  # a resume may change it
    run_to_end(run_config)

    expected = reference_runs(**{**run_config.settings, "train.cpu_wait": "bounded"})
    assert_same_training(final_checkpoint(run_config.checkpoint_dir), expected)


def test_a_run_whose_lock_file_is_deleted_stops_without_saving_and_the_next_run_trains_alone(
    run_config, reference_runs
):
    """Once run.lock is deleted, a second run can lock a new one: the first stops at its next save
    (69, `run_lock_lost`), the second trains to the end, exactly."""
    run_config.settings = {"checkpoint.every_steps": 1}  # a save, and so a look at the lock, every step
    first = TrainerProcess.start(run_config)
    first.wait_for("checkpoint_saved", checkpoint_global_step=3)
    first.signal(signal.SIGSTOP)  # however fast it trains, it is still training once the file is gone
    (run_config.checkpoint_dir / "run.lock").unlink()
    first.signal(signal.SIGCONT)
    second = TrainerProcess.start(run_config)

    assert first.wait() == ExitCode.IN_USE, first.output()
    lost = first.events()[-1]
    assert lost["event"] == "run_lock_lost" and lost["exit_code"] == 69, first.output()
    assert "run.lock was removed" in lost["message"] or "run.lock was replaced" in lost["message"]
    assert "another run may be training" in lost["message"]
    assert not first.events("training_completed") and not first.events("stopped")
    assert second.wait() == 0, second.output()
    assert second.events("resumed"), "the second run resumes from the first's checkpoints"
    assert_same_training(final_checkpoint(run_config.checkpoint_dir), reference_runs(**run_config.settings))


def test_a_start_beside_a_running_run_leaves_the_crash_record_alone_and_its_kill_is_counted(run_config):
    run_config.settings = {"train.epochs": UNTIL_STOPPED}  # killed below
    run_config.checkpoint_dir.mkdir()  # the guard keeps its record where the directory exists
    record = run_config.checkpoint_dir / "crash-record.json"
    first = TrainerProcess.start(run_config)
    first.wait_for("run_started")  # past the guard, holding the directory
    before = record.read_bytes()

    second = TrainerProcess.start(run_config)
    assert second.wait() == ExitCode.IN_USE, second.output()
    assert only_event(second)["event"] == "checkpoint_dir_in_use"
    assert record.read_bytes() == before, "the refused start changed the running run's record"

    first.kill()
    third = TrainerProcess.start(run_config)
    third.wait_for("run_started")
    assert json.loads(record.read_text())["crashes"] == 1, "the killed run was not counted"
    third.kill()


def test_a_crash_record_that_is_a_fifo_is_set_aside_and_the_run_starts(run_config):
    """Opened for reading, a FIFO would wait for a writer for ever."""
    run_config.checkpoint_dir.mkdir()
    os.mkfifo(run_config.checkpoint_dir / "crash-record.json")
    run_config.settings = {"train.max_steps": 2}
    process = TrainerProcess.start(run_config)
    warning = process.wait_for("advisory_file_invalid")
    assert run_config.workdir / warning["path"] == run_config.checkpoint_dir / "crash-record.json", warning
    assert process.wait() == 0, process.output()
    assert stat.S_ISFIFO(os.lstat(run_config.workdir / warning["moved_to"]).st_mode)


# -- a directory other users can write -------------------------------------------------------


def as_nobody(*command: str) -> None:
    subprocess.run(["runuser", "-u", "nobody", "--", *command], check=True)


@pytest.fixture
def shared_directory():
    """A directory anyone may write, as /tmp, where the user nobody can reach it (a test's tmp_path
    is root's alone)."""
    if os.geteuid() != 0 or shutil.which("runuser") is None:
        pytest.skip("plants links as the user nobody: needs root and runuser")
    directory = Path(tempfile.mkdtemp(prefix="trainer-shared-", dir="/tmp"))
    directory.chmod(0o777)
    try:
        yield directory
    finally:
        shutil.rmtree(directory)


def test_links_planted_by_another_user_are_never_written_through(run_config, tmp_path, shared_directory):
    """nobody links the crash record and its old fixed temporary name to a root-only file; the root
    trainer runs there, warns that others can write the directory, and leaves the file untouched."""
    secret = tmp_path / "secret"
    secret.write_text("root's alone\n")
    secret.chmod(0o600)
    as_nobody("ln", "-s", str(secret), str(shared_directory / ".crash-record.json.new"))
    as_nobody("ln", "-s", str(secret), str(shared_directory / "crash-record.json"))
    run_config.settings = {"checkpoint.dir": str(shared_directory), "train.max_steps": 2}

    process = run_to_end(run_config)

    assert secret.read_text() == "root's alone\n" and stat.S_IMODE(secret.stat().st_mode) == 0o600
    (warned,) = process.events("checkpoint_dir_writable_by_others")
    assert warned["path"] == str(shared_directory) and warned["mode"] == "0777" and warned["level"] == "warning"


def test_a_lock_file_planted_as_a_link_is_refused_and_nothing_is_created(run_config, tmp_path, shared_directory):
    target = tmp_path / "created-by-root"
    as_nobody("ln", "-s", str(target), str(shared_directory / "run.lock"))
    run_config.settings = {"checkpoint.dir": str(shared_directory)}

    process = TrainerProcess.start(run_config)

    assert process.wait() == ExitCode.CANT_WRITE, process.output()
    (failed,) = process.events("checkpoint_write_failed")
    assert "run.lock is a symbolic link" in failed["message"] and "does not follow" in failed["message"]
    assert not target.exists(), "the trainer created a file through the planted link"
    assert not process.events("crashed") and "Traceback" not in process.output()
