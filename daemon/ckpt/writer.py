"""Saves written in the background: a snapshot of the state on the CPU, written through the store on
one thread of its own while the loop trains on."""

from __future__ import annotations

import concurrent.futures
from typing import Any

import numpy as np
import torch

from daemon.ckpt.store import CheckpointStore, SaveResult

# torch's at::internal::GRAIN_SIZE: `Tensor.copy_` of more elements is split over the intra-op
# threads; up to it, copy_ runs on the calling thread and costs less than building numpy views.
TORCH_COPY_GRAIN = 32768


def snapshot(state: Any, reuse: Any = None) -> Any:
    """A copy of `state` on the CPU that the training loop can no longer change.

    Each tensor is copied into the tensor at the same place in `reuse` (an earlier snapshot
    nobody reads any more) when shape, dtype and strides match, else into a new one. Copying
    into memory already mapped is several times faster than into fresh memory, whose every
    page faults on first touch: for a 1.2 GB state, ~0.1 s instead of ~0.5-1.5 s here.
    """
    if isinstance(state, torch.Tensor):
        source = state.detach()
        if isinstance(reuse, torch.Tensor) and (reuse.shape, reuse.dtype, reuse.stride()) == (
            source.shape,
            source.dtype,
            source.stride(),
        ):
            if source.numel() > TORCH_COPY_GRAIN and _plain_bytes(source):
                _copy_bytes(source, reuse)
                return reuse
            return reuse.copy_(source)
        return source.to("cpu", copy=True)
    if isinstance(state, dict):
        previous = reuse if isinstance(reuse, dict) else {}
        return {key: snapshot(value, previous.get(key)) for key, value in state.items()}
    if isinstance(state, (list, tuple)):
        previous_items = (
            reuse if isinstance(reuse, (list, tuple)) and len(reuse) == len(state) else (None,) * len(state)
        )
        return type(state)(snapshot(value, old) for value, old in zip(state, previous_items, strict=True))
    return state


def _plain_bytes(tensor: torch.Tensor) -> bool:
    """A plain dense tensor in one contiguous block of CPU memory, whose bytes are its value (no lazy
    conjugation or negation pending); a subclass (a DTensor) may hold its data elsewhere."""
    return (
        type(tensor) is torch.Tensor
        and tensor.device.type == "cpu"
        and tensor.layout == torch.strided
        and not tensor.is_quantized
        and tensor.is_contiguous()
        and not tensor.is_conj()
        and not tensor.is_neg()
    )


def _copy_bytes(source: torch.Tensor, target: torch.Tensor) -> None:
    """One memcpy of `source`'s bytes into `target` (same shape, dtype and strides), on this thread.

    `Tensor.copy_` splits a copy of more than 32K elements over torch's intra-op (OpenMP) threads,
    and waits for the slowest: on a 2-core machine with other work on it, a thread descheduled
    holds the whole copy up. At a load average of 5-7 the loop's stall for the MLP's 5 MB was
    0.8-129 ms (median 78) that way against 1.0-1.9 ms (median 1.5) now, for a 99 MB state
    33-328 ms (median 128) against 23-112 ms (median 57) (bench/save_cost.py, docs/benchmark.md).
    numpy's copy of contiguous bytes is one memcpy on the calling thread, without the GIL."""
    np.copyto(_bytes_of(target), _bytes_of(source))


def _bytes_of(tensor: torch.Tensor) -> np.ndarray:
    return tensor.detach().reshape(-1).view(torch.uint8).numpy()  # a task's state may require grad


class BackgroundWriter:
    """Writes snapshots through the store on one background thread, one save at a time.

    The loop is blocked only for the snapshot; `submit` first waits for the save in flight,
    so two saves never run at once, and `drain` lets the emergency path wait for it before
    its own synchronous write (the emergency file is then the newest). The snapshot of the
    last save is kept, its memory reused by the next one: between saves the writer holds one
    snapshot of the state, as it does while a save is in flight.
    """

    def __init__(self, store: CheckpointStore) -> None:
        self.store = store
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="ckpt-writer")
        self._in_flight: concurrent.futures.Future[SaveResult] | None = None
        self._last_snapshot: dict[str, Any] | None = None  # written out; its tensors are free for reuse

    def submit(self, state: dict[str, Any]) -> list[SaveResult]:
        """Start writing a snapshot of `state`; return the saves that finished meanwhile."""
        finished = self.drain()  # after this, nothing reads the last snapshot: it may be overwritten
        self._last_snapshot = snapshot(state, reuse=self._last_snapshot)
        self._in_flight = self._executor.submit(self._write, self._last_snapshot)
        return finished

    def _write(self, state: dict[str, Any]) -> SaveResult:
        result = self.store.save(state)
        self.store.prune()  # here too, off the loop
        return result

    def poll(self) -> list[SaveResult]:
        """The save in flight, if it has finished (its error, if it failed, is raised here)."""
        if self._in_flight is not None and self._in_flight.done():
            return self.drain()
        return []

    def drain(self) -> list[SaveResult]:
        """Wait for the save in flight; return it (or raise its error)."""
        future, self._in_flight = self._in_flight, None
        return [future.result()] if future is not None else []

    def close(self) -> list[SaveResult]:
        try:
            return self.drain()
        finally:
            self._last_snapshot = None
            self._executor.shutdown(wait=True)
