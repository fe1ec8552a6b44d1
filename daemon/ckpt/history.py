"""One metrics history per run, the same however often the run was interrupted.

`metrics.jsonl` in the checkpoint directory: one JSON object a line, each with a `record` kind:

- `train`: every `log.metrics_every_steps` steps, the mean training loss of the epoch so far (and
  the task's step metrics), as `progress` reports them;
- `eval`: each completed epoch's evaluation, training loss, seconds and headline metric;
- `resume`: each resume (the checkpoint's kind and step, the steps lost);
- `checkpoint`: each emergency, on-demand and notice checkpoint, written just before it (the marks of
  `trainer plot`; `trainer status` shows a notice not followed by a resume).

JSON lines because the file is only ever appended to, a line torn by a power loss is found (it does
not parse) and dropped alone, and `jq` reads it as it reads the logs. On resume every record past
the resumed state is dropped before training goes on (the file rewritten: temp file, rename), so
the resumed run appends exactly what an unbroken run would have written. Appends are written, not
fsynced: the file is a record of the run, not part of its exactness, and costs the loop nothing.

The file is advisory, and may be anything: it is read a bounded line at a time (a history of any
size costs one line of memory), and a line that is torn, too long, not JSON or not a record with
the fields its kind needs is dropped and counted. A history that is not a regular file (a
directory, a FIFO, a link: never followed, never waited on) is set aside as `metrics.jsonl.invalid`
and a new one begun. A write that fails (a full disk) is reported once and the run goes on without
the history: it never changes how a run ends.
"""

from __future__ import annotations

import json
import os
import stat
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from daemon import events
from daemon.ckpt.layout import HISTORY_FILE, UnusableFile, open_regular, set_aside, write_atomic

if TYPE_CHECKING:
    from daemon.train.state import TrainProgress

MARKED_KINDS = ("emergency", "on_demand", "notice")  # checkpoints the plot marks: a stop, a request, a notice
MAX_LINE_BYTES = 1 << 16  # a record is a few hundred bytes; a longer line is not one

Types = tuple[type, ...]
NUMBER: Types = (int, float)
COMMON_FIELDS: dict[str, Types] = {"epoch": (int,), "step_in_epoch": (int,), "global_step": (int,), "time": NUMBER}
RECORD_FIELDS: dict[
    str, dict[str, Types]
] = {  # what the readers (a resume, `trainer status`, `trainer plot`) take from each kind
    "train": {"loss": NUMBER},
    "eval": {"headline": (str,), "seconds": NUMBER},
    "resume": {"kind": (str,)},
    "checkpoint": {"kind": (str,)},
}


def _is_record(value: object) -> bool:
    """A record of a known kind with every field its readers use, of its type (a bool is no number)."""
    if not isinstance(value, dict) or not isinstance(value.get("record"), str):
        return False
    needed = RECORD_FIELDS.get(value["record"])
    if needed is None or any(type(value.get(key)) not in types for key, types in {**COMMON_FIELDS, **needed}.items()):
        return False
    return value["record"] != "eval" or type(value.get(value["headline"])) in NUMBER


def _parse(line: bytes) -> dict | None:
    try:
        value = json.loads(line)
    except (ValueError, RecursionError):  # not JSON, not UTF-8, or nested too deep for the parser
        return None
    return value if _is_record(value) else None


class HistoryReader:
    """The records of a run directory's history, streamed: one bounded line in memory at a time."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.dropped = 0  # lines passed over that are not records (torn, too long, not JSON, lacking a field)

    def lines(self) -> Iterator[tuple[bytes, dict]]:
        """Each record, with its line as written. Raises UnusableFile (at the first `next`) when the
        history is not a regular file; no file: no records."""
        self.dropped = 0
        file = open_regular(self.directory, HISTORY_FILE)
        if file is None:
            return
        with file:
            while line := file.readline(MAX_LINE_BYTES + 1):
                if line.endswith(b"\n"):
                    record = _parse(line)
                    if record is not None:
                        yield line, record
                        continue
                elif len(line) > MAX_LINE_BYTES:
                    _skip_line(file)
                self.dropped += 1  # not a record; or the part after the last newline: a torn line

    def __iter__(self) -> Iterator[dict]:
        return (record for _, record in self.lines())


def _skip_line(file: BinaryIO) -> None:
    """Past the end of an overlong line, a bounded piece at a time."""
    while (piece := file.readline(MAX_LINE_BYTES)) and not piece.endswith(b"\n"):
        pass


def _position(record: dict) -> tuple[int, int]:
    """Where in the run a record stands: (global step, epochs completed), the order of states."""
    return record["global_step"], record["epoch"]


class MetricsHistory:
    def __init__(self, directory: Path, progress: TrainProgress) -> None:
        self.directory = directory
        self.path = directory / HISTORY_FILE
        self.progress = progress
        self._fd: int | None = None  # opened by start(); None when there is no usable history

    def start(self, resumed_kind: str | None, steps_lost: int | None) -> None:
        """Keep the records up to the state the run (re)starts from; record the resume."""
        try:
            self._keep_up_to_here()
        except UnusableFile as exc:
            if set_aside(self.directory, HISTORY_FILE, str(exc)) is None:
                return  # left in place: never written through
        except OSError as exc:  # advisory: the checkpoints, not this file, are the run's state
            self._unavailable(exc)
            return
        try:
            self._fd = self._open_for_appending()
        except (OSError, UnusableFile) as exc:
            self._unavailable(exc)
            return
        if resumed_kind is not None:
            self._append("resume", kind=resumed_kind, steps_lost=steps_lost)

    def _keep_up_to_here(self) -> None:
        here = (self.progress.global_step, self.progress.epoch)
        reader = HistoryReader(self.directory)
        past = sum(1 for record in reader if _position(record) > here)
        if reader.dropped:
            events.METRICS_LINES_DROPPED.emit(
                path=str(self.path), lines=reader.dropped, reason="torn, too long, or not a record"
            )
        if past or reader.dropped:

            def write_kept(file: BinaryIO) -> None:
                for line, record in HistoryReader(self.directory).lines():
                    if _position(record) <= here:
                        file.write(line)

            write_atomic(self.directory, HISTORY_FILE, write_kept, durable=False)

    def _open_for_appending(self) -> int:
        flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
        fd = os.open(self.path, flags, 0o600)  # a FIFO without a reader: ENXIO, not a wait
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise UnusableFile("not a regular file")
        os.set_blocking(fd, True)
        return fd

    def train_record(self, loss: float, metrics: dict[str, float]) -> None:
        self._append("train", loss=loss, **metrics)

    def epoch_done(self, entry: dict, seconds: float, headline: str) -> None:
        metrics = {key: value for key, value in entry.items() if key != "epoch"}
        self._append("eval", **metrics, seconds=round(seconds, 3), headline=headline)

    def mark_checkpoint(self, kind: str) -> None:
        if kind in MARKED_KINDS:
            self._append("checkpoint", kind=kind)

    def close(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            try:
                os.close(fd)
            except OSError as exc:  # a write error some file systems report only now
                self._unavailable(exc)

    def _append(self, record: str, **fields) -> None:
        if self._fd is None:
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
        data = memoryview((json.dumps(line) + "\n").encode())
        try:
            # Unbuffered: nothing is left to fail later, at close, in place of the run's own exit.
            while data:  # after a short write, writing the rest raises what stopped it (ENOSPC)
                data = data[os.write(self._fd, data) :]
        except OSError as exc:
            self._unavailable(exc)

    def _unavailable(self, exc: OSError | UnusableFile) -> None:
        """Reported once: the run goes on without its history (a torn last line is dropped on resume)."""
        events.METRICS_HISTORY_UNAVAILABLE.emit(path=str(self.path), reason=getattr(exc, "strerror", None) or str(exc))
        fd, self._fd = self._fd, None
        if fd is not None:
            try:
                os.close(fd)
            except OSError:
                pass  # reported already
