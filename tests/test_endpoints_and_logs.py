"""What memproxy answers itself, what it logs, and that no secret ever shows."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from structlog.testing import capture_logs

from tests.conftest import FakeLiteLLM, ProxyFactory
from tests.test_forwarding import unused_port

HASH_SECRET = "hash-secret-never-to-be-seen-0001"
SM_KEY = "sm-key-never-to-be-seen-0002"
CLIENT_KEY = "sk-client-key-never-to-be-seen-0003"
SECRETS = (HASH_SECRET, SM_KEY, CLIENT_KEY)
CONFIG: dict[str, Any] = {
    "user_id_mappings": {"header_patterns": [
        {"header": "user-agent", "pattern": "^claude-cli/", "user_id": "claude-code"}]},
    "memproxy": {
        "headers": {"supermemory_api_key": SM_KEY},
        # Below header_patterns, so a recognised tool is named by its pattern.
        "detectors": {"api_key_hash": {"enabled": True, "priority": 50,
                                       "options": {"secret": HASH_SECRET}}},
    },
}


async def test_info_shows_the_callers_user_and_the_chain_with_secrets_redacted(
    proxy: ProxyFactory,
) -> None:
    client = await proxy(**CONFIG)
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


async def test_one_canonical_log_line_per_request(proxy: ProxyFactory) -> None:
    client = await proxy(**CONFIG)
    with capture_logs() as logs:
        resp = await client.post("/v1/chat/completions?key=query-secret", data=b"{}",
                                 headers={"User-Agent": "claude-cli/2.0"})
        assert resp.status == 200
        resp = await client.post("/sse?n=3&gap=0.01", data=b"{}")
        await resp.read()
    lines = [entry for entry in logs if entry["event"] == "request"]
    assert len(lines) == 2
    first, second = lines
    assert first["method"] == "POST"
    assert first["path"] == "/v1/chat/completions"
    assert first["status"] == 200
    assert first["user_id"] == "claude-code"
    assert first["detector"] == "header_patterns"
    assert first["streamed"] is False
    assert first["bytes_in"] == 2
    assert first["bytes_out"] > 0
    assert "upstream_ms" in first and "request_id" in first
    assert second["streamed"] is True
    assert "query-secret" not in repr(logs)


async def test_request_line_has_the_same_fields_as_every_other_json_line(
    json_log_file: Any,
) -> None:
    import structlog

    from memproxy.logs import bind_process, log_request

    bind_process(worker=1)
    line = {"request_id": "ab12", "method": "POST", "path": "/v1/messages", "status": 200,
            "user_id": "claude-code", "detector": "header_patterns", "duration_ms": 1.5}
    log_request(dict(line))
    structlog.get_logger("memproxy").info("request", **line)
    await asyncio.sleep(0)  # inside the event loop the flush waits for the next iteration
    json_log_file.flush()
    fast, regular = (json.loads(text) for text in
                     Path(json_log_file.name).read_text().splitlines())
    assert fast.keys() == regular.keys()
    assert {k: v for k, v in fast.items() if k != "timestamp"} == {
        k: v for k, v in regular.items() if k != "timestamp"}
    assert fast["worker"] == 1 and fast["level"] == "info" and fast["event"] == "request"
    from datetime import datetime
    for record in (fast, regular):  # ISO 8601, UTC, microseconds, as structlog writes it
        assert record["timestamp"].endswith("Z") and len(record["timestamp"]) == 27
        written = datetime.fromisoformat(record["timestamp"].replace("Z", "+00:00"))
        assert abs(written.timestamp() - time.time()) < 5


async def test_no_secret_appears_in_any_log_line_or_error(
    proxy: ProxyFactory, fake_litellm: FakeLiteLLM
) -> None:
    client = await proxy(**CONFIG)
    down = await proxy(litellm_url=f"http://127.0.0.1:{unused_port()}", **CONFIG)
    seen: list[str] = []
    with capture_logs() as logs:
        for c in (client, down):
            for path in ("/v1/chat/completions", "/v1/messages", "/sse?n=2&gap=0"):
                resp = await c.post(path, data=f'{{"key": "{CLIENT_KEY}"}}', headers={
                    "Authorization": f"Bearer {CLIENT_KEY}", "x-api-key": CLIENT_KEY})
                seen.append(await resp.text())
            resp = await c.post("/v1/messages", headers={"x-memory-user-id": "bad id",
                                                         "x-api-key": CLIENT_KEY})
            seen.append(await resp.text())
            resp = await c.get("/health")
            seen.append(await resp.text())
    everything = repr(logs) + "".join(seen).replace(f'{{"key": "{CLIENT_KEY}"}}', "")
    assert len(logs) >= 8
    for secret in SECRETS:
        assert secret not in everything


def wait_for_port(port: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listens on {port}")


@pytest.mark.parametrize("event_loop", ["asyncio", "uvloop"])
async def test_serve_command_forwards_and_logs_json(
    fake_litellm: FakeLiteLLM, tmp_path: Path, event_loop: str
) -> None:
    port = unused_port()
    config = tmp_path / "config.yaml"
    config.write_text("user_id_mappings:\n  header_patterns:\n"
                      "    - {header: user-agent, pattern: '^curl/', user_id: curl}\n"
                      f"memproxy:\n  event_loop: {event_loop}\n")
    env = {**os.environ, "SUPERMEMORY_API_KEY": SM_KEY}
    process = subprocess.Popen(
        [sys.executable, "-m", "memproxy", "serve", "--config", str(config), "--port", str(port),
         "--litellm-url", fake_litellm.url],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        wait_for_port(port)
        async with aiohttp.ClientSession() as session:
            async with session.post(f"http://127.0.0.1:{port}/v1/chat/completions", data=b"{}",
                                    headers={"User-Agent": "curl/8.5.0"}) as resp:
                assert resp.status == 200
                assert resp.headers["x-memproxy-user-id"] == "curl"
            async with session.post(f"http://127.0.0.1:{port}/sse?n=5&gap=0.02", data=b"{}",
                                    headers={"User-Agent": "curl/8.5.0"}) as resp:
                chunks = [chunk async for chunk in resp.content.iter_any()]
                assert len(chunks) >= 5, chunks
    finally:
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=20)
    assert process.returncode == 0, err
    assert fake_litellm.last.all("x-sm-user-id") == ["curl"]
    records = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    starting = next(r for r in records if r["event"] == "memproxy_starting")
    assert starting["event_loop"] == event_loop
    request_line = next(r for r in records if r["event"] == "request")
    assert request_line["user_id"] == "curl"
    assert SM_KEY not in out + err


async def test_sigterm_lets_open_streams_finish_and_refuses_new_connections(
    fake_litellm: FakeLiteLLM, tmp_path: Path
) -> None:
    port = unused_port()
    (tmp_path / "empty.yaml").write_text("")
    process = subprocess.Popen(
        [sys.executable, "-m", "memproxy", "serve", "--port", str(port), "--litellm-url",
         fake_litellm.url, "--config", str(tmp_path / "empty.yaml")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for_port(port)
        async with aiohttp.ClientSession() as session:
            async with session.post(f"http://127.0.0.1:{port}/sse?n=20&gap=0.05",
                                    data=b"{}") as resp:
                first = await resp.content.readline()
                assert first.startswith(b"data:")
                process.send_signal(signal.SIGTERM)
                await asyncio.sleep(0.3)
                with pytest.raises(aiohttp.ClientConnectionError):
                    async with aiohttp.ClientSession() as other:
                        await other.get(f"http://127.0.0.1:{port}/health")
                rest = await resp.read()
        assert rest.count(b"data: {") == 19
        assert rest.endswith(b"data: [DONE]\n\n")
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
        out, _ = process.communicate(timeout=30)
    assert process.returncode == 0
    assert "memproxy_stopping" in out


def test_repeated_stop_signals_still_end_in_a_clean_exit(
    fake_litellm: FakeLiteLLM, tmp_path: Path
) -> None:
    """A supervisor that repeats SIGTERM until the process is gone must see exit status 0."""
    port = unused_port()
    (tmp_path / "empty.yaml").write_text("")
    process = subprocess.Popen(
        [sys.executable, "-m", "memproxy", "serve", "--port", str(port), "--litellm-url",
         fake_litellm.url, "--config", str(tmp_path / "empty.yaml")],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        wait_for_port(port)
        deadline = time.monotonic() + 20
        while process.poll() is None and time.monotonic() < deadline:
            process.send_signal(signal.SIGTERM)
            time.sleep(0.002)
    finally:
        if process.poll() is None:
            process.kill()
        _, err = process.communicate(timeout=20)
    assert process.returncode == 0, err


async def test_several_workers_share_one_port_and_stop_together(
    fake_litellm: FakeLiteLLM, tmp_path: Path
) -> None:
    port = unused_port()
    (tmp_path / "empty.yaml").write_text("")
    process = subprocess.Popen(
        [sys.executable, "-m", "memproxy", "serve", "--workers", "2", "--port", str(port),
         "--litellm-url", fake_litellm.url, "--config", str(tmp_path / "empty.yaml")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for_port(port)
        await asyncio.sleep(1.0)  # let the second worker bind too
        for _ in range(40):
            # A new connection each time, so the kernel can pick either worker.
            async with aiohttp.ClientSession() as session, session.post(
                    f"http://127.0.0.1:{port}/v1/chat/completions", data=b"{}",
                    headers={"x-memory-user-id": "alice"}) as resp:
                assert resp.status == 200
        # Whichever worker answers, /metrics counts the requests of all of them.
        totals = set()
        for _ in range(6):
            async with aiohttp.ClientSession() as session, session.get(
                    f"http://127.0.0.1:{port}/metrics") as resp:
                text = await resp.text()
            totals.add(sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                           if line.startswith('memproxy_requests_total{')
                           and 'user_id="alice"' in line))
        assert totals == {40.0}
    finally:
        process.send_signal(signal.SIGTERM)
        out, err = process.communicate(timeout=40)
    assert process.returncode == 0, err
    records = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    workers = {r.get("worker") for r in records if r["event"] == "request"}
    assert workers == {0, 1}
    assert len(fake_litellm.received) == 40
    assert all(r.all("x-sm-user-id") == ["alice"] for r in fake_litellm.received)


def test_explain_says_who_decided_and_why() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "memproxy", "explain", "--config",
         str(Path(__file__).parent.parent / "config.yaml"),
         "-H", "User-Agent: claude-cli/2.0.14 (external, cli)",
         "-H", "X-Claude-Code-Session-Id: 42-abc"],
        capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "user id:  claude-code" in result.stdout
    assert "detector: header_patterns" in result.stdout
    assert "why:      user-agent matches '^claude-cli/'" in result.stdout
    assert "x-sm-conversation-id: 42-abc" in result.stdout


@pytest.mark.parametrize("argv", [["--help"], ["serve", "--help"], ["check-config", "--help"],
                                  ["explain", "--help"]])
def test_every_command_has_help(argv: list[str]) -> None:
    result = subprocess.run([sys.executable, "-m", "memproxy", *argv], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0
    assert "usage: memproxy" in result.stdout
