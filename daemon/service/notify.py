"""sd_notify: READY / STATUS / WATCHDOG / EXTEND_TIMEOUT_USEC / STOPPING to systemd.

The protocol is one datagram of `KEY=value` lines on the AF_UNIX socket named by
$NOTIFY_SOCKET. Without that variable (run by hand) every call is a no-op.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Mapping


class Notifier:
    def __init__(self, environ: Mapping[str, str] = os.environ) -> None:
        address = environ.get("NOTIFY_SOCKET", "")
        # A leading '@' names a socket in the abstract namespace.
        self._address = "\0" + address[1:] if address.startswith("@") else address
        self._socket: socket.socket | None = None
        if self._address:
            self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        # Pet the watchdog at twice the rate systemd expects, as sd_watchdog_enabled() advises.
        watchdog_usec = int(environ.get("WATCHDOG_USEC", "0") or 0)
        watchdog_pid = environ.get("WATCHDOG_PID")
        for_us = watchdog_pid is None or watchdog_pid == str(os.getpid())
        self._watchdog_interval = watchdog_usec / 2e6 if watchdog_usec and for_us else 0.0
        self._last_watchdog = 0.0

    @property
    def enabled(self) -> bool:
        return self._socket is not None

    @property
    def watchdog_seconds(self) -> float:
        """The WatchdogSec= this process must honour; 0 without a watchdog."""
        return self._watchdog_interval * 2

    def _send(self, **fields: object) -> None:
        if self._socket is None:
            return
        message = "\n".join(f"{key}={value}" for key, value in fields.items())
        try:
            self._socket.sendto(message.encode(), self._address)
        except OSError:
            # Best effort, as sd_notify() is: a manager that went away must not stop the training.
            pass

    def ready(self, status: str) -> None:
        self._send(READY=1, STATUS=status, MAINPID=os.getpid())

    def status(self, text: str) -> None:
        self._send(STATUS=text)

    def watchdog(self) -> None:
        """Called from the training loop at every step; sends at most twice per WatchdogSec."""
        if not self._watchdog_interval:
            return
        now = time.monotonic()
        if now - self._last_watchdog >= self._watchdog_interval:
            self._last_watchdog = now
            self._send(WATCHDOG=1)

    def extend_timeout(self, seconds: float) -> None:
        """Ask for `seconds` more before the stop (or start) timeout kills us."""
        self._send(EXTEND_TIMEOUT_USEC=int(seconds * 1e6))

    def stopping(self, status: str) -> None:
        self._send(STOPPING=1, STATUS=status)
