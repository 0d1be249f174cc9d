"""structlog, configured once per process, and one event file every process appends to.

JSON lines on stderr by default (what log shippers and `jq` want), a console
renderer when a person is watching a terminal. Keys are stable across the code
base: request_id, rollout, stage, role, actor, verb.

Ray keeps each replica's stderr in its own worker log file, where nobody looks. So every
process that serves a rollout (router and model server replicas, the controller loop)
also appends its events as JSON lines to the config's `log_file`, with `pid` and `host`
added, and `cutover serve` follows that file onto its own stderr: one place to read and
one place to alert from.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

import structlog

ENV_LEVEL = "CUTOVER_LOG_LEVEL"
ENV_FORMAT = "CUTOVER_LOG_FORMAT"

_configured: str | None = None  # the level this process logs at, once configured
_sink: _FileSink | None = None


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


class _FileSink:
    """Appends each event as one JSON line with one write(2) on an O_APPEND descriptor, so
    lines from many processes interleave whole."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self.origin = {"pid": os.getpid(), "host": socket.gethostname()}

    def write(self, event: dict[str, Any]) -> None:
        line = json.dumps(event | self.origin, default=str, separators=(",", ":")) + "\n"
        try:
            os.write(self.fd, line.encode())
        except OSError:  # a full disk must not fail a request
            pass


def _to_file(_logger: Any, _method: str, event: dict[str, Any]) -> dict[str, Any]:
    if _sink is not None:
        _sink.write(event)
    return event


def level_from_env(default: str = "info") -> str:
    return os.environ.get(ENV_LEVEL) or default


def configure_logging(
    level: str | None = None, fmt: str | None = None, stream: TextIO | None = None
) -> None:
    """Set up structlog; later calls are ignored so libraries cannot fight over it."""
    global _configured
    if _configured is not None:
        return
    stream = stream or _CurrentStderr()
    level = (level or level_from_env()).upper()
    fmt = fmt or os.environ.get(ENV_FORMAT) or ("console" if stream.isatty() else "json")
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
            _to_file,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(getattr(logging, level, logging.INFO)),
        logger_factory=structlog.PrintLoggerFactory(file=stream),
        cache_logger_on_first_use=False,  # tests (and tools) may re-route logs after loggers exist
    )
    _configured = level.lower()


def configured_level() -> str | None:
    """The level this process was configured with: the processes it starts use it too."""
    return _configured


def log_to_file(path: Path | None) -> None:
    """Also append every event of this process to `path` (None: stop). Idempotent."""
    global _sink
    if _sink is not None and _sink.path == path:
        return
    if _sink is not None:
        os.close(_sink.fd)
    _sink = None if path is None else _FileSink(path)


def follow(
    path: Path,
    stop: threading.Event,
    write: Callable[[str], Any],
    *,
    skip_pid: int | None = None,
    interval: float = 0.2,
) -> None:
    """Copy events that other processes append to `path` onto `write`, until `stop` is set.

    Starts at the end of the file (what is already there was already seen); a truncated file
    (rotated with copytruncate) is read again from its start. Lines from `skip_pid` (this
    process, which writes its own events to stderr directly) are left out.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch(exist_ok=True)
    render = _console_line if sys.stderr.isatty() else (lambda line, _event: line)
    with path.open("rb") as handle:
        handle.seek(0, os.SEEK_END)
        pending = b""
        while True:
            chunk = handle.read()
            if not chunk:
                if stop.is_set():
                    return
                if path.stat().st_size < handle.tell():
                    handle.seek(0)
                stop.wait(interval)
                continue
            pending += chunk
            *lines, pending = pending.split(b"\n")
            for raw in lines:
                text = raw.decode("utf-8", "replace")
                try:
                    event = json.loads(text)
                except ValueError:
                    continue
                if skip_pid is not None and event.get("pid") == skip_pid:
                    continue
                write(render(text, event) + "\n")


def _console_line(_line: str, event: dict[str, Any]) -> str:
    return str(structlog.dev.ConsoleRenderer(colors=True)(None, "", dict(event)))


def one_line(exc: BaseException) -> str:
    """An exception as one short line for a log event: its type and its message's first line
    (a driver error's own message, not SQLAlchemy's wrapper with the statement)."""
    text = str(getattr(exc, "orig", None) or exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:300] if text else ''}"
