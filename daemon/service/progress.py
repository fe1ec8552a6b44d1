"""What the run tells while it trains: `progress` events, systemd's STATUS= line, and the marker
of the last step logged (from which a successor says how many steps it redoes)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from daemon import events
from daemon.service import logs
from daemon.service.notify import Notifier

if TYPE_CHECKING:
    from daemon.service.live import LiveView
    from daemon.train.state import TrainProgress


class ProgressReporter:
    def __init__(
        self,
        notifier: Notifier,
        progress: TrainProgress,
        mark_reported: Callable[[int], None],
        *,
        every_seconds: float,
        steps_per_epoch: int,
        epochs: int,
        details: Callable[[], dict] = dict,
    ) -> None:
        """`mark_reported(global_step)`: keeps the step each `progress` event reports (for a successor
        killed without warning to say what it redoes); `details`: more fields for each event."""
        self.notifier = notifier
        self.progress = progress
        self.mark_reported = mark_reported
        self.every_seconds = every_seconds
        self.steps_per_epoch = steps_per_epoch
        self.epochs = epochs
        self.details = details
        self._at, self._step = time.monotonic(), 0
        self.view: LiveView | None = None  # the live display, on a terminal

    def close(self) -> None:
        if self.view:
            self.view.stop()
            self.view = None

    def refresh(self) -> None:
        """Redraw the live display now (a stop began)."""
        if self.view:
            self.view.refresh_if_due(force=True)

    def start(self) -> None:
        """Training (re)starts: the rate counts from here."""
        self._at, self._step = time.monotonic(), self.progress.global_step
        terminal = logs.terminal()
        if terminal is not None and self.view is None:
            from daemon.service.live import LiveView

            total = self.steps_per_epoch * self.epochs
            self.view = LiveView(terminal, self.progress, self.steps_per_epoch, self.epochs, total)
            self.view.start()

    def report_if_due(self) -> None:
        if self.view:
            self.view.refresh_if_due()
        now = time.monotonic()
        if now - self._at < self.every_seconds:
            return
        rate = (self.progress.global_step - self._step) / (now - self._at)
        self._at, self._step = now, self.progress.global_step
        loss = self.progress.mean_loss()
        self.mark_reported(self.progress.global_step)
        events.PROGRESS.emit(
            **self.progress.position(),
            steps_in_epoch=self.steps_per_epoch,
            loss=round(loss, 5),
            **{name: round(value, 5) for name, value in self.progress.mean_metrics().items()},
            steps_per_s=round(rate, 1),
            **self.details(),
        )
        self.notifier.status(self.status_text(loss))

    def status_text(self, loss: float | None = None) -> str:
        p = self.progress
        text = f"epoch {p.epoch + 1}/{self.epochs} step {p.step_in_epoch}/{self.steps_per_epoch}"
        return text + (f" loss {loss:.4f}" if loss is not None else "")
