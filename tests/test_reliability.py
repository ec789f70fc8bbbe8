"""Trust, faults and hostile input: who may pick a memory space, and what breaks nothing."""

from __future__ import annotations

import string
import time
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, make_mocked_request
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from multidict import CIMultiDict

from memproxy.config import parse_settings
from memproxy.detection import build_detector_chain
from memproxy.identifiers import is_valid_id
from memproxy.routing import HOP_BY_HOP, Refusal, RoutingPolicy, client_request
from tests.helpers import FakeLiteLLM, ProxyFactory, raw_exchange, status_of

SECRET = "explicit-id-shared-secret-0001"


# -- who may choose a memory space ------------------------------------------------------

async def test_explicit_id_from_outside_the_trusted_networks_is_refused(
    proxy: ProxyFactory, fake_litellm: FakeLiteLLM
) -> None:
    client = await proxy(memproxy={"explicit_id": {"networks": ["10.0.0.0/8"]}})
    resp = await client.post("/v1/messages", data=b"{}", headers={"x-memory-user-id": "alice"})
    assert resp.status == 403
    body = await resp.json()
    assert body["type"] == "error"
    assert body["error"]["type"] == "permission_error"
    assert "x-memory-user-id" in body["error"]["message"]
    assert fake_litellm.received == []
    # Without the header the same client is served as usual.
    resp = await client.post("/v1/messages", data=b"{}")
    assert resp.status == 200


async def test_explicit_id_from_loopback_is_honoured_by_default(
    proxy: ProxyFactory, fake_litellm: FakeLiteLLM
) -> None:
    client = await proxy()
    resp = await client.post("/v1/chat/completions", data=b"{}",
                             headers={"x-memory-user-id": "alice"})
    assert resp.status == 200
    assert fake_litellm.last.all("x-sm-user-id") == ["alice"]


async def test_explicit_id_with_a_shared_secret(
    proxy: ProxyFactory, fake_litellm: FakeLiteLLM
) -> None:
    client = await proxy(memproxy={"explicit_id": {"trust": "secret", "secret": SECRET}})
    resp = await client.post("/v1/chat/completions", data=b"{}",
                             headers={"x-memory-user-id": "alice"})
    assert resp.status == 403
    resp = await client.post("/v1/chat/completions", data=b"{}", headers={
        "x-memory-user-id": "alice", "x-memproxy-secret": "wrong-secret-wrong-secret"})
    assert resp.status == 403
    resp = await client.post("/v1/chat/completions", data=b"{}", headers={
        "x-memory-user-id": "alice", "x-memproxy-secret": SECRET})
    assert resp.status == 200
    assert fake_litellm.last.all("x-sm-user-id") == ["alice"]
    assert fake_litellm.last.all("x-memproxy-secret") == []


async def test_explicit_id_never_honoured(proxy: ProxyFactory) -> None:
    client = await proxy(memproxy={"explicit_id": {"trust": "never"}})
    resp = await client.post("/v1/chat/completions", data=b"{}",
                             headers={"x-memory-user-id": "alice"})
    assert resp.status == 403
    assert (await resp.json())["error"]["code"] == "explicit_id_not_allowed"


async def test_unrecognised_clients_can_be_given_no_memory(
    proxy: ProxyFactory, fake_litellm: FakeLiteLLM
) -> None:
    client = await proxy(memproxy={"unidentified": "no_memory",
                                   "headers": {"supermemory_api_key": "sm-key-0001"}})
    resp = await client.post("/v1/chat/completions", data=b"{}",
                             headers={"x-sm-user-id": "spoof", "session-id": "s1"})
    assert resp.status == 200
    got = fake_litellm.last
    assert got.all("x-sm-user-id") == []
    assert got.all("x-supermemory-api-key") == []
    assert got.all("x-sm-conversation-id") == []
    assert "x-memproxy-user-id" not in resp.headers
    resp = await client.post("/v1/chat/completions", data=b"{}",
                             headers={"x-memory-user-id": "alice"})
    assert fake_litellm.last.all("x-sm-user-id") == ["alice"]


async def test_unrecognised_clients_can_be_refused_in_their_dialect(
    proxy: ProxyFactory, fake_litellm: FakeLiteLLM
) -> None:
    client = await proxy(memproxy={"unidentified": "refuse"})
    resp = await client.post("/v1/messages", data=b"{}")
    assert resp.status == 403
    assert (await resp.json())["error"]["type"] == "permission_error"
    resp = await client.post("/v1/chat/completions", data=b"{}")
    assert (await resp.json())["error"]["code"] == "unidentified_client"
    assert fake_litellm.received == []


# -- faults upstream ----------------------------------------------------------------------

async def test_litellm_stalling_mid_stream_ends_the_stream_with_an_error_event(
    proxy: ProxyFactory,
) -> None:
    client = await proxy(memproxy={"timeouts": {"between_chunks": 0.3}})
    started = time.monotonic()
    resp = await client.post("/sse-then-stall", data=b"{}")
    body = await resp.read()
    assert time.monotonic() - started < 5
    assert body.startswith(b'data: {"n": 0}\n\ndata: {"n": 1}\n\n')
    assert b"upstream_stream_failed" in body


async def test_litellm_reset_mid_body_gets_a_clean_502(proxy: ProxyFactory) -> None:
    client = await proxy()
    resp = await client.get("/truncated")
    assert resp.status == 502
    assert (await resp.json())["error"]["code"] == "upstream_failed"
    # and memproxy carries on
    resp = await client.get("/v1/models")
    assert resp.status == 200


# -- hostile and malformed input ----------------------------------------------------------

async def still_serving(client: TestClient[web.Request, web.Application]) -> None:
    resp = await client.get("/v1/models")
    assert resp.status == 200


@pytest.mark.parametrize("garbage", [
    b"GARBAGE\r\n\r\n",
    b"GET /v1/models HTTP/9.9\r\n\r\n",
    b"POST /v1/messages HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\n\r\n",
    b"POST /v1/messages HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    b"\x00\x01\x02\xff" * 100,
])
async def test_malformed_http_gets_400_and_harms_nothing(
    proxy: ProxyFactory, fake_litellm: FakeLiteLLM, garbage: bytes
) -> None:
    client = await proxy()
    response = await raw_exchange(client, garbage)
    if response:
        assert status_of(response) == 400
    assert all(r.path != "/v1/messages" for r in fake_litellm.received)
    await still_serving(client)


async def test_oversized_header_is_refused(proxy: ProxyFactory) -> None:
    client = await proxy()
    request = (b"GET /v1/models HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 200_000
               + b"\r\nConnection: close\r\n\r\n")
    response = await raw_exchange(client, request)
    assert status_of(response) in (400, 431)
    await still_serving(client)


@pytest.mark.parametrize("value", [
    b"alice\x01", b"al\x7fice", b"\xff\xfealice", "élise".encode(), b"a" * 10_000,
    b"alice bob", b"alice\tbob",
])
async def test_unusable_explicit_id_on_the_wire_gets_400(
    proxy: ProxyFactory, fake_litellm: FakeLiteLLM, value: bytes
) -> None:
    client = await proxy()
    request = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n"
               b"x-memory-user-id: " + value + b"\r\nConnection: close\r\n\r\n{}")
    response = await raw_exchange(client, request)
    assert status_of(response) == 400
    assert fake_litellm.received == []


async def test_header_injection_attempts_never_reach_litellm(
    proxy: ProxyFactory, fake_litellm: FakeLiteLLM
) -> None:
    client = await proxy()
    request = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n"
               b"x-memory-user-id: alice\rx-sm-user-id: evil\r\nConnection: close\r\n\r\n{}")
    response = await raw_exchange(client, request)
    assert status_of(response) == 400
    for item in fake_litellm.received:
        assert item.all("x-sm-user-id") != ["evil"]


@pytest.mark.parametrize("target", [
    b"//v1//models", b"/v1/../admin", b"/v1/%2e%2e/admin", b"/v1/models%2F..%2Fsecret",
    b"/v1/./models?x=/../y", b"/%2F%2Fevil.example/v1",
])
async def test_path_tricks_reach_litellm_exactly_as_sent(
    proxy: ProxyFactory, fake_litellm: FakeLiteLLM, target: bytes
) -> None:
    client = await proxy()
    response = await raw_exchange(
        client, b"GET " + target + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert status_of(response) == 200
    assert fake_litellm.last.raw_path == target.decode()
    assert len(fake_litellm.received) == 1


@pytest.mark.parametrize("target", [b"http://evil.example/v1/models", b"evil.example:443"])
async def test_requests_for_other_hosts_are_refused(
    proxy: ProxyFactory, fake_litellm: FakeLiteLLM, target: bytes
) -> None:
    client = await proxy()
    method = b"CONNECT" if b"/" not in target else b"GET"
    response = await raw_exchange(
        client, method + b" " + target + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert status_of(response) == (404 if method == b"CONNECT" else 400)
    assert fake_litellm.received == []


@pytest.mark.parametrize("method", ["PROPFIND", "PURGE", "OPTIONS", "TRACE"])
async def test_unknown_methods_are_forwarded_as_they_are(
    proxy: ProxyFactory, fake_litellm: FakeLiteLLM, method: str
) -> None:
    client = await proxy()
    resp = await client.request(method, "/v1/anything")
    assert resp.status == 200
    assert fake_litellm.last.method == method


# -- properties of header hygiene ---------------------------------------------------------

def make_policy(**memproxy: Any) -> RoutingPolicy:
    config = {"user_id_mappings": {"header_patterns": [
        {"header": "user-agent", "pattern": "^claude-cli/", "user_id": "claude-code"}]},
        "memproxy": memproxy}
    settings = parse_settings(config)
    return RoutingPolicy(settings, build_detector_chain(settings, entry_points=False))


HEADER_NAMES = st.sampled_from([
    "x-sm-user-id", "X-SM-User-Id", "x-memory-user-id", "X-Memory-User-Id", "user-agent",
    "authorization", "x-api-key", "x-supermemory-api-key", "connection", "keep-alive", "te",
    "x-claude-code-session-id", "session-id", "x-sm-conversation-id", "anthropic-beta",
    "x-custom", "content-type",
])
HEADER_VALUES = st.one_of(
    st.text(alphabet=string.ascii_letters + string.digits + "._:@+-", min_size=1, max_size=20),
    st.sampled_from(["claude-cli/2.0 (external, cli)", "", " ", "a" * 200, "x\x01y", "é"]),
    st.text(max_size=30),
)


@settings(max_examples=400, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(headers=st.lists(st.tuples(HEADER_NAMES, HEADER_VALUES), max_size=12),
       policy=st.sampled_from(["share", "no_memory", "refuse"]))
def test_any_client_headers_give_exactly_one_valid_user_id_and_no_explicit_header(
    headers: list[tuple[str, str]], policy: str
) -> None:
    routing = make_policy(unidentified=policy)
    request = make_mocked_request("POST", "/v1/chat/completions", headers=CIMultiDict(headers))
    out, client = client_request(request.headers, remote="127.0.0.1")
    try:
        route = routing.route(client)
    except Refusal as exc:
        assert exc.status in (400, 403)
        return
    routing.rewrite_headers(out, route)
    sent_ids = out.getall("x-sm-user-id", [])
    if route.with_memory:
        assert len(sent_ids) == 1 and is_valid_id(sent_ids[0])
        assert route.user_id == sent_ids[0]
    else:
        assert sent_ids == []
    assert "x-memory-user-id" not in out
    assert "x-supermemory-api-key" not in out
    for name in out:
        assert name.lower() not in HOP_BY_HOP
    client_conversation = [v for n, v in headers if n.lower() == "x-sm-conversation-id"]
    if not route.with_memory:
        # Nothing may tie a request without memory to a memory space.
        assert "x-sm-conversation-id" not in out
    elif client_conversation:
        assert out.getall("x-sm-conversation-id") == client_conversation
    else:
        assert all(is_valid_id(v) for v in out.getall("x-sm-conversation-id", []))
        assert len(out.getall("x-sm-conversation-id", [])) <= 1
    # Everything else the client sent goes through unchanged.
    owned = {"x-sm-user-id", "x-memory-user-id", "x-supermemory-api-key", "x-sm-conversation-id"}
    for name, value in headers:
        if name.lower() not in owned | HOP_BY_HOP:
            assert value in out.getall(name, [])
