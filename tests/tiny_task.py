"""A tiny task of the tests' own: a two-layer net on a fixed random regression problem, with
augmentation noise drawn while fetching samples, its own collate_fn, a step metric, and state of its own (an
exponential moving average of the weights, and a sum that differs by rank). Options: `fail_at_step` raises in training_step;
`own_optimizer` gives it configure_optimizers (momentum SGD, a StepLR per epoch); `metric` names
its evaluation; `unused_parameter` adds a parameter the step never uses."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from daemon.train.task import TaskContext

FEATURES = 16


class NoisySamples(Dataset):
    def __init__(self, inputs: torch.Tensor, targets: torch.Tensor) -> None:
        self.inputs, self.targets = inputs, targets

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        # Drawn from the global RNG while fetching: the daemon seeds it for each sample.
        noise = 0.05 * torch.randn(FEATURES)
        return {"x": self.inputs[index] + noise, "y": self.targets[index]}


class TinyTask:
    version = "1"

    def __init__(self, context: TaskContext) -> None:
        options = {"samples": 480, "fail_at_step": None, "own_optimizer": False, "metric": "test_mse",
                   "unused_parameter": False, **context.options}  # fmt: skip
        generator = torch.Generator().manual_seed(1234)  # the problem, fixed whatever train.seed is
        inputs = torch.randn(options["samples"], FEATURES, generator=generator)
        targets = inputs @ torch.randn(FEATURES, 1, generator=generator) + 0.1
        self.train_set = NoisySamples(inputs, targets)
        self.test = (inputs[:100], targets[:100])
        self.model = nn.Sequential(nn.Linear(FEATURES, 32), nn.Tanh(), nn.Dropout(0.1), nn.Linear(32, 1))
        if options["unused_parameter"]:
            self.model.register_parameter("unused", nn.Parameter(torch.zeros(FEATURES)))
        self.average = [p.detach().clone() for p in self.model.parameters()]
        self.inputs_seen = 0.0  # the sum of the inputs this process trained on: each rank has its own
        self.fail_at_step = options["fail_at_step"]
        self.metric = options["metric"]
        self.steps = 0
        if options["own_optimizer"]:  # the optional part: present only when asked for
            self.configure_optimizers = self._momentum_sgd

    @staticmethod
    def _momentum_sgd(model: nn.Module) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        return optimizer, torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)

    @staticmethod
    def collate_fn(samples: list[dict[str, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Its own batching: (inputs, targets), where torch's default would make a dict."""
        return torch.stack([s["x"] for s in samples]), torch.stack([s["y"] for s in samples])

    def training_step(self, model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, dict]:
        if self.steps == self.fail_at_step:
            raise ValueError("the tiny task fails on purpose")
        self.steps += 1
        inputs, targets = batch
        self.inputs_seen += inputs.sum().item()
        prediction = model(inputs)
        loss = F.mse_loss(prediction.float(), targets)
        with torch.no_grad():
            for average, parameter in zip(self.average, model.parameters(), strict=False):
                average.lerp_(parameter.detach().float(), 0.1)
        return loss, {"abs_error": (prediction.float() - targets).abs().mean()}

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        inputs, targets = self.test
        return {self.metric: F.mse_loss(model(inputs).float(), targets).item()}

    def state_dict(self) -> dict:
        return {
            "average": [tensor.clone() for tensor in self.average],
            "steps": self.steps,
            "inputs_seen": self.inputs_seen,
        }

    def load_state_dict(self, state: dict) -> None:
        self.average = [tensor.clone() for tensor in state["average"]]
        self.steps = state["steps"]
        self.inputs_seen = state["inputs_seen"]


def build(context: TaskContext) -> TinyTask:
    return TinyTask(context)


def build_incomplete(context: TaskContext) -> TinyTask:
    """Not a task: its model is missing."""
    task = TinyTask(context)
    del task.model
    return task
