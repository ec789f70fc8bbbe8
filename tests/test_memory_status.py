"""What the operator sees of memory: the status page's data and /health."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from memproxy.app import create_app
from memproxy.demo_provider import DemoProvider
from tests.helpers import make_settings


async def test_status_shows_the_memory_file_its_spaces_and_recent_recalls(
    aiohttp_client: Any, tmp_path: Path
) -> None:
    async with DemoProvider() as provider:
        memory = {"backend": "local", "path": str(tmp_path / "memory.db")}
        app = create_app(make_settings(provider.url, memproxy={"memory": memory}))
        client = await aiohttp_client(app)
        alice = {"x-memory-user-id": "alice"}
        told = await client.post("/v1/chat/completions", headers=alice, json={
            "model": "gpt-fake", "messages": [{"role": "user", "content": "I grow tomatoes."}]})
        assert told.status == 200
        for _ in range(100):  # written off the request path
            status = await (await client.get("/memory-routing/status")).json()
            if any(user["memories"] for user in status["memory"]["users"]):
                break
            await asyncio.sleep(0.02)
        asked = await client.post("/v1/chat/completions", headers=alice, json={
            "model": "gpt-fake", "messages": [{"role": "user", "content": "What do I grow?"}]})
        recalled = int(asked.headers["x-memproxy-memories"])
        assert recalled >= 1

        status = await (await client.get("/memory-routing/status")).json()
        health = await (await client.get("/health")).json()
        metrics = await (await client.get("/metrics")).text()
    size = next(line for line in metrics.splitlines()
                if line.startswith("memproxy_memory_db_bytes "))
    assert float(size.split()[1]) > 0
    assert 'memproxy_memory_writes_total{outcome="written"}' in metrics
    shown = status["memory"]
    assert shown["file"] == str(tmp_path / "memory.db")
    assert shown["status"] == "ok"
    # Both exchanges, or the first only if the second is still being written.
    assert [u["user_id"] for u in shown["users"]] == ["alice"]
    assert shown["users"][0]["memories"] in (2, 4)
    assert shown["recent_recalls"][0]["user_id"] == "alice"
    assert shown["recent_recalls"][0]["memories"] == recalled
    assert health["memory"] == {"status": "ok"}


async def test_status_has_no_memory_section_when_memory_is_off(aiohttp_client: Any) -> None:
    async with DemoProvider() as provider:
        client = await aiohttp_client(create_app(make_settings(provider.url)))
        status = await (await client.get("/memory-routing/status")).json()
        health = await (await client.get("/health")).json()
    assert status["memory"] is None
    assert "memory" not in health
