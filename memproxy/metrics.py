"""Prometheus metrics at ``GET /metrics``.

Label sets stay bounded: user ids decided by ``header_patterns`` or
``default`` come from the config, so they are always used as labels; ids from
other detectors (explicit header, API-key hash, plugins) can be unbounded, so
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

MULTIPROCESS_ENV = "PROMETHEUS_MULTIPROC_DIR"
CONFIG_BOUNDED_DETECTORS = frozenset({"header_patterns", "default"})
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


def status_class(status: object) -> str:
    return f"{status}"[0] + "xx" if isinstance(status, int) else "none"


def succeeded(status: object) -> bool:
    """Whether LiteLLM answered the request with success (2xx)."""
    return isinstance(status, int) and 200 <= status < 300


class UserIdLabels:
    """Maps user ids to a bounded set of label values."""

    def __init__(self, max_user_ids: int) -> None:
        self.max_user_ids = max_user_ids
        self._admitted: set[str] = set()

    def label(self, user_id: str | None, detector: str | None, *, admit: bool = True) -> str:
        """The label for ``user_id``; a new unbounded id gets one only when ``admit``."""
        if user_id is None:
            return "none"
        if detector in CONFIG_BOUNDED_DETECTORS or user_id in self._admitted:
            return user_id
        if admit and len(self._admitted) < self.max_user_ids:
            self._admitted.add(user_id)
            return user_id
        return OTHER


class Metrics:
    """memproxy's metrics; one instance per application."""

    def __init__(self, max_user_ids: int = 100) -> None:
        self.user_ids = UserIdLabels(max_user_ids)
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
        # Looking a labelled child up by its label values costs more than the
        # increment itself, so the children are kept; the label sets are bounded.
        self._request_counters: dict[tuple[str, str, str, str], Counter] = {}
        self._route_children: dict[str, _RouteChildren] = {}

    def observe(self, line: dict[str, object]) -> None:
        """Count one finished request from its canonical log line."""
        route = route_of(str(line.get("path", "")))
        detector = line.get("detector")
        detector = detector if isinstance(detector, str) else None
        user_id = line.get("user_id")
        status = line.get("status")
        key = (self.user_ids.label(user_id if isinstance(user_id, str) else None, detector,
                                   admit=succeeded(status)),
               detector or "none", status_class(status), route)
        counter = self._request_counters.get(key)
        if counter is None:
            counter = self._request_counters[key] = self.requests.labels(*key)
        counter.inc()
        per_route = self._route_children.get(route)
        if per_route is None:
            per_route = self._route_children[route] = _RouteChildren(self, route)
        upstream_ms = line.get("upstream_ms")
        if isinstance(upstream_ms, float):
            per_route.upstream_latency.observe(upstream_ms / 1000)
        first_byte_ms = line.get("first_byte_ms")
        if isinstance(first_byte_ms, float):
            per_route.first_byte.observe(first_byte_ms / 1000)
        bytes_in = line.get("bytes_in")
        if isinstance(bytes_in, int) and bytes_in:
            per_route.bytes_in.inc(bytes_in)
        bytes_out = line.get("bytes_out")
        if isinstance(bytes_out, int) and bytes_out:
            per_route.bytes_out.inc(bytes_out)

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
