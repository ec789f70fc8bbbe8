"""What memproxy answers itself: who the caller is, and whether LiteLLM is up."""

from __future__ import annotations

import json

from aiohttp.test_utils import unused_port

from tests.helpers import CLIENT_KEY, CONFIG_WITH_SECRETS, SECRETS, FakeLiteLLM, ProxyFactory


async def test_info_shows_the_callers_user_and_the_chain_with_secrets_redacted(
    proxy: ProxyFactory,
) -> None:
    client = await proxy(**CONFIG_WITH_SECRETS)
    resp = await client.get("/memory-routing/info", headers={
        "User-Agent": "claude-cli/2.0.14 (external, cli)", "Authorization": f"Bearer {CLIENT_KEY}",
        "X-Claude-Code-Session-Id": "s-1"})
    assert resp.status == 200
    text = await resp.text()
    info = json.loads(text)
    assert info["user_id"] == "claude-code"
    assert info["detector"] == "header_patterns"
    assert [d["name"] for d in info["detector_chain"]] == [
        "explicit_header", "header_patterns", "api_key_hash", "default"]
    assert info["injected_headers"] == {
        "x-sm-user-id": "claude-code", "x-supermemory-api-key": "<redacted>",
        "x-sm-conversation-id": "s-1"}
    for secret in SECRETS:
        assert secret not in text


async def test_info_refuses_an_invalid_explicit_id(proxy: ProxyFactory) -> None:
    client = await proxy()
    resp = await client.get("/memory-routing/info", headers={"x-memory-user-id": "a b"})
    assert resp.status == 400


async def test_health_is_ok_when_litellm_answers(
    proxy: ProxyFactory, fake_litellm: FakeLiteLLM
) -> None:
    client = await proxy()
    resp = await client.get("/health")
    assert resp.status == 200
    body = await resp.json()
    assert body["status"] == "ok"
    assert body["litellm"]["status"] == "ok"
    assert fake_litellm.last.path == "/health/liveliness"


async def test_health_is_503_when_litellm_is_down(proxy: ProxyFactory) -> None:
    client = await proxy(litellm_url=f"http://127.0.0.1:{unused_port()}")
    resp = await client.get("/health")
    assert resp.status == 503
    body = await resp.json()
    assert body["status"] == "degraded"
    assert body["litellm"]["status"] == "unavailable"
