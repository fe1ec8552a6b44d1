"""The trainer's CLI (or any process printing JSON lines) as a child process: its JSON events read
line by line, real signals sent to it, its exit reaped with its peak memory.

The one reader of the event stream: `trainer verify` drives its runs with it, the tests use it
(and its matching, for journald's copy of the stream), and so does the benchmark.
"""

from __future__ import annotations

import datetime
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TypeVar

Found = TypeVar("Found")
Where = Callable[[dict], bool]
START = object()  # `after=START`: search the whole output, not only what follows the previous match


def parse_event(line: str) -> dict | None:
    """The JSON object on `line`, or None for anything else (a traceback, a console line)."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        return None
    return record if isinstance(record, dict) else None


def event_time(record: dict) -> float:
    """The wall-clock time of an event: the daemon's ISO `timestamp`, or a bench script's `time`."""
    if "time" in record:
        return record["time"]
    return datetime.datetime.fromisoformat(record["timestamp"].replace("Z", "+00:00")).timestamp()


def matches(record: dict, event: str | None, fields: Mapping[str, object], where: Where = lambda _: True) -> bool:
    """`record` is the event named `event` (any, if None) with these field values, and `where` accepts it."""
    return (
        (event is None or record.get("event") == event)
        and all(record.get(k) == v for k, v in fields.items())
        and where(record)
    )


class TrainerChild:
    """A child process in its own session (process group), its stdout read by a thread."""

    def __init__(self, argv: Sequence[str], cwd: Path, env: Mapping[str, str] | None = None) -> None:
        self.argv = list(argv)
        self.launched = time.time()
        self.popen = subprocess.Popen(
            self.argv,
            cwd=cwd,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            text=True,
            start_new_session=True,  # a terminal's Ctrl+C meant for the caller does not reach it
            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
        )
        self.lines: list[str] = []
        self.records: list[dict] = []  # the JSON events among the lines, in order
        self._ended = False  # stdout closed
        self._cursor = 0  # records before it were passed over by an earlier wait_for
        self._changed = threading.Condition()
        self.exit_code: int | None = None
        self.exited_at: float | None = None  # wall clock, as the events' timestamps
        self.max_rss_bytes: int | None = None
        threading.Thread(target=self._read, daemon=True).start()

    @classmethod
    def cli(
        cls, command: str, *args: str, cwd: Path, env: Mapping[str, str] | None = None, wrapper: Sequence[str] = ()
    ):
        return cls([*wrapper, sys.executable, "-m", "daemon", command, *args], cwd, env)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def _read(self) -> None:
        assert self.popen.stdout is not None  # started with stdout=PIPE
        for line in self.popen.stdout:
            record = parse_event(line)
            with self._changed:
                self.lines.append(line)
                if record:
                    self.records.append(record)
                self._changed.notify_all()
        with self._changed:
            self._ended = True
            self._changed.notify_all()

    # A `silence` limit, not a deadline: a run that goes on logging is making progress however slow
    # a loaded machine makes it, while one that says nothing for that long is stuck.

    def _await(self, found: Callable[[], Found | None], silence: float, waiting_for: str) -> Found | None:
        """Block until `found()` is not None (returned) or the output ends (None)."""
        with self._changed:
            while (result := found()) is None and not self._ended:
                seen = len(self.lines)
                self._changed.wait(silence)
                if len(self.lines) == seen and not self._ended:
                    raise TimeoutError(
                        f"silent for {silence} s while waiting for {waiting_for}; output:\n{self.output()}"
                    )
            return result

    def wait_for(
        self,
        event: str | None,
        silence: float = 90,
        where: Where = lambda _: True,
        nth: int = 1,
        after: object = None,
        **fields,
    ) -> dict:
        """The `nth` event named `event` (any, if None) with these field values (and that `where` accepts) logged
        after the previous match of a wait_for (`after`: after that record instead; START: from the
        first line), waiting for it. Raises TimeoutError after `silence` s without output,
        ChildExited if the output ends first."""

        def found() -> dict | None:
            if after is None:
                start = self._cursor
            elif after is START:
                start = 0
            else:
                start = next(i + 1 for i, record in enumerate(self.records) if record is after)
            hits = [i for i in range(start, len(self.records)) if matches(self.records[i], event, fields, where)]
            if len(hits) < nth:
                return None
            self._cursor = hits[nth - 1] + 1
            return self.records[hits[nth - 1]]

        record = self._await(found, silence, f"{event} {fields}")
        if record is None:
            raise ChildExited(f"the process ended before {event} {fields}; output:\n{self.output()}")
        return record

    def wait(self, silence: float = 90) -> int:
        """The exit code, once all of the output was read; the exit time and peak RSS are kept."""
        self._await(lambda: None, silence, "the exit")
        return self._reap(silence)

    def _reap(self, timeout: float) -> int:
        deadline = time.monotonic() + timeout
        while self.exit_code is None:
            if self.popen.returncode is not None:  # reaped already by a Popen.poll() of the caller's
                self.exited_at, self.exit_code = time.time(), self.popen.returncode
                break
            pid, status, usage = os.wait4(self.pid, os.WNOHANG)
            if pid:
                self.exited_at, self.exit_code = time.time(), os.waitstatus_to_exitcode(status)
                self.max_rss_bytes = usage.ru_maxrss * 1024  # KiB on Linux
                self.popen.returncode = self.exit_code  # reaped here: Popen must not wait for it again
            elif time.monotonic() > deadline:
                raise TimeoutError(f"the process did not exit within {timeout} s")
            else:
                time.sleep(0.001)  # the exit time is measured to a millisecond
        return self.exit_code

    def output(self) -> str:
        return "".join(self.lines)

    def events(self, name: str | None = None, **fields) -> list[dict]:
        with self._changed:
            return [record for record in self.records if matches(record, name, fields)]

    def signal(self, signum: int) -> float:
        """Send `signum`; returns the wall-clock time it was sent."""
        sent = time.time()
        if self.exit_code is None:
            os.kill(self.pid, signum)
        return sent

    def signal_group(self, signum: int) -> None:
        """To the whole process group, as a terminal's Ctrl+C is delivered."""
        os.killpg(self.pid, signum)

    def kill(self) -> None:
        """SIGKILL to its process group, and reap it (a process of its own group may keep the output open)."""
        if self.exit_code is None:
            os.killpg(self.pid, signal.SIGKILL)
            self._reap(90)


class ChildExited(AssertionError):
    """The child ended before the awaited event."""
