"""The crash-loop guard, called directly on a real directory: crashes without progress are
counted and the start after `limit` of them is refused; preemptions and progress never are."""

from __future__ import annotations

from pathlib import Path

import pytest

from daemon.ckpt.crashloop import CRASH_LIMIT, CrashLoopGuard
from daemon.ckpt.layout import CRASH_RECORD_FILE as RECORD_FILE
from daemon.ckpt.layout import SHARDED_COMMIT_FILE
from daemon.errors import CheckpointWriteError, CrashLoop, ExitCode


def crash(directory: Path) -> None:
    """A run that dies without an orderly exit (SIGKILL, OOM kill): entered, never left."""
    CrashLoopGuard(directory).__enter__()


def checkpoint(directory: Path, step: int) -> None:
    (directory / f"ckpt-{step:010d}-periodic.pt").write_bytes(b"")


@pytest.mark.parametrize("committed", [True, False], ids=["committed", "without its commit record"])
def test_a_sharded_checkpoint_is_progress_once_committed(tmp_path: Path, committed: bool) -> None:
    for _ in range(CRASH_LIMIT - 1):
        crash(tmp_path)
    sharded = tmp_path / f"ckpt-{10:010d}-periodic.dcp"  # the last crashed run saved one before it died
    sharded.mkdir()
    if committed:
        (sharded / SHARDED_COMMIT_FILE).write_text("{}")
    crash(tmp_path)
    if committed:
        crash(tmp_path)  # the count started again at the checkpoint
    else:
        with pytest.raises(CrashLoop, match="since the first start"):
            crash(tmp_path)


def test_the_start_after_the_limit_of_crashes_is_refused_once(tmp_path: Path) -> None:
    for _ in range(CRASH_LIMIT):
        crash(tmp_path)
    with pytest.raises(CrashLoop) as refused:
        crash(tmp_path)
    assert refused.value.exit_code == ExitCode.CRASH_LOOP == 70
    assert f"{CRASH_LIMIT} crashes in a row since the first start" in str(refused.value)
    # The refusal forgets the crashes: the next start (by a person) gets `limit` more tries.
    for _ in range(CRASH_LIMIT):
        crash(tmp_path)
    with pytest.raises(CrashLoop):
        crash(tmp_path)


def test_a_new_checkpoint_starts_the_count_again(tmp_path: Path) -> None:
    for step in range(1, 4 * CRASH_LIMIT):
        crash(tmp_path)
        if step % (CRASH_LIMIT - 1) == 0:
            checkpoint(tmp_path, step)  # the crashed run saved before it died
    checkpoint(tmp_path, 1)  # an older checkpoint appearing is no progress
    crash(tmp_path)
    with pytest.raises(CrashLoop, match=f"since checkpoint ckpt-{16:010d}-periodic.pt"):
        crash(tmp_path)


def test_orderly_exits_are_not_crashes(tmp_path: Path) -> None:
    """Preemptions (exit 75) and documented errors, any number of them, without progress."""
    for _ in range(3 * CRASH_LIMIT):
        with CrashLoopGuard(tmp_path):
            pass
        with pytest.raises(CheckpointWriteError), CrashLoopGuard(tmp_path):
            raise CheckpointWriteError("disk full")
    # ... but an exception that escapes is a crash, as is a run that never exits.
    for _ in range(CRASH_LIMIT - 1):
        with pytest.raises(RuntimeError), CrashLoopGuard(tmp_path):
            raise RuntimeError("crash")
    crash(tmp_path)
    with pytest.raises(CrashLoop):
        crash(tmp_path)


@pytest.mark.parametrize("content", ["", "{", "[]", '{"crashes": -1}', '{"crashes": "5"}', '{"other": 1}'])
def test_an_unreadable_record_is_no_crash(tmp_path: Path, content: str) -> None:
    (tmp_path / RECORD_FILE).write_text(content)
    for _ in range(CRASH_LIMIT):
        crash(tmp_path)
    with pytest.raises(CrashLoop):
        crash(tmp_path)


def test_a_directory_that_cannot_be_written_disables_the_guard(tmp_path: Path) -> None:
    not_a_directory = tmp_path / "file"
    not_a_directory.write_text("")
    for directory in (not_a_directory, not_a_directory / "below"):
        for _ in range(2 * CRASH_LIMIT):
            crash(directory)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]
