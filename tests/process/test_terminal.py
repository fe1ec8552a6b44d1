"""On a terminal (a real one: tmux), a live display below short event lines; Ctrl+C saves, exits
75 and leaves the terminal clean. Off a terminal, JSON lines only."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Callable

import pytest

from daemon.ops.child import parse_event
from trainer_proc import UNTIL_STOPPED, TrainerProcess

pytestmark = pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed (.ci/run installs it)")
COLUMNS, ROWS = 160, 40
# The live view's line: the epoch (1-based) and the step in it, as `epoch 2/9  ━━━  step 41/600`.
VIEW = re.compile(r"epoch (\d+)/\d+ .*?step (\d+)/(\d+)")
CTRL_C_TRIES = 3


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
        """What the window shows now."""
        return self("capture-pane", "-p", "-t", "t")

    def everything(self) -> str:
        """All the window printed: the lines scrolled off the top (the history) and the screen."""
        return self("capture-pane", "-p", "-J", "-S", "-", "-t", "t")

    def wait_until(self, shows: Callable[[str], object], what: str, timeout: float = 180) -> str:
        deadline = time.monotonic() + timeout
        while not shows(screen := self.screen()):
            assert time.monotonic() < deadline, f"{what} not on the screen:\n{screen}"
            time.sleep(0.05)
        return screen

    def wait_for(self, *texts: str, timeout: float = 180) -> str:
        return self.wait_until(lambda screen: all(text in screen for text in texts), str(texts), timeout)

    def close(self) -> None:
        subprocess.run(["tmux", "-L", self.socket, "kill-server"], capture_output=True)


def in_an_epochs_first_quarter(screen: str) -> bool:
    """The view shows a step of an epoch after the first, in its first quarter."""
    view = VIEW.findall(screen)
    if not view:
        return False
    epoch, step, steps = map(int, view[-1])
    return epoch >= 2 and step < steps / 4


def test_live_view_then_ctrl_c_saves_and_leaves_the_terminal_clean(run_config):
    """The Ctrl+C must meet a step for an emergency checkpoint to be written: one that meets an
    epoch's end (its evaluation and synchronous save) finds that checkpoint holding the stop's
    position already (`checkpoint_skipped`). So the epochs are long (600 steps) and their evaluation
    short, the Ctrl+C is sent while the view shows an epoch's first quarter, and should it still
    meet an epoch's end (a machine that trains the rest of an epoch within the view's refresh), the
    same command resumes and is interrupted again."""
    run_config.settings = {"log.format": "auto", "train.epochs": UNTIL_STOPPED, "data.train_subset": None,
                           "data.test_subset": 100}  # fmt: skip
    config = run_config.write()
    command = f"cd {run_config.workdir} && {sys.executable} -m daemon run --config {config}; echo EXIT=$?"
    for _ in range(CTRL_C_TRIES):
        tmux = Tmux()
        try:
            tmux.type(command, "Enter")
            screen = tmux.wait_for("epoch_completed", "steps/s", "ETA epoch", "loss 0.", "checkpoint ")
            assert "epoch " in screen and f"/{UNTIL_STOPPED}" in screen and "step " in screen
            assert '"event"' not in screen and "run_id" not in screen and "fingerprint" not in screen
            assert all(len(line) <= COLUMNS for line in screen.splitlines())
            tmux.wait_until(in_an_epochs_first_quarter, "an epoch's first quarter")
            tmux.type("C-c")

            screen = tmux.wait_for("EXIT=75")
            printed = tmux.everything()
            assert "signal_received signal=SIGINT" in printed, printed
            stop = printed[printed.rindex("signal_received signal=SIGINT") :]
            if "checkpoint_skipped" in stop:
                continue  # it met an epoch's end: no emergency checkpoint to see, try again
            assert "checkpoint_saved kind=emergency" in stop, stop
            assert "stopped: the emergency checkpoint is saved" in screen
            assert tmux("display", "-p", "-t", "t", "#{cursor_flag}").strip() == "1"  # the cursor is back
            assert list(run_config.checkpoint_dir.glob("ckpt-*-emergency.pt"))
            return
        finally:
            tmux.close()
    pytest.fail(f"{CTRL_C_TRIES} Ctrl+C sent in an epoch's first quarter all met an epoch's end")


def test_off_a_terminal_the_output_is_json_lines_only(run_config):
    run_config.settings = {"log.format": "auto", "train.epochs": 1}
    process = TrainerProcess.start(run_config)
    assert process.wait() == 0
    output = process.output()
    assert "\x1b" not in output
    assert all(parse_event(line) for line in output.splitlines())
