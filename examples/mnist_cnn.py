"""A task of your own: a small CNN on MNIST with random affine augmentation.

    trainer run --config examples/mnist_cnn.yaml
    trainer run --config examples/mnist_cnn.yaml --set task.options.train_subset=2000   # a quick try

`build` is what `task.entry` names: it gets a TaskContext (the options from the config, the device,
the whole config) with every RNG already seeded from train.seed, and returns the task. The daemon
does the rest: the loop, the data order, checkpoints, signals, resume. README, "Your own model".
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset
from torchvision.datasets import MNIST
from torchvision.transforms import v2

from daemon.builtin.mnist_files import prepare_mnist
from daemon.train.task import TaskContext

MEAN, STD = 0.1307, 0.3081  # of MNIST's training images


class AugmentedMnist(Dataset):
    """MNIST samples as (1, 28, 28) float tensors, each through `transform` when it is fetched.
    The transform's random numbers come from torch's global RNG, which the daemon seeds for each
    sample: the same augmentation on every resume, in any DataLoader worker."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, transform: v2.Transform) -> None:
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.transform(self.images[index].unsqueeze(0)), self.labels[index]


class SmallCNN(nn.Sequential):
    def __init__(self, width: int) -> None:
        super().__init__(
            nn.Conv2d(1, width, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),  # 14 x 14
            nn.Conv2d(width, 2 * width, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),  # 7 x 7
            nn.Flatten(), nn.Dropout(0.25), nn.Linear(2 * width * 7 * 7, 10),
        )  # fmt: skip


class MnistCNN:
    version = "1"  # bump when a change of this file changes what it computes

    def __init__(self, context: TaskContext) -> None:
        options = {"width": 32, "degrees": 10.0, "translate": 0.1, "train_subset": None, "test_subset": None, **context.options}
        root = Path(context.config.data.root)
        prepare_mnist(root, download=context.config.data.download)  # the daemon's copy of MNIST, laid out
        train, test = MNIST(root, train=True), MNIST(root, train=False)
        to_input = [v2.ToDtype(torch.float32, scale=True), v2.Normalize([MEAN], [STD])]
        augment = v2.RandomAffine(degrees=options["degrees"], translate=(options["translate"],) * 2)
        subset = slice(options["train_subset"])
        self.train_set = AugmentedMnist(train.data[subset], train.targets[subset], v2.Compose([augment, *to_input]))
        test_subset = slice(options["test_subset"])
        self.test_images = v2.Compose(to_input)(test.data[test_subset].unsqueeze(1))
        self.test_labels = test.targets[test_subset]
        self.model = SmallCNN(options["width"])
        self.device = context.device

    def training_step(self, model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        images, labels = batch
        return F.cross_entropy(model(images), labels)

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        correct = 0
        for images, labels in zip(self.test_images.split(1000), self.test_labels.split(1000)):
            correct += (model(images.to(self.device)).argmax(1) == labels.to(self.device)).sum().item()
        return {"test_accuracy": correct / len(self.test_labels)}


def build(context: TaskContext) -> MnistCNN:
    return MnistCNN(context)
