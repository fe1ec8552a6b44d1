"""An option no checkpoint can keep ends the real CLI with exit 78 before anything is trained or
written. (Each kind of option refused, and what is kept exactly: tests/unit/test_config_options.py.
A resume with plain options stays exact: tests/process/test_task.py.)"""

from __future__ import annotations

from pathlib import Path

from daemon.errors import ExitCode
from daemon.ops.child import TrainerChild

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def test_a_list_of_mappings_in_the_options_is_refused_before_training(tmp_path, mnist_root):
    # A few steps of the example, were the option let through: its checkpoints would have been set
    # aside as invalid on every restart.
    process = TrainerChild.cli(
        "run", "--config", str(EXAMPLES / "mnist_cnn.yaml"),
        "--set", f"task.entry={EXAMPLES / 'mnist_cnn.py'}:build",
        "--set", f"data.root={mnist_root}",
        "--set", "task.options.train_subset=200",
        "--set", "train.max_steps=2",
        "--set", "log.format=json",
        "--set", "task.options.x=[{a: 1}]",
        cwd=tmp_path,
    )  # fmt: skip

    assert process.wait() == ExitCode.CONFIG, process.output()
    (refused,) = process.events("config_error")
    assert "task.options.x[0]: a mapping inside a list" in refused["message"], refused["message"]
    assert not process.events("run_started")
    assert list(tmp_path.iterdir()) == []  # no checkpoint, no run directory
