"""Two ranks: the daemon's epoch against a plain DDP loop under torchrun (s/epoch, peak RSS per
rank, no checkpoints in either), and a SIGTERM to the daemon's launcher: how long until every rank
stopped with the emergency checkpoint durable, against the issue's targets (<= 1.05x s/epoch;
RSS <= 1.1x + one snapshot; <= 2 steps + 1.25x a raw save).

    .venv/bin/python bench/ddp.py --data-root data [--reps 2]

Both contenders run one thread per rank (torchrun's default, OMP_NUM_THREADS=1), on the full
MNIST training set. The daemon's ranks' peak RSS is read from /proc (VmHWM) while they run; the
plain ranks report their own.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import signal
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

from processes import BENCH, REPO, daemon, finish

from daemon.child import START, TrainerChild, event_time

RANKS = 2
DAEMON = {"dist.nproc_per_node": RANKS, "train.cpu_threads": 1, "checkpoint.every_steps": 0, "checkpoint.every_seconds": 0}
WARMUP_STEPS = 50


class PeakRSS:
    """The highest VmHWM read from each of some processes' /proc while they live."""

    def __init__(self) -> None:
        self.pids: list[int] = []
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


def daemon_epoch(data: Path, work: Path) -> dict:
    run_dir = Path(tempfile.mkdtemp(dir=work))
    child = daemon(data, run_dir, DAEMON)
    peaks = PeakRSS()
    peaks.pids = child.wait_for("ranks_started")["pids"]
    finish(child, 0)
    seconds = [child.wait_for("epoch_completed", rank=rank, after=START)["seconds"] for rank in range(RANKS)]
    shutil.rmtree(run_dir)
    return {"seconds": max(seconds), "rss": peaks.stop()}


def plain_epoch(data: Path) -> dict:
    argv = ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={RANKS}", "bench/plain_ddp.py"]
    child = finish(TrainerChild([sys.executable, *argv, f"--data-root={data}"], REPO, {"OMP_NUM_THREADS": "1"}), 0)
    seconds = [e["seconds"] for e in child.events("epoch_completed")]
    return {"seconds": max(seconds), "rss": [e["bytes"] for e in sorted(child.events("peak_rss"), key=lambda e: e["rank"])]}


def stop_latency(data: Path, work: Path, rng: random.Random) -> dict:
    """SIGTERM to the launcher mid-epoch: until the emergency checkpoint is durable and the launcher exited."""
    run_dir = Path(tempfile.mkdtemp(dir=work))
    child = daemon(data, run_dir, {**DAEMON, "log.progress_every_seconds": 0.001})  # a progress event a step
    first = child.wait_for("progress")
    child.wait_for("progress", where=lambda e: e["global_step"] >= first["global_step"] + WARMUP_STEPS)
    time.sleep(rng.uniform(0, 0.02))
    sent = child.signal(signal.SIGTERM)
    finish(child, 75)
    saved = child.wait_for("checkpoint_saved", kind="emergency", after=START)
    costs = child.events("agreement_cost")
    raw_save = [sys.executable, str(BENCH / "raw_save.py"), str(REPO / saved["path"]), "--repeats=3", "--pause=1"]
    raw = finish(TrainerChild(raw_save, REPO), 0)
    shutil.rmtree(run_dir)
    return {
        "durable_s": event_time(saved) - sent,
        "exit_s": child.exited_at - sent,
        "step_s": statistics.median(c["step_ms_mean"] for c in costs) / 1e3,
        "raw_save_s": statistics.median(raw.wait_for("raw_save")["seconds"]),
        "checkpoint_bytes": saved["bytes"],
        "agreement_share_percent": [c["share_of_step_percent"] for c in costs],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", type=Path, required=True)
    parser.add_argument("--reps", type=int, default=2)
    args = parser.parse_args()
    data = args.data_root.resolve()
    rng = random.Random(0)
    with tempfile.TemporaryDirectory(prefix="bench-ddp-") as scratch:
        work = Path(scratch)
        runs = {"daemon": [], "plain": []}
        for _ in range(args.reps):  # interleaved: a machine's slow minute hurts both alike
            runs["plain"].append(plain_epoch(data))
            runs["daemon"].append(daemon_epoch(data, work))
        stop = stop_latency(data, work, rng)
    seconds = {name: statistics.median(r["seconds"] for r in rows) for name, rows in runs.items()}
    rss = {name: max(max(r["rss"]) for r in rows) for name, rows in runs.items()}
    print(json.dumps({
        "s_per_epoch": seconds, "ratio": round(seconds["daemon"] / seconds["plain"], 3), "target_ratio": 1.05,
        "peak_rss_per_rank_bytes": rss, "rss_ratio": round(rss["daemon"] / rss["plain"], 3),
        "rss_target_bytes": 1.1 * rss["plain"] + stop["checkpoint_bytes"],  # one snapshot: the checkpoint's size
        "stop": stop, "stop_target_s": 2 * stop["step_s"] + 1.25 * stop["raw_save_s"],
        "runs": runs,
    }, indent=1))  # fmt: skip


if __name__ == "__main__":
    main()
