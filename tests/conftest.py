"""Fixtures: a fake LiteLLM on loopback that records what it got, and memproxy in front of it."""

from __future__ import annotations

import asyncio
import gzip
import json
import logging
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import pytest
import structlog
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from memproxy import logs

from memproxy.app import create_app
from memproxy.config import Settings, parse_settings


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


@pytest.fixture
async def fake_litellm(aiohttp_server: Any) -> FakeLiteLLM:
    fake = FakeLiteLLM()
    app = web.Application(client_max_size=1024**3)
    app.router.add_route("*", "/{tail:.*}", fake.handle)
    fake.server = await aiohttp_server(app)
    return fake


@pytest.fixture
def json_log_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[TextIO]:
    """memproxy's JSON logging into a file, as ``serve`` sets it up; all undone afterwards."""
    monkeypatch.setattr(logs, "_process_fields", {})
    monkeypatch.setattr(logs, "_request_writer", logs._request_writer)
    server_loggers = {name: (logging.getLogger(name).handlers[:],
                             logging.getLogger(name).propagate, logging.getLogger(name).level)
                      for name in logs.SERVER_LOGGERS}
    with open(tmp_path / "log.jsonl", "w") as file:
        logs.configure_logging("json", "info", file=file)
        yield file
    structlog.reset_defaults()
    for name, (handlers, propagate, level) in server_loggers.items():
        stdlib_logger = logging.getLogger(name)
        stdlib_logger.handlers[:] = handlers
        stdlib_logger.propagate = propagate
        stdlib_logger.setLevel(level)


def read_log(file: TextIO) -> list[dict[str, Any]]:
    """The JSON lines written so far to a :func:`json_log_file`."""
    file.flush()
    return [json.loads(line) for line in Path(file.name).read_text().splitlines()]


def make_settings(litellm_url: str, **sections: Any) -> Settings:
    """Settings from config sections given as dicts, pointed at ``litellm_url``."""
    raw: dict[str, Any] = {k: v for k, v in sections.items() if k != "memproxy"}
    raw["memproxy"] = {"litellm_url": litellm_url, **sections.get("memproxy", {})}
    return parse_settings(raw)


ProxyFactory = Callable[..., Awaitable[TestClient[web.Request, web.Application]]]


@pytest.fixture
def proxy(aiohttp_client: Any, fake_litellm: FakeLiteLLM) -> ProxyFactory:
    """Start memproxy in front of the fake LiteLLM; keyword args are config sections."""

    async def start(*, extra_plugins: tuple[object, ...] = (), litellm_url: str | None = None,
                    **sections: Any) -> TestClient[web.Request, web.Application]:
        settings = make_settings(litellm_url or fake_litellm.url, **sections)
        app = create_app(settings, extra_plugins=extra_plugins)
        client: TestClient[web.Request, web.Application] = await aiohttp_client(app)
        return client

    return start
