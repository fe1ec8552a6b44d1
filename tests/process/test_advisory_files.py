"""The run's advisory files (the metrics history, the trained-step marker) may be anything: a bad one
is reported and set aside, never a crash, a hang or a traceback, in `trainer run`, `status` and `plot`;
a history of any size is streamed."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from daemon.ckpt.history import HISTORY_FILE
from daemon.ckpt.layout import LOGGED_STEP_FILE
from daemon.errors import ExitCode
from trainer_proc import RunConfig, TrainerProcess, run_to_end

SHORT = {"train.max_steps": 3, "log.metrics_every_steps": 1}
SILENCE = 30  # a run or status that says nothing this long is stuck (on the FIFO, before the fix)


def record(global_step: int, **fields) -> str:
    line = {"record": "train", "epoch": 0, "step_in_epoch": global_step, "global_step": global_step,
            "loss": 0.5, "time": 1.0, **fields}  # fmt: skip
    return json.dumps(line) + "\n"


def make_unusable(directory: Path, name: str, kind: str, outside: Path) -> None:
    path = directory / name
    if kind == "directory":
        (path / "inside").mkdir(parents=True)
    elif kind == "fifo":
        os.mkfifo(path)
    elif kind == "link out of the directory":
        path.symlink_to(outside)
    elif kind == "link loop":
        path.symlink_to(path.name)


def status_json(run_config: RunConfig) -> dict:
    process = TrainerProcess.start(run_config, "--json", command="status")
    assert process.wait(silence=SILENCE) == 0, process.output()
    return json.loads(process.output())


UNUSABLE = ["directory", "fifo", "link out of the directory", "link loop"]


@pytest.mark.parametrize("kind", UNUSABLE)
def test_a_history_that_is_not_a_regular_file_is_set_aside(run_config, kind):
    run_config.settings = SHORT
    directory = run_config.checkpoint_dir
    directory.mkdir()
    outside = run_config.workdir / "elsewhere.jsonl"
    outside.write_text(record(1))
    make_unusable(directory, HISTORY_FILE, kind, outside)

    report = status_json(run_config)  # neither blocks on a FIFO nor follows a link
    assert report["metrics_history_unusable"] and report["resumes"] == {}
    plot = TrainerProcess.start(run_config, str(directory), command="plot")
    assert plot.wait(silence=SILENCE) == ExitCode.CONFIG
    assert "cannot be read" in plot.events("config_error")[0]["message"]

    process = TrainerProcess.start(run_config)
    assert process.wait(silence=SILENCE) == 0, process.output()
    (invalid,) = process.events("advisory_file_invalid")
    assert run_config.workdir / invalid["path"] == directory / HISTORY_FILE  # relative to the run's directory
    assert run_config.workdir / invalid["moved_to"] == directory / (HISTORY_FILE + ".invalid")
    assert os.path.lexists(directory / (HISTORY_FILE + ".invalid"))
    lines = (directory / HISTORY_FILE).read_text().splitlines()  # a new history, a regular file
    assert [json.loads(line)["global_step"] for line in lines] == [1, 2, 3]
    assert outside.read_text() == record(1)  # never written through a link


def test_a_history_that_cannot_be_set_aside_is_left_alone(run_config):
    run_config.settings = SHORT
    directory = run_config.checkpoint_dir
    (directory / HISTORY_FILE / "inside").mkdir(parents=True)
    (directory / (HISTORY_FILE + ".invalid")).write_text("a file: a directory cannot replace it")

    process = TrainerProcess.start(run_config)

    assert process.wait(silence=SILENCE) == 0, process.output()
    (invalid,) = process.events("advisory_file_invalid")
    assert invalid["moved_to"] is None
    assert (directory / HISTORY_FILE / "inside").is_dir()
    assert not process.events("metrics_history_unavailable")  # set aside said it: the run goes on without


BAD_LINES = [
    record(2, epoch="x"),  # valid JSON, an epoch that is not a count
    json.dumps({"epoch": 0, "step_in_epoch": 3, "global_step": 3, "time": 1.0}) + "\n",  # no `record`
    record(4, loss=True),  # a bool is no loss
    json.dumps(
        {
            "record": "eval",
            "epoch": 1,
            "step_in_epoch": 0,
            "global_step": 5,
            "time": 1.0,
            "headline": "test_accuracy",
            "seconds": 1.0,
        }
    )
    + "\n",  # fmt: skip  # the headline's value missing
    "[" * 200_000 + "\n",  # too long for a record
    "[" * 60_000 + "\n",  # short enough, nested too deep for the parser
    "\xff not UTF-8\n",
    "[1, 2]\n",
]


def test_lines_that_are_not_records_are_dropped_by_status_plot_and_a_resume(run_config):
    run_config.settings = {**SHORT, "train.max_steps": 10}
    directory = run_config.checkpoint_dir
    directory.mkdir()
    with (directory / HISTORY_FILE).open("w", encoding="latin-1") as file:
        file.write(record(1) + "".join(BAD_LINES) + record(6))

    report = status_json(run_config)
    assert report["metrics_lines_dropped"] == len(BAD_LINES) and report["metrics_history_unusable"] is None
    plot = TrainerProcess.start(
        run_config, "--out", str(run_config.workdir / "plot.png"), str(directory), command="plot"
    )
    assert plot.wait(silence=SILENCE) == 0, plot.output()

    process = run_to_end(run_config)
    (dropped,) = process.events("metrics_lines_dropped")
    assert dropped["lines"] == len(BAD_LINES)
    steps = [json.loads(line)["global_step"] for line in (directory / HISTORY_FILE).read_text().splitlines()]
    assert steps == list(range(1, 11))  # the fresh start dropped the old records past step 0 too


# One record that is not a step, and the FIFO a reader could hang on: each other kind of bad marker
# is read directly in tests/unit/test_logged_step.py.
@pytest.mark.parametrize("content", ['{"global_step": -3}', "fifo"])
def test_a_marker_that_is_not_a_step_is_set_aside_and_the_steps_lost_unknown(run_config, content):
    run_config.settings = {"train.max_steps": 5}
    run_to_end(run_config)
    marker = run_config.checkpoint_dir / LOGGED_STEP_FILE
    marker.unlink()
    if content == "fifo":
        make_unusable(run_config.checkpoint_dir, LOGGED_STEP_FILE, content, run_config.workdir)
    else:
        marker.write_text(content)

    run_config.settings = {"train.max_steps": 10}
    process = TrainerProcess.start(run_config)

    assert process.wait(silence=SILENCE) == 0, process.output()
    (invalid,) = process.events("advisory_file_invalid")
    assert run_config.workdir / invalid["path"] == marker
    assert run_config.workdir / invalid["moved_to"] == marker.with_name(LOGGED_STEP_FILE + ".invalid")
    (resumed,) = process.events("resumed")
    assert resumed["global_step"] == 5 and "steps_lost" not in resumed
    assert json.loads(marker.read_text()) == {"global_step": 10}  # marked anew


def test_a_large_history_is_streamed_not_read_whole(run_config):
    """About 40 MB of valid records past a fresh start: read, then rewritten without them, a line at
    a time; the peak memory is that of a run without them."""
    run_config.settings = {**SHORT, "train.max_steps": 1}
    baseline = run_to_end(run_config)
    directory = run_config.checkpoint_dir
    for path in directory.iterdir():
        path.unlink()
    with (directory / HISTORY_FILE).open("w") as file:
        file.writelines(record(step) for step in range(1, 300_001))
    size = (directory / HISTORY_FILE).stat().st_size

    process = run_to_end(run_config)

    assert process.max_rss_bytes is not None and baseline.max_rss_bytes is not None
    added = process.max_rss_bytes - baseline.max_rss_bytes
    assert added < size / 4, f"{added / 2**20:.0f} MiB more than a run without the history ({size / 2**20:.0f} MiB)"
    assert [json.loads(line)["global_step"] for line in (directory / HISTORY_FILE).read_text().splitlines()] == [1]
