"""The metrics history: an interrupted run's equals an unbroken run's, record for record, with
the resumes and the emergency checkpoints recorded beside; a torn last line is dropped and said."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

from daemon.ckpt.history import HISTORY_FILE, HistoryReader
from daemon.errors import ExitCode
from trainer_proc import RunConfig, TrainerProcess, in_process_trainer, run_to_end

SETTINGS = {"log.metrics_every_steps": 5, "checkpoint.every_steps": 10, "log.progress_every_seconds": 0.001}
MOMENT = ("time", "seconds")  # when a record was written and how long an epoch took: not the run's content


def read_history(directory: Path) -> tuple[list[dict], int]:
    """The records of a run directory's history, and how many lines were dropped."""
    reader = HistoryReader(directory)
    return list(reader), reader.dropped


def training_records(directory: Path) -> list[dict]:
    records, dropped = read_history(directory)
    assert dropped == 0
    return [
        {key: value for key, value in record.items() if key not in MOMENT}
        for record in records
        if record["record"] in ("train", "eval")
    ]


@pytest.fixture(scope="module")
def unbroken_dir(mnist_root, tmp_path_factory) -> Path:
    config = RunConfig(workdir=tmp_path_factory.mktemp("unbroken"), data_root=mnist_root, settings=SETTINGS)
    run_to_end(config)
    return config.checkpoint_dir


@pytest.fixture(scope="module")
def unbroken(unbroken_dir) -> list[dict]:
    return training_records(unbroken_dir)


def test_an_unbroken_run_records_the_loss_every_n_steps_and_each_epoch(unbroken):
    steps = [record["global_step"] for record in unbroken if record["record"] == "train"]
    assert steps == list(range(5, 121, 5))
    evals = [record for record in unbroken if record["record"] == "eval"]
    assert [(e["epoch"], e["global_step"], e["headline"]) for e in evals] == [
        (1, 40, "test_accuracy"),
        (2, 80, "test_accuracy"),
        (3, 120, "test_accuracy"),
    ]
    assert all(0 < e["test_accuracy"] <= 1 and e["train_loss"] > 0 for e in evals)


@pytest.mark.parametrize("stop", ["SIGTERM", "SIGKILL"])
def test_an_interrupted_run_has_the_unbroken_runs_history(run_config, unbroken, stop):
    run_config.settings = SETTINGS
    process = TrainerProcess.start(run_config)
    if stop == "SIGTERM":
        process.wait_for("progress", where=lambda e: e["global_step"] >= 53)
        process.signal(signal.SIGTERM)
        assert process.wait() == ExitCode.STOPPED, process.output()
    else:
        process.wait_for("checkpoint_saved", checkpoint_global_step=50)
        process.wait_for("progress", where=lambda e: e["global_step"] >= 57)  # records past the checkpoint
        process.kill()
    rerun = run_to_end(run_config)

    assert training_records(run_config.checkpoint_dir) == unbroken
    (resumed,) = rerun.events("resumed")
    records, _ = read_history(run_config.checkpoint_dir)
    (resume,) = [record for record in records if record["record"] == "resume"]
    assert (resume["kind"], resume["global_step"]) == (resumed["kind"], resumed["global_step"])
    assert resume["steps_lost"] == resumed.get("steps_lost")
    marks = [record for record in records if record["record"] == "checkpoint"]
    if stop == "SIGTERM":
        assert resumed["kind"] == "emergency"
        assert [(m["kind"], m["global_step"]) for m in marks] == [("emergency", resumed["global_step"])]
    else:
        assert resumed["kind"] == "periodic" and resume["steps_lost"] >= 7
        assert marks == []


def test_a_torn_last_line_is_dropped_and_reported(run_config, unbroken):
    run_config.settings = {**SETTINGS, "train.epochs": 2}
    run_to_end(run_config)
    path = run_config.checkpoint_dir / HISTORY_FILE
    with path.open("a") as file:
        file.write('{"record": "train", "epoch": 2, "glo')  # a write cut short by a power loss

    run_config.settings = SETTINGS  # a third epoch
    rerun = run_to_end(run_config)

    (dropped,) = rerun.events("metrics_lines_dropped")
    assert dropped["lines"] == 1
    assert training_records(run_config.checkpoint_dir) == unbroken
    assert path.stat().st_mode & 0o777 == 0o600


def test_plot_draws_an_interrupted_run_over_an_unbroken_one(run_config, unbroken_dir):
    from PIL import Image  # matplotlib's own dependency

    run_config.settings = SETTINGS
    process = TrainerProcess.start(run_config)
    process.wait_for("progress", where=lambda e: e["global_step"] >= 60)
    process.signal(signal.SIGTERM)
    assert process.wait() == ExitCode.STOPPED
    run_to_end(run_config)
    out = run_config.workdir / "plot.png"

    plot = TrainerProcess.start(
        run_config, "--out", str(out), str(unbroken_dir), str(run_config.checkpoint_dir), command="plot"
    )

    assert plot.wait() == 0, plot.output()
    (written,) = plot.events("plot_written")
    assert written["runs"] == 2
    image = Image.open(out).convert("RGB")
    assert image.size == (1000, 700)
    assert len(image.getcolors(maxcolors=1 << 20)) > 100  # lines, marks, text: not a blank canvas


def test_plot_of_a_directory_without_history_is_a_config_error(run_config):
    plot = TrainerProcess.start(run_config, str(run_config.workdir), command="plot")
    assert plot.wait() == ExitCode.CONFIG
    (error,) = plot.events("config_error")
    assert "no metrics history" in error["message"]


def test_each_epoch_checkpoint_finds_its_evaluation_already_recorded(run_config):
    """A kill right after an epoch's checkpoint is durable must not lose the epoch's record: the
    resumed run goes on past that state and never writes it again."""
    import structlog

    run_config.settings = {**SETTINGS, "checkpoint.dir": str(run_config.checkpoint_dir)}
    trainer = in_process_trainer(run_config)
    store, saved_without_record = trainer.manager.store, []
    write = store.save

    def save_and_look(state: dict):
        records, _ = read_history(store.directory)
        here = (state["global_step"], state["epoch"])
        if state["kind"] in ("epoch", "final") and not any(
            r["record"] == "eval" and (r["global_step"], r["epoch"]) == here for r in records
        ):
            saved_without_record.append(here)
        return write(state)

    store.save = save_and_look  # the real store writes; this only looks at the history first
    with structlog.testing.capture_logs():
        assert trainer.run().exit_code == ExitCode.COMPLETE
    assert saved_without_record == []
