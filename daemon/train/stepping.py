"""One optimizer step: its batches' forward and backward passes (several under gradient
accumulation), in the configured precision, then clipping and the optimizer's step."""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from daemon.ckpt.rng import RNGState
from daemon.config.sections import TrainConfig
from daemon.errors import ConfigError
from daemon.train.task import Metrics, TaskAdapter

AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class Stepper:
    def __init__(
        self,
        task: TaskAdapter,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        cfg: TrainConfig,
        clip_grad_norm: float | None,
        device: torch.device,
        carry: Callable[[torch.Tensor], torch.Tensor],
    ) -> None:
        """`model`: the task's model as the steps run it (wrapped by DDP when there are several ranks).
        `carry`: the loss a backward starts from, given the loss (with several ranks, one that hands
        this rank's requests to the agreement: daemon/dist/group.py)."""
        if cfg.precision == "fp16" and device.type != "cuda":
            raise ConfigError(
                f"train.precision: fp16 needs CUDA (its loss scaling is CUDA's), the run is on {device}; use bf16"
            )
        self.task = task
        self.model = model
        self.optimizer = optimizer
        self.clip_grad_norm = clip_grad_norm
        self._carry = carry
        dtype = AUTOCAST_DTYPES.get(cfg.precision)
        self._autocast = (lambda: torch.autocast(device.type, dtype=dtype)) if dtype else contextlib.nullcontext
        # fp16's loss scale adapts as training goes: its state is part of the checkpoint.
        self.scaler = torch.amp.GradScaler(device.type) if cfg.precision == "fp16" else None
        self._layout_settled = not isinstance(model, nn.parallel.DistributedDataParallel)

    def accumulate(self, batch: Any, share: int) -> tuple[torch.Tensor, Metrics]:
        """Forward and backward of one batch, its gradient weighted 1/`share` (the batches of this
        optimizer step); returns its loss (unweighted) and step metrics."""
        if not self._layout_settled:
            self._settle_bucket_layout(batch)
        loss, metrics = self._forward(batch)
        scaled = loss / share if share > 1 else loss
        self._carry(self.scaler.scale(scaled) if self.scaler else scaled).backward()
        return loss, metrics

    def _forward(self, batch: Any) -> tuple[torch.Tensor, Metrics]:
        with self._autocast():
            return self.task.training_step(self.model, batch)

    def _settle_bucket_layout(self, batch: Any) -> None:
        """DDP lays its gradient buckets out anew after a process's first backward, in the order the
        gradients became ready, and from 3 ranks on another layout sums in another order: a resumed
        process would reduce its first step unlike the unbroken run did. So every process runs one
        forward and backward on its first batch before training, and undoes all it changed but the
        layout: the gradients, the RNG draws (dropout), the buffers (batch-norm statistics) and the
        task's own state."""
        rng = RNGState.state_dict()
        buffers = {name: buffer.clone() for name, buffer in self.model.named_buffers()}
        task_state = copy.deepcopy(self.task.state_dict()) if self.task.has_state else None
        self._carry(self._forward(batch)[0]).backward()
        unused = [name for name, p in self.task.model.named_parameters() if p.requires_grad and p.grad is None]
        if unused:
            raise ConfigError(
                f"task.entry: the training step leaves parameters without a gradient ({', '.join(unused[:5])}"
                f"{', ...' if len(unused) > 5 else ''}); with several ranks every trained parameter must be used "
                f"by every step: freeze the others (requires_grad=False) or leave them out of the model"
            )
        for parameter in self.model.parameters():
            parameter.grad = None
        with torch.no_grad():
            for name, buffer in self.model.named_buffers():
                buffer.copy_(buffers[name])
        RNGState.load_state_dict(rng)
        if task_state is not None:
            self.task.load_state_dict(task_state)
        self._layout_settled = True

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
