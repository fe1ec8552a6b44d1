"""Signal handling: the handlers only record; the training loop acts at its next safe point.

SIGTERM / SIGINT ask for a stop: the loop finishes the step in progress, writes an
emergency checkpoint and exits with ExitCode.STOPPED. A second stop signal while that
is happening is recorded and changes nothing (the write completes). A third one exits
at once with the same code: the half-written temporary file is never picked, and the
previous checkpoint stays the newest valid one.

SIGUSR1 asks for a checkpoint now; training goes on.

A preemption notice (daemon/service/preemption.py, on a thread of its own) is recorded here too, as
the request for a checkpoint or a stop that `preemption.on_notice` names.

The entry point installs the handlers in its first lines (daemon/entry.py), so this module imports
only what the interpreter has loaded at start-up anyway: no dataclasses (which pulls in inspect
and ast, ~10-30 ms), which would widen the window in which a signal still kills the process.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time

from daemon.errors import ExitCode

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
SAVE_SIGNAL = signal.SIGUSR1
FORCE_EXIT_AFTER = 3  # stop signals; the third one no longer waits for the emergency save
SHOW_CURSOR = b"\x1b[?25h"


class SignalEvent:
    __slots__ = ("signum", "monotonic")

    def __init__(self, signum: int, monotonic: float) -> None:
        self.signum = signum
        self.monotonic = monotonic

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name


class SignalRecorder:
    """Installed as the handler of STOP_SIGNALS and SAVE_SIGNAL; queried by the loop."""

    def __init__(self) -> None:
        self.stops: list[SignalEvent] = []
        self.saves: list[SignalEvent] = []
        self._reported = 0
        # Set once, by the preemption watcher's thread; a notice's stop is no signal, and never
        # counts towards FORCE_EXIT_AFTER.
        self.notice_save = False
        self.notice_stop = False

    def install(self) -> None:
        for signum in (*STOP_SIGNALS, SAVE_SIGNAL):
            signal.signal(signum, self._handle)

    def _handle(self, signum: int, _frame: object) -> None:
        # No I/O and no logging here: the loop may hold the logging or file locks we would need.
        event = SignalEvent(signum, time.monotonic())
        if signum == SAVE_SIGNAL:
            self.saves.append(event)
            return
        self.stops.append(event)
        if len(self.stops) >= FORCE_EXIT_AFTER:
            if os.isatty(1):
                os.write(1, SHOW_CURSOR)  # a live display hides it while it draws (daemon/service/live.py)
            os._exit(ExitCode.STOPPED)

    def record_notice(self, *, stop: bool) -> None:
        """A preemption notice: a request as SIGUSR1 makes one or, with `stop`, as SIGTERM does."""
        if stop:
            self.notice_stop = True
        else:
            self.notice_save = True

    @property
    def stop_requested(self) -> bool:
        return bool(self.stops) or self.notice_stop

    @property
    def save_requested(self) -> bool:
        return bool(self.saves) or self.notice_save

    def take_save_request(self) -> str | None:
        """Every pending request for a checkpoint, consumed (several make one); the kind of that
        checkpoint: `notice` where a preemption notice is among them, else `on_demand`; None: none."""
        if self.notice_save:
            self.notice_save = False  # set only once: no notice recorded meanwhile is lost
            self.saves.clear()
            return "notice"
        if not self.saves:
            return None
        self.saves.clear()
        return "on_demand"

    def unreported_stops(self) -> list[SignalEvent]:
        """Stop signals the loop has not logged yet (each is logged once)."""
        new = self.stops[self._reported :]
        self._reported = len(self.stops)
        return new


@contextlib.contextmanager
def stop_signals_blocked():
    """Block the stop signals while DataLoader workers are forked: a worker inherits the mask, so
    none can die of a Ctrl+C before `ignore_stop_signals_in_worker` runs. A stop signal that
    arrives meanwhile stays pending for the main process and is handled on leaving."""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def ignore_stop_signals_in_worker(_worker_id: int) -> None:
    """DataLoader `worker_init_fn`: a terminal's Ctrl+C reaches the whole process group, and a
    worker that dies of it would take the batch pipeline down before the main process has saved.
    The main process shuts its workers down itself."""
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
