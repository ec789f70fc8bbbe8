"""Prometheus metrics at ``GET /metrics``.

Label sets stay bounded: user ids from detectors that declare
``ids_from_config`` (``header_patterns``, ``default``) come from the config, so
they are always used as labels; ids from other detectors (explicit header,
API-key hash, most plugins) can be unbounded, so
only the first ``max_user_ids`` distinct ones get a label of their own and the
rest are counted as ``other``. An id is only admitted to a label of its own by
a request that LiteLLM answered with success, so clients making up keys or ids
that LiteLLM refuses cannot use up the label slots. With ``serve --workers N`` the workers write to
a shared directory (prometheus-client's multiprocess mode) and any worker's
``/metrics`` reports the sum over all of them.
"""

from __future__ import annotations

import os
import tempfile

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client import multiprocess as prometheus_multiprocess

from memproxy.observers import RequestRecord

MULTIPROCESS_ENV = "PROMETHEUS_MULTIPROC_DIR"
OTHER = "other"
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10,
                   30, 60, 120, 300)


def route_of(path: str) -> str:
    """The coarse route a path belongs to: chat, messages, models or other."""
    if path.endswith("/chat/completions"):
        return "chat"
    if path.endswith("/messages"):
        return "messages"
    if path.endswith("/models"):
        return "models"
    return "other"


def status_class(status: int | None) -> str:
    return f"{status}"[0] + "xx" if status is not None else "none"


class UserIdLabels:
    """Maps user ids to a bounded set of label values; shared by metrics and the status page."""

    def __init__(self, max_user_ids: int = 100) -> None:
        self.max_user_ids = max_user_ids
        self._admitted: set[str] = set()

    def label(self, record: RequestRecord) -> str:
        """The label for the record's user id.

        A new id from an unbounded detector gets a label of its own only when
        LiteLLM answered its request with success, so clients making up ids
        cannot use up the label slots.
        """
        user_id = record.user_id
        if user_id is None:
            return "none"
        if record.ids_from_config or user_id in self._admitted:
            return user_id
        if record.succeeded and len(self._admitted) < self.max_user_ids:
            self._admitted.add(user_id)
            return user_id
        return OTHER


class Metrics:
    """memproxy's metrics; one instance per application."""

    def __init__(self, labels: UserIdLabels | None = None) -> None:
        self.user_ids = labels if labels is not None else UserIdLabels()
        self.multiprocess = bool(os.environ.get(MULTIPROCESS_ENV))
        self.registry = CollectorRegistry(auto_describe=True)
        registry = self.registry
        self.requests = Counter(
            "memproxy_requests", "Requests handled, by memory user, deciding detector, "
            "status class and route.", ["user_id", "detector", "status_class", "route"],
            registry=registry)
        self.upstream_latency = Histogram(
            "memproxy_upstream_latency_seconds", "Time until LiteLLM's response headers.",
            ["route"], buckets=LATENCY_BUCKETS, registry=registry)
        self.first_byte = Histogram(
            "memproxy_upstream_first_byte_seconds", "Time until the first byte of LiteLLM's "
            "response body.", ["route"], buckets=LATENCY_BUCKETS, registry=registry)
        self.streams_open = Gauge(
            "memproxy_streams_open", "Streamed responses being relayed right now.",
            registry=registry, multiprocess_mode="livesum")
        self.bytes_in = Counter("memproxy_request_body_bytes", "Request body bytes forwarded.",
                                ["route"], registry=registry)
        self.bytes_out = Counter("memproxy_response_body_bytes", "Response body bytes relayed.",
                                 ["route"], registry=registry)
        self.litellm_restarts = Counter("memproxy_litellm_restarts",
                                        "Times the supervised LiteLLM was restarted.",
                                        registry=registry)
        self.memory_recall = Histogram(
            "memproxy_memory_recall_seconds", "Time to recall memories for a new conversation.",
            buckets=LATENCY_BUCKETS, registry=registry)
        self.memory_injected = Counter(
            "memproxy_memory_injected", "Memories recalled into requests.", registry=registry)
        self.memory_skipped = Counter(
            "memproxy_memory_skipped", "Requests that went on without memory, by reason.",
            ["reason"], registry=registry)
        self.memory_writes = Counter(
            "memproxy_memory_writes", "Memories queued, written and dropped.", ["outcome"],
            registry=registry)
        self.memory_db_bytes = Gauge(
            "memproxy_memory_db_bytes", "Size of the memory database.", registry=registry,
            multiprocess_mode="max")
        # Looking a labelled child up by its label values costs more than the
        # increment itself, so the children are kept; the label sets are bounded.
        self._request_counters: dict[tuple[str, str, str, str], Counter] = {}
        self._route_children: dict[str, _RouteChildren] = {}

    def request_done(self, record: RequestRecord) -> None:
        """Count one finished request."""
        route = route_of(record.path)
        key = (self.user_ids.label(record), record.detector or "none",
               status_class(record.status), route)
        counter = self._request_counters.get(key)
        if counter is None:
            counter = self._request_counters[key] = self.requests.labels(*key)
        counter.inc()
        per_route = self._route_children.get(route)
        if per_route is None:
            per_route = self._route_children[route] = _RouteChildren(self, route)
        if record.upstream_ms is not None:
            per_route.upstream_latency.observe(record.upstream_ms / 1000)
        if record.first_byte_ms is not None:
            per_route.first_byte.observe(record.first_byte_ms / 1000)
        if record.bytes_in:
            per_route.bytes_in.inc(record.bytes_in)
        if record.bytes_out:
            per_route.bytes_out.inc(record.bytes_out)

    # -- what the memory stage reports (memproxy.memory.MemoryCounters) --

    def recalled(self, seconds: float, memories: int) -> None:
        self.memory_recall.observe(seconds)
        if memories:
            self.memory_injected.inc(memories)

    def skipped(self, reason: str) -> None:
        self.memory_skipped.labels(reason).inc()

    def writes(self, *, queued: int = 0, written: int = 0, dropped: int = 0) -> None:
        for outcome, count in (("queued", queued), ("written", written), ("dropped", dropped)):
            if count:
                self.memory_writes.labels(outcome).inc(count)

    def stored_bytes(self, size: int) -> None:
        self.memory_db_bytes.set(size)

    def render(self) -> tuple[bytes, str]:
        """The exposition text, summed over all workers in multiprocess mode."""
        if self.multiprocess:
            registry = CollectorRegistry()
            prometheus_multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
            return generate_latest(registry), CONTENT_TYPE_LATEST
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class _RouteChildren:
    """The per-route children of the route-labelled metrics."""

    __slots__ = ("bytes_in", "bytes_out", "first_byte", "upstream_latency")

    def __init__(self, metrics: Metrics, route: str) -> None:
        self.upstream_latency = metrics.upstream_latency.labels(route)
        self.first_byte = metrics.first_byte.labels(route)
        self.bytes_in = metrics.bytes_in.labels(route)
        self.bytes_out = metrics.bytes_out.labels(route)


def prepare_multiprocess_dir() -> str:
    """A fresh directory for the workers' metric files; set in the environment."""
    path = tempfile.mkdtemp(prefix="memproxy-metrics-")
    os.environ[MULTIPROCESS_ENV] = path
    return path


def worker_exited(pid: int) -> None:
    """Forget a dead worker's live gauges (its counters stay in the sums)."""
    if os.environ.get(MULTIPROCESS_ENV):
        prometheus_multiprocess.mark_process_dead(pid)  # type: ignore[no-untyped-call]
