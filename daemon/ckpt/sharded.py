"""Sharded checkpoints (`dist.strategy: fsdp`): one directory per checkpoint, named as a checkpoint
file is but ending `.dcp`, with the same kinds, order and retention:

    ckpt-<global step>-<kind>.dcp/
        __<rank>_0.distcp        each rank's shards of the model and the optimizer's state, written by
                                 that rank with torch.distributed.checkpoint (DCP)
        .metadata                DCP's index of the shards, written by rank 0 once every rank's are
        state.pt                 everything else, as a checkpoint file holds it (position, schedules,
                                 the data order, each rank's RNGs...), written by rank 0; under the
                                 sharded pieces' keys, the layout of their tensors
        commit.json              the daemon's commit record, written last, by rank 0: the step, the kind,
                                 and each file's size and SHA-256

A directory is a checkpoint only with its commit record, and only while every file the record names
has its size and hash: DCP's own `.metadata` says that the shards were written, not that they are
still what was written. A directory that fails is set aside as `<name>.invalid` like a bad file,
and the next older checkpoint is tried (daemon/ckpt/store.py). The record is JSON: checked before
anything pickled in the directory is read.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import stat
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from daemon.ckpt.layout import (
    SHARDED_COMMIT_FILE,
    SHARDED_NAME,
    UnusableFile,
    fsync_directory,
    open_regular,
    read_small_json,
    sharded_name,
    write_atomic,
)
from daemon.ckpt.schema import InvalidCheckpoint, is_exactly, require
from daemon.ckpt.store import (
    A_LINK,
    EPOCH_END_KINDS,
    CheckpointStore,
    Entry,
    SaveResult,
    named_like,
    read_checkpoint,
)

if TYPE_CHECKING:
    from daemon.ckpt.remote import Manifest

COMMIT_RECORD = SHARDED_COMMIT_FILE
REST_FILE = "state.pt"
COMMIT_VERSION = 1
NOT_A_DIRECTORY = "not a directory; left in place"
HASH_CHUNK = 1 << 20


@dataclass(frozen=True)
class ShardedState:
    """A piece of state each rank holds a shard of (the model's, the optimizer's), as its `state_dict()`
    gives it: written by every rank into the checkpoint's directory under `name`, not into `state.pt`."""

    name: str  # its key among DCP's
    value: dict  # DTensors and plain values, as torch.distributed.checkpoint.state_dict gives them


def shards(state: dict) -> dict:
    """The sharded pieces of a checkpoint's content, by their DCP name: what every rank writes."""
    return {value.name: value.value for value in state.values() if isinstance(value, ShardedState)}


def layout(value: Any, prefix: str = "") -> dict[str, list]:
    """Every tensor in a (nested) state dict, by its dotted path: its global shape and dtype. What a
    sharded piece's key holds in `state.pt`, checked against the live state before a resume loads it."""
    if isinstance(value, torch.Tensor):
        return {prefix: [list(value.shape), str(value.dtype)]}
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    found: dict[str, list] = {}
    for key, item in items:
        found.update(layout(item, f"{prefix}.{key}" if prefix else str(key)))
    return found


def _sha256(directory: Path, name: str) -> tuple[int, str]:
    """A file's size and SHA-256, read without following a link or blocking. Raises InvalidCheckpoint."""
    try:
        file = open_regular(directory, name)
    except UnusableFile as exc:
        raise InvalidCheckpoint(f"{name}: {exc}") from None
    if file is None:
        raise InvalidCheckpoint(f"{name}: missing")
    digest, size = hashlib.sha256(), 0
    with file:
        while chunk := file.read(HASH_CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return size, digest.hexdigest()


def verify_commit(directory: Path) -> int:
    """Check the commit record of a sharded checkpoint and every file it names; the bytes they hold
    in all. Raises InvalidCheckpoint."""
    try:
        record = read_small_json(directory, COMMIT_RECORD, limit=1 << 20)
    except UnusableFile as exc:
        raise InvalidCheckpoint(f"{COMMIT_RECORD}: {exc}") from None
    require(record is not None, COMMIT_RECORD, "missing: the checkpoint was never completely written")
    require(
        isinstance(record, dict) and record.get("commit_version") == COMMIT_VERSION,
        COMMIT_RECORD,
        f"not a commit record of version {COMMIT_VERSION}",
    )
    name = SHARDED_NAME.match(directory.name)
    require(
        name is not None and [record.get("global_step"), record.get("kind")] == [int(name["step"]), name["kind"]],
        COMMIT_RECORD,
        "its step and kind are not those of the directory's name",
    )
    files = record.get("files")
    require(
        isinstance(files, dict)
        and {REST_FILE, ".metadata"} <= files.keys()
        and all(
            isinstance(entry, dict) and is_exactly(entry.get("bytes"), int) and isinstance(entry.get("sha256"), str)
            for entry in files.values()
        ),
        COMMIT_RECORD,
        f"must name {REST_FILE} and .metadata, each with its bytes and sha256",
    )
    for file_name, expected in sorted(files.items()):
        # A name from the record is opened in this directory only: no separator, no way out of it.
        require(file_name not in ("", ".", "..") and "/" not in file_name, COMMIT_RECORD, "names a path")
        size, sha256 = _sha256(directory, file_name)
        require(size == expected["bytes"], file_name, f"{size} bytes, the commit record says {expected['bytes']}")
        require(sha256 == expected["sha256"], file_name, "its SHA-256 is not the one the commit record says")
    return sum(entry["bytes"] for entry in files.values())


def read_sharded(directory: Path) -> tuple[dict, int]:
    """The content of `state.pt` of a committed, verified sharded checkpoint, and the checkpoint's
    size. Raises InvalidCheckpoint."""
    size = verify_commit(directory)
    state = read_checkpoint(directory / REST_FILE)
    name = SHARDED_NAME.match(directory.name)
    assert name is not None  # verify_commit matched it
    require(
        (state["global_step"], state["kind"]) == (int(name["step"]), name["kind"]),
        "global_step, kind",
        f"{(state['global_step'], state['kind'])} in {REST_FILE}, not those of the directory's name",
    )
    return state, size


class ShardedStore(CheckpointStore):
    """The checkpoint store of a sharded run: listing, verified reads, setting aside and retention as
    the file store's, over directories. Writing takes every rank (daemon/dist/fsdp.py): `prepare` the
    directory, every rank writes its shards, then `save` the rest and the commit record."""

    def path_for(self, global_step: int, kind: str) -> Path:
        return self.directory / sharded_name(global_step, kind)

    def prepare(self, path: Path) -> None:
        """An empty directory for a checkpoint's shards. Whatever has that name is replaced, as a file
        renamed over it would be: a leftover never committed (a resume sets aside those newer than the
        checkpoint it resumes from), or anything planted (a link is removed, never followed)."""
        try:
            self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            if path.is_symlink() or path.exists():
                self._delete(path)
            path.mkdir(mode=0o700)
        except OSError as exc:
            raise self._write_error(f"cannot create checkpoint directory {path}", exc) from None

    def save(self, state: dict[str, Any]) -> SaveResult:
        """After every rank wrote its shards into `path_for(...)`: the rest of `state` (a sharded piece
        as its layout), then the commit record naming every file, each step durable. Raises
        CheckpointWriteError."""
        started = time.perf_counter()
        path = self.path_for(state["global_step"], state["kind"])
        rest = {key: layout(value.value) if isinstance(value, ShardedState) else value for key, value in state.items()}
        try:
            write_atomic(path, REST_FILE, lambda file: torch.save(rest, file), durable=True)
            files: dict[str, dict[str, Any]] = {}
            for name in sorted(os.listdir(path)):
                if name != COMMIT_RECORD and stat.S_ISREG(os.lstat(path / name).st_mode):
                    size, sha256 = _sha256(path, name)
                    files[name] = {"bytes": size, "sha256": sha256}
            record = {
                "commit_version": COMMIT_VERSION,
                "global_step": state["global_step"],
                "kind": state["kind"],
                "files": files,
            }
            # Last: the directory is a checkpoint from here (its own entries fsynced by the write).
            write_atomic(path, COMMIT_RECORD, lambda file: file.write(json.dumps(record).encode()), durable=True)
            fsync_directory(self.directory)
        except OSError as exc:
            raise self._write_error(
                f"cannot write checkpoint {path}", exc, " (the previous checkpoints are intact)"
            ) from None
        with self._known_good_lock:
            self._known_good.add(path.name)
        total = sum(entry["bytes"] for entry in files.values())
        return SaveResult(path, state["kind"], state["global_step"], total, (time.perf_counter() - started) * 1e3)

    def _listed(self, remote: Sequence[Manifest] = ()) -> list[Entry]:
        """Every directory named like a sharded checkpoint, not yet read, newest first (as files are).
        What is not a directory (a link, never followed; a file) comes with its reason already."""
        assert not remote  # a sharded run has no remote tier (refused by the checkpoint manager)
        if not self.directory.is_dir():
            return []
        found = []
        for path, match, status in named_like(self.directory, SHARDED_NAME):
            is_dir, is_link = stat.S_ISDIR(status.st_mode), stat.S_ISLNK(status.st_mode)
            reason = None if is_dir else A_LINK if is_link else NOT_A_DIRECTORY
            entry = Entry(path, int(match["step"]), match["kind"], 0, reason=reason)
            found.append(((entry.global_step, entry.kind in EPOCH_END_KINDS, status.st_mtime_ns), entry))
        found.sort(key=lambda item: item[0], reverse=True)
        return [entry for _, entry in found]

    def _read(self, entry: Entry, validate: Callable[[Entry], None] = lambda entry: None) -> Entry:  # type: ignore[override]
        if entry.reason is not None:
            return entry
        try:
            state, size = read_sharded(entry.path)
            entry = dataclasses.replace(entry, state=state, bytes=size)
            validate(entry)
            return entry
        except InvalidCheckpoint as exc:
            return dataclasses.replace(entry, state=None, reason=str(exc))

    @staticmethod
    def _delete(path: Path) -> None:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)

    @staticmethod
    def _move_aside(path: Path, aside: Path) -> None:
        # A directory set aside before under that name (the same step and kind written again) gives
        # way, as a file set aside does when renamed over.
        if aside.is_dir() and not aside.is_symlink():
            shutil.rmtree(aside)
        os.replace(path, aside)
