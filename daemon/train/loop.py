"""The training loop: builds the run (the task, its optimizer, the state registry), resumes, trains,
and acts on signals at step boundaries (never inside a step), saving when the policy says.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch

from daemon.ckpt import lock
from daemon.dist import group as dist
from daemon.service import logs, threads
from daemon.service.contention import WaitAdvisor
from daemon.ckpt.store import CheckpointStore
from daemon.config.exactness import exactness_fingerprint
from daemon.config.sections import Config
from daemon.train.data import build_train_data, map_tensors
from daemon.errors import ConfigError, ExitCode
from daemon.ckpt.history import MetricsHistory
from daemon.train.optim import build_optimizer, build_scheduler, build_warmup
from daemon.service.progress import LoggedStep, ProgressReporter
from daemon.ckpt.registry import StateRegistry
from daemon.ckpt.resume import Resumer
from daemon.ckpt.saving import Saver
from daemon.ckpt.schema import FORMAT_VERSION, CheckpointSchema, RunShape, probe_optimizer
from daemon.service.signals import SignalRecorder, stop_signals_blocked
from daemon.train.state import RNGState, RunningSums, TrainProgress
from daemon.train.stepping import Stepper
from daemon.service.notify import Notifier
from daemon.train.task import TaskContext, build_task, has_state, version_of
from daemon.service.threads import CpuSetting


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
    def __init__(self, cfg: Config, signals: SignalRecorder, notifier: Notifier, cpu: CpuSetting) -> None:
        self.cfg = cfg
        self.signals = signals
        self.notifier = notifier
        self.cpu = cpu
        self.handover: str | None = None  # the waiting policy of the process this run hands over to
        self.log = logs.get()
        device = resolve_device(cfg.train.device)
        self.dist = dist.join(cfg.dist, device, self._requests)  # a rank of a process group, when a launcher started one
        self.device = self.dist.place(device)
        if cfg.train.deterministic:
            # cuBLAS is bitwise reproducible only with a fixed workspace (set before CUDA starts).
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True)  # an op without a deterministic kernel raises
            torch.backends.cudnn.benchmark = False  # its choice of algorithm depends on timings

        RNGState.seed_all(cfg.train.seed)  # before the task builds its model: the init draws from them
        context = TaskContext(options=cfg.task.options, device=self.device, config=cfg)
        self.task = build_task(cfg.task.entry, context)
        self.model = self.task.model.to(self.device)
        self.dist.reseed(cfg.train.seed)
        self.optimizer, self.scheduler, schedules = self._build_optimization()
        self.warmup = build_warmup(cfg.optim.warmup_steps, self.optimizer)
        self.stepper = Stepper(
            self.task, self.dist.wrap(self.model), self.optimizer, cfg.train, cfg.optim.clip_grad_norm, self.device, self.dist.carry
        )
        # Once the config has proved buildable, before anything touches the directory (rank 0's alone).
        self._lock = lock.acquire(Path(cfg.checkpoint.dir)) if self.dist.is_writer else None

        train_set = self.task.train_set
        collate = getattr(self.task, "collate_fn", None)
        self.data = build_train_data(train_set, cfg.data, cfg.train.batch_size, cfg.train.seed, self.device.type == "cuda", collate)
        self.data.sampler.shard(self.dist.rank, self.dist.world_size)
        self.accum = cfg.train.grad_accum_steps
        self.steps_per_epoch = -(-len(self.data.sampler) // self.accum)
        self.progress = TrainProgress().to(self.device)
        # Every setting, and the task's version, as the checkpoints store them.
        self.settings = {**cfg.flat(), "task.version": version_of(self.task)}
        self.fingerprint = exactness_fingerprint(self.settings)

        self.registry = StateRegistry()
        self.registry.register("state_dict", self.model)  # the key of the classic recipe
        self.registry.register("optimizer", self.optimizer)
        self.registry.register("scheduler", self.scheduler)
        if self.warmup:
            self.registry.register("warmup", self.warmup)
        if self.stepper.scaler:
            self.registry.register("grad_scaler", self.stepper.scaler)
        self.registry.register("data", self.data.sampler)
        self.registry.register("rng", self.dist.rank_keyed(RNGState()))
        if self.dist.world_size > 1:  # each rank's share of the running loss: `metrics` holds their sum
            self.registry.register("running_sums", self.dist.rank_keyed(RunningSums(self.progress)))
        if has_state(self.task):
            self.registry.register("task", self.dist.rank_keyed(self.task))  # what a task keeps may differ by rank
        self.schedules = {**schedules, **({"warmup": "step"} if self.warmup else {})}

        # A rank cannot restart alone: a group keeps the policy each rank chose at start.
        switching = cfg.train.cpu_wait == "auto" and cpu.switchable and self.dist.world_size == 1
        self.waiting = WaitAdvisor(cpu.wait, cpu.handed_over) if switching else None
        store = CheckpointStore(Path(cfg.checkpoint.dir), cfg.checkpoint.keep_last)
        logged = LoggedStep(store.directory)
        self.reporter = ProgressReporter(
            self.log, notifier, self.progress, logged, every_seconds=cfg.log.progress_every_seconds,
            steps_per_epoch=self.steps_per_epoch, epochs=cfg.train.epochs, details=self._progress_details,
        )  # fmt: skip
        writer = self.dist.writer(store) if cfg.checkpoint.async_save else None
        self.saver = Saver(cfg.checkpoint, self.dist.store(store), writer, self.state_dict, self.reporter, logged, self.log)
        self.history = (
            MetricsHistory(store.directory, self.progress, self.log) if self.dist.is_writer else None
        )  # fmt: skip
        self.resumer = Resumer(
            store, logged, self.log, settings=self.settings, fingerprint=self.fingerprint,
            cpu_threads_setting=cfg.train.cpu_threads, world_size=self.dist.world_size,
        )  # fmt: skip
        self.log.info(
            "run_started",
            device=str(self.device),
            task=cfg.task.entry,
            parameters=sum(p.numel() for p in self.model.parameters()),
            train_samples=len(train_set),
            steps_per_epoch=self.steps_per_epoch,
            epochs=cfg.train.epochs,
            fingerprint=self.fingerprint,
            **self._test_samples(),
        )

    def _progress_details(self) -> dict:
        """What `train.cpu_wait: auto` last measured: other work's use of this run's CPUs."""
        if self.waiting is None or self.waiting.others is None:
            return {}
        return {"cpu_wait": self.waiting.policy, "others_cpus": round(self.waiting.others, 2)}

    def _test_samples(self) -> dict:
        test_set = getattr(self.task, "test_set", None)
        return {"test_samples": len(test_set)} if test_set is not None and hasattr(test_set, "__len__") else {}

    def _build_optimization(self) -> tuple[torch.optim.Optimizer, object, dict[str, str]]:
        """The optimizer and LR scheduler: the task's own, else the `optim` section's; and what
        each schedule counts (epochs or optimizer steps)."""
        configure = getattr(self.task, "configure_optimizers", None)
        if configure is not None:
            optimizer, scheduler = configure(self.model)
            return optimizer, scheduler, {"scheduler": "epoch"}
        optim = self.cfg.optim
        optimizer = build_optimizer(optim, self.model)
        interval = optim.scheduler.interval if optim.scheduler else "epoch"
        return optimizer, build_scheduler(optim.scheduler, optimizer), {"scheduler": interval}

    # -- state -----------------------------------------------------------------------------

    def state_dict(self, kind: str) -> dict:
        """Everything a bitwise-exact resume needs, under the keys of the checkpoint format."""
        return {
            "format_version": FORMAT_VERSION,
            "kind": kind,
            **self.progress.state_dict(self.dist.sum_over_ranks),  # epoch, step_in_epoch, global_step, metrics, history
            **self.dist.gather_rank_keyed(self.registry.state_dict()),
            "config": self.settings,
            "fingerprint": self.fingerprint,
            "cpu_threads": torch.get_num_threads(),
            "world_size": self.dist.world_size,
        }

    def load_state_dict(self, state: dict) -> None:
        self.progress.load_state_dict(state)
        self.registry.load_state_dict(state)

    def _position(self) -> dict:
        return self.reporter.position()

    def _step_limit_reached(self) -> bool:
        max_steps = self.cfg.train.max_steps
        return max_steps is not None and self.progress.global_step >= max_steps

    def _finished(self) -> bool:
        return self.progress.epoch >= self.cfg.train.epochs or self._step_limit_reached()

    # -- resume ----------------------------------------------------------------------------

    def resume(self) -> None:
        schema = self._checkpoint_schema()  # on every rank: its template gathers the ranks' state
        if self.dist.resume(lambda load: self.resumer.resume(schema, load, self._position), self.load_state_dict):
            self.saver.mark_on_disk()
        if self.history:
            kind = self.resumer.resumed.kind if self.resumer.resumed else None
            self.history.start(kind, self.resumer.steps_redone)

    def _checkpoint_schema(self) -> CheckpointSchema:
        """What a checkpoint must hold to be loaded into this run's objects, taken from them."""
        own_optimizer = hasattr(self.task, "configure_optimizers")
        return CheckpointSchema(
            template=self.state_dict("periodic"),
            parameters=[p for group in self.optimizer.param_groups for p in group["params"]],
            optimizer_probe=None if own_optimizer else probe_optimizer(lambda module: build_optimizer(self.cfg.optim, module)),
            shape=RunShape(
                steps_per_epoch=self.steps_per_epoch,
                samples_per_step=self.cfg.train.batch_size * self.accum,
                schedules=self.schedules,
            ),
        )

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
            cpu_wait_in_force=self.cpu.wait,
            others_cpus=None if self.cpu.others_cpus is None else round(self.cpu.others_cpus, 2),
            cpu_wait_switching=self.waiting is not None,
            precision=self.cfg.train.precision,
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
            self.saver.close()
            self.reporter.close()
            if self.history:
                self.history.close()
            self.dist.close(self.log)

    def _run(self) -> ExitCode:
        self.resume()
        self._log_determinism()
        # READY even when there is nothing left to do: under Type=notify, a clean exit before
        # READY=1 would count as a failed start.
        self.notifier.ready(self.reporter.status_text())
        epochs = self.cfg.train.epochs
        if self._finished():
            self.log.info("training_already_complete", epochs=epochs, max_steps=self.cfg.train.max_steps, **self._position())
            self.notifier.stopping("training already complete")
            return ExitCode.COMPLETE
        # A stop asked for during start-up: nothing was trained since the newest checkpoint.
        if self.dist.stop_agreed(self.signals.stop_requested):
            return self._stop()

        self.model.train()
        self.reporter.start()
        while not self._finished():
            outcome = self._train_epoch()
            if outcome is not None:
                return outcome
            # A stop that arrives during the last evaluation or the final save finds nothing left to do.
            if self.dist.stop_agreed(self.signals.stop_requested) and not self._finished():
                return self._stop()
        return self._complete()

    def _train_epoch(self) -> ExitCode | None:
        """The epoch in flight from its next step: an exit code when a signal ended the run."""
        sampler = self.data.sampler
        epoch_started = time.monotonic()
        steps_before = self.progress.step_in_epoch
        if sampler.epoch != self.progress.epoch:
            sampler.set_epoch(self.progress.epoch)
        first_batch = self.progress.step_in_epoch * self.accum
        sampler.start_at(first_batch)
        # Past this event a stop is acted on after a step, never before the first one.
        self.log.info("epoch_started", **self._position(), steps_in_epoch=self.steps_per_epoch)
        batches, in_step = len(sampler), 0
        for index, batch in enumerate(self._batches(), start=first_batch):
            share = min(self.accum, batches - (index - in_step))  # this optimizer step's batches
            if self.device.type != "cpu":
                batch = map_tensors(lambda t: t.to(self.device, non_blocking=True), batch)
            loss, metrics = self.stepper.accumulate(batch, share)
            self.progress.record_batch(loss, sampler.batch_length(index), sampler.own_length(index), metrics)
            in_step += 1
            if in_step < share:
                continue
            in_step = 0
            self._optimizer_step()
            outcome = self._after_step()
            if outcome is not None:
                return outcome
            if self._step_limit_reached() and self.progress.step_in_epoch < self.steps_per_epoch:
                return None  # train.max_steps, mid-epoch
        self._complete_epoch(epoch_started, self.progress.step_in_epoch - steps_before)
        return None

    def _optimizer_step(self) -> None:
        self.stepper.step()
        self.progress.record_step()
        if self.warmup:
            self.warmup.step()
        if self.scheduler and self.schedules["scheduler"] == "step":
            self.scheduler.step()
        self.notifier.watchdog()

    def _complete(self) -> ExitCode:
        self.saver.save("final", wait=True)  # mid-epoch at train.max_steps; the epoch end saved it otherwise
        for event in self.signals.unreported_stops():
            self.log.info("signal_received", signal=event.name, during="completion", **self._position())
        headline = self.progress.headline()
        self.log.info("training_completed", **self._position(), **headline)
        name = headline["headline"]
        shown = f": {name.replace('_', ' ')} {headline[name]:.4f}" if name else ""
        self.notifier.stopping("training complete" + shown)
        return ExitCode.COMPLETE

    def _batches(self):
        if self.data.loader.num_workers:
            with stop_signals_blocked():
                return iter(self.data.loader)
        return iter(self.data.loader)

    def _record_checkpoint(self, kind: str) -> None:
        """The history's mark of a checkpoint about to be written (before it, as every record of a
        state: a mark without its file is dropped on resume, a file without its mark would stay so)."""
        if self.history and not self.saver.up_to_date:
            self.history.mark_checkpoint(kind)

    def _after_step(self) -> ExitCode | None:
        """The safe point after each step: act on the requests every rank agreed on, save when due,
        report progress."""
        every = self.cfg.log.metrics_every_steps
        if every and self.progress.global_step % every == 0:  # before a stop: the resumed run goes on after this step
            loss, metrics = self.progress.running_means(self.dist.sum_over_ranks)  # on every rank: a collective
            if self.history:
                self.history.train_record(loss, metrics)
        requests = self.dist.agree()
        if requests.stop:
            return self._stop()
        self.saver.poll()
        if requests.save:
            self.signals.take_save_request()  # every SIGUSR1 pending now: several make one checkpoint
            self._record_checkpoint("on_demand")
            self.saver.save("on_demand", wait=True)
        elif self._periodic_save_due(requests.periodic):
            self.saver.save("periodic", wait=False)
        self.reporter.report_if_due()
        if self.waiting and (policy := self.waiting.poll()):
            return self._hand_over(policy)
        return None

    def _requests(self) -> dist.Requests:
        """This process's pending requests; a SIGUSR1 stays pending until its checkpoint is made."""
        return dist.Requests(
            stop=self.signals.stop_requested,
            save=self.signals.save_requested,
            periodic=self.saver.due_by_clock(),
        )

    def _periodic_save_due(self, by_clock: bool) -> bool:
        if self.progress.step_in_epoch == self.steps_per_epoch or self._step_limit_reached():
            return False  # the epoch or final checkpoint follows at once
        return self.saver.due_by_steps() or by_clock

    def _complete_epoch(self, started: float, steps: int) -> None:
        train_seconds = time.monotonic() - started
        try:
            evaluation = self.evaluate()
        except ConfigError:
            self._save_position("emergency")  # the epoch's training is kept for the mended task
            raise
        if self.scheduler and self.schedules["scheduler"] == "epoch":
            self.scheduler.step()
        entry = self.progress.complete_epoch(evaluation, self.dist.sum_over_ranks)
        headline = next(iter(evaluation), "train_loss")
        if self.history:  # before the checkpoint of this state: a kill between them must not lose the record
            self.history.epoch_done(entry, train_seconds, headline)
        self.saver.save("final" if self._finished() else "epoch", wait=True)
        self.log.info(
            "epoch_completed",
            **self._position(),  # epoch: epochs completed, this one included
            **{key: value for key, value in entry.items() if key != "epoch"},
            headline=headline,
            seconds=round(train_seconds, 3),
            steps_per_s=round(steps / train_seconds, 1) if train_seconds > 0 else None,
        )
        self.notifier.status(self.reporter.status_text())

    def evaluate(self) -> dict[str, float]:
        """The task's evaluation, the model in eval mode and no gradients. Draws no random numbers
        (the task's contract), so it cannot disturb exactness."""
        self.model.eval()
        try:
            with torch.inference_mode():
                metrics = dict(self.task.evaluate(self.model))
        finally:
            self.model.train()
        clashing = [name for name in metrics if not isinstance(name, str) or name == "epoch" or name.startswith("train_")]
        if clashing:
            raise ConfigError(f"task.entry: {self.cfg.task.entry} evaluates metrics named {clashing}: 'epoch' and "
                              f"'train_*' are the daemon's own (the epoch, and the training metrics averaged over it)")  # fmt: skip
        return {name: float(value) for name, value in metrics.items()}

    # -- stopping --------------------------------------------------------------------------

    def _stop(self) -> ExitCode:
        for event in self.signals.unreported_stops():
            self.log.info(
                "signal_received",
                signal=event.name,
                waited_ms=round((time.monotonic() - event.monotonic) * 1e3, 2),
                **self._position(),
            )
        self.reporter.refresh()  # the display marks the save under way
        # Ask systemd for room in its stop timeout, should this save be slow.
        self.notifier.extend_timeout(10 + 4 * self.saver.last_save_ms / 1e3)
        self.notifier.stopping(f"saving at step {self.progress.global_step}")
        self._save_position("emergency")
        for event in self.signals.unreported_stops():  # arrived while saving: the write was completed
            self.log.info("signal_received", signal=event.name, during="emergency_save", **self._position())
        self.log.info("stopped", exit_code=int(ExitCode.STOPPED), **self._position())
        return ExitCode.STOPPED

    def _save_position(self, kind: str) -> None:
        """A durable checkpoint of this step, unless the newest one holds it already."""
        if self.saver.up_to_date:
            self.saver.drain()
            self.log.info("checkpoint_skipped", reason="no step trained since the newest checkpoint", **self._position())
        else:
            self._record_checkpoint(kind)
            self.saver.save(kind, wait=True)

    def _hand_over(self, policy: str) -> ExitCode:
        """Switch the OpenMP waiting policy, which libgomp reads only when it loads: checkpoint this
        step, then the process is replaced by one that resumes here (daemon/service/threads.py, `hand_over`)."""
        self.log.info(
            "cpu_wait_switch", **{"from": self.cpu.wait}, to=policy, others_cpus=round(self.waiting.others, 2), **self._position()
        )  # fmt: skip
        self.notifier.status(f"switching cpu_wait to {policy} at step {self.progress.global_step}")
        self._save_position("handover")
        self.handover = policy
        return ExitCode.STOPPED
