"""Slow, huge and odd clients, on the wire: what they get, and what they cannot hold."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from memproxy.app import create_app
from memproxy.config import Settings, load_settings
from memproxy.endpoints import RELOAD
from memproxy.runner import make_runner
from tests.helpers import FakeLiteLLM, ProxyFactory, ServeFactory, make_settings, status_of

CLIENT_KEY = "sk-secret-never-logged-0001"
QUERY_KEY = "query-secret-never-logged-0002"


# -- helpers ------------------------------------------------------------------------------

@contextlib.asynccontextmanager
async def served(settings: Settings) -> AsyncIterator[int]:
    """memproxy on a free loopback port, with the runner ``memproxy serve`` uses."""
    runner = make_runner(create_app(settings), grace=1.0,
                         request_head=settings.timeouts.request_head,
                         max_header_size=settings.max_header_size)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield site.port
    finally:
        await runner.cleanup()


@contextlib.asynccontextmanager
async def connection(port: int) -> AsyncIterator[tuple[asyncio.StreamReader,
                                                       asyncio.StreamWriter]]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        yield reader, writer
    finally:
        writer.close()


async def read_response(reader: asyncio.StreamReader, timeout: float = 5.0
                        ) -> tuple[bytes, bytes]:
    """One response (head, body), read by its Content-Length; a 1xx has no body."""
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout)
    length = next((int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                   if line.lower().startswith(b"content-length:")), 0)
    body = await asyncio.wait_for(reader.readexactly(length), timeout)
    return head, body


async def closed_within(reader: asyncio.StreamReader, seconds: float) -> bytes:
    """Everything memproxy sends until it closes the connection, which it must do in time."""
    return await asyncio.wait_for(reader.read(), seconds)


def post_head(path: str = "/v1/chat/completions", *headers: str) -> bytes:
    """A POST request's head; latin-1, so "\xff" in a header is the byte 0xff."""
    lines = [f"POST {path} HTTP/1.1", "Host: memproxy", *headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


# -- request heads: time and size ---------------------------------------------------------

async def test_half_sent_request_is_closed_after_the_head_timeout(
    fake_litellm: FakeLiteLLM,
) -> None:
    settings = make_settings(fake_litellm.url, memproxy={"timeouts": {"request_head": 0.5}})
    async with served(settings) as port, connection(port) as (reader, writer):
        writer.write(b"GET /v1/models HTTP/1.1\r\nHost: memproxy\r\nX-Half: ")
        started = time.monotonic()
        answer = await closed_within(reader, 5)
        waited = time.monotonic() - started
    assert 0.4 < waited < 3
    head, _, body = answer.partition(b"\r\n\r\n")
    assert status_of(head) == 408
    assert b"Connection: close" in head
    assert json.loads(body)["error"]["code"] == "request_timeout"
    assert fake_litellm.received == []


async def test_a_slow_head_that_arrives_in_time_is_served_whatever_the_keepalive(
    fake_litellm: FakeLiteLLM,
) -> None:
    settings = make_settings(fake_litellm.url, memproxy={
        "timeouts": {"request_head": 3, "keepalive": 0.3}})
    async with served(settings) as port, connection(port) as (reader, writer):
        for piece in (b"GET /v1/models HTTP/1.1\r\n", b"Host: memproxy\r\n",
                      b"X-Slow: yes\r\n", b"\r\n"):
            writer.write(piece)
            await asyncio.sleep(0.25)  # 1 s in all: past the idle time, within the head's
        head, _ = await read_response(reader)
    assert status_of(head) == 200
    assert fake_litellm.last.path == "/v1/models"


async def test_idle_connections_are_closed_after_the_keepalive_time(
    proxy: ProxyFactory,
) -> None:
    client = await proxy(memproxy={"timeouts": {"keepalive": 0.5}})
    assert client.port is not None
    async with connection(client.port) as (reader, _):  # connects, never sends a byte
        assert await closed_within(reader, 3) == b""
    async with connection(client.port) as (reader, writer):  # one request, then silence
        writer.write(b"GET /v1/models HTTP/1.1\r\nHost: memproxy\r\n\r\n")
        head, _ = await read_response(reader)
        assert status_of(head) == 200
        started = time.monotonic()
        assert await closed_within(reader, 3) == b""
        assert time.monotonic() - started > 0.3


async def test_head_larger_than_max_header_size_gets_431_and_the_connection_closed(
    fake_litellm: FakeLiteLLM,
) -> None:
    settings = make_settings(fake_litellm.url, memproxy={"max_header_size": "4KiB"})
    # Each field is well within aiohttp's per-field limit: only the total is too much.
    fields = [f"X-Pad-{i}: {'a' * 1000}" for i in range(8)]
    async with served(settings) as port:
        async with connection(port) as (reader, writer):
            writer.write(post_head("/v1/chat/completions", "Content-Length: 2", *fields)
                         + b"{}")
            answer = await closed_within(reader, 5)
        head, _, body = answer.partition(b"\r\n\r\n")
        assert status_of(head) == 431
        assert json.loads(body)["error"]["code"] == "request_headers_too_large"
        assert fake_litellm.received == []

        # A head within the limit passes, however large the body in the same write.
        async with connection(port) as (reader, writer):
            writer.write(post_head("/v1/chat/completions", "Content-Length: 65536",
                                      *fields[:3]) + b"b" * 65536)
            head, _ = await read_response(reader)
        assert status_of(head) == 200
        assert len(fake_litellm.last.body) == 65536


# -- request bodies: time -----------------------------------------------------------------

async def test_stalled_body_gets_408_in_the_clients_dialect(
    proxy: ProxyFactory, fake_litellm: FakeLiteLLM
) -> None:
    client = await proxy(memproxy={"timeouts": {"request_body": 0.5}})
    assert client.port is not None
    async with connection(client.port) as (reader, writer):
        writer.write(post_head("/v1/messages", "Content-Length: 100") + b'{"mod')
        head, body = await read_response(reader)
    assert status_of(head) == 408
    assert json.loads(body)["error"]["type"] == "api_error"
    assert json.loads(body)["type"] == "error"  # Anthropic's shape, for /v1/messages
    assert fake_litellm.received == []


async def test_stalled_streamed_body_gets_408_and_frees_the_litellm_connection(
    proxy: ProxyFactory, fake_litellm: FakeLiteLLM
) -> None:
    client = await proxy(memproxy={"timeouts": {"request_body": 0.5}})
    assert client.port is not None and fake_litellm.server is not None
    assert fake_litellm.server.runner is not None
    upstream = fake_litellm.server.runner.server
    assert upstream is not None
    async with connection(client.port) as (reader, writer):
        writer.write(post_head("/v1/chat/completions", "Transfer-Encoding: chunked")
                     + b"5\r\nhello\r\n")
        head, body = await read_response(reader)
        assert status_of(head) == 408
        assert json.loads(body)["error"]["code"] == "request_timeout"
        # The client is still connected, but LiteLLM's connection is already gone.
        for _ in range(50):
            if not upstream.connections:
                break
            await asyncio.sleep(0.05)
        assert upstream.connections == []
    assert fake_litellm.received == []


# -- Expect -------------------------------------------------------------------------------

async def test_100_continue_comes_only_once_memproxy_takes_the_body(
    proxy: ProxyFactory, fake_litellm: FakeLiteLLM
) -> None:
    client = await proxy(memproxy={"max_body_size": "1KiB", "explicit_id": {"trust": "never"}})
    assert client.port is not None
    expect = "Expect: 100-continue"
    refused = [
        (post_head("/v1/chat/completions", expect, "Content-Length: 4096"), 413),
        (post_head("/v1/chat/completions", expect, "Content-Length: 2",
                      "x-memory-user-id: alice"), 403),
    ]
    for head_bytes, status in refused:
        async with connection(client.port) as (reader, writer):
            writer.write(head_bytes)  # and wait, as the client was asked to
            head, _ = await read_response(reader)
        assert status_of(head) == status, head
    assert fake_litellm.received == []

    for framing, body in (("Content-Length: 2", b"{}"),
                          ("Transfer-Encoding: chunked", b"2\r\n{}\r\n0\r\n\r\n")):
        async with connection(client.port) as (reader, writer):
            writer.write(post_head("/v1/chat/completions", expect, framing))
            interim, _ = await read_response(reader)
            assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
            writer.write(body)
            head, _ = await read_response(reader)
        assert status_of(head) == 200
        assert fake_litellm.last.body == b"{}"
        assert fake_litellm.last.all("expect") == []  # per hop: never forwarded


async def test_expectations_memproxy_does_not_know_are_forwarded(
    proxy: ProxyFactory, aiohttp_server: Any
) -> None:
    async def take_any_expectation(request: web.Request) -> None:
        pass

    litellm = FakeLiteLLM()  # one that, like LiteLLM, lets unknown expectations through
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", litellm.handle,
                         expect_handler=take_any_expectation)
    litellm.server = await aiohttp_server(app)
    client = await proxy(litellm_url=litellm.url)
    assert client.port is not None
    for value in ("something-else", "\xff"):
        async with connection(client.port) as (reader, writer):
            writer.write(post_head("/v1/chat/completions", "Content-Length: 2",
                                   f"Expect: {value}") + b"{}")
            head, _ = await read_response(reader)
        assert status_of(head) == 200, head
        # Forwarded, though aiohttp's header writer leaves out a byte that is not UTF-8.
        assert len(litellm.last.all("expect")) == 1
    assert litellm.received[0].all("expect") == ["something-else"]


# -- a reloaded max_body_size -------------------------------------------------------------

async def test_reloaded_larger_max_body_size_applies_to_bodies_with_a_length(
    fake_litellm: FakeLiteLLM, aiohttp_client: Any, tmp_path: Path
) -> None:
    config = tmp_path / "config.yaml"
    config.write_text("memproxy:\n  max_body_size: 1KiB\n")
    app = create_app(load_settings(config, litellm_url=fake_litellm.url))
    client = await aiohttp_client(app)
    config.write_text("memproxy:\n  max_body_size: 64KiB\n")
    assert app[RELOAD]().ok
    for framing, body in ((f"Content-Length: {8192}", b"x" * 8192),
                          ("Transfer-Encoding: chunked", b"2000\r\n" + b"x" * 8192
                           + b"\r\n0\r\n\r\n")):
        async with connection(client.port) as (reader, writer):
            writer.write(post_head("/v1/chat/completions", framing) + body)
            head, _ = await read_response(reader)
        assert status_of(head) == 200, head
        assert fake_litellm.last.body == b"x" * 8192


# -- the server's own log lines -----------------------------------------------------------

MALFORMED = [
    # a control character in a header value
    f"GET /v1/models?key={QUERY_KEY} HTTP/1.1\r\nHost: x\r\n"
    f"Authorization: Bearer {CLIENT_KEY}\x01\r\n\r\n",
    # an HTTP version that does not exist
    f"GET /v1/models?key={QUERY_KEY} HTTP/9.9\r\nAuthorization: Bearer {CLIENT_KEY}\r\n\r\n",
    # a header line without a colon
    f"GET /v1/models?key={QUERY_KEY} HTTP/1.1\r\nHost: x\r\n"
    f"Authorization Bearer {CLIENT_KEY}\r\n\r\n",
    # a negative Content-Length
    f"POST /v1/chat/completions?key={QUERY_KEY} HTTP/1.1\r\nHost: x\r\n"
    f"Authorization: Bearer {CLIENT_KEY}\r\nContent-Length: -5\r\n\r\n",
    # a broken chunk
    f"POST /v1/chat/completions?key={QUERY_KEY} HTTP/1.1\r\nHost: x\r\n"
    f"Authorization: Bearer {CLIENT_KEY}\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    # a request line too long
    f"GET /v1/models?key={QUERY_KEY}&pad={'a' * 20_000} HTTP/1.1\r\n"
    f"Authorization: Bearer {CLIENT_KEY}\r\n\r\n",
]


@pytest.mark.parametrize("event_loop", ["asyncio", "uvloop"])
async def test_malformed_requests_are_logged_as_json_lines_without_their_secrets(
    fake_litellm: FakeLiteLLM, tmp_path: Path, event_loop: str, serve_memproxy: ServeFactory
) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(f"memproxy:\n  event_loop: {event_loop}\n"
                      "  timeouts: {request_head: 0.5}\n  max_header_size: 32KiB\n")
    process = serve_memproxy(config, fake_litellm.url)
    port = process.port
    for request in MALFORMED:
        async with connection(port) as (reader, writer):
            writer.write(request.encode())
            answer = await closed_within(reader, 5)
        assert status_of(answer) == 400, request[:60]
    async with connection(port) as (reader, writer):  # stops halfway through its head
        writer.write(f"GET /v1/models?key={QUERY_KEY} HTTP/1.1\r\n"
                     f"Authorization: Bearer {CLIENT_KEY}\r\n".encode())
        assert status_of(await closed_within(reader, 5)) == 408
    async with connection(port) as (reader, writer):
        pads = "".join(f"X-Pad-{i}: {'a' * 9000}\r\n" for i in range(4))
        writer.write(f"GET /v1/models?key={QUERY_KEY} HTTP/1.1\r\n"
                     f"Authorization: Bearer {CLIENT_KEY}\r\n{pads}\r\n".encode())
        assert status_of(await closed_within(reader, 5)) == 431
    out, err = process.stop(signal.SIGINT, timeout=20)
    assert process.returncode == 0, err
    lines = (out + err).splitlines()
    records = [json.loads(line) for line in lines]  # every line is JSON
    for secret in (CLIENT_KEY, QUERY_KEY):
        assert secret not in out + err
    errors = [r for r in records if r["event"] == "http_error"]
    assert errors and all(r["status"] == 400 and r["error"] for r in errors)
    refused = sorted(r["status"] for r in records if r["event"] == "request_refused")
    assert refused == [408, 431]
