"""The hot path: decide the user, rewrite a few headers, relay everything else.

The request body goes to LiteLLM byte for byte (small bodies in one piece,
large or chunked ones streamed through), and the response comes back the
same way: small complete bodies in one write, streams chunk by chunk as they
arrive. Only hop-by-hop headers and the headers memproxy owns are touched.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator, Callable, Sequence
from typing import TYPE_CHECKING, Protocol

import aiohttp
import structlog
from aiohttp import hdrs, web
from multidict import CIMultiDict
from yarl import URL

from memproxy.config import Settings
from memproxy.detection import DetectorChain
from memproxy.detectors.api_key_hash import LITELLM_KEY_HEADERS
from memproxy.errors import Dialect, dialect_of, error_response, stream_error_event
from memproxy.key_problems import key_problem
from memproxy.memory import MEMORIES_HEADER, InvalidMemoryMode
from memproxy.observers import RequestObserver, RequestRecord
from memproxy.routing import (
    Refusal,
    Route,
    RoutingPolicy,
    client_request,
    strip_hop_by_hop,
)

if TYPE_CHECKING:
    from memproxy.memory.stage import MemoryStage, Turn

# Bodies up to this size are read whole: one write is cheaper than a stream.
SMALL_BODY = 1024 * 1024
# With memory on, bodies up to this size are read whole too, so that long conversations
# (an agent's history passes a megabyte) still get recall and capture.
MEMORY_BODY = 32 * 1024 * 1024
# Headers that tell the client which memory space its request landed in.
USER_ID_RESPONSE_HEADER = "x-memproxy-user-id"
DETECTOR_RESPONSE_HEADER = "x-memproxy-detector"
RETRY_AFTER_SECONDS = "2"
# The one expectation memproxy meets itself (RFC 9110, section 10.1.1).
CONTINUE = "100-continue"


#: The one upstream ClientSession, open for the application's whole life.
CLIENT_SESSION = web.AppKey("client_session", aiohttp.ClientSession)


class Gauge(Protocol):
    """A live count (the metrics' ``streams_open``)."""

    def inc(self) -> None: ...

    def dec(self) -> None: ...


class BodyTooLarge(Exception):
    """The client's body went past ``max_body_size`` while it was streamed."""


class BodyTimeout(Exception):
    """The client went silent for longer than ``timeouts.request_body`` inside its body."""


class Forwarder:
    """Relays one request to LiteLLM and its answer back; one instance per application."""

    def __init__(
        self,
        settings: Settings,
        chain: DetectorChain,
        *,
        observers: Sequence[RequestObserver] = (),
        open_streams: Gauge | None = None,
        unavailable: Callable[[], str | None] | None = None,
        memory: MemoryStage | None = None,
    ) -> None:
        """``observers`` get each finished request's record, in order;
        ``unavailable``, when memproxy runs LiteLLM itself, says why LiteLLM
        cannot take requests right now, so clients get a quick 503, not a hang."""
        self.upstream = settings.litellm_url
        self.configure(settings, chain)
        self.observers = tuple(observers)
        self.open_streams = open_streams
        self.unavailable = unavailable
        #: Recall and capture, when memproxy keeps memory itself.
        self.memory = memory
        #: Requests being handled right now (a graceful shutdown waits for them).
        self.in_flight = 0
        self._stopping = False

    def configure(self, settings: Settings, chain: DetectorChain) -> None:
        """Take up a (re)loaded config: the routing policy and the limits.

        No ``await`` in here, so a request sees either the old config or the
        new one, never a mix. The LiteLLM URL, the listen address and the
        timeouts belong to the running server and need a restart.
        """
        self.policy = RoutingPolicy(settings, chain)
        self.settings = settings
        self.max_body_size = settings.max_body_size

    def stopping(self) -> None:
        """memproxy is shutting down: requests cut from now on are cut by the shutdown."""
        self._stopping = True

    async def handle(self, request: web.Request) -> web.StreamResponse:
        started = time.perf_counter()
        request_id = request.headers.get("x-request-id") or os.urandom(8).hex()
        # Every line logged while this request is handled (a failing detector, ...)
        # carries its id; aiohttp runs each request in a task of its own context.
        structlog.contextvars.bind_contextvars(request_id=request_id)
        path = request.path
        dialect = dialect_of(path, request.headers)
        record = RequestRecord(request_id, request.method, path, request.headers)
        response: web.StreamResponse | None = None
        self.in_flight += 1
        try:
            response = await self._forward(request, dialect, record)
            return response
        except asyncio.CancelledError:
            if self._stopping:
                record.error = record.error or "cut short: memproxy was shutting down"
            else:
                record.status = 499  # the client went away; nginx's code for it
                record.error = record.error or "client disconnected"
            raise
        finally:
            self.in_flight -= 1
            if record.status is None and response is not None:
                record.status = response.status
            record.duration_ms = round((time.perf_counter() - started) * 1000, 3)
            for observer in self.observers:
                observer.request_done(record)

    async def _forward(
        self, request: web.Request, dialect: Dialect, record: RequestRecord
    ) -> web.StreamResponse:
        if not request.raw_path.startswith("/"):
            # absolute-form ("GET http://host/") or CONNECT: memproxy only ever talks to
            # LiteLLM, so it is not a forward proxy for anywhere else.
            record.error = "not an origin-form request target"
            return error_response(dialect, 400, "memproxy only forwards paths to LiteLLM; "
                                  "send requests with a path such as /v1/chat/completions",
                                  "invalid_request_target")
        policy = self.policy
        headers, client = client_request(request.headers, path=request.path,
                                         query_string=request.query_string,
                                         remote=request.remote)
        try:
            route = policy.route(client)
        except Refusal as exc:
            record.error = exc.code
            return error_response(dialect, exc.status, str(exc), exc.code)
        record.user_id = route.user_id
        record.detector = route.decision.detector
        record.ids_from_config = route.decision.ids_from_config
        record.unrecognised = route.decision.fallback

        if self.unavailable is not None and (why := self.unavailable()) is not None:
            record.error = why
            return error_response(dialect, 503, f"{why}; retry in a few seconds",
                                  "upstream_unavailable",
                                  headers={hdrs.RETRY_AFTER: RETRY_AFTER_SECONDS})

        length = request.content_length
        if length is not None and length > self.max_body_size:
            record.error = "body too large"
            return self._too_large(dialect)

        policy.rewrite_headers(headers, route)
        if hdrs.EXPECT in headers:
            # LiteLLM gets the expectations memproxy does not know; 100-continue is
            # between memproxy and the client (see _send_continue).
            kept = [v for v in headers.getall(hdrs.EXPECT) if v.strip().lower() != CONTINUE]
            del headers[hdrs.EXPECT]
            for value in kept:
                headers.add(hdrs.EXPECT, value)

        body: bytes | AsyncIterator[bytes] | None
        if not request.body_exists:
            body = None
            record.bytes_in = 0
        elif length is not None and (length <= SMALL_BODY or (
                length <= MEMORY_BODY and self.memory is not None
                and route.user_id is not None)):
            try:
                body = await self._read_small_body(request)
            except BodyTimeout:
                record.error = "client body timeout"
                return self._too_slow(dialect)
            record.bytes_in = len(body)
        else:
            body = self._stream_body(request, record)

        turn = None
        if self.memory is not None and route.user_id is not None and isinstance(body, bytes):
            try:
                turn = await self._memory_turn(request, route, headers, body)
            except InvalidMemoryMode as exc:
                record.error = "invalid_memory_mode"
                return error_response(dialect, 400, str(exc), "invalid_memory_mode")
            if turn is not None:
                record.memories = turn.injected
                if turn.body is not body:
                    body = turn.body
                    del headers[hdrs.CONTENT_LENGTH]  # the client session sets the new one

        url = URL(self.upstream + request.raw_path, encoded=True)
        upstream_started = time.perf_counter()
        try:
            upstream = await request.app[CLIENT_SESSION].request(
                request.method, url, headers=headers, data=body, allow_redirects=False,
            )
        except BodyTooLarge:
            record.error = "body too large"
            return self._too_large(dialect)
        except aiohttp.ClientConnectorError as exc:
            record.error = f"connect: {exc.os_error.strerror or exc.os_error!r}"
            return error_response(
                dialect, 502, f"memproxy cannot reach LiteLLM at {self.upstream}: "
                f"{exc.os_error.strerror or 'connection failed'}. Is LiteLLM running?",
                "upstream_unreachable",
            )
        except TimeoutError:
            record.error = "upstream timeout"
            return error_response(
                dialect, 504, "LiteLLM did not answer in time", "upstream_timeout",
            )
        except aiohttp.ClientError as exc:
            if _caused_by(exc, BodyTooLarge):
                record.error = "body too large"
                return self._too_large(dialect)
            if _caused_by(exc, BodyTimeout):  # aiohttp has dropped the upstream connection
                record.error = "client body timeout"
                return self._too_slow(dialect)
            record.error = f"upstream: {type(exc).__name__}"
            return error_response(
                dialect, 502, f"LiteLLM closed the connection before answering "
                f"({type(exc).__name__})", "upstream_failed",
            )

        try:
            record.upstream_ms = round((time.perf_counter() - upstream_started) * 1000, 3)
            return await self._relay(request, upstream, route, dialect, record,
                                     upstream_started, turn)
        finally:
            upstream.release()

    async def _memory_turn(self, request: web.Request, route: Route, headers: CIMultiDict[str],
                           body: bytes) -> Turn | None:
        """Recall into the request and prepare the capture of its answer, if it gets memory."""
        assert self.memory is not None and route.user_id is not None
        found = self.memory.applies(request.method, request.path, request.headers,
                                    unrecognised=route.decision.fallback)
        if found is None or not body:
            return None
        return await self.memory.before(
            *found, body, user_id=route.user_id,
            conversation=headers.get(self.policy.injected.conversation_id),
            client=route.decision.detector,
            user_agent=request.headers.get(hdrs.USER_AGENT, ""))

    def _too_large(self, dialect: Dialect) -> web.Response:
        return error_response(
            dialect, 413, f"request body is larger than memproxy's limit of "
            f"{self.max_body_size} bytes (memproxy.max_body_size)", "request_too_large",
        )

    def _too_slow(self, dialect: Dialect) -> web.Response:
        response = error_response(
            dialect, 408, f"the request body stalled for more than "
            f"{self.settings.timeouts.request_body:g} seconds "
            f"(memproxy.timeouts.request_body)", "request_timeout",
        )
        response.force_close()  # the rest of the body is not worth waiting for
        return response

    async def expect(self, request: web.Request) -> None:
        """aiohttp's ``Expect`` hook, which does nothing: ``_forward`` deals with Expect.

        aiohttp's own hook answers 100-continue before memproxy has looked at the
        request, and refuses every other expectation.
        """

    async def _send_continue(self, request: web.Request) -> None:
        """Tell a client that waits with ``Expect: 100-continue`` to send its body now.

        Called only once memproxy will take the body: a client refused earlier
        never sends it.
        """
        if request.version >= aiohttp.HttpVersion11 and any(
                value.strip().lower() == CONTINUE
                for value in request.headers.getall(hdrs.EXPECT, ())):
            await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            # An interim answer: for aiohttp the response has not begun.
            request.writer.output_size = 0

    async def _read_small_body(self, request: web.Request) -> bytes:
        """A body with a small Content-Length, whole; see :meth:`_next_chunk` for stalls."""
        content = request.content
        if content.is_eof():
            # It came with the head, as small bodies usually do: no timer needed.
            return content.read_nowait()
        await self._send_continue(request)
        chunks = []
        while chunk := await self._next_chunk(request):
            chunks.append(chunk)
        return b"".join(chunks)

    async def _next_chunk(self, request: web.Request) -> bytes:
        """The client's next body bytes, ``b""`` at the end.

        Raises :class:`BodyTimeout` when none come for ``timeouts.request_body``
        seconds, so a client that stalls cannot hold memproxy and LiteLLM open.
        """
        try:
            async with asyncio.timeout(self.settings.timeouts.request_body):
                return await request.content.readany()
        except TimeoutError:
            raise BodyTimeout() from None

    async def _stream_body(
        self, request: web.Request, record: RequestRecord
    ) -> AsyncIterator[bytes]:
        await self._send_continue(request)
        seen = 0
        while chunk := await self._next_chunk(request):
            seen += len(chunk)
            record.bytes_in = seen
            if seen > self.max_body_size:
                raise BodyTooLarge()
            yield chunk

    async def _relay(
        self,
        request: web.Request,
        upstream: aiohttp.ClientResponse,
        route: Route,
        dialect: Dialect,
        record: RequestRecord,
        upstream_started: float,
        turn: Turn | None,
    ) -> web.StreamResponse:
        headers = strip_hop_by_hop(upstream.headers)
        if route.user_id is not None:
            headers[USER_ID_RESPONSE_HEADER] = route.user_id
            headers[DETECTOR_RESPONSE_HEADER] = route.decision.detector
        if turn is not None and turn.injected:
            headers[MEMORIES_HEADER] = str(turn.injected)
        record.status = upstream.status
        length = upstream.content_length
        content_type = upstream.headers.get(hdrs.CONTENT_TYPE, "")
        is_event_stream = content_type.startswith("text/event-stream")

        if (length is not None and length <= SMALL_BODY and not is_event_stream
                and request.method != "HEAD"):
            try:
                body = await upstream.read()
            except (aiohttp.ClientError, TimeoutError) as exc:
                # Nothing has reached the client yet, so it can still get a clean error.
                record.error = f"upstream body: {type(exc).__name__}"
                record.status = 502
                return error_response(dialect, 502, "LiteLLM failed while sending its answer",
                                      "upstream_failed")
            del headers[hdrs.CONTENT_LENGTH]
            record.first_byte_ms = round((time.perf_counter() - upstream_started) * 1000, 3)
            record.bytes_out = len(body)
            record.streamed = False
            if upstream.status >= 400:
                record.key_problem = key_problem(
                    upstream.status, body,
                    sent_key=any(name in request.headers for name in LITELLM_KEY_HEADERS))
            if turn is not None:
                turn.feed(body)
                turn.finish(upstream.status, complete=True)
            return web.Response(status=upstream.status, reason=upstream.reason,
                                body=body, headers=headers)

        if is_event_stream:
            headers["X-Accel-Buffering"] = "no"
        response = web.StreamResponse(status=upstream.status, reason=upstream.reason,
                                      headers=headers)
        record.streamed = True
        await response.prepare(request)
        sent = 0
        if self.open_streams is not None:
            self.open_streams.inc()
        try:
            async for chunk in upstream.content.iter_any():
                if not sent:
                    record.first_byte_ms = round(
                        (time.perf_counter() - upstream_started) * 1000, 3)
                await response.write(chunk)
                sent += len(chunk)
                if turn is not None:
                    turn.feed(chunk)
        except (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError, TimeoutError) as exc:
            record.error = f"upstream failed mid-stream: {type(exc).__name__}"
            record.bytes_out = sent
            if isinstance(exc, aiohttp.ClientConnectionResetError) and request.transport is None:
                record.error = "client disconnected mid-stream"
                record.status = 499
                return response
            if is_event_stream:
                await response.write(stream_error_event(
                    dialect, "the stream from LiteLLM broke off before it was complete"))
                await response.write_eof()
            else:
                # Close without the final chunk, so the client sees a truncated body
                # rather than one that looks complete.
                if request.transport is not None:
                    request.transport.close()
            return response
        finally:
            if self.open_streams is not None:
                self.open_streams.dec()
            if turn is not None:
                # Also when the client hung up (which cancels this handler) as soon as it
                # had the whole answer: the reader keeps only an answer that says it ended.
                turn.finish(upstream.status, complete=True)
        record.bytes_out = sent
        await response.write_eof()
        return response


def _caused_by(exc: BaseException, kind: type[BaseException]) -> bool:
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, kind):
            return True
        seen = seen.__cause__ or seen.__context__
    return False
