"""The store: every kind of bad file is skipped with its reason and the previous good one is used.
(The runs that meet such files: tests/process/test_checkpoint_fallback.py.)"""

from __future__ import annotations

import stat

import pytest
import torch

from checkpoint_files import (
    empty,
    flip_byte,
    garbage,
    make_state,
    pickled_object,
    seed_recipe_file,
    truncate,
    wrong_version,
)
from daemon.ckpt.schema import InvalidCheckpoint
from daemon.ckpt.store import CheckpointStore, read_checkpoint
from daemon.ckpt.writer import BackgroundWriter

CORRUPTIONS = {
    truncate: "incomplete or not a checkpoint archive",
    flip_byte: "checksum mismatch in record",
    empty: "incomplete or not a checkpoint archive",
    garbage: "incomplete or not a checkpoint archive",
    seed_recipe_file: "not a trainer checkpoint",
    wrong_version: "format version 99",
    pickled_object: "refused by weights-only loading",
}


@pytest.mark.parametrize("corrupt", CORRUPTIONS, ids=lambda f: f.__name__)
def test_bad_newest_file_is_set_aside_and_the_previous_one_used(tmp_path, corrupt):
    store = CheckpointStore(tmp_path, keep_last=5)
    store.save(make_state(1))
    newest = store.save(make_state(2)).path
    corrupt(newest)
    reported = []

    entry = store.newest_valid(on_invalid=lambda bad, aside: reported.append((bad, aside)))

    assert entry.global_step == 1 and torch.equal(entry.state["state_dict"]["weight"], torch.full((256, 256), 1.0))
    ((bad, aside),) = reported
    assert bad.path == newest and CORRUPTIONS[corrupt] in bad.reason, bad.reason
    assert aside.name == newest.name + ".invalid" and aside.exists() and not newest.exists()
    assert not (tmp_path / "exploited").exists()


def test_pickled_object_is_never_executed(tmp_path):
    path = tmp_path / "ckpt-0000000002-periodic.pt"
    pickled_object(path)

    with pytest.raises(InvalidCheckpoint, match="weights-only"):
        read_checkpoint(path)

    assert not (tmp_path / "exploited").exists()


def test_no_valid_checkpoint_means_a_fresh_start(tmp_path):
    store = CheckpointStore(tmp_path, keep_last=5)
    garbage(store.path_for(5, "periodic"))

    assert store.newest_valid(on_invalid=lambda *_: None) is None


def test_retention_keeps_the_newest(tmp_path):
    store = CheckpointStore(tmp_path, keep_last=2)
    for step in range(1, 6):
        store.save(make_state(step))
        store.prune()

    assert sorted(p.name for p in tmp_path.glob("ckpt-*")) == [
        "ckpt-0000000004-periodic.pt",
        "ckpt-0000000005-periodic.pt",
    ]


def test_background_writer_applies_retention(tmp_path):
    writer = BackgroundWriter(CheckpointStore(tmp_path, keep_last=2))
    for step in range(1, 5):
        writer.submit(make_state(step))
    writer.close()

    assert sorted(p.name for p in tmp_path.glob("ckpt-*")) == [
        "ckpt-0000000003-periodic.pt",
        "ckpt-0000000004-periodic.pt",
    ]


def test_checkpoints_are_private_and_leave_no_temp_files(tmp_path):
    store = CheckpointStore(tmp_path / "ckpt", keep_last=2)
    path = store.save(make_state(1)).path

    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert [p.name for p in path.parent.iterdir()] == [path.name]


def test_temp_files_of_a_killed_writer_are_removed(tmp_path):
    store = CheckpointStore(tmp_path, keep_last=2)
    (tmp_path / ".tmp-ckpt-0000000007-periodic.pt.1234").write_bytes(b"half")

    removed = store.remove_temp_files()

    assert [p.name for p in removed] == [".tmp-ckpt-0000000007-periodic.pt.1234"]
    assert not list(tmp_path.iterdir())
