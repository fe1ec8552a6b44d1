"""State as the ranks of a run share it: what each rank keeps for itself (saved under its rank's
key), the checkpoint store as every rank sees it (rank 0 writes, the others wait for the result),
and the pickling that carries values between ranks."""

from __future__ import annotations

import io
import pickle
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from daemon.ckpt.registry import Stateful
from daemon.ckpt.schema import conform, require
from daemon.ckpt.store import CheckpointStore, SaveResult
from daemon.errors import TrainerError

if TYPE_CHECKING:
    from daemon.dist.group import Ranks

RANK_KEY = "rank_{}"  # the key of one rank's entry in rank-keyed state


@dataclass(frozen=True)
class OwnState:
    """This rank's value of a rank-keyed part, until `Ranks.gather_rank_keyed` collects every rank's."""

    value: Any


class RankKeyed:
    """A piece of state each rank has its own value of (its RNGs, a task's state): saved for every
    rank, as `{"rank_0": ..., "rank_1": ...}`, gathered to rank 0; each rank loads its own entry back.

    Resumed at another world size (a sharded run, daemon/dist/fsdp.py), the entries are the old
    ranks': a part that knows how to share them out has `load_resharded(entries, rank)` (the running
    sums); any other loads its own rank's entry where there is one, else rank 0's (a task's state).
    The RNGs are then seeded anew for every rank by the group."""

    def __init__(self, part: Stateful, ranks: Ranks) -> None:
        self.part = part
        self.ranks = ranks

    def check_state(self, state: Any, checkpoint: dict, where: str) -> None:
        """One entry per rank of the run that saved it (its `world_size`), each as this rank's own
        value is (or as the part checks its own format)."""
        saved_by = checkpoint.get("world_size", 1)
        # The count first: a forged world_size must not make a set of a billion names.
        require(
            isinstance(state, dict)
            and len(state) == saved_by
            and state.keys() == {RANK_KEY.format(rank) for rank in range(saved_by)},
            where,
            f"must hold one entry for each of the {saved_by} rank(s) that saved it, rank_0 to rank_{saved_by - 1}",
        )
        check = getattr(self.part, "check_state", None)
        own = None if callable(check) else self.part.state_dict()
        for key in sorted(state):
            if own is None:
                check(state[key], checkpoint, f"{where}.{key}")  # type: ignore[misc]
            else:
                conform(state[key], own, f"{where}.{key}")

    def state_dict(self) -> OwnState:
        return OwnState(self.part.state_dict())

    def load_state_dict(self, state: dict) -> None:
        # One entry per rank that saved it (check_state): as many as this run's ranks unless resharded.
        own = RANK_KEY.format(self.ranks.rank)
        resharded = len(state) != self.ranks.world_size
        load_resharded = getattr(self.part, "load_resharded", None)
        if resharded and callable(load_resharded):
            load_resharded(state, self.ranks.rank)
        else:
            self.part.load_state_dict(state[own] if own in state else state[RANK_KEY.format(0)])


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


NUMPY_DTYPES = {
    torch.uint8,
    torch.int8,
    torch.int16,
    torch.int32,
    torch.int64,
    torch.float16,
    torch.float32,
    torch.float64,
    torch.bool,
}


def pickled(value: Any) -> torch.Tensor:
    buffer = io.BytesIO()
    _TensorsAsArrays(buffer, protocol=pickle.HIGHEST_PROTOCOL).dump(value)
    return torch.frombuffer(bytearray(buffer.getbuffer()), dtype=torch.uint8)


def unpickled(data: torch.Tensor) -> Any:
    return pickle.loads(data.numpy().data)
