"""Signals at the very start: the entry point installs its handlers before any slow import, so a
SIGTERM, Ctrl+C or SIGUSR1 during start-up is handled (75, or an on-demand checkpoint), never a
death by the signal or a KeyboardInterrupt traceback."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from trainer_proc import TrainerProcess

STOPPED = 75
OURS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
# Slow to import (argparse, logging, yaml, structlog, torch...): none may come before the handlers.
SLOW = {"argparse", "logging", "json", "dataclasses", "inspect", "typing", "yaml", "structlog", "numpy", "torch"}
ENTRIES = {
    "python -m daemon": ("-m", "daemon"),
    "trainer script": (str(Path(sys.executable).with_name("trainer")),),
}


def imported_before_the_handlers(entry: tuple[str, ...], tmp_path) -> list[str]:
    """The modules imported after the interpreter's own start-up (site) and before the entry
    point's module, whose `main()` installs the handlers as its first statement."""
    result = subprocess.run(
        [sys.executable, "-X", "importtime", *entry, "status", "--config", str(tmp_path / "missing.yaml")],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 78, result.stderr
    names = [line.split("|")[-1].strip() for line in result.stderr.splitlines() if line.startswith("import time:")]
    return names[names.index("site") + 1 : names.index("daemon.entry")]


@pytest.mark.parametrize("entry", ENTRIES)
def test_handlers_come_before_any_slow_import(tmp_path, entry):
    before = imported_before_the_handlers(ENTRIES[entry], tmp_path)

    assert "daemon.service.signals" in before
    assert not SLOW & set(before), before


def caught(pid: int) -> set[int]:
    """The signals the process has handlers for, as the kernel sees them."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigCgt:"):
            mask = int(line.split()[1], 16)
            return {signum for signum in range(1, 65) if mask & (1 << (signum - 1))}
    return set()


def start_and_signal(run_config, send, after: float) -> TrainerProcess:
    """Start a run; `after` seconds after its handlers are in place, `send` it a signal."""
    process = TrainerProcess.start(run_config)
    while not set(OURS) <= caught(process.popen.pid):
        assert process.popen.poll() is None, process.output()
        time.sleep(0.0005)
    time.sleep(after)
    send(process)
    return process


@pytest.fixture
def small_run(run_config):
    run_config.settings = {"data.train_subset": 400, "train.epochs": 1}
    return run_config


@pytest.mark.parametrize("after", [0.0, 0.25])
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=lambda s: signal.Signals(s).name)
def test_stop_signal_during_start_up_exits_75(small_run, signum, after):
    # SIGINT to the process group, as a terminal's Ctrl+C.
    process = start_and_signal(small_run, lambda p: p.signal_group(signum), after)

    assert process.wait() == STOPPED, process.output()
    assert "Traceback" not in process.output() and "KeyboardInterrupt" not in process.output()
    assert process.events("checkpoint_skipped") and process.events("stopped")
    assert not list(small_run.checkpoint_dir.glob("ckpt-*"))


@pytest.mark.parametrize("after", [0.0, 0.25])
def test_sigusr1_during_start_up_saves_at_the_first_step(small_run, after):
    process = start_and_signal(small_run, lambda p: p.signal(signal.SIGUSR1), after)

    assert process.wait() == 0, process.output()
    saved = process.events("checkpoint_saved")
    assert [(e["kind"], e["checkpoint_global_step"]) for e in saved][0] == ("on_demand", 1)
