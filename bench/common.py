"""What the bench's own contenders (plain loop, seed recipe, raw save) share: the seed's MLP, its
training step, and the marker lines run.py reads from their stdout."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

BATCH_SIZE = 100
EVAL_BATCH_SIZE = 1000  # the daemon's train.eval_batch_size


def emit(event: str, **fields: object) -> None:
    """One JSON line on stdout stamped with the wall clock, which run.py compares with the launch time."""
    # One write, newline included: the ranks of bench.plain_ddp share stdout.
    sys.stdout.write(json.dumps({"event": event, "time": time.time(), **fields}) + "\n")
    sys.stdout.flush()


def mlp(hidden: list[int]) -> nn.Sequential:
    """The seed's MLP 784-…-10 with ReLU, as the daemon's `model.hidden` describes it."""
    layers: list[nn.Module] = []
    width = 28 * 28
    for size in hidden:
        layers += [nn.Linear(width, size), nn.ReLU()]
        width = size
    return nn.Sequential(*layers, nn.Linear(width, 10))


def train_step(
    model: nn.Module, optimizer: torch.optim.Optimizer, images: torch.Tensor, labels: torch.Tensor,
    carry: Callable[[torch.Tensor], torch.Tensor] = lambda loss: loss,
) -> None:  # fmt: skip
    """`carry`: the loss the backward starts from, given the loss (bench.plain_ddp's agreement)."""
    loss = F.cross_entropy(model(images), labels)
    optimizer.zero_grad(set_to_none=True)
    carry(loss).backward()
    optimizer.step()


def arguments(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--data-root", required=True, help="the directory holding MNIST/raw/")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--hidden", default="500", help="hidden widths, comma-separated")
    return parser


def hidden_widths(text: str) -> list[int]:
    return [int(width) for width in text.split(",")]
