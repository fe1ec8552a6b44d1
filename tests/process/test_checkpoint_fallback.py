"""Runs that meet bad checkpoint files: the run falls back past them and still ends exact, `status`
lists them with the resume point, a full disk exits 73 keeping what was written."""

from __future__ import annotations

import json
import os
import shutil

import pytest

from checkpoint_files import flip_byte, truncate
from trainer_proc import TrainerProcess, assert_same_training, final_checkpoint, run_to_end


def test_run_falls_back_past_bad_checkpoints_and_still_ends_exact(run_config, reference_runs):
    run_config.settings = {"checkpoint.every_steps": 10, "train.epochs": 1}
    run_to_end(run_config)
    final = max(run_config.checkpoint_dir.glob("ckpt-*-final.pt"))
    before = run_config.checkpoint_dir / "ckpt-0000000030-periodic.pt"
    truncate(final)
    flip_byte(before)

    rerun = run_to_end(run_config)

    invalid = {e["path"]: e["reason"] for e in rerun.events("checkpoint_invalid")}
    assert set(invalid) == {f"checkpoints/{final.name}", f"checkpoints/{before.name}"}
    (resumed,) = rerun.events("resumed")
    assert resumed["global_step"] == 20
    assert_same_training(final_checkpoint(run_config.checkpoint_dir), reference_runs(**{"train.epochs": 1}))


def test_status_lists_checkpoints_and_the_resume_point(run_config):
    run_config.settings = {"checkpoint.every_steps": 10, "train.epochs": 1}
    run_to_end(run_config)
    flip_byte(run_config.checkpoint_dir / "ckpt-0000000040-final.pt")

    status = TrainerProcess.start(run_config, "--json", command="status")
    assert status.wait() == 0
    report = json.loads(status.output())

    assert report["resume_from"] == "checkpoints/ckpt-0000000030-periodic.pt"
    assert report["complete"] is False
    rows = {row["global_step"]: row for row in report["checkpoints"]}
    assert rows[40]["valid"] is False and "checksum mismatch" in rows[40]["reason"]
    assert (rows[30]["epoch"], rows[30]["step_in_epoch"], rows[30]["valid"]) == (0, 30, True)


@pytest.mark.skipif(
    os.geteuid() != 0 or not shutil.which("unshare"), reason="needs root and unshare to mount a small tmpfs"
)
@pytest.mark.parametrize("async_save", [True, False])
def test_full_disk_exits_73_and_keeps_the_checkpoints_already_written(run_config, async_save):
    """The checkpoint directory is a real 12 MB tmpfs: two MLP checkpoints fit, the third does not."""
    run_config.settings = {"checkpoint.every_steps": 10, "checkpoint.async_save": async_save}
    run_config.checkpoint_dir.mkdir()
    small_disk = (
        "unshare", "--mount", "--propagation", "private", "sh", "-c",
        f"mount -t tmpfs -o size=12m tmpfs {run_config.checkpoint_dir} && exec \"$@\"", "small-disk",
    )  # fmt: skip
    process = TrainerProcess.start(run_config, wrapper=small_disk)

    assert process.wait() == 73, process.output()
    (failed,) = process.events("checkpoint_write_failed")
    assert "No space left on device" in failed["message"] and "previous checkpoints are intact" in failed["message"]
    assert "Traceback" not in process.output()
    assert [e["checkpoint_global_step"] for e in process.events("checkpoint_saved")] == [10, 20]
