"""A disk that fills up under a run: the checkpoint save that fails says so and exits 73; the metrics
history, which fails first, is reported once and never replaces that exit code (a real small tmpfs,
filled by dd, as root)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from daemon.errors import ExitCode
from trainer_proc import UNTIL_STOPPED, TrainerProcess

# 200 steps an epoch: a history line each step fills the history's last page long before the next
# epoch's save, so the history's write fails first, as it does on a real disk.
SETTINGS = {"log.metrics_every_steps": 1, "checkpoint.every_seconds": 0, "data.train_subset": 20000,
            "train.epochs": UNTIL_STOPPED}  # fmt: skip


@pytest.fixture
def small_disk(tmp_path) -> Path:
    mount = tmp_path / "small"
    mount.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(mount)], capture_output=True, text=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root and CAP_SYS_ADMIN): {mounted.stderr.strip()}")
    try:
        yield mount
    finally:
        TrainerProcess.kill_leftovers()  # no file of the run may keep the mount busy
        subprocess.run(["umount", str(mount)], check=True)


def test_a_full_disk_at_a_save_exits_73_with_checkpoint_write_failed(run_config, small_disk):
    run_config.settings = {**SETTINGS, "checkpoint.dir": str(small_disk / "checkpoints")}
    process = TrainerProcess.start(run_config)
    process.wait_for("checkpoint_saved")
    subprocess.run(["dd", "if=/dev/zero", f"of={small_disk / 'fill'}", "bs=1M"], capture_output=True)  # until ENOSPC
    assert os.statvfs(small_disk).f_bavail == 0

    assert process.wait() == ExitCode.CANT_WRITE, process.output()
    (failed,) = process.events("checkpoint_write_failed")
    assert "No space left on device" in failed["message"]
    (unavailable,) = process.events("metrics_history_unavailable")  # once, however many lines followed
    assert unavailable["reason"] == "No space left on device"
    assert not process.events("crashed") and "Traceback" not in process.output()
