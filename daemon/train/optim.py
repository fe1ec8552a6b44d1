"""The optimizer, LR scheduler and warmup the `optim` section describes (default: Adam, lr 1e-3)."""

from __future__ import annotations

import torch
from torch import nn

from daemon.config.sections import OptimConfig, SchedulerConfig


def build_optimizer(cfg: OptimConfig, model: nn.Module) -> torch.optim.Optimizer:
    params = model.parameters()
    if cfg.name == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    optimizer = torch.optim.AdamW if cfg.name == "adamw" else torch.optim.Adam
    return optimizer(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def build_scheduler(cfg: SchedulerConfig | None, optimizer: torch.optim.Optimizer):
    if cfg is None:
        return None
    if cfg.name == "step":
        return torch.optim.lr_scheduler.StepLR(optimizer, step_size=cfg.step_size, gamma=cfg.gamma)
    return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=cfg.t_max)


def build_warmup(steps: int, optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LinearLR | None:
    """Linear warmup over the first `steps` optimizer steps, from lr/(steps+1) up to lr. Chained
    with the scheduler: both scale the learning rate the other leaves (torch's chainable form)."""
    if not steps:
        return None
    return torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=1 / (steps + 1), total_iters=steps)
