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
from collections.abc import AsyncIterator, Callable

import aiohttp
import structlog
from aiohttp import hdrs, web
from yarl import URL

from memproxy.activity import ActivityWindow
from memproxy.config import Settings
from memproxy.detection import DetectorChain
from memproxy.errors import Dialect, dialect_of, error_response, stream_error_event
from memproxy.inbox import UnmatchedInbox
from memproxy.logs import log_request
from memproxy.metrics import Metrics, succeeded
from memproxy.routing import (
    UNIDENTIFIED,
    Refusal,
    Route,
    RoutingPolicy,
    client_request,
    strip_hop_by_hop,
)

# Bodies up to this size are read whole: one write is cheaper than a stream.
SMALL_BODY = 1024 * 1024
# Headers that tell the client which memory space its request landed in.
USER_ID_RESPONSE_HEADER = "x-memproxy-user-id"
DETECTOR_RESPONSE_HEADER = "x-memproxy-detector"
RETRY_AFTER_SECONDS = "2"
# The one expectation memproxy meets itself (RFC 9110, section 10.1.1).
CONTINUE = "100-continue"


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
        metrics: Metrics | None = None,
        inbox: UnmatchedInbox | None = None,
        activity: ActivityWindow | None = None,
    ) -> None:
        self.upstream = settings.litellm_url
        self.configure(settings, chain)
        self.metrics = metrics
        self.inbox = inbox
        self.activity = activity
        self.session: aiohttp.ClientSession | None = None
        #: Set when memproxy runs LiteLLM itself: says why LiteLLM cannot take
        #: requests right now, so clients get a quick 503 instead of a hang.
        self.unavailable: Callable[[], str | None] | None = None

    def configure(self, settings: Settings, chain: DetectorChain) -> None:
        """Take up a (re)loaded config: the routing policy and the limits.

        No ``await`` in here, so a request sees either the old config or the
        new one, never a mix. The LiteLLM URL, the listen address and the
        timeouts belong to the running server and need a restart.
        """
        self.policy = RoutingPolicy(settings, chain)
        self.settings = settings
        self.max_body_size = settings.max_body_size

    def _observe(self, line: dict[str, object], request: web.Request) -> None:
        if self.metrics is not None:
            self.metrics.observe(line)
        detector = line.get("detector")
        if self.inbox is not None and detector in UNIDENTIFIED:
            self.inbox.record(request.headers)
        if self.activity is not None and detector is not None:
            user_id = line.get("user_id")
            label = (self.metrics.user_ids.label(user_id, str(detector),
                                                 admit=succeeded(line.get("status")))
                     if self.metrics is not None and isinstance(user_id, str) else
                     str(user_id) if user_id is not None else "none")
            self.activity.record(label)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        started = time.perf_counter()
        request_id = request.headers.get("x-request-id") or os.urandom(8).hex()
        # Every line logged while this request is handled (a failing detector, ...)
        # carries its id; aiohttp runs each request in a task of its own context.
        structlog.contextvars.bind_contextvars(request_id=request_id)
        path = request.path
        dialect = dialect_of(path, request.headers)
        line: dict[str, object] = {
            "request_id": request_id, "method": request.method, "path": path,
        }
        response: web.StreamResponse | None = None
        try:
            response = await self._forward(request, dialect, line)
            return response
        except asyncio.CancelledError:
            line["status"] = 499  # the client went away; nginx's code for it
            line.setdefault("error", "client disconnected")
            raise
        finally:
            if "status" not in line and response is not None:
                line["status"] = response.status
            line["duration_ms"] = round((time.perf_counter() - started) * 1000, 3)
            log_request(line)
            self._observe(line, request)

    async def _forward(
        self, request: web.Request, dialect: Dialect, line: dict[str, object]
    ) -> web.StreamResponse:
        if not request.raw_path.startswith("/"):
            # absolute-form ("GET http://host/") or CONNECT: memproxy only ever talks to
            # LiteLLM, so it is not a forward proxy for anywhere else.
            line["error"] = "not an origin-form request target"
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
            line["error"] = exc.code
            return error_response(dialect, exc.status, str(exc), exc.code)
        line["user_id"] = route.user_id
        line["detector"] = route.decision.detector

        if self.unavailable is not None and (why := self.unavailable()) is not None:
            line["error"] = why
            return error_response(dialect, 503, f"{why}; retry in a few seconds",
                                  "upstream_unavailable",
                                  headers={hdrs.RETRY_AFTER: RETRY_AFTER_SECONDS})

        length = request.content_length
        if length is not None and length > self.max_body_size:
            line["error"] = "body too large"
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
            line["bytes_in"] = 0
        elif length is not None and length <= SMALL_BODY:
            await self._send_continue(request)
            chunks = []
            try:
                while chunk := await self._next_chunk(request):
                    chunks.append(chunk)
            except BodyTimeout:
                line["error"] = "client body timeout"
                return self._too_slow(dialect)
            body = b"".join(chunks)
            line["bytes_in"] = len(body)
        else:
            body = self._stream_body(request, line)

        url = URL(self.upstream + request.raw_path, encoded=True)
        assert self.session is not None, "the client session starts with the application"
        upstream_started = time.perf_counter()
        try:
            upstream = await self.session.request(
                request.method, url, headers=headers, data=body, allow_redirects=False,
            )
        except BodyTooLarge:
            line["error"] = "body too large"
            return self._too_large(dialect)
        except aiohttp.ClientConnectorError as exc:
            line["error"] = f"connect: {exc.os_error.strerror or exc.os_error!r}"
            return error_response(
                dialect, 502, f"memproxy cannot reach LiteLLM at {self.upstream}: "
                f"{exc.os_error.strerror or 'connection failed'}. Is LiteLLM running?",
                "upstream_unreachable",
            )
        except TimeoutError:
            line["error"] = "upstream timeout"
            return error_response(
                dialect, 504, "LiteLLM did not answer in time", "upstream_timeout",
            )
        except aiohttp.ClientError as exc:
            if _caused_by(exc, BodyTooLarge):
                line["error"] = "body too large"
                return self._too_large(dialect)
            if _caused_by(exc, BodyTimeout):  # aiohttp has dropped the upstream connection
                line["error"] = "client body timeout"
                return self._too_slow(dialect)
            line["error"] = f"upstream: {type(exc).__name__}"
            return error_response(
                dialect, 502, f"LiteLLM closed the connection before answering "
                f"({type(exc).__name__})", "upstream_failed",
            )

        try:
            line["upstream_ms"] = round((time.perf_counter() - upstream_started) * 1000, 3)
            return await self._relay(request, upstream, route,
                                     dialect, line, upstream_started)
        finally:
            upstream.release()

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
        self, request: web.Request, line: dict[str, object]
    ) -> AsyncIterator[bytes]:
        await self._send_continue(request)
        seen = 0
        while chunk := await self._next_chunk(request):
            seen += len(chunk)
            line["bytes_in"] = seen
            if seen > self.max_body_size:
                raise BodyTooLarge()
            yield chunk

    async def _relay(
        self,
        request: web.Request,
        upstream: aiohttp.ClientResponse,
        route: Route,
        dialect: Dialect,
        line: dict[str, object],
        upstream_started: float,
    ) -> web.StreamResponse:
        headers = strip_hop_by_hop(upstream.headers)
        if route.user_id is not None:
            headers[USER_ID_RESPONSE_HEADER] = route.user_id
            headers[DETECTOR_RESPONSE_HEADER] = route.decision.detector
        line["status"] = upstream.status
        length = upstream.content_length
        content_type = upstream.headers.get(hdrs.CONTENT_TYPE, "")
        is_event_stream = content_type.startswith("text/event-stream")

        if (length is not None and length <= SMALL_BODY and not is_event_stream
                and request.method != "HEAD"):
            try:
                body = await upstream.read()
            except (aiohttp.ClientError, TimeoutError) as exc:
                # Nothing has reached the client yet, so it can still get a clean error.
                line["error"] = f"upstream body: {type(exc).__name__}"
                line["status"] = 502
                return error_response(dialect, 502, "LiteLLM failed while sending its answer",
                                      "upstream_failed")
            del headers[hdrs.CONTENT_LENGTH]
            line["first_byte_ms"] = round((time.perf_counter() - upstream_started) * 1000, 3)
            line["bytes_out"] = len(body)
            line["streamed"] = False
            return web.Response(status=upstream.status, reason=upstream.reason,
                                body=body, headers=headers)

        if is_event_stream:
            headers["X-Accel-Buffering"] = "no"
        response = web.StreamResponse(status=upstream.status, reason=upstream.reason,
                                      headers=headers)
        line["streamed"] = True
        await response.prepare(request)
        sent = 0
        if self.metrics is not None:
            self.metrics.streams_open.inc()
        try:
            async for chunk in upstream.content.iter_any():
                if not sent:
                    line["first_byte_ms"] = round(
                        (time.perf_counter() - upstream_started) * 1000, 3)
                await response.write(chunk)
                sent += len(chunk)
        except (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError, TimeoutError) as exc:
            line["error"] = f"upstream failed mid-stream: {type(exc).__name__}"
            line["bytes_out"] = sent
            if isinstance(exc, aiohttp.ClientConnectionResetError) and request.transport is None:
                line["error"] = "client disconnected mid-stream"
                line["status"] = 499
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
            if self.metrics is not None:
                self.metrics.streams_open.dec()
        line["bytes_out"] = sent
        await response.write_eof()
        return response


def _caused_by(exc: BaseException, kind: type[BaseException]) -> bool:
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, kind):
            return True
        seen = seen.__cause__ or seen.__context__
    return False
