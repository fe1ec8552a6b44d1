"""The checkpoint manager: the one owner of everything a checkpoint is.

It holds every resumable piece of the run under its key (the registry), writes the format's header
around them, knows when a save is due and how it is written (daemon/ckpt/saving.py), finds, checks
and loads the checkpoint a run resumes from (daemon/ckpt/resume.py), and keeps the metrics history
in step with the checkpoints. The loop calls `resume()` once and `save(kind)` where a checkpoint
is due, as torchtitan's trainer calls its CheckpointManager.

A checkpoint of format 1 holds, besides each registered piece under its key:

    format_version, kind                      what this file is (daemon/ckpt/schema.py)
    epoch, step_in_epoch, global_step         where the run stands
    metrics, history                          the epoch in flight's running sums; each completed epoch
    config, fingerprint                       the settings it was trained with (daemon/config/exactness.py)
    cpu_threads, world_size                   what a resume must keep for the same bits
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from daemon import events
from daemon.ckpt.history import MetricsHistory
from daemon.ckpt.lease import Lease
from daemon.ckpt.logged_step import LoggedStep
from daemon.ckpt.registry import Stateful, StateRegistry
from daemon.ckpt.remote import RemoteTier
from daemon.ckpt.resume import Resumer
from daemon.ckpt.saving import Saver
from daemon.ckpt.schema import FORMAT_VERSION, CheckpointSchema, RunShape
from daemon.ckpt.sharded import ShardedStore
from daemon.ckpt.store import CheckpointStore
from daemon.ckpt.uploads import Uploader
from daemon.config.sections import CheckpointConfig
from daemon.errors import ConfigError

if TYPE_CHECKING:
    from daemon.dist.group import ProcessGroup
    from daemon.train.state import TrainProgress


class CheckpointManager:
    def __init__(
        self,
        cfg: CheckpointConfig,
        *,
        settings: dict[str, Any],
        fingerprint: str,
        cpu_threads_setting: int | None,
        group: ProcessGroup,
        progress: TrainProgress,
        shape: RunShape,
        parameters: list[torch.Tensor],
        optimizer_probe: dict | None,
    ) -> None:
        """`settings`: this run's flat settings, as its checkpoints store them under `config`;
        `group`: the ranks this process trains with (rank 0 writes, every rank loads); `shape`: how
        the run counts steps and schedules; `parameters`: the optimizer's, in its order;
        `optimizer_probe`: what the configured optimizer keeps (None: the task builds its own)."""
        self.group = group
        self.progress = progress
        self.settings = settings
        self.fingerprint = fingerprint
        self._parameters, self._optimizer_probe, self._shape = parameters, optimizer_probe, shape  # for the schema
        self.registry = StateRegistry()
        # A sharded run's checkpoints are directories every rank writes to (daemon/ckpt/sharded.py).
        self.store = (ShardedStore if group.shards else CheckpointStore)(Path(cfg.dir), cfg.keep_last)
        if cfg.remote and group.shards:
            # TODO(sharded-remote): upload a sharded checkpoint's directory with the same commit rule.
            raise ConfigError("checkpoint.remote: not yet for dist.strategy: fsdp; leave it unset for a sharded run")
        self.logged = LoggedStep(self.store.directory)
        self.history = MetricsHistory(self.store.directory, progress) if group.is_writer else None
        # The remote tier, on the writing rank: reachable and leased to this run before training starts.
        remote = RemoteTier(cfg.remote, cfg.remote_options) if cfg.remote and group.is_writer else None
        self.lease: Lease | None = None
        self.uploads: Uploader | None = None
        self.upload_timeout_s = cfg.remote_stop_timeout_seconds if remote else 0.0
        if remote:
            remote.check_usable()
            self.lease = Lease(remote, cfg.remote_lease_seconds)
            self.lease.acquire()
            self.uploads = Uploader(remote, self.lease, self.store.directory, cfg.keep_last)
        writer = group.writer(self.store) if cfg.async_save else None
        self.saver = Saver(
            cfg,
            group.store(self.store),
            writer,
            self.state_dict,
            progress,
            self.logged,
            self.uploads,
            chooses_interval=group.is_writer,
        )
        self.resumer = Resumer(
            self.store,
            self.logged,
            settings=settings,
            fingerprint=fingerprint,
            cpu_threads_setting=cpu_threads_setting,
            world_size=group.world_size,
            reshards=group.reshards,
            remote=remote,
        )

    def register(self, key: str, part: Stateful | None, *, per_rank: bool = False) -> None:
        """A resumable piece under its checkpoint key (None: this run has none, saved as None);
        `per_rank`: each rank keeps its own value, saved under the rank's key."""
        self.registry.register(key, self.group.rank_keyed(part) if per_rank and part is not None else part)

    # -- the format -------------------------------------------------------------------------

    def state_dict(self, kind: str) -> dict:
        """Everything a bitwise-exact resume needs, under the keys of the checkpoint format."""
        return {
            "format_version": FORMAT_VERSION,
            "kind": kind,
            **self.progress.state_dict(
                self.group.sum_over_ranks
            ),  # epoch, step_in_epoch, global_step, metrics, history
            **self.group.gather_rank_keyed(self.registry.state_dict()),
            "config": self.settings,
            "fingerprint": self.fingerprint,
            "cpu_threads": torch.get_num_threads(),
            "world_size": self.group.world_size,
        }

    def load_state_dict(self, state: dict) -> None:
        self.progress.load_state_dict(state)
        self.registry.load_state_dict(state)

    # -- resuming ---------------------------------------------------------------------------

    def resume(self) -> str | None:
        """Load the newest usable checkpoint into every registered piece (rank 0 finds and checks it,
        every rank loads it); the kind resumed from, None on a fresh start."""
        # On every rank: the template is this run's own state, and taking it gathers the ranks' state.
        schema = CheckpointSchema(
            template=self.state_dict("periodic"),
            validators=self.registry.validators(),
            parameters=self._parameters,
            optimizer_probe=self._optimizer_probe,
            shape=self._shape,
        )
        position = self.progress.position
        if self.group.resume(lambda load: self.resumer.resume(schema, load, position), self.load_state_dict):
            self.saver.mark_on_disk()
        resumed = self.resumer.resumed
        if self.uploads and resumed:
            self.uploads.protect.add(resumed.path.name)  # retention keeps what this run stands on
            if resumed.path.name not in self.resumer.remote_committed:  # e.g. its upload was abandoned
                self.uploads.enqueue(resumed.path)
        kind = resumed.kind if resumed else None
        if self.history:
            self.history.start(kind, self.resumer.steps_lost)
        return kind

    # -- saving -----------------------------------------------------------------------------

    @property
    def up_to_date(self) -> bool:
        """The current state is on disk already (or being written)."""
        return self.saver.up_to_date

    @property
    def last_save_ms(self) -> float:
        return self.saver.last_save_ms

    def due_by_clock(self) -> bool:
        return self.saver.due_by_clock()

    def periodic_due(self, *, by_clock: bool) -> bool:
        """A periodic save is due after this step: `checkpoint.every_steps`, or the clock (`by_clock`:
        every_seconds, or checkpoint.max_overhead's interval, as the ranks agreed on it)."""
        return self.saver.due_by_steps() or by_clock

    def save(self, kind: str, *, wait: bool) -> None:
        """Checkpoint the current step unless it is on disk already. `wait`: durable on return;
        else written in the background. The history's record of a stop's or request's checkpoint
        precedes the file: a record without its file is dropped on resume, a file without its
        record would stay so."""
        if self.up_to_date:
            return
        if self.history:
            self.history.mark_checkpoint(kind)
        self.saver.save(kind, wait=wait)

    def save_position(self, kind: str) -> None:
        """A durable checkpoint of this step, unless the newest one holds it already."""
        if self.up_to_date:
            self.saver.drain()
            events.CHECKPOINT_SKIPPED.emit(
                reason="no step trained since the newest checkpoint", **self.progress.position()
            )
        else:
            self.save(kind, wait=True)

    def poll(self) -> None:
        """Report the background saves that have finished."""
        self.saver.poll()

    def confirm_remote(self) -> None:
        """At each step: raise LeaseLost (exit 69) once another run took over the remote prefix."""
        if self.lease:
            self.lease.confirm()

    # -- the metrics history ----------------------------------------------------------------

    def record_training(self, loss: float, metrics: dict[str, float]) -> None:
        if self.history:
            self.history.train_record(loss, metrics)

    def record_epoch(self, entry: dict, seconds: float, headline: str) -> None:
        """Before the epoch's checkpoint: a kill between the two must not lose the record."""
        if self.history:
            self.history.epoch_done(entry, seconds, headline)

    def close(self, *, keep_lease: bool = False) -> None:
        """`keep_lease`: the process re-executes as its successor, which adopts the remote lease."""
        try:
            self.saver.close()
            if self.uploads:
                self.uploads.finish(self.upload_timeout_s)
        finally:
            if self.lease and not keep_lease:
                self.lease.release()
            if self.history:
                self.history.close()
