"""The hot path: decide the user, rewrite a few headers, relay everything else.

The request body goes to LiteLLM byte for byte (small bodies in one piece,
large or chunked ones streamed through), and the response comes back the
same way: small complete bodies in one write, streams chunk by chunk as they
arrive. Only hop-by-hop headers and the headers memproxy owns are touched.
"""

from __future__ import annotations

import asyncio
import hmac
import os
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from ipaddress import ip_address

import aiohttp
from aiohttp import hdrs, web
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from memproxy.activity import ActivityWindow
from memproxy.config import Settings
from memproxy.detection import Decision, DetectorChain, RejectedRequest
from memproxy.errors import Dialect, dialect_of, error_response, stream_error_event
from memproxy.identifiers import is_valid_id
from memproxy.inbox import UnmatchedInbox
from memproxy.logs import log_request
from memproxy.metrics import Metrics

# RFC 9110 section 7.6.1, plus the non-standard ones proxies still meet.
HOP_BY_HOP = frozenset({
    "connection", "keep-alive", "proxy-connection", "proxy-authenticate",
    "proxy-authorization", "te", "trailer", "transfer-encoding", "upgrade",
})
# Bodies up to this size are read whole: one write is cheaper than a stream.
SMALL_BODY = 1024 * 1024
# Headers that tell the client which memory space its request landed in.
USER_ID_RESPONSE_HEADER = "x-memproxy-user-id"
DETECTOR_RESPONSE_HEADER = "x-memproxy-detector"
SUPERMEMORY_KEY_HEADER = "x-supermemory-api-key"
RETRY_AFTER_SECONDS = "2"
LITELLM_END_USER_HEADER = "x-litellm-end-user-id"


class BodyTooLarge(Exception):
    """The client's body went past ``max_body_size`` while it was streamed."""


def connection_tokens(headers: CIMultiDictProxy[str]) -> frozenset[str]:
    """Header names listed in ``Connection``: hop-by-hop for this message only."""
    values = headers.getall(hdrs.CONNECTION, ())
    return frozenset(t.strip().lower() for v in values for t in v.split(",") if t.strip())


def strip_hop_by_hop(
    headers: CIMultiDictProxy[str], drop: frozenset[str] = frozenset()
) -> CIMultiDict[str]:
    """A copy of ``headers`` without hop-by-hop headers and without the names in ``drop``."""
    out = CIMultiDict(headers)  # a copy, then deletions: much cheaper than filtering
    for names in (HOP_BY_HOP, drop,
                  connection_tokens(headers) if hdrs.CONNECTION in headers else ()):
        for name in names:
            if name in out:
                del out[name]
    return out


@dataclass(frozen=True, slots=True)
class InjectedHeaders:
    """What memproxy writes into every forwarded request, decided once at start-up."""

    user_id: str
    custom_header: str
    conversation_id: str
    conversation_id_from: tuple[str, ...]
    supermemory_api_key: str | None
    litellm_end_user_id: bool

    @classmethod
    def from_settings(cls, settings: Settings) -> InjectedHeaders:
        key = settings.headers.supermemory_api_key
        return cls(
            user_id=settings.headers.user_id,
            custom_header=settings.custom_header,
            conversation_id=settings.headers.conversation_id,
            conversation_id_from=settings.headers.conversation_id_from,
            supermemory_api_key=key.reveal() if key else None,
            litellm_end_user_id=settings.headers.litellm_end_user_id,
        )

    @property
    def request_drop(self) -> frozenset[str]:
        """Client headers never passed on: memproxy owns them, or they are per-hop."""
        owned = {self.user_id, self.custom_header, SUPERMEMORY_KEY_HEADER, "host", "expect"}
        if self.litellm_end_user_id:
            owned.add(LITELLM_END_USER_HEADER)
        return frozenset(owned)

    def apply(self, headers: CIMultiDict[str], user_id: str) -> None:
        """Write the memory headers for ``user_id`` into outgoing ``headers``."""
        headers[self.user_id] = user_id
        if self.litellm_end_user_id:
            headers[LITELLM_END_USER_HEADER] = user_id
        if self.supermemory_api_key:
            headers[SUPERMEMORY_KEY_HEADER] = self.supermemory_api_key
        if self.conversation_id not in headers:
            for source in self.conversation_id_from:
                value = headers.get(source)
                if value is not None and is_valid_id(value):
                    headers[self.conversation_id] = value
                    break

    def describe(self, user_id: str, request_headers: CIMultiDictProxy[str]) -> dict[str, str]:
        """The injected headers for display, with the Supermemory key redacted."""
        out: CIMultiDict[str] = CIMultiDict(request_headers)
        self.apply(out, user_id)
        shown = {self.user_id: user_id}
        if self.litellm_end_user_id:
            shown[LITELLM_END_USER_HEADER] = user_id
        if self.supermemory_api_key:
            shown[SUPERMEMORY_KEY_HEADER] = "<redacted>"
        if self.conversation_id in out:
            shown[self.conversation_id] = out[self.conversation_id]
        return shown


class Refusal(Exception):
    """memproxy itself refuses the request, with this status and error code."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code


# The decisions that mean "no detector recognised this client".
UNIDENTIFIED = frozenset({"default", "none"})


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
        """Take up a (re)loaded config: detectors, headers, trust and limits.

        No ``await`` in here, so a request sees either the old config or the
        new one, never a mix. The LiteLLM URL, the listen address and the
        timeouts belong to the running server and need a restart.
        """
        injected = InjectedHeaders.from_settings(settings)
        secret = settings.explicit_id.secret
        self.settings = settings
        self.chain = chain
        self.max_body_size = settings.max_body_size
        self.injected = injected
        self.trust = settings.explicit_id
        self.unidentified = settings.unidentified
        self._secret = secret.reveal() if secret else None
        self._drop = injected.request_drop | {settings.explicit_id.secret_header}

    def _observe(self, line: dict[str, object], headers: CIMultiDictProxy[str]) -> None:
        if self.metrics is not None:
            self.metrics.observe(line)
        detector = line.get("detector")
        if self.inbox is not None and detector in UNIDENTIFIED:
            self.inbox.record(headers)
        if self.activity is not None and detector is not None:
            user_id = line.get("user_id")
            label = (self.metrics.user_ids.label(user_id, str(detector))
                     if self.metrics is not None and isinstance(user_id, str) else
                     str(user_id) if user_id is not None else "none")
            self.activity.record(label)

    def explicit_id_allowed(self, request: web.BaseRequest) -> bool:
        """Whether this client may choose its memory space with the explicit header."""
        mode = self.trust.trust
        if mode == "anyone":
            return True
        if mode == "secret":
            given = request.headers.get(self.trust.secret_header, "")
            return self._secret is not None and hmac.compare_digest(
                given.encode("utf-8", "surrogateescape"), self._secret.encode())
        if mode == "networks" and request.remote:
            try:
                address = ip_address(request.remote.partition("%")[0])
            except ValueError:
                return False
            return any(address in network for network in self.trust.networks)
        return False

    def identify(self, request: web.BaseRequest) -> tuple[Decision, bool]:
        """Whose memory the request belongs to, and whether to send memory headers at all.

        Raises :class:`Refusal` for an explicit id the client may not set or
        cannot use, and for unrecognised clients when the policy is ``refuse``.
        """
        headers = request.headers
        custom = self.injected.custom_header
        if custom in headers and not self.explicit_id_allowed(request):
            raise Refusal(403, "explicit_id_not_allowed",
                          f"this client may not choose its memory space with {custom} "
                          f"(memproxy.explicit_id.trust is {self.trust.trust}); leave the "
                          f"header out, or ask the operator to allow it")
        try:
            decision = self.chain.detect_user(headers)
        except RejectedRequest as exc:
            raise Refusal(400, "invalid_user_id", str(exc)) from None
        if decision.detector in UNIDENTIFIED:
            if self.unidentified == "refuse":
                raise Refusal(403, "unidentified_client",
                              f"memproxy could not tell which client this is, and this proxy "
                              f"refuses unrecognised clients; send {custom}, or ask the "
                              f"operator for a header_patterns rule")
            if self.unidentified == "no_memory":
                return decision, False
        return decision, True

    def upstream_headers(
        self, headers_in: CIMultiDictProxy[str], user_id: str | None
    ) -> CIMultiDict[str]:
        """The headers LiteLLM gets: the client's, cleaned, plus the memory headers."""
        headers = strip_hop_by_hop(headers_in, self._drop)
        if user_id is not None:
            self.injected.apply(headers, user_id)
        return headers

    async def handle(self, request: web.Request) -> web.StreamResponse:
        started = time.perf_counter()
        request_id = request.headers.get("x-request-id") or os.urandom(8).hex()
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
            self._observe(line, request.headers)

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
        try:
            decision, with_memory = self.identify(request)
        except Refusal as exc:
            line["error"] = exc.code
            return error_response(dialect, exc.status, str(exc), exc.code)
        line["user_id"] = decision.user_id if with_memory else None
        line["detector"] = decision.detector

        if self.unavailable is not None and (why := self.unavailable()) is not None:
            line["error"] = why
            return error_response(dialect, 503, f"{why}; retry in a few seconds",
                                  "upstream_unavailable",
                                  headers={hdrs.RETRY_AFTER: RETRY_AFTER_SECONDS})

        length = request.content_length
        if length is not None and length > self.max_body_size:
            line["error"] = "body too large"
            return self._too_large(dialect)

        headers = self.upstream_headers(request.headers,
                                        decision.user_id if with_memory else None)

        body: bytes | AsyncIterator[bytes] | None
        if not request.body_exists:
            body = None
            line["bytes_in"] = 0
        elif length is not None and length <= SMALL_BODY:
            body = await request.read()
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
            line["error"] = f"upstream: {type(exc).__name__}"
            return error_response(
                dialect, 502, f"LiteLLM closed the connection before answering "
                f"({type(exc).__name__})", "upstream_failed",
            )

        try:
            line["upstream_ms"] = round((time.perf_counter() - upstream_started) * 1000, 3)
            return await self._relay(request, upstream, decision if with_memory else None,
                                     dialect, line, upstream_started)
        finally:
            upstream.release()

    def _too_large(self, dialect: Dialect) -> web.Response:
        return error_response(
            dialect, 413, f"request body is larger than memproxy's limit of "
            f"{self.max_body_size} bytes (memproxy.max_body_size)", "request_too_large",
        )

    async def _stream_body(
        self, request: web.Request, line: dict[str, object]
    ) -> AsyncIterator[bytes]:
        seen = 0
        async for chunk in request.content.iter_any():
            seen += len(chunk)
            line["bytes_in"] = seen
            if seen > self.max_body_size:
                raise BodyTooLarge()
            yield chunk

    async def _relay(
        self,
        request: web.Request,
        upstream: aiohttp.ClientResponse,
        decision: Decision | None,
        dialect: Dialect,
        line: dict[str, object],
        upstream_started: float,
    ) -> web.StreamResponse:
        headers = strip_hop_by_hop(upstream.headers)
        if decision is not None:
            headers[USER_ID_RESPONSE_HEADER] = decision.user_id
            headers[DETECTOR_RESPONSE_HEADER] = decision.detector
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
