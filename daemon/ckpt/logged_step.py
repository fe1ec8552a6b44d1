"""The step a `progress` event or a save last reported, kept in the run directory so that a run
killed without warning lets its successor say how many steps it redoes."""

from __future__ import annotations

import json
from pathlib import Path

from daemon.ckpt.layout import LOGGED_STEP_FILE, write_atomic


class LoggedStep:
    """Advisory: not fsynced, and skipped when the disk refuses (the next checkpoint save reports that)."""

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
        try:
            step = json.loads((self.directory / LOGGED_STEP_FILE).read_text())["global_step"]
        except (OSError, ValueError, KeyError, TypeError):
            return None
        return step if isinstance(step, int) else None
