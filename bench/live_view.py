"""What the live display costs: one epoch of the default MLP in a pseudo-terminal (the display
drawn, events as console lines) against the same off a terminal (JSON lines), alternated.

    .venv/bin/python -m bench.live_view [--reps N]

Prints each run's epoch seconds (`epoch_completed`'s `seconds`) and the medians. Not part of
bench.run: the benchmark's contenders run off a terminal, as a service does.
"""

from __future__ import annotations

import argparse
import json
import os
import pty
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SECONDS = re.compile(r"epoch_completed .*seconds=([0-9.]+)")


def one_epoch(data: Path, run_dir: Path, terminal: bool) -> float:
    argv = [sys.executable, "-m", "daemon", "run", f"--config={REPO / 'config.yaml'}", f"--set=data.root={data}",
            f"--set=checkpoint.dir={run_dir}", "--set=train.epochs=1"]  # fmt: skip
    if not terminal:
        out = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, check=True).stdout
        (seconds,) = [json.loads(line)["seconds"] for line in out.splitlines() if '"epoch_completed"' in line]
        return seconds
    controller, child_end = pty.openpty()
    os.set_inheritable(child_end, True)
    process = subprocess.Popen(argv, cwd=REPO, stdin=child_end, stdout=child_end, stderr=child_end, close_fds=True)
    os.close(child_end)
    screen = b""
    while True:
        try:
            chunk = os.read(controller, 65536)
        except OSError:  # the child side closed
            break
        if not chunk:
            break
        screen += chunk
    process.wait()
    os.close(controller)
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", screen.decode(errors="replace"))
    return float(SECONDS.search(text).group(1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()
    from daemon.builtin.mnist_files import prepare_mnist

    with tempfile.TemporaryDirectory(prefix="trainer-live-") as work:
        data = Path(work) / "data"
        prepare_mnist(data, download=False)
        times: dict[str, list[float]] = {"terminal": [], "json": []}
        for rep in range(args.reps):
            for kind in ("terminal", "json") if rep % 2 == 0 else ("json", "terminal"):
                seconds = one_epoch(data, Path(work) / f"{kind}-{rep}", terminal=kind == "terminal")
                times[kind].append(seconds)
                print(f"rep {rep + 1}: {kind:<8} {seconds:.2f} s/epoch", flush=True)
        for kind, values in times.items():
            print(f"median {kind:<8} {statistics.median(values):.2f} s/epoch")


if __name__ == "__main__":
    main()
