"""A minimal HTTP/1.1 server on raw asyncio for the benchmark's slow endpoints.

The benchmark's upstream nginx answers the plain POST itself and passes two
paths on to this server:

- ``/sse?n=20&interval_ms=10``: a ``text/event-stream`` of ``n`` events,
  ``interval_ms`` apart on an absolute schedule. Each event carries its index
  and the ``CLOCK_MONOTONIC`` time it was written, so a client on the same
  machine can compute per-event delivery delays.
- ``/upload``: reads the whole request body (``Content-Length`` or chunked)
  and answers ``{"bytes": N}``.

Both echo the ``x-sm-user-id`` and ``User-Agent`` they received as
``x-echo-user-id`` and ``x-echo-ua``. Any other path gets a small JSON answer.

Run: ``python -m bench.sse_upstream PORT``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
import time
from urllib.parse import parse_qs, urlsplit

import uvloop

SMALL_ANSWER = b'{"id":"bench","object":"chat.completion","choices":[]}'


class Request:
    """One parsed request head."""

    __slots__ = ("headers", "method", "target")

    def __init__(self, head: bytes) -> None:
        lines = head.decode("latin-1").split("\r\n")
        self.method, self.target, _ = lines[0].split(" ", 2)
        self.headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            self.headers[name.strip().lower()] = value.strip()


class Connection(asyncio.Protocol):
    """One client connection: parse requests one after another, answer each."""

    def __init__(self) -> None:
        self.buffer = bytearray()
        self.transport: asyncio.Transport | None = None
        self.request: Request | None = None
        self.body_left = 0          # Content-Length bytes still to read
        self.chunked = False
        self.body_bytes = 0
        self.task: asyncio.Task[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        if self.task is not None:
            self.task.cancel()

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        self._advance()

    def _advance(self) -> None:
        while True:
            if self.request is None:
                end = self.buffer.find(b"\r\n\r\n")
                if end < 0:
                    return
                self.request = Request(bytes(self.buffer[:end]))
                del self.buffer[:end + 4]
                self.body_bytes = 0
                self.chunked = "chunked" in self.request.headers.get("transfer-encoding", "")
                self.body_left = int(self.request.headers.get("content-length", "0") or 0)
            if self.chunked:
                if not self._read_chunks():
                    return
            else:
                take = min(self.body_left, len(self.buffer))
                del self.buffer[:take]
                self.body_left -= take
                self.body_bytes += take
                if self.body_left:
                    return
            request, self.request = self.request, None
            self._answer(request)
            if self.task is not None:
                return  # a stream owns the connection until it ends

    def _read_chunks(self) -> bool:
        """Consume chunked body data; True once the last chunk has been read."""
        while True:
            if self.body_left:  # the rest of a chunk's data and its CRLF
                take = min(self.body_left, len(self.buffer))
                del self.buffer[:take]
                self.body_left -= take
                if self.body_left:
                    return False
            end = self.buffer.find(b"\r\n")
            if end < 0:
                return False
            size = int(bytes(self.buffer[:end]).split(b";")[0], 16)
            if size == 0:
                last = self.buffer.find(b"\r\n\r\n", end)  # after any trailers
                if last < 0:
                    return False
                del self.buffer[:last + 4]
                return True
            del self.buffer[:end + 2]
            self.body_bytes += size
            self.body_left = size + 2

    def _head(self, request: Request, status: str, extra: list[str]) -> bytes:
        lines = [f"HTTP/1.1 {status}",
                 f"x-echo-user-id: {request.headers.get('x-sm-user-id', '')}",
                 f"x-echo-ua: {request.headers.get('user-agent', '')}", *extra]
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")

    def _answer(self, request: Request) -> None:
        assert self.transport is not None
        url = urlsplit(request.target)
        if url.path == "/sse":
            query = parse_qs(url.query)
            count = int(query.get("n", ["20"])[0])
            interval = float(query.get("interval_ms", ["10"])[0]) / 1000
            self.transport.write(self._head(request, "200 OK", [
                "Content-Type: text/event-stream", "Cache-Control: no-cache",
                "Transfer-Encoding: chunked"]))
            self.task = asyncio.get_running_loop().create_task(self._stream(count, interval))
            return
        body = (json.dumps({"bytes": self.body_bytes}).encode() if url.path == "/upload"
                else SMALL_ANSWER)
        self.transport.write(self._head(request, "200 OK", [
            "Content-Type: application/json", f"Content-Length: {len(body)}"]) + body)

    async def _stream(self, count: int, interval: float) -> None:
        start = time.monotonic()
        try:
            for index in range(count):
                delay = start + index * interval - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                if self.transport is None:
                    return
                event = b'data: {"i":%d,"t":%d}\n\n' % (index, time.monotonic_ns())
                self.transport.write(b"%x\r\n%s\r\n" % (len(event), event))
            if self.transport is not None:
                self.transport.write(b"0\r\n\r\n")
        finally:
            self.task = None
        if self.buffer and self.transport is not None:
            self._advance()


async def serve(port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(Connection, "127.0.0.1", port, backlog=4096)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        uvloop.run(serve(int(sys.argv[1])))
