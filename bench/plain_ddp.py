"""The floor for several ranks: a plain DDP loop under torchrun on MNIST preloaded as tensors, no
checkpoints, no agreement (with `--agreement`, the daemon's agreement on stop and save requests is
posted and settled at each step boundary, as the daemon does: the difference is its cost). The
daemon's work per rank: the same MLP and Adam, global batches of 100
in a shuffled order, rank r training samples r, r+W, r+2W... of each. Each rank reports its epoch's
training seconds and its own peak RSS.

    torchrun --standalone --nproc-per-node 2 bench/plain_ddp.py --data-root data
"""

from __future__ import annotations

import resource
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from daemon.dist import Agreement, Requests

from common import BATCH_SIZE, arguments, emit, hidden_widths, mlp, train_step
from plain_loop import as_float, read_idx


def main() -> None:
    parser = arguments(__doc__.splitlines()[0])
    parser.add_argument("--agreement", action="store_true")
    args = parser.parse_args()
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    raw = Path(args.data_root) / "MNIST" / "raw"
    images = read_idx(raw / "train-images-idx3-ubyte", 16).view(-1, 28 * 28)
    labels = read_idx(raw / "train-labels-idx1-ubyte", 8).long()

    torch.manual_seed(0)  # the same initial model on every rank, as DDP expects
    model = nn.parallel.DistributedDataParallel(mlp(hidden_widths(args.hidden)))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    agreement = Agreement(dist.group.WORLD) if args.agreement else None
    emit("train_started", rank=rank)
    for epoch in range(args.epochs):
        started = time.monotonic()
        order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(epoch))
        for start in range(0, len(order), BATCH_SIZE):
            index = order[start : start + BATCH_SIZE][rank::world]
            train_step(model, optimizer, as_float(images.index_select(0, index)), labels.index_select(0, index))
            if agreement:
                agreement.settle()
                agreement.post(Requests())
        emit("epoch_completed", rank=rank, epoch=epoch + 1, seconds=time.monotonic() - started)
    if agreement:
        agreement.settle()  # the last post: a collective still in flight aborts the process group's teardown
        emit("agreement_cost", rank=rank, **agreement.cost())
    emit("peak_rss", rank=rank, bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
