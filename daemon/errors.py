"""Exit codes and the errors that end a run with one.

The codes are chosen for what systemd does with them (see `systemd/common.conf`):
STOPPED is a success that forces a restart unless the stop was asked for (`systemctl stop`),
while CONFIG, NO_INPUT, IN_USE, CRASH_LOOP and CANT_WRITE need a person and must not restart in a loop.
"""

from __future__ import annotations

import enum

from daemon import events


class ExitCode(enum.IntEnum):
    COMPLETE = 0  # training complete (also: `trainer status` answered)
    FAILURE = 1  # unexpected error; the `crashed` event carries the traceback
    USAGE = 2  # bad command line
    NO_INPUT = 66  # EX_NOINPUT: dataset absent and not downloadable
    IN_USE = 69  # EX_UNAVAILABLE: another run holds the checkpoint directory
    CRASH_LOOP = 70  # EX_SOFTWARE: refused to start after crashes in a row without progress
    CANT_WRITE = 73  # EX_CANTCREAT: a checkpoint could not be written (disk full, permissions)
    STOPPED = 75  # EX_TEMPFAIL: stopped by a signal; the newest checkpoint holds the position
    CONFIG = 78  # EX_CONFIG: bad configuration, or a checkpoint that the config cannot resume exactly


class TrainerError(Exception):
    """An expected failure: logged as `event` with its message, and the process exits with `exit_code`."""

    exit_code: ExitCode = ExitCode.FAILURE
    event: events.Event = events.ERROR

    def __init__(self, message: str, **fields: object) -> None:
        super().__init__(message)
        self.fields = fields  # logged with the event, beside the message

    def report(self) -> ExitCode:
        """Log the error's event (its message, exit code and fields); return the exit code."""
        self.event.emit(message=str(self), exit_code=int(self.exit_code), **self.fields)
        return self.exit_code


class ConfigError(TrainerError):
    exit_code = ExitCode.CONFIG
    event = events.CONFIG_ERROR


class IncompatibleCheckpoint(TrainerError):
    exit_code = ExitCode.CONFIG
    event = events.CHECKPOINT_INCOMPATIBLE


class DatasetUnavailable(TrainerError):
    exit_code = ExitCode.NO_INPUT
    event = events.DATASET_UNAVAILABLE


class CheckpointWriteError(TrainerError):
    exit_code = ExitCode.CANT_WRITE
    event = events.CHECKPOINT_WRITE_FAILED


class DirectoryInUse(TrainerError):
    exit_code = ExitCode.IN_USE
    event = events.CHECKPOINT_DIR_IN_USE


class CrashLoop(TrainerError):
    exit_code = ExitCode.CRASH_LOOP
    event = events.CRASH_LOOP
