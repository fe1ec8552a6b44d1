"""The run directory (`checkpoint.dir`): every file the daemon keeps there, named here, and the one
atomic writer that puts each in place.

    ckpt-<global step, 10 digits>-<kind>.pt   a checkpoint (names sort by step)
    ckpt-...pt.invalid                        a checkpoint found invalid, set aside for inspection
    ckpt-<global step>-<kind>.dcp/            a sharded checkpoint (dist.strategy: fsdp), a directory
                                              (daemon/ckpt/sharded.py); set aside as ckpt-...dcp.invalid/
    run.lock                                  held by the run training here (daemon/ckpt/lock.py)
    crash-record.json                         the crash-loop guard's record (daemon/ckpt/crashloop.py)
    last-logged-step.json                     the step trained to, marked at least every 0.5 s (daemon/ckpt/logged_step.py)
    metrics.jsonl                             the metrics history (daemon/ckpt/history.py)
    remote-state.json                         the uploads to checkpoint.remote, for `trainer status` (daemon/ckpt/uploads.py)
    save-policy.json                          checkpoint.max_overhead's interval in force, for `trainer status` (daemon/ckpt/saving.py)
    <record>.invalid                          an advisory record (metrics.jsonl, crash-record.json,
                                              last-logged-step.json, remote-state.json) found unusable, set aside
    .tmp-<name>.<pid>.<random>                a file being written; left behind only by a killed writer

Imports nothing beyond the standard library and daemon/events.py: the crash-loop guard reads the
directory before torch is imported.
"""

from __future__ import annotations

import errno
import json
import os
import re
import secrets
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

from daemon import events

CHECKPOINT_NAME = re.compile(r"^ckpt-(?P<step>\d{10})-(?P<kind>[a-z_]+)\.pt$")
SHARDED_NAME = re.compile(r"^ckpt-(?P<step>\d{10})-(?P<kind>[a-z_]+)\.dcp$")
SHARDED_COMMIT_FILE = "commit.json"  # a sharded checkpoint's own commit record, written last in its directory
INVALID_SUFFIX = ".invalid"
LOCK_FILE = "run.lock"
CRASH_RECORD_FILE = "crash-record.json"
LOGGED_STEP_FILE = "last-logged-step.json"
HISTORY_FILE = "metrics.jsonl"
REMOTE_STATE_FILE = "remote-state.json"
SAVE_POLICY_FILE = "save-policy.json"
TEMP_PREFIX = ".tmp-"


def checkpoint_name(global_step: int, kind: str) -> str:
    return f"ckpt-{global_step:010d}-{kind}.pt"


def sharded_name(global_step: int, kind: str) -> str:
    return f"ckpt-{global_step:010d}-{kind}.dcp"


def write_atomic(directory: Path, name: str, write: Callable[[BinaryIO], object], *, durable: bool) -> int:
    """Put `directory/name` in place whole or not at all: `write` fills a temporary file, which is
    renamed over `name`; `durable`: fsynced first, and the directory after the rename (a checkpoint
    exists only once both are on disk). Returns the file's size.

    The temporary file's name is unique and it is created exclusively without following a link: a
    name planted in a directory others can write (a link to a file elsewhere) makes the write fail
    instead of writing through it. On any failure it is removed and the error raised."""
    temp = directory / f"{TEMP_PREFIX}{name}.{os.getpid()}.{secrets.token_hex(4)}"
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        with open(fd, "wb") as file:
            write(file)
            file.flush()
            if durable:
                os.fsync(file.fileno())
            size = os.fstat(file.fileno()).st_size
        os.replace(temp, directory / name)
    except BaseException:
        try:
            temp.unlink(missing_ok=True)
        except OSError:  # a read-only or vanished directory refuses the clean-up too: the first error says why
            pass
        raise
    if durable:
        fsync_directory(directory)
    return size


def fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def temp_files(directory: Path) -> list[Path]:
    """Temporary files left by a writer that was killed mid-write: never complete, never read."""
    if not directory.is_dir():
        return []
    return [path for path in directory.iterdir() if path.name.startswith(TEMP_PREFIX) and path.is_file()]


class UnusableFile(Exception):
    """A file of the run directory that cannot be what its name says; the message says why."""


def open_regular(directory: Path, name: str) -> BinaryIO | None:
    """`directory/name` opened for reading if it is a regular file; None if there is none. Never
    follows a link (a link planted there may point anywhere) and never blocks (a FIFO or a device
    opened for reading would wait for a writer). Raises UnusableFile for anything else."""
    try:
        fd = os.open(directory / name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError as exc:  # ELOOP: a link; EACCES, EISDIR...
        reason = "a symbolic link, not followed" if exc.errno == errno.ELOOP else exc.strerror or str(exc)
        raise UnusableFile(reason) from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise UnusableFile("not a regular file")
    return open(fd, "rb")


def read_small_json(directory: Path, name: str, limit: int = 1 << 16) -> Any:
    """The JSON value of a small record of the run directory (None: no such file). Raises
    UnusableFile when it is not a regular file, is larger than `limit` bytes, or is not JSON (a
    nesting too deep for the parser included)."""
    file = open_regular(directory, name)
    if file is None:
        return None
    with file:
        data = file.read(limit + 1)
    if len(data) > limit:
        raise UnusableFile(f"larger than {limit} bytes")
    try:
        return json.loads(data)
    except (ValueError, RecursionError) as exc:
        raise UnusableFile(f"not JSON ({type(exc).__name__})") from None


def set_aside(directory: Path, name: str, reason: str) -> Path | None:
    """An advisory file of the run directory that is unusable: renamed `<name>.invalid` (a link is
    moved, not followed), or left in place when it cannot be (None), and reported either way."""
    aside = directory / (name + INVALID_SUFFIX)
    try:
        os.replace(directory / name, aside)
    except OSError:  # a directory over an existing file, say: the run goes on without what it held
        events.ADVISORY_FILE_INVALID.emit(path=str(directory / name), reason=reason, moved_to=None)
        return None
    events.ADVISORY_FILE_INVALID.emit(path=str(directory / name), reason=reason, moved_to=str(aside))
    return aside
