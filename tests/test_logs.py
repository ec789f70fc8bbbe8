"""What memproxy logs: one line per request, the same fields everywhere, never a secret."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

from aiohttp.test_utils import unused_port
from structlog.testing import capture_logs

from tests.helpers import CLIENT_KEY, CONFIG_WITH_SECRETS, SECRETS, FakeLiteLLM, ProxyFactory


async def test_one_canonical_log_line_per_request(proxy: ProxyFactory) -> None:
    client = await proxy(**CONFIG_WITH_SECRETS)
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
    client = await proxy(**CONFIG_WITH_SECRETS)
    down = await proxy(litellm_url=f"http://127.0.0.1:{unused_port()}", **CONFIG_WITH_SECRETS)
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
