"""One run per checkpoint directory: a lock on `<checkpoint.dir>/run.lock`, held for the life of the run.

Two trainers on one directory would both train, resume from each other's files, and delete them
under each other's feet (retention). The lock is a POSIX record lock (`fcntl.lockf`), which the
kernel drops when its process dies, however it dies (SIGKILL included): there is never a stale
lock to clean up. Unlike a `flock` lock it is not shared with forked children, so a DataLoader
worker that outlives a killed trainer for a moment does not keep the directory locked against the
restarted one; and `F_GETLK` tells who holds it without taking it, so `trainer status` can ask
while a run starts. Linux only, as the rest of the daemon.

Three things a POSIX lock does not do by itself, done here:

* It survives an `execve` only on a descriptor left open: a `cpu_wait` handover passes the
  descriptor to its successor image, which adopts it (`INHERITED_VARIABLE`), so the directory is
  never free between the two.
* It guards a file, not its name: once `run.lock` is removed or replaced, a second run locks the
  new file. The holder confirms, before each save and about once a second, that the name is still
  its file (`RunLock.confirm`), and stops if not.
* The directory may be writable by others: `run.lock` is never opened through a link, and a
  directory others can write is reported at start.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
import struct
import time
from pathlib import Path

from daemon import events
from daemon.ckpt.layout import LOCK_FILE
from daemon.errors import CheckpointWriteError, DirectoryInUse

_FLOCK = "hhqqi4x"  # struct flock on 64-bit Linux: l_type, l_whence, l_start, l_len, l_pid
# Set by a run handing over to its successor image (daemon/service/threads.py): its lock's descriptor.
INHERITED_VARIABLE = "TRAINER_RUN_LOCK_FD"
CONFIRM_EVERY_S = 1.0  # between the holder's looks at run.lock, besides the one before each save
# run.lock is opened without following a link and without blocking on a FIFO planted under its name.
_OPEN_FLAGS = os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


class LockLost(DirectoryInUse):
    """run.lock is no longer the file this run locked: another run may be training here."""

    event = events.RUN_LOCK_LOST


class RunLock:
    """The lock this process holds on its run directory, on the open descriptor `fd`."""

    def __init__(self, directory: Path, fd: int) -> None:
        self.directory = directory
        self.fd = fd
        self._confirmed_at = time.monotonic()

    def confirm(self) -> None:
        """Raise LockLost unless `run.lock` is still the file this process locked (a stat: cheap)."""
        self._confirmed_at = time.monotonic()
        held = os.fstat(self.fd)
        try:
            named = os.lstat(self.directory / LOCK_FILE)
        except (FileNotFoundError, NotADirectoryError):
            change = "was removed"
        else:
            if (named.st_dev, named.st_ino) == (held.st_dev, held.st_ino):
                return
            change = "was replaced by another file"
        pid = holder(self.directory)
        now = f"held now by {describe(pid)}" if pid is not None else "not held now"
        raise LockLost(
            f"{self.directory / LOCK_FILE} {change} while this run held it ({now}): another run may be "
            f"training in {self.directory}. Stopping without saving; check what else uses the directory.",
            holder_pid=pid,
        )

    def confirm_if_due(self) -> None:
        if time.monotonic() - self._confirmed_at >= CONFIRM_EVERY_S:
            self.confirm()

    def handover_descriptors(self) -> dict[str, int]:
        """What a handover keeps open through its exec: the environment variable naming each descriptor."""
        return {INHERITED_VARIABLE: self.fd}

    def release(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def acquire(directory: Path) -> RunLock:
    """Create the directory if needed and lock it for the life of this process (or adopt the lock
    a handover passed on). Raises DirectoryInUse when another run holds it, CheckpointWriteError
    when the lock file cannot be created (a read-only directory, not ours, a link or a FIFO planted
    under its name): either way before anything is trained that could not be saved."""
    path = directory / LOCK_FILE
    fd = _inherited(path)
    os.environ.pop(INHERITED_VARIABLE, None)  # no child process of this one may take it for its own
    if fd is None:
        fd = _open(path)
    else:
        os.set_inheritable(fd, False)
    _report_if_writable_by_others(directory)
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # an adopted lock: this process holds it already
    except OSError as exc:
        pid = _holder(fd)
        os.close(fd)
        if exc.errno not in (errno.EACCES, errno.EAGAIN):
            raise CheckpointWriteError(f"cannot lock {path}: {exc.strerror or exc}") from None
        raise in_use(directory, pid) from None
    return RunLock(directory, fd)


def _open(path: Path) -> int:
    directory = path.parent
    not_a_file = CheckpointWriteError(
        f"{path} is not a regular file: remove it, and check who else can write to {directory}"
    )
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | _OPEN_FLAGS, 0o600)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise CheckpointWriteError(
                f"{path} is a symbolic link, which the trainer does not follow: remove it, and check who "
                f"else can write to {directory}"
            ) from None
        if exc.errno == errno.EISDIR:
            raise not_a_file from None
        raise CheckpointWriteError(
            f"cannot create the lock file {path}: {exc.strerror or exc}; checkpoints could not be written "
            f"there either: fix permissions or choose another checkpoint.dir"
        ) from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):  # a FIFO or a device, opened without blocking
        os.close(fd)
        raise not_a_file
    return fd


def refuse_if_held(directory: Path) -> None:
    """Raise DirectoryInUse when another process holds `directory`'s lock."""
    pid = holder(directory)
    if pid is not None and pid != os.getpid():
        raise in_use(directory, pid)


def in_use(directory: Path, pid: int | None) -> DirectoryInUse:
    return DirectoryInUse(
        f"{directory} is in use by another run ({describe(pid)}); stop it first, or give this run "
        f"another checkpoint.dir",
        holder_pid=pid,
    )


def holder(directory: Path) -> int | None:
    """The PID of the run holding `directory`'s lock (0: one outside this PID namespace), or None.
    Asks the kernel without taking the lock. A process that holds it through a handover is answered
    without opening the file: closing any descriptor of the lock file drops a POSIX lock."""
    path = directory / LOCK_FILE
    if _inherited(path) is not None:
        return os.getpid()
    try:
        fd = os.open(path, os.O_RDONLY | _OPEN_FLAGS)
    except OSError:  # none, or nothing a run could have locked (a link, a directory)
        return None
    try:
        return _holder(fd) if stat.S_ISREG(os.fstat(fd).st_mode) else None
    finally:
        os.close(fd)


def _inherited(path: Path) -> int | None:
    """The descriptor of `path` that a handover passed to this image, if it names that very file.
    One that does not is left alone: it is not this directory's lock (another checkpoint.dir since)."""
    try:
        fd = int(os.environ[INHERITED_VARIABLE])
        held, named = os.fstat(fd), os.lstat(path)
    except (KeyError, ValueError, OSError):
        return None
    same = stat.S_ISREG(held.st_mode) and (held.st_dev, held.st_ino) == (named.st_dev, named.st_ino)
    return fd if same else None


def _holder(fd: int) -> int | None:
    query = struct.pack(_FLOCK, fcntl.F_WRLCK, os.SEEK_SET, 0, 0, 0)
    l_type, _, _, _, pid = struct.unpack(_FLOCK, fcntl.fcntl(fd, fcntl.F_GETLK, query))
    return None if l_type == fcntl.F_UNLCK else pid


def _report_if_writable_by_others(directory: Path) -> None:
    """Another user who can write the run directory can plant links and files under the names the
    trainer uses, or replace its checkpoints: reported, as the operator may not know."""
    st = os.stat(directory)
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH) or st.st_uid not in (0, os.geteuid()):
        events.CHECKPOINT_DIR_WRITABLE_BY_OTHERS.emit(
            path=str(directory), mode=f"{stat.S_IMODE(st.st_mode):04o}", owner_uid=st.st_uid
        )


def describe(pid: int | None) -> str:
    if pid is None:  # it let go between our attempt and our question
        return "which has just ended"
    return f"PID {pid}" if pid else "a process outside this PID namespace"
