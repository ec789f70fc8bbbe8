"""Server-sent-event clients on raw asyncio, for exact per-read timing.

Each stream is one connection with its own protocol object, so every socket
read is seen as it happens: a read that completes more than one event means
the events were coalesced somewhere on the way (the fake upstream writes each
event on its own, 10 ms apart). The upstream stamps each event with the
``CLOCK_MONOTONIC`` time it wrote it; this client reads the same clock, so the
delay of each event from upstream write to client read is known directly.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from typing import Any

from bench.harness import CLIENTS


@dataclass
class StreamResult:
    """What one stream saw; times are ``time.monotonic_ns()`` values."""

    user_id_expected: str
    sent_ns: int = 0
    status: int = 0
    echoed_user_id: str | None = None
    first_event_ns: int | None = None
    events: list[tuple[int, int]] = field(default_factory=list)  # (upstream write, client read)
    reads_with_events: int = 0
    coalesced_reads: int = 0
    complete: bool = False
    error: str | None = None


class SSEProtocol(asyncio.Protocol):
    """One streaming request and the parsing of its (possibly chunked) answer."""

    def __init__(self, request: bytes, result: StreamResult, done: asyncio.Future[None],
                 first_event: asyncio.Event | None = None) -> None:
        self.request = request
        self.result = result
        self.done = done
        self.first_event = first_event
        self.transport: asyncio.Transport | None = None
        self.head = bytearray()
        self.in_body = False
        self.chunked = False
        self.raw = bytearray()       # body bytes not yet de-chunked
        self.chunk_left = 0          # data bytes of the current chunk still to come
        self.skip = 0                # CRLF bytes after a chunk still to drop
        self.text = bytearray()      # de-chunked body not yet split into events

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.result.sent_ns = time.monotonic_ns()
        self.transport.write(self.request)  # type: ignore[union-attr]

    def data_received(self, data: bytes) -> None:
        now = time.monotonic_ns()
        if not self.in_body:
            self.head += data
            end = self.head.find(b"\r\n\r\n")
            if end < 0:
                return
            lines = bytes(self.head[:end]).decode("latin-1").split("\r\n")
            self.result.status = int(lines[0].split(" ", 2)[1])
            for line in lines[1:]:
                name, _, value = line.partition(":")
                name = name.strip().lower()
                if name == "x-echo-user-id":
                    self.result.echoed_user_id = value.strip()
                elif name == "transfer-encoding" and "chunked" in value.lower():
                    self.chunked = True
            data = bytes(self.head[end + 4:])
            self.in_body = True
        if self.chunked:
            self.raw += data
            self._dechunk()
        else:
            self.text += data
        self._events(now)

    def _dechunk(self) -> None:
        while self.raw:
            if self.skip:
                taken = min(self.skip, len(self.raw))
                del self.raw[:taken]
                self.skip -= taken
                continue
            if self.chunk_left:
                taken = min(self.chunk_left, len(self.raw))
                self.text += self.raw[:taken]
                del self.raw[:taken]
                self.chunk_left -= taken
                if not self.chunk_left:
                    self.skip = 2
                continue
            end = self.raw.find(b"\r\n")
            if end < 0:
                return
            size = int(bytes(self.raw[:end]).split(b";")[0], 16)
            del self.raw[:end + 2]
            if size == 0:
                self.result.complete = True
                self._finish()
                return
            self.chunk_left = size

    def _events(self, now: int) -> None:
        count = 0
        while (end := self.text.find(b"\n\n")) >= 0:
            event = bytes(self.text[:end])
            del self.text[:end + 2]
            for line in event.split(b"\n"):
                if line.startswith(b"data:"):
                    payload = json.loads(line[5:])
                    self.result.events.append((int(payload["t"]), now))
            count += 1
        if count:
            self.result.reads_with_events += 1
            if count > 1:
                self.result.coalesced_reads += 1
            if self.result.first_event_ns is None:
                self.result.first_event_ns = now
                if self.first_event is not None:
                    self.first_event.set()

    def _finish(self) -> None:
        if not self.done.done():
            self.done.set_result(None)
        if self.transport is not None:
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.chunked and self.in_body:
            self.result.complete = True
        if exc is not None and self.result.error is None and not self.result.complete:
            self.result.error = repr(exc)
        self._finish()


def build_request(port: int, path: str, user_agent: str, send_user_id: str | None) -> bytes:
    lines = [f"GET {path} HTTP/1.1", f"Host: 127.0.0.1:{port}", f"User-Agent: {user_agent}",
             "Accept: text/event-stream", "Authorization: Bearer sk-bench", "Connection: close"]
    if send_user_id is not None:
        lines.append(f"x-sm-user-id: {send_user_id}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


async def open_stream(port: int, path: str, index: int, direct: bool,
                      first_event: asyncio.Event | None = None
                      ) -> tuple[StreamResult, asyncio.Future[None], asyncio.Transport]:
    """Start one stream; returns its result, a future set when it ends, and its transport."""
    user_agent, user_id = CLIENTS[index % len(CLIENTS)]
    result = StreamResult(user_id_expected=user_id)
    loop = asyncio.get_running_loop()
    done: asyncio.Future[None] = loop.create_future()
    request = build_request(port, path, user_agent, user_id if direct else None)
    transport, _ = await loop.create_connection(
        lambda: SSEProtocol(request, result, done, first_event), "127.0.0.1", port)
    return result, done, transport


async def run_streams(port: int, *, streams: int, events: int, interval_ms: float,
                      direct: bool, timeout: float = 30.0) -> list[StreamResult]:
    """``streams`` concurrent streams of ``events`` events each.

    Stream starts are spread evenly over one event interval, so the streams'
    events interleave as independent clients' would instead of arriving in
    bursts of ``streams`` at once.
    """
    path = f"/sse?n={events}&interval_ms={interval_ms:g}"
    stagger = interval_ms / 1000 / max(1, streams)

    async def start(index: int) -> tuple[StreamResult, asyncio.Future[None], asyncio.Transport]:
        await asyncio.sleep(index * stagger)
        return await open_stream(port, path, index, direct)

    opened = await asyncio.gather(*(start(i) for i in range(streams)))
    try:
        await asyncio.wait_for(asyncio.gather(*(done for _, done, _ in opened)), timeout)
    except TimeoutError:
        pass
    finally:
        for result, done, transport in opened:
            transport.close()
            if not done.done() and result.error is None:
                result.error = "timed out"
    return [result for result, _, _ in opened]


def summarize(results: list[StreamResult], events: int) -> dict[str, Any]:
    """Raw per-stream figures, reduced to lists of microseconds and counters."""
    ttfb_us, delay_us, gap_us, mid_us = [], [], [], []
    errors = wrong_id = coalesced = reads = 0
    for r in results:
        if (r.status != 200 or r.error or len(r.events) != events or not r.complete
                or r.first_event_ns is None):
            errors += 1
        if r.echoed_user_id != r.user_id_expected:
            wrong_id += 1
        coalesced += r.coalesced_reads
        reads += r.reads_with_events
        if r.first_event_ns is not None:
            ttfb_us.append((r.first_event_ns - r.sent_ns) / 1000)
        for i, (written, read) in enumerate(r.events):
            delay_us.append((read - written) / 1000)
            if 3 <= i < events - 3:  # away from the stream's start and end
                mid_us.append((read - written) / 1000)
            if i:
                prev_written, prev_read = r.events[i - 1]
                gap_us.append(((read - prev_read) - (written - prev_written)) / 1000)
    return {"streams": len(results), "errors": errors, "wrong_id": wrong_id,
            "coalesced_reads": coalesced, "reads_with_events": reads,
            "ttfb_us": ttfb_us, "event_delay_us": delay_us, "added_gap_us": gap_us,
            "event_delay_mid_us": mid_us}


async def one_at_a_time(port: int, *, count: int, direct: bool) -> list[StreamResult]:
    """``count`` single-event streams, one after the other: the time to first event at rest."""
    results = []
    for index in range(count):
        result, done, transport = await open_stream(port, "/sse?n=1&interval_ms=10", index,
                                                    direct)
        try:
            await asyncio.wait_for(done, 10)
        except TimeoutError:
            result.error = "timed out"
        finally:
            transport.close()
        results.append(result)
    return results


async def hold_streams(port: int, count: int, *, batch: int = 50,
                       timeout: float = 60.0) -> tuple[list[StreamResult], list[asyncio.Transport]]:
    """Open ``count`` slow streams and return once each has received its first event.

    The streams stay open (the upstream sends one event a second) until the
    caller closes the returned transports.
    """
    path = "/sse?n=600&interval_ms=1000"
    results, transports = [], []
    deadline = time.monotonic() + timeout
    for start in range(0, count, batch):
        firsts = []
        for i in range(start, min(count, start + batch)):
            first = asyncio.Event()
            result, _, transport = await open_stream(port, path, i, direct=False,
                                                     first_event=first)
            results.append(result)
            transports.append(transport)
            firsts.append(first)
        left = max(0.1, deadline - time.monotonic())
        await asyncio.wait_for(asyncio.gather(*(f.wait() for f in firsts)), left)
    return results, transports


async def post_large(port: int, size: int, *, piece: int = 256 * 1024,
                     timeout: float = 120.0) -> dict[str, object]:
    """POST ``size`` bytes to ``/upload``; returns the status and the bytes the upstream saw."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    started = time.monotonic()
    try:
        writer.write(f"POST /upload HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
                     f"User-Agent: curl/8.5.0\r\nContent-Type: application/octet-stream\r\n"
                     f"Content-Length: {size}\r\nConnection: close\r\n\r\n".encode())
        chunk = b"x" * piece
        sent = 0
        while sent < size:
            part = chunk if size - sent >= piece else chunk[:size - sent]
            writer.write(part)
            await writer.drain()
            sent += len(part)
        answer = await asyncio.wait_for(reader.read(), timeout)
    finally:
        writer.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1]) if head else 0
    try:
        seen = json.loads(body)["bytes"]
    except (ValueError, KeyError, TypeError):
        seen = None
    return {"status": status, "upstream_bytes": seen, "seconds": time.monotonic() - started}
