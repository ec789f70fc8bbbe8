"""Isolation under load: many identities, many concurrent requests, no mix-ups.

memproxy runs as its own process (``memproxy serve``) in front of an echo
upstream that answers with the ``x-sm-user-id`` it received; the client checks
every answer against the identity it sent. Everything stays on 127.0.0.1 and
stops by itself: after ``--requests`` requests, or after ``--duration`` seconds
for a soak run.

    python tests/load.py                      # 20,000 requests, 200 concurrent
    python tests/load.py --duration 600       # 10-minute soak
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import hmac
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import aiohttp
from aiohttp import web
from aiohttp.test_utils import unused_port

HASH_SECRET = "load-test-hash-secret-0123456789"
IDENTITIES = 50
MAX_SECONDS = 900.0


@dataclass(frozen=True)
class Identity:
    """How one simulated client identifies itself, and the id it must land in."""

    headers: dict[str, str]
    expected: str
    detector: str


def identities() -> list[Identity]:
    """50 identities spread over every detector."""
    result = []
    for i in range(15):
        result.append(Identity({"x-memory-user-id": f"user-{i}"}, f"user-{i}", "explicit_header"))
    for i in range(15):
        result.append(Identity({"User-Agent": f"tool-{i}/1.0"}, f"tool-{i}", "header_patterns"))
    for i in range(15):
        key = f"sk-load-{i}"
        digest = hmac.new(HASH_SECRET.encode(), key.encode(), hashlib.sha256).hexdigest()
        result.append(Identity({"Authorization": f"Bearer {key}", "User-Agent": "anon/1"},
                               "key-" + digest[:16], "api_key_hash"))
    for i in range(IDENTITIES - 45):
        result.append(Identity({"User-Agent": f"unknown-{i}"}, "default", "default"))
    return result


def config_yaml() -> str:
    patterns = "\n".join(
        f"    - {{header: user-agent, pattern: '^tool-{i}/', user_id: tool-{i}}}"
        for i in range(15))
    return f"""user_id_mappings:
  header_patterns:
{patterns}
memproxy:
  log: {{format: json}}
  detectors:
    api_key_hash: {{enabled: true, options: {{secret: "{HASH_SECRET}"}}}}
"""


# -- the echo upstream ---------------------------------------------------------------------

async def echo(request: web.Request) -> web.StreamResponse:
    await request.read()
    user = request.headers.get("x-sm-user-id", "")
    if request.query.get("stream"):
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                               "x-echo-user-id": user})
        await response.prepare(request)
        for _ in range(3):
            await response.write(f"data: {user}\n\n".encode())
            await asyncio.sleep(0.001)
        await response.write_eof()
        return response
    return web.Response(text=user, headers={"x-echo-user-id": user})


def serve_echo(port: int) -> None:
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", echo)
    web.run_app(app, host="127.0.0.1", port=port, print=None, access_log=None)


# -- the run ---------------------------------------------------------------------------------

@dataclass
class Figures:
    requests: int = 0
    streamed: int = 0
    failed: int = 0
    wrong_id: int = 0
    seconds: float = 0.0
    requests_per_second: float = 0.0
    rss_start_mb: float = 0.0
    rss_middle_mb: float = 0.0
    rss_end_mb: float = 0.0
    rss_growth_middle_to_end: float = 0.0
    by_detector: dict[str, int] = field(default_factory=dict)
    first_errors: list[str] = field(default_factory=list)


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


async def wait_port(port: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.close()
            return
        except OSError:
            await asyncio.sleep(0.05)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port}")


async def drive(url: str, pid: int, *, total: int | None, duration: float | None,
                concurrency: int) -> Figures:
    figures = Figures(rss_start_mb=rss_mb(pid))
    people = identities()
    body = json.dumps({"model": "x", "messages": [{"role": "user", "content": "y" * 900}]})
    deadline = time.monotonic() + min(duration or MAX_SECONDS, MAX_SECONDS)
    issued = 0
    middle_sampled = False

    def next_index() -> int | None:
        nonlocal issued
        if (total is not None and issued >= total) or time.monotonic() > deadline:
            return None
        issued += 1
        return issued - 1

    async def worker(session: aiohttp.ClientSession) -> None:
        nonlocal middle_sampled
        while (n := next_index()) is not None:
            who = people[n % len(people)]
            stream = n % 3 == 0
            try:
                async with session.post(url + ("/v1/chat/completions?stream=1" if stream
                                               else "/v1/chat/completions"),
                                        data=body, headers=who.headers) as resp:
                    text = await resp.text()
                    if resp.status != 200:
                        raise RuntimeError(f"status {resp.status}: {text[:200]}")
                    seen = ([line[6:] for line in text.splitlines() if line.startswith("data: ")]
                            if stream else [text])
                    seen.append(resp.headers.get("x-echo-user-id", ""))
                    if stream and len(seen) != 4:
                        raise RuntimeError(f"stream had {len(seen) - 1} events, not 3")
                    if any(s != who.expected for s in seen):
                        figures.wrong_id += 1
                        if len(figures.first_errors) < 5:
                            figures.first_errors.append(f"sent {who.expected}, got {seen}")
            except Exception as exc:
                figures.failed += 1
                if len(figures.first_errors) < 5:
                    figures.first_errors.append(repr(exc))
            figures.requests += 1
            figures.streamed += stream
            figures.by_detector[who.detector] = figures.by_detector.get(who.detector, 0) + 1
            halfway = (total // 2) if total else None
            if not middle_sampled and (
                    (halfway is not None and figures.requests >= halfway)
                    or (duration and time.monotonic() > deadline - duration / 2)):
                middle_sampled = True
                figures.rss_middle_mb = rss_mb(pid)

    started = time.monotonic()
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))
    figures.seconds = round(time.monotonic() - started, 2)
    figures.requests_per_second = round(figures.requests / figures.seconds, 1)
    figures.rss_end_mb = rss_mb(pid)
    if figures.rss_middle_mb:
        figures.rss_growth_middle_to_end = round(
            (figures.rss_end_mb - figures.rss_middle_mb) / figures.rss_middle_mb, 4)
    return figures


async def run(*, total: int | None = 20_000, duration: float | None = None,
              concurrency: int = 200) -> Figures:
    """Start the echo upstream and memproxy, drive the load, stop both; return the figures."""
    echo_port, proxy_port = unused_port(), unused_port()
    children: list[subprocess.Popen[bytes]] = []
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "config.yaml"
        config.write_text(config_yaml())
        try:
            children.append(subprocess.Popen(
                [sys.executable, __file__, "--serve-echo", str(echo_port)]))
            await wait_port(echo_port)
            proxy = subprocess.Popen(
                [sys.executable, "-m", "memproxy", "serve", "--config", str(config),
                 "--port", str(proxy_port), "--litellm-url", f"http://127.0.0.1:{echo_port}"],
                stdout=subprocess.DEVNULL)
            children.append(proxy)
            await wait_port(proxy_port)
            return await drive(f"http://127.0.0.1:{proxy_port}", proxy.pid, total=total,
                               duration=duration, concurrency=concurrency)
        finally:
            for child in children:
                child.send_signal(signal.SIGTERM)
            for child in children:
                try:
                    child.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    child.kill()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=20_000)
    parser.add_argument("--duration", type=float, help="seconds to run instead of a count "
                                                       f"(at most {MAX_SECONDS:.0f})")
    parser.add_argument("--concurrency", type=int, default=200)
    parser.add_argument("--serve-echo", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_echo:
        serve_echo(args.serve_echo)
        return
    figures = asyncio.run(run(total=None if args.duration else args.requests,
                              duration=args.duration, concurrency=args.concurrency))
    print(json.dumps(asdict(figures), indent=2))
    ok = (figures.failed == 0 and figures.wrong_id == 0
          and figures.rss_growth_middle_to_end < 0.10)
    print("PASS" if ok else "FAIL")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
