"""The step boundary: the one safe point where what was recorded during a step becomes what the run
does next.

Signal handlers and the preemption watcher only record (daemon/service/signals.py); the
periodic-save clock and the cpu_wait advisor only measure. After each optimizer step the boundary
reads them, the ranks agree on them (daemon/dist/agreement.py), and the run acts: stop with an
emergency checkpoint, save on request (a SIGUSR1's or a preemption notice's), save periodically,
hand over to a process with another waiting policy, or go on. A run's end is one `Outcome`, as
torch elastic's agent ends a run with one RunResult.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from daemon import events
from daemon.ckpt.lock import RunLock
from daemon.ckpt.manager import CheckpointManager
from daemon.dist.agreement import Requests
from daemon.dist.group import ProcessGroup
from daemon.errors import ExitCode
from daemon.service.contention import WaitAdvisor
from daemon.service.notify import Notifier
from daemon.service.progress import ProgressReporter
from daemon.service.signals import SignalRecorder
from daemon.service.threads import CpuSetting
from daemon.train.state import TrainProgress


@dataclass(frozen=True)
class Outcome:
    """How a run ended: its exit code, and where a `cpu_wait` switch replaces the process with one
    that resumes here, the waiting policy that process starts with."""

    exit_code: ExitCode
    handover: str | None = None


class StepBoundary:
    def __init__(
        self,
        *,
        signals: SignalRecorder,
        group: ProcessGroup,
        manager: CheckpointManager,
        progress: TrainProgress,
        reporter: ProgressReporter,
        notifier: Notifier,
        metrics_every_steps: int,
        steps_per_epoch: int,
        max_steps: int | None,
        waiting: WaitAdvisor | None,
        cpu: CpuSetting,
        run_lock: RunLock | None,
    ) -> None:
        self.signals = signals
        self.group = group
        self.manager = manager
        self.progress = progress
        self.reporter = reporter
        self.notifier = notifier
        self.metrics_every_steps = metrics_every_steps
        self.steps_per_epoch = steps_per_epoch
        self.max_steps = max_steps
        self.waiting = waiting
        self.cpu = cpu
        self.run_lock = run_lock

    def pending(self) -> Requests:
        """This process's own requests, which the ranks agree on; a SIGUSR1 stays pending until its
        checkpoint is made."""
        return Requests(
            stop=self.signals.stop_requested, save=self.signals.save_requested, periodic=self.manager.due_by_clock()
        )

    def step_limit_reached(self) -> bool:
        return self.max_steps is not None and self.progress.global_step >= self.max_steps

    def after_step(self) -> Outcome | None:
        """Act on what every rank agreed on after this step; None: train on."""
        if self.run_lock:
            self.run_lock.confirm_if_due()
        self.manager.confirm_remote()
        every = self.metrics_every_steps
        if every and self.progress.global_step % every == 0:  # before a stop: the resumed run goes on after this step
            loss, metrics = self.progress.running_means(self.group.sum_over_ranks)  # on every rank: a collective
            self.manager.record_training(loss, metrics)
        requests = self.group.agree()
        if requests.stop:
            return self.stop()
        self.manager.poll()
        if requests.save:
            # Every SIGUSR1 and preemption notice pending now makes one checkpoint; the rank that
            # writes names it (another rank may have none pending).
            kind = self.signals.take_save_request() or "on_demand"
            self.confirm_lock()
            self.manager.save(kind, wait=True)
        elif not self._save_follows() and self.manager.periodic_due(by_clock=requests.periodic):
            self.confirm_lock()
            self.manager.save("periodic", wait=False)
        self.reporter.report_if_due()
        if self.waiting and (policy := self.waiting.poll()):
            return self._hand_over(policy)
        return None

    def confirm_lock(self) -> None:
        """Before each save (and the history record before it): raise LockLost (exit 69) if run.lock
        is no longer the file this run locked, for another run may be training in the directory."""
        if self.run_lock:
            self.run_lock.confirm()

    def _save_follows(self) -> bool:
        """The epoch's or the final checkpoint is written right after this step."""
        return self.progress.step_in_epoch == self.steps_per_epoch or self.step_limit_reached()

    def stop_agreed(self) -> bool:
        """Outside a step (start-up, between epochs): whether any rank was asked to stop."""
        return self.group.stop_agreed(self.signals.stop_requested)

    def stop(self) -> Outcome:
        """The emergency checkpoint of this step, durable, then exit 75."""
        for event in self.signals.unreported_stops():
            waited_ms = round((time.monotonic() - event.monotonic) * 1e3, 2)
            events.SIGNAL_RECEIVED.emit(signal=event.name, waited_ms=waited_ms, **self.progress.position())
        self.reporter.refresh()  # the display marks the save under way
        # Ask systemd for room in its stop timeout, should this save be slow.
        self.notifier.extend_timeout(10 + 4 * self.manager.last_save_ms / 1e3 + self.manager.upload_timeout_s)
        self.notifier.stopping(f"saving at step {self.progress.global_step}")
        self.confirm_lock()
        self.manager.save_position("emergency")
        for event in self.signals.unreported_stops():  # arrived while saving: the write was completed
            events.SIGNAL_RECEIVED.emit(signal=event.name, during="emergency_save", **self.progress.position())
        events.STOPPED.emit(exit_code=int(ExitCode.STOPPED), **self.progress.position())
        return Outcome(ExitCode.STOPPED)

    def _hand_over(self, policy: str) -> Outcome:
        """Switch the OpenMP waiting policy, which libgomp reads only when it loads: checkpoint this
        step; the process is then replaced by one that resumes here (daemon/service/threads.py)."""
        assert self.waiting is not None and self.waiting.others is not None  # it just measured
        events.CPU_WAIT_SWITCH.emit(
            **{"from": self.cpu.wait}, to=policy, others_cpus=round(self.waiting.others, 2), **self.progress.position()
        )
        self.notifier.status(f"switching cpu_wait to {policy} at step {self.progress.global_step}")
        self.confirm_lock()
        self.manager.save_position("handover")
        return Outcome(ExitCode.STOPPED, handover=policy)
