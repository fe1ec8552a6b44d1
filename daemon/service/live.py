"""On a terminal: the events as short lines, and a live display of the run below them (rich).

Off a terminal none of this is imported: the output is the JSON lines of daemon/service/logs.py.
The display is drawn from what the loop already keeps (TrainProgress) at a few frames a
second, so the loop pays one loss read per frame, not a host sync per step.
"""

from __future__ import annotations

import sys
import time
from typing import TYPE_CHECKING, Any

from rich.console import Console, Group
from rich.live import Live
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from daemon.service.progress import metric_text

if TYPE_CHECKING:
    from structlog.typing import EventDict

# Fields a person reading a terminal does not need on every line (they are in the JSON form).
HIDDEN = frozenset({"event", "timestamp", "level", "run_id", "pid", "fingerprint", "environment", "rank"})
POSITION = frozenset({"epoch", "step_in_epoch", "global_step"})  # the display shows where the run is
LEVEL_STYLES = {"warning": "yellow", "error": "bold red", "critical": "bold red"}
FRAME_S = 0.25


class Terminal:
    """stdout when it is a terminal: structlog prints the events here, above the live display."""

    def __init__(self) -> None:
        self.console = Console(file=sys.stdout, highlight=False)
        self.live: Live | None = None
        self.last_checkpoint_at: float | None = None
        self.stopping = False  # an emergency save is under way
        self.stopped = False  # and done: the run exits 75
        self.nothing_to_save = False  # the newest checkpoint held the stop's step already

    # structlog's WriteLogger calls these with each rendered line
    def write(self, text: str) -> None:
        text = text.rstrip("\n")
        if text:
            self.console.print(Text.from_markup(text), soft_wrap=True)

    def flush(self) -> None:
        self.console.file.flush()

    def render(self, _logger: Any, _method: str, event: EventDict) -> str:
        """structlog's last processor: one short line (the event's time, name and its own fields)."""
        name = event["event"]
        if name == "checkpoint_saved":
            self.last_checkpoint_at = time.monotonic()
        elif name == "signal_received":
            self.stopping = True
        elif name == "checkpoint_skipped":
            self.nothing_to_save = True
        elif name == "stopped":
            self.stopped = True
        if name == "progress" and self.live is not None:
            return ""  # the display shows it
        clock = event.get("timestamp", "")[11:19]
        step = f"step {event['global_step']} " if "global_step" in event else ""
        fields = " ".join(f"{key}={_short(value)}" for key, value in event.items() if key not in HIDDEN | POSITION)
        style = LEVEL_STYLES.get(event.get("level", ""), "bold")
        exception = f"\n{event['exception']}" if "exception" in event else ""
        return f"[dim]{clock} {step}[/dim][{style}]{_escape(name)}[/{style}] {_escape(fields)}{_escape(exception)}"

    def start(self, frame) -> None:
        """Show `frame()` below the events until stop(), refreshed by `refresh()`."""
        self.live = Live(
            frame(), console=self.console, auto_refresh=False, redirect_stdout=False, redirect_stderr=False
        )
        self.live.start()

    def refresh(self, frame) -> None:
        if self.live is not None:
            self.live.update(frame(), refresh=True)

    def stop(self) -> None:
        """Leave the last frame on screen and give the cursor back."""
        if self.live is not None:
            self.live.stop()
            self.live = None


class LiveView:
    """The display: epoch x/y, the step in the epoch with a bar, loss, steps/s, ETAs, checkpoint age."""

    def __init__(self, terminal: Terminal, progress, steps_per_epoch: int, epochs: int, total_steps: int) -> None:
        self.terminal = terminal
        self.progress = progress
        self.steps_per_epoch = steps_per_epoch
        self.epochs = epochs
        self.total_steps = total_steps
        self._next = 0.0
        self._rate_from = (time.monotonic(), progress.global_step)
        self._rate = 0.0

    def start(self) -> None:
        self._rate_from = (time.monotonic(), self.progress.global_step)
        self.terminal.start(self._frame)

    def refresh_if_due(self, force: bool = False) -> None:
        """Redraw when a frame is due (`force`: at once)."""
        now = time.monotonic()
        if now < self._next and not force:
            return
        self._next = now + FRAME_S
        started, step = self._rate_from
        if now - started >= 1.0:  # steps/s over the last second or so
            self._rate = (self.progress.global_step - step) / (now - started)
            self._rate_from = (now, self.progress.global_step)
        self.terminal.refresh(self._frame)

    def stop(self) -> None:
        self.terminal.refresh(self._frame)
        self.terminal.stop()

    def _frame(self) -> Table | Group:
        p = self.progress
        rate = self._rate
        epoch_left = (self.steps_per_epoch - p.step_in_epoch) / rate if rate else None
        run_left = (self.total_steps - p.global_step) / rate if rate else None
        age = self.terminal.last_checkpoint_at
        grid = Table.grid(padding=(0, 2))
        grid.add_row(
            Text(f"epoch {min(p.epoch + 1, self.epochs)}/{self.epochs}", style="bold"),
            ProgressBar(total=self.steps_per_epoch, completed=p.step_in_epoch, width=40),
            Text(f"step {p.step_in_epoch}/{self.steps_per_epoch}"),
            Text(f"loss {metric_text(p.mean_loss())}" if p.samples else "loss -"),
            Text(f"{rate:.0f} steps/s"),
            Text(f"ETA epoch {_duration(epoch_left)}  run {_duration(run_left)}"),
            Text(f"checkpoint {_duration(time.monotonic() - age)} ago" if age else "no checkpoint yet", style="dim"),
        )
        if self.terminal.stopped:
            saved = "the emergency checkpoint is saved"
            held = "the newest checkpoint holds this step" if self.terminal.nothing_to_save else saved
            return Group(grid, Text(f"stopped: {held}; the same command resumes", style="bold yellow"))
        if self.terminal.stopping:
            return Group(grid, Text("stopping: writing the emergency checkpoint", style="bold yellow"))
        return grid


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def _short(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    text = str(value)
    if "/" in text and " " not in text:  # a path: its file name says enough here
        text = text.rsplit("/", 1)[-1]
    return text if len(text) <= 60 else text[:57] + "..."


def _escape(text: str) -> str:
    return text.replace("[", r"\[")
