"""Contender (b), the seed recipe: torchvision MNIST with per-sample ToTensor, a shuffling
DataLoader, `torch.save({'epoch', 'state_dict', 'optimizer'})` at each epoch end, and that file
loaded at start when it exists."""

from __future__ import annotations

import os

import torch
from torch.utils.data import DataLoader
from torchvision import datasets, transforms

from bench.common import BATCH_SIZE, EVAL_BATCH_SIZE, arguments, emit, hidden_widths, mlp, train_step


@torch.inference_mode()
def accuracy(model: torch.nn.Module, loader: DataLoader) -> float:
    correct = 0
    for images, labels in loader:
        correct += (model(images.view(len(images), -1)).argmax(dim=1) == labels).sum().item()
    return correct / len(loader.dataset)


def main() -> None:
    parser = arguments(__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True)
    args = parser.parse_args()
    train_set = datasets.MNIST(args.data_root, train=True, transform=transforms.ToTensor())
    test_set = datasets.MNIST(args.data_root, train=False, transform=transforms.ToTensor())
    train_loader = DataLoader(train_set, batch_size=BATCH_SIZE, shuffle=True)
    test_loader = DataLoader(test_set, batch_size=EVAL_BATCH_SIZE)

    torch.manual_seed(0)
    model = mlp(hidden_widths(args.hidden))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    start_epoch = 0
    if os.path.exists(args.checkpoint):
        checkpoint = torch.load(args.checkpoint, weights_only=True)
        model.load_state_dict(checkpoint["state_dict"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        start_epoch = checkpoint["epoch"]
    emit("train_started", epoch=start_epoch)
    first = True
    for epoch in range(start_epoch, args.epochs):
        for images, labels in train_loader:
            train_step(model, optimizer, images.view(len(images), -1), labels)
            if first:
                emit("first_step")
                first = False
        test_accuracy = accuracy(model, test_loader)
        torch.save(
            {"epoch": epoch + 1, "state_dict": model.state_dict(), "optimizer": optimizer.state_dict()}, args.checkpoint
        )
        emit("epoch_completed", epoch=epoch + 1, test_accuracy=test_accuracy)


if __name__ == "__main__":
    main()
