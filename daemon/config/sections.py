"""The configuration's sections: kw-only dataclasses, every default and its meaning on one screen,
each checked in `__post_init__`.

Every check happens at start-up, before anything is written: a bad config is a `ConfigError`
naming the file and the key, which the CLI turns into exit code 78. Reading the YAML is
daemon/config/loading.py's; which settings a resume may change, daemon/config/exactness.py's.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from daemon.config.loading import build, check_options, flatten, read_tree
from daemon.errors import ConfigError

SEED_MAX = 2**32 - 1  # numpy's global RNG takes 32-bit seeds


BUILTIN_TASK = "daemon.builtin.mnist_mlp:build"
PRECISIONS = ("fp32", "bf16", "fp16")
# How OpenMP threads wait at a barrier: "auto" follows the machine; the others are libgomp spin
# counts (daemon/service/threads.py, SPIN_COUNTS).
WAIT_POLICIES = ("auto", "bounded", "passive", "active")


@dataclass(kw_only=True)
class TaskConfig:
    # What trains: "package.module:callable" or "path/to/file.py:callable" (relative to the working
    # directory), called with a daemon.train.task.TaskContext; it returns the task (docs/task.md).
    entry: str = BUILTIN_TASK
    # Handed to the task as context.options; plain values only, as every checkpoint stores them.
    options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_options(self.options, "task.options")
        target, sep, name = self.entry.rpartition(":")
        _require(
            bool(sep and target and name.isidentifier()),
            "task.entry",
            f"{self.entry!r} must be 'package.module:callable' or 'path/to/file.py:callable'",
        )


@dataclass(kw_only=True)
class DataConfig:
    root: str = "data"  # MNIST lives in <root>/MNIST/raw/, laid out there from the shipped files
    download: bool = True  # let torchvision download when neither the files nor the shipped copy exist
    num_workers: int = 0  # DataLoader worker processes; the data order does not depend on it
    shuffle: bool = True  # a new permutation every epoch, derived from train.seed and the epoch
    train_subset: int | None = None  # train on the first N samples only (small runs, tests)
    test_subset: int | None = None  # evaluate on the first N test samples only

    def __post_init__(self) -> None:
        _require(self.num_workers >= 0, "data.num_workers", "must be >= 0")
        for key in ("train_subset", "test_subset"):
            value = getattr(self, key)
            _require(value is None or value > 0, f"data.{key}", "must be a positive integer or null")


@dataclass(kw_only=True)
class ModelConfig:
    hidden: list[int] = field(default_factory=lambda: [500])  # hidden layer widths of the MLP 784-...-10
    dropout: float = 0.0  # dropout after each hidden layer

    def __post_init__(self) -> None:
        _require(
            len(self.hidden) > 0 and all(h > 0 for h in self.hidden),
            "model.hidden",
            "must be a non-empty list of positive integers",
        )
        _require(0.0 <= self.dropout < 1.0, "model.dropout", "must be in [0, 1)")


@dataclass(kw_only=True)
class SchedulerConfig:
    name: str  # "step" (StepLR) or "cosine" (CosineAnnealingLR)
    step_size: int = 1  # step: intervals (epochs or steps) between decays
    gamma: float = 0.1  # step: decay factor
    t_max: int = 5  # cosine: intervals of one half-period

    interval: str = "epoch"  # "epoch": stepped after each epoch; "step": after each optimizer step

    def __post_init__(self) -> None:
        _require(self.name in ("step", "cosine"), "optim.scheduler.name", "must be 'step' or 'cosine'")
        _require(self.interval in ("epoch", "step"), "optim.scheduler.interval", "must be 'epoch' or 'step'")
        _require(self.step_size >= 1, "optim.scheduler.step_size", "must be >= 1")
        _require(self.gamma > 0, "optim.scheduler.gamma", "must be > 0")
        _require(self.t_max >= 1, "optim.scheduler.t_max", "must be >= 1")


@dataclass(kw_only=True)
class OptimConfig:
    name: str = "adam"  # "adam", "adamw" or "sgd"
    lr: float = 1e-3
    weight_decay: float = 0.0
    momentum: float = 0.0  # sgd only
    scheduler: SchedulerConfig | None = None  # null: constant learning rate
    warmup_steps: int = 0  # the LR rises linearly over the first N optimizer steps (0: none)
    clip_grad_norm: float | None = None  # clip the gradients' total 2-norm to this before each step

    def __post_init__(self) -> None:
        _require(self.warmup_steps >= 0, "optim.warmup_steps", "must be >= 0")
        _require(self.clip_grad_norm is None or self.clip_grad_norm > 0, "optim.clip_grad_norm", "must be > 0 or null")
        _require(self.name in ("adam", "adamw", "sgd"), "optim.name", "must be 'adam', 'adamw' or 'sgd'")
        _require(self.lr > 0, "optim.lr", "must be > 0")
        _require(self.weight_decay >= 0, "optim.weight_decay", "must be >= 0")
        _require(self.momentum >= 0, "optim.momentum", "must be >= 0")


@dataclass(kw_only=True)
class TrainConfig:
    epochs: int = 5
    batch_size: int = 100
    seed: int = 0  # seeds the model init, the data order and every RNG; numpy takes 32 bits
    device: str = "auto"  # "auto" (CUDA when present), "cpu", "cuda" or "cuda:N"
    eval_batch_size: int = 1000  # evaluation only; does not change training
    max_steps: int | None = None  # end the run after this many steps, mid-epoch if need be (null: epochs decide)
    # torch.use_deterministic_algorithms: an op without a deterministic kernel stops the run (exit 78)
    # instead of making it silently inexact. false: such ops run, and resume is no longer bitwise.
    deterministic: bool = True
    cpu_threads: int | None = (
        None  # intra-op threads; null: the CPUs this process may use (docs/exactness.md, "Threads")
    )
    cpu_wait: str = (
        "auto"  # how OpenMP threads wait at a barrier: "auto" (follows the machine), "bounded", "active", "passive"
    )
    grad_accum_steps: int = 1  # batches of batch_size whose gradients make one optimizer step
    precision: str = "fp32"  # "bf16": autocast to bfloat16 (CPU, CUDA); "fp16": float16 with loss scaling (CUDA)

    def __post_init__(self) -> None:
        _require(self.grad_accum_steps >= 1, "train.grad_accum_steps", "must be >= 1")
        _require(self.precision in PRECISIONS, "train.precision", f"must be one of {', '.join(PRECISIONS)}")
        _require(
            self.precision != "fp16" or self.device != "cpu",
            "train.precision",
            "fp16 needs CUDA (its loss scaling is CUDA's); use bf16 on the CPU",
        )
        _require(self.epochs >= 1, "train.epochs", "must be >= 1")
        _require(self.max_steps is None or self.max_steps >= 1, "train.max_steps", "must be >= 1 or null")
        _require(self.cpu_threads is None or self.cpu_threads >= 1, "train.cpu_threads", "must be >= 1 or null")
        _require(self.cpu_wait in WAIT_POLICIES, "train.cpu_wait", f"must be one of {', '.join(WAIT_POLICIES)}")
        _require(self.batch_size >= 1, "train.batch_size", "must be >= 1")
        _require(0 <= self.seed <= SEED_MAX, "train.seed", f"must be in [0, {SEED_MAX}]")
        _require(self.eval_batch_size >= 1, "train.eval_batch_size", "must be >= 1")
        valid_device = self.device in ("auto", "cpu", "cuda") or (
            self.device.startswith("cuda:") and self.device[5:].isdigit()
        )
        _require(valid_device, "train.device", "must be 'auto', 'cpu', 'cuda' or 'cuda:N'")


@dataclass(kw_only=True)
class CheckpointConfig:
    dir: str = "checkpoints"
    every_steps: int = 0  # also save every N steps (0: off); every epoch end always saves
    every_seconds: float = 60.0  # also save when this long has passed since the last save (0: off)
    keep_last: int = 3  # valid checkpoints kept; older ones are deleted after each save
    async_save: bool = True  # periodic saves are written by a background thread from an in-memory snapshot
    # The share of the training time periodic saves may cost (e.g. 0.02): the daemon measures what each
    # save costs the loop and chooses the interval from it (daemon/ckpt/budget.py), in place of
    # every_steps and every_seconds. null: those fixed intervals.
    max_overhead: float | None = None
    # The mean time between failures of this run's machines: with max_overhead, the interval follows
    # Young/Daly's sqrt(2 * save cost * MTBF) where that is longer than the budget needs. null: the budget alone.
    mtbf_hours: float | None = None
    # The remote tier (daemon/ckpt/remote.py): an fsspec URL such as s3://bucket/prefix that every
    # checkpoint is uploaded to in the background, and resumed from on a machine whose dir is empty.
    remote: str | None = None
    # Handed to the remote filesystem (e.g. {endpoint_url: http://127.0.0.1:9000}); never credentials,
    # which come from the platform's standard chain (environment, profile, instance metadata).
    remote_options: dict[str, Any] = field(default_factory=dict)
    # A stop waits this long for its emergency checkpoint to be uploaded (the strictest platforms
    # give 30 s between SIGTERM and SIGKILL); past it the run exits 75 with the local copy.
    remote_stop_timeout_seconds: float = 20.0
    # The remote prefix's lease (one run trains into it): held this long past each renewal.
    remote_lease_seconds: float = 60.0

    def __post_init__(self) -> None:
        _require(self.every_steps >= 0, "checkpoint.every_steps", "must be >= 0")
        _check_remote(self)
        _require(self.every_seconds >= 0, "checkpoint.every_seconds", "must be >= 0")
        _require(self.keep_last >= 1, "checkpoint.keep_last", "must be >= 1")
        _check_budget(self)
        # Found now, not at the first save after an epoch of training.
        _require(
            Path(self.dir).is_dir() or not Path(self.dir).exists(),
            "checkpoint.dir",
            f"{self.dir} exists and is not a directory",
        )


@dataclass(kw_only=True)
class LogConfig:
    level: str = "info"  # debug, info, warning, error
    format: str = "auto"  # "auto": JSON lines off a terminal, console on one; or "json", "console"
    progress_every_seconds: float = 5.0  # how often a `progress` event reports the epoch in flight
    metrics_every_steps: int = 50  # the training loss goes to the metrics history every N steps (0: off)

    def __post_init__(self) -> None:
        _require(
            self.level in ("debug", "info", "warning", "error"), "log.level", "must be debug, info, warning or error"
        )
        _require(self.format in ("auto", "json", "console"), "log.format", "must be auto, json or console")
        _require(self.progress_every_seconds > 0, "log.progress_every_seconds", "must be > 0")
        _require(self.metrics_every_steps >= 0, "log.metrics_every_steps", "must be >= 0")


BACKENDS = ("auto", "gloo", "nccl")
STRATEGIES = ("ddp", "fsdp")


@dataclass(kw_only=True)
class DistConfig:
    # Processes on this machine, each a rank training its slice of every global batch (train.batch_size
    # samples whatever the world size); 1: today's single process, no process group.
    nproc_per_node: int = 1
    nnodes: int = 1  # machines; each runs `trainer run` with the same config (docs/distributed.md)
    rdzv_endpoint: str = "127.0.0.1:29400"  # host:port of the c10d rendezvous, the same on every node
    max_restarts: int = 0  # restarts of the rank group after a rank crashed or was killed (not after a stop)
    backend: str = "auto"  # "auto": gloo on the CPU, nccl on CUDA
    timeout_seconds: float = 300.0  # a collective that waits longer for a rank fails the run instead of hanging it
    # "ddp": every rank holds the whole model, rank 0 writes one checkpoint file; "fsdp": the model and
    # the optimizer's state sharded over the ranks (FSDP2), each checkpoint a directory every rank writes
    # its shard to (docs/distributed.md#fsdp-sharded-models). Needs several ranks.
    strategy: str = "ddp"
    # fsdp: a checkpoint of another world size is resumed by resharding (DCP reshards the model and the
    # optimizer's state, the rest of the epoch is split over the new ranks): it continues correctly, not
    # bitwise (docs/distributed.md#another-world-size). false refuses it (78), as ddp always does.
    allow_reshard: bool = True

    def __post_init__(self) -> None:
        _require(self.nproc_per_node >= 1, "dist.nproc_per_node", "must be >= 1")
        _require(self.nnodes >= 1, "dist.nnodes", "must be >= 1")
        _require(self.max_restarts >= 0, "dist.max_restarts", "must be >= 0")
        _require(self.backend in BACKENDS, "dist.backend", f"must be one of {', '.join(BACKENDS)}")
        _require(self.timeout_seconds > 0, "dist.timeout_seconds", "must be > 0")
        _require(self.strategy in STRATEGIES, "dist.strategy", f"must be one of {', '.join(STRATEGIES)}")
        host, sep, port = self.rdzv_endpoint.rpartition(":")
        _require(
            bool(sep and host) and port.isdigit() and 0 < int(port) < 65536,
            "dist.rdzv_endpoint",
            f"{self.rdzv_endpoint!r} must be host:port",
        )

    @property
    def launches(self) -> bool:
        """Whether `trainer run` starts the ranks itself (through torch's elastic launcher)."""
        return self.nproc_per_node > 1 or self.nnodes > 1


PREEMPTION_NOTICES = ("auto", "aws", "gcp", "azure", "off")


@dataclass(kw_only=True)
class PreemptionConfig:
    # Whose metadata service to poll for a preemption notice (daemon/service/preemption.py): "aws",
    # "gcp", "azure", "auto" (whichever answers as its platform does) or "off". Off by default: off a
    # cloud the link-local address may drop packets (seconds of probing) or belong to something else.
    notice: str = "off"
    # null: the platforms' link-local address, 169.254.169.254; a base URL such as http://127.0.0.1:8080
    # replaces it (tests, proxies).
    endpoint: str | None = None
    # "checkpoint": a checkpoint at the next step, then training goes on; "stop": as SIGTERM (exit 75).
    on_notice: str = "checkpoint"

    def __post_init__(self) -> None:
        _require(
            self.notice in PREEMPTION_NOTICES, "preemption.notice", f"must be one of {', '.join(PREEMPTION_NOTICES)}"
        )
        _require(self.on_notice in ("checkpoint", "stop"), "preemption.on_notice", "must be 'checkpoint' or 'stop'")
        if self.endpoint is not None:
            url = urlsplit(self.endpoint)
            _require(
                url.scheme in ("http", "https") and bool(url.netloc) and not (url.query or url.fragment),
                "preemption.endpoint",
                f"{self.endpoint!r} is not a base URL such as http://127.0.0.1:8080",
            )


@dataclass(kw_only=True)
class Config:
    task: TaskConfig = field(default_factory=TaskConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    preemption: PreemptionConfig = field(default_factory=PreemptionConfig)

    @classmethod
    def from_yaml(cls, path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Config:
        """Read `path`, apply `section.key=value` overrides (values parsed as YAML), validate."""
        path = Path(path)
        raw = read_tree(path, overrides)
        try:
            config = build(cls, raw, prefix="")
            config._check_builtin_settings()
        except ConfigError as exc:
            raise ConfigError(f"{path}: {exc}") from None
        return config

    def _check_builtin_settings(self) -> None:
        """`model` and the data subsets configure the built-in MLP; another task takes its own
        settings from task.options, and would silently ignore them."""
        if self.task.entry == BUILTIN_TASK:
            return
        defaults = Config().flat()
        builtin_only = [
            key
            for key in ("model.hidden", "model.dropout", "data.train_subset", "data.test_subset")
            if self.flat()[key] != defaults[key]
        ]
        _require(
            not builtin_only,
            builtin_only[0] if builtin_only else "",
            f"configures the built-in MNIST MLP, not {self.task.entry}; give that task its settings under task.options",
        )

    def flat(self) -> dict[str, Any]:
        """Every setting under its dotted key, e.g. {"train.batch_size": 100, ...}."""
        return flatten(dataclasses.asdict(self))


# Names of options that carry a secret: a checkpoint stores its config, so none may be given here.
SECRET_OPTION_WORDS = ("key", "secret", "token", "password", "credential", "sas")


def _check_remote(cfg: CheckpointConfig) -> None:
    if cfg.remote is None:
        _require(not cfg.remote_options, "checkpoint.remote_options", "set without checkpoint.remote")
        return
    scheme, sep, rest = cfg.remote.partition("://")
    _require(
        bool(sep and scheme.isidentifier() and rest.strip("/")),
        "checkpoint.remote",
        f"{cfg.remote!r} is not a URL such as s3://bucket/prefix",
    )
    check_options(cfg.remote_options, "checkpoint.remote_options")
    for name in flatten(cfg.remote_options):
        _require(
            not any(word in name.lower() for word in SECRET_OPTION_WORDS) or name.endswith("_url"),
            f"checkpoint.remote_options.{name}",
            "looks like a credential, which every checkpoint would store: give it through the environment "
            "(AWS_ACCESS_KEY_ID, AWS_PROFILE, ...) or the machine's role instead",
        )
    _require(cfg.remote_stop_timeout_seconds > 0, "checkpoint.remote_stop_timeout_seconds", "must be > 0")
    _require(cfg.remote_lease_seconds >= 3, "checkpoint.remote_lease_seconds", "must be >= 3")


def _check_budget(cfg: CheckpointConfig) -> None:
    if cfg.max_overhead is None:
        _require(cfg.mtbf_hours is None, "checkpoint.mtbf_hours", "needs checkpoint.max_overhead, which clips it")
        return
    # Past half the time, saving is what the run does: a fraction, not a percentage, was meant.
    _require(0 < cfg.max_overhead <= 0.5, "checkpoint.max_overhead", "must be in (0, 0.5] (0.02: 2%) or null")
    _require(
        cfg.every_steps == 0,
        "checkpoint.every_steps",
        "set with checkpoint.max_overhead, which chooses the interval: set one of them",
    )
    _require(cfg.mtbf_hours is None or cfg.mtbf_hours > 0, "checkpoint.mtbf_hours", "must be > 0 or null")


def _require(condition: bool, key: str, problem: str) -> None:
    if not condition:
        raise ConfigError(f"{key}: {problem}")
