"""Files planted under checkpoint names beside a run's checkpoints: symbolic links (a loop, a dangling
one, one to a real checkpoint) and a 1 TiB sparse zip64 whose directory claims more than the file
holds. `trainer status` lists each as invalid with its reason, and a run falls back past them to
the newest real checkpoint and ends exact; neither reads the sparse file (reading it would take far
longer than the silence a wait allows)."""

from __future__ import annotations

import json

import pytest

from daemon.ckpt.store import A_LINK
from forged_archives import TIB, sparse_zip64
from trainer_proc import RunConfig, TrainerProcess, assert_same_training, final_checkpoint, run_to_end

LAST_REAL_STEP = 20
LOOP, DANGLING, INWARD, SPARSE = (f"ckpt-00000000{step}-periodic.pt" for step in (24, 23, 22, 21))


@pytest.fixture
def planted(run_config: RunConfig) -> RunConfig:
    """A run stopped by train.max_steps at step 20, and the planted files at steps 21 to 24."""
    run_config.settings = {"checkpoint.every_steps": 10, "train.epochs": 1, "train.max_steps": LAST_REAL_STEP}
    run_to_end(run_config)
    directory = run_config.checkpoint_dir
    (directory / LOOP).symlink_to(LOOP)
    (directory / DANGLING).symlink_to("ckpt-0000000099-periodic.pt")
    (directory / INWARD).symlink_to(f"ckpt-00000000{LAST_REAL_STEP}-final.pt")
    sparse_zip64(directory / SPARSE, TIB, claims=2 * TIB)
    return run_config


def test_status_lists_links_and_a_sparse_archive_as_invalid(planted):
    process = TrainerProcess.start(planted, "--json", command="status")

    assert process.wait() == 0, process.output()
    report = json.loads(process.output())
    rows = {row["path"].removeprefix("checkpoints/"): (row["valid"], row["reason"]) for row in report["checkpoints"]}
    assert [rows[name] for name in (LOOP, DANGLING, INWARD)] == [(False, A_LINK)] * 3
    assert rows[SPARSE][0] is False and "more than the file holds" in rows[SPARSE][1]
    assert report["resume_from"] == f"checkpoints/ckpt-00000000{LAST_REAL_STEP}-final.pt"

    shown = TrainerProcess.start(planted, command="status")
    assert shown.wait() == 0, shown.output()
    assert shown.output().count(f"INVALID: {A_LINK}") == 3 and "Traceback" not in shown.output()


def test_run_falls_back_past_links_and_a_sparse_archive_and_ends_exact(planted, reference_runs):
    planted.settings["train.max_steps"] = None

    rerun = run_to_end(planted)

    reported = [
        (e["path"].removeprefix("checkpoints/"), e["reason"], e["moved_to"]) for e in rerun.events("checkpoint_invalid")
    ]
    assert reported[:3] == [(LOOP, A_LINK, None), (DANGLING, A_LINK, None), (INWARD, A_LINK, None)]
    ((sparse, reason, moved_to),) = reported[3:]
    assert sparse == SPARSE and "more than the file holds" in reason and moved_to == f"checkpoints/{SPARSE}.invalid"
    (resumed,) = rerun.events("resumed")
    assert resumed["global_step"] == LAST_REAL_STEP
    assert all((planted.checkpoint_dir / name).is_symlink() for name in (LOOP, DANGLING, INWARD))
    assert_same_training(final_checkpoint(planted.checkpoint_dir), reference_runs(**{"train.epochs": 1}))
