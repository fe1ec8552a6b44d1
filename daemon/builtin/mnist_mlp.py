"""The built-in task: the classic MNIST MLP (784-500-10 by default, ReLU), cross-entropy loss,
test accuracy. Configured by the `model` section and `data.train_subset` / `data.test_subset`."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from daemon import events
from daemon.builtin.mnist_files import MnistTensors, load_mnist, prepare_mnist, to_float
from daemon.config.sections import Config, ModelConfig
from daemon.errors import ConfigError
from daemon.train.task import TaskContext

INPUT_FEATURES = 28 * 28
CLASSES = 10


def build_model(cfg: ModelConfig) -> nn.Sequential:
    layers: list[nn.Module] = []
    width = INPUT_FEATURES
    for hidden in cfg.hidden:
        layers += [nn.Linear(width, hidden), nn.ReLU()]
        if cfg.dropout:
            layers.append(nn.Dropout(cfg.dropout))
        width = hidden
    layers.append(nn.Linear(width, CLASSES))
    return nn.Sequential(*layers)


def allocate_model(cfg: ModelConfig, device: torch.device) -> nn.Sequential:
    """`build_model` on `device`; a model that does not fit there is a configuration error."""
    with torch.device("meta"):  # its size, allocating nothing (and drawing no random numbers)
        size = sum(p.numel() * p.element_size() for p in build_model(cfg).parameters())
    try:
        return build_model(cfg).to(device)
    except (RuntimeError, MemoryError) as exc:  # torch reports a failed allocation as a RuntimeError
        raise ConfigError(
            f"model.hidden: {cfg.hidden} makes a model of {size / 2**30:,.1f} GiB of parameters, which cannot be "
            f"allocated on {device} ({str(exc).splitlines()[0]}); choose smaller layers"
        ) from None


class MnistMLP:
    version = "1"

    def __init__(self, cfg: Config, device: torch.device) -> None:
        # The model first: its initialisation is the first draw from the freshly seeded RNG.
        self.model = allocate_model(cfg.model, device)
        laid_out = prepare_mnist(Path(cfg.data.root), cfg.data.download)
        if laid_out:
            events.DATASET_PREPARED.emit(root=cfg.data.root, files=laid_out)
        self.test_set = load_mnist(cfg.data, train=False)
        self.train_set: MnistTensors = load_mnist(cfg.data, train=True)
        self.eval_batch_size = cfg.train.eval_batch_size
        self.device = device

    def training_step(self, model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        images, labels = batch
        return F.cross_entropy(model(images), labels)

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        images, labels = self.test_set.images, self.test_set.labels
        correct = 0
        for start in range(0, len(labels), self.eval_batch_size):
            x = to_float(images[start : start + self.eval_batch_size]).to(self.device)
            y = labels[start : start + self.eval_batch_size].to(self.device)
            correct += (model(x).argmax(dim=1) == y).sum().item()
        return {"test_accuracy": correct / len(labels)}


def build(context: TaskContext) -> MnistMLP:
    if context.options:
        raise ConfigError("task.options: the built-in MNIST MLP takes its settings from model and data.*_subset")
    return MnistMLP(context.config, context.device)
