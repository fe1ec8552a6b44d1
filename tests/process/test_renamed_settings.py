"""A checkpoint written before a setting's value was renamed (the built-in task's entry moved into
daemon/builtin/) resumes: the daemon reads the old name as the new one."""

from __future__ import annotations

import torch

from daemon.config.exactness import RENAMED_VALUES, exactness_fingerprint
from trainer_proc import TrainerProcess, final_checkpoint, run_to_end


def test_a_checkpoint_naming_the_built_in_task_by_its_old_entry_resumes(run_config):
    run_config.settings = {"train.epochs": 1}
    run_to_end(run_config)
    (path,) = run_config.checkpoint_dir.glob("ckpt-*-final.pt")
    state = final_checkpoint(run_config.checkpoint_dir)
    ((key, old_name),) = [pair for pair, new in RENAMED_VALUES.items() if new == state["config"]["task.entry"]]
    state["config"][key] = old_name  # as the daemon of the previous layout wrote it
    state["fingerprint"] = exactness_fingerprint(state["config"])
    torch.save(state, path)

    run_config.settings = {"train.epochs": 2}
    process = TrainerProcess.start(run_config)
    assert process.wait() == 0, process.output()
    (resumed,) = process.events("resumed")
    assert resumed["kind"] == "final" and resumed["epoch"] == 1, resumed
    assert not process.events("checkpoint_incompatible")
    assert final_checkpoint(run_config.checkpoint_dir)["epoch"] == 2


def test_a_checkpoint_of_another_task_is_still_refused(run_config):
    run_config.settings = {"train.epochs": 1}
    run_to_end(run_config)
    (path,) = run_config.checkpoint_dir.glob("ckpt-*-final.pt")
    state = final_checkpoint(run_config.checkpoint_dir)
    state["config"]["task.entry"] = "someone.else:build"
    state["fingerprint"] = exactness_fingerprint(state["config"])
    torch.save(state, path)

    run_config.settings = {"train.epochs": 2}
    process = TrainerProcess.start(run_config)
    assert process.wait() == 78, process.output()
    (refused,) = process.events("checkpoint_incompatible")
    assert "task.entry" in refused["message"]
