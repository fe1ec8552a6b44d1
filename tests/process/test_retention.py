"""Retention beside planted files, as reported: two junk files with higher step names appear in the
directory of a run keeping 2 checkpoints. No real checkpoint may be deleted for them, and after a
`kill -9` the restart sets the junk aside and resumes the real progress, ending exact."""

from __future__ import annotations

import re
import time

from daemon.ops.child import event_time
from trainer_proc import UNTIL_STOPPED, TrainerProcess, assert_same_training, final_checkpoint, run_to_end

JUNK = ("ckpt-9999999990-periodic.pt", "ckpt-9999999991-periodic.pt")
REAL = re.compile(r"ckpt-(\d{10})-[a-z_]+\.pt$")


def test_junk_with_higher_step_names_neither_deletes_real_checkpoints_nor_loses_progress(run_config, reference_runs):
    run_config.settings = {"checkpoint.keep_last": 2, "checkpoint.every_steps": 5, "train.epochs": UNTIL_STOPPED}
    directory = run_config.checkpoint_dir
    process = TrainerProcess.start(run_config)
    try:
        process.wait_for("checkpoint_saved", checkpoint_global_step=10)
        for name in JUNK:
            (directory / name).write_text("x\n")
        planted = time.time()
        # The second save reported since was written, and pruned after, once the junk was there: a
        # save in the background is reported when the next one starts.
        since = process.wait_for("checkpoint_saved", where=lambda e: event_time(e) > planted, nth=2)
    finally:
        process.kill()  # SIGKILL
    real = sorted(int(m[1]) for path in directory.iterdir() if (m := REAL.match(path.name)) and int(m[1]) < 10**9)
    assert real and real[-1] >= since["checkpoint_global_step"], sorted(path.name for path in directory.iterdir())

    run_config.settings["train.epochs"] = 3
    rerun = run_to_end(run_config)

    assert sorted(e["path"] for e in rerun.events("checkpoint_invalid")) == [f"checkpoints/{name}" for name in JUNK]
    assert all(e["moved_to"] == e["path"] + ".invalid" for e in rerun.events("checkpoint_invalid"))
    (resumed,) = rerun.events("resumed")
    assert resumed["global_step"] == real[-1]
    assert_same_training(final_checkpoint(directory), reference_runs())
