"""A checkpoint directory that cannot be written (a real read-only bind mount): exit 73 with
`checkpoint_write_failed` and the original error, whatever the directory holds; nothing changes."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from trainer_proc import RunConfig, TrainerProcess, run_to_end

TESTS = Path(__file__).resolve().parents[1]  # checkpoint_files.py, for a child process

CANT_WRITE = 73


def read_only(directory) -> tuple[str, ...]:
    """A wrapper command: the rest of the command line runs with `directory` mounted read-only."""
    script = 'mount --bind "$0" "$0" && mount -o remount,bind,ro "$0" && exec "$@"'
    return ("unshare", "--mount", "--propagation", "private", "sh", "-c", script, str(directory))


@pytest.fixture(scope="module")
def can_mount(tmp_path_factory) -> None:
    if os.geteuid() != 0 or not shutil.which("unshare"):
        pytest.skip("needs root and unshare to bind-mount a directory read-only")
    probe = tmp_path_factory.mktemp("probe")
    result = subprocess.run([*read_only(probe), "touch", str(probe / "x")], capture_output=True, text=True)
    if "Read-only file system" not in result.stderr:
        pytest.skip(f"cannot bind-mount a directory read-only here: {result.stderr.strip()}")


@pytest.fixture(scope="module")
def previous_run(mnist_root, tmp_path_factory, can_mount) -> RunConfig:
    config = RunConfig(
        tmp_path_factory.mktemp("previous"), mnist_root, {"train.epochs": 1, "checkpoint.every_steps": 10}
    )
    run_to_end(config)
    return config


def _copy_unfinished(previous: RunConfig, directory) -> None:
    shutil.copytree(previous.checkpoint_dir, directory, ignore=shutil.ignore_patterns("*-final.pt"))


def _corrupt_newest(previous: RunConfig, directory) -> None:
    _copy_unfinished(previous, directory)
    newest = max(directory.glob("ckpt-*.pt"))
    newest.write_bytes(newest.read_bytes()[:1000])


SETUPS = {
    "empty": lambda previous, directory: directory.mkdir(),
    "a run to resume": _copy_unfinished,
    "a temporary file left by a killed writer": lambda previous, directory: (
        directory.mkdir(), (directory / ".tmp-ckpt-0000000007-periodic.pt.4242").write_bytes(b"half")),
    "a corrupt checkpoint to set aside": _corrupt_newest,
}  # fmt: skip


@pytest.mark.parametrize("setup", SETUPS)
def test_read_only_directory_exits_73_with_the_original_error(run_config, previous_run, setup):
    run_config.settings = previous_run.settings
    SETUPS[setup](previous_run, run_config.checkpoint_dir)
    before = sorted((p.name, p.stat().st_size) for p in run_config.checkpoint_dir.iterdir())

    process = TrainerProcess.start(run_config, wrapper=read_only(run_config.checkpoint_dir))

    assert process.wait() == CANT_WRITE, process.output()
    (failed,) = process.events("checkpoint_write_failed")
    assert "Read-only file system" in failed["message"], failed["message"]
    assert not process.events("crashed") and "Traceback" not in process.output()
    assert sorted((p.name, p.stat().st_size) for p in run_config.checkpoint_dir.iterdir()) == before


def test_store_reports_the_original_error_not_the_clean_up_one(tmp_path, can_mount):
    """Past the run's lock (a directory remounted read-only mid-run): each write path of the store
    reports the write that failed, not the clean-up that failed after it."""
    (tmp_path / ".tmp-ckpt-0000000003-periodic.pt.4242").write_bytes(b"half")
    (tmp_path / "ckpt-0000000002-periodic.pt").write_bytes(b"corrupt")
    script = textwrap.dedent(f"""
        import json, sys
        from pathlib import Path
        sys.path.insert(0, {str(TESTS)!r})
        from daemon.ckpt.store import CheckpointStore
        from daemon.errors import CheckpointWriteError
        from daemon.ckpt.logged_step import LoggedStep
        from checkpoint_files import make_state
        store = CheckpointStore(Path({str(tmp_path)!r}), keep_last=1)
        results = {{}}
        for name, attempt in {{
            "save": lambda: store.save(make_state(5)),
            "remove_temp_files": store.remove_temp_files,
            "newest_valid": lambda: store.newest_valid(on_invalid=lambda *_: None),
            "mark_logged_step": lambda: LoggedStep(store.directory).mark(5),
        }}.items():
            try:
                attempt()
                results[name] = None
            except CheckpointWriteError as exc:
                results[name] = str(exc)
        print(json.dumps(results))
    """)
    result = subprocess.run([*read_only(tmp_path), sys.executable, "-c", script], capture_output=True, text=True)

    assert result.returncode == 0, result.stderr
    results = json.loads(result.stdout)
    assert results["save"].startswith("cannot write checkpoint") and "Read-only file system" in results["save"]
    assert results["remove_temp_files"].startswith("cannot remove temporary file")
    assert results["newest_valid"].startswith("cannot set aside invalid checkpoint")
    assert "Read-only file system" in results["newest_valid"]
    assert results["mark_logged_step"] is None  # advisory: skipped
