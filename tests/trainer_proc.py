"""Run the real `trainer` CLI as a subprocess, read its JSON log, send it real signals."""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml

from daemon.checkpoint import read_checkpoint

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


class TrainerProcess:
    """`python -m daemon run` in its own session (process group), stdout read line by line."""

    def __init__(self, popen: subprocess.Popen) -> None:
        self.popen = popen
        self.lines: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self._seen = 0

    @classmethod
    def start(cls, config: RunConfig, *extra: str, command: str = "run", wrapper: tuple[str, ...] = ()) -> TrainerProcess:
        path = config.write()
        popen = subprocess.Popen(
            [*wrapper, sys.executable, "-m", "daemon", command, "--config", str(path), *extra],
            cwd=config.workdir,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            text=True,
            start_new_session=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        return cls(popen)

    def _read(self) -> None:
        for line in self.popen.stdout:
            self._queue.put(line)
        self._queue.put(None)

    def _next_line(self, deadline: float) -> str | None:
        try:
            line = self._queue.get(timeout=max(deadline - time.monotonic(), 0))
        except queue.Empty:
            raise TimeoutError(f"no expected event in time; output so far:\n{self.output()}") from None
        if line is not None:
            self.lines.append(line)
        return line

    def wait_for(self, event: str, timeout: float = 60, where=lambda record: True, **fields) -> dict:
        """Block until an event named `event` whose fields match `fields` (and `where`) is logged."""
        deadline = time.monotonic() + timeout
        while True:
            line = self._next_line(deadline)
            if line is None:
                raise AssertionError(f"process ended before {event} {fields}; output:\n{self.output()}")
            record = _parse(line)
            if (
                record
                and record.get("event") == event
                and all(record.get(k) == v for k, v in fields.items())
                and where(record)
            ):
                return record

    def signal(self, signum: int) -> None:
        self.popen.send_signal(signum)

    def signal_group(self, signum: int) -> None:
        os.killpg(self.popen.pid, signum)

    def wait(self, timeout: float = 120) -> int:
        deadline = time.monotonic() + timeout
        while self._next_line(deadline) is not None:
            pass
        return self.popen.wait(timeout=max(deadline - time.monotonic(), 1))

    def output(self) -> str:
        return "".join(self.lines)

    def events(self, name: str | None = None) -> list[dict]:
        records = [r for r in map(_parse, self.lines) if r]
        return [r for r in records if name is None or r.get("event") == name]

    def kill(self) -> None:
        if self.popen.poll() is None:
            os.killpg(self.popen.pid, signal.SIGKILL)
        self.popen.wait()


def _parse(line: str) -> dict | None:
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        return None
    return record if isinstance(record, dict) else None


def run_to_end(config: RunConfig, timeout: float = 120) -> TrainerProcess:
    process = TrainerProcess.start(config)
    rc = process.wait(timeout)
    assert rc == 0, f"exit {rc}:\n{process.output()}"
    return process


def final_checkpoint(directory: Path) -> dict:
    newest = max(directory.glob("ckpt-*-final.pt"))  # names sort by global step
    return read_checkpoint(newest)


def assert_same_training(actual: dict, expected: dict) -> None:
    """Bitwise-equal parameters and optimizer state, and equal per-epoch metrics."""
    assert actual["global_step"] == expected["global_step"]
    assert actual["state_dict"].keys() == expected["state_dict"].keys()
    for name, tensor in expected["state_dict"].items():
        assert torch.equal(actual["state_dict"][name], tensor), f"parameter {name} differs"
    assert_equal_tree(actual["optimizer"], expected["optimizer"], "optimizer")
    assert actual["history"] == expected["history"]


def assert_equal_tree(actual, expected, where: str) -> None:
    if isinstance(expected, torch.Tensor):
        assert torch.equal(actual, expected), f"{where} differs"
    elif isinstance(expected, dict):
        assert actual.keys() == expected.keys(), where
        for key in expected:
            assert_equal_tree(actual[key], expected[key], f"{where}.{key}")
    elif isinstance(expected, (list, tuple)):
        assert len(actual) == len(expected), where
        for i, (a, e) in enumerate(zip(actual, expected)):
            assert_equal_tree(a, e, f"{where}[{i}]")
    else:
        assert actual == expected, f"{where}: {actual!r} != {expected!r}"
