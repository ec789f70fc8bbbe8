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
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

import structlog
from aiohttp.http_exceptions import HttpProcessingError
from structlog.typing import EventDict, WrappedLogger

from memproxy.observers import RequestRecord

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO,
           "warning": logging.WARNING, "error": logging.ERROR}


def iso_time(timestamp: float) -> str:
    """A time as memproxy's own endpoints show it: ISO 8601 in UTC, to the second."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(timestamp))


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
    """The one :class:`LineWriter`, shared by every logger.

    structlog keeps a logger bound to the writer it got on first use, so the
    writer stays the same object and :func:`configure_logging` points it at the
    file in force.
    """

    def __init__(self, writer: LineWriter) -> None:
        self._writer = writer

    def __call__(self, *args: Any) -> LineWriter:
        return self._writer


_writer = LineWriter(sys.stdout)


log = structlog.get_logger("memproxy")
_process_fields: dict[str, object] = {}


def _log_request_with_structlog(line: dict[str, object]) -> None:
    log.info("request", **line)


#: Writes the canonical request line; see :func:`configure_logging`.
_request_writer: Callable[[dict[str, object]], None] = _log_request_with_structlog


def log_request(line: dict[str, object]) -> None:
    """Write the canonical ``request`` line for one finished request."""
    _request_writer(line)


class RequestLog:
    """The observer that writes each request's canonical log line."""

    def request_done(self, record: RequestRecord) -> None:
        _request_writer(record.log_fields())


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


#: The standard-library loggers of aiohttp's server and of the event loop.
SERVER_LOGGERS = ("aiohttp.server", "aiohttp.access", "aiohttp.web", "aiohttp.internal",
                  "asyncio")
# What went wrong in a request aiohttp could not parse, by exception class (the first
# found along the class's MRO).
_HTTP_ERRORS = {
    "BadHttpMethod": "not an HTTP request, or an unknown method",
    "BadStatusLine": "malformed request line",
    "LineTooLong": "request line or header too long",
    "InvalidHeader": "malformed header",
    "InvalidURLError": "malformed request target",
    "ContentLengthError": "body shorter than its Content-Length",
    "TransferEncodingError": "malformed chunked body",
    "ContentEncodingError": "body does not match its Content-Encoding",
    "DecompressSizeError": "body too large once decompressed",
    "BadHttpMessage": "malformed HTTP message",
}
# Where a message its caller formatted may start quoting data.
_QUOTED = re.compile(r"""[:<(\[{'"=%?\n]""")


class ServerLogHandler(logging.Handler):
    """Writes the records of aiohttp's and asyncio's loggers as memproxy's log lines.

    Their text can hold raw request bytes: aiohttp's parse errors quote the
    offending line (an ``Authorization`` header, a ``?key=`` query), and the
    traceback repeats it. So each record becomes one line of fixed wording:
    the exception's class and where it was raised, never its message or the
    traceback.
    """

    def emit(self, record: logging.LogRecord) -> None:
        try:
            exc = record.exc_info[1] if record.exc_info else None
            fields: dict[str, object] = {"logger": record.name}
            if isinstance(exc, HttpProcessingError):
                event = "http_error"
                level = logging.WARNING  # the client's mistake, not memproxy's
                fields["error"] = type(exc).__name__
                fields["status"] = exc.code
                fields["description"] = next(
                    (_HTTP_ERRORS[kind.__name__] for kind in type(exc).__mro__
                     if kind.__name__ in _HTTP_ERRORS), "HTTP protocol error")
            else:
                event = ("server_error" if exc is not None or record.levelno >= logging.ERROR
                         else "server_log")
                fields["description"] = _fixed_text(record)
                if exc is not None:
                    fields["error"] = type(exc).__name__
                    fields["where"] = _raised_at(exc)
                level = record.levelno
            log.log(_standard_level(level), event, **fields)
        except Exception:
            # logging's own report (handleError) would print the record's raw text.
            pass


def _fixed_text(record: logging.LogRecord) -> str:
    """The record's wording without the data it carries."""
    text = record.msg if isinstance(record.msg, str) else type(record.msg).__name__
    if not record.args:  # formatted by the caller: keep what comes before any quoted data
        text = _QUOTED.split(text, maxsplit=1)[0]
    lines = text.strip().splitlines()
    return lines[0][:200] if lines else ""


def _raised_at(exc: BaseException) -> str | None:
    """``file:line in function`` of the innermost frame of ``exc``'s traceback."""
    tb = exc.__traceback__
    if tb is None:
        return None
    while tb.tb_next is not None:
        tb = tb.tb_next
    code = tb.tb_frame.f_code
    return f"{Path(code.co_filename).name}:{tb.tb_lineno} in {code.co_name}"


def _standard_level(levelno: int) -> int:
    for level in (logging.CRITICAL, logging.ERROR, logging.WARNING, logging.INFO):
        if levelno >= level:
            return level
    return logging.DEBUG


def configure_logging(
    log_format: str = "auto", level: str = "info", *, file: TextIO | None = None
) -> None:
    """Configure structlog for the process; ``auto`` means JSON unless the file is a terminal.

    Lines go to ``file``, standard output by default.

    The HTTP server's and the event loop's stdlib loggers write through it too
    (see :class:`ServerLogHandler`), and nowhere else.
    """
    out = sys.stdout if file is None else file
    if log_format == "auto":
        log_format = "console" if out.isatty() else "json"
    renderer: Any
    if log_format == "console":
        renderer = structlog.dev.ConsoleRenderer(colors=out.isatty())
    else:
        renderer = structlog.processors.JSONRenderer()
    timestamp = UtcTimestamp()
    _writer._file = out
    factory = LineWriterFactory(_writer)
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
    handler = ServerLogHandler()
    for name in SERVER_LOGGERS:
        stdlib_logger = logging.getLogger(name)
        for old in [h for h in stdlib_logger.handlers if isinstance(h, ServerLogHandler)]:
            stdlib_logger.removeHandler(old)
        stdlib_logger.addHandler(handler)
        # Not to the root logger's handlers either, nor to logging's last resort.
        stdlib_logger.propagate = False
        # memproxy's own request line is the access log: aiohttp's would only repeat it.
        stdlib_logger.setLevel(max(_LEVELS[level], logging.WARNING) if name == "aiohttp.access"
                               else _LEVELS[level])


def _ignore(line: dict[str, object]) -> None:
    pass
