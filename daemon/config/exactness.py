"""Which settings a bitwise-exact resume depends on: the fingerprint every checkpoint stores, and
the settings that may change between a checkpoint and its resume."""

from __future__ import annotations

import hashlib
import json
from typing import Any

# Values a setting had in earlier versions of the daemon for what is the same thing now: the built-in
# task moved into daemon/builtin/. A checkpoint that stores one resumes as if it stored the new one.
RENAMED_VALUES = {("task.entry", "daemon.mnist_mlp:build"): "daemon.builtin.mnist_mlp:build"}


def with_current_names(settings: dict[str, Any]) -> dict[str, Any]:
    """`settings` as a checkpoint stores them, with each renamed value under its current name."""
    return {
        key: RENAMED_VALUES.get((key, value), value) if isinstance(value, str) else value
        for key, value in settings.items()
    }


def exactness_fingerprint(settings: dict[str, Any]) -> str:
    """Hash of every setting (flat, as Config.flat() and the task's version give them) that a
    bitwise-exact resume depends on."""
    relevant = {k: v for k, v in settings.items() if not is_resume_safe(k)}
    return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()


# Settings that may change between a checkpoint and its resume without breaking exactness.
# Everything else (model, optimizer, batch size, seed, data order, subsets) is refused.
RESUME_SAFE_PREFIXES = (
    "data.root",
    "data.download",
    "data.num_workers",
    "train.epochs",
    "train.max_steps",
    "train.cpu_threads",  # the count a run resolved to is checked on its own (daemon/threads.py)
    "train.cpu_wait",
    "train.device",
    "train.eval_batch_size",
    "checkpoint.",
    "log.",
    "preemption.",
    "dist.",  # how the ranks are started; the world size they make is checked on its own (daemon/resume.py)
)


def is_resume_safe(key: str) -> bool:
    return key.startswith(RESUME_SAFE_PREFIXES)
