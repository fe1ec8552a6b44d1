"""Losses as a person reads them: significant digits, so a late, tiny loss never shows as 0.0000, in
systemd's STATUS= line (through a real AF_UNIX socket), the `progress` event, the live view and
`trainer status`."""

from __future__ import annotations

import io
import socket

import pytest
import structlog
import torch
from rich.console import Console

from daemon.ops.status import show
from daemon.service.live import LiveView, Terminal
from daemon.service.notify import Notifier
from daemon.service.progress import ProgressReporter, metric_rounded, metric_text
from daemon.train.state import TrainProgress

TINY = 4.1e-5  # the training loss late in a long run


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (TINY, "4.1e-05"),
        (4.1234567e-5, "4.123e-05"),
        (0.1044, "0.1044"),
        (2.302585, "2.303"),
        (12.3456, "12.35"),
        (0.0, "0"),
    ],
)
def test_a_loss_is_shown_with_four_significant_digits(value, text):
    assert metric_text(value) == text


def test_a_loss_in_an_event_keeps_six_significant_digits():
    assert metric_rounded(4.1234567e-5) == 4.12346e-05
    assert metric_rounded(0.123456789) == 0.123457


def progress_at_a_tiny_loss() -> TrainProgress:
    progress = TrainProgress()
    progress.record_batch(torch.tensor(TINY), 100, 100)
    progress.record_step()
    return progress


def test_status_line_and_progress_event_show_a_tiny_loss(tmp_path):
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(tmp_path / "notify"))
    sock.settimeout(2)
    marked: list[int] = []
    reporter = ProgressReporter(
        Notifier({"NOTIFY_SOCKET": str(tmp_path / "notify")}),
        progress_at_a_tiny_loss(),
        marked.append,
        every_seconds=1e-9,
        steps_per_epoch=10,
        epochs=3,
    )
    try:
        with structlog.testing.capture_logs() as logged:
            reporter.report_if_due()
        assert sock.recv(4096).decode() == "STATUS=epoch 1/3 step 1/10 loss 4.1e-05"
    finally:
        sock.close()
    (progress,) = [event for event in logged if event["event"] == "progress"]
    assert progress["loss"] == pytest.approx(TINY, rel=1e-5)
    assert marked == [1]  # the step it reported is marked as trained


def test_live_view_shows_a_tiny_loss():
    view = LiveView(Terminal(), progress_at_a_tiny_loss(), steps_per_epoch=10, epochs=3, total_steps=30)
    console = Console(file=io.StringIO(), width=200)
    console.print(view._frame())
    assert "loss 4.1e-05" in console.file.getvalue()


def test_trainer_status_shows_a_tiny_loss(capsys):
    row = {"epoch": 30, "train_loss": TINY, "headline": "test_loss", "value": 2.5e-6, "seconds": 4.0}
    report = {
        "checkpoint_dir": "checkpoints",
        "checkpoints": [],
        "history": [row],
        "metrics_history_unusable": None,
        "resumes": {},
        "run_in_progress": False,
        "resume_from": None,
    }
    show(report, as_json=False)
    assert "  30  train_loss 4.1e-05  test_loss 2.5e-06  4.0 s" in capsys.readouterr().out
