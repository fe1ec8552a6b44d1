"""The training loop: resumes from the newest valid checkpoint, trains, and acts on signals
at step boundaries (never inside a step), deciding when to save.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from daemon import lock, logs, threads
from daemon.checkpoint import BackgroundWriter, CheckpointStore, Entry, SaveResult
from daemon.config import Config, is_resume_safe
from daemon.data import build_train_data, load_mnist, prepare_mnist, to_float
from daemon.errors import ConfigError, ExitCode, IncompatibleCheckpoint
from daemon.model import allocate_model, build_optimizer, build_scheduler, parameter_count
from daemon.schema import FORMAT_VERSION, Builders, CheckpointSchema
from daemon.signals import SignalRecorder, stop_signals_blocked
from daemon.state import RNGState, TrainProgress
from daemon.systemd import Notifier


# How torch words the error an op without a deterministic kernel raises under use_deterministic_algorithms.
NONDETERMINISTIC_OP = "does not have a deterministic implementation"


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    count = torch.cuda.device_count()
    if device.type == "cuda" and (device.index or 0) >= count:
        raise ConfigError(f"train.device: {name}, but this machine has {count} CUDA device(s); use auto or cpu")
    return device


class Trainer:
    def __init__(self, cfg: Config, signals: SignalRecorder, notifier: Notifier) -> None:
        self.cfg = cfg
        self.signals = signals
        self.notifier = notifier
        self.log = logs.get()
        self.device = resolve_device(cfg.train.device)
        if cfg.train.deterministic:
            # cuBLAS is bitwise reproducible only with a fixed workspace (set before CUDA starts).
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True)  # an op without a deterministic kernel raises
            torch.backends.cudnn.benchmark = False  # its choice of algorithm depends on timings
        self.cpu_threads = torch.get_num_threads()  # as set up before torch was imported

        RNGState.seed_all(cfg.train.seed)
        self.model = allocate_model(cfg.model, self.device)
        self.optimizer = build_optimizer(cfg.optim, self.model)
        self.scheduler = build_scheduler(cfg.optim.scheduler, self.optimizer)
        # Once the config has proved buildable, before anything touches the directory or the data.
        self._lock = lock.acquire(Path(cfg.checkpoint.dir))

        laid_out = prepare_mnist(Path(cfg.data.root), cfg.data.download)
        if laid_out:
            self.log.info("dataset_prepared", root=cfg.data.root, files=laid_out)
        self.test_set = load_mnist(cfg.data, train=False)
        train_set = load_mnist(cfg.data, train=True)
        self.data = build_train_data(train_set, cfg.data, cfg.train.batch_size, cfg.train.seed, self.device.type == "cuda")
        self.progress = TrainProgress().to(self.device)
        self.fingerprint = cfg.exactness_fingerprint()

        self.store = CheckpointStore(Path(cfg.checkpoint.dir), cfg.checkpoint.keep_last)
        self.writer = BackgroundWriter(self.store) if cfg.checkpoint.async_save else None
        # The state on disk, as (epochs completed, global step): completing an epoch changes the
        # state (scheduler, history) without a step. The start needs no file: config and seed recreate it.
        self.last_saved = (0, 0)
        self.last_saved_at = time.monotonic()
        self.last_save_ms = 0.0
        self.log.info(
            "run_started",
            device=str(self.device),
            parameters=parameter_count(self.model),
            train_samples=len(train_set),
            test_samples=len(self.test_set),
            steps_per_epoch=len(self.data.sampler),
            epochs=cfg.train.epochs,
            fingerprint=self.fingerprint,
        )

    # -- state -----------------------------------------------------------------------------

    def state_dict(self, kind: str) -> dict:
        """Everything a bitwise-exact resume needs, under the keys of the checkpoint format."""
        return {
            "format_version": FORMAT_VERSION,
            "kind": kind,
            **self.progress.state_dict(),  # epoch, step_in_epoch, global_step, metrics, history
            "state_dict": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler else None,
            "data": self.data.sampler.state_dict(),
            "rng": RNGState.state_dict(),
            "config": self.cfg.flat(),
            "fingerprint": self.fingerprint,
            "cpu_threads": self.cpu_threads,
        }

    def load_state_dict(self, state: dict) -> None:
        self.progress.load_state_dict(state)
        self.model.load_state_dict(state["state_dict"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler:
            self.scheduler.load_state_dict(state["scheduler"])
        self.data.sampler.load_state_dict(state["data"])
        RNGState.load_state_dict(state["rng"])

    def _position(self) -> dict:
        p = self.progress
        return {"epoch": p.epoch, "step_in_epoch": p.step_in_epoch, "global_step": p.global_step}

    def _state_key(self) -> tuple[int, int]:
        return self.progress.epoch, self.progress.global_step

    def _step_limit_reached(self) -> bool:
        max_steps = self.cfg.train.max_steps
        return max_steps is not None and self.progress.global_step >= max_steps

    def _finished(self) -> bool:
        return self.progress.epoch >= self.cfg.train.epochs or self._step_limit_reached()

    # -- resume ----------------------------------------------------------------------------

    def resume(self) -> None:
        removed = self.store.remove_temp_files()
        if removed:
            self.log.info("temp_files_removed", files=[p.name for p in removed])
        schema = self._checkpoint_schema()

        def validate(entry: Entry) -> None:
            # A config change is the person's to undo (exit 78, the file kept); a file whose content
            # this run cannot load is set aside like a corrupt one. Both before anything is loaded.
            self._check_compatible(entry)
            schema.check(entry.state)

        entry = self.store.newest_valid(on_invalid=self._report_invalid, validate=validate)
        if entry is None:
            self.log.info("fresh_start", checkpoint_dir=str(self.store.directory))
            return
        self._report_config_changes(entry)
        self._keep_thread_count(entry)
        self.load_state_dict(entry.state)
        self.last_saved = self._state_key()
        logged = self.store.last_logged_step()
        # At least the steps logged past the checkpoint; none when a background save finished
        # after the last line the dead run logged.
        redone = {"steps_redone": max(0, logged - self.progress.global_step)} if logged is not None else {}
        self.log.info("resumed", path=str(entry.path), kind=entry.kind, **self._position(), **redone)

    def _checkpoint_schema(self) -> CheckpointSchema:
        """What a checkpoint must hold to be loaded into this run's objects, taken from them."""
        optim = self.cfg.optim
        return CheckpointSchema(
            template=self.state_dict("periodic"),
            parameters=[p for group in self.optimizer.param_groups for p in group["params"]],
            builders=Builders(
                optimizer=lambda module: build_optimizer(optim, module),
                scheduler=lambda optimizer: build_scheduler(optim.scheduler, optimizer),
            ),
            steps_per_epoch=len(self.data.sampler),
        )

    def _report_invalid(self, entry: Entry, aside: Path | None) -> None:
        self.log.warning(
            "checkpoint_invalid", path=str(entry.path), reason=entry.reason, moved_to=str(aside) if aside else None
        )

    def _config_changes(self, entry: Entry) -> dict[str, tuple]:
        stored, current = entry.state["config"], self.cfg.flat()
        return {
            key: (stored.get(key), current.get(key))
            for key in sorted(stored.keys() | current.keys())
            if stored.get(key) != current.get(key)
        }

    def _check_compatible(self, entry: Entry) -> None:
        changed = self._config_changes(entry)
        breaking = {key: change for key, change in changed.items() if not is_resume_safe(key)}
        if breaking or entry.state["fingerprint"] != self.fingerprint:
            listed = "; ".join(f"{key}: {old!r} in the checkpoint, {new!r} now" for key, (old, new) in breaking.items())
            raise IncompatibleCheckpoint(
                f"{entry.path} cannot be resumed exactly with this config ({listed or 'fingerprint differs'}). "
                f"Restore those settings, or set checkpoint.dir to an empty directory to start afresh."
            )

    def _report_config_changes(self, entry: Entry) -> None:
        changed = self._config_changes(entry)
        if changed:
            self.log.warning(
                "config_changed", changes={key: {"checkpoint": old, "now": new} for key, (old, new) in changed.items()}
            )

    def _keep_thread_count(self, entry: Entry) -> None:
        """A run keeps its intra-op thread count: sums split over another count round differently."""
        trained_with = entry.state.get("cpu_threads")
        if trained_with is None or trained_with == self.cpu_threads:
            return
        if self.cfg.train.cpu_threads is not None:
            raise IncompatibleCheckpoint(
                f"{entry.path} was trained with {trained_with} CPU threads, train.cpu_threads is {self.cpu_threads}: "
                f"a different count rounds differently. Set train.cpu_threads to {trained_with}, or to null "
                f"(the count the run started with), or set checkpoint.dir to an empty directory to start afresh."
            )
        torch.set_num_threads(trained_with)
        self.cpu_threads = trained_with

    def _log_determinism(self) -> None:
        cuda = {}
        if self.device.type == "cuda":
            cuda = {
                "cudnn_deterministic": torch.backends.cudnn.deterministic,
                "cudnn_benchmark": torch.backends.cudnn.benchmark,
                "cublas_workspace_config": os.environ.get("CUBLAS_WORKSPACE_CONFIG"),
            }
        self.log.info(
            "determinism",
            deterministic_algorithms=torch.are_deterministic_algorithms_enabled(),
            torch_version=torch.__version__,
            cpu_wait=self.cfg.train.cpu_wait,
            **threads.in_force(),
            **cuda,
        )

    # -- the loop --------------------------------------------------------------------------

    def run(self) -> ExitCode:
        try:
            return self._run()
        except RuntimeError as exc:
            if NONDETERMINISTIC_OP not in str(exc):
                raise
            raise ConfigError(
                f"{str(exc).splitlines()[0]} With train.deterministic: true every op must have one; set it to "
                f"false to run anyway, knowing that a resumed run is then no longer bitwise equal to an unbroken one."
            ) from None
        finally:
            if self.writer:
                self.writer.close()

    def _run(self) -> ExitCode:
        self.resume()
        self._log_determinism()
        # READY even when there is nothing left to do: under Type=notify, a clean exit before
        # READY=1 would count as a failed start.
        self.notifier.ready(self._status_text())
        epochs = self.cfg.train.epochs
        if self._finished():
            self.log.info("training_already_complete", epochs=epochs, max_steps=self.cfg.train.max_steps, **self._position())
            self.notifier.stopping("training already complete")
            return ExitCode.COMPLETE
        # A stop asked for during start-up: nothing was trained since the newest checkpoint.
        if self.signals.stop_requested:
            return self._stop()

        self.model.train()
        sampler = self.data.sampler
        self._progress_at, self._progress_step = time.monotonic(), self.progress.global_step
        while not self._finished():
            epoch_started = time.monotonic()
            steps_before = self.progress.step_in_epoch
            if sampler.epoch != self.progress.epoch:
                sampler.set_epoch(self.progress.epoch)
            sampler.start_at(self.progress.step_in_epoch)
            # Past this event a stop is acted on after a step, never before the first one.
            self.log.info("epoch_started", **self._position(), steps_in_epoch=len(sampler))
            for images, labels in self._batches():
                self._train_step(images, labels)
                outcome = self._after_step()
                if outcome is not None:
                    return outcome
                if self._step_limit_reached() and self.progress.step_in_epoch < len(sampler):
                    break  # train.max_steps, mid-epoch
            else:
                self._complete_epoch(epoch_started, self.progress.step_in_epoch - steps_before)
            # A stop that arrives during the last evaluation or the final save finds nothing left to do.
            if self.signals.stop_requested and not self._finished():
                return self._stop()
        return self._complete()

    def _complete(self) -> ExitCode:
        self._save("final", wait=True)  # mid-epoch at train.max_steps; the epoch end saved it otherwise
        for event in self.signals.unreported_stops():
            self.log.info("signal_received", signal=event.name, during="completion", **self._position())
        accuracy = self.progress.history[-1]["test_accuracy"] if self.progress.history else None
        self.log.info("training_completed", **self._position(), test_accuracy=accuracy)
        self.notifier.stopping("training complete" + (f": test accuracy {accuracy:.4f}" if accuracy is not None else ""))
        return ExitCode.COMPLETE

    def _batches(self):
        if self.data.loader.num_workers:
            with stop_signals_blocked():
                return iter(self.data.loader)
        return iter(self.data.loader)

    def _train_step(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        images = images.to(self.device, non_blocking=True)
        labels = labels.to(self.device, non_blocking=True)
        loss = F.cross_entropy(self.model(images), labels)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.progress.record_step(loss, len(labels))
        self.notifier.watchdog()

    def _after_step(self) -> ExitCode | None:
        """The safe point after each step: act on signals, save when due, report progress."""
        if self.signals.stop_requested:
            return self._stop()
        if self.writer:
            self._report_saves(self.writer.poll())
        if self.signals.take_save_request():
            self._save("on_demand", wait=True)
        elif self._periodic_save_due():
            self._save("periodic", wait=False)
        self._report_progress_if_due()
        return None

    def _periodic_save_due(self) -> bool:
        if self.progress.step_in_epoch == len(self.data.sampler) or self._step_limit_reached():
            return False  # the epoch or final checkpoint follows at once
        every_steps, every_seconds = self.cfg.checkpoint.every_steps, self.cfg.checkpoint.every_seconds
        return bool(every_steps and self.progress.global_step % every_steps == 0) or bool(
            every_seconds and time.monotonic() - self.last_saved_at >= every_seconds
        )

    def _complete_epoch(self, started: float, steps: int) -> None:
        train_seconds = time.monotonic() - started
        accuracy = self.evaluate()
        if self.scheduler:
            self.scheduler.step()
        entry = self.progress.complete_epoch(test_accuracy=accuracy)
        self._save("final" if self._finished() else "epoch", wait=True)
        self.log.info(
            "epoch_completed",
            **self._position(),  # epoch: epochs completed, this one included
            train_loss=entry["train_loss"],
            test_accuracy=accuracy,
            seconds=round(train_seconds, 3),
            steps_per_s=round(steps / train_seconds, 1) if train_seconds > 0 else None,
        )
        self.notifier.status(self._status_text())

    @torch.inference_mode()
    def evaluate(self) -> float:
        """Test accuracy as a fraction. Draws no random numbers, so it cannot disturb exactness."""
        self.model.eval()
        images, labels = self.test_set.images, self.test_set.labels
        correct = 0
        batch = self.cfg.train.eval_batch_size
        for start in range(0, len(labels), batch):
            x = to_float(images[start : start + batch]).to(self.device)
            y = labels[start : start + batch].to(self.device)
            correct += (self.model(x).argmax(dim=1) == y).sum().item()
        self.model.train()
        return correct / len(labels)

    # -- saving ----------------------------------------------------------------------------

    def _save(self, kind: str, wait: bool) -> None:
        """Checkpoint the current step. `wait`: durable on return; else written in the background."""
        if self._state_key() == self.last_saved:
            return  # this exact state is already on disk
        self.last_saved, self.last_saved_at = self._state_key(), time.monotonic()
        if self.writer is None or wait:
            done = self.writer.drain() if self.writer else []
            done.append(self.store.save(self.state_dict(kind)))
            self._report_saves(done)
            self.store.prune()  # once the save is reported durable: a stop should not wait for it
            return
        started = time.perf_counter()
        finished = self.writer.submit(self.state_dict(kind))
        self._report_saves(finished)
        self.log.debug("checkpoint_snapshot", kind=kind, stall_ms=round((time.perf_counter() - started) * 1e3, 2))

    def _report_saves(self, results: list[SaveResult]) -> None:
        for result in results:
            self.last_save_ms = result.duration_ms
            self.store.mark_logged_step(max(result.global_step, self.progress.global_step))
            self.log.info(
                "checkpoint_saved",
                kind=result.kind,
                path=str(result.path),
                bytes=result.bytes,
                duration_ms=round(result.duration_ms, 2),
                checkpoint_global_step=result.global_step,
                **self._position(),
            )

    def _stop(self) -> ExitCode:
        for event in self.signals.unreported_stops():
            self.log.info(
                "signal_received",
                signal=event.name,
                waited_ms=round((time.monotonic() - event.monotonic) * 1e3, 2),
                **self._position(),
            )
        # Ask systemd for room in its stop timeout, should this save be slow.
        self.notifier.extend_timeout(10 + 4 * self.last_save_ms / 1e3)
        self.notifier.stopping(f"saving at step {self.progress.global_step}")
        if self._state_key() == self.last_saved:
            if self.writer:
                self._report_saves(self.writer.drain())
            self.log.info("checkpoint_skipped", reason="no step trained since the newest checkpoint", **self._position())
        else:
            self._save("emergency", wait=True)
        for event in self.signals.unreported_stops():  # arrived while saving: the write was completed
            self.log.info("signal_received", signal=event.name, during="emergency_save", **self._position())
        self.log.info("stopped", exit_code=int(ExitCode.STOPPED), **self._position())
        return ExitCode.STOPPED

    def _report_progress_if_due(self) -> None:
        now = time.monotonic()
        if now - self._progress_at < self.cfg.log.progress_every_seconds:
            return
        rate = (self.progress.global_step - self._progress_step) / (now - self._progress_at)
        self._progress_at, self._progress_step = now, self.progress.global_step
        loss = self.progress.mean_loss()
        self.store.mark_logged_step(self.progress.global_step)
        self.log.info(
            "progress",
            **self._position(),
            steps_in_epoch=len(self.data.sampler),
            loss=round(loss, 5),
            steps_per_s=round(rate, 1),
        )
        self.notifier.status(self._status_text(loss))

    def _status_text(self, loss: float | None = None) -> str:
        p = self.progress
        text = f"epoch {p.epoch + 1}/{self.cfg.train.epochs} step {p.step_in_epoch}/{len(self.data.sampler)}"
        return text + (f" loss {loss:.4f}" if loss is not None else "")
