"""Attacks on identity and on memproxy's own endpoints, each done the way an attacker would.

Who decides a memory space must not be steerable: the API-key hash follows the
key LiteLLM really authenticates, an ambiguous explicit id is refused, a request
without memory carries nothing that ties it to a space, and the endpoints that
show every space (or change the config) answer only the operator.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import subprocess
import sys
from pathlib import Path
from typing import Any, TextIO

import pytest
from aiohttp.test_utils import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from multidict import CIMultiDict, CIMultiDictProxy

from memproxy import ClientRequest, DetectorSpec, hookimpl
from memproxy.detectors.api_key_hash import litellm_api_key
from tests.helpers import FakeLiteLLM, ProxyFactory, raw_exchange, read_log

SECRET = "identity-hash-secret-0123456789"
ADMIN_TOKEN = "admin-token-0123456789abcdef"
CLAUDE = "claude-cli/2.1.197 (external, cli)"
PATTERNS = {"header_patterns": [
    {"header": "user-agent", "pattern": "^claude-cli/", "user_id": "claude-code"},
    {"header": "user-agent", "pattern": "^curl/", "user_id": "curl"},
]}


def hashed(key: str) -> str:
    return "key-" + hmac.new(SECRET.encode(), key.encode(), hashlib.sha256).hexdigest()[:16]


def key_hash_config(**options: Any) -> dict[str, Any]:
    return {"user_id_mappings": PATTERNS, "memproxy": {"detectors": {"api_key_hash": {
        "enabled": True, "options": {"secret": SECRET, **options}}}}}


async def sent_user_id(client: TestClient[Any, Any], fake: FakeLiteLLM, path: str = "/v1/chat"
                       "/completions", **headers: str) -> str | None:
    resp = await client.post(path, data=b"{}", headers=headers)
    assert resp.status == 200, await resp.text()
    return fake.last.header("x-sm-user-id")


# -- the API-key hash hashes the key LiteLLM checks -----------------------------------------

@pytest.mark.parametrize("headers, path, key", [
    ({"x-litellm-api-key": "sk-own", "Authorization": "Bearer sk-victim"}, None, "sk-own"),
    ({"x-litellm-api-key": "Bearer sk-own"}, None, "sk-own"),
    ({"Authorization": "Basic sk-basic"}, None, "sk-basic"),
    ({"Authorization": "bearer sk-lower"}, None, "sk-lower"),
    ({"x-goog-api-key": "sk-goog"}, None, "sk-goog"),
    ({"Ocp-Apim-Subscription-Key": "sk-apim"}, None, "sk-apim"),
    ({"api-key": "sk-azure", "x-api-key": "sk-anthropic"}, None, "sk-azure"),
    ({}, "/v1beta/models/gemini-2.5-flash:generateContent?key=sk-query", "sk-query"),
])
async def test_api_key_hash_files_the_request_under_the_key_litellm_authenticates(
    proxy: ProxyFactory, fake_litellm: FakeLiteLLM, headers: dict[str, str], path: str | None,
    key: str,
) -> None:
    client = await proxy(**key_hash_config())
    user_id = await sent_user_id(client, fake_litellm, path or "/v1/chat/completions",
                                 **headers)
    assert user_id == hashed(key)


async def test_a_key_listed_in_connection_is_not_hashed_since_litellm_never_sees_it(
    proxy: ProxyFactory, fake_litellm: FakeLiteLLM
) -> None:
    client = await proxy(**key_hash_config())
    user_id = await sent_user_id(client, fake_litellm, Authorization="Bearer sk-victim",
                                 Connection="authorization", **{"x-api-key": "sk-own"})
    assert "authorization" not in {name.lower() for name, _ in fake_litellm.last.headers}
    assert user_id == hashed("sk-own")


async def test_a_custom_litellm_key_header_is_followed(
    proxy: ProxyFactory, fake_litellm: FakeLiteLLM
) -> None:
    client = await proxy(**key_hash_config(),
                         general_settings={"litellm_key_header_name": "X-Team-Key"})
    user_id = await sent_user_id(client, fake_litellm, Authorization="Bearer sk-other",
                                 **{"x-team-key": "Bearer sk-team"})
    assert user_id == hashed("sk-team")


_KEY_HEADERS = ["x-litellm-api-key", "authorization", "api-key", "x-api-key",
                "x-goog-api-key", "ocp-apim-subscription-key", "x-team-key"]
_KEY_VALUES = st.one_of(
    st.sampled_from(["", "sk-a", "Bearer sk-b", "bearer sk-c", "Basic sk-d", "BEARER sk-e",
                     "Bearer Bearer sk-f", "Token sk-g", "AWS4-HMAC-SHA256 Credential=Bearer "
                     "sk-h/20260101/us/bedrock/aws4_request", "AWS4-HMAC-SHA256 x"]),
    st.text(alphabet="abcBeareasicr -", max_size=12))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(headers=st.lists(st.tuples(st.sampled_from(_KEY_HEADERS), _KEY_VALUES), max_size=6),
       path=st.sampled_from(["/v1/chat/completions", "/v1beta/models/g:generateContent"]),
       query_key=st.sampled_from(["", "sk-q"]))
def test_the_key_read_is_the_key_litellm_reads(
    headers: list[tuple[str, str]], path: str, query_key: str
) -> None:
    """Compared with LiteLLM's own parsing (litellm.proxy.auth.user_api_key_auth)."""
    auth = pytest.importorskip("litellm.proxy.auth.user_api_key_auth")
    from starlette.requests import Request

    query = f"key={query_key}" if query_key else ""
    scope = {"type": "http", "method": "POST", "path": path, "query_string": query.encode(),
             "headers": [(n.encode(), v.encode()) for n, v in headers]}
    request = Request(scope)

    def security(name: str) -> str | None:  # FastAPI's APIKeyHeader: missing or empty is None
        return request.headers.get(name) or None

    theirs, _ = auth.get_api_key(
        custom_litellm_key_header=security("x-litellm-api-key"),
        api_key=security("authorization"),
        azure_api_key_header=security("api-key"),
        anthropic_api_key_header=security("x-api-key"),
        google_ai_studio_api_key_header=security("x-goog-api-key"),
        azure_apim_header=security("ocp-apim-subscription-key"),
        pass_through_endpoints=None, route=path, request=request)
    if "x-team-key" in request.headers:
        theirs = auth.get_api_key_from_custom_header(request, "x-team-key")
    ours = litellm_api_key(ClientRequest(CIMultiDictProxy(CIMultiDict(headers)), path, query),
                           "x-team-key")
    assert ours == (theirs or None)


# -- teams: one space per person, or per person and tool ------------------------------------

async def test_api_key_hash_separates_people_who_use_the_same_tool(
    proxy: ProxyFactory, fake_litellm: FakeLiteLLM
) -> None:
    client = await proxy(**key_hash_config())
    alice = await sent_user_id(client, fake_litellm, Authorization="Bearer sk-alice",
                               **{"User-Agent": CLAUDE})
    bob = await sent_user_id(client, fake_litellm, Authorization="Bearer sk-bob",
                             **{"User-Agent": CLAUDE})
    assert (alice, bob) == (hashed("sk-alice"), hashed("sk-bob"))


async def test_per_tool_gives_each_person_a_space_per_tool(
    proxy: ProxyFactory, fake_litellm: FakeLiteLLM
) -> None:
    client = await proxy(**key_hash_config(per_tool=True))
    ids = {
        (key, agent): await sent_user_id(client, fake_litellm, Authorization=f"Bearer {key}",
                                         **{"User-Agent": agent})
        for key in ("sk-alice", "sk-bob") for agent in (CLAUDE, "curl/8.5", "Unknown/1")
    }
    assert ids[("sk-alice", CLAUDE)] == hashed("sk-alice") + ":claude-code"
    assert ids[("sk-alice", "curl/8.5")] == hashed("sk-alice") + ":curl"
    assert ids[("sk-alice", "Unknown/1")] == hashed("sk-alice")
    assert len(set(ids.values())) == len(ids)


# -- ambiguous and memory-less requests ------------------------------------------------------

@pytest.mark.parametrize("path, dialect_key", [("/v1/chat/completions", "error"),
                                               ("/v1/messages", "type")])
async def test_an_explicit_id_sent_twice_with_different_values_is_refused(
    proxy: ProxyFactory, fake_litellm: FakeLiteLLM, path: str, dialect_key: str
) -> None:
    client = await proxy()

    def request(first: bytes, second: bytes) -> bytes:
        return (b"POST " + path.encode() + b" HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n"
                b"x-memory-user-id: " + first + b"\r\nX-Memory-User-Id: " + second +
                b"\r\nConnection: close\r\n\r\n{}")

    answer = await raw_exchange(client, request(b"alice", b"bob"))
    assert answer.startswith(b"HTTP/1.1 400")
    assert dialect_key in json.loads(answer.partition(b"\r\n\r\n")[2])
    assert fake_litellm.received == []
    assert (await raw_exchange(client, request(b"alice", b" alice"))).startswith(b"HTTP/1.1 200")
    assert fake_litellm.last.all("x-sm-user-id") == ["alice"]


async def test_a_request_without_memory_carries_no_conversation_id(
    proxy: ProxyFactory, fake_litellm: FakeLiteLLM
) -> None:
    client = await proxy(memproxy={"unidentified": "no_memory"})
    resp = await client.post("/v1/chat/completions", data=b"{}", headers={
        "x-sm-conversation-id": "conv-1", "session-id": "s-2"})
    assert resp.status == 200
    seen = {name.lower() for name, _ in fake_litellm.last.headers}
    assert "x-sm-conversation-id" not in seen
    assert "x-sm-user-id" not in seen


# -- memproxy's own endpoints answer only the operator ---------------------------------------

ADMIN_GETS = ["/metrics", "/memory-routing/status", "/memory-routing/unmatched"]


async def test_admin_endpoints_refuse_clients_outside_the_admin_networks(
    proxy: ProxyFactory,
) -> None:
    client = await proxy(memproxy={"admin": {"networks": ["10.0.0.0/8"]}})
    for path in ADMIN_GETS:
        resp = await client.get(path)
        assert resp.status == 403, path
        assert (await resp.json())["error"]["code"] == "admin_not_allowed"
    assert (await client.post("/memory-routing/reload", json={})).status == 403
    # The caller's own routing and the health probe stay open.
    assert (await client.get("/memory-routing/info")).status == 200
    assert (await client.get("/health")).status == 200


async def test_admin_token_opens_the_endpoints_from_anywhere(proxy: ProxyFactory) -> None:
    client = await proxy(memproxy={"admin": {"networks": [], "token": ADMIN_TOKEN}})
    auth = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    for path in ADMIN_GETS:
        assert (await client.get(path, headers=auth)).status == 200, path
        assert (await client.get(path, headers={"Authorization": "Bearer wrong"})).status == 403


async def test_metrics_can_be_opened_to_every_scraper(proxy: ProxyFactory) -> None:
    client = await proxy(memproxy={"admin": {"networks": [], "metrics": "anyone"}})
    assert (await client.get("/metrics")).status == 200
    assert (await client.get("/memory-routing/status")).status == 403


async def test_made_up_ids_that_litellm_refuses_do_not_use_up_metric_labels(
    proxy: ProxyFactory,
) -> None:
    client = await proxy(memproxy={"explicit_id": {"trust": "anyone"}})
    for i in range(120):
        await client.get("/status/401", headers={"x-memory-user-id": f"made-up-{i}"})
    await client.get("/v1/models", headers={"x-memory-user-id": "real-user"})
    text = await (await client.get("/metrics")).text()
    assert "made-up-" not in text
    assert 'user_id="real-user"' in text
    assert 'user_id="other"' in text


async def test_reload_refuses_a_cross_site_post(proxy: ProxyFactory) -> None:
    client = await proxy()
    cross_site = await client.post("/memory-routing/reload", data=b"x", headers={
        "Content-Type": "text/plain", "Origin": "http://evil.example"})
    assert cross_site.status == 403
    form = await client.post("/memory-routing/reload", data=b"a=b", headers={
        "Content-Type": "application/x-www-form-urlencoded"})
    assert form.status == 403
    host = f"127.0.0.1:{client.port}"
    same_origin = await client.post("/memory-routing/reload", json={}, headers={
        "Origin": f"http://{host}"})
    assert same_origin.status != 403  # 400: started without a config file


async def test_admin_endpoints_refuse_a_rebound_host_name(proxy: ProxyFactory) -> None:
    client = await proxy()
    rebound = await client.get("/memory-routing/status", headers={"Host": "evil.example:8764"})
    assert rebound.status == 403
    for host in ("localhost:8764", "127.0.0.1", "[::1]:8764"):
        assert (await client.get("/memory-routing/status", headers={"Host": host})).status == 200
    named = await proxy(memproxy={"admin": {"hosts": ["memproxy.internal"]}})
    ok = await named.get("/memory-routing/status", headers={"Host": "memproxy.internal"})
    assert ok.status == 200


# -- explain and the proxy agree ---------------------------------------------------------------

@pytest.mark.parametrize("headers", [{}, {"x-memory-user-id": "alice"}])
async def test_explain_refuses_what_the_proxy_refuses(
    proxy: ProxyFactory, tmp_path: Path, headers: dict[str, str]
) -> None:
    strict = {"unidentified": "refuse", "explicit_id": {"trust": "never"}}
    client = await proxy(memproxy=strict)
    served = await client.post("/v1/chat/completions", data=b"{}", headers=headers)
    config = tmp_path / "config.yaml"
    config.write_text(json.dumps({"memproxy": strict}))
    explained = subprocess.run(
        [sys.executable, "-m", "memproxy", "explain", "--config", str(config),
         *[f"-H{name}: {value}" for name, value in headers.items()]],
        capture_output=True, text=True, timeout=60)
    assert served.status == 403
    assert explained.returncode == 1
    assert "refused with 403" in explained.stdout


# -- the request id follows every line a request causes ---------------------------------------

class Broken:
    @hookimpl
    def memproxy_detectors(self) -> list[DetectorSpec]:
        def build(ctx: Any) -> Any:
            def detect(headers: Any) -> str:
                raise RuntimeError("broken plugin")
            return detect
        return [DetectorSpec(name="broken", priority=200, build=build)]


async def test_lines_logged_while_detecting_carry_the_request_id(
    proxy: ProxyFactory, json_log_file: TextIO
) -> None:
    client = await proxy(extra_plugins=(Broken(),))
    resp = await client.get("/v1/models", headers={"x-request-id": "req-42"})
    assert resp.status == 200
    failed = [line for line in read_log(json_log_file) if line["event"] == "detector_failed"]
    assert failed and failed[0]["request_id"] == "req-42"
