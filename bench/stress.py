"""Exactness under CPU contention: `trainer verify` many times while busy loops compete for every core.

    .venv/bin/python -m bench.stress [--runs 100] [--parallel 2] [--hogs N] [--steps 60]

Each run is one `trainer verify` of a small configuration (MNIST subset, dropout on, 40 steps an
epoch), alternately with 0 and 2 DataLoader workers: an unbroken run and one interrupted by
SIGUSR1, SIGKILL and SIGTERM with restarts, compared bitwise. `--parallel` verifications run at
once, beside `--hogs` busy-loop processes (default: cores + 1), so every process competes for the
CPU as on a loaded machine. Prints `N runs, N bitwise equal` and writes every run to
bench/results/stress.json. Not part of the test suite: 100 runs take about half an hour on 2 cores.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results" / "stress.json"
SMALL = {
    "data": {"train_subset": 4000, "test_subset": 1000},
    "model": {"dropout": 0.2},
    "train": {"epochs": 3, "device": "cpu"},
}


def verify_once(index: int, workdir: Path, data_root: Path, steps: int) -> dict:
    workers = 2 * (index % 2)
    config = workdir / f"run-{index}.yaml"
    config.write_text(
        yaml.safe_dump({**SMALL, "data": {**SMALL["data"], "root": str(data_root), "num_workers": workers}})
    )
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "daemon", "verify", "--config", str(config), "--steps", str(steps), "--json"],
        cwd=workdir, capture_output=True, text=True, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        report = json.loads(result.stdout)
    except json.JSONDecodeError:  # not a report: an error event, or a crash
        report = {"error": (result.stdout + result.stderr)[-2000:]}
    report = {"passed": False, **report}
    landed = [i["landed"] for i in report.get("interruptions", [])]
    return {"run": index, "num_workers": workers, "exit": result.returncode, "seconds": round(time.monotonic() - started, 1),
            "load_average": os.getloadavg()[0], "interruptions_landed": f"{sum(landed)}/{len(landed)}", **report}  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=100)
    parser.add_argument("--parallel", type=int, default=2, help="verifications at once (default: %(default)s)")
    parser.add_argument("--hogs", type=int, default=(os.cpu_count() or 1) + 1, help="busy loops (default: cores + 1)")
    parser.add_argument("--steps", type=int, default=60, help="each verification's horizon (default: %(default)s)")
    args = parser.parse_args()

    from daemon.builtin.mnist_files import prepare_mnist

    workdir = Path(tempfile.mkdtemp(prefix="trainer-stress-"))
    data_root = workdir / "data"
    prepare_mnist(data_root, download=False)
    hogs = [subprocess.Popen(["sh", "-c", "while :; do :; done"]) for _ in range(args.hogs)]
    runs = []
    started = datetime.datetime.now(datetime.UTC)
    try:
        with ThreadPoolExecutor(args.parallel) as pool:
            for run in pool.map(lambda i: verify_once(i, workdir, data_root, args.steps), range(args.runs)):
                runs.append(run)
                verdict = "equal" if run["passed"] else f"DIFFERENT: {run.get('first_difference') or run.get('error')}"
                print(f"run {run['run']:3d}  workers {run['num_workers']}  load {run['load_average']:5.1f}  "
                      f"{run['seconds']:6.1f} s  interruptions {run['interruptions_landed']}  {verdict}", flush=True)  # fmt: skip
    finally:
        for hog in hogs:
            hog.kill()
    equal = sum(run["passed"] for run in runs)
    missed = sum(run["interruptions_landed"] != "3/3" for run in runs)
    summary = f"{len(runs)} runs, {equal} bitwise equal ({missed} with a signal that came after the last step)"
    print(summary)
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps({"started": started.isoformat(timespec="minutes"), "summary": summary,
                                   "hogs": args.hogs, "parallel": args.parallel, "steps": args.steps, "runs": runs}, indent=2))  # fmt: skip
    return 0 if equal == len(runs) else 1


if __name__ == "__main__":
    sys.exit(main())
