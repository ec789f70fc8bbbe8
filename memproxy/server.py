"""The HTTP server memproxy listens with: aiohttp's, with limits on each request head.

aiohttp bounds each header line and the number of headers, but not a head as a
whole (128 fields of ``max_field_size`` each is megabytes), and it gives a client
all the time it wants to finish one. A few clients that send half a head and stop
hold memory and file descriptors for as long as they like. Here each head gets a
deadline, counted from its first byte, and a size cap over the request line and
all headers together.

aiohttp has no public hook for either (checked up to aiohttp 3.14), so this
module subclasses its ``RequestHandler`` and reads two of its private attributes
(``_messages``, the parsed requests not yet handled, and
``_request_in_progress``), and swaps the handler class in through
``AppRunner._make_server``, the runner's factory hook, with the handler arguments
aiohttp keeps in ``Server._kwargs``. All of it is confined to this module. The
keep-alive and body timeouts need none of it: see :mod:`memproxy.app` and
:mod:`memproxy.forwarding`.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

import structlog
from aiohttp import StreamReader, web
from aiohttp.web_protocol import RequestHandler

from memproxy.errors import Dialect, error_body

log = structlog.get_logger("memproxy")

# The blank line that ends a request head.
_HEAD_END = b"\r\n\r\n"


@dataclass(frozen=True, slots=True)
class HeadLimits:
    """How long a client may take over a request line and headers, and how many bytes."""

    timeout: float
    max_size: int


class LimitedRequestHandler(RequestHandler):
    """aiohttp's connection handler, with a deadline and a size cap for every request head.

    Bytes count as head bytes unless they belong to the body of the last request
    parsed. The cap is exact when a head arrives on its own; bytes that share a
    read with the end of a body or of an earlier head are not counted (a read is
    at most 256 KiB, so this is slack, not a way around the cap).
    """

    __slots__ = ("_body", "_head_bytes", "_head_tail", "_head_timer", "_limits")

    def __init__(self, manager: web.Server, *, limits: HeadLimits, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._limits = limits
        self._head_bytes = 0
        self._head_tail = b""  # the last bytes counted, for a blank line split across reads
        self._head_timer: asyncio.TimerHandle | None = None
        self._body: StreamReader | None = None

    def data_received(self, data: bytes) -> None:
        in_head = bool(data) and self.transport is not None and (
            self._body is None or self._body.is_eof())
        # Checked before aiohttp's parser buffers the bytes; a read that is under the cap
        # as a whole (most are) needs no search for the head's end.
        if in_head and self._head_bytes + len(data) > self._limits.max_size \
                and self._head_size(data) > self._limits.max_size:
            self._refuse(431, "request_headers_too_large",
                         f"the request line and headers are larger than memproxy's limit "
                         f"of {self._limits.max_size} bytes (memproxy.max_header_size)")
            return
        parsed = len(self._messages)
        super().data_received(data)
        if len(self._messages) > parsed:
            self._end_head()
            payload = self._messages[-1][1]
            self._body = None if payload.is_eof() else payload
        elif in_head:
            self._head_bytes += len(data)
            self._head_tail = (self._head_tail + data)[-3:]
            # A head that arrives in one read, as most do, never needs the timer.
            if self._head_timer is None and self._idle():
                # No longer idle: keep_alive() also cancels aiohttp's idle timer, which
                # aiohttp sets again once this request has been answered.
                self.keep_alive(True)
                self._head_timer = asyncio.get_running_loop().call_later(
                    self._limits.timeout, self._head_timed_out)

    def connection_lost(self, exc: BaseException | None) -> None:
        self._end_head()
        super().connection_lost(exc)

    def _head_size(self, data: bytes) -> int:
        """The size of the head so far, with ``data`` counted up to a blank line in it."""
        seen = self._head_tail + data
        end = seen.find(_HEAD_END)
        return self._head_bytes + (len(data) if end < 0 else
                                   end + len(_HEAD_END) - len(self._head_tail))

    def _idle(self) -> bool:
        """Whether no request on this connection is waiting for its answer."""
        return not self._request_in_progress and not self._messages

    def _end_head(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        self._head_bytes = 0
        self._head_tail = b""

    def _head_timed_out(self) -> None:
        self._head_timer = None
        self._refuse(408, "request_timeout",
                     f"the request line and headers did not arrive within "
                     f"{self._limits.timeout:g} seconds (memproxy.timeouts.request_head)")

    def _refuse(self, status: int, code: str, message: str) -> None:
        """Answer ``status`` and close: the request never got far enough to be handled."""
        self._end_head()
        log.info("request_refused", status=status, error=code)
        # An answer written while an earlier request's response is under way would land
        # inside that response; then the connection is only closed.
        if self.transport is not None and self._idle():
            body = json.dumps(error_body(Dialect.OPENAI, status, message, code)).encode()
            self.transport.write(
                f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\n"
                f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
                f"Connection: close\r\n\r\n".encode() + body)
        self.force_close()


class LimitedServer(web.Server):
    """aiohttp's low-level server, serving each connection with a LimitedRequestHandler.

    ``made`` is the server aiohttp built for the application: its request
    handler, request factory and handler arguments (the application's
    ``handler_args`` among them) carry over unchanged.
    """

    def __init__(self, made: web.Server, limits: HeadLimits) -> None:
        super().__init__(made.request_handler, request_factory=made.request_factory,
                         handler_cancellation=made.handler_cancellation, **made._kwargs)
        self.limits = limits

    def __call__(self) -> RequestHandler:
        return LimitedRequestHandler(self, loop=self._loop, limits=self.limits, **self._kwargs)


class LimitedAppRunner(web.AppRunner):
    """An AppRunner whose server enforces ``limits`` on every request head."""

    __slots__ = ("_limits",)

    def __init__(self, app: web.Application, *, limits: HeadLimits, **kwargs: Any) -> None:
        super().__init__(app, **kwargs)
        self._limits = limits

    async def _make_server(self) -> web.Server:
        return LimitedServer(await super()._make_server(), self._limits)
