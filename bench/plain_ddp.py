"""The floor for several ranks: a plain DDP loop under torchrun on MNIST preloaded as tensors, no
checkpoints. The daemon's work per rank: the same MLP and Adam, global batches of 100 in a shuffled
order, rank r training samples r, r+W, r+2W... of each. Each rank reports its epoch's training
seconds and its own peak RSS.

With `--agreement`, what the daemon's agreement on stop and save requests costs, side by side in
one process: two copies of the model, one plain, one carrying the daemon's `Agreement` with its
gradients and settling it at each step boundary as the daemon does, train the same batches in
alternating blocks of steps (in turn first in a block), so that the machine's swings fall on both
alike; `--epochs` rounds of one epoch each, with fresh copies. Each rank reports the seconds
each kind of copy took.

    torchrun --standalone --nproc-per-node 2 -m bench.plain_ddp --data-root data
"""

from __future__ import annotations

import copy
import resource
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from bench.common import BATCH_SIZE, arguments, emit, hidden_widths, mlp, train_step
from bench.plain_loop import as_float, read_idx
from daemon.dist.agreement import Agreement, Requests

BLOCK_STEPS = 20  # steps of one copy before the other takes the same batches


class Copy:
    """One copy of the model under DDP, its optimizer and the seconds it trained."""

    def __init__(self, module: nn.Module, agreement: Agreement | None) -> None:
        self.agreement = agreement
        if agreement:
            self.model = agreement.replicate(copy.deepcopy(module), device_ids=None)
        else:
            self.model = nn.parallel.DistributedDataParallel(copy.deepcopy(module))
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=1e-3)
        self.seconds = 0.0

    def train(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        if self.agreement:
            train_step(self.model, self.optimizer, images, labels, self.agreement.carry)
            self.agreement.settle()
        else:
            train_step(self.model, self.optimizer, images, labels)


def main() -> None:
    parser = arguments(__doc__.splitlines()[0])
    parser.add_argument("--agreement", action="store_true", help="measure the agreement's cost instead")
    args = parser.parse_args()
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    raw = Path(args.data_root) / "MNIST" / "raw"
    images = read_idx(raw / "train-images-idx3-ubyte", 16).view(-1, 28 * 28)
    labels = read_idx(raw / "train-labels-idx1-ubyte", 8).long()

    torch.manual_seed(0)  # the same initial model on every rank, as DDP expects
    module = mlp(hidden_widths(args.hidden))
    plain_s = agreement_s = 0.0
    copies = [] if args.agreement else [Copy(module, None)]
    emit("train_started", rank=rank)
    for epoch in range(args.epochs):
        if args.agreement:
            # Fresh copies each epoch, built in turn first: where each lands in memory changes its
            # speed by a few percent, by the luck of the draw.
            copies = [Copy(module, None), Copy(module, Agreement(dist.group.WORLD, Requests))][
                :: -1 if epoch % 2 else 1
            ]
        plain = next(c for c in copies if c.agreement is None)
        plain_before = plain.seconds
        order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(epoch))
        starts = range(0, len(order), BATCH_SIZE)
        for block, first in enumerate(range(0, len(starts), BLOCK_STEPS)):
            for trained in copies[block % len(copies) :] + copies[: block % len(copies)]:
                started = time.perf_counter()
                for start in starts[first : first + BLOCK_STEPS]:
                    index = order[start : start + BATCH_SIZE][rank::world]
                    trained.train(as_float(images.index_select(0, index)), labels.index_select(0, index))
                trained.seconds += time.perf_counter() - started
        if args.agreement:
            plain_s += plain.seconds
            agreement_s += sum(c.seconds for c in copies if c is not plain)
        else:
            emit("epoch_completed", rank=rank, epoch=epoch + 1, seconds=plain.seconds - plain_before)
    if args.agreement:
        emit("agreement_measured", rank=rank, plain_s=plain_s, agreement_s=agreement_s)
    emit("peak_rss", rank=rank, bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
