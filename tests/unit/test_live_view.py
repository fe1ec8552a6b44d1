"""What the live view's last line says after a stop: a saved emergency checkpoint, or the newest
checkpoint that already held the step (the stop met an epoch's end)."""

from __future__ import annotations

from rich.console import Console

from daemon.service.live import LiveView, Terminal
from daemon.train.state import TrainProgress


def last_line_after(*names: str) -> str:
    terminal = Terminal()
    for name in names:
        terminal.render(None, "info", {"event": name, "timestamp": "2026-01-01T00:00:00Z", "level": "info"})
    console = Console(record=True, width=240)
    console.print(LiveView(terminal, TrainProgress(), 10, 1, 10)._frame())
    return console.export_text().strip().splitlines()[-1]


def test_a_stop_that_saved_says_so():
    shown = last_line_after("signal_received", "checkpoint_saved", "stopped")
    assert shown.startswith("stopped: the emergency checkpoint is saved")


def test_a_stop_with_nothing_new_to_save_does_not_claim_a_save():
    shown = last_line_after("signal_received", "checkpoint_skipped", "stopped")
    assert shown.startswith("stopped: the newest checkpoint holds this step"), shown
