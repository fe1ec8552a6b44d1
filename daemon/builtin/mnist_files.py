"""MNIST as tensors: the four IDX files laid out from the copy shipped with the package, read
directly into the tensors torchvision's `MNIST` holds.

A batch becomes float exactly as torchvision's `ToTensor` would make each sample
(`x.to(float32).div(255)`), without the per-sample PIL round trip. torchvision lays the files out
(its extract_archive, or MNIST's download) but is not imported on a start that finds them in place:
importing it pulls in torch._dynamo and sympy, ~0.25 s of a start and ~30 MB of memory here
(tests/test_data.py checks that the tensors equal torchvision's).
"""

from __future__ import annotations

import hashlib
import math
import os
import tempfile
from pathlib import Path

import torch
from torch.utils.data import Dataset

from daemon.config.sections import DataConfig
from daemon.errors import DatasetUnavailable

# The canonical MD5 of each uncompressed file (torchvision's table holds those of its .gz downloads).
MNIST_MD5 = {
    "train-images-idx3-ubyte": "6bbc9ace898e44ae57da46a324031adb",
    "train-labels-idx1-ubyte": "a25bea736e30d166cdddb491f175f624",
    "t10k-images-idx3-ubyte": "2646ac647ad5339dbf082846283269ea",
    "t10k-labels-idx1-ubyte": "27ae3e4e09519cfbb04c329615203637",
}
SHIPPED_DIR = Path(__file__).parent / "mnist"
RAW_SUBDIR = Path("MNIST") / "raw"  # where torchvision.datasets.MNIST(root) looks


def _md5_matches(path: Path, md5: str) -> bool:
    """What torchvision's check_integrity checks, without importing torchvision at every start."""
    digest = hashlib.md5()
    try:
        with path.open("rb") as file:
            while chunk := file.read(1 << 20):
                digest.update(chunk)
    except OSError:
        return False
    return digest.hexdigest() == md5


def prepare_mnist(root: Path, download: bool) -> list[str]:
    """Make `<root>/MNIST/raw/` hold the four verified files; return the names laid out now.

    Files already in place and intact are left alone (the usual start: no torchvision import).
    The others are laid out with torchvision's own utilities: decompressed from the copy shipped
    with the package, or, where that is absent too and `download` allows, downloaded.
    """
    raw = root / RAW_SUBDIR
    missing = [name for name, md5 in MNIST_MD5.items() if not _md5_matches(raw / name, md5)]
    if not missing:
        return []
    from torchvision.datasets import MNIST  # slow to import: only when files must be laid out
    from torchvision.datasets.utils import extract_archive

    unshipped = [name for name in missing if not (SHIPPED_DIR / f"{name}.gz").exists()]
    try:
        raw.mkdir(parents=True, exist_ok=True)
        for name in missing:
            if name not in unshipped:
                # Through a folder of this process's own, then renamed into place: the ranks of a
                # run lay the files out at once, and none may check another's half-written file.
                with tempfile.TemporaryDirectory(prefix=".extract-", dir=raw) as scratch:
                    extract_archive(SHIPPED_DIR / f"{name}.gz", scratch)
                    os.replace(Path(scratch) / name, raw / name)
        if unshipped and download:
            for train in (True, False):
                MNIST(root, train=train, download=True)
    except (OSError, RuntimeError, EOFError) as exc:
        raise DatasetUnavailable(f"cannot lay out MNIST in {raw}: {exc}") from None
    bad = [name for name in missing if not _md5_matches(raw / name, MNIST_MD5[name])]
    if bad:
        hint = "" if download else " (data.download is false)"
        raise DatasetUnavailable(
            f"MNIST files missing or not matching their MD5 in {raw}: {', '.join(bad)}{hint}; "
            f"place the uncompressed files there or allow data.download"
        )
    return missing


def _read_idx(path: Path, ndim: int) -> torch.Tensor:
    """An IDX file of unsigned bytes (magic 0x0000080N) as a uint8 tensor of its N dimensions."""
    with path.open("rb") as file:  # into one mutable buffer: read_bytes() + bytearray() would hold two copies
        data = bytearray(os.fstat(file.fileno()).st_size)
        complete = file.readinto(data) == len(data)
    header = 4 + 4 * ndim
    if not complete or len(data) < header or data[:4] != bytes((0, 0, 8, ndim)):
        raise ValueError(f"{path} is not an IDX file of {ndim}-dimensional unsigned bytes")
    shape = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    if len(data) != header + math.prod(shape):
        raise ValueError(f"{path} holds {len(data) - header} bytes of data, its header says {shape}")
    return torch.frombuffer(data, dtype=torch.uint8, offset=header).view(shape)


class MnistTensors(Dataset):
    """Images as one uint8 tensor; a whole batch is served with one index operation."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        self.images = images
        self.labels = labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        images, labels = self.batch(torch.as_tensor([index]))
        return images[0], labels[0]

    def batch(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The samples at `index` (int32 or int64): float images (N, 784) and int64 labels."""
        # index_select: a row copy each, where advanced indexing runs a general gather kernel.
        return to_float(self.images.index_select(0, index)), self.labels.index_select(0, index)


def to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 images (N, 28, 28) to float rows (N, 784), bitwise as ToTensor + reshape would give."""
    return images.reshape(len(images), -1).to(torch.float32).div(255)


def load_mnist(cfg: DataConfig, train: bool) -> MnistTensors:
    """The tensors torchvision's MNIST(root, train) holds: images uint8 (N, 28, 28), labels int64."""
    raw = Path(cfg.root) / RAW_SUBDIR
    prefix = "train" if train else "t10k"
    try:
        images = _read_idx(raw / f"{prefix}-images-idx3-ubyte", ndim=3)
        labels = _read_idx(raw / f"{prefix}-labels-idx1-ubyte", ndim=1).long()
    except (OSError, ValueError) as exc:
        raise DatasetUnavailable(f"cannot load MNIST from {cfg.root}: {exc}") from None
    if len(images) != len(labels):
        raise DatasetUnavailable(f"cannot load MNIST from {cfg.root}: {len(images)} images but {len(labels)} labels")
    subset = cfg.train_subset if train else cfg.test_subset
    if subset is not None:
        images, labels = images[:subset], labels[:subset]
    return MnistTensors(images, labels)
