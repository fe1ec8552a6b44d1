"""The floor for a task of one's own: the example CNN (examples/mnist_cnn.py: the same model,
data and augmentation, imported from it) in the plain PyTorch loop its author would write without
the daemon: a shuffled DataLoader with 2 workers, Adam, no checkpoints, the test set at the end."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from bench.common import arguments, emit
from daemon.config.sections import Config
from daemon.train.task import TaskContext, load_entry

# A file, not an installed package: imported as the daemon imports a task's file.
EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "mnist_cnn.py"


def main() -> None:
    parser = arguments(__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    config = Config()
    config.data.root = args.data_root
    torch.manual_seed(0)
    task = load_entry(f"{EXAMPLE}:MnistCNN")(TaskContext(options={}, device=torch.device("cpu"), config=config))
    model = task.model
    optimizer = torch.optim.Adam(model.parameters(), lr=0.002)
    loader = torch.utils.data.DataLoader(task.train_set, batch_size=100, shuffle=True, num_workers=args.workers)
    emit("train_started")
    for epoch in range(args.epochs):
        model.train()
        for images, labels in loader:
            loss = F.cross_entropy(model(images), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        model.eval()
        with torch.inference_mode():
            accuracy = task.evaluate(model)["test_accuracy"]
        emit("epoch_completed", epoch=epoch + 1, test_accuracy=accuracy)


if __name__ == "__main__":
    main()
