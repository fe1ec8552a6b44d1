"""What a checkpoint save costs, part by part, against what its bytes cost.

    .venv/bin/python -m bench.save_cost CHECKPOINT [--repeats N] [--big-hidden 2500,2500]

CHECKPOINT is one the daemon wrote (the MLP's), loaded back, so the state is exactly what it saves;
the larger state is the same checkpoint with the model and Adam state of an MLP of `--big-hidden`
widths (2500,2500: ~99 MB) in place of its own. For each state, in one process, repeated and
alternated (the order rotated every repetition, so the machine's noise spreads over all):

(a) the loop's stall: the snapshot of the live state into the buffers of the previous one, as
    `BackgroundWriter.submit` takes it (daemon/ckpt/writer.py), against a plain `Tensor.copy_`
    of every tensor, which runs on torch's intra-op (OpenMP) threads;
(b) the save on a thread of its own, as the background writer runs it: its CPU time
    (`time.thread_time`) and wall time, for the daemon's store (`CheckpointStore.save`: temp
    file, fsync, rename, fsync of the directory) and for `torch.save` into an open file then
    fsync (bench/raw_save.py's contender), against the floor: the tensors' bytes copied into one
    buffer, written and fsynced;
(c) the save's GIL-held time: the save runs again on its thread while this one, like a training
    loop's thread, sleeps 50 us again and again and notes how late each sleep ends: a sleep that
    ends while the save holds the GIL waits for it to let go. The lateness summed, less the time
    this thread waited runnable for a core (the kernel's /proc/thread-self/schedstat), less its
    usual lateness (the same, beside a thread that only sleeps as long, measured right after) is
    the GIL-held time; `pickle_only` (torch.save without the tensors' bytes) shows the share of
    it that is pickling.

The GIL-held figure is an estimate with known limits: a stretch held for less than a sleep can be
missed, and a wait for a core that overlaps a hold is counted as the core's; the floor, whose work
is all off the GIL, reads what is left of the method's error at that load. (Without the run-queue
correction, on a loaded 2-core machine the floor read as much as the save: a wake-up waited for
the core the save's work off the GIL took.) A probe that wants the GIL makes the save wait for it
after each release, so (b) is measured in runs of its own, without the probe. Each save's file is
deleted after it is measured (freeing its pages is retention's cost). Figures are printed as one
JSON line per state (`save_cost`, bench/common.py's `emit`): medians and min-max, in ms and per MiB,
and `load_average` before and after. docs/benchmark.md ("What a save costs") has them.
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any, cast

import numpy as np
import torch

from bench.common import emit, hidden_widths, mlp
from daemon.ckpt.store import CheckpointStore
from daemon.ckpt.writer import snapshot

MIB = 1 << 20
# The probe's sleep: short against the GIL-held stretches it finds (pickling, writes), long enough
# that the probe itself needs little CPU.
PROBE_SLEEP_S = 50e-6

Save = Callable[[], Path | None]  # a save; returns the file it wrote, deleted after measuring


def tensors(state: Any) -> list[torch.Tensor]:
    if isinstance(state, torch.Tensor):
        return [state]
    if isinstance(state, dict):
        return [tensor for value in state.values() for tensor in tensors(value)]
    if isinstance(state, (list, tuple)):
        return [tensor for value in state for tensor in tensors(value)]
    return []


def big_state(checkpoint: dict, hidden: list[int]) -> dict:
    """The checkpoint with a larger model's weights and Adam state (after one step) in place of its own."""
    torch.manual_seed(0)
    model = mlp(hidden)
    optimizer = torch.optim.Adam(model.parameters())
    model(torch.randn(2, 28 * 28)).sum().backward()
    optimizer.step()
    return {**checkpoint, "state_dict": model.state_dict(), "optimizer": optimizer.state_dict()}


def plain_copy(state: Any, reuse: Any) -> Any:
    """Every tensor `copy_`-ed into the same place of `reuse`: torch's own copy, on its intra-op threads."""
    if isinstance(state, torch.Tensor):
        return reuse.copy_(state)
    if isinstance(state, dict):
        return {key: plain_copy(value, reuse[key]) for key, value in state.items()}
    if isinstance(state, (list, tuple)):
        return type(state)(plain_copy(value, old) for value, old in zip(state, reuse, strict=True))
    return state


class Floor:
    """The bytes alone: the state's tensors copied into one buffer (one memcpy each, numpy's, which
    releases the GIL and uses one thread), written with `os.write` and fsynced."""

    def __init__(self, state: dict, directory: Path) -> None:
        self.sources = [tensor.detach().contiguous().view(-1).view(torch.uint8).numpy() for tensor in tensors(state)]
        self.buffer = np.empty(sum(source.size for source in self.sources), dtype=np.uint8)
        self.path = directory / "floor.bin"

    def __call__(self) -> Path:
        offset = 0
        for source in self.sources:
            np.copyto(self.buffer[offset : offset + source.size], source)
            offset += source.size
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            view = self.buffer.data
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        return self.path


class Sink(io.RawIOBase):
    """A file that keeps nothing: torch.save without its bytes skips over each tensor's (a seek)."""

    def __init__(self) -> None:
        self.position = 0

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        self.position += len(data)
        return len(data)

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        self.position = offset if whence == os.SEEK_SET else self.position + offset
        return self.position

    def tell(self) -> int:
        return self.position


def pickle_only(state: dict) -> Save:
    """torch.save's pickling alone: the structure and each tensor's metadata, no tensor bytes."""

    def save() -> None:
        with torch.serialization.skip_data():
            torch.save(state, cast(IO[bytes], Sink()))
        return None

    return save


def torch_save(state: dict, path: Path) -> Save:
    def save() -> Path:
        with open(path, "wb") as file:
            torch.save(state, file)
            file.flush()
            os.fsync(file.fileno())
        return path

    return save


def store_save(state: dict, directory: Path) -> Save:
    store = CheckpointStore(directory / "store", keep_last=1)

    def save() -> Path:
        return store.save(state).path

    return save


def on_thread(save: Save, probe: bool) -> tuple[float, float, list[float], float]:
    """`save` run on a thread of its own: its (CPU s, wall s), and with `probe`, how late each of this
    thread's short sleeps ended meanwhile (s) and how long this thread waited for a core in all (s).
    The save starts only once this thread is probing: a thread just started runs before the one
    that started it gets the GIL back. The file it wrote is deleted after, outside the measures."""
    go, done = threading.Event(), [False]
    measured: list[float] = []
    written: list[Path | None] = []

    def run() -> None:
        go.wait()
        cpu, wall = time.thread_time(), time.perf_counter()
        try:
            written.append(save())
        finally:
            measured.extend((time.thread_time() - cpu, time.perf_counter() - wall))
            done[0] = True

    thread = threading.Thread(target=run)
    thread.start()
    lateness = []
    waited = run_queue_wait()
    go.set()
    while probe and not done[0]:
        asked = time.perf_counter()
        time.sleep(PROBE_SLEEP_S)
        lateness.append(time.perf_counter() - asked)
    waited = run_queue_wait() - waited
    thread.join()
    for path in written:
        if path is not None:
            path.unlink()
    return measured[0], measured[1], lateness, waited


def run_queue_wait() -> float:
    """Seconds this thread has waited, runnable, for a core (the kernel's schedstat): a sleep that ends
    late for want of a core, not of the GIL."""
    with open("/proc/thread-self/schedstat") as file:
        return int(file.read().split()[1]) / 1e9


def gil_held(save: Save) -> float:
    """The save's GIL-held time (s): the probe's lateness beside it, less its waits for a core, in
    excess of its lateness (less the same) beside a thread that only sleeps as long."""
    _, wall, lateness, waited = on_thread(save, probe=True)
    _, _, baseline, baseline_waited = on_thread(lambda: time.sleep(wall), probe=True)
    usual = (sum(baseline) - baseline_waited) / len(baseline)
    return max(0.0, sum(lateness) - waited - usual * len(lateness))


def spread(values: list[float], scale: float = 1.0) -> dict[str, float]:
    scaled = [value * scale for value in values]
    return {"median": round(statistics.median(scaled), 4), "min": round(min(scaled), 4), "max": round(max(scaled), 4)}


def measure(name: str, state: dict, repeats: int, directory: Path) -> None:
    nbytes = sum(tensor.nbytes for tensor in tensors(state))
    per_mib_ms = 1e3 * MIB / nbytes
    saves: dict[str, Save] = {
        "store": store_save(state, directory),
        "torch_save": torch_save(state, directory / "torch-save.pt"),
        "floor": Floor(state, directory),
        "pickle_only": pickle_only(state),
    }
    copies: dict[str, Callable[[Any, Any], Any]] = {"snapshot": lambda s, r: snapshot(s, reuse=r), "copy_": plain_copy}
    samples: dict[str, list[float]] = {}
    reuse = snapshot(state)
    load_before = os.getloadavg()
    for rep in range(repeats + 1):  # the first repetition warms the caches and the pages up, and is dropped
        order = list(saves)[rep % len(saves) :] + list(saves)[: rep % len(saves)]
        for copy_name, copy in list(copies.items())[:: 1 if rep % 2 else -1]:
            started = time.perf_counter()
            reuse = copy(state, reuse)
            if rep:
                samples.setdefault(f"stall.{copy_name}", []).append(time.perf_counter() - started)
        for save_name in order:
            time.sleep(0.05)  # as the daemon's saves come between steps, not back to back
            cpu, wall, _, _ = on_thread(saves[save_name], probe=False)
            time.sleep(0.05)
            held = gil_held(saves[save_name])
            if rep:
                samples.setdefault(f"cpu.{save_name}", []).append(cpu)
                samples.setdefault(f"wall.{save_name}", []).append(wall)
                samples.setdefault(f"gil.{save_name}", []).append(held)
    emit(
        "save_cost",
        state=name,
        bytes=nbytes,
        repeats=repeats,
        intra_op_threads=torch.get_num_threads(),
        load_average=[load_before, os.getloadavg()],
        ms={key: spread(values, 1e3) for key, values in samples.items()},
        ms_per_mib={key: spread(values, per_mib_ms) for key, values in samples.items()},
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--dir", type=Path, help="where the saves are written (default: the system's temp folder)")
    parser.add_argument("--big-hidden", default="2500,2500", help="the larger state's MLP widths; empty: none")
    args = parser.parse_args()
    checkpoint = torch.load(args.checkpoint, map_location="cpu", weights_only=True)
    states = {"mlp": checkpoint}
    if args.big_hidden:
        states["big"] = big_state(checkpoint, hidden_widths(args.big_hidden))
    with tempfile.TemporaryDirectory(dir=args.dir, prefix="save-cost-") as directory:
        for name, state in states.items():
            measure(name, state, args.repeats, Path(directory))


if __name__ == "__main__":
    main()
