"""Per-call cost of memproxy's per-request steps, in-process, with pytest-benchmark.

Run from the repository root (the project's own test run does not collect bench/)::

    python -m pytest bench/test_micro.py --benchmark-only

Each step gets the headers of an OpenAI SDK call and the bundled config.yaml. Tight
loops keep code and data in the CPU's caches, so each step costs less here than inside
the server; the point is to compare steps and versions, not to add them up.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from multidict import CIMultiDict, CIMultiDictProxy
from pytest_benchmark.fixture import BenchmarkFixture

from memproxy.config import load_settings
from memproxy.detection import build_detector_chain
from memproxy.logs import RequestLog, configure_logging
from memproxy.metrics import Metrics
from memproxy.observers import RequestRecord
from memproxy.routing import RoutingPolicy, client_request

CONFIG = Path(__file__).resolve().parent.parent / "config.yaml"
CLIENT_HEADERS = CIMultiDictProxy(CIMultiDict((
    ("Host", "127.0.0.1:8764"), ("Accept-Encoding", "gzip, deflate"),
    ("Connection", "keep-alive"), ("Accept", "application/json"),
    ("Content-Type", "application/json"), ("User-Agent", "OpenAI/Python 1.109.1"),
    ("X-Stainless-Lang", "python"), ("X-Stainless-Package-Version", "1.109.1"),
    ("X-Stainless-OS", "Linux"), ("X-Stainless-Arch", "x64"),
    ("X-Stainless-Runtime", "CPython"), ("X-Stainless-Runtime-Version", "3.11.7"),
    ("Authorization", "Bearer sk-memproxy-0123456789abcdef"),
    ("X-Stainless-Async", "false"), ("x-stainless-retry-count", "0"),
    ("x-stainless-read-timeout", "600"), ("Content-Length", "1024"),
)))
# One finished request, as the forwarder hands it to its observers.
RECORD = RequestRecord(
    "9f0c1d2e3f405162", "POST", "/v1/chat/completions", CLIENT_HEADERS,
    user_id="openai-python", detector="header_patterns", ids_from_config=True, bytes_in=1024,
    upstream_ms=0.412, status=200, bytes_out=246, streamed=False, duration_ms=0.633)


@pytest.fixture(scope="module")
def policy() -> RoutingPolicy:
    settings = load_settings(CONFIG)
    return RoutingPolicy(settings, build_detector_chain(settings))


@pytest.fixture(scope="module")
def log_file(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """memproxy's JSON log, written to a regular file as in the server's usual set-up."""
    path = tmp_path_factory.mktemp("micro") / "log"
    with path.open("w") as file:
        configure_logging("json", "info", file=file)
        yield path


def test_detector_chain(benchmark: BenchmarkFixture, policy: RoutingPolicy) -> None:
    _, request = client_request(CLIENT_HEADERS)
    decision = benchmark(policy.chain.detect_user, request)
    assert (decision.user_id, decision.detector) == ("openai-python", "header_patterns")


def test_header_rewrite(benchmark: BenchmarkFixture, policy: RoutingPolicy) -> None:
    """The client's headers to the upstream's: hop-by-hop ones out, the memory headers in."""
    route = policy.route(client_request(CLIENT_HEADERS)[1])

    def rewrite() -> CIMultiDict[str]:
        headers, _ = client_request(CLIENT_HEADERS)
        return policy.rewrite_headers(headers, route)

    headers = benchmark(rewrite)
    assert headers["x-sm-user-id"] == "openai-python"
    assert "Connection" not in headers


def test_request_log_line(benchmark: BenchmarkFixture, log_file: Path) -> None:
    benchmark(RequestLog().request_done, RECORD)
    last = json.loads(log_file.read_text().splitlines()[-1])
    assert (last["event"], last["user_id"]) == ("request", "openai-python")


def test_metrics_observe(benchmark: BenchmarkFixture) -> None:
    metrics = Metrics()
    benchmark(metrics.request_done, RECORD)
    assert b'user_id="openai-python"' in metrics.render()[0]
