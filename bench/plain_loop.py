"""Contender (a), the floor: a plain PyTorch loop on MNIST preloaded as tensors, no checkpoints.

The same work as the daemon's epoch (the same MLP, Adam, batches of 100 in a shuffled order, a
test-set evaluation at the end), with nothing around it. The images stay uint8 as MNIST stores
them and each batch becomes float as ToTensor makes it, as in the daemon, so that neither the
time nor the memory of the floor is inflated by a float copy of the dataset.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from bench.common import BATCH_SIZE, EVAL_BATCH_SIZE, arguments, emit, hidden_widths, mlp, train_step


def read_idx(path: Path, header: int) -> torch.Tensor:
    return torch.from_numpy(np.fromfile(path, dtype=np.uint8, offset=header))


def as_float(images: torch.Tensor) -> torch.Tensor:
    return images.to(torch.float32).div(255)


@torch.inference_mode()
def accuracy(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    correct = 0
    for start in range(0, len(labels), EVAL_BATCH_SIZE):
        predicted = model(as_float(images[start : start + EVAL_BATCH_SIZE])).argmax(dim=1)
        correct += (predicted == labels[start : start + EVAL_BATCH_SIZE]).sum().item()
    return correct / len(labels)


def main() -> None:
    parser = arguments(__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=0, help="stop after this many steps (0: run every epoch)")
    args = parser.parse_args()
    raw = Path(args.data_root) / "MNIST" / "raw"
    train_images = read_idx(raw / "train-images-idx3-ubyte", 16).view(-1, 28 * 28)
    train_labels = read_idx(raw / "train-labels-idx1-ubyte", 8).long()
    test_images = read_idx(raw / "t10k-images-idx3-ubyte", 16).view(-1, 28 * 28)
    test_labels = read_idx(raw / "t10k-labels-idx1-ubyte", 8).long()

    torch.manual_seed(0)
    model = mlp(hidden_widths(args.hidden))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    emit("train_started")
    steps = 0
    for epoch in range(args.epochs):
        order = torch.randperm(len(train_labels))
        for start in range(0, len(order), BATCH_SIZE):
            index = order[start : start + BATCH_SIZE]
            train_step(
                model, optimizer, as_float(train_images.index_select(0, index)), train_labels.index_select(0, index)
            )
            steps += 1
            if steps == 1:
                emit("first_step")
            if steps == args.steps:
                emit("steps_done", steps=steps)
                return
        emit("epoch_completed", epoch=epoch + 1, test_accuracy=accuracy(model, test_images, test_labels))


if __name__ == "__main__":
    main()
