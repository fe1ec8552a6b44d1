"""Launching the benchmark's contenders and reaping them: the daemon through its CLI, the plain
loops and the seed recipe of this package (`python -m bench.NAME`), all through the one event
reader (daemon/ops/child.py), which keeps their JSON lines, exit time and peak RSS."""

from __future__ import annotations

import json
import statistics
import sys
import threading
from pathlib import Path

from daemon.ops.child import TrainerChild, event_time

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "config.yaml"


class BenchError(Exception):
    pass


def daemon(data: Path, run_dir: Path, settings: dict, config: Path = CONFIG) -> TrainerChild:
    """`trainer run` for one epoch in `run_dir`, with `settings` as --set overrides."""
    settings = {
        "data.root": str(data), "checkpoint.dir": str(run_dir / "checkpoints"), "train.epochs": 1,
        "log.format": "json", **settings,
    }  # fmt: skip
    overrides = [f"--set={key}={json.dumps(value)}" for key, value in settings.items()]
    return TrainerChild.cli("run", f"--config={config}", *overrides, cwd=REPO)


def script(data: Path, name: str, *args: str, env: dict | None = None) -> TrainerChild:
    """The contender `bench.<name>` (plain_loop, seed_recipe, plain_cnn) as a process of its own."""
    return TrainerChild([sys.executable, "-m", f"bench.{name}", f"--data-root={data}", *args], REPO, env)


def finish(child: TrainerChild, expect: int, silence: float = 600) -> TrainerChild:
    """Wait for the contender's exit, which must be `expect`."""
    try:
        code = child.wait(silence)
    except TimeoutError:
        child.kill()
        raise BenchError(f"silent for {silence} s, killed:\n{tail(child)}") from None
    if code != expect:
        raise BenchError(f"exit {code}, expected {expect}:\n{tail(child)}")
    return child


def step_s(child: TrainerChild) -> float:
    """The median step: seconds between consecutive `progress` events, one a step with TINY_PROGRESS."""
    times = [event_time(record) for record in child.events("progress")]
    return statistics.median(later - earlier for earlier, later in zip(times, times[1:], strict=False))


def tail(child: TrainerChild) -> str:
    return f"$ {' '.join(child.argv)}\n" + "".join(child.lines[-15:])


class PeakRSS:
    """The highest VmHWM read from each of some processes' /proc while they live (the ranks of a
    daemon run are not its children: wait4 does not report them)."""

    def __init__(self, pids: list[int]) -> None:
        self.pids = pids
        self.peak: dict[int, int] = {}
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        while not self._done.wait(0.02):
            for pid in self.pids:
                try:
                    status = Path(f"/proc/{pid}/status").read_text()
                except OSError:
                    continue
                for line in status.splitlines():
                    if line.startswith("VmHWM:"):
                        self.peak[pid] = max(self.peak.get(pid, 0), int(line.split()[1]) * 1024)

    def stop(self) -> list[int]:
        self._done.set()
        self._thread.join()
        return [self.peak.get(pid, 0) for pid in self.pids]
