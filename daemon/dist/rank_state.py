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
from daemon.ckpt.schema import listed, require
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
    rank, as `{"rank_0": ..., "rank_1": ...}`, gathered to rank 0; each rank loads its own entry back."""

    def __init__(self, part: Stateful, ranks: Ranks) -> None:
        self.part = part
        self.ranks = ranks
        if callable(getattr(part, "check_state", None)):  # a piece that checks its own format: each rank's entry
            self.check_state = self._check_every_rank

    def _check_every_rank(self, state: Any, checkpoint: dict, where: str) -> None:
        keys = {RANK_KEY.format(rank) for rank in range(self.ranks.world_size)}
        require(isinstance(state, dict) and state.keys() == keys, where, f"must hold the entries of {listed(keys)}")
        for key in sorted(state):
            self.part.check_state(state[key], checkpoint, f"{where}.{key}")  # type: ignore[attr-defined]

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
