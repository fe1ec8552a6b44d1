"""The processes a run trains with, behind one Protocol: `Solo` (a process started without RANK in
its environment trains alone, and does nothing collective) and `Ranks` (one rank of a process group
that a launcher started: DDP, the agreement on requests, rank-keyed state, the checkpoint as every
rank sees it: rank 0 reads and writes it, and no rank goes on before a save is durable); `Sharded`
(daemon/dist/fsdp.py) extends `Ranks` for `dist.strategy: fsdp`. The loop has one shape for all.
"""

from __future__ import annotations

import datetime
import hashlib
import os
from collections.abc import Callable
from typing import Any, Protocol

import structlog
import torch
import torch.distributed as dist
from torch import nn

from daemon import events
from daemon.ckpt.registry import Stateful
from daemon.ckpt.rng import RNGState
from daemon.ckpt.store import CheckpointStore
from daemon.ckpt.writer import BackgroundWriter
from daemon.config.sections import DistConfig
from daemon.dist.agreement import Agreement, Requests
from daemon.dist.rank_state import RANK_KEY, NoWriter, OwnState, RankKeyed, RankZeroStore, pickled, unpickled
from daemon.errors import ConfigError, TrainerError


def rank_from_env() -> tuple[int, int, int] | None:
    """(rank, world size, local rank) as torchrun and the elastic agent set them; None alone."""
    if "RANK" not in os.environ:
        return None
    return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])


def seed_for_rank(seed: int, rank: int) -> int:
    """Each rank's own stream for what a step draws (dropout): the same masks on every rank's
    slice would correlate them. Rank 0 keeps the configured seed."""
    return (seed + rank) % 2**32


def seed_after_reshard(seed: int, rank: int, global_step: int) -> int:
    """Each rank's own stream from a resume at another world size: the saved streams belong to the
    old ranks (a new rank taking one would draw the same masks as its owner), so every rank starts a
    new one, the same whenever that checkpoint is resumed at that size."""
    digest = hashlib.sha256(f"trainer-reshard/{seed}/{rank}/{global_step}".encode()).digest()
    return int.from_bytes(digest[:4], "little")  # numpy's seeds are 32-bit


class ProcessGroup(Protocol):
    """What the run asks of the processes it trains with."""

    rank: int
    world_size: int
    is_writer: bool  # writes the checkpoints, the run directory's files and the history (rank 0)
    shards: bool  # the model and the optimizer's state are sharded: checkpoints are directories (daemon/dist/fsdp.py)
    reshards: bool  # a checkpoint of another world size is resumed (fsdp with dist.allow_reshard), not refused

    def place(self, device: torch.device) -> torch.device: ...

    def reseed(self, seed: int) -> None:
        """After the model's initialisation: each rank's own RNG stream from here."""

    def wrap(self, model: nn.Module) -> nn.Module:
        """The model as the steps run it; before the optimizer takes its parameters."""

    def checkpointed(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[Stateful, Stateful]:
        """The model and the optimizer as the checkpoint holds them."""

    def carry(self, loss: torch.Tensor) -> torch.Tensor:
        """The loss a backward starts from."""

    def rank_keyed(self, part: Stateful) -> Stateful: ...

    def gather_rank_keyed(self, state: dict) -> dict: ...

    def sum_over_ranks(self, values: torch.Tensor) -> torch.Tensor: ...

    def store(self, store: CheckpointStore) -> CheckpointStore | RankZeroStore: ...

    def writer(self, store: CheckpointStore) -> BackgroundWriter | NoWriter: ...

    def resume(self, resume: Callable[[Callable[[dict], None]], Any], load: Callable[[dict], None]) -> bool:
        """Whether a checkpoint was loaded (`resume(load)` finds and loads it where it is read)."""

    def agree(self) -> Requests:
        """At a step boundary: the requests every rank acts on now."""

    def stop_agreed(self, stop: bool) -> bool:
        """Outside a step (start-up, between epochs): whether any rank asks to stop."""

    def close(self) -> None: ...


class Solo:
    """A run of one process."""

    rank = 0
    world_size = 1
    is_writer = True
    shards = False
    reshards = False

    def __init__(self, local: Callable[[], Requests]) -> None:
        self.local = local  # the pending requests, which nobody else need agree on

    def place(self, device: torch.device) -> torch.device:
        return device

    def reseed(self, seed: int) -> None:
        pass

    def wrap(self, model: nn.Module) -> nn.Module:
        return model

    def checkpointed(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[Stateful, Stateful]:
        return model, optimizer

    def carry(self, loss: torch.Tensor) -> torch.Tensor:
        return loss

    def gather_rank_keyed(self, state: dict) -> dict:
        return state

    def sum_over_ranks(self, values: torch.Tensor) -> torch.Tensor:
        return values

    def rank_keyed(self, part: Stateful) -> Stateful:
        return part

    def store(self, store: CheckpointStore) -> CheckpointStore:
        return store

    def writer(self, store: CheckpointStore) -> BackgroundWriter:
        return BackgroundWriter(store)

    def resume(self, resume: Callable[[Callable[[dict], None]], Any], load: Callable[[dict], None]) -> bool:
        return resume(load) is not None

    def agree(self) -> Requests:
        return self.local()

    def stop_agreed(self, stop: bool) -> bool:
        return stop

    def close(self) -> None:
        pass


class Ranks:
    """This process as one rank of a process group that the elastic launcher (or torchrun) started."""

    is_writer: bool
    shards = False
    # DDP's exactness rests on the world size (each rank's RNGs, the gradients' order of summation).
    reshards = False

    def __init__(
        self,
        cfg: DistConfig,
        rank: int,
        world_size: int,
        local_rank: int,
        device: torch.device,
        local: Callable[[], Requests],
    ) -> None:
        self.rank, self.world_size, self.local_rank = rank, world_size, local_rank
        self.is_writer = rank == 0
        self.seed = 0  # train.seed, once `reseed` is given it
        structlog.contextvars.bind_contextvars(rank=rank)  # every event says which rank logged it
        backend = cfg.backend if cfg.backend != "auto" else ("nccl" if device.type == "cuda" else "gloo")
        timeout = datetime.timedelta(seconds=cfg.timeout_seconds)
        dist.init_process_group(backend, timeout=timeout)
        # The stop checks between epochs, gathers and broadcasts of the daemon's own run over gloo,
        # in a group of their own: they never wait behind gradient buckets, and stay on the CPU
        # under NCCL.
        group = dist.new_group(backend="gloo", timeout=timeout) if backend != "gloo" else dist.group.WORLD
        # Every rank is a member of the new group (it has them all), and WORLD is set once initialised.
        assert isinstance(group, dist.ProcessGroup)
        self.group: dist.ProcessGroup = group
        self.agreement = Agreement(self.group, local)

    def place(self, device: torch.device) -> torch.device:
        """One CUDA device per rank on its node; the CPU is shared."""
        if device.type != "cuda":
            return device
        torch.cuda.set_device(self.local_rank)
        return torch.device("cuda", self.local_rank)

    def reseed(self, seed: int) -> None:
        """After the model's initialisation (the same on every rank): each rank's own stream from here."""
        self.seed = seed
        RNGState.seed_all(seed_for_rank(seed, self.rank))

    def wrap(self, model: nn.Module) -> nn.Module:
        device_ids = [self.local_rank] if next(model.parameters()).is_cuda else None
        return self.agreement.replicate(model, device_ids)

    def checkpointed(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[Stateful, Stateful]:
        return model, optimizer

    def carry(self, loss: torch.Tensor) -> torch.Tensor:
        return self.agreement.carry(loss)

    def rank_keyed(self, part: Stateful) -> Stateful:
        return RankKeyed(part, self)

    def store(self, store: CheckpointStore) -> CheckpointStore | RankZeroStore:
        return RankZeroStore(store, self)

    def writer(self, store: CheckpointStore) -> BackgroundWriter | NoWriter:
        return BackgroundWriter(store) if self.is_writer else NoWriter()

    def broadcast(self, value: Any) -> Any:
        """Rank 0's `value` on every rank; an error rank 0 met is raised on every rank."""
        data = pickled(value) if self.is_writer else None
        size = torch.tensor([len(data) if data is not None else 0], dtype=torch.int64)
        dist.broadcast(size, src=0, group=self.group)
        if data is None:
            data = torch.empty(int(size), dtype=torch.uint8)
        dist.broadcast(data, src=0, group=self.group)
        value = unpickled(data)
        if isinstance(value, TrainerError):
            raise value
        return value

    def gather_rank_keyed(self, state: dict) -> dict:
        """`state` with each rank-keyed part's value replaced by every rank's, by rank, in one
        gather (a checkpoint's save waits for it); on the other ranks, by their own only."""
        own = {key: value.value for key, value in state.items() if isinstance(value, OwnState)}
        gathered = self.gather(own) or [own]
        ranks = range(self.world_size) if self.is_writer else [self.rank]
        return {
            **state,
            **{
                key: {RANK_KEY.format(rank): values[key] for rank, values in zip(ranks, gathered, strict=True)}
                for key in own
            },
        }

    def sum_over_ranks(self, values: torch.Tensor) -> torch.Tensor:
        summed = values.cpu()  # the daemon's own group is gloo's, on the CPU
        dist.all_reduce(summed, group=self.group)
        return summed

    def gather(self, value: Any) -> list | None:
        """Every rank's `value`, by rank, on rank 0; None on the others."""
        data = pickled(value)
        sizes = [torch.zeros(1, dtype=torch.int64) for _ in range(self.world_size)]
        dist.all_gather(sizes, torch.tensor([len(data)], dtype=torch.int64), group=self.group)
        longest = max(int(size) for size in sizes)
        padded = torch.cat([data, data.new_zeros(longest - len(data))])
        received = [torch.empty(longest, dtype=torch.uint8) for _ in sizes] if self.is_writer else None
        dist.gather(padded, received, dst=0, group=self.group)
        if received is None:  # not rank 0
            return None
        return [unpickled(buffer[: int(size)]) for buffer, size in zip(received, sizes, strict=True)]

    def resume(self, resume: Callable[[Callable[[dict], None]], Any], load: Callable[[dict], None]) -> bool:
        """Rank 0 finds, checks and loads the newest usable checkpoint (`resume(load)`); the others
        load what it sends them, so the checkpoint directory need not be shared between nodes."""
        loaded: list[dict] = []
        outcome: Any = None
        if self.is_writer:

            def load_and_keep(state: dict) -> None:
                load(state)
                loaded.append(state)

            try:
                resume(load_and_keep)
                outcome = loaded[0] if loaded else None
            except TrainerError as exc:  # the same error, and exit code, on every rank
                outcome = exc
        state = self.broadcast(outcome)
        if state is not None and not self.is_writer:
            load(state)
        return state is not None

    def agree(self) -> Requests:
        return self.agreement.settle()

    def stop_agreed(self, stop: bool) -> bool:
        return self.agreement.stop_agreed(stop)

    def close(self) -> None:
        events.AGREEMENT_COST.emit(**self.agreement.cost())


def join(cfg: DistConfig, device: torch.device, local: Callable[[], Requests]) -> ProcessGroup:
    """This process's place in the run: a rank when a launcher started it as one, else alone.
    `local`: this process's pending requests, which the ranks agree on at each step."""
    found = rank_from_env()
    if found is None:
        if cfg.strategy == "fsdp":
            raise ConfigError(
                "dist.strategy: fsdp shards the model over several ranks; set dist.nproc_per_node (or dist.nnodes) "
                "above 1, or start the ranks with torchrun"
            )
        return Solo(local)
    rank, world_size, local_rank = found
    if cfg.strategy == "fsdp":
        from daemon.dist.fsdp import Sharded  # it extends Ranks, defined here

        return Sharded(cfg, rank, world_size, local_rank, device, local)
    return Ranks(cfg, rank, world_size, local_rank, device, local)
