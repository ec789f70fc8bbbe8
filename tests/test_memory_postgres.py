"""The PostgreSQL backend's own promises, against a real server.

What the store and stage suites do not already prove for both backends: the schema
(created once when replicas start together, versioned, migrated by hand when asked),
erasure down to the table's tuples and files, the connection string kept secret, the
server going away and coming back, a pool with no connection free, moving memories over
with ``memory copy``, and every process seeing the clients and activity of the others.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from aiohttp import web
from aiohttp.test_utils import TestClient

from memproxy.app import create_app
from memproxy.demo_provider import DemoProvider
from memproxy.endpoints import MEMORY
from memproxy.memory import postgres as postgres_backend
from memproxy.memory.postgres import PostgresMemoryStore, describe_dsn
from memproxy.memory.sqlite import SqliteMemoryStore
from memproxy.memory.store import NewMemory, SchemaError, StoreUnavailable
from tests.helpers import make_settings
from tests.postgres_server import PASSWORD, PostgresServer

REPO = Path(__file__).resolve().parents[1]
NOW = 1_764_000_000.0


def new(text: str, *, user: str = "alice", conversation: str = "c1", role: str = "user",
        at: float = NOW) -> NewMemory:
    return NewMemory(user_id=user, conversation_id=conversation, role=role, text=text,
                     created_at=at, client="header_patterns", user_agent="curl/8.5.0",
                     model="gpt-test")


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "memproxy", *args], capture_output=True,
                          text=True, timeout=120, cwd=REPO, env={**os.environ, **(env or {})})


async def memproxy(aiohttp_client: Any, provider: DemoProvider,
                   **memory: Any) -> TestClient[web.Request, web.Application]:
    """memproxy in-process with a PostgreSQL memory section, in front of the demo provider."""
    settings = make_settings(provider.url, memproxy={
        "headers": {"supermemory_api_key": None},
        "memory": {"backend": "postgres", **memory,
                   "recall": {"timeout_ms": 2000, **memory.pop("recall", {})}}})
    client: TestClient[web.Request, web.Application] = await aiohttp_client(create_app(settings))
    return client


async def chat(client: TestClient[web.Request, web.Application], user: str, text: str,
               *, agent: str | None = None) -> tuple[int, int, dict[str, Any]]:
    """One single-message conversation: the status, the memories recalled, the JSON."""
    headers = {"User-Agent": agent} if agent else {"x-memory-user-id": user}
    async with client.post("/v1/chat/completions", headers=headers, json={
            "model": "gpt-fake", "messages": [{"role": "user", "content": text}]}) as response:
        body = await response.json()
        return response.status, int(response.headers.get("x-memproxy-memories", "0")), body


async def eventually(check: Any, timeout: float = 20.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        result = await check()
        if result:
            return result
        if time.monotonic() > deadline:
            pytest.fail(f"not true within {timeout} s: {check.__doc__ or check}")
        await asyncio.sleep(0.1)


@pytest.fixture
async def provider() -> AsyncIterator[DemoProvider]:
    async with DemoProvider(chunk_delay=0) as demo:
        yield demo


# -- the schema ----------------------------------------------------------------------------

async def test_replicas_starting_at_once_create_the_schema_once(pg_dsn: str) -> None:
    stores = [PostgresMemoryStore(pg_dsn) for _ in range(6)]
    try:
        await asyncio.gather(*(store.open() for store in stores))
        for i, store in enumerate(stores):
            await store.add([new(f"replica {i} remembers the harbour")])
        found = await stores[0].search("alice", "harbour", limit=10)
        assert len(found) == 6
        assert await stores[0].migrate() == (2, 2)
    finally:
        await asyncio.gather(*(store.close() for store in stores))


async def test_with_migrate_false_memory_waits_for_the_operators_migrate_db(
    postgres_server: PostgresServer, tmp_path: Path,
) -> None:
    database = postgres_server.new_database()
    dsn = postgres_server.dsn(database)
    manual = PostgresMemoryStore(dsn, migrate=False)
    try:
        with pytest.raises(SchemaError, match="memory migrate-db"):
            await manual.open()
    finally:
        await manual.close()
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"memproxy": {"memory": {
        "backend": "postgres", "dsn": "os.environ/TEAM_DSN", "migrate": False}}}))
    first = run_cli("memory", "--config", str(config), "migrate-db", env={"TEAM_DSN": dsn})
    assert first.returncode == 0, first.stderr
    assert "layout 2 (was 0)" in first.stdout
    again = run_cli("memory", "--config", str(config), "migrate-db", env={"TEAM_DSN": dsn})
    assert "layout 2 (already up to date)" in again.stdout
    manual = PostgresMemoryStore(dsn, migrate=False)
    try:
        await manual.add([new("after the migration")])
        assert [m.text for m in await manual.export("alice")] == ["after the migration"]
    finally:
        await manual.close()


async def test_a_database_of_a_newer_memproxy_is_refused(
    postgres_server: PostgresServer,
) -> None:
    database = postgres_server.new_database()
    store = PostgresMemoryStore(postgres_server.dsn(database))
    await store.open()
    await store.close()
    postgres_server.sql("UPDATE memproxy_schema SET version = 99", database)
    newer = PostgresMemoryStore(postgres_server.dsn(database))
    try:
        with pytest.raises(SchemaError, match="newer memproxy"):
            await newer.open()
    finally:
        await newer.close()


async def test_pins_of_a_layout_1_database_survive_the_upgrade_and_then_age_from_it(
    postgres_server: PostgresServer, monkeypatch: pytest.MonkeyPatch,
) -> None:
    database = postgres_server.new_database()
    dsn = postgres_server.dsn(database)
    monkeypatch.setattr(postgres_backend, "SCHEMA_VERSION", 1)
    old = PostgresMemoryStore(dsn)
    try:
        assert await old.migrate() == (0, 1)
    finally:
        await old.close()
    monkeypatch.undo()
    postgres_server.sql("INSERT INTO memproxy_pins VALUES ('alice', 'before-upgrade', "
                        "'an old block')", database)

    upgraded_at = time.time()
    store = PostgresMemoryStore(dsn)
    try:
        assert await store.pinned("alice", "before-upgrade") == "an old block"
        assert await store.migrate() == (2, 2)
        assert await store.forget_quiet_pins(upgraded_at - 50) == 0
        assert await store.forget_quiet_pins(upgraded_at + 50) == 1
        assert await store.pinned("alice", "before-upgrade") is None
    finally:
        await store.close()


# -- recall for users with many memories -----------------------------------------------

async def test_with_many_memories_the_rarest_words_decide_what_is_scored(
    pg_dsn: str, monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Scoring is bounded (MAX_SCORED memories): made small here, so that 300 memories of
    # common words are more than it, and the one memory with a rare word must still win.
    monkeypatch.setattr(postgres_backend, "MAX_SCORED", 40)
    store = PostgresMemoryStore(pg_dsn)
    try:
        # Each of these words is in a sixth of the memories: common, but not so common that
        # the query leaves it out (ranking.COMMON_SHARE).
        common = ["kitchen", "window", "garden", "ladder", "violin", "pepper"]
        await store.add([new(f"A note about the {common[i % 6]}, number {i}.",
                             conversation=f"c{i}") for i in range(300)])
        await store.add([new("The quokkavale orchard blooms in spring.", conversation="rare")])
        question = "What about the kitchen, the window, the garden and the quokkavale?"
        recalled = await store.recall("alice", question, max_tokens=300,
                                      exclude_conversation=None)
        assert "The quokkavale orchard blooms in spring." in [m.text for m in recalled.memories]
        matching = await store.search("alice", question, limit=5)
        assert "quokkavale" in matching[0].text
    finally:
        await store.close()


# -- erasure -------------------------------------------------------------------------------

SECRET = "zanzibarquokka"


async def test_an_erased_memory_is_gone_from_rows_neighbours_pins_tuples_and_files(
    postgres_server: PostgresServer,
) -> None:
    database = postgres_server.new_database()
    store = PostgresMemoryStore(postgres_server.dsn(database))
    try:
        turns = ["We talked about the garden.", f"My vault code word is {SECRET}.",
                 "The tomatoes are ripe.", "The cat sleeps a lot."]
        await store.add([new(text, role="user" if i % 2 == 0 else "assistant")
                         for i, text in enumerate(turns)])
        await store.add([new("padding memory " + str(i), conversation=f"p{i}")
                         for i in range(200)])
        await store.pin("alice", "c9", f"a block quoting {SECRET}")
        # The neighbours of the secret carry it in their search context.
        assert postgres_server.sql(
            f"SELECT count(*) FROM memproxy_memories WHERE context LIKE '%{SECRET}%'",
            database) == "3"
        (memory,) = [m for m in await store.export("alice") if SECRET in m.text]
        assert await store.delete("alice", memory.id) == 1

        # At once, for every query: rows, neighbours' context and search vectors, pins.
        everywhere = (f"SELECT (SELECT count(*) FROM memproxy_memories WHERE text || context "
                      f"|| search::text LIKE '%{SECRET}%') + (SELECT count(*) FROM "
                      f"memproxy_pins WHERE block LIKE '%{SECRET}%')")
        assert postgres_server.sql(everywhere, database) == "0"
        assert postgres_server.sql(
            "SET enable_seqscan = off; SELECT count(*) FROM memproxy_memories WHERE "
            f"user_id = 'alice' AND search @@ to_tsquery('english', '{SECRET}')",
            database).splitlines()[-1] == "0"
        assert (await store.recall("alice", SECRET, max_tokens=2000,
                                   exclude_conversation=None)).memories == ()
        # The VACUUM run after the erasure prunes the dead tuples: no tuple of the table,
        # live or dead, holds the text any more.
        for _ in range(50):
            await asyncio.sleep(0.1)
            if store._vacuum is not None and store._vacuum.done():
                break
        postgres_server.sql("CREATE EXTENSION IF NOT EXISTS pageinspect", database)
        tuples = postgres_server.sql(
            "SELECT count(*) FROM generate_series(0, pg_relation_size('memproxy_memories') "
            "/ 8192 - 1) AS page, heap_page_items(get_raw_page('memproxy_memories', "
            f"page::int)) WHERE position('{SECRET}'::bytea in t_data) > 0", database)
        assert tuples == "0"
        # Bytes of pruned tuples stay in the page's free space until overwritten;
        # compact (VACUUM FULL) writes new files with the live rows only.
        compacted = run_cli("memory", "--config", "/dev/null", "compact",
                            env={"MEMPROXY_MEMORY_DSN": postgres_server.dsn(database)})
        assert compacted.returncode != 0  # /dev/null has no memory section: refused
        await store.compact()
        postgres_server.sql("CHECKPOINT", database)
        files = [postgres_server.sql(f"SELECT pg_relation_filepath('{relation}')", database)
                 for relation in ("memproxy_memories", "memproxy_pins")]
        for relative in files:
            assert SECRET.encode() not in (postgres_server.data / relative).read_bytes()
        assert len(await store.export("alice")) == 3 + 200
    finally:
        await store.close()


# -- secrets -------------------------------------------------------------------------------

async def test_the_database_password_never_appears_in_logs_errors_health_or_status(
    postgres_server: PostgresServer, aiohttp_client: Any, provider: DemoProvider,
    capfd: pytest.CaptureFixture[str], tmp_path: Path,
) -> None:
    database = postgres_server.new_database(owner="secret_user")
    port = postgres_server.port
    right = f"postgresql://secret_user:{PASSWORD}@127.0.0.1:{port}/{database}"
    wrong = f"postgresql://secret_user:{PASSWORD}-wrong@127.0.0.1:{port}/{database}"
    assert describe_dsn(right) == f"secret_user@127.0.0.1:{port}/{database}"
    seen: list[str] = []
    for dsn in (right, wrong):
        client = await memproxy(aiohttp_client, provider, dsn=dsn)
        status, _, _ = await chat(client, "alice", "My bicycle is green.")
        assert status == 200
        for path in ("/health", "/memory-routing/status", "/memory-routing/memory",
                     "/memory-routing/unmatched", "/metrics"):
            async with client.get(path) as response:
                seen.append(await response.text())
        await client.close()
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"memproxy": {"memory": {"backend": "postgres"}}}))
    for dsn in (right, wrong):
        for args in (("check-config",), ("memory", "list"), ("memory", "migrate-db")):
            result = run_cli(args[0], "--config", str(config), *args[1:],
                             env={"MEMPROXY_MEMORY_DSN": dsn})
            seen += [result.stdout, result.stderr]
    captured = capfd.readouterr()
    seen += [captured.out, captured.err]
    everything = "\n".join(seen)
    assert f"secret_user@127.0.0.1:{port}/{database}" in everything  # the server is named
    assert "degraded" in everything  # the wrong password was noticed
    assert PASSWORD not in everything


# -- faults --------------------------------------------------------------------------------

async def test_a_replica_started_while_the_database_is_down_serves_and_picks_memory_up_later(
    running_postgres: PostgresServer, aiohttp_client: Any, provider: DemoProvider,
) -> None:
    dsn = running_postgres.dsn(running_postgres.new_database())
    running_postgres.stop()
    started = time.monotonic()
    client = await memproxy(aiohttp_client, provider, dsn=dsn,
                            recall={"timeout_ms": 300})
    assert time.monotonic() - started < 10
    status, memories, _ = await chat(client, "alice", "My boat is called Seagull.")
    assert (status, memories) == (200, 0)
    async with client.get("/health") as response:
        health = await response.json()
    assert health["memory"]["status"] == "degraded"
    running_postgres.start()

    async def remembered() -> bool:
        """the boat is recalled once the server is back"""
        status, memories, _ = await chat(client, "alice", "What is my boat called, Seagull?")
        return status == 200 and memories > 0

    await eventually(remembered)
    async with client.get("/health") as response:
        assert (await response.json())["memory"]["status"] == "ok"


async def test_writes_wait_while_the_database_is_down_and_land_when_it_is_back(
    running_postgres: PostgresServer, aiohttp_client: Any, provider: DemoProvider,
) -> None:
    dsn = running_postgres.dsn(running_postgres.new_database())
    client = await memproxy(aiohttp_client, provider, dsn=dsn, queue=3,
                            recall={"timeout_ms": 300})
    assert (await chat(client, "alice", "warm-up message"))[0] == 200
    app = client.app
    assert app is not None
    stage = app[MEMORY]
    store = stage.store

    async def warmed_up() -> bool:
        """the warm-up exchange is stored"""
        return any(m.text == "warm-up message" for m in await store.export("alice"))

    await eventually(warmed_up)
    running_postgres.stop()
    facts = [f"Fact number {i}: my locker is {4000 + i}." for i in range(6)]
    for fact in facts:
        status, _, _ = await chat(client, "alice", fact)
        assert status == 200
    async with client.get("/health") as response:
        assert (await response.json())["memory"]["status"] == "degraded"
    running_postgres.start()

    async def landed() -> list[str]:
        """the queued facts are written once the server is back"""
        try:
            texts = [m.text for m in await store.export("alice")]
        except StoreUnavailable:  # not connected again yet
            return []
        return [fact for fact in facts if fact in texts]

    kept = await eventually(lambda: _at_least(landed, 4))
    # One batch in hand and a queue of three kept; the other two were dropped and counted.
    assert len(kept) == 4
    assert stage.dropped == 4  # two exchanges, a message and an answer each
    async with client.get("/metrics") as response:
        metrics = await response.text()
    assert 'memproxy_memory_writes_total{outcome="dropped"} 4.0' in metrics


async def _at_least(check: Any, count: int) -> Any:
    found = await check()
    return found if len(found) >= count else None


async def test_an_exhausted_pool_makes_recall_give_up_within_its_budget(
    pg_dsn: str, aiohttp_client: Any, provider: DemoProvider,
) -> None:
    client = await memproxy(aiohttp_client, provider, dsn=pg_dsn, pool_size=1,
                            recall={"timeout_ms": 200})
    assert (await chat(client, "alice", "My kite is red."))[0] == 200
    app = client.app
    assert app is not None
    store = app[MEMORY].store
    assert isinstance(store, PostgresMemoryStore)
    async with store._pool.connection():  # the only connection, held
        started = time.monotonic()
        status, memories, _ = await chat(client, "alice", "What colour is my kite?")
        took = time.monotonic() - started
    assert (status, memories) == (200, 0)
    assert took < 1.5
    async with client.get("/metrics") as response:
        assert 'reason="recall_timeout"' in await response.text()


# -- moving over ---------------------------------------------------------------------------

async def test_memory_copy_moves_every_memory_and_a_second_run_copies_nothing_twice(
    tmp_path: Path, pg_dsn: str,
) -> None:
    source = SqliteMemoryStore(tmp_path / "memory.db")
    long_answer = "\n\n".join(f"Paragraph {i} about the lighthouse keeper. " * 12
                              for i in range(4))
    await source.add([new(f"{user} likes item {i}", user=user, conversation=f"c{i % 3}")
                      for user in ("ann", "ben", "cy") for i in range(30)])
    await source.add([new(long_answer, user="ann", role="assistant", conversation="long")])
    expected = {user: [(m.conversation_id, m.role, m.text) for m in await source.export(user)]
                for user in ("ann", "ben", "cy")}
    await source.close()
    # An earlier copy that stopped part of the way: ben's first ten arrived.
    target = PostgresMemoryStore(pg_dsn)
    await target.add([new(text, user="ben", conversation=c, role=role)
                      for c, role, text in expected["ben"][:10]])
    await target.close()

    args = ("memory", "copy", "--from", f"sqlite:{tmp_path / 'memory.db'}",
            "--to", f"postgres:{pg_dsn}")
    first = run_cli(*args)
    assert first.returncode == 0, first.stderr
    total = sum(len(v) for v in expected.values())
    assert f"copied 3 users: {total} memories read, {total - 10} written" in first.stdout
    again = run_cli(*args)
    assert f"{total} memories read, 0 written" in again.stdout

    target = PostgresMemoryStore(pg_dsn)
    try:
        for user, memories in expected.items():
            got = [(m.conversation_id, m.role, m.text) for m in await target.export(user)]
            assert sorted(got) == sorted(memories)
        recalled = await target.recall("ann", "lighthouse keeper paragraph 2", max_tokens=1500,
                                       exclude_conversation=None)
        assert any("Paragraph 2" in m.text for m in recalled.memories)
    finally:
        await target.close()


def test_memory_copy_names_a_bad_address_and_the_fix(tmp_path: Path) -> None:
    result = run_cli("memory", "copy", "--from", "mysql:x", "--to", "postgres:host=/nowhere")
    assert result.returncode == 2
    assert "--from" in result.stderr and "sqlite:PATH" in result.stderr
    assert "Traceback" not in result.stderr


# -- every process sees what the others saw -----------------------------------------------

@pytest.mark.parametrize("backend", ["local", "postgres"])
async def test_each_process_lists_the_clients_and_activity_that_the_others_saw(
    backend: str, request: pytest.FixtureRequest, aiohttp_client: Any, provider: DemoProvider,
    tmp_path: Path,
) -> None:
    memory: dict[str, Any] = ({"backend": "local", "path": str(tmp_path / "memory.db")}
                              if backend == "local" else
                              {"backend": "postgres", "dsn": request.getfixturevalue("pg_dsn")})
    replicas = []
    for _ in range(2):
        settings = make_settings(provider.url, memproxy={
            "headers": {"supermemory_api_key": None}, "memory": memory})
        replicas.append(await aiohttp_client(create_app(settings)))
    first, second = replicas
    assert (await chat(first, "", "hello", agent="NewTool/0.1 (linux)"))[0] == 200
    assert (await chat(first, "alice", "hello from alice"))[0] == 200

    async def second_sees_them() -> dict[str, Any] | None:
        """the second replica lists the client and alice's request the first one handled"""
        async with second.get("/memory-routing/status") as response:
            status: dict[str, Any] = await response.json()
        agents = [c["headers"].get("user-agent") for c in status["unmatched"]]
        return status if ("NewTool/0.1 (linux)" in agents
                          and "alice" in status["requests_last_hour"]) else None

    status = await eventually(second_sees_them, timeout=10)
    assert status["shared_view"] == "every memproxy process sharing the memory store"
    (client,) = [c for c in status["unmatched"]
                 if c["headers"].get("user-agent") == "NewTool/0.1 (linux)"]
    assert client["suggested_yaml"].startswith("- {header: user-agent, pattern: '^NewTool")
    async with second.get("/memory-routing/unmatched") as response:
        listed = (await response.json())["unmatched"]
    assert [c["count"] for c in listed] == [1]
    assert json.dumps(status).count("hello") == 0  # counts and headers, never what was said
