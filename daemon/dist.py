"""One rank of a run trained by several processes: the process group, the agreement on stop and
save requests at step boundaries, state that each rank keeps for itself, and the checkpoint as every
rank sees it (rank 0 reads and writes it; no rank goes on before a save is durable).

A process started without RANK in its environment trains alone: `Solo` has the same interface and
does nothing collective, so the loop has one shape for both.
"""

from __future__ import annotations

import datetime
import io
import os
import pickle
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import structlog
import torch
import torch.distributed as dist
from torch import nn

from daemon.checkpoint import BackgroundWriter, CheckpointStore, SaveResult
from daemon.config import DistConfig
from daemon.errors import TrainerError
from daemon.registry import Stateful
from daemon.state import RNGState

RANK_KEY = "rank_{}"  # the key of one rank's entry in rank-keyed state


@dataclass(frozen=True)
class Requests:
    """What the loop is asked to do at a step boundary."""

    stop: bool = False  # SIGTERM/SIGINT: emergency checkpoint and exit
    save: bool = False  # SIGUSR1: a checkpoint now, then go on
    periodic: bool = False  # checkpoint.every_seconds has passed (by some rank's clock)

    def __or__(self, other: Requests) -> Requests:
        return Requests(stop=self.stop or other.stop, save=self.save or other.save, periodic=self.periodic or other.periodic)


def rank_from_env() -> tuple[int, int, int] | None:
    """(rank, world size, local rank) as torchrun and the elastic agent set them; None alone."""
    if "RANK" not in os.environ:
        return None
    return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])


def seed_for_rank(seed: int, rank: int) -> int:
    """Each rank's own stream for what a step draws (dropout): the same masks on every rank's
    slice would correlate them. Rank 0 keeps the configured seed."""
    return (seed + rank) % 2**32


class Solo:
    """A run of one process."""

    rank = 0
    world_size = 1
    is_writer = True

    def __init__(self, local: Callable[[], Requests]) -> None:
        self.local = local  # the pending requests, which nobody else need agree on

    def place(self, device: torch.device) -> torch.device:
        return device

    def reseed(self, seed: int) -> None:
        pass

    def wrap(self, model: nn.Module) -> nn.Module:
        return model

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

    def close(self, log) -> None:
        pass


class Ranks:
    """This process as one rank of a process group that the elastic launcher (or torchrun) started."""

    is_writer: bool

    def __init__(
        self, cfg: DistConfig, rank: int, world_size: int, local_rank: int, device: torch.device,
        local: Callable[[], Requests],
    ) -> None:  # fmt: skip
        self.rank, self.world_size, self.local_rank = rank, world_size, local_rank
        self.is_writer = rank == 0
        structlog.contextvars.bind_contextvars(rank=rank)  # every event says which rank logged it
        backend = cfg.backend if cfg.backend != "auto" else ("nccl" if device.type == "cuda" else "gloo")
        timeout = datetime.timedelta(seconds=cfg.timeout_seconds)
        dist.init_process_group(backend, timeout=timeout)
        # The stop checks between epochs, gathers and broadcasts of the daemon's own run over gloo,
        # in a group of their own: they never wait behind gradient buckets, and stay on the CPU
        # under NCCL.
        self.group = dist.new_group(backend="gloo", timeout=timeout) if backend != "gloo" else dist.group.WORLD
        self.agreement = Agreement(self.group, local)

    def place(self, device: torch.device) -> torch.device:
        """One CUDA device per rank on its node; the CPU is shared."""
        if device.type != "cuda":
            return device
        torch.cuda.set_device(self.local_rank)
        return torch.device("cuda", self.local_rank)

    def reseed(self, seed: int) -> None:
        """After the model's initialisation (the same on every rank): each rank's own stream from here."""
        RNGState.seed_all(seed_for_rank(seed, self.rank))

    def wrap(self, model: nn.Module) -> nn.Module:
        device_ids = [self.local_rank] if next(model.parameters()).is_cuda else None
        return self.agreement.replicate(model, device_ids)

    def carry(self, loss: torch.Tensor) -> torch.Tensor:
        return self.agreement.carry(loss)

    def rank_keyed(self, part: Stateful) -> Stateful:
        return RankKeyed(part, self)

    def store(self, store: CheckpointStore) -> CheckpointStore:
        return RankZeroStore(store, self)

    def writer(self, store: CheckpointStore) -> BackgroundWriter | NoWriter:
        return BackgroundWriter(store) if self.is_writer else NoWriter()

    def broadcast(self, value: Any) -> Any:
        """Rank 0's `value` on every rank; an error rank 0 met is raised on every rank."""
        data = _pickled(value) if self.is_writer else None
        size = torch.tensor([len(data) if data is not None else 0], dtype=torch.int64)
        dist.broadcast(size, src=0, group=self.group)
        if data is None:
            data = torch.empty(int(size), dtype=torch.uint8)
        dist.broadcast(data, src=0, group=self.group)
        value = _unpickled(data)
        if isinstance(value, TrainerError):
            raise value
        return value

    def gather_rank_keyed(self, state: dict) -> dict:
        """`state` with each rank-keyed part's value replaced by every rank's, by rank, in one
        gather (a checkpoint's save waits for it); on the other ranks, by their own only."""
        own = {key: value.value for key, value in state.items() if isinstance(value, OwnState)}
        gathered = self.gather(own) or [own]
        ranks = range(self.world_size) if self.is_writer else [self.rank]
        return {**state, **{key: {RANK_KEY.format(rank): values[key] for rank, values in zip(ranks, gathered)} for key in own}}

    def sum_over_ranks(self, values: torch.Tensor) -> torch.Tensor:
        summed = values.cpu()  # the daemon's own group is gloo's, on the CPU
        dist.all_reduce(summed, group=self.group)
        return summed

    def gather(self, value: Any) -> list | None:
        """Every rank's `value`, by rank, on rank 0; None on the others."""
        data = _pickled(value)
        sizes = [torch.zeros(1, dtype=torch.int64) for _ in range(self.world_size)]
        dist.all_gather(sizes, torch.tensor([len(data)], dtype=torch.int64), group=self.group)
        longest = max(int(size) for size in sizes)
        padded = torch.cat([data, data.new_zeros(longest - len(data))])
        received = [torch.empty(longest, dtype=torch.uint8) for _ in sizes] if self.is_writer else None
        dist.gather(padded, received, dst=0, group=self.group)
        if not self.is_writer:
            return None
        return [_unpickled(buffer[: int(size)]) for buffer, size in zip(received, sizes)]

    def resume(self, resume: Callable[[Callable[[dict], None]], Any], load: Callable[[dict], None]) -> bool:
        """Rank 0 finds, checks and loads the newest usable checkpoint (`resume(load)`); the others
        load what it sends them, so the checkpoint directory need not be shared between nodes."""
        loaded: list[dict] = []
        outcome: Any = None
        if self.is_writer:
            try:
                resume(lambda state: (load(state), loaded.append(state)))
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

    def close(self, log) -> None:
        log.info("agreement_cost", **self.agreement.cost())


class Agreement:
    """The ranks' pending requests, combined so that every rank acts on the same ones after the
    same step.

    They travel as the gradient of a parameter of their own, three numbers that DDP reduces in a
    bucket with the model's gradients: each backward starts by handing this rank's flags to that
    gradient (`carry`, on the loss), and the step boundary reads the reduced one (a mean: above
    zero where any rank asks). No collective of its own and no copy. A request recorded before a
    step's backward begins is acted on at its boundary, a later one at the next: at most two
    boundaries after a signal reached any rank. Reading a flag leaves its request pending (a
    SIGUSR1 is consumed as its checkpoint is made), so the flags of a backward that is undone (the
    settling pass's) lose nothing.
    """

    def __init__(self, group, local: Callable[[], Requests]) -> None:
        self.group = group  # for the synchronous checks between epochs
        self._local = local  # this rank's pending requests, read as a backward begins
        self.flags: nn.Parameter | None = None  # on the model's device, once `replicate` placed them
        self._carried = Requests()  # agreed by a stop check between epochs, acted on at the next boundary
        self.boundaries = self.steps = 0
        self.hand_s = self.read_s = self.steps_s = 0.0  # steps_s: boundary to boundary, over `steps`
        self._last_boundary: float | None = None

    def replicate(self, model: nn.Module, device_ids: list[int] | None) -> nn.parallel.DistributedDataParallel:
        """`model` under DDP, with the flags among the parameters whose gradients it reduces."""
        first = next(model.parameters())  # its dtype, so that the flags share a bucket with gradients
        self.flags = nn.Parameter(torch.zeros(3, dtype=first.dtype, device=first.device))
        both = nn.Module()
        both.model, both.flags = model, self.flags
        # Without find_unused_parameters DDP skips a walk of the autograd graph at every step (~10% of
        # an MLP step); the price is a bucket layout that changes after a process's first backward,
        # which `Stepper` settles before the first step (daemon/stepping.py).
        replicated = nn.parallel.DistributedDataParallel(both, device_ids=device_ids)
        # DDP took the parameters to reduce (and the buffers to broadcast) as it was built. From here
        # the module it runs, and the one a task sees through it, is the model alone: its
        # `parameters()`, `module` and state are the model's, without the flags.
        replicated.module = model
        return replicated

    def carry(self, loss: torch.Tensor) -> torch.Tensor:
        """`loss`, whose backward hands this rank's flags to theirs: what the backward starts from."""
        return _HandFlags.apply(loss, self.flags, self)

    def local_flags(self) -> torch.Tensor:
        started = time.perf_counter()
        local = self._local()
        flags = torch.tensor((local.stop, local.save, local.periodic), dtype=self.flags.dtype, device=self.flags.device)
        self.hand_s += time.perf_counter() - started
        return flags

    def _read(self) -> Requests:
        """What the backwards since the last read (every step has one) brought back from every rank."""
        reduced, self.flags.grad = self.flags.grad, None
        if reduced is None:  # none since the stop check between epochs read them
            return Requests()
        stop, save, periodic = reduced.tolist()
        return Requests(stop=stop > 0, save=save > 0, periodic=periodic > 0)

    def settle(self) -> Requests:
        """At a step boundary: the requests every rank acts on now."""
        started = time.perf_counter()
        carried, self._carried = self._carried, Requests()
        requests = self._read()
        now = time.perf_counter()
        self.read_s += now - started
        if self._last_boundary is not None:
            self.steps_s += now - self._last_boundary
            self.steps += 1
        self._last_boundary = now
        self.boundaries += 1
        return carried | requests

    def stop_agreed(self, stop: bool) -> bool:
        """Whether any rank asks to stop, now (synchronously): between epochs and at start-up.
        Requests the last backward brought back are kept for the next boundary."""
        self._carried = self._carried | self._read()
        self._last_boundary = None  # an evaluation or a save between epochs is no step
        asked = torch.tensor([stop or self._carried.stop], dtype=torch.uint8)
        dist.all_reduce(asked, op=dist.ReduceOp.MAX, group=self.group)
        return bool(asked.item())

    def cost(self) -> dict:
        hand_ms = self.hand_s / max(self.boundaries, 1) * 1e3
        read_ms = self.read_s / max(self.boundaries, 1) * 1e3
        step_ms = self.steps_s / max(self.steps, 1) * 1e3
        share = 100 * (hand_ms + read_ms) / step_ms if self.steps else 0.0  # of a step, boundary to boundary
        return {"boundaries": self.boundaries, "hand_ms_mean": round(hand_ms, 4), "read_ms_mean": round(read_ms, 4),
                "step_ms_mean": round(step_ms, 3), "share_of_step_percent": round(share, 2)}  # fmt: skip


class _HandFlags(torch.autograd.Function):
    """The identity on the loss; its backward, the first of a step, gives the flags parameter this
    rank's requests as its gradient."""

    @staticmethod
    def forward(ctx, loss: torch.Tensor, flags: torch.Tensor, agreement: Agreement) -> torch.Tensor:
        ctx.agreement = agreement
        return loss.view_as(loss)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None]:
        return grad, ctx.agreement.local_flags(), None


@dataclass(frozen=True)
class OwnState:
    """This rank's value of a rank-keyed part, until `Ranks.gather_rank_keyed` collects every rank's."""

    value: Any


class RankKeyed:
    """A piece of state each rank has its own value of (its RNGs, a task's state): saved for every
    rank, as `{"rank_0": ..., "rank_1": ...}`, gathered to rank 0; each rank loads its own entry back."""

    def __init__(self, part: Stateful, ranks: Ranks) -> None:
        self.part = part
        self.ranks = ranks

    def state_dict(self) -> OwnState:
        return OwnState(self.part.state_dict())

    def load_state_dict(self, state: dict) -> None:
        self.part.load_state_dict(state[RANK_KEY.format(self.ranks.rank)])


class RankZeroStore:
    """The checkpoint store as every rank sees it: rank 0 writes (and prunes); each other rank
    waits until the file is durable, and gets its result (or the error that stopped it)."""

    def __init__(self, store: CheckpointStore, ranks: Ranks) -> None:
        self.store = store
        self.directory = store.directory
        self.ranks = ranks

    def save(self, state: dict) -> SaveResult:
        outcome: SaveResult | TrainerError | None = None
        if self.ranks.is_writer:
            try:
                outcome = self.store.save(state)
            except TrainerError as exc:
                outcome = exc
        return self.ranks.broadcast(outcome)

    def prune(self) -> None:
        if self.ranks.is_writer:
            self.store.prune()


class NoWriter:
    """The background writer of a rank that writes no checkpoint: a snapshot is taken on rank 0."""

    def submit(self, state: dict) -> list[SaveResult]:
        return []

    def poll(self) -> list[SaveResult]:
        return []

    def drain(self) -> list[SaveResult]:
        return []

    def close(self) -> list[SaveResult]:
        return []


class _TensorsAsArrays(pickle.Pickler):
    """Pickles tensors as numpy arrays, on the CPU (as a checkpoint loads: another rank's device
    means nothing to rank 0). torch's own reduction writes each tensor's storage through a
    torch.save of its own: for a rank's RNG states it made a gather ~2 ms, a tenth of an emergency
    checkpoint's time."""

    def reducer_override(self, obj: Any) -> Any:
        if type(obj) is not torch.Tensor:
            return NotImplemented
        if obj.device.type != "cpu" or obj.requires_grad:
            return _as_is, (obj.detach().cpu(),)
        if obj.dtype in NUMPY_DTYPES:
            return torch.from_numpy, (obj.numpy(),)
        return NotImplemented  # torch's own reduction (bfloat16, complex halves...)


def _as_is(value: Any) -> Any:
    return value


NUMPY_DTYPES = {torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64, torch.float16, torch.float32,
                torch.float64, torch.bool}  # fmt: skip


def _pickled(value: Any) -> torch.Tensor:
    buffer = io.BytesIO()
    _TensorsAsArrays(buffer, protocol=pickle.HIGHEST_PROTOCOL).dump(value)
    return torch.frombuffer(bytearray(buffer.getbuffer()), dtype=torch.uint8)


def _unpickled(data: torch.Tensor) -> Any:
    return pickle.loads(memoryview(data.numpy()))


def join(cfg: DistConfig, device: torch.device, local: Callable[[], Requests]) -> Solo | Ranks:
    """This process's place in the run: a rank when a launcher started it as one, else alone.
    `local`: this process's pending requests, which the ranks agree on at each step."""
    found = rank_from_env()
    if found is None:
        return Solo(local)
    rank, world_size, local_rank = found
    return Ranks(cfg, rank, world_size, local_rank, device, local)
