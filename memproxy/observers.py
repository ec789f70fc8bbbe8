"""What a finished request leaves behind: its record, and the observers that take it.

The forwarder fills one :class:`RequestRecord` per request and hands it, once
the answer is complete, to each observer in turn: the request log line, the
metrics, the unrecognised-client inbox, the activity window. An observer is
any object with a ``request_done(record)`` method, so a new one (memory, for
instance) plugs in without touching the forwarder.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from multidict import CIMultiDictProxy

#: The record's fields that go into the request log line, in the order written.
LOG_FIELDS = ("request_id", "method", "path", "error", "user_id", "detector", "memories",
              "bytes_in", "upstream_ms", "status", "first_byte_ms", "bytes_out", "streamed",
              "duration_ms")


@dataclass(slots=True)
class RequestRecord:
    """One request as memproxy handled it; ``None`` means "did not get that far"."""

    request_id: str
    method: str
    path: str
    #: The client's request headers (for observers that look at the client, never logged).
    headers: CIMultiDictProxy[str]
    #: The memory space, or ``None`` when the request got no memory headers.
    user_id: str | None = None
    #: The detector that decided (``None``: refused before detection finished).
    detector: str | None = None
    #: The id comes from the config, a bounded set (see ``DetectorSpec.ids_from_config``).
    ids_from_config: bool = False
    #: No detector recognised the client (see ``DetectorSpec.fallback``).
    unrecognised: bool = False
    status: int | None = None
    #: Why memproxy refused or failed the request, in a few words.
    error: str | None = None
    #: Memories recalled into the request (``None``: memory did not take part).
    memories: int | None = None
    #: LiteLLM turned the client away for its API key: what was wrong (never logged here).
    key_problem: str | None = None
    bytes_in: int | None = None
    bytes_out: int | None = None
    streamed: bool | None = None
    #: Milliseconds until LiteLLM's response headers, and its first body byte.
    upstream_ms: float | None = None
    first_byte_ms: float | None = None
    duration_ms: float = 0.0

    def log_fields(self) -> dict[str, object]:
        """The fields of the request log line: every one that was set."""
        fields: dict[str, object] = {}
        for name in LOG_FIELDS:
            value = getattr(self, name)
            if value is not None:
                fields[name] = value
        if self.detector is not None and "user_id" not in fields:
            fields["user_id"] = None  # decided, without memory: say so explicitly
        return fields

    @property
    def succeeded(self) -> bool:
        """Whether LiteLLM answered with success (2xx)."""
        return self.status is not None and 200 <= self.status < 300


class RequestObserver(Protocol):
    """Anything that wants to know about each finished request."""

    def request_done(self, record: RequestRecord) -> None:
        """Called once per request, after its answer ended; must not raise or block."""
