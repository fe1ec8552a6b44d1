"""structlog configuration: one JSON object per line off a terminal (journald reads it), console on one.

Every event carries `event`, `timestamp`, `level`, `run_id` and `pid`; the trainer adds
`epoch`, `step_in_epoch` and `global_step` where they apply.
"""

from __future__ import annotations

import logging
import os
import sys
import uuid

import structlog


def configure(level: str = "info", fmt: str = "auto") -> str:
    """Configure structlog for this process and return its run id."""
    if fmt == "auto":
        fmt = "console" if sys.stdout.isatty() else "json"
    renderer = (
        structlog.dev.ConsoleRenderer(colors=True, sort_keys=False)
        if fmt == "console"
        else structlog.processors.JSONRenderer()
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            # The traceback as data, without local variables (tensors would flood the journal).
            structlog.processors.ExceptionRenderer(structlog.tracebacks.ExceptionDictTransformer(show_locals=False)),
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelNamesMapping()[level.upper()]),
        logger_factory=structlog.PrintLoggerFactory(sys.stdout),
        cache_logger_on_first_use=False,
    )
    run_id = uuid.uuid4().hex[:12]
    structlog.contextvars.clear_contextvars()
    structlog.contextvars.bind_contextvars(run_id=run_id, pid=os.getpid())
    return run_id


def get() -> structlog.typing.FilteringBoundLogger:
    return structlog.get_logger()
