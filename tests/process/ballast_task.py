"""The built-in MNIST MLP with state of its own that grows once a file appears: saves that become
costlier mid-run, at the moment a test chooses (tests/process/test_budgeted_saves.py). Options:
`grow_when`, the file; `megabytes`, the state's size from then on."""

from __future__ import annotations

from pathlib import Path

import torch

from daemon.builtin.mnist_mlp import MnistMLP
from daemon.train.task import TaskContext


class BallastTask(MnistMLP):
    def __init__(self, context: TaskContext) -> None:
        super().__init__(context.config, context.device)
        self.trigger = Path(context.options["grow_when"])
        self.small = torch.zeros(1)
        self.large = torch.zeros(context.options["megabytes"] << 18)  # float32: 4 bytes each

    def state_dict(self) -> dict:
        return {"ballast": self.large if self.trigger.exists() else self.small}

    def load_state_dict(self, state: dict) -> None:
        """Nothing to restore: the ballast is what it weighs, not what it holds."""


def build(context: TaskContext) -> BallastTask:
    return BallastTask(context)
