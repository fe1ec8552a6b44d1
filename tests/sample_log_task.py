"""A task of the tests' own that says which samples it trained: each rank appends the indices
of every batch it trains to a file of its own in `task.options.record_dir`, one line a batch,
before the step's backward. A stop never lands inside a step, so after a stop the lines are those
of the steps its checkpoint holds. Options: `record_dir`, `samples`."""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from daemon.train.task import TaskContext

FEATURES = 8


class IndexedSamples(Dataset):
    def __init__(self, inputs: torch.Tensor, targets: torch.Tensor) -> None:
        self.inputs, self.targets = inputs, targets

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"x": self.inputs[index], "y": self.targets[index], "index": torch.tensor(index)}


class SampleLogTask:
    def __init__(self, context: TaskContext) -> None:
        options = {"samples": 960, **context.options}
        generator = torch.Generator().manual_seed(1234)
        inputs = torch.randn(options["samples"], FEATURES, generator=generator)
        targets = inputs @ torch.randn(FEATURES, 1, generator=generator)
        self.train_set = IndexedSamples(inputs, targets)
        self.test = (inputs[:100], targets[:100])
        self.model = nn.Sequential(nn.Linear(FEATURES, 16), nn.Tanh(), nn.Linear(16, 1))
        # One log a rank of each world size (a rank learns both from its launcher's environment).
        self.log = Path(options["record_dir"]) / f"{os.environ['WORLD_SIZE']}-ranks.rank-{os.environ['RANK']}"

    def training_step(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        with self.log.open("a") as log:
            log.write(" ".join(map(str, batch["index"].tolist())) + "\n")
        return F.mse_loss(model(batch["x"]), batch["y"])

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        inputs, targets = self.test
        return {"test_mse": F.mse_loss(model(inputs), targets).item()}


def build(context: TaskContext) -> SampleLogTask:
    return SampleLogTask(context)
