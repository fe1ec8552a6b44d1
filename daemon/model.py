"""The model, optimizer and LR scheduler a config describes (the default: the seed's MLP 784-500-10, Adam)."""

from __future__ import annotations

import torch
from torch import nn

from daemon.config import ModelConfig, OptimConfig, SchedulerConfig
from daemon.errors import ConfigError

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


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
