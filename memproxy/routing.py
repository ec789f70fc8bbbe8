"""Whose memory a request belongs to, and which headers say so: the routing policy.

One immutable :class:`RoutingPolicy` holds every rule that decides a request's
memory space: who may name a space with the explicit header, the detector
chain, what to do with clients nobody recognised, and the headers memproxy
writes. The proxy, ``/memory-routing/info`` and ``memproxy explain`` all ask
the same object, so they cannot disagree; a reload builds a new policy and
swaps it in with one assignment.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass
from ipaddress import ip_address

from aiohttp import hdrs
from multidict import CIMultiDict, CIMultiDictProxy

from memproxy.config import Settings
from memproxy.detection import Decision, DetectorChain, RejectedRequest
from memproxy.hookspecs import ClientRequest
from memproxy.identifiers import is_valid_id

# RFC 9110 section 7.6.1, plus the non-standard ones proxies still meet.
HOP_BY_HOP = frozenset({
    "connection", "keep-alive", "proxy-connection", "proxy-authenticate",
    "proxy-authorization", "te", "trailer", "transfer-encoding", "upgrade",
})
SUPERMEMORY_KEY_HEADER = "x-supermemory-api-key"
#: The client's per-request choice of what memory does (memproxy.memory); never forwarded.
MEMORY_MODE_HEADER = "x-memory-mode"
LITELLM_END_USER_HEADER = "x-litellm-end-user-id"


def connection_tokens(headers: CIMultiDictProxy[str] | CIMultiDict[str]) -> frozenset[str]:
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


class Refusal(Exception):
    """memproxy itself refuses the request, with this status and error code."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code


@dataclass(frozen=True, slots=True)
class Route:
    """Where a request goes: the detectors' decision, and whether it gets memory at all."""

    decision: Decision
    with_memory: bool

    @property
    def user_id(self) -> str | None:
        """The memory space, or ``None`` when the request is forwarded without memory."""
        return self.decision.user_id if self.with_memory else None


@dataclass(frozen=True, slots=True)
class InjectedHeaders:
    """What memproxy writes into every forwarded request."""

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
            custom_header=settings.mappings.custom_header,
            conversation_id=settings.headers.conversation_id,
            conversation_id_from=settings.headers.conversation_id_from,
            supermemory_api_key=key.reveal() if key else None,
            litellm_end_user_id=settings.headers.litellm_end_user_id,
        )

    @property
    def request_drop(self) -> frozenset[str]:
        """Client headers never passed on: memproxy owns them, or they are per-hop."""
        owned = {self.user_id, self.custom_header, SUPERMEMORY_KEY_HEADER, MEMORY_MODE_HEADER,
                 "host"}
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


class RoutingPolicy:
    """The routing rules of one loaded config; immutable once built."""

    __slots__ = ("_drop", "_drop_without_memory", "_secret", "chain", "injected", "trust",
                 "unidentified")

    def __init__(self, settings: Settings, chain: DetectorChain) -> None:
        self.chain = chain
        self.injected = InjectedHeaders.from_settings(settings)
        self.trust = settings.explicit_id
        self.unidentified = settings.unidentified
        secret = settings.explicit_id.secret
        self._secret = secret.reveal().encode() if secret else None
        self._drop = self.injected.request_drop | {settings.explicit_id.secret_header}
        # Without memory nothing may tie the request to a memory space, not even the
        # client's own conversation id.
        self._drop_without_memory = self._drop | {self.injected.conversation_id}

    def explicit_id_allowed(self, request: ClientRequest) -> bool:
        """Whether this client may choose its memory space with the explicit header."""
        mode = self.trust.trust
        if mode == "anyone":
            return True
        if mode == "secret":
            given = request.headers.get(self.trust.secret_header, "")
            return self._secret is not None and hmac.compare_digest(
                given.encode("utf-8", "surrogateescape"), self._secret)
        if mode == "networks" and request.remote:
            try:
                address = ip_address(request.remote.partition("%")[0])
            except ValueError:
                return False
            return any(address in network for network in self.trust.networks)
        return False

    def route(self, request: ClientRequest) -> Route:
        """Whose memory the request belongs to, and whether it gets memory at all.

        Raises :class:`Refusal` for an explicit id the client may not set or
        cannot use, and for unrecognised clients when the policy is ``refuse``.
        """
        custom = self.injected.custom_header
        if custom in request.headers and not self.explicit_id_allowed(request):
            raise Refusal(403, "explicit_id_not_allowed",
                          f"this client may not choose its memory space with {custom} "
                          f"(memproxy.explicit_id.trust is {self.trust.trust}); leave the "
                          f"header out, or ask the operator to allow it")
        try:
            decision = self.chain.detect_user(request)
        except RejectedRequest as exc:
            raise Refusal(400, "invalid_user_id", str(exc)) from None
        if decision.fallback:
            if self.unidentified == "refuse":
                raise Refusal(403, "unidentified_client",
                              f"memproxy could not tell which client this is, and this proxy "
                              f"refuses unrecognised clients; send {custom}, or ask the "
                              f"operator for a header_patterns rule")
            if self.unidentified == "no_memory":
                return Route(decision, with_memory=False)
        return Route(decision, with_memory=True)

    def rewrite_headers(self, headers: CIMultiDict[str], route: Route) -> CIMultiDict[str]:
        """Turn the client's (hop-by-hop-free) headers into the ones LiteLLM gets, in place."""
        for name in self._drop if route.with_memory else self._drop_without_memory:
            if name in headers:
                del headers[name]
        if route.with_memory:
            self.injected.apply(headers, route.decision.user_id)
        return headers

    def describe(self, route: Route, request: ClientRequest) -> dict[str, object]:
        """Where ``request`` lands, for operators: the routing document and ``explain``."""
        decision = route.decision
        return {
            "user_id": route.user_id,
            "detector": decision.detector,
            "reason": decision.reason if route.with_memory else
            "unrecognised client: memory headers are left out (memproxy.unidentified: "
            "no_memory)",
            "detector_chain": self.chain.describe(),
            "injected_headers": self.injected.describe(decision.user_id, request.headers)
            if route.with_memory else {},
            "explicit_id_trust": self.trust.trust,
            "unidentified": self.unidentified,
        }


def client_request(headers: CIMultiDictProxy[str], *, path: str = "/", query_string: str = "",
                   remote: str | None = None) -> tuple[CIMultiDict[str], ClientRequest]:
    """The client's headers without hop-by-hop ones, and the request detectors see.

    The returned copy is what :meth:`RoutingPolicy.rewrite_headers` later turns
    into the upstream headers, so detection and forwarding see the same headers.
    """
    clean = strip_hop_by_hop(headers)
    return clean, ClientRequest(CIMultiDictProxy(clean), path, query_string, remote)
