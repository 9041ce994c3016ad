"""structlog set-up: key=value lines, to stderr or to a file (containerd's log FIFO)."""
from __future__ import annotations

import logging
import sys
from typing import IO

import structlog

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}


def configure(level: str = "info", stream: IO[str] | None = None) -> None:
    """Route katapy's structured logs as ``key=value`` lines to ``stream``."""
    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True, key="time"),
            structlog.processors.KeyValueRenderer(key_order=["time", "level", "event"], sort_keys=True),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS.get(level, logging.INFO)),
        logger_factory=structlog.PrintLoggerFactory(file=stream or sys.stderr),
        cache_logger_on_first_use=False,
    )


def get(name: str, **bound: object) -> structlog.typing.FilteringBoundLogger:
    return structlog.get_logger(name).bind(component=name, **bound)
