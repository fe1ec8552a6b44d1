"""One optimizer step: its batches' forward and backward passes (several under gradient
accumulation), in the configured precision, then clipping and the optimizer's step."""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import nn

from daemon.config import TrainConfig
from daemon.errors import ConfigError
from daemon.task import Task

AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class Stepper:
    def __init__(
        self, task: Task, model: nn.Module, optimizer: torch.optim.Optimizer, cfg: TrainConfig,
        clip_grad_norm: float | None, device: torch.device,
    ) -> None:  # fmt: skip
        """`model`: the task's model as the steps run it (wrapped by DDP when there are several ranks)."""
        if cfg.precision == "fp16" and device.type != "cuda":
            raise ConfigError(f"train.precision: fp16 needs CUDA (its loss scaling is CUDA's), the run is on {device}; use bf16")
        self.task = task
        self.model = model
        self.optimizer = optimizer
        self.clip_grad_norm = clip_grad_norm
        dtype = AUTOCAST_DTYPES.get(cfg.precision)
        self._autocast = (lambda: torch.autocast(device.type, dtype=dtype)) if dtype else contextlib.nullcontext
        # fp16's loss scale adapts as training goes: its state is part of the checkpoint.
        self.scaler = torch.amp.GradScaler(device.type) if cfg.precision == "fp16" else None

    def accumulate(self, batch: Any, share: int) -> tuple[torch.Tensor, dict]:
        """Forward and backward of one batch, its gradient weighted 1/`share` (the batches of this
        optimizer step); returns its loss (unweighted) and step metrics."""
        with self._autocast():
            out = self.task.training_step(self.model, batch)
        loss, metrics = out if isinstance(out, tuple) else (out, {})
        scaled = loss / share if share > 1 else loss
        (self.scaler.scale(scaled) if self.scaler else scaled).backward()
        return loss, metrics

    def step(self) -> None:
        """The optimizer's step on the accumulated gradients, which are then cleared."""
        if self.clip_grad_norm is not None:
            if self.scaler:
                self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip_grad_norm)
        if self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
