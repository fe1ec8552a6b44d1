"""What the run tells while it trains: `progress` events, systemd's STATUS= line, and the marker
of the step trained to (from which a successor killed without warning says how many steps were lost).

The marker is written with each `progress` event and at least every MARK_EVERY_S of training: a
rename without fsync (about 1 ms on ext4, where replacing a file by a rename starts its writeback;
0.1 ms on tmpfs): two a second cost at most about 0.3% of the training's time. The count a kill
leaves misses at most that long of training."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from daemon import events
from daemon.service import logs
from daemon.service.notify import Notifier

if TYPE_CHECKING:
    from daemon.service.live import LiveView
    from daemon.train.state import TrainProgress

MARK_EVERY_S = 0.5  # how far the step marker may lag the training when a run is killed without warning


def metric_text(value: float) -> str:
    """A loss (or metric) for a person: four significant digits, so a late, tiny loss reads 4.1e-05, not 0.0000."""
    return f"{value:.4g}"


def metric_rounded(value: float) -> float:
    """A loss (or metric) for an event: six significant digits, however small it gets."""
    return float(f"{value:.6g}")


class ProgressReporter:
    def __init__(
        self,
        notifier: Notifier,
        progress: TrainProgress,
        mark_trained: Callable[[int], None],
        *,
        every_seconds: float,
        steps_per_epoch: int,
        epochs: int,
        details: Callable[[], dict] = dict,
    ) -> None:
        """`mark_trained(global_step)`: keeps the step trained to (for the successor of a run killed
        without warning to say how many steps were lost); `details`: more fields for each event."""
        self.notifier = notifier
        self.progress = progress
        self.mark_trained = mark_trained
        self.every_seconds = every_seconds
        self.steps_per_epoch = steps_per_epoch
        self.epochs = epochs
        self.details = details
        self._at, self._step = time.monotonic(), 0
        self._marked_at = -math.inf  # the first step is marked
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
        due = now - self._at >= self.every_seconds
        if due or now - self._marked_at >= MARK_EVERY_S:  # every step logged is marked too
            self._marked_at = now
            self.mark_trained(self.progress.global_step)
        if not due:
            return
        rate = (self.progress.global_step - self._step) / (now - self._at)
        self._at, self._step = now, self.progress.global_step
        loss = self.progress.mean_loss()
        events.PROGRESS.emit(
            **self.progress.position(),
            steps_in_epoch=self.steps_per_epoch,
            loss=metric_rounded(loss),
            **{name: metric_rounded(value) for name, value in self.progress.mean_metrics().items()},
            steps_per_s=round(rate, 1),
            **self.details(),
        )
        self.notifier.status(self.status_text(loss))

    def status_text(self, loss: float | None = None) -> str:
        p = self.progress
        text = f"epoch {p.epoch + 1}/{self.epochs} step {p.step_in_epoch}/{self.steps_per_epoch}"
        return text + (f" loss {metric_text(loss)}" if loss is not None else "")
