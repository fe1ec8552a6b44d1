"""On a terminal (a real one: tmux), a live display below short event lines; Ctrl+C saves, exits
75 and leaves the terminal clean. Off a terminal, JSON lines only."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
import uuid

import pytest

from daemon.ops.child import parse_event
from trainer_proc import TrainerProcess

pytestmark = pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed (.ci/run installs it)")
COLUMNS, ROWS = 160, 40


class Tmux:
    """A detached tmux server of our own, one window of COLUMNS x ROWS."""

    def __init__(self) -> None:
        self.socket = f"trainer-test-{uuid.uuid4().hex[:8]}"
        self("new-session", "-d", "-s", "t", "-x", str(COLUMNS), "-y", str(ROWS))

    def __call__(self, *args: str) -> str:
        return subprocess.run(["tmux", "-L", self.socket, *args], check=True, capture_output=True, text=True).stdout

    def type(self, *keys: str) -> None:
        self("send-keys", "-t", "t", *keys)

    def screen(self) -> str:
        return self("capture-pane", "-p", "-t", "t")

    def wait_for(self, *texts: str, timeout: float = 180) -> str:
        deadline = time.monotonic() + timeout
        while not all(text in (screen := self.screen()) for text in texts):
            assert time.monotonic() < deadline, f"{texts} not on the screen:\n{screen}"
            time.sleep(0.2)
        return screen

    def close(self) -> None:
        subprocess.run(["tmux", "-L", self.socket, "kill-server"], capture_output=True)


@pytest.fixture
def tmux():
    terminal = Tmux()
    yield terminal
    terminal.close()


def test_live_view_then_ctrl_c_saves_and_leaves_the_terminal_clean(run_config, tmux):
    run_config.settings = {"log.format": "auto", "train.epochs": 500}  # minutes of work: Ctrl+C comes first
    config = run_config.write()
    tmux.type(f"cd {run_config.workdir} && {sys.executable} -m daemon run --config {config}; echo EXIT=$?", "Enter")

    screen = tmux.wait_for("epoch_completed", "steps/s", "ETA epoch", "loss 0.", "checkpoint ")
    assert "epoch " in screen and "/500" in screen and "step " in screen
    assert '"event"' not in screen and "run_id" not in screen and "fingerprint" not in screen
    assert all(len(line) <= COLUMNS for line in screen.splitlines())
    tmux.type("C-c")

    screen = tmux.wait_for("EXIT=75")
    assert "signal_received signal=SIGINT" in screen and "checkpoint_saved kind=emergency" in screen
    assert "stopped: the emergency checkpoint is saved" in screen
    assert tmux("display", "-p", "-t", "t", "#{cursor_flag}").strip() == "1"  # the cursor is back
    assert list(run_config.checkpoint_dir.glob("ckpt-*-emergency.pt"))


def test_off_a_terminal_the_output_is_json_lines_only(run_config):
    run_config.settings = {"log.format": "auto", "train.epochs": 1}
    process = TrainerProcess.start(run_config)
    assert process.wait() == 0
    output = process.output()
    assert "\x1b" not in output
    assert all(parse_event(line) for line in output.splitlines())
