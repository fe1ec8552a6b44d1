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
import re
import reprlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

FORMAT_VERSION = 1
KINDS = ("periodic", "epoch", "emergency", "on_demand", "handover", "final")
# What every checkpoint of this format holds besides the run's registered state (daemon/ckpt/registry.py):
# where the run stands (TrainProgress) and what it was trained with.
REQUIRED_KEYS = frozenset(
    {"format_version", "kind", "epoch", "step_in_epoch", "global_step", "metrics", "history", "config", "fingerprint"}
)
OPTIONAL_KEYS = frozenset({"cpu_threads", "world_size"})  # added to the format later: checked when present
NAME = re.compile(r"^ckpt-(?P<step>\d{10})-(?P<kind>[a-z_]+)\.pt$")
# The settings of an LR scheduler's state that its progress does not change (step_size, gamma, base_lrs...).
SCHEDULER_PROGRESS = frozenset({"last_epoch", "_step_count", "_last_lr", "_get_lr_called_within_step", "_is_initial"})
UINT32_END = 2**32  # the Mersenne Twister's words (numpy's and Python's RNG state)
MT_WORDS = 624


class InvalidCheckpoint(Exception):
    """The file is not a usable checkpoint; the message says why."""


def _require(condition: bool, where: str, problem: str) -> None:
    if not condition:
        raise InvalidCheckpoint(f"{where}: {problem}")


def check_format(state: Any, path: Path) -> None:
    """A trainer checkpoint of this format, stored under the name its content gives."""
    _require(isinstance(state, dict) and REQUIRED_KEYS <= state.keys(), "not a trainer checkpoint", "keys missing")
    if not (_is(state["format_version"], int) and state["format_version"] == FORMAT_VERSION):
        raise InvalidCheckpoint(f"format version {_shown(state['format_version'])}, this trainer reads {FORMAT_VERSION}")
    _require(_is(state["kind"], str) and state["kind"] in KINDS, "kind", f"unknown kind {_shown(state['kind'])}")
    _require(_is(state["global_step"], int) and state["global_step"] >= 0, "global_step", "must be an integer >= 0")
    config = state["config"]
    _require(isinstance(config, dict) and all(_is(k, str) and _plain(v) for k, v in config.items()), "config",
             "must map setting names to plain values")  # fmt: skip
    _require(isinstance(state["fingerprint"], str), "fingerprint", "must be a string")
    name = NAME.match(path.name)
    if name:  # retention and resume order files by name: it must say what the file holds
        stored_as = (int(name["step"]), name["kind"])
        _require(stored_as == (state["global_step"], state["kind"]), "global_step, kind",
                 f"{(state['global_step'], state['kind'])} in the file, {stored_as} in its name")  # fmt: skip


def _plain(value: Any) -> bool:
    """A setting's value as Config.flat() gives it: a scalar, or a list of scalars (model.hidden)."""
    scalar = (type(None), bool, int, float, str)
    return isinstance(value, scalar) or (_is(value, list) and all(isinstance(item, scalar) for item in value))


def _shown(value: Any) -> str:
    """A repr short enough for a log line, whatever a forged file holds."""
    return reprlib.repr(value)


def _is(value: Any, kind: type) -> bool:
    """`value` is exactly of `kind`: a bool is not an int here, nor an int a float."""
    return type(value) is kind


def _finite(value: Any) -> bool:
    return _is(value, float) and math.isfinite(value)


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
        _require(isinstance(value, torch.Tensor), where, f"a tensor expected, found {type(value).__name__}")
        _require(value.layout == template.layout, where, f"layout {value.layout}, expected {template.layout}")
        _require(value.dtype == template.dtype, where, f"dtype {value.dtype}, expected {template.dtype}")
        _require(value.shape == template.shape, where, f"shape {tuple(value.shape)}, expected {tuple(template.shape)}")
    elif isinstance(template, dict):
        _require(isinstance(value, dict), where, f"a mapping expected, found {type(value).__name__}")
        missing, unexpected = template.keys() - value.keys(), value.keys() - template.keys()
        _require(not missing, where, f"keys missing: {_listed(missing)}")
        _require(not unexpected, where, f"unexpected keys: {_listed(unexpected)}")
        for key, expected in template.items():
            conform(value[key], expected, f"{where}.{key}")
    elif isinstance(template, (list, tuple)):
        _require(_is(value, type(template)), where, f"a {type(template).__name__} expected, found {type(value).__name__}")
        _require(len(value) == len(template), where, f"{len(value)} entries, expected {len(template)}")
        for index, (item, expected) in enumerate(zip(value, template)):
            conform(item, expected, f"{where}[{index}]")
    else:
        _require(_is(value, type(template)), where, f"{type(template).__name__} expected, found {_shown(value)}")
        _require(not _is(value, float) or math.isfinite(value), where, f"{_shown(value)} is not a finite number")


def _listed(keys) -> str:
    return ", ".join(sorted(map(str, keys)))


def _like(template: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
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

    def __init__(self, *, template: dict, parameters: list[torch.Tensor], optimizer_probe: dict | None, shape: RunShape) -> None:
        """`template`: what this run writes (the live registry's state and the progress), the
        structure a checkpoint must have; `parameters`: the optimizer's, in the order its state dict
        numbers them; `optimizer_probe`: probe_optimizer of the run's builder, None when the task
        builds its own optimizer (then only the structure of its state is checked)."""
        self.live = template
        self.parameter_shapes = {index: tuple(parameter.shape) for index, parameter in enumerate(parameters)}
        self.optimizer_probe = optimizer_probe
        self.shape = shape
        self.checks: dict[str, Callable[[Any, dict], None]] = {
            "optimizer": lambda value, state: self._check_optimizer(value, trained=state["global_step"] > 0),
            "data": lambda value, state: self._check_data(value, state["epoch"], state["step_in_epoch"]),
            "rng": lambda value, state: self._check_rng(value),
        }
        for key, counts in shape.schedules.items():
            self.checks[key] = lambda value, state, key=key, counts=counts: self._check_schedule(
                key, value, state["epoch"] if counts == "epoch" else state["global_step"]
            )

    def check(self, state: dict) -> None:
        """Raise InvalidCheckpoint unless `state` (which passed `check_format`) fits this run."""
        missing = self.live.keys() - OPTIONAL_KEYS - state.keys()
        _require(not missing, "checkpoint", f"keys missing: {_listed(missing)}")
        unexpected = state.keys() - self.live.keys()
        _require(not unexpected, "checkpoint", f"unexpected keys: {_listed(unexpected)}")
        self._check_progress(state)
        for key in self.live.keys() - REQUIRED_KEYS:
            if key in state:
                self.checks.get(key, lambda value, _state, key=key: conform(value, self.live[key], key))(state[key], state)

    def _check_progress(self, state: dict) -> None:
        for key in ("epoch", "step_in_epoch", "global_step"):
            conform(state[key], self.live[key], key)
        metrics_template = {"loss_sum": 0.0, "samples": 0}
        if isinstance(state["metrics"], dict) and "sums" in state["metrics"]:
            metrics_template["sums"] = Rule(_names_to_finite)
        conform(state["metrics"], metrics_template, "metrics")
        epoch, step, per_epoch = state["epoch"], state["step_in_epoch"], self.shape.steps_per_epoch
        _require(epoch >= 0, "epoch", f"{epoch} is negative")
        _require(0 <= step <= per_epoch, "step_in_epoch", f"{step} is outside this run's 0..{per_epoch} steps per epoch")
        position = epoch * per_epoch + step
        _require(state["global_step"] == position, "global_step",
                 f"{state['global_step']}, but epoch {epoch} step {step} is step {position} at {per_epoch} steps per epoch")  # fmt: skip
        samples = state["metrics"]["samples"]
        expected = min(step * self.shape.samples_per_step, self.live["data"]["num_samples"])
        _require(samples == expected, "metrics.samples", f"{samples}, but {step} steps train {expected} samples")
        _require(state["metrics"]["loss_sum"] >= 0, "metrics.loss_sum", "is negative")
        history = state["history"]
        _require(_is(history, list) and len(history) == epoch, "history", f"must list the {epoch} completed epochs")
        for index, entry in enumerate(history):
            where = f"history[{index}]"
            conform(entry, {"epoch": 1, "train_loss": 0.0, **_metrics_of(entry)}, where)
            _require(entry["epoch"] == index + 1, f"{where}.epoch", f"{entry['epoch']}, expected {index + 1}")
            _require(entry["train_loss"] >= 0, f"{where}.train_loss", "is negative")
            accuracy = entry.get("test_accuracy")
            _require(accuracy is None or 0 <= accuracy <= 1, f"{where}.test_accuracy", "is not a fraction")

    def _check_optimizer(self, optimizer: Any, trained: bool) -> None:
        live_groups = self.live["optimizer"]["param_groups"]
        probe = self.optimizer_probe
        per_parameter = probe["state"].get(0, {}) if probe else {}
        states = Rule(lambda value, where: self._check_parameter_states(value, where, per_parameter, trained))
        conform(optimizer, {"state": states, "param_groups": live_groups}, "optimizer")
        for index, (group, live_group) in enumerate(zip(optimizer["param_groups"], live_groups)):
            # Every setting as the probe's (the learning rate moves with the schedules: only its
            # type is checked); the parameters as the run's.
            settings = {key: value for key, value in probe["param_groups"][0].items() if key != "lr"} if probe else {}
            for key, expected in {**settings, "params": live_group["params"]}.items():
                _require(group[key] == expected, f"optimizer.param_groups[{index}].{key}",
                         f"{_shown(group[key])}, this run's optimizer has {_shown(expected)}")  # fmt: skip

    def _check_parameter_states(self, states: Any, where: str, per_parameter: dict, trained: bool) -> None:
        _require(isinstance(states, dict), where, f"a mapping expected, found {type(states).__name__}")
        shapes = self.parameter_shapes
        unknown = [key for key in states if not _is(key, int) or key not in shapes]
        _require(not unknown, where, f"state for parameters this model lacks: {unknown[:5]}")
        if trained and per_parameter:  # every parameter has stepped
            missing = sorted(shapes.keys() - states.keys())
            _require(not missing, where, f"no state for parameters {missing[:5]} after training steps")
        for key, state in states.items():
            if not per_parameter:  # a task's own optimizer: no probe says what it keeps per parameter
                continue
            expected = {
                name: _like(value, shapes[key]) if isinstance(value, torch.Tensor) and value.dim() == 2 else value
                for name, value in per_parameter.items()
            }
            conform(state, expected, f"{where}.{key}")

    def _check_schedule(self, key: str, schedule: Any, count: int) -> None:
        """An LR schedule's state: the run's structure and settings, at the count the position gives."""
        live = self.live[key]
        if live is None:
            _require(schedule is None, key, "this run has no such schedule")
            return
        conform(schedule, live, key)
        for name, expected in live.items():
            if name not in SCHEDULER_PROGRESS:
                _require(schedule[name] == expected, f"{key}.{name}", f"{_shown(schedule[name])}, expected {_shown(expected)}")
        _require(schedule["last_epoch"] == count, f"{key}.last_epoch", f"{schedule['last_epoch']}, expected {count}")

    def _check_data(self, data: Any, epoch: int, step: int) -> None:
        live = self.live["data"]
        conform(data, {**live, "order": _like(live["order"], (live["num_samples"],))}, "data")
        for key in ("version", "num_samples", "batch_size"):
            _require(data[key] == live[key], f"data.{key}", f"{data[key]}, this run has {live[key]}")
        # Mid-epoch the order is that of the epoch in flight; at an epoch's start, that of the one before.
        allowed = (epoch,) if step else (epoch - 1, epoch)
        _require(data["epoch"] in allowed, "data.epoch", f"{data['epoch']} for a checkpoint at epoch {epoch} step {step}")
        order = data["order"]
        is_permutation = torch.equal(order.sort().values, torch.arange(len(order), dtype=order.dtype))
        _require(is_permutation, "data.order", f"is not a permutation of the {len(order)} samples")

    def _check_rng(self, rng: Any) -> None:
        live = self.live["rng"]
        if "version" not in live:  # a run of several ranks: each rank's RNGs under its key (daemon/dist/group.py)
            _require(isinstance(rng, dict) and rng.keys() == live.keys(), "rng", f"must hold the RNGs of {_listed(live)}")
            first = live[min(live)]
            for key in sorted(rng):
                self._check_rng_of(rng[key], first, f"rng.{key}")
            return
        self._check_rng_of(rng, live, "rng")

    def _check_rng_of(self, rng: Any, live: dict, where: str) -> None:
        template = {
            **live,
            "cuda": Rule(lambda value, where: _check_cuda_states(value, where, live["cuda"])),
            "python": {**live["python"], "gauss_next": Rule(_none_or_finite)},
        }
        conform(rng, template, where)
        _require(rng["version"] == live["version"], f"{where}.version", f"{rng['version']}, this trainer writes {live['version']}")
        try:  # torch's generator checks its own state; on a scratch one, the run's is untouched
            torch.Generator().set_state(rng["torch"])
        except RuntimeError as exc:
            raise InvalidCheckpoint(f"{where}.torch: {str(exc).splitlines()[0]}") from None
        numpy = rng["numpy"]
        _require(0 <= numpy["pos"] <= MT_WORDS, f"{where}.numpy.pos", f"{numpy['pos']} is outside 0..{MT_WORDS}")
        _require(numpy["has_gauss"] in (0, 1), f"{where}.numpy.has_gauss", f"{numpy['has_gauss']}, must be 0 or 1")
        _require(_words(numpy["keys"]), f"{where}.numpy.keys", "are not 32-bit words")
        python = rng["python"]["state"]
        _require(_words(python[:-1]) and 0 <= int(python[-1]) <= MT_WORDS, f"{where}.python.state", "is not a Mersenne Twister state")


def _metrics_of(entry: Any) -> dict:
    """The template of a history entry's metrics (a task's evaluation and step metrics): each a finite number."""
    if not isinstance(entry, dict):
        return {}
    return {key: Rule(_finite_number) for key in entry if key not in ("epoch", "train_loss")}


def _finite_number(value: Any, where: str) -> None:
    _require((_is(value, int) or _finite(value)), where, f"{_shown(value)} is not a finite number")


def _names_to_finite(value: Any, where: str) -> None:
    _require(isinstance(value, dict), where, f"a mapping expected, found {type(value).__name__}")
    for name, number in value.items():
        _require(_is(name, str), where, f"{_shown(name)} is not a metric name")
        _finite_number(number, f"{where}.{name}")


def _none_or_finite(value: Any, where: str) -> None:
    _require(value is None or _finite(value), where, f"{_shown(value)} is neither None nor a finite number")


def _check_cuda_states(states: Any, where: str, live: list[torch.Tensor]) -> None:
    """One generator state per CUDA device. Loaded only when this process uses CUDA (RNGState),
    and then its own states say their shape and how many devices there are."""
    _require(_is(states, list), where, f"a list expected, found {type(states).__name__}")
    if live:
        _require(len(states) <= len(live), where, f"{len(states)} device states, this machine has {len(live)} devices")
    for index, state in enumerate(states):
        if live:
            conform(state, live[0], f"{where}[{index}]")
        else:
            uint8_vector = isinstance(state, torch.Tensor) and state.dtype == torch.uint8 and state.dim() == 1
            _require(uint8_vector, f"{where}[{index}]", "must be a 1-D uint8 tensor")


def _words(values: torch.Tensor) -> bool:
    return bool(((values >= 0) & (values < UINT32_END)).all())
