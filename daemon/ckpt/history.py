"""One metrics history per run, the same however often the run was interrupted.

`metrics.jsonl` in the checkpoint directory: one JSON object a line, each with a `record` kind:

- `train`: every `log.metrics_every_steps` steps, the mean training loss of the epoch so far (and
  the task's step metrics), as `progress` reports them;
- `eval`: each completed epoch's evaluation, training loss, seconds and headline metric;
- `resume`: each resume (the checkpoint's kind and step, the steps redone);
- `checkpoint`: each emergency and on-demand checkpoint, written just before it (the marks of `trainer plot`).

JSON lines because the file is only ever appended to, a line torn by a power loss is found (it does
not parse) and dropped alone, and `jq` reads it as it reads the logs. On resume every record past
the resumed state is dropped before training goes on (the file rewritten: temp file, rename), so
the resumed run appends exactly what an unbroken run would have written. Appends are flushed, not
fsynced: the file is a record of the run, not part of its exactness, and costs the loop nothing.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

from daemon import events
from daemon.ckpt.layout import HISTORY_FILE, write_atomic

if TYPE_CHECKING:
    from daemon.train.state import TrainProgress

MARKED_KINDS = ("emergency", "on_demand")  # checkpoints the plot marks: a stop, a request


def read_records(path: Path) -> tuple[list[dict], int]:
    """The records of a history file, and how many lines were dropped (torn or not a record)."""
    try:
        lines = path.read_bytes().split(b"\n")
    except FileNotFoundError:
        return [], 0
    records, dropped = [], 0
    for line in lines[:-1]:  # the part after the last newline is a torn line, or nothing
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        if isinstance(record, dict) and isinstance(record.get("global_step"), int):
            records.append(record)
        else:
            dropped += 1
    return records, dropped + (1 if lines[-1] else 0)


def _position(record: dict) -> tuple[int, int]:
    """Where in the run a record stands: (global step, epochs completed), the order of states."""
    return record["global_step"], record.get("epoch", 0)


class MetricsHistory:
    def __init__(self, directory: Path, progress: TrainProgress) -> None:
        self.path = directory / HISTORY_FILE
        self.progress = progress
        self._file: TextIO | None = None  # opened by start(); None when it could not be

    def start(self, resumed_kind: str | None, steps_redone: int | None) -> None:
        """Keep the records up to the state the run (re)starts from; record the resume."""
        records, dropped = read_records(self.path)
        here = (self.progress.global_step, self.progress.epoch)
        kept = [record for record in records if _position(record) <= here]
        if dropped:
            events.METRICS_LINES_DROPPED.emit(
                path=str(self.path), lines=dropped, reason="torn or unreadable (a write cut short)"
            )
        try:
            if len(kept) != len(records) or dropped:
                data = "".join(json.dumps(record) + "\n" for record in kept).encode()
                write_atomic(self.path.parent, HISTORY_FILE, lambda file: file.write(data), durable=False)
            self._file = open(os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600), "a", buffering=1)
        except OSError as exc:  # advisory: the checkpoints, not this file, are the run's state
            events.METRICS_HISTORY_UNAVAILABLE.emit(path=str(self.path), reason=exc.strerror or str(exc))
            return
        if resumed_kind is not None:
            self._append("resume", kind=resumed_kind, steps_redone=steps_redone)

    def train_record(self, loss: float, metrics: dict[str, float]) -> None:
        self._append("train", loss=loss, **metrics)

    def epoch_done(self, entry: dict, seconds: float, headline: str) -> None:
        metrics = {key: value for key, value in entry.items() if key != "epoch"}
        self._append("eval", **metrics, seconds=round(seconds, 3), headline=headline)

    def mark_checkpoint(self, kind: str) -> None:
        if kind in MARKED_KINDS:
            self._append("checkpoint", kind=kind)

    def close(self) -> None:
        if self._file:
            self._file.close()

    def _append(self, record: str, **fields) -> None:
        if self._file is None:
            return
        p = self.progress
        line = {
            "record": record,
            "epoch": p.epoch,
            "step_in_epoch": p.step_in_epoch,
            "global_step": p.global_step,
            **fields,
            "time": round(time.time(), 3),
        }
        try:
            self._file.write(json.dumps(line) + "\n")  # line-buffered: flushed, never fsynced
        except OSError:
            pass  # advisory, like the logged-step marker: a refusing disk is reported by the next checkpoint save
