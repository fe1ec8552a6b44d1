"""The resumable pieces of a run that torch does not already provide, each a state_dict() pair.

Stored as tensors and plain values only, so a checkpoint loads with weights_only=True.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from daemon.train.task import Metrics


@dataclass
class TrainProgress:
    """Where the run stands, and the running metrics of the epoch in flight."""

    epoch: int = 0  # epochs completed = index of the epoch in flight
    step_in_epoch: int = 0  # optimizer steps of the epoch in flight already taken
    global_step: int = 0
    samples: int = 0  # samples trained in the epoch in flight
    own_samples: int = 0  # of them, this rank's (all of them when one process trains)
    # Kept on the model's device in float64 so the hot loop adds without a host sync.
    loss_sum: torch.Tensor = field(default_factory=lambda: torch.zeros((), dtype=torch.float64))
    metric_sums: dict[str, torch.Tensor] = field(default_factory=dict)  # a task's step metrics, as loss_sum
    history: list[dict] = field(default_factory=list)  # per completed epoch, numbered from 1

    def position(self) -> dict[str, int]:
        """Where the run stands, as every event that has a position names it."""
        return {"epoch": self.epoch, "step_in_epoch": self.step_in_epoch, "global_step": self.global_step}

    def to(self, device: torch.device) -> TrainProgress:
        self.loss_sum = self.loss_sum.to(device)
        return self

    def record_batch(
        self, loss: torch.Tensor, batch_samples: int, own_samples: int, metrics: Metrics | None = None
    ) -> None:
        """A batch trained (one of the optimizer step's batches under gradient accumulation):
        `batch_samples` in the whole batch, `own_samples` of them in this rank's slice, over which
        `loss` and `metrics` are means (the same number when one process trains)."""
        self.loss_sum.add_(loss.detach(), alpha=own_samples)
        for name, value in (metrics or {}).items():
            total = self.metric_sums.get(name)
            if total is None:
                total = self.metric_sums[name] = torch.zeros((), dtype=torch.float64, device=self.loss_sum.device)
            total.add_(torch.as_tensor(value).detach().to(total.device), alpha=own_samples)
        self.samples += batch_samples
        self.own_samples += own_samples

    def record_step(self) -> None:
        self.step_in_epoch += 1
        self.global_step += 1

    def mean_loss(self) -> float:
        """This process's running loss (its rank's slice of the epoch in flight)."""
        return self.loss_sum.item() / max(self.own_samples, 1)

    def mean_metrics(self) -> dict[str, float]:
        """The task's step metrics averaged over the epoch in flight, as `train_<name>` (this
        process's slice)."""
        return {f"train_{name}": total.item() / max(self.own_samples, 1) for name, total in self.metric_sums.items()}

    def _summed(self, sum_over_ranks: Callable[[torch.Tensor], torch.Tensor]) -> list[float]:
        """The running sums, loss first, then each step metric, summed over the ranks."""
        return sum_over_ranks(torch.stack([self.loss_sum, *self.metric_sums.values()])).tolist()

    def running_means(self, sum_over_ranks: Callable[[torch.Tensor], torch.Tensor]) -> tuple[float, dict[str, float]]:
        """The epoch in flight's mean loss and `train_<name>` step metrics over every rank's samples."""
        loss, *metrics = (total / max(self.samples, 1) for total in self._summed(sum_over_ranks))
        return loss, {f"train_{name}": value for name, value in zip(self.metric_sums, metrics, strict=True)}

    def complete_epoch(
        self, evaluation: dict[str, float], sum_over_ranks: Callable[[torch.Tensor], torch.Tensor]
    ) -> dict:
        """Close the epoch in flight: record its evaluation (headline first) and training metrics
        (over every rank's samples), and start the next one."""
        loss, metrics = self.running_means(sum_over_ranks)
        entry = {"epoch": self.epoch + 1, **evaluation, "train_loss": loss, **metrics}
        self.history.append(entry)
        self.epoch += 1
        self.step_in_epoch = 0
        self.samples = self.own_samples = 0
        self.loss_sum.zero_()
        self.metric_sums.clear()
        return entry

    def headline(self) -> dict:
        """The last completed epoch's headline metric, `{"headline": name, name: value}`: the first of
        the task's evaluation (train_loss when it has none); `{"headline": None}` before any epoch."""
        if not self.history:
            return {"headline": None}
        entry = self.history[-1]
        name = next(key for key in entry if key != "epoch")
        return {"headline": name, name: entry[name]}

    def state_dict(self, sum_over_ranks: Callable[[torch.Tensor], torch.Tensor]) -> dict:
        """The position and history, and the running sums of every rank together (each rank's own
        are `RunningSums`)."""
        loss_sum, *sums = self._summed(sum_over_ranks)
        metrics: dict[str, float | dict[str, float]] = {"loss_sum": loss_sum, "samples": self.samples}
        if self.metric_sums:  # only a task with step metrics has them: the format is unchanged otherwise
            metrics["sums"] = dict(zip(self.metric_sums, sums, strict=True))
        return {
            "epoch": self.epoch,
            "step_in_epoch": self.step_in_epoch,
            "global_step": self.global_step,
            "metrics": metrics,
            "history": [dict(entry) for entry in self.history],
        }

    def load_state_dict(self, state: dict) -> None:
        self.epoch = state["epoch"]
        self.step_in_epoch = state["step_in_epoch"]
        self.global_step = state["global_step"]
        self.samples = self.own_samples = state["metrics"]["samples"]  # a rank's own: from `RunningSums`
        self.loss_sum.fill_(state["metrics"]["loss_sum"])
        self.metric_sums = {
            name: torch.tensor(total, dtype=torch.float64, device=self.loss_sum.device)
            for name, total in state["metrics"].get("sums", {}).items()
        }
        self.history = [dict(entry) for entry in state["history"]]


class RunningSums:
    """One rank's own running sums of the epoch in flight, when several train: the checkpoint's
    `metrics` hold their sum over the ranks, and a resumed rank must go on from its own."""

    def __init__(self, progress: TrainProgress) -> None:
        self.progress = progress

    def state_dict(self) -> dict:
        p = self.progress
        sums = {name: total.item() for name, total in p.metric_sums.items()}
        return {"loss_sum": p.loss_sum.item(), "samples": p.own_samples, "sums": sums}

    def load_state_dict(self, state: dict) -> None:
        p = self.progress
        p.loss_sum.fill_(state["loss_sum"])
        p.own_samples = state["samples"]
        p.metric_sums = {
            name: torch.tensor(total, dtype=torch.float64, device=p.loss_sum.device)
            for name, total in state["sums"].items()
        }

    def load_resharded(self, entries: dict, rank: int) -> None:
        """Resumed at another world size: the old ranks' shares belong to no new rank. Rank 0 takes
        their sum (the checkpoint's `metrics`, which `TrainProgress` loaded), every other rank starts
        from zero: the sums over the ranks, and so the epoch's loss, are those of every sample trained."""
        if rank == 0:
            return
        p = self.progress
        p.loss_sum.zero_()
        p.own_samples = 0
        p.metric_sums = {name: torch.zeros_like(total) for name, total in p.metric_sums.items()}
