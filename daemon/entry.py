"""The entry point of `trainer` and of `python -m daemon`: its first lines install the signal handlers.

Everything slow comes after them (argparse, yaml, structlog, then torch), so a SIGTERM, Ctrl+C or
SIGUSR1 that arrives during start-up is recorded and honoured at the first safe point instead of
killing the process or printing a KeyboardInterrupt traceback. What remains is the interpreter's
own start-up, before any code of ours runs (README, "Signals"; measured in docs/benchmark.md).
"""

import os
import signal
import sys

from daemon.service.signals import SAVE_SIGNAL, STOP_SIGNALS, SignalRecorder


def main() -> None:
    """Run the command line; exits the process with its code (never returns)."""
    signals = SignalRecorder()
    signals.install()
    # A run that handed over to this process blocked them before its exec (daemon/service/threads.py): what
    # arrived since is pending and reaches the handlers now.
    signal.pthread_sigmask(signal.SIG_UNBLOCK, (*STOP_SIGNALS, SAVE_SIGNAL))
    # `train.cpu_wait: auto` looks at what other work does on our CPUs while the rest loads.
    from daemon.service.contention import CpuSampler

    started = CpuSampler()
    from daemon.ops.cli import main as run_cli  # structlog, yaml, argparse: after the handlers

    code = run_cli(signals, started=started)
    # All is saved, closed and flushed. The handlers stay in place to the end: the interpreter's
    # finalization would put the default ones back (a signal then would kill a process that has
    # finished its work) and collect every object torch made (~1 s) while a stopping systemd waits.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
