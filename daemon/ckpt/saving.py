"""The save policy: when a checkpoint is due, which state is already on disk, and how each save
is written (durable before going on, or snapshotted and written in the background) and reported."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from daemon import events
from daemon.ckpt.logged_step import LoggedStep
from daemon.ckpt.store import CheckpointStore, SaveResult
from daemon.ckpt.uploads import Uploader
from daemon.ckpt.writer import BackgroundWriter
from daemon.config.sections import CheckpointConfig

if TYPE_CHECKING:
    from daemon.dist.rank_state import NoWriter, RankZeroStore
    from daemon.train.state import TrainProgress


class Saver:
    def __init__(
        self,
        cfg: CheckpointConfig,
        store: CheckpointStore | RankZeroStore,
        writer: BackgroundWriter | NoWriter | None,
        state: Callable[[str], dict],
        progress: TrainProgress,
        logged: LoggedStep,
        uploads: Uploader | None = None,
    ) -> None:
        """`state(kind)`: the run's checkpoint content now; `writer`: writes periodic saves in the
        background (None: every save is written before the loop goes on); `uploads`: each checkpoint
        is uploaded to the remote tier once durable."""
        self.cfg = cfg
        self.store = store
        self.writer = writer
        self.state = state
        self.progress = progress
        self.logged = logged
        self.uploads = uploads
        # The state on disk, as (epochs completed, global step): completing an epoch changes the
        # state (scheduler, history) without a step. The start needs no file: config and seed recreate it.
        self.last_saved = (0, 0)
        self.last_saved_at = time.monotonic()
        self.last_save_ms = 0.0

    def _key(self) -> tuple[int, int]:
        return self.progress.epoch, self.progress.global_step

    def mark_on_disk(self) -> None:
        """The current state is a checkpoint already (the one just resumed from)."""
        self.last_saved = self._key()

    @property
    def up_to_date(self) -> bool:
        return self._key() == self.last_saved

    def due_by_steps(self) -> bool:
        every_steps = self.cfg.every_steps
        return bool(every_steps and self.progress.global_step % every_steps == 0)

    def due_by_clock(self) -> bool:
        """checkpoint.every_seconds has passed: a fact of this process's clock, which the ranks of a
        run agree on before acting (daemon/dist/group.py)."""
        every_seconds = self.cfg.every_seconds
        return bool(every_seconds and time.monotonic() - self.last_saved_at >= every_seconds)

    def save(self, kind: str, wait: bool) -> None:
        """Checkpoint the current step. `wait`: durable on return; else written in the background."""
        if self.up_to_date:
            return  # this exact state is already on disk
        self.last_saved, self.last_saved_at = self._key(), time.monotonic()
        if self.writer is None or wait:
            done = self.writer.drain() if self.writer else []
            done.append(self.store.save(self.state(kind)))
            self._report(done)
            self.store.prune()  # once the save is reported durable: a stop should not wait for it
            return
        started = time.perf_counter()
        finished = self.writer.submit(self.state(kind))
        self._report(finished)
        events.CHECKPOINT_SNAPSHOT.emit(kind=kind, stall_ms=round((time.perf_counter() - started) * 1e3, 2))

    def poll(self) -> None:
        """Report the background saves that have finished."""
        if self.writer:
            self._report(self.writer.poll())

    def drain(self) -> None:
        """Wait for the background saves in flight, and report them."""
        if self.writer:
            self._report(self.writer.drain())

    def close(self) -> None:
        if self.writer:
            self.writer.close()

    def _report(self, results: list[SaveResult]) -> None:
        for result in results:
            self.last_save_ms = result.duration_ms
            self.logged.mark(max(result.global_step, self.progress.global_step))
            events.CHECKPOINT_SAVED.emit(
                kind=result.kind,
                path=str(result.path),
                bytes=result.bytes,
                duration_ms=round(result.duration_ms, 2),
                checkpoint_global_step=result.global_step,
                **self.progress.position(),
            )
            if self.uploads:
                self.uploads.enqueue(result.path)
