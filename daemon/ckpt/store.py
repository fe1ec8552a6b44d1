"""The checkpoint store: atomic writes, verified reads, newest-valid lookup, retention.

A checkpoint is one `torch.save` file named by daemon/ckpt/layout.py, loadable with
`torch.load(path, weights_only=True)`. Its integrity check is the CRC-32 that torch's zip
container records for every record at save time (the pickled structure and each tensor),
verified in full before loading: a truncated, corrupted, unreadable or foreign file is
never used. A checkpoint exists only when complete: temp file, fsync, rename, fsync the
directory. A file found invalid when resuming is renamed `*.invalid` (kept for inspection,
out of the way of retention and of later runs). What the content must hold is daemon/ckpt/schema.py's.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import os
import stat
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from daemon.ckpt.layout import CHECKPOINT_NAME, INVALID_SUFFIX, checkpoint_name, temp_files, write_atomic
from daemon.ckpt.schema import InvalidCheckpoint, check_format
from daemon.errors import CheckpointWriteError

# Written after the epoch at their step was completed, so newer than any other kind at that step.
EPOCH_END_KINDS = ("epoch", "final")
NOT_A_FILE = "not a regular file; left in place"


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

    @property
    def valid(self) -> bool:
        return self.state is not None

    @property
    def valid_state(self) -> dict:
        """`state` of an entry read as valid (as `validate` sees it and `newest_valid` returns it)."""
        assert self.state is not None, f"{self.path} is not a valid checkpoint: {self.reason}"
        return self.state


def read_checkpoint(path: Path) -> dict:
    """Verify every record's checksum, then load with weights_only=True; raise InvalidCheckpoint."""
    try:
        with zipfile.ZipFile(path) as archive:
            corrupt_record = archive.testzip()
    except zipfile.BadZipFile as exc:
        raise InvalidCheckpoint(f"incomplete or not a checkpoint archive ({exc})") from None
    except (OSError, EOFError, ValueError) as exc:
        raise InvalidCheckpoint(f"unreadable ({type(exc).__name__}: {exc})") from None
    if corrupt_record is not None:
        raise InvalidCheckpoint(f"checksum mismatch in record {corrupt_record}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
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


class CheckpointStore:
    def __init__(self, directory: Path, keep_last: int) -> None:
        self.directory = directory
        self.keep_last = keep_last

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
        return SaveResult(path, state["kind"], state["global_step"], size, (time.perf_counter() - started) * 1e3)

    def _listed(self) -> list[Entry]:
        """Everything named like a checkpoint, not yet read, newest first: global step, then epoch-end
        kinds (the same step with its epoch completed), then write time. What is not a regular file
        (a directory, a device) comes with its reason already."""
        if not self.directory.is_dir():
            return []
        found = []
        for path in self.directory.iterdir():
            match = CHECKPOINT_NAME.match(path.name)
            if not match:
                continue
            try:
                status = path.stat()
            except FileNotFoundError:  # removed by a running trainer's retention meanwhile
                continue
            reason = None if stat.S_ISREG(status.st_mode) else NOT_A_FILE
            entry = Entry(path, int(match["step"]), match["kind"], status.st_size, reason=reason)
            found.append(((entry.global_step, entry.kind in EPOCH_END_KINDS, status.st_mtime_ns), entry))
        found.sort(key=lambda item: item[0], reverse=True)
        return [entry for _, entry in found]

    def prune(self) -> None:
        """Delete all but the newest `keep_last` checkpoint files. Raises CheckpointWriteError."""
        for entry in [entry for entry in self._listed() if entry.reason is None][self.keep_last :]:
            try:
                entry.path.unlink(missing_ok=True)
            except OSError as exc:
                raise self._write_error(f"cannot delete old checkpoint {entry.path}", exc) from None

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
        self, on_invalid: Callable[[Entry, Path | None], None], validate: Callable[[Entry], None] = lambda entry: None
    ) -> Entry | None:
        """The newest checkpoint that verifies and passes `validate` (which raises InvalidCheckpoint,
        and may raise other errors, which end the search). Each invalid file met on the way is set
        aside as `<name>.invalid` and reported through `on_invalid(entry, new_path)`; what is not a
        regular file is reported with `new_path` None and left in place. Raises CheckpointWriteError
        when a file cannot be set aside."""
        for listed in self._listed():
            entry = self._read(listed, validate)
            if entry.valid:
                return entry
            if entry.reason == NOT_A_FILE:
                on_invalid(entry, None)
                continue
            aside = entry.path.with_name(entry.path.name + INVALID_SUFFIX)
            try:
                os.replace(entry.path, aside)
            except OSError as exc:
                raise self._write_error(
                    f"cannot set aside invalid checkpoint {entry.path} ({entry.reason})", exc
                ) from None
            on_invalid(entry, aside)
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


def snapshot(state: Any, reuse: Any = None) -> Any:
    """A copy of `state` on the CPU that the training loop can no longer change.

    Each tensor is copied into the tensor at the same place in `reuse` (an earlier snapshot
    nobody reads any more) when shape, dtype and strides match, else into a new one. Copying
    into memory already mapped is several times faster than into fresh memory, whose every
    page faults on first touch: for a 1.2 GB state, ~0.1 s instead of ~0.5-1.5 s here.
    """
    if isinstance(state, torch.Tensor):
        source = state.detach()
        if isinstance(reuse, torch.Tensor) and (reuse.shape, reuse.dtype, reuse.stride()) == (
            source.shape,
            source.dtype,
            source.stride(),
        ):
            return reuse.copy_(source)
        return source.to("cpu", copy=True)
    if isinstance(state, dict):
        previous = reuse if isinstance(reuse, dict) else {}
        return {key: snapshot(value, previous.get(key)) for key, value in state.items()}
    if isinstance(state, (list, tuple)):
        previous_items = (
            reuse if isinstance(reuse, (list, tuple)) and len(reuse) == len(state) else (None,) * len(state)
        )
        return type(state)(snapshot(value, old) for value, old in zip(state, previous_items, strict=True))
    return state


class BackgroundWriter:
    """Writes snapshots through the store on one background thread, one save at a time.

    The loop is blocked only for the snapshot; `submit` first waits for the save in flight,
    so two saves never run at once, and `drain` lets the emergency path wait for it before
    its own synchronous write (the emergency file is then the newest). The snapshot of the
    last save is kept, its memory reused by the next one: between saves the writer holds one
    snapshot of the state, as it does while a save is in flight.
    """

    def __init__(self, store: CheckpointStore) -> None:
        self.store = store
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="ckpt-writer")
        self._in_flight: concurrent.futures.Future[SaveResult] | None = None
        self._last_snapshot: dict[str, Any] | None = None  # written out; its tensors are free for reuse

    def submit(self, state: dict[str, Any]) -> list[SaveResult]:
        """Start writing a snapshot of `state`; return the saves that finished meanwhile."""
        finished = self.drain()  # after this, nothing reads the last snapshot: it may be overwritten
        self._last_snapshot = snapshot(state, reuse=self._last_snapshot)
        self._in_flight = self._executor.submit(self._write, self._last_snapshot)
        return finished

    def _write(self, state: dict[str, Any]) -> SaveResult:
        result = self.store.save(state)
        self.store.prune()  # here too, off the loop
        return result

    def poll(self) -> list[SaveResult]:
        """The save in flight, if it has finished (its error, if it failed, is raised here)."""
        if self._in_flight is not None and self._in_flight.done():
            return self.drain()
        return []

    def drain(self) -> list[SaveResult]:
        """Wait for the save in flight; return it (or raise its error)."""
        future, self._in_flight = self._in_flight, None
        return [future.result()] if future is not None else []

    def close(self) -> list[SaveResult]:
        try:
            return self.drain()
        finally:
            self._last_snapshot = None
            self._executor.shutdown(wait=True)
