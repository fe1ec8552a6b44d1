"""The checkpoint format, checked before anything of a checkpoint is loaded.

The CRC proves that a file holds what was written; this proves that what was written is a
checkpoint, and one of this run: every key, type, tensor shape and dtype, length and range that
loading and resuming rely on. Two levels:

- `check_format`: any trainer checkpoint (keys, format version, kind, the name it is stored under);
- `CheckpointSchema`: a checkpoint this run can load. Its keys and expected structure are taken from
  the live objects the checkpoint would be loaded into (the run's state registry: the model's and
  optimizer's state dicts, the LR schedules, the sampler, the RNGs, the task's own state), so it
  follows the config and the task without a second description of them.

A failed check raises InvalidCheckpoint with the key and what is wrong with it.
"""

from __future__ import annotations

import math
import reprlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from daemon.ckpt.layout import CHECKPOINT_NAME

FORMAT_VERSION = 1
KINDS = ("periodic", "epoch", "emergency", "on_demand", "notice", "handover", "final")
# What every checkpoint of this format holds besides the run's registered state (daemon/ckpt/registry.py):
# where the run stands (TrainProgress) and what it was trained with.
REQUIRED_KEYS = frozenset(
    {"format_version", "kind", "epoch", "step_in_epoch", "global_step", "metrics", "history", "config", "fingerprint"}
)
OPTIONAL_KEYS = frozenset({"cpu_threads", "world_size"})  # added to the format later: checked when present
# The settings of an LR scheduler's state that its progress does not change (step_size, gamma, base_lrs...).
SCHEDULER_PROGRESS = frozenset({"last_epoch", "_step_count", "_last_lr", "_get_lr_called_within_step", "_is_initial"})


class InvalidCheckpoint(Exception):
    """The file is not a usable checkpoint; the message says why."""


def require(condition: bool, where: str, problem: str) -> None:
    if not condition:
        raise InvalidCheckpoint(f"{where}: {problem}")


def check_format(state: Any, path: Path) -> None:
    """A trainer checkpoint of this format, stored under the name its content gives."""
    require(isinstance(state, dict) and REQUIRED_KEYS <= state.keys(), "not a trainer checkpoint", "keys missing")
    if not (is_exactly(state["format_version"], int) and state["format_version"] == FORMAT_VERSION):
        raise InvalidCheckpoint(f"format version {shown(state['format_version'])}, this trainer reads {FORMAT_VERSION}")
    require(is_exactly(state["kind"], str) and state["kind"] in KINDS, "kind", f"unknown kind {shown(state['kind'])}")
    require(
        is_exactly(state["global_step"], int) and state["global_step"] >= 0, "global_step", "must be an integer >= 0"
    )
    config = state["config"]
    require(
        isinstance(config, dict) and all(is_exactly(k, str) and _plain(v) for k, v in config.items()),
        "config",
        "must map setting names to plain values",
    )
    require(isinstance(state["fingerprint"], str), "fingerprint", "must be a string")
    name = CHECKPOINT_NAME.match(path.name)
    if name:  # retention and resume order files by name: it must say what the file holds
        stored_as = (int(name["step"]), name["kind"])
        require(
            stored_as == (state["global_step"], state["kind"]),
            "global_step, kind",
            f"{(state['global_step'], state['kind'])} in the file, {stored_as} in its name",
        )


def _plain(value: Any) -> bool:
    """A setting's value as Config.flat() gives it: a scalar, or a list of scalars (model.hidden)."""
    scalar = (type(None), bool, int, float, str)
    return isinstance(value, scalar) or (is_exactly(value, list) and all(isinstance(item, scalar) for item in value))


def shown(value: Any) -> str:
    """A repr short enough for a log line, whatever a forged file holds."""
    return reprlib.repr(value)


def is_exactly(value: Any, kind: type) -> bool:
    """`value` is exactly of `kind`: a bool is not an int here, nor an int a float."""
    return type(value) is kind


def finite(value: Any) -> bool:
    return is_exactly(value, float) and math.isfinite(value)


class Rule:
    """A template leaf checked by a function, where the structure varies: a list whose length
    depends on the run's progress, a value that may be None."""

    def __init__(self, check: Callable[[Any, str], None]) -> None:
        self.check = check


def conform(value: Any, template: Any, where: str) -> None:
    """`value` has the structure of `template`: the same keys and lengths, the same types, tensors
    of the same shape, dtype and layout, finite floats; a Rule in the template checks its part."""
    if isinstance(template, Rule):
        template.check(value, where)
    elif isinstance(template, torch.Tensor):
        require(isinstance(value, torch.Tensor), where, f"a tensor expected, found {type(value).__name__}")
        require(value.layout == template.layout, where, f"layout {value.layout}, expected {template.layout}")
        require(value.dtype == template.dtype, where, f"dtype {value.dtype}, expected {template.dtype}")
        require(value.shape == template.shape, where, f"shape {tuple(value.shape)}, expected {tuple(template.shape)}")
    elif isinstance(template, dict):
        require(isinstance(value, dict), where, f"a mapping expected, found {type(value).__name__}")
        missing, unexpected = template.keys() - value.keys(), value.keys() - template.keys()
        require(not missing, where, f"keys missing: {listed(missing)}")
        require(not unexpected, where, f"unexpected keys: {listed(unexpected)}")
        for key, expected in template.items():
            conform(value[key], expected, f"{where}.{key}")
    elif isinstance(template, (list, tuple)):
        require(
            is_exactly(value, type(template)),
            where,
            f"a {type(template).__name__} expected, found {type(value).__name__}",
        )
        require(len(value) == len(template), where, f"{len(value)} entries, expected {len(template)}")
        for index, (item, expected) in enumerate(zip(value, template, strict=True)):
            conform(item, expected, f"{where}[{index}]")
    else:
        require(is_exactly(value, type(template)), where, f"{type(template).__name__} expected, found {shown(value)}")
        require(not is_exactly(value, float) or math.isfinite(value), where, f"{shown(value)} is not a finite number")


def listed(keys) -> str:
    return ", ".join(sorted(map(str, keys)))


def like(template: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """A template tensor of `template`'s dtype in another shape (allocates nothing)."""
    return torch.empty(shape, dtype=template.dtype, device="meta")


def probe_optimizer(build: Callable[[torch.nn.Module], torch.optim.Optimizer]) -> dict:
    """The state dict of the run's optimizer built for a one-parameter probe, after one step with a
    zero gradient: what it keeps per parameter, and the settings of its param groups. A 2-D tensor in
    its state stands for one shaped like each parameter. Draws no random numbers."""
    module = torch.nn.Module()
    module.weight = torch.nn.Parameter(torch.zeros(2, 3))
    optimizer = build(module)
    module.weight.grad = torch.zeros_like(module.weight)
    optimizer.step()
    return optimizer.state_dict()


@dataclass(frozen=True, kw_only=True)
class RunShape:
    """How the run being resumed counts: what a checkpoint's position must agree with."""

    steps_per_epoch: int  # optimizer steps
    samples_per_step: int  # batch_size x grad_accum_steps
    # Each LR schedule's key in the checkpoint, and what it counts: "epoch" or "step".
    schedules: dict[str, str]


class CheckpointSchema:
    """What a checkpoint must hold for this run to load it and resume exactly."""

    def __init__(
        self,
        *,
        template: dict,
        validators: dict[str, Callable[[Any, dict], None]],
        parameters: list[torch.Tensor],
        optimizer_probe: dict | None,
        shape: RunShape,
    ) -> None:
        """`template`: what this run writes (the live registry's state and the progress), the
        structure a checkpoint must have; `validators`: the registered pieces that check their own
        state, by key, each called with its value and the whole checkpoint; `parameters`: the optimizer's, in the order its state dict
        numbers them; `optimizer_probe`: probe_optimizer of the run's builder, None when the task
        builds its own optimizer (then only the structure of its state is checked)."""
        self.live = template
        self.parameter_shapes = {index: tuple(parameter.shape) for index, parameter in enumerate(parameters)}
        self.optimizer_probe = optimizer_probe
        self.shape = shape
        self.checks: dict[str, Callable[[Any, dict], None]] = {
            "optimizer": lambda value, state: self._check_optimizer(value, trained=state["global_step"] > 0),
            # A count a resume acts on (torch.set_num_threads): an int alone is not one.
            "cpu_threads": lambda value, _state: _positive_count(value, "cpu_threads"),
            **validators,
        }
        for key, counts in shape.schedules.items():
            self.checks[key] = self._schedule_check(key, counts)

    def _schedule_check(self, key: str, counts: str) -> Callable[[Any, dict], None]:
        """The check of LR schedule `key`, at the position's count of epochs or steps (what it `counts`)."""
        return lambda value, state: self._check_schedule(
            key, value, state["epoch"] if counts == "epoch" else state["global_step"]
        )

    def check(self, state: dict) -> None:
        """Raise InvalidCheckpoint unless `state` (which passed `check_format`) fits this run."""
        missing = self.live.keys() - OPTIONAL_KEYS - state.keys()
        require(not missing, "checkpoint", f"keys missing: {listed(missing)}")
        unexpected = state.keys() - self.live.keys()
        require(not unexpected, "checkpoint", f"unexpected keys: {listed(unexpected)}")
        self._check_progress(state)
        for key in self.live.keys() - REQUIRED_KEYS:
            if key in state:
                self.checks.get(key, lambda value, _state, key=key: conform(value, self.live[key], key))(
                    state[key], state
                )

    def _check_progress(self, state: dict) -> None:
        for key in ("epoch", "step_in_epoch", "global_step"):
            conform(state[key], self.live[key], key)
        metrics_template: dict[str, Any] = {"loss_sum": 0.0, "samples": 0}
        if isinstance(state["metrics"], dict) and "sums" in state["metrics"]:
            metrics_template["sums"] = Rule(_names_to_finite)
        conform(state["metrics"], metrics_template, "metrics")
        epoch, step, per_epoch = state["epoch"], state["step_in_epoch"], self.shape.steps_per_epoch
        require(epoch >= 0, "epoch", f"{epoch} is negative")
        require(0 <= step <= per_epoch, "step_in_epoch", f"{step} is outside this run's 0..{per_epoch} steps per epoch")
        position = epoch * per_epoch + step
        require(
            state["global_step"] == position,
            "global_step",
            f"{state['global_step']}, but epoch {epoch} step {step} is step {position} at {per_epoch} steps per epoch",
        )
        samples = state["metrics"]["samples"]
        expected = min(step * self.shape.samples_per_step, self.live["data"]["num_samples"])
        require(samples == expected, "metrics.samples", f"{samples}, but {step} steps train {expected} samples")
        require(state["metrics"]["loss_sum"] >= 0, "metrics.loss_sum", "is negative")
        history = state["history"]
        require(
            is_exactly(history, list) and len(history) == epoch, "history", f"must list the {epoch} completed epochs"
        )
        for index, entry in enumerate(history):
            where = f"history[{index}]"
            conform(entry, {"epoch": 1, "train_loss": 0.0, **_metrics_of(entry)}, where)
            require(entry["epoch"] == index + 1, f"{where}.epoch", f"{entry['epoch']}, expected {index + 1}")
            require(entry["train_loss"] >= 0, f"{where}.train_loss", "is negative")
            accuracy = entry.get("test_accuracy")
            require(accuracy is None or 0 <= accuracy <= 1, f"{where}.test_accuracy", "is not a fraction")

    def _check_optimizer(self, optimizer: Any, trained: bool) -> None:
        live_groups = self.live["optimizer"]["param_groups"]
        probe = self.optimizer_probe
        per_parameter = probe["state"].get(0, {}) if probe else {}
        states = Rule(lambda value, where: self._check_parameter_states(value, where, per_parameter, trained))
        conform(optimizer, {"state": states, "param_groups": live_groups}, "optimizer")
        for index, (group, live_group) in enumerate(zip(optimizer["param_groups"], live_groups, strict=True)):
            # Every setting as the probe's (the learning rate moves with the schedules: only its
            # type is checked); the parameters as the run's.
            settings = {key: value for key, value in probe["param_groups"][0].items() if key != "lr"} if probe else {}
            for key, expected in {**settings, "params": live_group["params"]}.items():
                require(
                    group[key] == expected,
                    f"optimizer.param_groups[{index}].{key}",
                    f"{shown(group[key])}, this run's optimizer has {shown(expected)}",
                )

    def _check_parameter_states(self, states: Any, where: str, per_parameter: dict, trained: bool) -> None:
        require(isinstance(states, dict), where, f"a mapping expected, found {type(states).__name__}")
        shapes = self.parameter_shapes
        unknown = [key for key in states if not is_exactly(key, int) or key not in shapes]
        require(not unknown, where, f"state for parameters this model lacks: {unknown[:5]}")
        if trained and per_parameter:  # every parameter has stepped
            missing = sorted(shapes.keys() - states.keys())
            require(not missing, where, f"no state for parameters {missing[:5]} after training steps")
        for key, state in states.items():
            if not per_parameter:  # a task's own optimizer: no probe says what it keeps per parameter
                continue
            expected = {
                name: like(value, shapes[key]) if isinstance(value, torch.Tensor) and value.dim() == 2 else value
                for name, value in per_parameter.items()
            }
            conform(state, expected, f"{where}.{key}")

    def _check_schedule(self, key: str, schedule: Any, count: int) -> None:
        """An LR schedule's state: the run's structure and settings, at the count the position gives."""
        live = self.live[key]
        if live is None:
            require(schedule is None, key, "this run has no such schedule")
            return
        conform(schedule, live, key)
        for name, expected in live.items():
            if name not in SCHEDULER_PROGRESS:
                require(
                    schedule[name] == expected, f"{key}.{name}", f"{shown(schedule[name])}, expected {shown(expected)}"
                )
        require(schedule["last_epoch"] == count, f"{key}.last_epoch", f"{schedule['last_epoch']}, expected {count}")


def _metrics_of(entry: Any) -> dict:
    """The template of a history entry's metrics (a task's evaluation and step metrics): each a finite number."""
    if not isinstance(entry, dict):
        return {}
    return {key: Rule(_finite_number) for key in entry if key not in ("epoch", "train_loss")}


def _positive_count(value: Any, where: str) -> None:
    require(is_exactly(value, int) and value >= 1, where, f"{shown(value)} is not a count >= 1")


def _finite_number(value: Any, where: str) -> None:
    require((is_exactly(value, int) or finite(value)), where, f"{shown(value)} is not a finite number")


def _names_to_finite(value: Any, where: str) -> None:
    require(isinstance(value, dict), where, f"a mapping expected, found {type(value).__name__}")
    for name, number in value.items():
        require(is_exactly(name, str), where, f"{shown(name)} is not a metric name")
        _finite_number(number, f"{where}.{name}")
