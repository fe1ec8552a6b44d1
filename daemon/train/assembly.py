"""Assembly: a run's parts built from the config, in the order their construction requires.

The device and the process group first (a rank learns its device from its place in the group);
every RNG seeded before the task builds its model (its initialisation draws from them); the run
lock once the config has proved buildable, before anything touches the run directory; then the
data order, the checkpoint manager with every resumable piece registered, and what reports and
decides at each step boundary.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from daemon import events
from daemon.ckpt import lock
from daemon.ckpt.manager import CheckpointManager
from daemon.ckpt.rng import RNGState
from daemon.ckpt.schema import RunShape, probe_optimizer
from daemon.config.exactness import exactness_fingerprint
from daemon.config.sections import Config
from daemon.dist.group import ProcessGroup, join
from daemon.errors import ConfigError
from daemon.service import threads
from daemon.service.contention import WaitAdvisor
from daemon.service.notify import Notifier
from daemon.service.preemption import PreemptionWatcher
from daemon.service.progress import ProgressReporter
from daemon.service.signals import SignalRecorder
from daemon.service.threads import CpuSetting
from daemon.train.boundary import StepBoundary
from daemon.train.data import TrainData, build_train_data
from daemon.train.optim import build_optimizer, build_scheduler, build_warmup
from daemon.train.state import RunningSums, TrainProgress
from daemon.train.stepping import Stepper
from daemon.train.task import TaskAdapter, TaskContext, build_task


@dataclass(kw_only=True)
class RunParts:
    cfg: Config
    device: torch.device
    group: ProcessGroup
    task: TaskAdapter
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler | None
    warmup: torch.optim.lr_scheduler.LinearLR | None
    schedules: dict[str, str]  # each LR schedule's checkpoint key, and what it counts: "epoch" or "step"
    stepper: Stepper
    data: TrainData
    steps_per_epoch: int
    progress: TrainProgress
    manager: CheckpointManager
    reporter: ProgressReporter
    boundary: StepBoundary
    notifier: Notifier
    cpu: CpuSetting
    run_lock: lock.RunLock | None  # the run lock, held by the writing process for the life of the run
    watcher: PreemptionWatcher | None  # polls for a preemption notice, on the writing rank (preemption.notice)

    def close(self, *, keep_lock: bool = False) -> None:
        """`keep_lock`: the process hands the run over to its successor image, which adopts the lock."""
        if self.watcher:
            self.watcher.close()
        try:
            self.manager.close(keep_lease=keep_lock)
        finally:
            self.reporter.close()
            self.group.close()
            if self.run_lock is not None and not keep_lock:
                self.run_lock.release()


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    count = torch.cuda.device_count()
    if device.type == "cuda" and (device.index or 0) >= count:
        raise ConfigError(f"train.device: {name}, but this machine has {count} CUDA device(s); use auto or cpu")
    return device


def assemble(cfg: Config, signals: SignalRecorder, notifier: Notifier, cpu: CpuSetting) -> RunParts:
    boundary: StepBoundary | None = None
    device = resolve_device(cfg.train.device)
    # The ranks agree on each process's pending requests; the boundary that reads them is built last.
    group = join(cfg.dist, device, lambda: boundary.pending())  # type: ignore[union-attr]
    device = group.place(device)
    if cfg.train.deterministic:
        # cuBLAS is bitwise reproducible only with a fixed workspace (set before CUDA starts).
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)  # an op without a deterministic kernel raises
        torch.backends.cudnn.benchmark = False  # its choice of algorithm depends on timings

    RNGState.seed_all(cfg.train.seed)  # before the task builds its model: the init draws from them
    task = build_task(cfg.task.entry, TaskContext(options=cfg.task.options, device=device, config=cfg))
    model = task.model.to(device)
    group.reseed(cfg.train.seed)
    running = group.wrap(model)  # FSDP shards the parameters in place: before the optimizer takes them
    optimizer, scheduler, schedules = _build_optimization(cfg, task, model)
    warmup = build_warmup(cfg.optim.warmup_steps, optimizer)
    if warmup:
        schedules["warmup"] = "step"
    stepper = Stepper(task, running, optimizer, cfg.train, cfg.optim.clip_grad_norm, device, group.carry)
    run_lock = lock.acquire(Path(cfg.checkpoint.dir)) if group.is_writer else None
    try:
        data = build_train_data(
            task.train_set, cfg.data, cfg.train.batch_size, cfg.train.seed, device.type == "cuda", task.collate_fn
        )
        data.sampler.shard(group.rank, group.world_size)
        steps_per_epoch = -(-len(data.sampler) // cfg.train.grad_accum_steps)
        progress = TrainProgress().to(device)
        settings = {**cfg.flat(), "task.version": task.version}  # as the checkpoints store them
        shape = RunShape(
            steps_per_epoch=steps_per_epoch,
            schedules=schedules,
            samples_per_step=cfg.train.batch_size * cfg.train.grad_accum_steps,
        )
        own_optimizer = task.configure_optimizers is not None
        manager = CheckpointManager(
            cfg.checkpoint,
            settings=settings,
            fingerprint=exactness_fingerprint(settings),
            cpu_threads_setting=cfg.train.cpu_threads,
            group=group,
            progress=progress,
            shape=shape,
            parameters=[p for param_group in optimizer.param_groups for p in param_group["params"]],
            optimizer_probe=None
            if own_optimizer
            else probe_optimizer(lambda module: build_optimizer(cfg.optim, module)),
        )
        model_piece, optimizer_piece = group.checkpointed(model, optimizer)
        manager.register("state_dict", model_piece)  # the key of the classic recipe
        manager.register("optimizer", optimizer_piece)
        manager.register("scheduler", scheduler)
        if warmup:
            manager.register("warmup", warmup)
        if stepper.scaler:
            manager.register("grad_scaler", stepper.scaler)
        manager.register("data", data.sampler)
        manager.register("rng", RNGState(), per_rank=True)
        if group.world_size > 1:  # each rank's share of the running loss: `metrics` holds their sum
            manager.register("running_sums", RunningSums(progress), per_rank=True)
        if task.has_state:
            manager.register("task", task, per_rank=True)  # what a task keeps may differ by rank

        # A rank cannot restart alone: a group keeps the policy each rank chose at start.
        switching = cfg.train.cpu_wait == "auto" and cpu.switchable and group.world_size == 1
        waiting = WaitAdvisor(cpu.wait, cpu.handed_over) if switching else None
        reporter = ProgressReporter(
            notifier,
            progress,
            manager.logged.mark,
            every_seconds=cfg.log.progress_every_seconds,
            steps_per_epoch=steps_per_epoch,
            epochs=cfg.train.epochs,
            details=waiting.reading if waiting else dict,
        )
        boundary = StepBoundary(
            signals=signals,
            group=group,
            manager=manager,
            progress=progress,
            reporter=reporter,
            notifier=notifier,
            metrics_every_steps=cfg.log.metrics_every_steps,
            steps_per_epoch=steps_per_epoch,
            max_steps=cfg.train.max_steps,
            waiting=waiting,
            cpu=cpu,
            run_lock=run_lock,
        )
    except BaseException:
        if run_lock is not None:
            run_lock.release()
        raise
    events.RUN_STARTED.emit(
        device=str(device),
        task=cfg.task.entry,
        parameters=sum(p.numel() for p in model.parameters()),
        train_samples=len(task.train_set),
        steps_per_epoch=steps_per_epoch,
        epochs=cfg.train.epochs,
        fingerprint=manager.fingerprint,
        **({"test_samples": task.test_samples} if task.test_samples is not None else {}),
    )
    # One rank watches: its request reaches the others with the agreement, so all act at one step.
    watching = group.is_writer and cfg.preemption.notice != "off"
    watcher = PreemptionWatcher(cfg.preemption, signals).start() if watching else None
    return RunParts(
        cfg=cfg,
        device=device,
        group=group,
        task=task,
        optimizer=optimizer,
        scheduler=scheduler,
        warmup=warmup,
        schedules=schedules,
        stepper=stepper,
        data=data,
        steps_per_epoch=steps_per_epoch,
        progress=progress,
        manager=manager,
        reporter=reporter,
        boundary=boundary,
        notifier=notifier,
        cpu=cpu,
        run_lock=run_lock,
        watcher=watcher,
    )


def _build_optimization(cfg: Config, task: TaskAdapter, model: torch.nn.Module):
    """The optimizer and LR scheduler: the task's own, else the `optim` section's; and what each
    schedule counts (epochs or optimizer steps)."""
    if task.configure_optimizers is not None:
        optimizer, scheduler = task.configure_optimizers(model)
        return optimizer, scheduler, {"scheduler": "epoch"}
    optimizer = build_optimizer(cfg.optim, model)
    interval = cfg.optim.scheduler.interval if cfg.optim.scheduler else "epoch"
    return optimizer, build_scheduler(cfg.optim.scheduler, optimizer), {"scheduler": interval}


def determinism_in_force(parts: RunParts, waiting_switches: bool) -> dict:
    """The `determinism` event's fields: what makes this run's results what they are."""
    cuda = {}
    if parts.device.type == "cuda":
        cuda = {
            "cudnn_deterministic": torch.backends.cudnn.deterministic,
            "cudnn_benchmark": torch.backends.cudnn.benchmark,
            "cublas_workspace_config": os.environ.get("CUBLAS_WORKSPACE_CONFIG"),
        }
    cpu = parts.cpu
    return {
        "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
        "torch_version": torch.__version__,
        "cpu_wait": parts.cfg.train.cpu_wait,
        "cpu_wait_in_force": cpu.wait,
        "others_cpus": None if cpu.others_cpus is None else round(cpu.others_cpus, 2),
        "cpu_wait_switching": waiting_switches,
        "precision": parts.cfg.train.precision,
        **threads.in_force(),
        **cuda,
    }
