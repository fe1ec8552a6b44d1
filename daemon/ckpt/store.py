"""The checkpoint store: atomic writes, verified reads, newest-valid lookup, retention.

A checkpoint is one `torch.save` file named by daemon/ckpt/layout.py, loadable with
`torch.load(path, weights_only=True)`. Its integrity check is the CRC-32 that torch's zip
container records for every record at save time (the pickled structure and each tensor),
verified in full before loading: a truncated, corrupted, unreadable or foreign file is
never used. Before that, the archive's directory is checked against the file's size, so that a
file which claims more than it holds is refused without reading it. A file is opened without
following a link or blocking. A checkpoint exists only when complete: temp file, fsync, rename,
fsync the directory. A file found invalid when resuming is renamed `*.invalid` (kept for
inspection, out of the way of retention and of later runs); one that is not a regular file (a
link, a directory, a FIFO) is left in place. What the content must hold is daemon/ckpt/schema.py's.

Retention counts only the checkpoints this store wrote or read as valid: anyone may put a file
named like a newer checkpoint in the directory, and counting it would delete the real ones.
"""

from __future__ import annotations

import dataclasses
import os
import re
import stat
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch

from daemon.ckpt.archive import verify_archive
from daemon.ckpt.layout import (
    CHECKPOINT_NAME,
    INVALID_SUFFIX,
    UnusableFile,
    checkpoint_name,
    open_regular,
    temp_files,
    write_atomic,
)
from daemon.ckpt.schema import InvalidCheckpoint, check_format
from daemon.errors import CheckpointWriteError

if TYPE_CHECKING:
    from daemon.ckpt.remote import Manifest

# Written after the epoch at their step was completed, so newer than any other kind at that step.
EPOCH_END_KINDS = ("epoch", "final")
NOT_A_FILE = "not a regular file; left in place"
A_LINK = "a symbolic link, not followed; left in place"


@dataclass(frozen=True)
class SaveResult:
    path: Path
    kind: str
    global_step: int
    bytes: int
    duration_ms: float


@dataclass(frozen=True)
class Entry:
    """A checkpoint file as found on disk, with what reading it told."""

    path: Path
    global_step: int
    kind: str
    bytes: int
    state: dict | None = None  # the loaded content, when valid
    reason: str | None = None  # why it is invalid
    remote: Manifest | None = None  # a checkpoint of the remote tier, downloaded when it is read

    @property
    def valid(self) -> bool:
        return self.state is not None

    @property
    def valid_state(self) -> dict:
        """`state` of an entry read as valid (as `validate` sees it and `newest_valid` returns it)."""
        assert self.state is not None, f"{self.path} is not a valid checkpoint: {self.reason}"
        return self.state


class RemoteCandidates(Protocol):
    """The committed checkpoints of the remote tier, as a resume considers them beside the local ones."""

    manifests: list[Manifest]

    def fetch(self, manifest: Manifest) -> None:
        """Download into the store's directory under its name if its bytes match; raise InvalidCheckpoint."""

    def reject(self, manifest: Manifest, reason: str) -> None:
        """Uncommit a checkpoint found invalid, and report it."""


def read_checkpoint(path: Path) -> dict:
    """Check the archive's directory against the file, verify every record's checksum, then load
    with weights_only=True; raise InvalidCheckpoint. Opened without following a link or blocking."""
    try:
        file = open_regular(path.parent, path.name)
    except UnusableFile as exc:
        raise InvalidCheckpoint(str(exc)) from None
    if file is None:
        raise InvalidCheckpoint("no such file (removed since it was listed)")
    with file:
        verify_archive(file)
        file.seek(0)
        try:
            state = torch.load(file, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 -- whatever the bytes hold, a file that does not load is not a checkpoint
            raise InvalidCheckpoint(
                f"refused by weights-only loading ({type(exc).__name__}: {str(exc).splitlines()[0]})"
            ) from None
    check_format(state, path)
    return state


def _os_error_in_chain(exc: BaseException | None) -> OSError | None:
    """The OSError behind `exc`: torch's zip writer reports a failed write as a RuntimeError
    raised while the OSError from `write` is being handled."""
    while exc is not None and not isinstance(exc, OSError):
        exc = exc.__cause__ or exc.__context__
    return exc


def named_like(directory: Path, name: re.Pattern[str]) -> Iterator[tuple[Path, re.Match[str], os.stat_result]]:
    """Each entry of `directory` whose name matches `name`, with its own status (a link's, never its target's)."""
    for path in directory.iterdir():
        match = name.match(path.name)
        if not match:
            continue
        try:
            status = path.lstat()
        except FileNotFoundError:  # removed by a running trainer's retention meanwhile
            continue
        yield path, match, status


class CheckpointStore:
    def __init__(self, directory: Path, keep_last: int) -> None:
        self.directory = directory
        self.keep_last = keep_last
        # The names of the checkpoints this store wrote or read as valid: the only ones retention
        # counts. Saves and prunes run on the background writer's thread as well as the loop's.
        self._known_good: set[str] = set()
        self._known_good_lock = threading.Lock()

    def path_for(self, global_step: int, kind: str) -> Path:
        return self.directory / checkpoint_name(global_step, kind)

    def save(self, state: dict[str, Any]) -> SaveResult:
        """Write `state` atomically and durably. Raises CheckpointWriteError.

        Retention is left to `prune`, so that a caller in a hurry (the emergency path) can report
        the checkpoint durable first: deleting a file costs as much as a fifth of an MLP save here.
        """
        started = time.perf_counter()
        path = self.path_for(state["global_step"], state["kind"])
        try:
            self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            # Into a Python file object, not a path: torch's own file writer turns ENOSPC into an
            # anonymous RuntimeError, while through `write` it stays an OSError that says why.
            size = write_atomic(self.directory, path.name, lambda file: torch.save(state, file), durable=True)
        except BaseException as exc:
            io_error = _os_error_in_chain(exc)
            if io_error is None:
                raise
            raise self._write_error(
                f"cannot write checkpoint {path}", io_error, " (the previous checkpoints are intact)"
            ) from None
        with self._known_good_lock:
            self._known_good.add(path.name)
        return SaveResult(path, state["kind"], state["global_step"], size, (time.perf_counter() - started) * 1e3)

    def _listed(self, remote: Sequence[Manifest] = ()) -> list[Entry]:
        """Everything named like a checkpoint, not yet read, newest first: global step, then epoch-end
        kinds (the same step with its epoch completed), then local before remote, then write time.
        What is not a regular file (a link, never followed; a directory, a device) comes with its
        reason already. `remote`: the remote tier's committed checkpoints."""
        found = [
            ((m.global_step, m.kind in EPOCH_END_KINDS, False, int(m.committed_at * 1e9)), self._remote_entry(m))
            for m in remote
        ]
        if not self.directory.is_dir():
            found.sort(key=lambda item: item[0], reverse=True)
            return [entry for _, entry in found]
        for path, match, status in named_like(self.directory, CHECKPOINT_NAME):
            reason = None if stat.S_ISREG(status.st_mode) else A_LINK if stat.S_ISLNK(status.st_mode) else NOT_A_FILE
            entry = Entry(path, int(match["step"]), match["kind"], status.st_size, reason=reason)
            found.append(((entry.global_step, entry.kind in EPOCH_END_KINDS, True, status.st_mtime_ns), entry))
        found.sort(key=lambda item: item[0], reverse=True)
        return [entry for _, entry in found]

    def _remote_entry(self, manifest: Manifest) -> Entry:
        return Entry(
            self.path_for(manifest.global_step, manifest.kind),
            manifest.global_step,
            manifest.kind,
            manifest.size,
            remote=manifest,
        )

    def prune(self) -> None:
        """Delete the checkpoint files older than the newest `keep_last` that this store wrote or
        read as valid. A file it has not read is not counted, and is kept while it is newer than
        those: a resume reads it first and sets it aside if it is bad. So the newest valid
        checkpoint is never deleted. Raises CheckpointWriteError."""
        with self._known_good_lock:
            kept = 0
            for entry in self._listed():
                if entry.reason is not None:  # not a regular file: left in place
                    continue
                if kept < self.keep_last:
                    kept += entry.path.name in self._known_good
                    continue
                try:
                    self._delete(entry.path)
                except OSError as exc:
                    raise self._write_error(f"cannot delete old checkpoint {entry.path}", exc) from None
                self._known_good.discard(entry.path.name)

    @staticmethod
    def _delete(path: Path) -> None:
        path.unlink(missing_ok=True)

    @staticmethod
    def _move_aside(path: Path, aside: Path) -> None:
        os.replace(path, aside)

    def scan(self) -> list[Entry]:
        """Every checkpoint file, newest first, each verified in full (for `trainer status`)."""
        return [self._read(entry) for entry in self._listed()]

    @staticmethod
    def _read(entry: Entry, validate: Callable[[Entry], None] = lambda entry: None) -> Entry:
        if entry.reason is not None:
            return entry
        try:
            entry = dataclasses.replace(entry, state=read_checkpoint(entry.path))
            validate(entry)
            return entry
        except InvalidCheckpoint as exc:
            return dataclasses.replace(entry, state=None, reason=str(exc))

    def newest_valid(
        self,
        on_invalid: Callable[[Entry, Path | None], None],
        validate: Callable[[Entry], None] = lambda entry: None,
        remote: RemoteCandidates | None = None,
    ) -> Entry | None:
        """The newest checkpoint that verifies and passes `validate` (which raises InvalidCheckpoint,
        and may raise other errors, which end the search). Each invalid file met on the way is set
        aside as `<name>.invalid` and reported through `on_invalid(entry, new_path)`; what is not a
        regular file (a link, a directory) is reported with `new_path` None and left in place.
        `remote`: the remote tier's checkpoints are candidates too, a local copy read first; one is
        downloaded when its turn comes, and uncommitted when it is invalid.
        Raises CheckpointWriteError when a file cannot be set aside."""
        for listed in self._listed(remote.manifests if remote else []):
            if listed.reason is not None:
                on_invalid(listed, None)
                continue
            if listed.remote is not None:
                assert remote is not None
                try:
                    remote.fetch(listed.remote)
                except InvalidCheckpoint as exc:
                    remote.reject(listed.remote, str(exc))
                    continue
            entry = self._read(listed, validate)
            if entry.valid:
                with self._known_good_lock:
                    self._known_good.add(entry.path.name)
                return entry
            aside = entry.path.with_name(entry.path.name + INVALID_SUFFIX)
            try:
                self._move_aside(entry.path, aside)
            except OSError as exc:
                raise self._write_error(
                    f"cannot set aside invalid checkpoint {entry.path} ({entry.reason})", exc
                ) from None
            on_invalid(entry, aside)
            if entry.remote is not None:
                assert remote is not None and entry.reason is not None
                remote.reject(entry.remote, entry.reason)
        return None

    def _write_error(self, what: str, exc: OSError, note: str = "") -> CheckpointWriteError:
        return CheckpointWriteError(
            f"{what}: {exc.strerror or exc}; free space or fix permissions in {self.directory}{note}"
        )

    def remove_temp_files(self) -> list[Path]:
        """Temporary files left by a process killed mid-write; they were never checkpoints."""
        stale = temp_files(self.directory)
        for path in stale:
            try:
                path.unlink(missing_ok=True)
            except OSError as exc:
                raise self._write_error(f"cannot remove temporary file {path}", exc) from None
        return stale
