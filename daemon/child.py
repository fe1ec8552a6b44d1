"""The trainer's CLI as a child process: its JSON events read line by line, real signals sent to it.

`trainer verify` drives its runs with this, and the tests use the same reader.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path


def parse_event(line: str) -> dict | None:
    """The JSON object on `line`, or None for anything else (a traceback, a console line)."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        return None
    return record if isinstance(record, dict) else None


class TrainerChild:
    """`python -m daemon COMMAND ...` in its own session (process group), stdout read by a thread."""

    def __init__(self, argv: Sequence[str], cwd: Path, env: Mapping[str, str] | None = None) -> None:
        self.popen = subprocess.Popen(
            list(argv),
            cwd=cwd,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            text=True,
            start_new_session=True,  # a terminal's Ctrl+C meant for the caller does not reach it
            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
        )
        self.lines: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    @classmethod
    def cli(cls, command: str, *args: str, cwd: Path, env: Mapping[str, str] | None = None, wrapper: Sequence[str] = ()):
        return cls([*wrapper, sys.executable, "-m", "daemon", command, *args], cwd, env)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def _read(self) -> None:
        for line in self.popen.stdout:
            self._queue.put(line)
        self._queue.put(None)

    # A `silence` limit, not a deadline: a run that goes on logging is making progress however slow
    # a loaded machine makes it, while one that says nothing for that long is stuck.

    def _next_line(self, silence: float, waiting_for: str) -> str | None:
        try:
            line = self._queue.get(timeout=silence)
        except queue.Empty:
            raise TimeoutError(f"silent for {silence} s while waiting for {waiting_for}; output:\n{self.output()}") from None
        if line is None:
            self._queue.put(None)  # later calls see the end too
        else:
            self.lines.append(line)
        return line

    def wait_for(self, event: str, silence: float = 90, where: Callable[[dict], bool] = lambda _: True, **fields) -> dict:
        """Block until an event named `event` whose fields equal `fields` (and that `where` accepts)
        is logged. Raises TimeoutError after `silence` s without output, ChildExited if it ends first."""
        while (line := self._next_line(silence, f"{event} {fields}")) is not None:
            record = parse_event(line)
            if record and record.get("event") == event and all(record.get(k) == v for k, v in fields.items()) and where(record):
                return record
        raise ChildExited(f"the process ended before {event} {fields}; output:\n{self.output()}")

    def wait(self, silence: float = 90) -> int:
        """The exit code, once all of the output was read."""
        while self._next_line(silence, "the exit") is not None:
            pass
        return self.popen.wait(timeout=silence)

    def output(self) -> str:
        return "".join(self.lines)

    def events(self, name: str | None = None) -> list[dict]:
        records = [record for record in map(parse_event, self.lines) if record]
        return [record for record in records if name is None or record.get("event") == name]

    def signal(self, signum: int) -> None:
        self.popen.send_signal(signum)

    def signal_group(self, signum: int) -> None:
        """To the whole process group, as a terminal's Ctrl+C is delivered."""
        os.killpg(self.popen.pid, signum)

    def kill(self) -> None:
        if self.popen.poll() is None:
            os.killpg(self.popen.pid, signal.SIGKILL)
        self.popen.wait()


class ChildExited(AssertionError):
    """The child ended before the awaited event."""
