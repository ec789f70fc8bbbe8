"""memproxy serve as a process of its own: it serves, and it stops cleanly.

Forwarding and JSON logs under both event loops, SIGTERM letting open streams
finish, repeated stop signals, and several workers sharing one port.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import aiohttp
import pytest

from tests.helpers import SM_KEY, FakeLiteLLM, ServeFactory


@pytest.mark.parametrize("event_loop", ["asyncio", "uvloop"])
async def test_serve_command_forwards_and_logs_json(
    fake_litellm: FakeLiteLLM, tmp_path: Path, event_loop: str, serve_memproxy: ServeFactory
) -> None:
    config = tmp_path / "config.yaml"
    config.write_text("user_id_mappings:\n  header_patterns:\n"
                      "    - {header: user-agent, pattern: '^curl/', user_id: curl}\n"
                      f"memproxy:\n  event_loop: {event_loop}\n")
    env = {**os.environ, "SUPERMEMORY_API_KEY": SM_KEY}
    process = serve_memproxy(config, fake_litellm.url, env=env)
    port = process.port
    async with aiohttp.ClientSession() as session:
        async with session.post(f"http://127.0.0.1:{port}/v1/chat/completions", data=b"{}",
                                headers={"User-Agent": "curl/8.5.0"}) as resp:
            assert resp.status == 200
            assert resp.headers["x-memproxy-user-id"] == "curl"
        async with session.post(f"http://127.0.0.1:{port}/sse?n=5&gap=0.02", data=b"{}",
                                headers={"User-Agent": "curl/8.5.0"}) as resp:
            chunks = [chunk async for chunk in resp.content.iter_any()]
            assert len(chunks) >= 5, chunks
    out, err = process.stop(signal.SIGINT, timeout=20)
    assert process.returncode == 0, err
    assert fake_litellm.last.all("x-sm-user-id") == ["curl"]
    records = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    starting = next(r for r in records if r["event"] == "memproxy_starting")
    assert starting["event_loop"] == event_loop
    request_line = next(r for r in records if r["event"] == "request")
    assert request_line["user_id"] == "curl"
    assert SM_KEY not in out + err


async def test_sigterm_lets_open_streams_finish_and_refuses_new_connections(
    fake_litellm: FakeLiteLLM, tmp_path: Path, serve_memproxy: ServeFactory
) -> None:
    (tmp_path / "empty.yaml").write_text("")
    process = serve_memproxy(tmp_path / "empty.yaml", fake_litellm.url)
    port = process.port
    async with aiohttp.ClientSession() as session, session.post(
            f"http://127.0.0.1:{port}/sse?n=20&gap=0.05", data=b"{}") as resp:
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
    out, _ = process.stop(timeout=30)
    assert process.returncode == 0
    assert "memproxy_stopping" in out


def test_repeated_stop_signals_still_end_in_a_clean_exit(
    fake_litellm: FakeLiteLLM, tmp_path: Path, serve_memproxy: ServeFactory
) -> None:
    """A supervisor that repeats SIGTERM until the process is gone must see exit status 0."""
    (tmp_path / "empty.yaml").write_text("")
    process = serve_memproxy(tmp_path / "empty.yaml", fake_litellm.url,
                             stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + 20
    while process.poll() is None and time.monotonic() < deadline:
        process.send_signal(signal.SIGTERM)
        time.sleep(0.002)
    _, err = process.stop(signal.SIGKILL, timeout=20)
    assert process.returncode == 0, err


async def test_several_workers_share_one_port_and_stop_together(
    fake_litellm: FakeLiteLLM, tmp_path: Path, serve_memproxy: ServeFactory
) -> None:
    (tmp_path / "empty.yaml").write_text("")
    process = serve_memproxy(tmp_path / "empty.yaml", fake_litellm.url, "--workers", "2")
    port = process.port
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
    out, err = process.stop(timeout=40)
    assert process.returncode == 0, err
    records = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    workers = {r.get("worker") for r in records if r["event"] == "request"}
    assert workers == {0, 1}
    assert len(fake_litellm.received) == 40
    assert all(r.all("x-sm-user-id") == ["alice"] for r in fake_litellm.received)


async def test_shutdown_says_what_it_waits_for_and_a_second_signal_stops_at_once(
    fake_litellm: FakeLiteLLM, tmp_path: Path, serve_memproxy: ServeFactory
) -> None:
    (tmp_path / "empty.yaml").write_text("")
    process = serve_memproxy(tmp_path / "empty.yaml", fake_litellm.url, "--grace", "60")
    async with aiohttp.ClientSession() as session, session.post(
            f"http://127.0.0.1:{process.port}/endless", data=b"{}") as resp:
        assert (await resp.content.readline()).startswith(b"data:")
        process.send_signal(signal.SIGINT)
        await asyncio.sleep(0.5)
        assert process.poll() is None  # still waiting for the stream
        started = time.monotonic()
        process.send_signal(signal.SIGINT)
        with contextlib.suppress(aiohttp.ClientError):
            await resp.read()
    out, err = process.stop(timeout=20)
    assert time.monotonic() - started < 5
    assert process.returncode == 0
    assert "waiting for 1 request, up to 60 s; press Ctrl-C again to stop now" in err
    lines = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    (stream,) = [line for line in lines if line.get("path") == "/endless"]
    assert stream["status"] == 200  # the answer had begun: not a client that went away
    assert stream["error"] == "cut short: memproxy was shutting down"


async def test_the_grace_period_is_kept_exactly(
    fake_litellm: FakeLiteLLM, tmp_path: Path, serve_memproxy: ServeFactory
) -> None:
    (tmp_path / "empty.yaml").write_text("")
    process = serve_memproxy(tmp_path / "empty.yaml", fake_litellm.url, "--grace", "1.5")
    async with aiohttp.ClientSession() as session, session.post(
            f"http://127.0.0.1:{process.port}/endless", data=b"{}") as resp:
        assert (await resp.content.readline()).startswith(b"data:")
        started = time.monotonic()
        process.send_signal(signal.SIGTERM)
        with contextlib.suppress(aiohttp.ClientError):
            await resp.read()
        cut_after = time.monotonic() - started
    process.stop(timeout=20)
    assert 1.4 < cut_after < 2.8, cut_after  # aiohttp alone would wait up to twice --grace
