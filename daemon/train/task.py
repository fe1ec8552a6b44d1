"""What a user's training provides, and how the daemon finds it.

The daemon owns the loop, the data order, the signals and every piece of state; a task owns only
its model, its data and its loss. `task.entry` names a callable that takes a TaskContext and
returns an object with the attributes of `Task`. `TaskAdapter` wraps it once, at start: the optional
parts are found there, and the loop calls the adapter alone. docs/task.md walks through one.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import stat
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, Protocol

import torch
from torch import nn

from daemon import events
from daemon.config.sections import Config
from daemon.errors import ConfigError
from daemon.train.data import MapDataset

Metrics = Mapping[str, "torch.Tensor | float"]


@dataclass(frozen=True, kw_only=True)
class TaskContext:
    """What the entry callable is given. Every RNG is seeded from train.seed before it is called."""

    options: dict[str, Any]  # task.options from the config
    device: torch.device  # where the model will train; the daemon moves each batch there
    config: Config  # the whole configuration (data.root, train.eval_batch_size, ...), to read only


class Task(Protocol):
    """The required part. Optional, found by name when present:

    - `version: str`: part of the exactness fingerprint; change it when the task's code changes
      what it computes, and a checkpoint of the old version is refused (exit 78) instead of resumed;
    - `collate_fn(samples) -> batch`: how samples become a batch (default: torch's default_collate);
    - `configure_optimizers(model) -> (optimizer, scheduler or None)`: instead of the `optim` section;
      a scheduler returned here is stepped once per epoch;
    - `state_dict()` / `load_state_dict(state)`: the task's own resumable state (an EMA copy, a
      curriculum), saved in every checkpoint under `task`.

    Random numbers drawn while fetching a sample (augmentation in `train_set.__getitem__`) come from
    generators seeded for that sample from (train.seed, epoch, index): the same on every resume and
    with any number of DataLoader workers. A dataset that serves whole batches with
    `batch(index_tensor)` (the built-in MNIST one) is called in the training process, unseeded:
    it must draw no random numbers.
    """

    model: nn.Module
    train_set: MapDataset  # map-style: the daemon's sampler indexes it, so the data position is exact

    def training_step(self, model: nn.Module, batch: Any) -> torch.Tensor | tuple[torch.Tensor, Metrics]:
        """The loss of one batch (already on the device), optionally with metrics averaged per epoch."""
        ...

    def evaluate(self, model: nn.Module) -> Mapping[str, float]:
        """Evaluation after each epoch (the model in eval mode, no gradients); the first entry is the
        headline metric of `epoch_completed` and `training_completed`. Must draw no random numbers."""
        ...


REQUIRED = ("model", "train_set", "training_step", "evaluate")
# What the units' sandbox (systemd/common.conf) hides from the service, and the setting that does.
HIDDEN_FROM_THE_SERVICE = {
    "/home": "ProtectHome=",
    "/root": "ProtectHome=",
    "/run/user": "ProtectHome=",
    "/tmp": "PrivateTmp=",
    "/var/tmp": "PrivateTmp=",
}


def load_entry(entry: str) -> Callable[[TaskContext], Task]:
    """The callable `task.entry` names; one that cannot be imported or found is a config error."""
    target, _, name = entry.rpartition(":")
    try:
        module = _import_file(Path(target)) if target.endswith(".py") else importlib.import_module(target)
    except (ImportError, OSError, SyntaxError) as exc:
        raise ConfigError(f"task.entry: cannot import {target} ({type(exc).__name__}: {exc})") from None
    built = getattr(module, name, None)
    if not callable(built):
        raise ConfigError(f"task.entry: {target} has no callable {name!r}")
    return built


def _import_file(path: Path) -> ModuleType:
    """A task file, imported as a module of its own name (dataclasses and pickling need one)."""
    hidden = _hidden_from_the_service(path)
    if hidden is not None:
        raise ConfigError(_hidden_message(path, hidden))
    if not path.is_file():
        raise FileNotFoundError(f"no file {path} (relative paths start at the working directory)")
    _report_if_writable_by_others(path)
    name = f"trainer_task_{path.stem}"
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None  # a .py file has a source loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # DataLoader workers started by fork inherit it
    spec.loader.exec_module(module)
    return module


def _hidden_from_the_service(path: Path) -> Path | None:
    """Under systemd, the directory of HIDDEN_FROM_THE_SERVICE that keeps `path` from this process:
    the nearest directory above a file that is not there, when it is one of them (with a drop-in
    that shows a directory below it, that directory is the nearest, and the file is just missing)."""
    if "INVOCATION_ID" not in os.environ or os.path.exists(path):
        return None
    nearest = next(parent for parent in path.absolute().parents if os.path.exists(parent))
    return nearest if str(nearest) in HIDDEN_FROM_THE_SERVICE else None


def _hidden_message(path: Path, hidden: Path) -> str:
    """Why the service cannot see `path`, and the two ways out, the drop-in written out."""
    setting = HIDDEN_FROM_THE_SERVICE[str(hidden)]
    shown = path.parent if path.parent != hidden else path  # the task's directory; never all of /tmp
    drop_in = [
        "[Service]",
        *(["ProtectHome=tmpfs"] if setting == "ProtectHome=" else []),  # an empty home, where a bind may go
        f"BindReadOnlyPaths={shown}",
    ]
    return (
        f"task.entry: cannot import {path}: the service's sandbox hides {hidden} ({setting} in its unit), so the file "
        f"is not there for the service. Keep a task's code and data where the service can read them, e.g. in "
        f"/opt/trainer-tasks or /etc/trainer, readable by other users; or show {shown} to the service, "
        f"read-only, with a drop-in (`systemctl edit {_own_unit()}`):\n" + "\n".join(drop_in)
    )


def _own_unit() -> str:
    """The systemd unit this process runs in, named by the last part of its cgroup."""
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        unit = line.rpartition("/")[2]
        if line.startswith("0::") and unit.endswith(".service"):
            return unit
    return "the unit"


def _report_if_writable_by_others(path: Path) -> None:
    """Whoever else can change the task file, or a directory above it (and so put another file in
    its place), chooses the code this process runs: each such path is reported, along the path as
    named and as links resolve it. A directory with the sticky bit (/tmp) is spared: there, others
    cannot replace what they do not own."""
    named, resolved = path.absolute(), path.resolve()
    for checked in dict.fromkeys((named, *named.parents, resolved, *resolved.parents)):
        st = checked.stat()
        spared = stat.S_ISDIR(st.st_mode) and st.st_mode & stat.S_ISVTX
        if (st.st_mode & (stat.S_IWGRP | stat.S_IWOTH) and not spared) or st.st_uid not in (0, os.geteuid()):
            events.TASK_FILE_WRITABLE_BY_OTHERS.emit(
                path=str(checked), mode=f"{stat.S_IMODE(st.st_mode):04o}", owner_uid=st.st_uid
            )


def build_task(entry: str, context: TaskContext) -> TaskAdapter:
    """Call the entry; a result without a required part is a config error naming the part."""
    task = load_entry(entry)(context)
    missing = [part for part in REQUIRED if not hasattr(task, part)]
    if missing:
        raise ConfigError(f"task.entry: {entry} returned a {type(task).__name__} without {', '.join(missing)}")
    if not isinstance(task.model, nn.Module):
        raise ConfigError(
            f"task.entry: {entry} returned a model that is a {type(task.model).__name__}, not a torch nn.Module"
        )
    if not hasattr(task.train_set, "__getitem__") or not hasattr(task.train_set, "__len__"):
        raise ConfigError(
            f"task.entry: {entry} returned a train_set that is not a map-style dataset (__getitem__, __len__)"
        )
    for part in ("training_step", "evaluate"):
        if not callable(getattr(task, part)):
            raise ConfigError(f"task.entry: {entry} returned a {part} that is not callable")
    return TaskAdapter(task, entry)


class TaskAdapter:
    """A user's task as the daemon calls it: its optional parts found once, its step's result and
    its evaluation in one form."""

    def __init__(self, task: Task, entry: str) -> None:
        self.task = task
        self.entry = entry
        self.model: nn.Module = task.model
        self.train_set: MapDataset = task.train_set
        self.version = str(getattr(task, "version", ""))
        self.collate_fn: Callable | None = getattr(task, "collate_fn", None)
        self.configure_optimizers: Callable | None = getattr(task, "configure_optimizers", None)
        self.has_state = callable(getattr(task, "state_dict", None)) and callable(
            getattr(task, "load_state_dict", None)
        )
        test_set = getattr(task, "test_set", None)
        self.test_samples = len(test_set) if test_set is not None and hasattr(test_set, "__len__") else None

    def training_step(self, model: nn.Module, batch: Any) -> tuple[torch.Tensor, Metrics]:
        out = self.task.training_step(model, batch)
        return out if isinstance(out, tuple) else (out, {})

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        """The task's evaluation, its metric names checked against the daemon's own."""
        metrics = dict(self.task.evaluate(model))
        clashing = [
            name for name in metrics if not isinstance(name, str) or name == "epoch" or name.startswith("train_")
        ]
        if clashing:
            raise ConfigError(
                f"task.entry: {self.entry} evaluates metrics named {clashing}: 'epoch' and "
                f"'train_*' are the daemon's own (the epoch, and the training metrics averaged over it)"
            )
        return {name: float(value) for name, value in metrics.items()}

    def state_dict(self) -> Any:
        return self.task.state_dict()  # type: ignore[attr-defined]  # only called where has_state

    def load_state_dict(self, state: Any) -> None:
        self.task.load_state_dict(state)  # type: ignore[attr-defined]
