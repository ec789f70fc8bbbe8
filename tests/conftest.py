"""Fixtures: a fake LiteLLM on loopback that records what it got, and memproxy in front of it."""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO

import pytest
import structlog
from aiohttp import web
from aiohttp.test_utils import TestClient

from memproxy import logs
from memproxy.app import create_app
from tests.helpers import (
    FakeLiteLLM,
    Provider,
    ProxyFactory,
    ServeFactory,
    ServeProcess,
    make_settings,
)
from tests.postgres_server import HOW_TO_ENABLE, REQUIRED_ENV, PostgresServer, binaries


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
    # Loggers already used keep memproxy's writer: point it back before the file closes.
    logs.configure_logging("console", "info", file=sys.stdout)
    structlog.reset_defaults()
    for name, (handlers, propagate, level) in server_loggers.items():
        stdlib_logger = logging.getLogger(name)
        stdlib_logger.handlers[:] = handlers
        stdlib_logger.propagate = propagate
        stdlib_logger.setLevel(level)


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


@pytest.fixture
def serve_memproxy() -> Iterator[ServeFactory]:
    """Start ``python -m memproxy serve`` on a free port and wait until it listens.

    Called with the config file, the LiteLLM URL and any further flags (``env`` and
    ``stdout`` go to :class:`subprocess.Popen`); stop it with :meth:`ServeProcess.stop`
    to see its output. Whatever still runs after the test gets SIGTERM, and
    SIGKILL if it has not exited within 30 s.
    """
    started: list[ServeProcess] = []

    def start(config: Path, litellm_url: str, *args: str, env: dict[str, str] | None = None,
              stdout: int = subprocess.PIPE) -> ServeProcess:
        process = ServeProcess.launch(config, litellm_url, *args, env=env, stdout=stdout)
        started.append(process)
        process.wait_until_listening()
        return process

    yield start
    for process in started:
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.stop()


@pytest.fixture(scope="module")
def provider(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Provider]:
    record = tmp_path_factory.mktemp("provider") / "requests.jsonl"
    process = subprocess.Popen(
        [sys.executable, "-m", "memproxy.demo_provider", "--port", "0",
         "--record", str(record), "--delay", "0.02"],
        stdout=subprocess.PIPE, text=True)
    assert process.stdout is not None
    line = process.stdout.readline()
    assert line.startswith("READY "), line
    yield Provider(process, line.split()[1], record)
    process.terminate()
    process.wait(timeout=10)


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """A PostgreSQL server of the test run's own, in a temporary folder.

    Skipped, saying how to enable it, where PostgreSQL or psycopg is missing, unless
    $MEMPROXY_REQUIRE_POSTGRES is set (CI sets it): then a missing server fails.
    """
    bindir = binaries()
    missing = bindir is None or importlib.util.find_spec("psycopg") is None
    if missing:
        if os.environ.get(REQUIRED_ENV):
            pytest.fail(f"{REQUIRED_ENV} is set, but: {HOW_TO_ENABLE}")
        pytest.skip(HOW_TO_ENABLE)
    assert bindir is not None
    server = PostgresServer(bindir)
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def pg_dsn(postgres_server: PostgresServer) -> str:
    """The connection string of a new, empty database on the test run's server."""
    return postgres_server.dsn(postgres_server.new_database())


@pytest.fixture(scope="module")
def spare_postgres(postgres_server: PostgresServer) -> Iterator[PostgresServer]:
    """A second server, for the tests that stop and start it (the run's own stays up)."""
    server = PostgresServer(postgres_server.bindir)
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def running_postgres(spare_postgres: PostgresServer) -> Iterator[PostgresServer]:
    """``spare_postgres``, started if a test left it stopped, and started again afterwards."""
    if not spare_postgres.running():
        spare_postgres.start()
    yield spare_postgres
    if not spare_postgres.running():
        spare_postgres.start()
