"""Sharded runs (dist.strategy: fsdp) without ranks: the store on its own (a directory is a
checkpoint only with its commit record and while every file matches it; one that fails is set aside
and the previous one used; retention removes whole directories), and a single process refusing the
strategy. (The runs: tests/dist/test_fsdp.py.)"""

from __future__ import annotations

import os

import pytest
import torch

from checkpoint_files import make_state
from daemon.ckpt.logged_step import LoggedStep
from daemon.ckpt.resume import Resumer
from daemon.ckpt.sharded import COMMIT_RECORD, REST_FILE, ShardedState, ShardedStore, shards
from daemon.ckpt.store import CheckpointStore
from daemon.config.sections import DistConfig
from daemon.dist.agreement import Requests
from daemon.dist.group import join
from daemon.errors import ConfigError


def committed(store: ShardedStore, step: int, **more) -> os.PathLike:
    """A sharded checkpoint as the ranks leave it: their shard files, then rank 0's `save`. `more`:
    keys of its state besides make_state's."""
    weight = torch.full((4, 4), float(step))
    state = {**make_state(step), "state_dict": ShardedState("model", {"weight": weight}), **more}
    path = store.path_for(step, "periodic")
    store.prepare(path)
    for name in (".metadata", "__0_0.distcp", "__1_0.distcp"):  # stand-ins: DCP's bytes are not read here
        (path / name).write_bytes(f"{name} of step {step}".encode())
    store.save(state)
    return path


def corrupt_shard(path):
    shard = path / "__1_0.distcp"
    shard.write_bytes(shard.read_bytes().replace(b"step", b"stop"))


def truncate_shard(path):
    (path / "__0_0.distcp").write_bytes(b"")


def no_commit_record(path):
    (path / COMMIT_RECORD).unlink()


def foreign_commit_record(path):
    (path / COMMIT_RECORD).write_text('{"commit_version": 1, "global_step": 7, "kind": "periodic", "files": {}}')


def shard_removed(path):
    (path / "__0_0.distcp").unlink()


DAMAGE = {
    corrupt_shard: "__1_0.distcp: its SHA-256",
    truncate_shard: "__0_0.distcp: 0 bytes",
    no_commit_record: "missing: the checkpoint was never completely written",
    foreign_commit_record: "its step and kind are not those",
    shard_removed: "__0_0.distcp: missing",
}


@pytest.mark.parametrize("damage", DAMAGE, ids=lambda f: f.__name__)
def test_a_damaged_directory_is_set_aside_and_the_previous_one_used(tmp_path, damage):
    store = ShardedStore(tmp_path, keep_last=5)
    committed(store, 1)
    newest = committed(store, 2)
    damage(newest)
    reported = []

    entry = store.newest_valid(on_invalid=lambda bad, aside: reported.append((bad, aside)))

    assert entry.global_step == 1
    assert entry.state["state_dict"] == {"weight": [[4, 4], "torch.float32"]}  # the layout, the tensors in the shards
    ((bad, aside),) = reported
    assert bad.path == newest and DAMAGE[damage] in bad.reason, bad.reason
    assert aside.name == newest.name + ".invalid" and aside.is_dir() and not newest.exists()


def test_the_commit_record_names_every_file_and_retention_removes_whole_directories(tmp_path):
    store = ShardedStore(tmp_path, keep_last=2)
    paths = [committed(store, step) for step in (1, 2, 3)]
    assert {REST_FILE, ".metadata", "__0_0.distcp", "__1_0.distcp"} == {
        name for name in os.listdir(paths[-1]) if name != COMMIT_RECORD
    }

    store.prune()

    assert not paths[0].exists() and paths[1].is_dir() and paths[2].is_dir()
    assert [entry.global_step for entry in store.scan()] == [3, 2]


def test_only_sharded_pieces_go_to_the_shards():
    state = {"state_dict": ShardedState("model", {"w": 1}), "optimizer": ShardedState("optimizer", {}), "epoch": 0}
    assert shards(state) == {"model": {"w": 1}, "optimizer": {}}


def test_a_link_planted_under_a_checkpoints_name_is_replaced_not_followed(tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    store = ShardedStore(tmp_path / "run", keep_last=5)
    store.directory.mkdir()
    store.path_for(1, "periodic").symlink_to(elsewhere)

    path = committed(store, 1)

    assert path.is_dir() and not path.is_symlink() and not list(elsewhere.iterdir())
    assert store.newest_valid(on_invalid=lambda bad, aside: None).global_step == 1


def test_a_single_process_refuses_to_shard(monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    with pytest.raises(ConfigError, match="dist.strategy: fsdp shards the model over several ranks"):
        join(DistConfig(strategy="fsdp"), torch.device("cpu"), Requests)


def resumer(store):
    return Resumer(store, LoggedStep(store.directory), settings={}, fingerprint="f", cpu_threads_setting=None,
                   world_size=2)  # fmt: skip


def resume(store):
    return resumer(store).resume(
        schema=None, load=lambda state: None, position=dict
    )  # no checkpoint of its own to check


@pytest.mark.parametrize("sharded", [True, False], ids=["fsdp over ddp's", "ddp over fsdp's"])
def test_a_changed_strategy_is_refused_rather_than_starting_afresh_beside_the_other_checkpoints(tmp_path, sharded):
    files, directories = CheckpointStore(tmp_path, keep_last=5), ShardedStore(tmp_path, keep_last=5)
    this, other = ("fsdp", "ddp") if sharded else ("ddp", "fsdp")
    if sharded:
        files.save(make_state(3))
    else:
        committed(directories, 3)

    with pytest.raises(ConfigError) as refused:
        resume(directories if sharded else files)

    message = str(refused.value)
    assert f"dist.strategy: {other} (ckpt-0000000003-periodic" in message, message
    assert f"none of dist.strategy: {this}" in message and f"Set dist.strategy back to {other}" in message
    assert "point checkpoint.dir elsewhere" in message and refused.value.exit_code == 78


def test_what_only_looks_like_the_other_strategys_checkpoints_is_no_reason_to_refuse(tmp_path):
    """A directory never committed, and a link under a checkpoint file's name, hold no checkpoint."""
    files, directories = CheckpointStore(tmp_path, keep_last=5), ShardedStore(tmp_path, keep_last=5)
    no_commit_record(committed(directories, 4))
    (tmp_path / "ckpt-0000000004-periodic.pt").symlink_to(tmp_path / "elsewhere.pt")

    assert resume(files) is None and resume(directories) is None  # a fresh start, each
