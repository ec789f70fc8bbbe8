"""What crosses the wire between a client, memproxy and LiteLLM."""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import itertools
import os
import time

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, unused_port
from yarl import URL

from tests.helpers import FakeLiteLLM, ProxyFactory


def raw_url(client: TestClient[web.Request, web.Application], path: str) -> URL:
    """The URL for ``path`` exactly as written, with no client-side normalisation."""
    return URL(str(client.make_url("/")).rstrip("/") + path, encoded=True)


MAPPINGS = {"header_patterns": [
    {"header": "user-agent", "pattern": "^claude-cli/", "user_id": "claude-code"},
]}


async def test_injects_detected_user_id_and_replaces_a_spoofed_one(
    proxy: ProxyFactory, fake_litellm: FakeLiteLLM
) -> None:
    client = await proxy(user_id_mappings=MAPPINGS)
    resp = await client.post("/v1/chat/completions", data=b"{}", headers={
        "User-Agent": "claude-cli/2.0.14 (external, cli)", "x-sm-user-id": "someone-else",
    })
    assert resp.status == 200
    assert fake_litellm.last.all("x-sm-user-id") == ["claude-code"]
    assert resp.headers["x-memproxy-user-id"] == "claude-code"
    assert resp.headers["x-memproxy-detector"] == "header_patterns"


async def test_explicit_header_is_used_but_never_forwarded(
    proxy: ProxyFactory, fake_litellm: FakeLiteLLM
) -> None:
    client = await proxy()
    await client.post("/v1/messages", data=b"{}", headers={"x-memory-user-id": "alice"})
    assert fake_litellm.last.all("x-sm-user-id") == ["alice"]
    assert fake_litellm.last.all("x-memory-user-id") == []


async def test_request_passes_through_byte_for_byte(
    proxy: ProxyFactory, fake_litellm: FakeLiteLLM
) -> None:
    client = await proxy()
    body = os.urandom(10_000)  # not even JSON: memproxy must not care
    resp = await client.session.request(
        "PATCH", raw_url(client, "/v1/some/new/endpoint?beta=true&x=%2Fa%20b"), data=body,
        headers={"Authorization": "Bearer sk-client-key", "x-api-key": "sk-ant",
                 "anthropic-beta": "tools-2024", "User-Agent": "my-tool/1.0",
                 "Accept-Encoding": "identity"},
    )
    assert resp.status == 200
    got = fake_litellm.last
    assert got.method == "PATCH"
    assert got.raw_path == "/v1/some/new/endpoint?beta=true&x=%2Fa%20b"
    assert got.body == body
    assert got.header("authorization") == "Bearer sk-client-key"
    assert got.header("x-api-key") == "sk-ant"
    assert got.header("anthropic-beta") == "tools-2024"
    assert got.header("user-agent") == "my-tool/1.0"
    assert got.header("accept-encoding") == "identity"


async def test_memproxy_adds_no_headers_of_its_own_client_library(
    proxy: ProxyFactory, fake_litellm: FakeLiteLLM
) -> None:
    client = await proxy()
    await client.get("/v1/models", skip_auto_headers=["User-Agent", "Accept-Encoding", "Accept"])
    names = {k.lower() for k, _ in fake_litellm.last.headers}
    assert "user-agent" not in names
    assert "accept-encoding" not in names
    assert "content-type" not in names


async def test_hop_by_hop_headers_are_dropped_both_ways(
    proxy: ProxyFactory, fake_litellm: FakeLiteLLM
) -> None:
    client = await proxy()
    resp = await client.post("/v1/chat/completions", data=b"{}", headers={
        "Connection": "keep-alive, X-Per-Hop", "X-Per-Hop": "1", "Keep-Alive": "timeout=5",
        "TE": "trailers", "Proxy-Authorization": "Basic abc", "Upgrade": "h2c",
        "X-End-To-End": "kept",
    })
    assert resp.status == 200
    names = {k.lower() for k, _ in fake_litellm.last.headers}
    assert not names & {"x-per-hop", "keep-alive", "te", "proxy-authorization", "upgrade"}
    assert fake_litellm.last.header("x-end-to-end") == "kept"
    assert resp.headers["x-upstream"] == "kept"
    assert "Keep-Alive" not in resp.headers


async def test_upstream_errors_pass_through_untouched(proxy: ProxyFactory) -> None:
    client = await proxy()
    for code in (400, 401, 404, 429, 500, 503):
        resp = await client.post(f"/status/{code}", data=b"{}")
        assert resp.status == code
        assert await resp.json() == {"error": {"message": "upstream says no"}}
        assert resp.headers["x-upstream"] == "kept"


async def test_redirects_are_returned_not_followed(
    proxy: ProxyFactory, fake_litellm: FakeLiteLLM
) -> None:
    client = await proxy()
    resp = await client.get("/redirect", allow_redirects=False)
    assert resp.status == 302
    assert resp.headers["Location"] == "/elsewhere"
    assert [r.path for r in fake_litellm.received] == ["/redirect"]


async def test_compressed_responses_pass_through_still_compressed(proxy: ProxyFactory) -> None:
    client = await proxy()
    resp = await client.get("/gzip", auto_decompress=False)
    assert resp.headers["Content-Encoding"] == "gzip"
    assert gzip.decompress(await resp.read()) == b'{"zipped": true}'


async def test_large_response_arrives_whole(proxy: ProxyFactory) -> None:
    client = await proxy()
    resp = await client.get("/big-response")
    assert await resp.read() == b"x" * (3 * 1024 * 1024)


async def test_large_request_body_is_forwarded_intact(
    proxy: ProxyFactory, fake_litellm: FakeLiteLLM
) -> None:
    client = await proxy()
    body = os.urandom(24 * 1024 * 1024)
    resp = await client.post("/v1/messages", data=body)
    assert resp.status == 200
    assert hashlib.sha256(fake_litellm.last.body).digest() == hashlib.sha256(body).digest()


async def test_chunked_request_body_is_forwarded_intact(
    proxy: ProxyFactory, fake_litellm: FakeLiteLLM
) -> None:
    client = await proxy()
    parts = [os.urandom(70_000) for _ in range(30)]

    async def chunks():  # type: ignore[no-untyped-def]
        for part in parts:
            yield part

    resp = await client.post("/v1/messages", data=chunks())
    assert resp.status == 200
    assert fake_litellm.last.body == b"".join(parts)


async def test_stream_events_arrive_one_by_one_as_sent(proxy: ProxyFactory) -> None:
    client = await proxy()
    resp = await client.post("/sse?n=6&gap=0.05", data=b'{"stream": true}')
    assert resp.headers["Content-Type"].startswith("text/event-stream")
    assert resp.headers["X-Accel-Buffering"] == "no"
    reads: list[tuple[float, bytes]] = []
    async for chunk in resp.content.iter_any():
        reads.append((time.monotonic(), chunk))
    events = [c for _, c in reads]
    # Six events 50 ms apart and the final [DONE] (written straight after the
    # last event's pause): each of the first six arrives on its own.
    assert events[:6] == [f'data: {{"n": {i}}}\n\n'.encode() for i in range(6)]
    gaps = [b[0] - a[0] for a, b in itertools.pairwise(reads[:6])]
    assert min(gaps) > 0.03, gaps


async def test_conversation_id_comes_from_the_client_session_header(
    proxy: ProxyFactory, fake_litellm: FakeLiteLLM
) -> None:
    client = await proxy()
    await client.post("/v1/messages", data=b"{}",
                      headers={"X-Claude-Code-Session-Id": "3f2a-77"})
    assert fake_litellm.last.header("x-sm-conversation-id") == "3f2a-77"
    await client.post("/v1/responses", data=b"{}", headers={"session-id": "codex-1"})
    assert fake_litellm.last.header("x-sm-conversation-id") == "codex-1"
    await client.post("/v1/messages", data=b"{}", headers={
        "X-Claude-Code-Session-Id": "3f2a-77", "x-sm-conversation-id": "mine"})
    assert fake_litellm.last.all("x-sm-conversation-id") == ["mine"]
    await client.post("/v1/messages", data=b"{}", headers={"session-id": "bad value!"})
    assert fake_litellm.last.header("x-sm-conversation-id") is None


async def test_supermemory_key_is_added_when_configured_and_never_taken_from_clients(
    proxy: ProxyFactory, fake_litellm: FakeLiteLLM, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("SUPERMEMORY_API_KEY", raising=False)
    client = await proxy()
    await client.post("/v1/messages", data=b"{}", headers={"x-supermemory-api-key": "client"})
    assert fake_litellm.last.header("x-supermemory-api-key") is None

    monkeypatch.setenv("SUPERMEMORY_API_KEY", "sm-secret-from-env")
    client = await proxy()
    await client.post("/v1/messages", data=b"{}", headers={"x-supermemory-api-key": "client"})
    assert fake_litellm.last.all("x-supermemory-api-key") == ["sm-secret-from-env"]


async def test_litellm_end_user_id_follows_the_memory_user_when_enabled(
    proxy: ProxyFactory, fake_litellm: FakeLiteLLM
) -> None:
    client = await proxy()
    await client.post("/v1/messages", data=b"{}", headers={"x-memory-user-id": "alice"})
    assert fake_litellm.last.header("x-litellm-end-user-id") is None
    client = await proxy(memproxy={"headers": {"litellm_end_user_id": True}})
    await client.post("/v1/messages", data=b"{}", headers={
        "x-memory-user-id": "alice", "x-litellm-end-user-id": "spoofed"})
    assert fake_litellm.last.all("x-litellm-end-user-id") == ["alice"]


@pytest.mark.parametrize("path, dialect", [
    ("/v1/chat/completions", "openai"), ("/v1/messages", "anthropic"),
    ("/v1/messages/count_tokens", "anthropic"),
])
async def test_invalid_explicit_id_gets_400_in_the_clients_dialect(
    proxy: ProxyFactory, fake_litellm: FakeLiteLLM, path: str, dialect: str
) -> None:
    client = await proxy()
    resp = await client.post(path, data=b"{}", headers={"x-memory-user-id": "a" * 500})
    assert resp.status == 400
    body = await resp.json()
    if dialect == "anthropic":
        assert body["type"] == "error"
        assert body["error"]["type"] == "invalid_request_error"
        assert "x-memory-user-id" in body["error"]["message"]
    else:
        assert body["error"]["code"] == "invalid_user_id"
        assert "x-memory-user-id" in body["error"]["message"]
    assert fake_litellm.received == []


async def test_body_over_the_limit_gets_413(
    proxy: ProxyFactory, fake_litellm: FakeLiteLLM
) -> None:
    client = await proxy(memproxy={"max_body_size": 1000})
    resp = await client.post("/v1/messages", data=b"x" * 1001)
    assert resp.status == 413
    assert (await resp.json())["error"]["type"] == "request_too_large"

    async def chunks():  # type: ignore[no-untyped-def]
        for _ in range(10):
            yield b"y" * 500

    resp = await client.post("/v1/chat/completions", data=chunks())
    assert resp.status == 413
    assert (await resp.json())["error"]["code"] == "request_too_large"


async def test_litellm_down_gets_502_in_the_clients_dialect(proxy: ProxyFactory) -> None:
    client = await proxy(litellm_url=f"http://127.0.0.1:{unused_port()}")
    resp = await client.post("/v1/chat/completions", data=b"{}")
    assert resp.status == 502
    assert "cannot reach LiteLLM" in (await resp.json())["error"]["message"]
    resp = await client.post("/v1/messages", data=b"{}")
    assert resp.status == 502
    assert (await resp.json())["type"] == "error"


async def test_litellm_stalling_gets_504(proxy: ProxyFactory) -> None:
    client = await proxy(memproxy={"timeouts": {"between_chunks": 0.3}})
    started = time.monotonic()
    resp = await client.post("/stall", data=b"{}")
    assert resp.status == 504
    assert (await resp.json())["error"]["code"] == "upstream_timeout"
    assert time.monotonic() - started < 5


async def test_stream_that_breaks_off_ends_with_an_error_event(proxy: ProxyFactory) -> None:
    client = await proxy()
    resp = await client.post("/sse-then-reset", data=b"{}")
    body = await resp.read()
    assert body.startswith(b'data: {"n": 0}\n\ndata: {"n": 1}\n\n')
    assert body.rstrip().endswith(b"}")
    assert b"upstream_stream_failed" in body


async def test_client_disconnect_closes_the_upstream_stream(
    proxy: ProxyFactory, fake_litellm: FakeLiteLLM
) -> None:
    client = await proxy()
    resp = await client.post("/endless", data=b"{}")
    await resp.content.readline()
    resp.close()
    await asyncio.wait_for(fake_litellm.stream_closed.wait(), timeout=1.0)


async def test_requests_reuse_one_upstream_connection(
    proxy: ProxyFactory, fake_litellm: FakeLiteLLM
) -> None:
    client = await proxy()
    for _ in range(5):
        resp = await client.post("/v1/chat/completions", data=b"{}")
        assert resp.status == 200
    assert len({item.peer for item in fake_litellm.received}) == 1


async def test_head_request_keeps_upstream_content_length(proxy: ProxyFactory) -> None:
    client = await proxy()
    resp = await client.head("/v1/models")
    assert resp.status == 200
    assert int(resp.headers["Content-Length"]) > 0
    assert await resp.read() == b""
