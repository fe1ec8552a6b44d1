"""One run per checkpoint directory: a lock on `<checkpoint.dir>/run.lock`, held for the life of the run.

Two trainers on one directory would both train, resume from each other's files, and delete them
under each other's feet (retention). The lock is a POSIX record lock (`fcntl.lockf`), which the
kernel drops when its process dies, however it dies (SIGKILL included): there is never a stale
lock to clean up. Unlike a `flock` lock it is not shared with forked children, so a DataLoader
worker that outlives a killed trainer for a moment does not keep the directory locked against the
restarted one; and `F_GETLK` tells who holds it without taking it, so `trainer status` can ask
while a run starts. Linux only, as the rest of the daemon.
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct
from pathlib import Path

from daemon.ckpt.layout import LOCK_FILE
from daemon.errors import CheckpointWriteError, DirectoryInUse

_FLOCK = "hhqqi4x"  # struct flock on 64-bit Linux: l_type, l_whence, l_start, l_len, l_pid


def acquire(directory: Path) -> int:
    """Create the directory if needed and lock it for the life of this process; return the lock
    file's descriptor, to be left open. Raises DirectoryInUse when another run holds it,
    CheckpointWriteError when the lock file cannot be created (a read-only directory, or not
    ours): either way before anything is trained that could not be saved."""
    path = directory / LOCK_FILE
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise CheckpointWriteError(
            f"cannot create the lock file {path}: {exc.strerror or exc}; checkpoints could not be written "
            f"there either: fix permissions or choose another checkpoint.dir"
        ) from None
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        pid = _holder(fd)
        os.close(fd)
        if exc.errno not in (errno.EACCES, errno.EAGAIN):
            raise CheckpointWriteError(f"cannot lock {path}: {exc.strerror or exc}") from None
        raise DirectoryInUse(
            f"{directory} is in use by another run ({describe(pid)}); stop it first, or give this run "
            f"another checkpoint.dir",
            holder_pid=pid,
        ) from None
    return fd


def holder(directory: Path) -> int | None:
    """The PID of the run holding `directory`'s lock (0: one outside this PID namespace), or None.
    Asks the kernel without taking the lock. Not for a process that holds it itself: closing any
    descriptor of the lock file drops a POSIX lock."""
    try:
        fd = os.open(directory / LOCK_FILE, os.O_RDONLY | os.O_CLOEXEC)
    except (FileNotFoundError, NotADirectoryError):
        return None
    try:
        return _holder(fd)
    finally:
        os.close(fd)


def _holder(fd: int) -> int | None:
    query = struct.pack(_FLOCK, fcntl.F_WRLCK, os.SEEK_SET, 0, 0, 0)
    l_type, _, _, _, pid = struct.unpack(_FLOCK, fcntl.fcntl(fd, fcntl.F_GETLK, query))
    return None if l_type == fcntl.F_UNLCK else pid


def describe(pid: int | None) -> str:
    if pid is None:  # it let go between our attempt and our question
        return "which has just ended"
    return f"PID {pid}" if pid else "a process outside this PID namespace"
