"""What an operator sees: metrics, the unrecognised-client inbox, live reload."""

from __future__ import annotations

import asyncio
import json
import re
import signal
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest

from memproxy.inbox import UnmatchedInbox, suggest_rule, talks_to_a_model
from tests.helpers import FakeLiteLLM, ProxyFactory, ServeFactory

PATTERNS = {"header_patterns": [
    {"header": "user-agent", "pattern": "^claude-cli/", "user_id": "claude-code"}]}


def metric(text: str, name: str, **labels: str) -> float:
    """The value of one sample in Prometheus exposition text (0 when absent)."""
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', line.split(" ")[0]))
        if all(found.get(k) == v for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


async def test_metrics_count_requests_by_user_detector_status_and_route(
    proxy: ProxyFactory,
) -> None:
    client = await proxy(user_id_mappings=PATTERNS)
    for _ in range(3):
        await client.post("/v1/chat/completions", data=b"{}",
                          headers={"User-Agent": "claude-cli/2.0"})
    await client.post("/v1/messages", data=b"{}", headers={"x-memory-user-id": "alice"})
    await client.post("/status/500", data=b"{}")
    resp = await client.post("/sse?n=3&gap=0", data=b"{}")
    await resp.read()
    text = await (await client.get("/metrics")).text()
    assert metric(text, "memproxy_requests_total", user_id="claude-code",
                  detector="header_patterns", status_class="2xx", route="chat") == 3
    assert metric(text, "memproxy_requests_total", user_id="alice",
                  detector="explicit_header", route="messages") == 1
    assert metric(text, "memproxy_requests_total", user_id="default", status_class="5xx",
                  route="other") == 1
    assert metric(text, "memproxy_upstream_latency_seconds_count", route="chat") == 3
    assert metric(text, "memproxy_upstream_first_byte_seconds_count", route="other") == 2
    assert metric(text, "memproxy_streams_open") == 0
    assert metric(text, "memproxy_request_body_bytes_total", route="chat") == 6
    assert metric(text, "memproxy_response_body_bytes_total", route="other") > 0


async def test_metrics_bound_the_number_of_user_id_labels(proxy: ProxyFactory) -> None:
    client = await proxy()
    for i in range(130):
        await client.get("/v1/models", headers={"x-memory-user-id": f"user-{i}"})
    text = await (await client.get("/metrics")).text()
    users = {dict(re.findall(r'(\w+)="([^"]*)"', line))["user_id"]
             for line in text.splitlines() if line.startswith("memproxy_requests_total{")}
    assert len(users) == 101  # the first 100 ids, and "other" for the rest
    assert metric(text, "memproxy_requests_total", user_id="other") == 30


async def test_unmatched_inbox_lists_clients_that_fell_through_with_a_rule_each(
    proxy: ProxyFactory,
) -> None:
    client = await proxy(user_id_mappings=PATTERNS)
    for _ in range(4):
        await client.post("/v1/chat/completions", data=b"{}", headers={
            "User-Agent": "Zed/0.150.2 (macos; aarch64)", "Authorization": "Bearer sk-secret-1"})
    await client.post("/v1/responses", data=b"{}",
                      headers={"User-Agent": "", "originator": "my_agent"})
    await client.post("/v1/chat/completions", data=b"{}",
                      headers={"User-Agent": "claude-cli/2.0"})  # recognised: not listed
    resp = await client.get("/memory-routing/unmatched")
    text = await resp.text()
    unmatched = json.loads(text)["unmatched"]
    assert [u["count"] for u in unmatched] == [4, 1]
    zed, agent = unmatched
    assert zed["headers"]["user-agent"] == "Zed/0.150.2 (macos; aarch64)"
    assert zed["suggested_rule"] == {"header": "user-agent", "pattern": "^Zed/",
                                     "user_id": "zed"}
    assert zed["suggested_yaml"] == "- {header: user-agent, pattern: '^Zed/', user_id: zed}"
    assert agent["suggested_rule"]["header"] == "originator"
    assert "sk-secret-1" not in text
    assert "claude-cli" not in text


def test_inbox_memory_is_bounded() -> None:
    inbox = UnmatchedInbox(capacity=10)
    for i in range(1000):
        inbox.record({"user-agent": f"tool-{i}/1.0"})
    top = inbox.top(100)
    assert len(top) == 10
    assert top[0]["headers"]["user-agent"].startswith("tool-99")


def test_suggested_rules_match_the_client_they_were_made_for() -> None:
    for agent in ["Zed/0.150.2 (macos)", "Mozilla/5.0 (X11; Linux x86_64)", "Go-http-client/1.1",
                  "python-requests/2.32.3", "my tool+v2"]:
        rule = suggest_rule({"user-agent": agent})
        assert rule is not None
        assert re.search(rule["pattern"], agent, re.IGNORECASE), (rule, agent)


def test_explain_tries_a_suggested_rule() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "memproxy", "explain", "--config",
         str(Path(__file__).parent.parent / "config.yaml"),
         "--rule", "- {header: user-agent, pattern: '^Zed/', user_id: zed}",
         "-H", "User-Agent: Zed/0.150.2 (macos)"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "user id:  zed" in result.stdout
    bad = subprocess.run(
        [sys.executable, "-m", "memproxy", "explain", "--rule", "{pattern: '(', user_id: x}"],
        capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2
    assert "--rule[0].pattern" in bad.stderr
    assert "Traceback" not in bad.stderr


def write_config(path: Path, user_id: str, extra: str = "") -> None:
    path.write_text("user_id_mappings:\n  header_patterns:\n"
                    f"    - {{header: user-agent, pattern: '^Zed/', user_id: {user_id}}}\n"
                    + extra)


async def test_reload_swaps_the_detector_chain_without_dropping_a_stream(
    fake_litellm: FakeLiteLLM, tmp_path: Path, serve_memproxy: ServeFactory
) -> None:
    config = tmp_path / "config.yaml"
    write_config(config, "zed-old")
    process = serve_memproxy(config, fake_litellm.url)
    port = process.port
    url = f"http://127.0.0.1:{port}"
    zed = {"User-Agent": "Zed/1.0"}
    async with aiohttp.ClientSession() as session, session.post(
            url + "/sse?n=20&gap=0.05", data=b"{}") as stream:
        await stream.content.readline()
        write_config(config, "zed-new")
        process.send_signal(signal.SIGHUP)
        await asyncio.sleep(0.5)
        async with session.get(url + "/memory-routing/info", headers=zed) as resp:
            assert (await resp.json())["user_id"] == "zed-new"

        write_config(config, "zed-newer")
        async with session.post(url + "/memory-routing/reload") as resp:
            assert resp.status == 200
            assert (await resp.json())["reloaded"] is True
        async with session.get(url + "/memory-routing/info", headers=zed) as resp:
            assert (await resp.json())["user_id"] == "zed-newer"

        config.write_text("user_id_mappings:\n  header_patterns:\n"
                          "    - {header: user-agent, pattern: '(', user_id: x}\n")
        async with session.post(url + "/memory-routing/reload") as resp:
            assert resp.status == 400
            body = await resp.json()
            assert body["reloaded"] is False
            assert "not a valid regular expression" in body["message"]
        async with session.get(url + "/memory-routing/info", headers=zed) as resp:
            assert (await resp.json())["user_id"] == "zed-newer"  # the old one stays
        rest = await stream.read()
    assert rest.count(b"data: {") == 19  # the open stream was never disturbed
    out, _ = process.stop(timeout=30)
    events = [json.loads(line)["event"] for line in out.splitlines() if line.startswith("{")]
    assert events.count("config_reloaded") == 2
    assert "config_reload_refused" in events


async def test_reload_is_refused_from_other_hosts(proxy: ProxyFactory) -> None:
    client = await proxy(memproxy={"admin": {"networks": ["10.0.0.0/8"]}})
    response = await client.post("/memory-routing/reload", json={})
    assert response.status == 403
    assert "memproxy.admin.networks" in (await response.json())["error"]["message"]


async def test_status_json_has_what_the_page_shows(proxy: ProxyFactory) -> None:
    client = await proxy(user_id_mappings=PATTERNS)
    await client.get("/v1/models", headers={"User-Agent": "claude-cli/2.0"})
    await client.get("/v1/models", headers={"User-Agent": "Zed/1.0"})
    status = await (await client.get("/memory-routing/status")).json()
    assert status["status"] == "ok"
    assert [d["name"] for d in status["detector_chain"]] == [
        "explicit_header", "header_patterns", "default"]
    assert status["requests_last_hour"] == {"claude-code": {"succeeded": 1, "failed": 0},
                                            "default": {"succeeded": 1, "failed": 0}}
    assert status["unmatched"][0]["suggested_rule"]["user_id"] == "zed"


async def test_requests_that_fail_are_counted_apart_from_those_that_succeed(
    proxy: ProxyFactory,
) -> None:
    client = await proxy(user_id_mappings={"header_patterns": [
        {"header": "user-agent", "pattern": "^codex_cli_rs/", "user_id": "codex"}]})
    codex = {"User-Agent": "codex_cli_rs/0.50.0"}
    for _ in range(30):  # LiteLLM answers every one of them with 500
        await client.post("/status/500", data=b"{}", headers=codex)
    await client.post("/v1/responses", data=b"{}", headers=codex)
    status = await (await client.get("/memory-routing/status")).json()
    assert status["requests_last_hour"] == {"codex": {"succeeded": 1, "failed": 30}}
    text = await (await client.get("/metrics")).text()
    assert metric(text, "memproxy_requests_total", user_id="codex", status_class="5xx") == 30
    assert metric(text, "memproxy_requests_total", user_id="codex", status_class="2xx") == 1


async def test_only_requests_to_model_endpoints_enter_the_inbox(proxy: ProxyFactory) -> None:
    client = await proxy(user_id_mappings=PATTERNS)
    bun = {"User-Agent": "Bun/1.2.0"}
    await client.head("/", headers=bun)  # Claude Code's reachability probe
    await client.get("/favicon.ico", headers=bun)
    await client.options("/v1/messages", headers=bun)
    await client.get("/health/liveliness", headers=bun)
    assert (await (await client.get("/memory-routing/unmatched")).json())["unmatched"] == []

    zed = {"User-Agent": "Zed/0.150.2 (macos; aarch64)"}
    for path in ("/v1/models", "/v1/chat/completions", "/v1/messages/count_tokens",
                 "/v1beta/models/gemini-2.5-flash:generateContent"):
        method = client.get if path == "/v1/models" else client.post
        await method(path, headers=zed)
    unmatched = (await (await client.get("/memory-routing/unmatched")).json())["unmatched"]
    assert [(u["headers"]["user-agent"], u["count"]) for u in unmatched] == [
        ("Zed/0.150.2 (macos; aarch64)", 4)]


@pytest.mark.parametrize("method, path, counted", [
    ("HEAD", "/", False), ("GET", "/", False), ("HEAD", "/v1/messages", False),
    ("OPTIONS", "/v1/chat/completions", False), ("GET", "/health/liveliness", False),
    ("GET", "/v1/chat/completionsX", False),
    ("GET", "/v1/models", True), ("GET", "/v1/models/gpt-4o", True),
    ("POST", "/v1/chat/completions", True), ("POST", "/chat/completions", True),
    ("POST", "/openai/deployments/gpt-4o/chat/completions", True),
    ("POST", "/v1/completions", True), ("POST", "/v1/responses", True),
    ("POST", "/v1/messages", True), ("POST", "/v1/embeddings", True),
])
def test_which_requests_talk_to_a_model(method: str, path: str, counted: bool) -> None:
    assert talks_to_a_model(method, path) is counted
