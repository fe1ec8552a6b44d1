"""Checkpoint states and the ways a file on disk goes bad: for the store's unit tests, the runs that
must get past such files, and the read-only directory's store in a child process."""

from __future__ import annotations

import os

import torch

from daemon.ckpt.schema import FORMAT_VERSION, REQUIRED_KEYS


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
