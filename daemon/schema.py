"""The checkpoint format, checked before anything of a checkpoint is loaded.

The CRC proves that a file holds what was written; this proves that what was written is a
checkpoint, and one of this run: every key, type, tensor shape and dtype, length and range that
loading and resuming rely on. Two levels:

- `check_format`: any trainer checkpoint (keys, format version, kind, the name it is stored under);
- `CheckpointSchema`: a checkpoint this run can load. Its expected structure is taken from the live
  objects the checkpoint would be loaded into (the trainer's own `state_dict()`: the model's and
  optimizer's state dicts, the sampler, the RNGs), so it follows the config without a second
  description of the model or the optimizer.

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
KINDS = ("periodic", "epoch", "emergency", "on_demand", "final")
REQUIRED_KEYS = frozenset(
    {"format_version", "kind", "state_dict", "optimizer", "scheduler", "epoch", "step_in_epoch", "global_step",
     "metrics", "history", "data", "rng", "config", "fingerprint"}
)  # fmt: skip
NAME = re.compile(r"^ckpt-(?P<step>\d{10})-(?P<kind>[a-z_]+)\.pt$")
# One entry of `history` per completed epoch, as TrainProgress.complete_epoch writes it.
HISTORY_ENTRY = {"epoch": 1, "train_loss": 0.0, "test_accuracy": 0.0}
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


@dataclass(frozen=True, kw_only=True)
class Builders:
    """The run's own builders of its optimizer and LR scheduler (daemon/model.py, with its config)."""

    optimizer: Callable[[torch.nn.Module], torch.optim.Optimizer]
    scheduler: Callable[[torch.optim.Optimizer], Any]  # an LR scheduler, or None

    def probe(self, epochs: int) -> tuple[dict, dict | None]:
        """The state dicts of the optimizer and scheduler of a one-parameter probe, after one step
        with a zero gradient and `epochs` epochs of the scheduler: what the run's optimizer keeps
        per parameter, and what its param groups and scheduler hold at that epoch. A 2-D tensor in
        the optimizer's state stands for one shaped like each parameter. Draws no random numbers."""
        module = torch.nn.Module()
        module.weight = torch.nn.Parameter(torch.zeros(2, 3))
        optimizer = self.optimizer(module)
        scheduler = self.scheduler(optimizer)
        module.weight.grad = torch.zeros_like(module.weight)
        optimizer.step()
        for _ in range(epochs if scheduler else 0):
            scheduler.step()
        return optimizer.state_dict(), scheduler.state_dict() if scheduler else None


class CheckpointSchema:
    """What a checkpoint must hold for this run to load it and resume exactly."""

    def __init__(self, *, template: dict, parameters: list[torch.Tensor], builders: Builders, steps_per_epoch: int) -> None:
        """`template`: the live trainer's `state_dict()`, the structure of a checkpoint this run
        writes; `parameters`: its optimizer's, in the order the optimizer's state dict numbers them."""
        self.live = template
        self.parameter_shapes = {index: tuple(parameter.shape) for index, parameter in enumerate(parameters)}
        self.builders = builders
        self.steps_per_epoch = steps_per_epoch

    def check(self, state: dict) -> None:
        """Raise InvalidCheckpoint unless `state` (which passed `check_format`) fits this run."""
        unexpected = state.keys() - self.live.keys()
        _require(not unexpected, "checkpoint", f"unexpected keys: {_listed(unexpected)}")
        self._check_progress(state)
        conform(state["state_dict"], self.live["state_dict"], "state_dict")
        optimizer, scheduler = self.builders.probe(state["epoch"])
        self._check_optimizer(state["optimizer"], optimizer, trained=state["global_step"] > 0)
        self._check_scheduler(state["scheduler"], scheduler)
        self._check_data(state["data"], state["epoch"], state["step_in_epoch"])
        self._check_rng(state["rng"])
        for key in state.keys() - REQUIRED_KEYS:  # keys added to the format since: as this run writes them
            conform(state[key], self.live[key], key)

    def _check_progress(self, state: dict) -> None:
        for key in ("epoch", "step_in_epoch", "global_step", "metrics"):
            conform(state[key], self.live[key], key)
        epoch, step, per_epoch = state["epoch"], state["step_in_epoch"], self.steps_per_epoch
        _require(epoch >= 0, "epoch", f"{epoch} is negative")
        _require(0 <= step <= per_epoch, "step_in_epoch", f"{step} is outside this run's 0..{per_epoch} steps per epoch")
        position = epoch * per_epoch + step
        _require(state["global_step"] == position, "global_step",
                 f"{state['global_step']}, but epoch {epoch} step {step} is step {position} at {per_epoch} steps per epoch")  # fmt: skip
        data, samples = self.live["data"], state["metrics"]["samples"]
        expected = min(step * data["batch_size"], data["num_samples"])
        _require(samples == expected, "metrics.samples", f"{samples}, but {step} steps train {expected} samples")
        _require(state["metrics"]["loss_sum"] >= 0, "metrics.loss_sum", "is negative")
        history = state["history"]
        _require(_is(history, list) and len(history) == epoch, "history", f"must list the {epoch} completed epochs")
        conform(history, [HISTORY_ENTRY] * epoch, "history")
        for index, entry in enumerate(history):
            where = f"history[{index}]"
            _require(entry["epoch"] == index + 1, f"{where}.epoch", f"{entry['epoch']}, expected {index + 1}")
            _require(entry["train_loss"] >= 0, f"{where}.train_loss", "is negative")
            _require(0 <= entry["test_accuracy"] <= 1, f"{where}.test_accuracy", "is not a fraction")

    def _check_optimizer(self, optimizer: Any, probe: dict, trained: bool) -> None:
        live_groups, per_parameter = self.live["optimizer"]["param_groups"], probe["state"].get(0, {})
        states = Rule(lambda value, where: self._check_parameter_states(value, where, per_parameter, trained))
        conform(optimizer, {"state": states, "param_groups": live_groups}, "optimizer")
        for index, (group, live_group) in enumerate(zip(optimizer["param_groups"], live_groups)):
            # Every setting as the probe's at this epoch (an LR scheduler moves `lr`); the parameters as the run's.
            for key, expected in {**probe["param_groups"][0], "params": live_group["params"]}.items():
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
            expected = {
                name: _like(value, shapes[key]) if isinstance(value, torch.Tensor) and value.dim() == 2 else value
                for name, value in per_parameter.items()
            }
            conform(state, expected, f"{where}.{key}")

    def _check_scheduler(self, scheduler: Any, probe: dict | None) -> None:
        if probe is None:
            _require(scheduler is None, "scheduler", "this run has no LR scheduler")
            return
        conform(scheduler, self.live["scheduler"], "scheduler")
        for key, expected in probe.items():
            _require(scheduler[key] == expected, f"scheduler.{key}", f"{_shown(scheduler[key])}, expected {_shown(expected)}")

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
        template = {
            **live,
            "cuda": Rule(lambda value, where: _check_cuda_states(value, where, live["cuda"])),
            "python": {**live["python"], "gauss_next": Rule(_none_or_finite)},
        }
        conform(rng, template, "rng")
        _require(rng["version"] == live["version"], "rng.version", f"{rng['version']}, this trainer writes {live['version']}")
        try:  # torch's generator checks its own state; on a scratch one, the run's is untouched
            torch.Generator().set_state(rng["torch"])
        except RuntimeError as exc:
            raise InvalidCheckpoint(f"rng.torch: {str(exc).splitlines()[0]}") from None
        numpy = rng["numpy"]
        _require(0 <= numpy["pos"] <= MT_WORDS, "rng.numpy.pos", f"{numpy['pos']} is outside 0..{MT_WORDS}")
        _require(numpy["has_gauss"] in (0, 1), "rng.numpy.has_gauss", f"{numpy['has_gauss']}, must be 0 or 1")
        _require(_words(numpy["keys"]), "rng.numpy.keys", "are not 32-bit words")
        python = rng["python"]["state"]
        _require(_words(python[:-1]) and 0 <= int(python[-1]) <= MT_WORDS, "rng.python.state", "is not a Mersenne Twister state")


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
