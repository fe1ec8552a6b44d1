"""`dist.strategy: fsdp` on 2 ranks started by `trainer run`: the model and the optimizer's state
sharded (FSDP2), each checkpoint a directory every rank writes its shard to, committed by rank 0's
record last; a stop of one rank still stops both at one step, the resume is bitwise exact, and a
directory without its record or with a damaged shard is set aside for the previous checkpoint."""

from __future__ import annotations

import json
import shutil
import signal
from collections import Counter
from pathlib import Path

import pytest
import torch
from test_dist import signal_a_rank
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from daemon.ckpt.sharded import COMMIT_RECORD, read_sharded
from trainer_proc import DIST_SETTINGS, NOT_BUILTIN, RunConfig, TrainerProcess, assert_same_training, run_to_end

# 20 steps an epoch (DIST_SETTINGS), 2 epochs: a save every 5 steps.
SHARDED = {**DIST_SETTINGS, "train.epochs": 2, "dist.nproc_per_node": 2, "dist.strategy": "fsdp"}


def sharded_checkpoint(directory: Path, scratch: Path) -> dict:
    """A sharded checkpoint as one state: `state.pt`'s content, and the model's and the optimizer's
    shards joined into whole tensors (under `shards`)."""
    state, _ = read_sharded(directory)
    whole = scratch / f"{directory.name}.pt"
    dcp_to_torch_save(directory, whole)
    return {**state, "shards": torch.load(whole, weights_only=True)}


def final_sharded(run_config: RunConfig) -> dict:
    newest = max(run_config.checkpoint_dir.glob("ckpt-*-final.dcp"))  # names sort by global step
    return sharded_checkpoint(newest, run_config.workdir)


@pytest.fixture(scope="module")
def unbroken_run(mnist_root, tmp_path_factory) -> RunConfig:
    config = RunConfig(workdir=tmp_path_factory.mktemp("unbroken"), data_root=mnist_root, settings=SHARDED)
    run_to_end(config)
    return config


@pytest.fixture(scope="module")
def unbroken(unbroken_run) -> dict:
    return final_sharded(unbroken_run)


def test_sigterm_to_one_rank_stops_both_at_one_step_and_the_resume_is_exact(run_config, unbroken):
    run_config.settings = SHARDED
    process = TrainerProcess.start(run_config)
    pids = process.wait_for("ranks_started")["pids"]
    signal_a_rank(process, pids, pids[1], signal.SIGTERM, at_step=10, expect=75)
    stopped = process.events("stopped")
    assert sorted(e["rank"] for e in stopped) == [0, 1] and len({e["global_step"] for e in stopped}) == 1, stopped
    step = stopped[0]["global_step"]
    (saved,) = [e for e in process.events("checkpoint_saved") if e["checkpoint_global_step"] == step and e["rank"] == 0]
    assert saved["kind"] == ("epoch" if process.events("checkpoint_skipped") else "emergency") and 10 < step < 40
    # Every rank wrote its shard; rank 0's commit record names them with the rest.
    committed = json.loads((run_config.checkpoint_dir / Path(saved["path"]).name / COMMIT_RECORD).read_text())
    assert {"__0_0.distcp", "__1_0.distcp", ".metadata", "state.pt"} <= committed["files"].keys()

    resumed = run_to_end(run_config)

    assert [(e["rank"], e["global_step"]) for e in resumed.events("resumed")] == [(0, step)]
    assert_same_training(final_sharded(run_config), unbroken)


def test_a_missing_commit_record_and_a_damaged_shard_fall_back_to_the_previous_checkpoint(
    run_config, unbroken_run, unbroken
):
    """The unbroken run's first three checkpoints, the newest two damaged: the run resumes from the oldest."""
    checkpoints = [run_config.checkpoint_dir / f"ckpt-{step:010d}-periodic.dcp" for step in (5, 10, 15)]
    for path in checkpoints:
        shutil.copytree(unbroken_run.checkpoint_dir / path.name, path)
    (checkpoints[-1] / COMMIT_RECORD).unlink()  # as if killed before rank 0 committed it
    shard = checkpoints[-2] / "__1_0.distcp"
    damaged = bytearray(shard.read_bytes())
    damaged[len(damaged) // 2] ^= 0x01  # one bit of rank 1's shard
    shard.write_bytes(damaged)

    run_config.settings = SHARDED
    resumed = run_to_end(run_config)

    invalid = resumed.events("checkpoint_invalid", rank=0)
    assert [(Path(e["path"]).name, Path(e["moved_to"]).name) for e in invalid] == [
        (path.name, path.name + ".invalid") for path in (checkpoints[-1], checkpoints[-2])
    ], invalid
    assert "missing" in invalid[0]["reason"] and "__1_0.distcp" in invalid[1]["reason"], invalid
    assert [e["global_step"] for e in resumed.events("resumed")] == [5]
    assert_same_training(final_sharded(run_config), unbroken)


SAMPLE_LOG_TASK = Path(__file__).resolve().parent.parent / "sample_log_task.py"


def test_a_resume_on_three_ranks_reshards_and_the_epoch_in_flight_trains_every_sample_once(run_config):
    """2 ranks stopped mid-epoch, resumed by 3: each sample of the epoch is trained exactly once, by
    the ranks of one run or of the other, as the task's own record of its batches says."""
    record_dir = run_config.workdir / "trained"
    record_dir.mkdir()
    samples, batch_size = 640, 16  # 40 steps: the stop lands mid-epoch on any machine
    run_config.settings = {
        **NOT_BUILTIN,
        "task.entry": f"{SAMPLE_LOG_TASK}:build",
        "task.options": {"record_dir": str(record_dir), "samples": samples},
        "train.epochs": 1,
        "train.batch_size": batch_size,
        "checkpoint.every_steps": 5,
        "dist.nproc_per_node": 2,
        "dist.strategy": "fsdp",
    }
    process = TrainerProcess.start(run_config)
    pids = process.wait_for("ranks_started")["pids"]
    signal_a_rank(process, pids, pids[1], signal.SIGTERM, at_step=5, expect=75)
    step = process.events("stopped")[0]["global_step"]
    assert 5 < step < samples // batch_size, step

    run_config.settings.update({"dist.nproc_per_node": 3, "checkpoint.every_steps": 0})  # the final save only
    resumed = run_to_end(run_config)

    assert [(e["world_size_before"], e["world_size"], e["global_step"]) for e in resumed.events("resharded")] == [
        (2, 3, step)
    ]
    assert sorted(e["rank"] for e in resumed.events("training_completed")) == [0, 1, 2]
    logs = sorted(log.name for log in record_dir.iterdir())
    assert logs == ["2-ranks.rank-0", "2-ranks.rank-1", "3-ranks.rank-0", "3-ranks.rank-1", "3-ranks.rank-2"], logs
    trained = Counter(int(index) for log in record_dir.iterdir() for index in log.read_text().split())
    assert trained.keys() == set(range(samples)) and set(trained.values()) == {1}, trained.most_common(3)
    final = final_sharded(run_config)
    assert (final["world_size"], final["epoch"], final["global_step"]) == (3, 1, samples // batch_size)


def test_a_changed_strategy_is_refused_before_training(run_config):
    """A ddp run (one process) over a directory that holds only a committed sharded checkpoint."""
    planted = run_config.checkpoint_dir / "ckpt-0000000005-periodic.dcp"
    planted.mkdir(parents=True)
    (planted / COMMIT_RECORD).write_text("{}")  # looked at, never read
    run_config.settings = DIST_SETTINGS
    process = TrainerProcess.start(run_config)

    assert process.wait() == 78, process.output()
    (refused,) = process.events("config_error")
    assert "dist.strategy: fsdp (ckpt-0000000005-periodic.dcp) and none of dist.strategy: ddp" in refused["message"]
    assert not process.events("fresh_start") and not process.events("epoch_started") and planted.is_dir()
