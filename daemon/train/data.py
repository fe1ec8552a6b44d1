"""The data order: a batch sampler whose epoch order is part of the checkpoint, and the loaders
that serve its batches.

Resuming mid-epoch starts the sampler at the next untrained batch: the skipped samples are never
read. A task's samples are fetched with every RNG seeded for that sample, so an augmentation draws
the same numbers on every resume and with any number of DataLoader workers.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol, TypeGuard

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler, default_collate

from daemon.ckpt.schema import conform, like, require
from daemon.config.sections import DataConfig
from daemon.service.signals import ignore_stop_signals_in_worker


def _epoch_seed(seed: int, epoch: int) -> int:
    digest = hashlib.sha256(f"trainer-data-order/{seed}/{epoch}".encode()).digest()
    return int.from_bytes(digest[:8], "little")


class EpochBatchSampler(Sampler[list[int]]):
    """The batches of one epoch, from a start batch on.

    The order of epoch `e` is a permutation drawn from its own generator seeded by (seed, e):
    it touches no global RNG, does not depend on num_workers, and is saved in the checkpoint
    so that a resumed epoch continues with exactly the batches not yet trained.
    """

    VERSION = 1

    def __init__(self, num_samples: int, batch_size: int, shuffle: bool, seed: int) -> None:
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.epoch = -1  # no order drawn yet
        self.order = torch.empty(0, dtype=torch.int32)
        self.start_batch = 0
        self.rank, self.world_size = 0, 1

    def shard(self, rank: int, world_size: int) -> None:
        """Serve this rank's share of each batch: the samples at `rank`, `rank + world_size`, ... of
        the global batch. The order, and so the state, is the same for every world size."""
        self.rank, self.world_size = rank, world_size

    def __len__(self) -> int:
        return -(-self.num_samples // self.batch_size)

    def set_epoch(self, epoch: int) -> None:
        if self.shuffle:
            generator = torch.Generator().manual_seed(_epoch_seed(self.seed, epoch))
            order = torch.randperm(self.num_samples, generator=generator)
        else:
            order = torch.arange(self.num_samples)
        self.epoch, self.order, self.start_batch = epoch, order.to(torch.int32), 0

    def batch_length(self, batch: int) -> int:
        """How many samples batch number `batch` of an epoch holds (the last one may be short)."""
        return min(self.batch_size, self.num_samples - batch * self.batch_size)

    def own_length(self, batch: int) -> int:
        """How many samples of batch number `batch` are this rank's."""
        return len(range(self.rank, self.batch_length(batch), self.world_size))

    def start_at(self, batch: int) -> None:
        self.start_batch = batch

    def __iter__(self) -> Iterator[list[int]]:
        for batch in self.index_batches():
            yield batch.tolist()

    def index_batches(self) -> Iterator[torch.Tensor]:
        """The batches from the start batch on, as int32 index tensors (views of the order)."""
        for batch in range(self.start_batch, len(self)):
            yield self.order[batch * self.batch_size : (batch + 1) * self.batch_size][self.rank :: self.world_size]

    def state_dict(self) -> dict:
        return {
            "version": self.VERSION,
            "epoch": self.epoch,
            "num_samples": self.num_samples,
            "batch_size": self.batch_size,
            "order": self.order.clone(),
        }

    def check_state(self, data: Any, checkpoint: dict, where: str = "data") -> None:
        """Raise InvalidCheckpoint unless `data` is this run's data order at the checkpoint's position."""
        live = self.state_dict()
        conform(data, {**live, "order": like(live["order"], (live["num_samples"],))}, where)
        for key in ("version", "num_samples", "batch_size"):
            require(data[key] == live[key], f"{where}.{key}", f"{data[key]}, this run has {live[key]}")
        # Mid-epoch the order is that of the epoch in flight; at an epoch's start, that of the one before.
        epoch, step = checkpoint["epoch"], checkpoint["step_in_epoch"]
        allowed = (epoch,) if step else (epoch - 1, epoch)
        require(
            data["epoch"] in allowed, f"{where}.epoch", f"{data['epoch']} for a checkpoint at epoch {epoch} step {step}"
        )
        order = data["order"]
        is_permutation = torch.equal(order.sort().values, torch.arange(len(order), dtype=order.dtype))
        require(is_permutation, f"{where}.order", f"is not a permutation of the {len(order)} samples")

    def load_state_dict(self, state: dict) -> None:
        if state["version"] != self.VERSION:
            raise ValueError(f"data-order state version {state['version']}, expected {self.VERSION}")
        if (state["num_samples"], state["batch_size"]) != (self.num_samples, self.batch_size):
            raise ValueError(
                f"data-order state is for {state['num_samples']} samples in batches of {state['batch_size']}, "
                f"this run has {self.num_samples} in batches of {self.batch_size}"
            )
        self.epoch, self.order, self.start_batch = state["epoch"], state["order"], 0


def _already_batched(batch):
    return batch


MASK64 = 2**64 - 1


def _sample_seed(seed: int, epoch: int, index: int) -> int:
    """A 64-bit seed of its own for each sample of each epoch (splitmix64 of the three)."""
    z = (seed * 0x9E3779B97F4A7C15 + epoch * 0xBF58476D1CE4E5B9 + index * 0x94D049BB133111EB) & MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
    return z ^ (z >> 31)


class SeededSamples(Dataset):
    """A task's dataset, fetched by (epoch, index) keys with torch's, numpy's and Python's global
    RNGs seeded for that sample first: a random augmentation draws the same numbers on every resume
    and in any worker, whatever num_workers is (DataLoader's own worker seeds restart with each
    iterator, so they would not). The caller's RNG states are put back afterwards: with no workers
    the fetch runs in the training process, between steps that draw from them (dropout)."""

    def __init__(self, dataset: MapDataset, seed: int) -> None:
        self.dataset = dataset
        self.seed = seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitems__(self, keys: list[tuple[int, int]]) -> list:
        torch_state, numpy_state, python_state = torch.get_rng_state(), np.random.get_state(), random.getstate()
        try:
            samples = []
            for epoch, index in keys:
                seed = _sample_seed(self.seed, epoch, index)
                torch.default_generator.manual_seed(seed)  # the CPU generator only: CUDA's is the loop's
                np.random.seed(seed & 0xFFFFFFFF)
                random.seed(seed)
                samples.append(self.dataset[index])
            return samples
        finally:
            torch.set_rng_state(torch_state)
            np.random.set_state(numpy_state)
            random.setstate(python_state)


class KeyedBatches(Sampler[list[tuple[int, int]]]):
    """The sampler's batches as (epoch, index) keys, for SeededSamples."""

    def __init__(self, sampler: EpochBatchSampler) -> None:
        self.sampler = sampler

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        epoch = self.sampler.epoch
        for batch in self.sampler.index_batches():
            yield [(epoch, index) for index in batch.tolist()]


class InProcessLoader:
    """The batches `DataLoader(num_workers=0)` yields from a batch-indexed dataset, without its
    per-batch machinery (index lists, fetcher, collate): with no worker to hide it behind, that
    machinery costs ~3% of an MLP step. Like DataLoader's, each iterator starts at the sampler's
    start batch."""

    num_workers = 0

    def __init__(self, dataset: BatchIndexed, sampler: EpochBatchSampler, pin_memory: bool) -> None:
        self.dataset = dataset
        self.sampler = sampler
        self.pin_memory = pin_memory

    def __iter__(self) -> Iterator[Any]:
        for index in self.sampler.index_batches():
            batch = self.dataset.batch(index)
            yield map_tensors(torch.Tensor.pin_memory, batch) if self.pin_memory else batch


class MapDataset(Protocol):
    """A map-style dataset, as the sampler indexes it (torch's `Dataset` declares no `__len__`)."""

    def __getitem__(self, index: int) -> Any: ...

    def __len__(self) -> int: ...


class BatchIndexed(Protocol):
    """A dataset that serves a whole batch from an index tensor, drawing no random numbers."""

    def __len__(self) -> int: ...

    def batch(self, index: torch.Tensor) -> Any: ...


def _batch_indexed(dataset: MapDataset) -> TypeGuard[BatchIndexed]:
    return callable(getattr(dataset, "batch", None))


def map_tensors(fn: Callable[[torch.Tensor], torch.Tensor], batch: Any) -> Any:
    """`fn` applied to every tensor of a batch made of tuples, lists and dicts."""
    if isinstance(batch, torch.Tensor):
        return fn(batch)
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # a namedtuple
        return type(batch)(*(map_tensors(fn, item) for item in batch))
    if isinstance(batch, (tuple, list)):
        return type(batch)(map_tensors(fn, item) for item in batch)
    if isinstance(batch, dict):
        return {key: map_tensors(fn, value) for key, value in batch.items()}
    return batch


@dataclass
class TrainData:
    loader: DataLoader | InProcessLoader
    sampler: EpochBatchSampler


def build_train_data(
    dataset: MapDataset, cfg: DataConfig, batch_size: int, seed: int, pin_memory: bool, collate_fn: Callable | None
) -> TrainData:
    sampler = EpochBatchSampler(len(dataset), batch_size, cfg.shuffle, seed)
    workers = cfg.num_workers
    fetched: Dataset  # what the DataLoader fetches from
    batches: EpochBatchSampler | KeyedBatches
    if _batch_indexed(dataset):
        if workers == 0:
            return TrainData(InProcessLoader(dataset, sampler, pin_memory), sampler)
        fetched, batches, collate_fn = _WholeBatches(dataset), sampler, _already_batched
    else:
        fetched, batches, collate_fn = (
            SeededSamples(dataset, seed),
            KeyedBatches(sampler),
            collate_fn or default_collate,
        )
    loader = DataLoader(
        fetched,
        batch_sampler=batches,
        collate_fn=collate_fn,
        num_workers=workers,
        persistent_workers=workers > 0,
        worker_init_fn=ignore_stop_signals_in_worker if workers else None,
        pin_memory=pin_memory,
        # Its own generator: creating an iterator draws a base seed, which must not consume
        # the global RNG (dropout's), or a resumed epoch would diverge from an unbroken one.
        generator=torch.Generator().manual_seed(seed),
    )
    return TrainData(loader, sampler)


class _WholeBatches(Dataset):
    """A batch-indexed dataset as DataLoader workers fetch it: the batch's index list at once."""

    def __init__(self, dataset: BatchIndexed) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitems__(self, indices: list[int]) -> Any:
        return self.dataset.batch(torch.as_tensor(indices))
