"""trainer: a signal-aware PyTorch training daemon that resumes bitwise-exactly."""

from __future__ import annotations

import os
from collections.abc import Sequence

__version__ = "0.1.0"


def run(config: str | os.PathLike = "config.yaml", overrides: Sequence[str] = ()) -> int:
    """Train as `trainer run --config CONFIG --set OVERRIDE...` does, in this process (its main
    thread): the same resume, signals, checkpoints, JSON events and exit code, returned. The
    signal handlers are the daemon's while it runs, and the previous ones afterwards. Import
    `daemon` before torch for the OpenMP settings to apply (docs/exactness.md, "Threads")."""
    import signal

    from daemon.ops.cli import main
    from daemon.service.signals import SAVE_SIGNAL, STOP_SIGNALS, SignalRecorder

    previous = {signum: signal.getsignal(signum) for signum in (*STOP_SIGNALS, SAVE_SIGNAL)}
    signals = SignalRecorder()
    signals.install()
    try:
        argv = ["run", "--config", os.fspath(config)]
        for override in overrides:
            argv += ["--set", override]
        return main(signals, argv)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
