"""A task file that other users can change is code they choose for the run: the real trainer warns
about the file and every directory on its way that they can write, and says nothing about one only
its owner can."""

from __future__ import annotations

import shutil
from pathlib import Path

from trainer_proc import NOT_BUILTIN, TINY_TASK, RunConfig, run_to_end

# The tiny task, trained for two steps: the warning comes as the file is imported, before training.
SETTINGS = {**NOT_BUILTIN, "train.epochs": 1, "train.max_steps": 2, "train.batch_size": 16}


def task_copy(directory: Path, directory_mode: int, file_mode: int) -> Path:
    directory.mkdir()
    task = directory / "my_task.py"
    shutil.copyfile(TINY_TASK, task)
    task.chmod(file_mode)
    directory.chmod(directory_mode)
    return task


def test_a_task_file_others_can_write_is_reported_with_its_directory(run_config: RunConfig, tmp_path: Path) -> None:
    """A 0666 file in a 0777 directory (as the issue found, imported and run as root)."""
    task = task_copy(tmp_path / "shared", 0o777, 0o666)
    run_config.settings = {**SETTINGS, "task.entry": f"{task}:build"}

    process = run_to_end(run_config)

    warned = process.events("task_file_writable_by_others")
    assert {(event["path"], event["mode"], event["level"]) for event in warned} == {
        (str(task), "0666", "warning"),
        (str(task.parent), "0777", "warning"),
    }, warned
    assert len(warned) == 2


def test_a_task_file_only_its_owner_can_write_is_not_reported(run_config: RunConfig, tmp_path: Path) -> None:
    task = task_copy(tmp_path / "own", 0o755, 0o644)
    run_config.settings = {**SETTINGS, "task.entry": f"{task}:build"}

    process = run_to_end(run_config)

    assert process.events("run_started") and not process.events("task_file_writable_by_others")
