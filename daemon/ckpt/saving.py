"""The save policy: when a checkpoint is due, which state is already on disk, and how each save
is written (durable before going on, or snapshotted and written in the background) and reported.

Periodic saves are due every `checkpoint.every_steps` or `every_seconds`, or, with
`checkpoint.max_overhead`, at the interval the save budget chooses from what saves are measured to
cost the loop (daemon/ckpt/budget.py): the step boundary's call to `poll()` times the steps. Every
other save (emergency, on demand, notice, handover, epoch, final) is outside the budget, never skipped.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from daemon import events
from daemon.ckpt.budget import Policy, SaveBudget, SaveMeter
from daemon.ckpt.layout import SAVE_POLICY_FILE, write_atomic
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
        *,
        chooses_interval: bool = True,
    ) -> None:
        """`state(kind)`: the run's checkpoint content now; `writer`: writes periodic saves in the
        background (None: every save is written before the loop goes on); `uploads`: each checkpoint
        is uploaded to the remote tier once durable; `chooses_interval`: with checkpoint.max_overhead,
        this process measures saves and decides when one is due (the writing rank: the others agree
        on its decision, daemon/dist/agreement.py)."""
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
        self.meter = (
            SaveMeter(SaveBudget(cfg.max_overhead, cfg.mtbf_hours))
            if cfg.max_overhead is not None and chooses_interval
            else None
        )

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
        """checkpoint.every_seconds has passed, or the budget's interval: a fact of this process's
        clock, which the ranks of a run agree on before acting (daemon/dist/group.py)."""
        if self.cfg.max_overhead is not None:
            return bool(self.meter and self.meter.due(self.progress.global_step - self.last_saved[1]))
        every_seconds = self.cfg.every_seconds
        return bool(every_seconds and time.monotonic() - self.last_saved_at >= every_seconds)

    def save(self, kind: str, wait: bool) -> None:
        """Checkpoint the current step. `wait`: durable on return; else written in the background."""
        if self.up_to_date:
            return  # this exact state is already on disk
        self.last_saved, self.last_saved_at = self._key(), time.monotonic()
        started = time.perf_counter()
        if self.meter and kind == "periodic":
            self._adopt(self.meter.periodic())
        if self.writer is None or wait:
            done = self.writer.drain() if self.writer else []
            done.append(self.store.save(self.state(kind)))
            self._report(done)
            if self.meter and kind == "periodic":
                self.meter.stalled((time.perf_counter() - started) * 1e3)
            elif self.meter:
                self._adopt(self.meter.other_save())
            self.store.prune()  # once the save is reported durable: a stop should not wait for it
            return
        finished = self.writer.submit(self.state(kind))
        self._report(finished)
        stall_ms = (time.perf_counter() - started) * 1e3
        if self.meter:
            self.meter.stalled(stall_ms)
        events.CHECKPOINT_SNAPSHOT.emit(kind=kind, stall_ms=round(stall_ms, 2))

    def poll(self) -> None:
        """At each step boundary: report the background saves that have finished; with the budget,
        time the step that just ended."""
        if self.writer:
            self._report(self.writer.poll())
        if self.meter:
            self._adopt(self.meter.boundary(time.perf_counter()))

    def drain(self) -> None:
        """Wait for the background saves in flight, and report them."""
        if self.writer:
            self._report(self.writer.drain())

    def close(self) -> None:
        if self.writer:
            self.writer.close()

    def _adopt(self, policy: Policy | None) -> None:
        """A new interval: logged, and written where `trainer status` reads it (advisory: a failure
        to write it changes nothing)."""
        if policy is None:
            return
        fields = policy.fields()
        events.SAVE_POLICY.emit(
            interval_steps=fields["interval_steps"],
            interval_s=fields["interval_s"],
            save_ms=fields["save_ms"],
            write_ms=fields["write_ms"],
            step_ms=fields["step_ms"],
            overhead=fields["overhead"],
            max_overhead=fields["max_overhead"],
            young_daly_steps=fields["young_daly_steps"],
            expected_loss_steps=fields["expected_loss_steps"],
            expected_loss_s=fields["expected_loss_s"],
            reason=fields["reason"],
            **self.progress.position(),
        )
        record = {**fields, "global_step": self.progress.global_step, "time": time.time()}
        try:
            write_atomic(
                self.store.directory,
                SAVE_POLICY_FILE,
                lambda file: file.write(json.dumps(record).encode()),
                durable=False,
            )
        except OSError:
            pass

    def _report(self, results: list[SaveResult]) -> None:
        for result in results:
            self.last_save_ms = result.duration_ms
            if self.meter and result.kind == "periodic":
                self.meter.written(result.duration_ms)
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
