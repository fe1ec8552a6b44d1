"""The crash-loop guard: a start is refused after `CRASH_LIMIT` crashes in a row without progress.

A supervisor restarts a trainer that died (systemd's `Restart=`). That is right while each run gets
further, and a loop when the same crash repeats from the same checkpoint: an exception at a given
step, an OOM kill during start-up, a broken install. Progress is a newer checkpoint on disk, so a
run that crashed after saving is never held against the next start, and a run that stops in order
(a preemption's exit 75, a documented error) is not a crash: a preemption storm restarts for ever.

The record, `crash-record.json` in the checkpoint directory, holds the newest checkpoint at the
last start, the crashes since it, and whether the run that wrote it is still running: a start
that finds it so knows that its predecessor died without an orderly exit (an exception, SIGKILL,
the OOM killer, a segfault, a hung step killed by the watchdog).

The guard counts only for the run that will train: a start beside a run holding the directory is
refused first (exit 69), the record untouched, so that the running one's death is still counted.
The record is advisory and may be anything: read without following a link or waiting on a FIFO,
bounded in size; one that is not a record the guard wrote is set aside and means "unknown".
"""

from __future__ import annotations

import dataclasses
import json
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from daemon.ckpt import lock
from daemon.ckpt.layout import (
    CHECKPOINT_NAME,
    CRASH_RECORD_FILE,
    LOCK_FILE,
    SHARDED_COMMIT_FILE,
    SHARDED_NAME,
    UnusableFile,
    read_small_json,
    set_aside,
    write_atomic,
)
from daemon.errors import CrashLoop, DirectoryInUse, TrainerError

CRASH_LIMIT = 5


@dataclass(frozen=True, kw_only=True)
class Record:
    newest_checkpoint: str | None = None  # file name of the newest checkpoint at the last start
    crashes: int = 0  # runs that died since that checkpoint was the newest
    running: bool = False  # the last run started has not exited in order

    def __post_init__(self) -> None:
        name_ok = self.newest_checkpoint is None or isinstance(self.newest_checkpoint, str)
        if not name_ok or type(self.crashes) is not int or self.crashes < 0 or type(self.running) is not bool:
            raise ValueError(f"malformed crash record: {self}")


class CrashLoopGuard:
    """`with CrashLoopGuard(dir):` around a run. Entering counts the previous run if it crashed
    and raises `CrashLoop` on the `limit`-th crash in a row without a newer checkpoint (and
    forgets them: the next start, by a person, gets `limit` more tries). Leaving normally or
    through a `TrainerError` (a documented exit code) is an orderly exit; any other exception,
    or no exit at all, is a crash.

    The record is advisory, like the store's last logged step: a directory that cannot be
    written disables the guard, and the store reports that when it saves."""

    def __init__(self, directory: Path, limit: int = CRASH_LIMIT) -> None:
        self.directory = directory
        self.limit = limit

    def __enter__(self) -> CrashLoopGuard:
        lock.refuse_if_held(self.directory)  # DirectoryInUse: neither counted nor written
        last = self._found = self._read()
        # Checkpoint names sort by step. Matched by name only, so that the guard runs before torch is
        # imported and counts a crash while importing it too.
        newest = max(self._checkpoint_names(), default=None)
        progressed = newest is not None and (last.newest_checkpoint is None or newest > last.newest_checkpoint)
        crashes = (0 if progressed else last.crashes) + (1 if last.running else 0)
        if crashes >= self.limit:
            self._write(Record(newest_checkpoint=newest))
            since = f"checkpoint {newest}" if newest else "the first start, without any checkpoint"
            raise CrashLoop(
                f"{crashes} crashes in a row since {since} in {self.directory}: not starting again. "
                f"The earlier runs' `crashed` events (or the journal: systemd's `Main process exited` lines) "
                f"say why they died; fix that, then start it again ({self.limit} more tries)."
            )
        self._write(Record(newest_checkpoint=newest, crashes=crashes, running=True))
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is not None and issubclass(exc_type, DirectoryInUse):
            # The record is the run's that holds the directory. It locked it after this start was
            # counted: the record goes back as found. It took it from this run later: untouched.
            if not issubclass(exc_type, lock.LockLost):
                self._write(self._found)
        elif exc_type is None or issubclass(exc_type, TrainerError):
            self._write(dataclasses.replace(self._read(), running=False))

    def _checkpoint_names(self) -> list[str]:
        """The names of the checkpoints: the files, and the sharded checkpoints' directories that hold
        their commit record; a link, or a directory named like a file, is no progress."""
        try:
            names = os.listdir(self.directory)
        except OSError:  # none yet, or not a directory: the lock reports that
            return []
        found = []
        for name in names:
            try:
                mode = os.lstat(self.directory / name).st_mode
                if CHECKPOINT_NAME.match(name) and stat.S_ISREG(mode):
                    found.append(name)
                elif SHARDED_NAME.match(name) and stat.S_ISDIR(mode):
                    if stat.S_ISREG(os.lstat(self.directory / name / SHARDED_COMMIT_FILE).st_mode):
                        found.append(name)
            except OSError:  # removed meanwhile (retention)
                pass
        return found

    def _read(self) -> Record:
        if not self.directory.is_dir():
            return Record()  # none yet: nothing is known
        try:
            fields = read_small_json(self.directory, CRASH_RECORD_FILE)
        except UnusableFile as exc:
            set_aside(self.directory, CRASH_RECORD_FILE, str(exc))
            return Record()  # no crash is known
        except OSError:  # unreadable (EIO, not a directory): no crash is known
            return Record()
        if fields is None:
            # The record is written only where the directory exists: a run that found none, created
            # it with its lock and then left no record behind ended without an orderly exit.
            return Record(running=os.path.lexists(self.directory / LOCK_FILE))
        try:
            return Record(**fields)
        except (TypeError, ValueError):
            set_aside(self.directory, CRASH_RECORD_FILE, "not a crash record")
            return Record()

    def _write(self, record: Record) -> None:
        # No directory is created here: a config refused at start-up must leave nothing behind. Until
        # a run's lock creates it, systemd's start limit is what stops a crash loop.
        data = json.dumps(dataclasses.asdict(record)).encode()
        try:
            write_atomic(self.directory, CRASH_RECORD_FILE, lambda file: file.write(data), durable=False)
        except OSError:
            pass  # advisory: a directory that cannot be written disables the guard (see the class)
