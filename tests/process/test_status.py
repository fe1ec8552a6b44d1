"""`trainer status`: the checkpoints, the epochs, the resumes, a running trainer and its ETA."""

from __future__ import annotations

import json
import signal
import time

from daemon.config.sections import Config
from daemon.errors import ExitCode
from daemon.ops.status import report
from trainer_proc import UNTIL_STOPPED, TrainerProcess, run_to_end

SETTINGS = {"log.metrics_every_steps": 2, "checkpoint.every_steps": 10, "log.progress_every_seconds": 0.001}


def status(run_config, *extra: str) -> str:
    process = TrainerProcess.start(run_config, *extra, command="status")
    assert process.wait() == 0, process.output()
    return process.output()


def test_status_of_a_run_in_progress_names_its_pid_and_an_eta(run_config):
    run_config.settings = {**SETTINGS, "train.epochs": UNTIL_STOPPED}  # still running while status looks: killed below
    process = TrainerProcess.start(run_config)
    try:
        process.wait_for("checkpoint_saved", checkpoint_global_step=20)
        report = json.loads(status(run_config, "--json"))
        assert (report["run_in_progress"], report["run_pid"]) == (True, process.pid)
        assert report["total_steps"] == UNTIL_STOPPED * 40 and not report["complete"]
        assert report["eta_s"] > 0 and report["newest_checkpoint_age_s"] >= 0
        shown = status(run_config)
        assert f"a run holds this directory (PID {process.pid})" in shown and "ETA " in shown
    finally:
        process.kill()


def test_status_after_resumes_counts_them_and_lists_the_epochs(run_config):
    run_config.settings = SETTINGS
    for _ in range(2):
        process = TrainerProcess.start(run_config)
        process.wait_for("progress", where=lambda e: e["global_step"] >= 15)
        process.signal(signal.SIGTERM)
        assert process.wait() == ExitCode.STOPPED
    run_to_end(run_config)

    report = json.loads(status(run_config, "--json"))
    assert report["resumes"] == {"emergency": 2}
    assert report["complete"] and report["eta_s"] is None and not report["run_in_progress"]
    assert [row["epoch"] for row in report["history"]] == [1, 2, 3]
    assert all(row["headline"] == "test_accuracy" and row["seconds"] > 0 for row in report["history"])
    shown = status(run_config)
    assert "resumed 2 times (2 from emergency)" in shown
    assert "   3  train_loss " in shown and "test_accuracy" in shown
    assert len(shown.splitlines()) < 25  # one screen


def test_status_beside_a_pruning_trainer_shows_no_pruned_file_as_invalid(run_config):
    """Retention deletes checkpoints while status reads them: a file gone since the listing was
    pruned, not broken, and status must neither call it invalid nor fail on it."""
    run_config.settings = {**SETTINGS, "checkpoint.every_steps": 1, "checkpoint.keep_last": 1,
                           "train.epochs": UNTIL_STOPPED, "checkpoint.dir": str(run_config.checkpoint_dir)}  # fmt: skip
    process = TrainerProcess.start(run_config)
    try:
        process.wait_for("checkpoint_saved", checkpoint_global_step=5)
        cfg = Config.from_yaml(run_config.write())
        # At least 100 looks, and on until the trainer went on meanwhile: on a loaded machine 100
        # looks may all fall within one of its steps.
        looks = [report(cfg) for _ in range(100)]
        deadline = time.monotonic() + 120
        while looks[-1]["global_step"] == looks[0]["global_step"] and time.monotonic() < deadline:
            looks.append(report(cfg))
    finally:
        process.kill()
    assert all(row["valid"] for look in looks for row in look["checkpoints"]), "a pruned file shown as invalid"
    assert looks[-1]["global_step"] > looks[0]["global_step"]  # it looked while the trainer went on
