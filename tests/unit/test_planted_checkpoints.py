"""Files that someone else put in the checkpoint directory under checkpoint names: links are never
followed, archives whose directory claims more than the file holds are refused without being read,
and retention counts only the checkpoints the store wrote or read, so planted files never push the
real ones out. (The runs that meet them: tests/process/test_planted_checkpoint_files.py and
tests/process/test_retention.py.)"""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

import pytest

from checkpoint_files import make_state
from daemon.ckpt.schema import InvalidCheckpoint
from daemon.ckpt.store import A_LINK, CheckpointStore, read_checkpoint
from daemon.ckpt.writer import BackgroundWriter
from forged_archives import GIB, TIB, sparse_zip64

JUNK = ("ckpt-9999999990-periodic.pt", "ckpt-9999999991-periodic.pt")


def bytes_read() -> int:
    """What this process has read through read() so far, holes of sparse files included."""
    with open("/proc/self/io") as io:
        return next(int(line.split()[1]) for line in io if line.startswith("rchar:"))


def checkpoint_names(directory: Path) -> list[str]:
    return sorted(path.name for path in directory.glob("ckpt-*"))


def test_links_named_like_checkpoints_are_reported_left_in_place_and_never_followed(tmp_path):
    elsewhere = CheckpointStore(tmp_path / "elsewhere", keep_last=5).save(make_state(6)).path
    store = CheckpointStore(tmp_path / "ckpt", keep_last=5)
    store.save(make_state(1))
    loop, dangling, outward = (store.path_for(step, "periodic") for step in (9, 8, 6))
    loop.symlink_to(loop.name)
    dangling.symlink_to("ckpt-0000000005-periodic.pt")
    outward.symlink_to(elsewhere)
    reported = []

    entry = store.newest_valid(on_invalid=lambda bad, aside: reported.append((bad.path, bad.reason, aside)))

    assert entry.global_step == 1
    assert reported == [(loop, A_LINK, None), (dangling, A_LINK, None), (outward, A_LINK, None)]
    assert all(path.is_symlink() for path in (loop, dangling, outward))
    assert [(e.global_step, e.reason) for e in store.scan()] == [(9, A_LINK), (8, A_LINK), (6, A_LINK), (1, None)]


def test_a_link_given_to_read_is_refused(tmp_path):
    real = CheckpointStore(tmp_path, keep_last=5).save(make_state(1)).path
    link = tmp_path / "ckpt-0000000002-periodic.pt"
    link.symlink_to(real)

    with pytest.raises(InvalidCheckpoint, match="symbolic link"):
        read_checkpoint(link)


def deflated(path: Path) -> None:
    """A small file that inflates to 64 MiB: verifying it would inflate all of it."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("archive/data.pkl", bytes(64 << 20))


# What is planted, and what the refusal must say. Each is refused from its directory alone.
FORGERIES = {
    "50 GiB sparse, a record claiming 100 GiB": (
        lambda path: sparse_zip64(path, 50 * GIB, claims=100 * GIB), "more than the file holds"),
    "50 GiB sparse, one record that is not torch's": (
        lambda path: sparse_zip64(path, 50 * GIB, name="archive/data/0"), "not a torch archive"),
    "1 TiB sparse, a directory as large as the file": (
        lambda path: sparse_zip64(path, TIB, whole_file_directory=True), "a directory of"),
    "a compressed record": (deflated, "is compressed"),
}  # fmt: skip


@pytest.mark.parametrize("forgery", FORGERIES)
def test_an_archive_claiming_more_than_it_holds_is_refused_unread(tmp_path, forgery):
    plant, reason = FORGERIES[forgery]
    store = CheckpointStore(tmp_path, keep_last=5)
    store.save(make_state(1))
    forged = store.path_for(2, "periodic")
    plant(forged)
    reported = []

    before = bytes_read()
    entry = store.newest_valid(on_invalid=lambda bad, aside: reported.append((bad, aside)))
    read = bytes_read() - before

    assert entry.global_step == 1
    ((bad, aside),) = reported
    assert reason in bad.reason and aside.name == forged.name + ".invalid"
    assert read < 4 << 20, f"{read} bytes read"  # the good checkpoint (0.3 MB), not the forgery


def test_retention_does_not_count_files_it_has_not_read(tmp_path):
    """The report's case: two junk files with higher step names, keep_last 2."""
    store = CheckpointStore(tmp_path, keep_last=2)
    for step in (1, 2):
        store.save(make_state(step))
        store.prune()
    for name in JUNK:
        (tmp_path / name).write_text("x\n")

    for step in (3, 4):
        store.save(make_state(step))
        store.prune()

    assert checkpoint_names(tmp_path) == ["ckpt-0000000003-periodic.pt", "ckpt-0000000004-periodic.pt", *JUNK]


def test_background_writer_does_not_count_files_it_has_not_read(tmp_path):
    writer = BackgroundWriter(CheckpointStore(tmp_path, keep_last=2))
    writer.submit(make_state(1))
    writer.drain()
    for name in JUNK:
        (tmp_path / name).write_text("x\n")
    for step in range(2, 5):
        writer.submit(make_state(step))
    writer.close()

    assert checkpoint_names(tmp_path) == ["ckpt-0000000003-periodic.pt", "ckpt-0000000004-periodic.pt", *JUNK]


def test_after_a_resume_retention_deletes_what_is_older_than_the_kept_checkpoints(tmp_path):
    """The files of the run before a restart are not this store's, but older than the ones it
    keeps: deleted, as they would have been, so that restarts leave no files behind."""
    earlier_run = CheckpointStore(tmp_path, keep_last=3)
    for step in (1, 2, 3):
        earlier_run.save(make_state(step))
    store = CheckpointStore(tmp_path, keep_last=2)
    assert store.newest_valid(on_invalid=lambda *_: None).global_step == 3

    store.save(make_state(4))
    store.prune()

    assert checkpoint_names(tmp_path) == ["ckpt-0000000003-periodic.pt", "ckpt-0000000004-periodic.pt"]


def test_retention_leaves_links_in_place(tmp_path):
    store = CheckpointStore(tmp_path, keep_last=1)
    link = store.path_for(1, "periodic")
    link.symlink_to(os.devnull)
    for step in (2, 3):
        store.save(make_state(step))
        store.prune()

    assert checkpoint_names(tmp_path) == [link.name, "ckpt-0000000003-periodic.pt"] and link.is_symlink()
