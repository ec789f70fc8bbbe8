#!/usr/bin/env python3
"""Per-call cost of the pieces of memproxy's per-request work, measured in-process.

``python bench/micro.py [--config config.yaml]`` times, with ``timeit``, each
step memproxy does for every forwarded request on realistic inputs (the
headers of an OpenAI SDK call): the log line (structlog, JSON, written to a
file), header cleaning and injection, detection, metrics, the request id and
the upstream URL. Each step is timed on its own; a step that no longer exists
in this version of memproxy is reported as not available.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import timeit
from collections.abc import Callable
from pathlib import Path
from typing import Any

from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

REPO = Path(__file__).resolve().parent.parent

CLIENT_HEADERS = (
    ("Host", "127.0.0.1:8764"), ("Accept-Encoding", "gzip, deflate"),
    ("Connection", "keep-alive"), ("Accept", "application/json"),
    ("Content-Type", "application/json"), ("User-Agent", "OpenAI/Python 1.109.1"),
    ("X-Stainless-Lang", "python"), ("X-Stainless-Package-Version", "1.109.1"),
    ("X-Stainless-OS", "Linux"), ("X-Stainless-Arch", "x64"),
    ("X-Stainless-Runtime", "CPython"), ("X-Stainless-Runtime-Version", "3.11.7"),
    ("Authorization", "Bearer sk-memproxy-0123456789abcdef"),
    ("X-Stainless-Async", "false"), ("x-stainless-retry-count", "0"),
    ("x-stainless-read-timeout", "600"), ("Content-Length", "1024"),
)
LINE = {"request_id": "9f0c1d2e3f405162", "method": "POST", "path": "/v1/chat/completions",
        "user_id": "openai-python", "detector": "header_patterns", "bytes_in": 1024,
        "upstream_ms": 0.412, "status": 200, "bytes_out": 246, "streamed": False,
        "duration_ms": 0.633}


def per_call_us(fn: Callable[[], object], budget_s: float = 0.4) -> float:
    """Microseconds per call, best of 5 runs of about ``budget_s / 5`` each."""
    timer = timeit.Timer(fn)
    number, elapsed = timer.autorange()
    number = max(1, int(number * (budget_s / 5) / max(elapsed, 1e-9)))
    return min(timer.repeat(repeat=5, number=number)) / number * 1e6


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=str(REPO / "config.yaml"))
    args = parser.parse_args()

    from memproxy.config import load_settings
    from memproxy.detection import build_detector_chain
    from memproxy.logs import configure_logging

    settings = load_settings(args.config)
    chain = build_detector_chain(settings)

    with tempfile.TemporaryDirectory(prefix="memproxy-micro-") as folder, \
            open(Path(folder) / "log", "w") as log_file:
        real_stdout = sys.stdout
        sys.stdout = log_file  # structlog binds the file it writes to when configured
        try:
            configure_logging("json", "info")
        finally:
            sys.stdout = real_stdout
        time_steps(settings, chain)
    return 0


def time_steps(settings: Any, chain: Any) -> None:
    """Print the cost of each step (logging must already be configured)."""
    from memproxy import forwarding

    headers = CIMultiDictProxy(CIMultiDict(CLIENT_HEADERS))
    steps: list[tuple[str, Callable[[], object] | None]] = []
    import structlog
    log = structlog.get_logger("memproxy")
    steps.append(("a structlog line: log.info('request', **line), JSON to a file",
                  lambda: log.info("request", **LINE)))
    try:
        from memproxy.logs import log_request
        steps.append(("request log line: log_request(line), JSON to a file",
                      lambda: log_request(dict(LINE))))
    except ImportError:
        steps.append(("request log line: log_request(line), JSON to a file", None))
    import json
    steps.append(("  of which json.dumps of the line", lambda: json.dumps(LINE)))

    from memproxy.routing import RoutingPolicy, client_request
    policy = RoutingPolicy(settings, chain)
    _, client = client_request(headers)

    def clean_and_inject() -> None:
        out, request = client_request(headers)
        policy.rewrite_headers(out, policy.route(request))

    steps.append(("client_request + route + rewrite_headers", clean_and_inject))
    steps.append(("chain.detect_user (bundled header_patterns)",
                  lambda: chain.detect_user(client)))
    try:
        from memproxy.metrics import Metrics
        metrics = Metrics()
        steps.append(("Metrics.observe(line) (Prometheus counters)",
                      lambda: metrics.observe(dict(LINE))))
    except (ImportError, TypeError):
        steps.append(("Metrics.observe(line) (Prometheus counters)", None))
    try:
        from memproxy.activity import ActivityWindow
        window = ActivityWindow()
        steps.append(("ActivityWindow.record", lambda: window.record("openai-python")))
    except (ImportError, TypeError):
        steps.append(("ActivityWindow.record", None))
    steps.append(("request id: os.urandom(8).hex()", lambda: os.urandom(8).hex()))
    steps.append(("upstream URL: URL(base + raw_path, encoded=True)",
                  lambda: URL("http://127.0.0.1:8765" + "/v1/chat/completions", encoded=True)))
    from memproxy.errors import dialect_of
    steps.append(("dialect_of(path, headers)",
                  lambda: dialect_of("/v1/chat/completions", headers)))

    print(f"memproxy hot-path steps, µs per call (Python {sys.version.split()[0]}):")
    for name, fn in steps:
        if fn is None:
            print(f"  {'n/a':>7}  {name}")
            continue
        print(f"  {per_call_us(fn):7.2f}  {name}")


if __name__ == "__main__":
    sys.exit(main())
