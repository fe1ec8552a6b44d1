"""The crash-loop guard on hostile ground, called directly on real directories: a start beside a
run that holds the directory (a real process) counts nothing and changes nothing; a directory or a
link named like a checkpoint is no progress; a record that is not one (a link, a loop, nested past
the parser's depth, not a record) is set aside with a warning and means "unknown". The FIFO, which
would hang a reader, is met by a real run: tests/process/test_run_lock_hardening.py."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from daemon.ckpt.crashloop import CRASH_LIMIT, CrashLoopGuard
from daemon.ckpt.layout import CRASH_RECORD_FILE
from daemon.errors import CrashLoop, DirectoryInUse, ExitCode

# A run past the guard and holding the directory's lock, as `trainer run` is once it has assembled.
HOLDER = """
import sys
from pathlib import Path
from daemon.ckpt import lock
from daemon.ckpt.crashloop import CrashLoopGuard

directory = Path(sys.argv[1])
CrashLoopGuard(directory).__enter__()
held = lock.acquire(directory)
print("holding", flush=True)
sys.stdin.read()
"""


def crash(directory: Path) -> None:
    """A run that dies without an orderly exit (SIGKILL, OOM kill): entered, never left."""
    CrashLoopGuard(directory).__enter__()


def checkpoint(directory: Path, step: int) -> None:
    (directory / f"ckpt-{step:010d}-periodic.pt").write_bytes(b"")


@contextlib.contextmanager
def holding(directory: Path) -> Iterator[subprocess.Popen]:
    """A real process that started in `directory` and holds it; SIGKILLed at the latest on leaving."""
    process = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(directory)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert process.stdout is not None
        for line in process.stdout:
            if line.strip() == "holding":
                break
        else:
            pytest.fail(f"the holder exited with {process.wait()} before it held the directory")
        yield process
    finally:
        process.kill()
        process.wait()


def test_a_start_beside_the_running_fifth_attempt_exits_69_and_its_later_kill_is_counted(tmp_path):
    for _ in range(CRASH_LIMIT - 1):
        crash(tmp_path)
    with holding(tmp_path) as fifth:
        record = (tmp_path / CRASH_RECORD_FILE).read_bytes()  # the running fifth attempt's

        with pytest.raises(DirectoryInUse) as refused:
            crash(tmp_path)

        assert refused.value.exit_code == ExitCode.IN_USE == 69 and refused.value.fields["holder_pid"] == fifth.pid
        assert (tmp_path / CRASH_RECORD_FILE).read_bytes() == record, "a refused start changed the record"
        fifth.send_signal(signal.SIGKILL)
        fifth.wait()
    with pytest.raises(CrashLoop, match=f"{CRASH_LIMIT} crashes in a row"):  # the fifth attempt's death counted
        crash(tmp_path)


def test_a_directory_or_link_named_like_a_checkpoint_hides_no_progress(tmp_path):
    (tmp_path / "ckpt-9999999999-periodic.pt").mkdir()
    (tmp_path / "elsewhere").write_bytes(b"")
    (tmp_path / "ckpt-9999999998-periodic.pt").symlink_to(tmp_path / "elsewhere")
    for step in range(1, 3 * CRASH_LIMIT):
        crash(tmp_path)
        checkpoint(tmp_path, step)  # each crashed run saved before it died: never a crash loop
    for _ in range(CRASH_LIMIT - 1):  # ... until they stop saving
        crash(tmp_path)
    with pytest.raises(CrashLoop, match=f"since checkpoint ckpt-{3 * CRASH_LIMIT - 1:010d}-periodic.pt"):
        crash(tmp_path)


def nested(depth: int) -> str:
    return "[" * depth + "]" * depth


def symlink_loop(path: Path) -> None:
    path.symlink_to(path.name)


BAD_RECORDS = {
    "nested 200,000 deep": lambda path: path.write_text(nested(200_000)),
    "nested 20,000 deep, within the size bound": lambda path: path.write_text(nested(20_000)),
    "a symbolic link loop": symlink_loop,
    "a link to a record elsewhere": lambda path: path.symlink_to(path.with_name("elsewhere.json")),
    "a directory": lambda path: path.mkdir(),
    "not a record": lambda path: path.write_text('{"crashes": "5"}'),
}


@pytest.mark.parametrize("make", BAD_RECORDS.values(), ids=BAD_RECORDS.keys())
def test_a_bad_record_is_set_aside_with_a_warning_and_means_no_crash_is_known(tmp_path, make):
    # A record of CRASH_LIMIT - 1 crashes, were the link followed: the next start would be refused.
    (tmp_path / "elsewhere.json").write_text(f'{{"crashes": {CRASH_LIMIT - 1}, "running": true}}')
    path = tmp_path / CRASH_RECORD_FILE
    make(path)

    with capture_logs() as logged:
        crash(tmp_path)

    (warning,) = [entry for entry in logged if entry["event"] == "advisory_file_invalid"]
    assert warning["log_level"] == "warning" and warning["path"] == str(path)
    assert warning["moved_to"] == str(path) + ".invalid" and os.path.lexists(warning["moved_to"])
    assert (tmp_path / "elsewhere.json").read_text().startswith(f'{{"crashes": {CRASH_LIMIT - 1}')
    for _ in range(CRASH_LIMIT - 1):  # counted from the new record on: no crash was known before it
        crash(tmp_path)
    with pytest.raises(CrashLoop):
        crash(tmp_path)
