"""What the tests share: a fake LiteLLM, raw HTTP on the wire, memproxy as a process."""

from __future__ import annotations

import asyncio
import gzip
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import anthropic
import httpx
import openai
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer, unused_port

from memproxy.config import Settings, parse_settings

# -- a LiteLLM stand-in, and memproxy in front of it --------------------------------------

@dataclass
class Received:
    """One request as the fake LiteLLM saw it."""

    method: str
    path: str
    query_string: str
    raw_path: str
    headers: list[tuple[str, str]]
    body: bytes
    peer: object = None

    def header(self, name: str) -> str | None:
        values = self.all(name)
        return values[0] if values else None

    def all(self, name: str) -> list[str]:
        return [v for k, v in self.headers if k.lower() == name.lower()]


@dataclass
class FakeLiteLLM:
    """A stand-in for LiteLLM with endpoints that misbehave on purpose."""

    received: list[Received] = field(default_factory=list)
    stream_closed: asyncio.Event = field(default_factory=asyncio.Event)
    server: TestServer | None = None

    @property
    def url(self) -> str:
        assert self.server is not None
        return str(self.server.make_url("")).rstrip("/")

    @property
    def last(self) -> Received:
        return self.received[-1]

    async def record(self, request: web.Request) -> Received:
        body = await request.read()
        item = Received(request.method, request.path, request.query_string,
                        request.raw_path, list(request.headers.items()), body,
                        request.transport.get_extra_info("peername")
                        if request.transport else None)
        self.received.append(item)
        return item

    async def handle(self, request: web.Request) -> web.StreamResponse:
        await self.record(request)
        path = request.path
        if path == "/health/liveliness":
            return web.json_response("I'm alive!")
        if path.startswith("/status/"):
            code = int(path.rsplit("/", 1)[1])
            return web.json_response({"error": {"message": "upstream says no"}}, status=code,
                                     headers={"x-upstream": "kept"})
        if path == "/redirect":
            raise web.HTTPFound("/elsewhere")
        if path == "/gzip":
            return web.Response(body=gzip.compress(b'{"zipped": true}'),
                                headers={"Content-Encoding": "gzip",
                                         "Content-Type": "application/json"})
        if path == "/big-response":
            return web.Response(body=b"x" * (3 * 1024 * 1024))
        if path == "/sse":
            return await self.sse(request, count=int(request.query.get("n", 5)),
                                  gap=float(request.query.get("gap", 0.05)))
        if path == "/sse-then-reset":
            return await self.sse(request, count=2, gap=0.01, reset=True)
        if path == "/stall":
            await asyncio.sleep(30)
        if path == "/sse-then-stall":
            return await self.sse(request, count=2, gap=0.01, stall=30)
        if path == "/truncated":
            response = web.StreamResponse(headers={"Content-Length": "1000"})
            await response.prepare(request)
            await response.write(b"0123456789")
            assert request.transport is not None
            request.transport.close()
            return response
        if path == "/echo-user":
            user = request.headers.get("x-sm-user-id", "")
            if request.query.get("stream"):
                response = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                                       "x-echo-user-id": user})
                await response.prepare(request)
                for _ in range(3):
                    await response.write(f"data: {user}\n\n".encode())
                await response.write_eof()
                return response
            return web.Response(text=user, headers={"x-echo-user-id": user})
        if path == "/endless":
            return await self.endless(request)
        return web.json_response({"ok": True, "path": path},
                                 headers={"x-upstream": "kept"})

    async def sse(self, request: web.Request, *, count: int, gap: float,
                  reset: bool = False, stall: float = 0) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for i in range(count):
            await response.write(f"data: {json.dumps({'n': i})}\n\n".encode())
            await asyncio.sleep(gap)
        await asyncio.sleep(stall)
        if reset:
            assert request.transport is not None
            request.transport.close()
            return response
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response

    async def endless(self, request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        try:
            for i in range(600):
                await response.write(f"data: {i}\n\n".encode())
                await asyncio.sleep(0.05)
        except (ConnectionError, asyncio.CancelledError):
            self.stream_closed.set()
            raise
        return response


def read_log(file: TextIO) -> list[dict[str, Any]]:
    """The JSON lines written so far to the file of the ``json_log_file`` fixture."""
    file.flush()
    return [json.loads(line) for line in Path(file.name).read_text().splitlines()]


def make_settings(litellm_url: str, **sections: Any) -> Settings:
    """Settings from config sections given as dicts, pointed at ``litellm_url``."""
    raw: dict[str, Any] = {k: v for k, v in sections.items() if k != "memproxy"}
    raw["memproxy"] = {"litellm_url": litellm_url, **sections.get("memproxy", {})}
    return parse_settings(raw)


ProxyFactory = Callable[..., Awaitable[TestClient[web.Request, web.Application]]]


# -- raw HTTP on the wire -----------------------------------------------------------------

async def raw_exchange(client: TestClient[web.Request, web.Application], data: bytes,
                       timeout: float = 5.0) -> bytes:
    """Send raw bytes to memproxy and read until it closes or goes quiet."""
    assert client.port is not None
    reader, writer = await asyncio.open_connection("127.0.0.1", client.port)
    writer.write(data)
    await writer.drain()
    chunks = []
    try:
        while True:
            chunk = await asyncio.wait_for(reader.read(65536), timeout)
            if not chunk:
                break
            chunks.append(chunk)
            if b"\r\n\r\n" in b"".join(chunks) and b"Connection: close" not in data:
                head, _, rest = b"".join(chunks).partition(b"\r\n\r\n")
                length = [int(line.split(b":")[1]) for line in head.split(b"\r\n")
                          if line.lower().startswith(b"content-length:")]
                if length and len(rest) >= length[0]:
                    break
    except TimeoutError:
        pass
    finally:
        writer.close()
    return b"".join(chunks)


def status_of(response: bytes) -> int:
    """The status code of a raw HTTP response, or of its head."""
    return int(response.split(b" ", 2)[1])


# -- memproxy serve as a process of its own -----------------------------------------------

def wait_for_port(port: int, timeout: float = 20.0,
                  process: subprocess.Popen[str] | None = None) -> None:
    """Return once something listens on 127.0.0.1:``port``; fail early if ``process`` exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            _, err = process.communicate()
            raise RuntimeError(f"exited with status {process.returncode} before listening on "
                               f"{port}:\n{err}")
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listens on {port}")


@dataclass
class ServeProcess:
    """``python -m memproxy serve`` running on 127.0.0.1:``port``."""

    popen: subprocess.Popen[str]
    port: int

    @classmethod
    def launch(cls, config: Path, litellm_url: str, *args: str,
               env: dict[str, str] | None = None, stdout: int = subprocess.PIPE
               ) -> ServeProcess:
        """Start it on a free port with ``--config`` and ``--litellm-url``, then ``args``."""
        port = unused_port()
        popen = subprocess.Popen(
            [sys.executable, "-m", "memproxy", "serve", "--config", str(config),
             "--port", str(port), "--litellm-url", litellm_url, *args],
            stdout=stdout, stderr=subprocess.PIPE, text=True, env=env)
        return cls(popen, port)

    def wait_until_listening(self, timeout: float = 20.0) -> None:
        wait_for_port(self.port, timeout, self.popen)

    @property
    def returncode(self) -> int | None:
        return self.popen.returncode

    def poll(self) -> int | None:
        return self.popen.poll()

    def send_signal(self, sig: int) -> None:
        self.popen.send_signal(sig)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> tuple[str, str]:
        """Send ``sig`` unless it has exited, wait for the exit, return (stdout, stderr).

        Still running after ``timeout`` seconds, it is killed and
        :class:`subprocess.TimeoutExpired` is raised. stdout is "" when not captured.
        """
        if self.popen.poll() is None:
            self.popen.send_signal(sig)
        try:
            out, err = self.popen.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.communicate()
            raise
        return out or "", err


ServeFactory = Callable[..., ServeProcess]


# -- secrets that must never show, and a config that uses each of them --------------------

HASH_SECRET = "hash-secret-never-to-be-seen-0001"
SM_KEY = "sm-key-never-to-be-seen-0002"
CLIENT_KEY = "sk-client-key-never-to-be-seen-0003"
SECRETS = (HASH_SECRET, SM_KEY, CLIENT_KEY)
CONFIG_WITH_SECRETS: dict[str, Any] = {
    "user_id_mappings": {"header_patterns": [
        {"header": "user-agent", "pattern": "^claude-cli/", "user_id": "claude-code"}]},
    "memproxy": {
        "headers": {"supermemory_api_key": SM_KEY},
        # Below header_patterns, so a recognised tool is named by its pattern.
        "detectors": {"api_key_hash": {"enabled": True, "priority": 50,
                                       "options": {"secret": HASH_SECRET}}},
    },
}


# -- the whole chain: memproxy start, the real LiteLLM, the fake provider ----------------

START_TIMEOUT = 150.0


@dataclass
class Provider:
    """The fake provider process and what it recorded."""

    process: subprocess.Popen[str]
    url: str
    record: Path
    seen: int = 0

    def records(self) -> list[dict[str, Any]]:
        if not self.record.exists():
            return []
        return [json.loads(line) for line in self.record.read_text().splitlines() if line]

    def mark(self) -> None:
        self.seen = len(self.records())

    def new_calls(self) -> list[dict[str, Any]]:
        """Model calls recorded since the last :meth:`mark`."""
        calls = self.records()[self.seen:]
        return [c for c in calls if c["path"].endswith(("/chat/completions", "/messages",
                                                         "/responses"))]


@dataclass
class Chain:
    """memproxy start, running LiteLLM, in front of the fake provider."""

    process: subprocess.Popen[bytes]
    url: str
    key: str
    log: Path
    killed: bool = field(default=False)

    def health(self) -> dict[str, Any]:
        return dict(httpx.get(self.url + "/health", timeout=5).json())

    def litellm_pid(self) -> int:
        return int(self.health()["litellm"]["pid"])

    def openai(self, user_agent: str | None = None) -> openai.OpenAI:
        headers = {"User-Agent": user_agent} if user_agent else {}
        return openai.OpenAI(base_url=self.url + "/v1", api_key=self.key, max_retries=0,
                             default_headers=headers)

    def anthropic(self, user_agent: str | None = None) -> anthropic.Anthropic:
        headers = {"User-Agent": user_agent} if user_agent else {}
        return anthropic.Anthropic(base_url=self.url, api_key=self.key, max_retries=0,
                                   default_headers=headers)


def start_chain(tmp: Path, config_text: str, env: dict[str, str]) -> Chain:
    """``memproxy start`` on ``config_text`` in ``tmp``, ready to answer, with its own key."""
    config = tmp / "config.yaml"
    config.write_text(config_text)
    port = unused_port()
    key = "sk-e2e-" + secrets.token_hex(16)
    log = tmp / "memproxy.log"
    full_env = {k: v for k, v in os.environ.items()
                if k not in ("SUPERMEMORY_API_KEY", "LITELLM_CONFIG", "LITELLM_BASE_URL")}
    full_env.update(env, LITELLM_MASTER_KEY=key)
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "memproxy", "start", "--config", str(config),
             "--litellm-port", str(unused_port()), "--memoryproxy-port", str(port)],
            stdout=out, stderr=subprocess.STDOUT, env=full_env, cwd=tmp)
    chain = Chain(process, f"http://127.0.0.1:{port}", key, log)
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"memproxy start exited {process.returncode}:\n{log.read_text()}")
        try:
            if httpx.get(chain.url + "/health", timeout=2).status_code == 200:
                return chain
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    stop_chain(chain)
    pytest.fail(f"memproxy start was not ready in {START_TIMEOUT} s:\n{log.read_text()}")


def stop_chain(chain: Chain) -> None:
    if chain.process.poll() is None:
        chain.process.send_signal(signal.SIGTERM)
        try:
            chain.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            chain.process.kill()
            chain.process.wait()
