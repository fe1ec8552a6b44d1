"""Every resumable piece of a run under its checkpoint key, in one place.

As torchtitan's checkpointer keeps its stateful objects: a checkpoint holds `state_dict()` of each
under its key, resuming loads each back, and the checkpoint's schema takes its keys and templates
from here. Adding a piece of state is one `register` call; forgetting one is visible.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol, TypeGuard


class Stateful(Protocol):
    def state_dict(self) -> Any: ...

    def load_state_dict(self, state: Any) -> None: ...


class SelfChecking(Stateful, Protocol):
    """A piece that checks its own saved format: raises InvalidCheckpoint unless `state` (the value
    under its key in `checkpoint`) can be loaded into it and resumed exactly."""

    def check_state(self, state: Any, checkpoint: dict, where: str) -> None: ...


class StateRegistry:
    def __init__(self) -> None:
        self._parts: dict[str, Stateful | None] = {}

    def register(self, key: str, part: Stateful | None) -> None:
        """`part` None: this run has no such piece (no LR scheduler), saved as None under its key."""
        if key in self._parts:
            raise ValueError(f"state key {key!r} registered twice")
        self._parts[key] = part

    def keys(self) -> list[str]:
        return list(self._parts)

    def validators(self) -> dict[str, Callable[[Any, dict], None]]:
        """The check of each piece that checks its own format, by key."""
        return {key: _check_under(key, part) for key, part in self._parts.items() if _checks_itself(part)}

    def state_dict(self) -> dict[str, Any]:
        return {key: part.state_dict() if part is not None else None for key, part in self._parts.items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key, part in self._parts.items():
            if part is not None:
                part.load_state_dict(state[key])


def _checks_itself(part: Stateful | None) -> TypeGuard[SelfChecking]:
    return callable(getattr(part, "check_state", None))


def _check_under(key: str, part: SelfChecking) -> Callable[[Any, dict], None]:
    """`part`'s check of its value in a checkpoint, reported under `key`."""
    return lambda value, checkpoint: part.check_state(value, checkpoint, key)
