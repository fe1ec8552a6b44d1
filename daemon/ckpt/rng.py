"""Every RNG a step may draw from, as one resumable piece of state: torch's CPU generator, each CUDA
device's in use, numpy's and Python's `random`. Stored as tensors and plain values only, so a
checkpoint loads with weights_only=True."""

from __future__ import annotations

import random
from typing import Any, cast

import numpy as np
import torch

from daemon.ckpt.schema import InvalidCheckpoint, Rule, conform, finite, is_exactly, require, shown

UINT32_END = 2**32  # the Mersenne Twister's words (numpy's and Python's RNG state)
MT_WORDS = 624


class RNGState:
    """Every RNG a step may draw from: torch CPU, each CUDA device in use, numpy, python `random`."""

    VERSION = 1

    @staticmethod
    def seed_all(seed: int) -> None:
        torch.manual_seed(seed)  # CUDA devices too
        np.random.seed(seed)
        random.seed(seed)

    @staticmethod
    def state_dict() -> dict:
        # The legacy tuple, numpy's default form (its stub gives the call the dict form's type).
        np_state = cast("tuple[str, np.ndarray, int, int, float]", np.random.get_state())
        _, np_keys, np_pos, np_has_gauss, np_cached = np_state
        py_version, py_state, py_gauss = random.getstate()
        return {
            "version": RNGState.VERSION,
            "torch": torch.get_rng_state(),
            # Only when this process uses CUDA: asking would initialise it.
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else [],
            "numpy": {
                "keys": torch.from_numpy(np_keys.astype(np.int64)),
                "pos": int(np_pos),
                "has_gauss": int(np_has_gauss),
                "cached_gaussian": float(np_cached),
            },
            "python": {
                "version": py_version,
                "state": torch.tensor(py_state, dtype=torch.int64),
                "gauss_next": py_gauss,
            },
        }

    def check_state(self, rng: Any, _checkpoint: dict, where: str = "rng") -> None:
        """Raise InvalidCheckpoint unless `rng` is a state this process's RNGs can take."""
        live = self.state_dict()
        template = {
            **live,
            "cuda": Rule(lambda value, where: _check_cuda_states(value, where, live["cuda"])),
            "python": {**live["python"], "gauss_next": Rule(_none_or_finite)},
        }
        conform(rng, template, where)
        require(
            rng["version"] == live["version"],
            f"{where}.version",
            f"{rng['version']}, this trainer writes {live['version']}",
        )
        try:  # torch's generator checks its own state; on a scratch one, the run's is untouched
            torch.Generator().set_state(rng["torch"])
        except RuntimeError as exc:
            raise InvalidCheckpoint(f"{where}.torch: {str(exc).splitlines()[0]}") from None
        numpy = rng["numpy"]
        require(0 <= numpy["pos"] <= MT_WORDS, f"{where}.numpy.pos", f"{numpy['pos']} is outside 0..{MT_WORDS}")
        require(numpy["has_gauss"] in (0, 1), f"{where}.numpy.has_gauss", f"{numpy['has_gauss']}, must be 0 or 1")
        require(_words(numpy["keys"]), f"{where}.numpy.keys", "are not 32-bit words")
        python = rng["python"]["state"]
        require(
            _words(python[:-1]) and 0 <= int(python[-1]) <= MT_WORDS,
            f"{where}.python.state",
            "is not a Mersenne Twister state",
        )

    @staticmethod
    def load_state_dict(state: dict) -> None:
        if state["version"] != RNGState.VERSION:
            raise ValueError(f"RNG state version {state['version']}, expected {RNGState.VERSION}")
        torch.set_rng_state(state["torch"])
        if state["cuda"] and torch.cuda.is_initialized():  # as in state_dict(): only when this process uses CUDA
            torch.cuda.set_rng_state_all(state["cuda"])
        numpy_state = state["numpy"]
        np.random.set_state(
            (
                "MT19937",
                numpy_state["keys"].numpy().astype(np.uint32),
                numpy_state["pos"],
                numpy_state["has_gauss"],
                numpy_state["cached_gaussian"],
            )
        )
        python_state = state["python"]
        random.setstate((python_state["version"], tuple(python_state["state"].tolist()), python_state["gauss_next"]))


def _none_or_finite(value: Any, where: str) -> None:
    require(value is None or finite(value), where, f"{shown(value)} is neither None nor a finite number")


def _check_cuda_states(states: Any, where: str, live: list[torch.Tensor]) -> None:
    """One generator state per CUDA device. Loaded only when this process uses CUDA (RNGState),
    and then its own states say their shape and how many devices there are."""
    require(is_exactly(states, list), where, f"a list expected, found {type(states).__name__}")
    if live:
        require(len(states) <= len(live), where, f"{len(states)} device states, this machine has {len(live)} devices")
    for index, state in enumerate(states):
        if live:
            conform(state, live[0], f"{where}[{index}]")
        else:
            uint8_vector = isinstance(state, torch.Tensor) and state.dtype == torch.uint8 and state.dim() == 1
            require(uint8_vector, f"{where}[{index}]", "must be a 1-D uint8 tensor")


def _words(values: torch.Tensor) -> bool:
    return bool(((values >= 0) & (values < UINT32_END)).all())
