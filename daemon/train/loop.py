"""The training loop, as the algorithm reads: resume, then epoch after epoch, step after step, with
the step boundary deciding after each step whether the run stops, saves or goes on.

The parts are built by daemon/train/assembly.py; what a checkpoint holds and when one is written is
the checkpoint manager's (daemon/ckpt/manager.py); what a signal makes the run do is the boundary's
(daemon/train/boundary.py).
"""

from __future__ import annotations

import time

import torch

from daemon import events
from daemon.errors import ConfigError, ExitCode
from daemon.service.signals import stop_signals_blocked
from daemon.train.assembly import RunParts, determinism_in_force
from daemon.train.boundary import Outcome
from daemon.train.data import map_tensors

# How torch words the error an op without a deterministic kernel raises under use_deterministic_algorithms.
NONDETERMINISTIC_OP = "does not have a deterministic implementation"


class Trainer:
    def __init__(self, parts: RunParts) -> None:
        self.parts = parts
        self.cfg = parts.cfg
        self.progress = parts.progress
        self.manager = parts.manager
        self.boundary = parts.boundary

    def run(self) -> Outcome:
        outcome: Outcome | None = None
        try:
            outcome = self._train()
            return outcome
        except RuntimeError as exc:
            if NONDETERMINISTIC_OP not in str(exc):
                raise
            raise ConfigError(
                f"{str(exc).splitlines()[0]} With train.deterministic: true every op must have one; set it to "
                f"false to run anyway, knowing that a resumed run is then no longer bitwise equal to an unbroken one."
            ) from None
        finally:
            # A handover keeps the run lock through its exec: the successor image adopts it.
            self.parts.close(keep_lock=outcome is not None and outcome.handover is not None)

    def _train(self) -> Outcome:
        self.manager.resume()
        events.DETERMINISM.emit(**determinism_in_force(self.parts, self.boundary.waiting is not None))
        # READY even when there is nothing left to do: under Type=notify, a clean exit before
        # READY=1 would count as a failed start.
        self.parts.notifier.ready(self.parts.reporter.status_text())
        if self._finished():
            events.TRAINING_ALREADY_COMPLETE.emit(
                epochs=self.cfg.train.epochs, max_steps=self.cfg.train.max_steps, **self.progress.position()
            )
            self.parts.notifier.stopping("training already complete")
            return Outcome(ExitCode.COMPLETE)
        if self.boundary.stop_agreed():  # asked during start-up: nothing trained since the newest checkpoint
            return self.boundary.stop()
        self.parts.task.model.train()
        self.parts.reporter.start()
        while not self._finished():
            outcome = self._train_epoch()
            if outcome is not None:
                return outcome
            # A stop that arrives during the last evaluation or the final save finds nothing left to do.
            if self.boundary.stop_agreed() and not self._finished():
                return self.boundary.stop()
        return self._complete()

    def _finished(self) -> bool:
        return self.progress.epoch >= self.cfg.train.epochs or self.boundary.step_limit_reached()

    def _train_epoch(self) -> Outcome | None:
        """The epoch in flight from its next step; an outcome when the run ends within it."""
        sampler, accum, device = self.parts.data.sampler, self.cfg.train.grad_accum_steps, self.parts.device
        epoch_started, steps_before = time.monotonic(), self.progress.step_in_epoch
        if sampler.epoch != self.progress.epoch:
            sampler.set_epoch(self.progress.epoch)
        first_batch = self.progress.step_in_epoch * accum
        sampler.start_at(first_batch)
        # Past this event a stop is acted on after a step, never before the first one.
        events.EPOCH_STARTED.emit(**self.progress.position(), steps_in_epoch=self.parts.steps_per_epoch)
        batches, in_step = len(sampler), 0
        for index, batch in enumerate(self._batches(), start=first_batch):
            share = min(accum, batches - (index - in_step))  # this optimizer step's batches
            if device.type != "cpu":
                batch = map_tensors(lambda t: t.to(device, non_blocking=True), batch)
            loss, metrics = self.parts.stepper.accumulate(batch, share)
            self.progress.record_batch(loss, sampler.batch_length(index), sampler.own_length(index), metrics)
            in_step += 1
            if in_step < share:
                continue
            in_step = 0
            self._optimizer_step()
            outcome = self.boundary.after_step()
            if outcome is not None:
                return outcome
            if self.boundary.step_limit_reached() and self.progress.step_in_epoch < self.parts.steps_per_epoch:
                return None  # train.max_steps, mid-epoch
        self._complete_epoch(epoch_started, self.progress.step_in_epoch - steps_before)
        return None

    def _batches(self):
        if self.parts.data.loader.num_workers:
            with stop_signals_blocked():  # workers are forked here: none may die of a Ctrl+C
                return iter(self.parts.data.loader)
        return iter(self.parts.data.loader)

    def _optimizer_step(self) -> None:
        parts = self.parts
        parts.stepper.step()
        self.progress.record_step()
        if parts.warmup:
            parts.warmup.step()
        if parts.scheduler and parts.schedules["scheduler"] == "step":
            parts.scheduler.step()
        parts.notifier.watchdog()

    def _complete_epoch(self, started: float, steps: int) -> None:
        train_seconds = time.monotonic() - started
        try:
            evaluation = self._evaluate()
        except ConfigError:
            self.boundary.confirm_lock()
            self.manager.save_position("emergency")  # the epoch's training is kept for the mended task
            raise
        if self.parts.scheduler and self.parts.schedules["scheduler"] == "epoch":
            self.parts.scheduler.step()
        entry = self.progress.complete_epoch(evaluation, self.parts.group.sum_over_ranks)
        headline = next(iter(evaluation), "train_loss")
        self.boundary.confirm_lock()
        self.manager.record_epoch(entry, train_seconds, headline)
        self.manager.save("final" if self._finished() else "epoch", wait=True)
        events.EPOCH_COMPLETED.emit(
            **self.progress.position(),  # epoch: epochs completed, this one included
            **{key: value for key, value in entry.items() if key != "epoch"},
            headline=headline,
            seconds=round(train_seconds, 3),
            steps_per_s=round(steps / train_seconds, 1) if train_seconds > 0 else None,
        )
        self.parts.notifier.status(self.parts.reporter.status_text())

    def _evaluate(self) -> dict[str, float]:
        """The task's evaluation, the model in eval mode and no gradients. Draws no random numbers
        (the task's contract), so it cannot disturb exactness."""
        model = self.parts.task.model
        model.eval()
        try:
            with torch.inference_mode():
                return self.parts.task.evaluate(model)
        finally:
            model.train()

    def _complete(self) -> Outcome:
        self.boundary.confirm_lock()
        self.manager.save("final", wait=True)  # mid-epoch at train.max_steps; the epoch end saved it otherwise
        for event in self.parts.boundary.signals.unreported_stops():
            events.SIGNAL_RECEIVED.emit(signal=event.name, during="completion", **self.progress.position())
        headline = self.progress.headline()
        events.TRAINING_COMPLETED.emit(**self.progress.position(), **headline)
        name = headline["headline"]
        shown = f": {name.replace('_', ' ')} {headline[name]:.4f}" if name else ""
        self.parts.notifier.stopping("training complete" + shown)
        return Outcome(ExitCode.COMPLETE)
