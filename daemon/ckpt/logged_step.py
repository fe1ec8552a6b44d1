"""The step the run has trained to, marked in the run directory (`last-logged-step.json`) at every
save, every `progress` event and at least every half second of training (daemon/service/progress.py),
so that a run killed without warning lets its successor say how many trained steps were lost."""

from __future__ import annotations

import json
from pathlib import Path

from daemon.ckpt.layout import LOGGED_STEP_FILE, UnusableFile, read_small_json, set_aside, write_atomic


class LoggedStep:
    """Advisory: written without fsync (a rename), skipped when the disk refuses (the next
    checkpoint save reports that); a marker that is not one is set aside and means "unknown"."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def mark(self, global_step: int) -> None:
        data = json.dumps({"global_step": global_step}).encode()
        try:
            self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            write_atomic(self.directory, LOGGED_STEP_FILE, lambda file: file.write(data), durable=False)
        except OSError:
            pass

    def read(self) -> int | None:
        """The step marked; None when unknown (no marker, or one that is not a step: set aside)."""
        try:
            value = read_small_json(self.directory, LOGGED_STEP_FILE, limit=1024)
        except UnusableFile as exc:
            set_aside(self.directory, LOGGED_STEP_FILE, str(exc))
            return None
        except OSError:  # unreadable (EIO): unknown, and the next mark replaces it
            return None
        step = value.get("global_step") if isinstance(value, dict) else None
        if type(step) is int and step >= 0:
            return step
        if value is not None:
            set_aside(self.directory, LOGGED_STEP_FILE, "not a record of a step")
        return None
