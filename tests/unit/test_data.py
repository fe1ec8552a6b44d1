"""Data: the tensor fast path equals torchvision's ToTensor path; the sampler resumes mid-epoch."""

from __future__ import annotations

import contextlib
import subprocess
import sys

import pytest
import torch
from torchvision import transforms
from torchvision.datasets import MNIST

from daemon.builtin.mnist_files import MNIST_MD5, load_mnist, prepare_mnist
from daemon.config.sections import DataConfig
from daemon.train.data import EpochBatchSampler


def test_batches_are_bitwise_what_totensor_gives(mnist_root):
    reference = MNIST(mnist_root, train=True, transform=transforms.ToTensor())
    fast = load_mnist(DataConfig(root=str(mnist_root)), train=True)
    indices = [0, 7, 59_999, 31_337]

    images, labels = fast.batch(torch.tensor(indices))

    expected = torch.stack([reference[i][0].reshape(-1) for i in indices])
    assert torch.equal(images, expected)
    assert labels.tolist() == [reference[i][1] for i in indices]


def test_layout_verifies_checksums_and_repairs_a_damaged_file(tmp_path):
    assert sorted(prepare_mnist(tmp_path, download=False)) == sorted(MNIST_MD5)
    damaged = tmp_path / "MNIST" / "raw" / "t10k-labels-idx1-ubyte"
    damaged.write_bytes(b"not mnist")

    assert prepare_mnist(tmp_path, download=False) == ["t10k-labels-idx1-ubyte"]
    assert prepare_mnist(tmp_path, download=False) == []


def test_layout_shows_only_whole_files(tmp_path):
    """The ranks of a run lay the dataset out at once: a file another process is still writing
    failed their checksum (exit 66). Watched from here while a process lays the files out, a file
    is either absent or whole."""
    raw = tmp_path / "MNIST" / "raw"
    lay_out = f"from pathlib import Path; import daemon.builtin.mnist_files as d; d.prepare_mnist(Path({str(tmp_path)!r}), False)"
    laying_out = subprocess.Popen([sys.executable, "-c", lay_out])
    seen: set[tuple[str, int]] = set()
    while laying_out.poll() is None:
        for name in MNIST_MD5:
            with contextlib.suppress(FileNotFoundError):
                seen.add((name, (raw / name).stat().st_size))
    assert laying_out.returncode == 0
    whole = {(name, (raw / name).stat().st_size) for name in MNIST_MD5}
    assert seen <= whole, seen - whole


def test_resumed_epoch_yields_exactly_the_batches_not_yet_trained():
    sampler = EpochBatchSampler(num_samples=1050, batch_size=100, shuffle=True, seed=3)
    sampler.set_epoch(2)
    whole_epoch = list(sampler)
    saved = sampler.state_dict()

    restored = EpochBatchSampler(num_samples=1050, batch_size=100, shuffle=True, seed=3)
    restored.load_state_dict(saved)
    restored.start_at(4)

    assert list(restored) == whole_epoch[4:]
    assert len(whole_epoch) == 11 and len(whole_epoch[-1]) == 50
    assert sorted(i for batch in whole_epoch for i in batch) == list(range(1050))


def test_epoch_orders_differ_and_depend_only_on_seed_and_epoch():
    def order(seed, epoch):
        sampler = EpochBatchSampler(num_samples=500, batch_size=100, shuffle=True, seed=seed)
        sampler.set_epoch(epoch)
        return sampler.order

    assert torch.equal(order(0, 1), order(0, 1))
    assert not torch.equal(order(0, 1), order(0, 2))
    assert not torch.equal(order(0, 1), order(1, 1))


def test_order_state_refuses_another_dataset_size():
    sampler = EpochBatchSampler(num_samples=500, batch_size=100, shuffle=True, seed=0)
    sampler.set_epoch(0)
    other = EpochBatchSampler(num_samples=400, batch_size=100, shuffle=True, seed=0)

    with pytest.raises(ValueError, match="500 samples"):
        other.load_state_dict(sampler.state_dict())
