"""How soon after exec the trainer's signal handlers are in place: the window in which a signal still
kills it (README, "Signals").

Starts `trainer status --config <missing file>` (the same entry point as `trainer run`; it exits at
once with 78) and sends a signal after a delay, many times over increasing delays. A process that
dies of the signal got it before the handlers were installed; one that exits with 78 had them.
`--entry floor` is the same for a bare interpreter whose first statement installs handlers: the
part of the window that no code of ours can close.

    .venv/bin/python -m bench.signal_window [--entry module|script|floor] [--repeat N]
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DELAYS_MS = (0, 5, 10, 15, 20, 25, 30, 40, 50, 60, 80, 100, 150, 200, 300)
SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)


FLOOR = (
    "import os, signal, time\n"
    "for s in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1): signal.signal(s, lambda *_: None)\n"
    "time.sleep(0.5)\n"
    "os._exit(78)"
)


def command(entry: str, missing: Path) -> list[str]:
    if entry == "floor":
        return [sys.executable, "-c", FLOOR]
    if entry == "module":
        return [sys.executable, "-m", "daemon", "status", "--config", str(missing)]
    return [str(Path(sys.executable).with_name("trainer")), "status", "--config", str(missing)]


def trial(argv: list[str], signum: int, delay: float) -> str:
    """'killed' (died of the signal), 'traceback' (a KeyboardInterrupt got through) or 'handled'."""
    started = time.perf_counter()
    process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    time.sleep(max(0.0, delay - (time.perf_counter() - started)))
    process.send_signal(signum)
    _, stderr = process.communicate()
    if process.returncode == -signum:
        return "killed"
    return "traceback" if "Traceback" in stderr else "handled"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--entry", choices=("module", "script", "floor"), default="module",
                        help="python -m daemon, the trainer script, or a bare interpreter")  # fmt: skip
    parser.add_argument("--repeat", type=int, default=10, help="trials per signal and delay (default: %(default)s)")
    args = parser.parse_args()
    missing = Path(tempfile.mkdtemp()) / "missing.yaml"
    argv = command(args.entry, missing)
    print(
        f"{' '.join(argv[:4])}: trials per cell {args.repeat}; killed+traceback / trials; load {os.getloadavg()[0]:.2f}"
    )
    print("delay ms  " + "  ".join(f"{signal.Signals(s).name:>8}" for s in SIGNALS))
    window = 0
    for delay in DELAYS_MS:
        cells = []
        for signum in SIGNALS:
            outcomes = [trial(argv, signum, delay / 1e3) for _ in range(args.repeat)]
            failed = sum(outcome != "handled" for outcome in outcomes)
            window = max(window, delay) if failed else window
            cells.append(f"{failed:>4}/{args.repeat:<3}")
        print(f"{delay:>8}  " + "  ".join(cells))
    print(f"largest delay at which a signal still got through: {window} ms")


if __name__ == "__main__":
    main()
