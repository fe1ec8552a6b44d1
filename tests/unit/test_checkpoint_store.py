"""The store: every kind of bad file is skipped with its reason and the previous good one is used."""

from __future__ import annotations

import json
import os
import shutil
import stat

import pytest
import torch

from daemon.ckpt.store import BackgroundWriter, CheckpointStore, read_checkpoint
from daemon.ckpt.schema import FORMAT_VERSION, REQUIRED_KEYS, InvalidCheckpoint
from trainer_proc import TrainerProcess, assert_same_training, final_checkpoint, run_to_end


def make_state(step: int, kind: str = "periodic") -> dict:
    state = {key: None for key in REQUIRED_KEYS}
    state.update(
        format_version=FORMAT_VERSION, kind=kind, global_step=step, epoch=0, step_in_epoch=step,
        state_dict={"weight": torch.full((256, 256), float(step))}, config={}, fingerprint="f",
    )  # fmt: skip
    return state


class Exploit:
    """Unpickling this would run code: weights_only loading must refuse it."""

    marker = None

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def flip_byte(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # inside the tensor record, which is most of the file
    path.write_bytes(bytes(data))


def empty(path):
    path.write_bytes(b"")


def garbage(path):
    path.write_bytes(os.urandom(4096))


def seed_recipe_file(path):
    torch.save({"epoch": 3, "state_dict": {"w": torch.ones(3)}, "optimizer": {}}, path)


def wrong_version(path):
    torch.save({**make_state(2), "format_version": 99}, path)


def pickled_object(path):
    Exploit.marker = path.parent / "exploited"
    torch.save({**make_state(2), "payload": Exploit()}, path)


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


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("unshare"), reason="needs root and unshare to mount a small tmpfs")
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
