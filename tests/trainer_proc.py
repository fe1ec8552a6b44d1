"""Run the real `trainer` CLI as a subprocess, read its JSON log, send it real signals."""

from __future__ import annotations

import contextlib
import os
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import yaml

from daemon.ckpt.store import read_checkpoint
from daemon.ops.child import TrainerChild
from daemon.ops.verify import first_difference

# A small run: 40 steps an epoch, 3 epochs, dropout on, so a test takes seconds.
SMALL_SETTINGS = {
    "data.train_subset": 4000,
    "data.test_subset": 1000,
    "model.dropout": 0.2,
    "train.epochs": 3,
    "train.device": "cpu",
    "checkpoint.every_seconds": 0,
    "checkpoint.keep_last": 50,
    "log.format": "json",
    # A fixed waiting policy: with `auto` a run may hand over to a fresh process when the machine's
    # load changes, an extra resume that a test counting them would not expect (test_cpu_wait.py sets it).
    "train.cpu_wait": "bounded",
}

# Runs of several ranks: 20 steps an epoch (2000 samples in global batches of 100), 3 epochs.
DIST_SETTINGS = {"data.train_subset": 2000, "data.test_subset": 500, "checkpoint.every_steps": 5}


def ranks(nproc: int) -> dict:
    """DIST_SETTINGS trained by `nproc` ranks on one node."""
    return {**DIST_SETTINGS, "dist.nproc_per_node": nproc}


# Epochs of a run that ends only when the test ends it (a signal once it saw what it waits for, a
# kill at the end), or at a `train.max_steps` it sets: never a count of work the test assumes to
# outlast it, which a fast machine gets through first.
UNTIL_STOPPED = 1_000_000

# What SMALL_SETTINGS sets for the built-in MLP, back to the defaults: a task takes its own options.
NOT_BUILTIN = {"data.train_subset": None, "data.test_subset": None, "model.dropout": 0.0}
TINY_TASK = Path(__file__).resolve().parent / "tiny_task.py"
# The tiny task with every training feature on (tests/process/test_task.py, tests/dist/test_dist.py).
TINY = {
    **NOT_BUILTIN,
    "task.entry": f"{TINY_TASK}:build",
    "train.epochs": 2,
    "train.batch_size": 16,
    "train.grad_accum_steps": 3,  # 30 batches an epoch: 10 optimizer steps
    "train.precision": "bf16",
    "optim.clip_grad_norm": 0.5,
    "optim.warmup_steps": 4,
    "optim.scheduler": {"name": "step", "step_size": 3, "gamma": 0.7, "interval": "step"},
    "checkpoint.every_steps": 3,
    "log.progress_every_seconds": 0.001,  # a progress event every step
}


@dataclass
class RunConfig:
    workdir: Path
    data_root: Path
    settings: dict = field(default_factory=dict)

    @property
    def checkpoint_dir(self) -> Path:
        return self.workdir / "checkpoints"

    def write(self) -> Path:
        tree: dict = {}
        for key, value in {**SMALL_SETTINGS, "data.root": str(self.data_root), **self.settings}.items():
            section, name = key.split(".", 1)
            tree.setdefault(section, {})[name] = value
        path = self.workdir / "config.yaml"
        path.write_text(yaml.safe_dump(tree))
        return path


class TrainerProcess(TrainerChild):
    """The real CLI on a RunConfig's files, in its own session (process group)."""

    started: ClassVar[list[TrainerProcess]] = []  # since the last kill_leftovers()

    @classmethod
    def start(
        cls,
        config: RunConfig,
        *extra: str,
        command: str = "run",
        wrapper: tuple[str, ...] = (),
        env: dict | None = None,
    ) -> TrainerProcess:
        path = config.write()
        process = cls.cli(command, "--config", str(path), *extra, cwd=config.workdir, env=env, wrapper=wrapper)
        cls.started.append(process)
        return process

    @classmethod
    def kill_leftovers(cls) -> None:
        """SIGKILL to the process group of every process started since the last call that still
        runs: one a failed test did not get to stop (tests/conftest.py calls this after each test)."""
        while cls.started:
            with contextlib.suppress(ProcessLookupError):  # reaped already, its group gone
                cls.started.pop().kill()


@contextlib.contextmanager
def busy_loops():
    """Shell busy loops, one more than this machine has CPUs: more runnable work than CPUs,
    whatever else runs."""
    loops = [subprocess.Popen(["sh", "-c", "while :; do :; done"]) for _ in range((os.cpu_count() or 1) + 1)]
    try:
        yield
    finally:
        for loop in loops:
            loop.kill()
            loop.wait()


def in_process_trainer(config: RunConfig):
    """The daemon's Trainer built in this process from the config's file, for tests that reach into
    a run (its waiting policy is this process's own: libgomp is loaded already)."""
    import torch

    from daemon.config.sections import Config
    from daemon.service.notify import Notifier
    from daemon.service.signals import SignalRecorder
    from daemon.service.threads import CpuSetting
    from daemon.train.assembly import assemble
    from daemon.train.loop import Trainer

    cpu = CpuSetting(torch.get_num_threads(), "active", None, handed_over=False)
    return Trainer(assemble(Config.from_yaml(config.write()), SignalRecorder(), Notifier(), cpu))


def run_to_end(config: RunConfig) -> TrainerProcess:
    process = TrainerProcess.start(config)
    rc = process.wait()
    assert rc == 0, f"exit {rc}:\n{process.output()}"
    return process


def final_checkpoint(directory: Path) -> dict:
    newest = max(directory.glob("ckpt-*-final.pt"))  # names sort by global step
    return read_checkpoint(newest)


def assert_same_training(actual: dict, expected: dict) -> None:
    """Bitwise-equal training state: position, parameters, optimizer, scheduler, data order, RNG, metrics."""
    difference = first_difference(actual, expected)
    assert difference is None, f"{difference} differs"
