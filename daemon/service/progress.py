"""What the run tells while it trains: `progress` events, systemd's STATUS= line, and the marker
of the last step logged (from which a successor says how many steps it redoes)."""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Callable
from pathlib import Path

from daemon.service import logs
from daemon.ckpt.store import TEMP_PREFIX
from daemon.train.state import TrainProgress
from daemon.service.notify import Notifier

LOGGED_STEP_FILE = "last-logged-step.json"


class LoggedStep:
    """The step a `progress` event or a save last reported, kept in the checkpoint directory so that
    a run killed without warning lets its successor say how many steps it redoes. Advisory: not
    fsynced, and skipped when the disk refuses (the next checkpoint save reports that)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def mark(self, global_step: int) -> None:
        temp = self.directory / f"{TEMP_PREFIX}{LOGGED_STEP_FILE}.{os.getpid()}"
        try:
            self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            temp.write_text(json.dumps({"global_step": global_step}))
            os.replace(temp, self.directory / LOGGED_STEP_FILE)
        except OSError:
            with contextlib.suppress(OSError):  # a read-only directory refuses the clean-up too
                temp.unlink(missing_ok=True)

    def read(self) -> int | None:
        try:
            step = json.loads((self.directory / LOGGED_STEP_FILE).read_text())["global_step"]
        except (OSError, ValueError, KeyError, TypeError):
            return None
        return step if isinstance(step, int) else None


class ProgressReporter:
    def __init__(
        self, log, notifier: Notifier, progress: TrainProgress, logged: LoggedStep, *,
        every_seconds: float, steps_per_epoch: int, epochs: int, details: Callable[[], dict] = dict,
    ) -> None:  # fmt: skip
        """`details`: more fields for each `progress` event, as the run has them then."""
        self.log = log
        self.notifier = notifier
        self.progress = progress
        self.logged = logged
        self.every_seconds = every_seconds
        self.steps_per_epoch = steps_per_epoch
        self.epochs = epochs
        self.details = details
        self._at, self._step = time.monotonic(), 0
        self.view = None  # the live display, on a terminal

    def close(self) -> None:
        if self.view:
            self.view.stop()
            self.view = None

    def refresh(self) -> None:
        """Redraw the live display now (a stop began)."""
        if self.view:
            self.view.refresh_if_due(force=True)

    def position(self) -> dict:
        p = self.progress
        return {"epoch": p.epoch, "step_in_epoch": p.step_in_epoch, "global_step": p.global_step}

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
        self.logged.mark(self.progress.global_step)
        self.log.info(
            "progress",
            **self.position(),
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
