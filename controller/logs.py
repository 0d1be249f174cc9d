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


class _CurrentStderr:
    """Writes to whatever sys.stderr is at the time, not the object it was at set-up.

    Test runners and daemons swap sys.stderr; a logger bound to a closed stream would
    raise inside background threads (the recorder's writer) and kill them.
    """

    def write(self, text: str) -> int:
        try:
            return sys.stderr.write(text)
        except (ValueError, OSError):  # closed or broken stream: logging must never raise
            return 0

    def flush(self) -> None:
        try:
            sys.stderr.flush()
        except (ValueError, OSError):
            pass

    def isatty(self) -> bool:
        return sys.stderr.isatty()


def configure_logging(
    level: str | None = None, fmt: str | None = None, stream: TextIO | None = None
) -> None:
    """Set up structlog; later calls are ignored so libraries cannot fight over it."""
    global _configured
    if _configured:
        return
    stream = stream or _CurrentStderr()
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
        cache_logger_on_first_use=False,  # tests (and tools) may re-route logs after loggers exist
    )
    _configured = True


def one_line(exc: BaseException) -> str:
    """An exception as one short line for a log event: its type and its message's first line
    (a driver error's own message, not SQLAlchemy's wrapper with the statement)."""
    text = str(getattr(exc, "orig", None) or exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:300] if text else ''}"
