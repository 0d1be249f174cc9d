"""structlog, configured once per process.

JSON lines on stderr by default (what log shippers and `jq` want), a console
renderer when a person is watching a terminal. Keys are stable across the code
base: request_id, rollout, stage, role, actor, verb.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import TextIO

import structlog

_configured = False


def configure_logging(
    level: str | None = None, fmt: str | None = None, stream: TextIO | None = None
) -> None:
    """Set up structlog; later calls are ignored so libraries cannot fight over it."""
    global _configured
    if _configured:
        return
    stream = stream or sys.stderr
    level = (level or os.environ.get("CUTOVER_LOG_LEVEL", "info")).upper()
    fmt = fmt or os.environ.get("CUTOVER_LOG_FORMAT") or ("console" if stream.isatty() else "json")
    renderer: structlog.typing.Processor = (
        structlog.dev.ConsoleRenderer(colors=stream.isatty())
        if fmt == "console"
        else structlog.processors.JSONRenderer()
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(getattr(logging, level, logging.INFO)),
        logger_factory=structlog.PrintLoggerFactory(file=stream),
        cache_logger_on_first_use=True,
    )
    _configured = True
