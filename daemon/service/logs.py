"""structlog configuration: one JSON object per line off a terminal (journald reads it), console on one.

Every event carries `event`, `timestamp`, `level`, `run_id` and `pid`; the trainer adds
`epoch`, `step_in_epoch` and `global_step` where they apply.

When stdout is the journal, each line starts with its syslog priority (`<3>` for an error), which
journald takes off and stores as PRIORITY=, so `journalctl -p err` finds the cause of a failure;
the stored message, and `journalctl -o cat`, stay the bare JSON object.
"""

from __future__ import annotations

import logging
import os
import sys
import uuid
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, TextIO, cast

import structlog

if TYPE_CHECKING:
    from structlog.typing import EventDict, Processor

    from daemon.service.live import Terminal

# level name -> (logging level for filtering, syslog priority for the journal)
LEVELS = {
    "critical": (logging.CRITICAL, 2),
    "error": (logging.ERROR, 3),
    "warning": (logging.WARNING, 4),
    "info": (logging.INFO, 6),
    "debug": (logging.DEBUG, 7),
}


def stream_is_journal(stream: TextIO, environ: Mapping[str, str] = os.environ) -> bool:
    """Whether `stream` is journald's stdout stream: systemd names it in $JOURNAL_STREAM as
    `<device>:<inode>` (and a child whose stdout was redirected inherits the variable, hence
    the comparison)."""
    try:
        st = os.fstat(stream.fileno())
    except (OSError, ValueError):
        return False
    return environ.get("JOURNAL_STREAM") == f"{st.st_dev}:{st.st_ino}"


class _WithPriority:
    """Wraps the renderer: `<N>` before each line, N the syslog priority of the event's level."""

    def __init__(self, renderer: Any) -> None:
        self.renderer = renderer

    def __call__(self, logger: Any, method_name: str, event_dict: EventDict) -> str:
        # structlog's aliases (`fatal`, `msg`) have no entry: stored as info, journald's default.
        priority = LEVELS.get(event_dict["level"], LEVELS["info"])[1]
        return f"<{priority}>{self.renderer(logger, method_name, event_dict)}"


_terminal: Terminal | None = None  # when stdout is a terminal that shows the console form


def terminal() -> Terminal | None:
    """The terminal the events are printed on (daemon/service/live.py), or None off a terminal."""
    return _terminal


def configure(level: str = "info", fmt: str = "auto") -> str:
    """Configure structlog for this process and return its run id."""
    global _terminal
    if fmt == "auto":
        fmt = "console" if sys.stdout.isatty() else "json"
    output: TextIO = sys.stdout
    renderer: Processor
    if fmt == "console" and sys.stdout.isatty():
        from daemon.service.live import Terminal  # rich: imported on a terminal only

        _terminal = Terminal()
        output = cast(TextIO, _terminal)  # structlog's WriteLogger calls only its write() and flush()
        renderer = _terminal.render
    elif fmt == "console":
        renderer = structlog.dev.ConsoleRenderer(colors=False, sort_keys=False)
    else:
        renderer = structlog.processors.JSONRenderer()
    if stream_is_journal(sys.stdout):
        renderer = _WithPriority(renderer)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            # The traceback as data, without local variables (tensors would flood the journal).
            structlog.processors.ExceptionRenderer(structlog.tracebacks.ExceptionDictTransformer(show_locals=False)),
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(LEVELS[level][0]),
        # Each line in one write, newline included: the ranks of a run share stdout (the journal's
        # stream), and unbuffered (PYTHONUNBUFFERED=1, as the units set it) print()'s separate
        # write of the newline let another rank's line in between.
        logger_factory=structlog.WriteLoggerFactory(output),
        cache_logger_on_first_use=False,
    )
    run_id = uuid.uuid4().hex[:12]
    structlog.contextvars.clear_contextvars()
    structlog.contextvars.bind_contextvars(run_id=run_id, pid=os.getpid())
    return run_id


def get() -> structlog.typing.FilteringBoundLogger:
    return structlog.get_logger()
