"""`dist.strategy: fsdp`: the ranks of a run shard the model and the optimizer's state (FSDP2's
`fully_shard`), and every rank writes its shard of each checkpoint (daemon/ckpt/sharded.py).

What differs from DDP (daemon/dist/group.py's `Ranks`, which this extends): the model is sharded
before the optimizer takes its parameters; the requests are agreed by a small all_reduce at each
step boundary (daemon/dist/agreement.py's `BoundaryAgreement`); the model's and the optimizer's
state are written by every rank with torch.distributed.checkpoint (periodic saves in the background
with its `async_save`), the rest and the commit record by rank 0;
rank 0 still finds and checks the checkpoint a run resumes from, then every rank loads its shards
from it, so every rank must see the checkpoint directory (one node, or a shared file system).
"""

from __future__ import annotations

import dataclasses
import datetime
import time
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import Any, cast

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.fsdp import fully_shard

from daemon.ckpt.registry import Stateful
from daemon.ckpt.rng import RNGState
from daemon.ckpt.schema import require
from daemon.ckpt.sharded import ShardedState, ShardedStore, layout, shards
from daemon.ckpt.store import CheckpointStore, SaveResult
from daemon.ckpt.writer import BackgroundWriter, snapshot
from daemon.config.sections import DistConfig
from daemon.dist.agreement import BoundaryAgreement, Requests
from daemon.dist.group import Ranks, seed_after_reshard
from daemon.dist.rank_state import NoWriter, RankZeroStore
from daemon.errors import CheckpointWriteError, TrainerError


class Sharded(Ranks):
    """One rank of a run whose model and optimizer's state are sharded over the ranks."""

    shards = True

    def __init__(
        self,
        cfg: DistConfig,
        rank: int,
        world_size: int,
        local_rank: int,
        device: torch.device,
        local: Callable[[], Requests],
    ) -> None:
        super().__init__(cfg, rank, world_size, local_rank, device, local)
        self.reshards = cfg.allow_reshard
        self.agreement = BoundaryAgreement(self.group, local)  # type: ignore[assignment]
        # Background saves finish (gather every rank's result, write DCP's index) on a thread, over a
        # gloo group of their own: never interleaved with the training's collectives.
        save_group = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=cfg.timeout_seconds))
        assert isinstance(save_group, dist.ProcessGroup)  # every rank is a member
        self.save_group: dist.ProcessGroup = save_group
        self.parts: ShardedParts | None = None  # once `checkpointed` made them

    def wrap(self, model: nn.Module) -> nn.Module:
        """Each top-level child that holds parameters a unit of its own (its parameters gathered for
        its forward and freed after), then the root for what is left: the default wrap policy of
        torchtitan's and Lightning's FSDP2. In place: the parameters become DTensors, so this comes
        before the optimizer takes them."""
        for child in model.children():
            if any(True for _ in child.parameters()):
                fully_shard(child)
        fully_shard(model)
        return model

    def checkpointed(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[Stateful, Stateful]:
        self.parts = ShardedParts(model, optimizer)
        return self.parts.model_piece, self.parts.optimizer_piece

    def store(self, store: CheckpointStore) -> RankZeroStore:
        assert isinstance(store, ShardedStore)  # the checkpoint manager's, for a group that shards
        return ShardedRankStore(store, self)

    def writer(self, store: CheckpointStore) -> BackgroundWriter | NoWriter:
        assert isinstance(store, ShardedStore)  # the checkpoint manager's, for a group that shards
        return ShardedWriter(store, self)

    def on_writer(self, act: Callable[[], Any]) -> Any:
        """`act()` on rank 0, its result on every rank; its TrainerError raised on every rank."""
        outcome: Any = None
        if self.is_writer:
            try:
                outcome = act()
            except TrainerError as exc:
                outcome = exc
        return self.broadcast(outcome)

    def resume(self, resume: Callable[[Callable[[dict], None]], Any], load: Callable[[dict], None]) -> bool:
        """As `Ranks.resume` (rank 0 finds and checks the checkpoint, every rank loads what is not
        sharded), then every rank loads its shards from the checkpoint's directory: DCP's load is a
        collective, so it waits until every rank knows which checkpoint. From a checkpoint of another
        world size DCP reshards them; every rank's RNGs then start a stream of their own
        (`seed_after_reshard`), the rest of the rank-keyed state as `RankKeyed` says."""
        found: list[Path] = []

        def resume_and_keep(load: Callable[[dict], None]) -> Any:
            entry = resume(load)
            if entry is not None:
                found.append(entry.path)
            return entry

        def load_and_reseed(state: dict) -> None:
            load(state)
            if state["world_size"] != self.world_size:
                RNGState.seed_all(seed_after_reshard(self.seed, self.rank, state["global_step"]))

        loaded = super().resume(resume_and_keep, load_and_reseed)
        directory = self.broadcast(found[0] if found else None)
        if directory is not None:
            assert self.parts is not None  # registered as the run was assembled
            self.parts.load(directory)
        return loaded


class ShardedParts:
    """The model and the optimizer of a sharded run as checkpoint pieces: each rank's shards, keyed
    by parameter name (torch.distributed.checkpoint.state_dict), under DCP names of their own."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.model = model
        self.optimizer = optimizer
        self.model_piece = _Piece(self, "model")
        self.optimizer_piece = _Piece(self, "optimizer")

    def state(self, name: str) -> dict:
        if name == "model":
            return get_model_state_dict(self.model)
        fresh = not self.optimizer.state
        state = get_optimizer_state_dict(self.model, self.optimizer)
        if fresh:
            # torch describes an optimizer without state by a step of learning rate 0 that creates it
            # (Adam's step count 1, its moments zeros); the run's first step must find none.
            self.optimizer.state.clear()
        return state

    def load(self, directory: Path) -> None:
        """Every rank: its shards of the model and the optimizer's state from `directory`."""
        # The optimizer's state is described (created) first: DCP loads into the tensors it is given.
        state: dict[str, Any] = {
            "model": get_model_state_dict(self.model),
            "optimizer": get_optimizer_state_dict(self.model, self.optimizer),
        }
        dcp.load(state, checkpoint_id=directory)
        set_model_state_dict(self.model, state["model"])
        set_optimizer_state_dict(self.model, self.optimizer, state["optimizer"])


class _Piece:
    """One sharded piece in the checkpoint manager's registry: its state goes to DCP (`ShardedState`),
    `state.pt` holds its layout, which a resume checks against this run's before anything is loaded."""

    def __init__(self, parts: ShardedParts, name: str) -> None:
        self.parts = parts
        self.name = name
        self._layout: dict | None = None  # of the state last taken: the resume's template takes it on every rank

    def state_dict(self) -> ShardedState:
        value = self.parts.state(self.name)
        self._layout = layout(value)
        return ShardedState(self.name, value)

    def check_state(self, state: Any, checkpoint: dict, where: str) -> None:
        assert self._layout is not None  # the resume's template took this run's state first
        require(state == self._layout, where, "its tensors' names, shapes or dtypes are not this run's")

    def load_state_dict(self, state: Any) -> None:
        """Nothing here: rank 0 reads the checkpoint alone, and loading shards takes every rank
        (`Sharded.resume` does it once every rank knows the directory)."""


class ShardedRankStore(RankZeroStore):
    """The sharded store as every rank sees it: rank 0 prepares the directory, every rank writes its
    shards, then rank 0 the rest and the commit record; every rank gets the result (or the error)."""

    store: ShardedStore
    ranks: Sharded

    def save(self, state: dict) -> SaveResult:
        started = time.perf_counter()
        path = self.store.path_for(state["global_step"], state["kind"])
        self.ranks.on_writer(lambda: self.store.prepare(path))
        try:
            # Returns on rank 0 once every rank's shards are written and fsynced (DCP gathers their results).
            dcp.save(shards(state), checkpoint_id=path)
        except CheckpointException as exc:
            raise shards_not_written(path, exc) from None
        result = self.ranks.on_writer(lambda: self.store.save(state))
        return dataclasses.replace(result, duration_ms=(time.perf_counter() - started) * 1e3)


def shards_not_written(path: Path, exc: CheckpointException) -> CheckpointWriteError:
    return CheckpointWriteError(
        f"cannot write the shards of checkpoint {path}: {exc}; free space or fix permissions "
        f"(the previous checkpoints are intact)"
    )


class ShardedWriter(BackgroundWriter):
    """Periodic saves of a sharded run in the background (`checkpoint.async_save`): every rank's
    shards copied (DCP's staging, the loop's only wait) and written by DCP on a thread of its own;
    then, on rank 0's writer thread, the rest of the state (snapshotted at the same step) and the
    commit record. A stop waits for the save in flight (`drain`) before its own."""

    def __init__(self, store: ShardedStore, ranks: Sharded) -> None:
        super().__init__(store)
        self.store: ShardedStore = store
        self.ranks = ranks

    def submit(self, state: dict[str, Any]) -> list[SaveResult]:
        finished = self.drain()
        path = self.store.path_for(state["global_step"], state["kind"])
        self.ranks.on_writer(lambda: self.store.prepare(path))
        written = dcp.async_save(shards(state), checkpoint_id=path, process_group=self.ranks.save_group)
        assert isinstance(written, Future)  # DCP's thread-based saver, its default
        # The rest at this step, on rank 0; a sharded piece stays as is: only its layout is written.
        rest = snapshot(state) if self.ranks.is_writer else None
        # None on the ranks that commit nothing: `drain` keeps it from being reported.
        self._in_flight = cast(Future[SaveResult], self._executor.submit(self._commit, path, written, rest))
        return finished

    def _commit(self, path: Path, written: Future, rest: dict | None) -> SaveResult | None:
        try:
            written.result()  # on rank 0: every rank's shards written, DCP's index after them
        except CheckpointException as exc:
            raise shards_not_written(path, exc) from None
        if rest is None:  # not rank 0: the commit is rank 0's
            return None
        result = self.store.save(rest)
        self.store.prune()  # here too, off the loop
        return result

    def drain(self) -> list[SaveResult]:
        """Wait for the save in flight; its result on rank 0 (which reports it), nothing on the others."""
        return [result for result in super().drain() if result is not None]
