"""The raw cost of saving a state durably: `torch.save` into an open file, then flush and fsync.

The state is a checkpoint the daemon wrote in the same run, loaded back, so it is exactly what
the daemon saves. This is the daemon's own write minus its extras (temp name, rename, directory
fsync, retention); torch.save to a path instead of an open file was slower here (its C++ file
writer), so this is the faster, stricter baseline.

`--pause` waits before each save, as the daemon's saves come after seconds of training: on a VM
whose idle memory goes back to the host within seconds (DAMON pageout, free page reporting), the
page cache a 1.2 GB write fills is slow to touch again, and saves made back to back (reusing the
pages the previous one freed) took 0.9-1.3 s here against 2.9-3.5 s after 8 s of pause; for the
MLP's 5 MB, 6.0-6.4 ms against 6.9-8.5 ms after 1 s.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch

from bench.common import emit


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--pause", type=float, default=0.0, help="seconds to wait before each save")
    args = parser.parse_args()
    state = torch.load(args.checkpoint, map_location="cpu", weights_only=True)
    target = args.checkpoint.with_name(f"raw-save-{os.getpid()}.pt")
    seconds = []
    try:
        for _ in range(args.repeats):
            time.sleep(args.pause)
            started = time.perf_counter()
            with open(target, "wb") as file:
                torch.save(state, file)
                file.flush()
                os.fsync(file.fileno())
            seconds.append(time.perf_counter() - started)
            size = target.stat().st_size
            target.unlink()
    finally:
        target.unlink(missing_ok=True)
    emit("raw_save", seconds=seconds, bytes=size)


if __name__ == "__main__":
    main()
