"""structlog set-up: one processor chain, a console or JSON renderer.

Each request produces one canonical ``request`` line (see
:mod:`memproxy.forwarding`). Query strings and headers are never logged: both
can carry credentials (Gemini, for one, takes its key as ``?key=``).

The request line is on the hot path, so it is cheaper than structlog's
defaults: in JSON format :func:`log_request` renders it directly (the same
fields structlog would write, without the processor pipeline); the timestamp
reuses its formatted date and time for the rest of each second; and lines
written while the event loop runs are flushed once per loop iteration rather
than once per line (a busy proxy finishes many requests per iteration). A
line is never held back for longer than the iteration that wrote it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import time
from collections.abc import Callable
from typing import Any, TextIO

import structlog
from structlog.typing import EventDict, WrappedLogger

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO,
           "warning": logging.WARNING, "error": logging.ERROR}


class UtcTimestamp:
    """Adds ``timestamp``: ISO 8601 in UTC with microseconds, as ``TimeStamper(fmt="iso")``."""

    __slots__ = ("_prefix", "_second")

    def __init__(self) -> None:
        self._second = -1
        self._prefix = ""

    def __call__(self, logger: WrappedLogger, name: str, event_dict: EventDict) -> EventDict:
        now = time.time()
        second = int(now)
        if second != self._second:
            self._second = second
            self._prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        event_dict["timestamp"] = f"{self._prefix}.{int((now - second) * 1e6):06d}Z"
        return event_dict


class LineWriter:
    """A structlog logger that writes lines to a text file.

    Inside a running event loop the flush is deferred to the end of the
    current loop iteration, so lines finished together reach the file in one
    ``write()``. Outside a loop every line is flushed at once.
    """

    def __init__(self, file: TextIO) -> None:
        self._file = file
        self._flush_pending = False

    def msg(self, message: str) -> None:
        self._file.write(message + "\n")
        if self._flush_pending:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self._file.flush()
            return
        self._flush_pending = True
        loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_pending = False
        self._file.flush()

    log = debug = info = warn = warning = error = critical = exception = fatal = msg


class LineWriterFactory:
    """One :class:`LineWriter` per file, shared by every logger."""

    def __init__(self, file: TextIO) -> None:
        self._writer = LineWriter(file)

    def __call__(self, *args: Any) -> LineWriter:
        return self._writer


log = structlog.get_logger("memproxy")
_process_fields: dict[str, object] = {}


def _log_request_with_structlog(line: dict[str, object]) -> None:
    log.info("request", **line)


#: Writes the canonical request line; see :func:`configure_logging`.
_request_writer: Callable[[dict[str, object]], None] = _log_request_with_structlog


def log_request(line: dict[str, object]) -> None:
    """Write the canonical ``request`` line for one finished request."""
    _request_writer(line)


def bind_process(**fields: object) -> None:
    """Fields every line of this process carries (e.g. ``worker``)."""
    _process_fields.update(fields)
    structlog.contextvars.bind_contextvars(**fields)


def _json_request_writer(
    writer: LineWriter, timestamp: UtcTimestamp
) -> Callable[[dict[str, object]], None]:
    encode = json.JSONEncoder(default=repr).encode
    fields = _process_fields

    def write(line: dict[str, object]) -> None:
        record = {"event": "request", **line, **fields, "level": "info"}
        writer.msg(encode(timestamp(writer, "info", record)))

    return write


def configure_logging(log_format: str = "auto", level: str = "info") -> None:
    """Configure structlog for the process; ``auto`` means JSON unless stdout is a terminal."""
    if log_format == "auto":
        log_format = "console" if sys.stdout.isatty() else "json"
    renderer: Any
    if log_format == "console":
        renderer = structlog.dev.ConsoleRenderer(colors=sys.stdout.isatty())
    else:
        renderer = structlog.processors.JSONRenderer()
    timestamp = UtcTimestamp()
    factory = LineWriterFactory(sys.stdout)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            timestamp,
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[level]),
        logger_factory=factory,
        cache_logger_on_first_use=True,
    )
    global _request_writer
    if _LEVELS[level] > logging.INFO:
        _request_writer = _ignore
    elif log_format == "json":
        _request_writer = _json_request_writer(factory(), timestamp)
    else:
        _request_writer = _log_request_with_structlog


def _ignore(line: dict[str, object]) -> None:
    pass
