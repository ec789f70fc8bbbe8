"""The memory stage's promises over HTTP: memproxy in-process, in front of a fake provider.

What a user would notice: which requests get a memory block and which reach the provider
exactly as the client sent them; what each ``x-memory-mode`` does; that a slow, broken or
overloaded store never makes a request worse than no memory at all; that no user's block
ever holds another user's words; how soon an answer is remembered; that a conversation keeps
the block it started with; and that an erased memory stays out of the next block.

The provider is :class:`memproxy.demo_provider.DemoProvider`, answering Chat Completions,
Messages and Responses in each API's own format, streams included; what it received is
what LiteLLM would have received from memproxy.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import random
import re
import secrets
import sqlite3
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import pytest
import structlog
from aiohttp import web
from aiohttp.test_utils import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from multidict import CIMultiDictProxy
from prometheus_client.parser import text_string_to_metric_families

import memproxy.app
import memproxy.logs
from memproxy.app import create_app
from memproxy.demo_provider import DemoProvider, RecordedRequest
from memproxy.endpoints import MEMORY
from memproxy.memory import MEMORIES_HEADER
from memproxy.memory import sqlite as sqlite_backend
from memproxy.memory import stage as stage_module
from memproxy.memory.dialects import api_format, read_request
from memproxy.memory.recall import BLOCK_CLOSE, BLOCK_OPEN
from memproxy.memory.sqlite import SqliteMemoryStore
from memproxy.memory.stage import MemoryStage
from memproxy.memory.store import NewMemory
from tests.helpers import make_settings, read_log

CHAT = "/v1/chat/completions"
PATHS = {"chat": CHAT, "messages": "/v1/messages", "responses": "/v1/responses"}
MODE_HEADER = "x-memory-mode"

ZORBLAX = "My cat Zorblax hates thunderstorms."
ASK = "What does my cat Zorblax hate?"
LOCKER = "My locker code is 4711."
ASK_LOCKER = "What is my locker code?"
#: Told after everything a test looks at: the writer stores in order, so once this is kept,
#: anything queued before it has been stored too.
MARKER = "A note about gardening, written last."


# -- the upstream, and memproxy in front of it -----------------------------------------------

class Upstream(DemoProvider):
    """The fake provider, also answering LiteLLM's liveliness probe, so /health can say ok."""

    async def _handle(self, request: web.BaseRequest) -> web.StreamResponse:
        if request.path == "/health/liveliness":
            return web.json_response("I'm alive!")
        return await super()._handle(request)


def conversation(api: str, turns: Sequence[str], *, stream: bool = False) -> dict[str, Any]:
    """A request body of ``api`` whose turns alternate user, assistant, user, ..."""
    items = [{"role": "assistant" if i % 2 else "user", "content": text}
             for i, text in enumerate(turns)]
    if api == "chat":
        return {"model": "gpt-fake", "messages": items, "stream": stream}
    if api == "messages":
        return {"model": "claude-fake", "max_tokens": 64, "messages": items, "stream": stream}
    return {"model": "gpt-fake", "input": items, "stream": stream}


def odd_json(text: str) -> bytes:
    """A chat body memproxy understands, in a form it would never write itself."""
    return ('{ "messages" : [ {"content": ' + json.dumps(text) + ', "role": "user"} ],\n'
            '  "model": "gpt-fake", "temperature": 1.0 }').encode()


def strings(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from strings(item)


def block_in(request: RecordedRequest | None) -> str | None:
    """The memory block in a request as the upstream received it, or ``None``."""
    if request is None:
        return None
    try:
        body = json.loads(request.body)
    except ValueError:
        return None
    for text in strings(body):
        start = text.find(BLOCK_OPEN)
        if start >= 0:
            return text[start:text.index(BLOCK_CLOSE, start) + len(BLOCK_CLOSE)]
    return None


_SNIPPET = re.compile(r"^\[\d{4}-\d{2}-\d{2}\] (user|assistant): (.*)$", re.MULTILINE)


def snippets(block: str | None) -> list[tuple[str, str]]:
    """The ``(role, text)`` of each memory in a block."""
    return _SNIPPET.findall(block or "")


@dataclass
class Exchange:
    """One request through memproxy: what the client got, and what the upstream received."""

    status: int
    headers: CIMultiDictProxy[str]
    body: bytes
    sent: bytes
    upstream: RecordedRequest | None

    @property
    def block(self) -> str | None:
        return block_in(self.upstream)

    @property
    def memories(self) -> int:
        return int(self.headers.get(MEMORIES_HEADER, "0"))


@dataclass
class Proxy:
    """memproxy under test, and the upstream it forwards to."""

    client: TestClient[web.Request, web.Application]
    upstream: Upstream

    @property
    def stage(self) -> MemoryStage:
        app = self.client.app
        assert app is not None
        return app[MEMORY]

    async def send(self, method: str, path: str, body: bytes | None, *, user: str | None,
                   headers: dict[str, str] | None = None) -> Exchange:
        """``body`` as the client's exact bytes; ``user`` as the explicit id header."""
        probe = uuid.uuid4().hex  # finds this request among the upstream's, at any concurrency
        sent = {"x-probe-id": probe, **(headers or {})}
        if user is not None:
            sent["x-memory-user-id"] = user
        if body is not None:
            sent.setdefault("Content-Type", "application/json")
        async with self.client.request(method, path, data=body, headers=sent) as response:
            answer = await response.read()
        received = [r for r in self.upstream.requests if r.headers.get("x-probe-id") == probe]
        assert len(received) <= 1
        return Exchange(response.status, response.headers, answer, body or b"",
                        received[0] if received else None)

    async def ask(self, api: str, user: str | None, turns: Sequence[str], *,
                  stream: bool = False, headers: dict[str, str] | None = None) -> Exchange:
        body = json.dumps(conversation(api, turns, stream=stream)).encode()
        return await self.send("POST", PATHS[api], body, user=user, headers=headers)

    async def tell(self, user: str | None, text: str, *,
                   headers: dict[str, str] | None = None, kept_as: str | None = None) -> None:
        """A one-message conversation, and the wait until memproxy has stored it."""
        told = await self.ask("chat", user, [text], headers=headers)
        assert told.status == 200, told.body
        await self.wait_until_kept(kept_as or user or "default", text)

    async def kept(self, user: str) -> list[dict[str, Any]]:
        """The user's memories, as the admin API lists them."""
        async with self.client.get(f"/memory-routing/memory/{user}",
                                   params={"limit": "1000"}) as response:
            assert response.status == 200, await response.text()
            memories: list[dict[str, Any]] = (await response.json())["memories"]
            return memories

    async def wait_until_kept(self, user: str, *texts: str,
                              timeout: float = 5.0) -> list[dict[str, Any]]:
        """Writes happen off the request path: poll the admin API until every text is listed."""
        deadline = time.monotonic() + timeout
        while True:
            memories = await self.kept(user)
            if all(any(m["text"] == text for m in memories) for text in texts):
                return memories
            if time.monotonic() > deadline:
                pytest.fail(f"not all of {texts!r} kept for {user} within {timeout} s: "
                            f"{[m['text'] for m in memories]}")
            await asyncio.sleep(0.02)

    async def metric(self, name: str, **labels: str) -> float:
        async with self.client.get("/metrics") as response:
            text = await response.text()
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == name and all(sample.labels.get(k) == v
                                               for k, v in labels.items()):
                    return float(sample.value)
        return 0.0


Start = Callable[..., Awaitable[Proxy]]


@pytest.fixture
async def upstream() -> AsyncIterator[Upstream]:
    async with Upstream(chunk_delay=0) as fake:
        yield fake


@pytest.fixture
def memory_file(tmp_path: Path) -> Path:
    return tmp_path / "memory.db"


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Every test runs with each backend, except those about the SQLite file itself."""
    if "backend" in metafunc.fixturenames:
        about_the_file = "memory_file" in inspect.signature(metafunc.function).parameters
        metafunc.parametrize("backend", ["local"] if about_the_file else ["local", "postgres"])


@pytest.fixture
def start(aiohttp_client: Any, upstream: Upstream, memory_file: Path, backend: str,
          request: pytest.FixtureRequest) -> Start:
    """Start memproxy in front of ``upstream``, keeping memory in ``memory_file`` (backend
    local) or in a new PostgreSQL database (backend postgres).

    ``memory=False`` leaves the memory section out; ``recall`` and the other keywords go
    into ``memproxy.memory``. The recall budget defaults to a generous 5 s, so that a loaded
    machine never skips a recall a test relies on; the tests of the budget set their own.
    """

    async def start(*, memory: bool = True, recall: dict[str, Any] | None = None,
                    mappings: dict[str, Any] | None = None, **memory_keys: Any) -> Proxy:
        section: dict[str, Any] = {"headers": {"supermemory_api_key": None}}
        if memory:
            store: dict[str, Any] = {"backend": "local", "path": str(memory_file)}
            if backend == "postgres":
                store = {"backend": "postgres", "dsn": request.getfixturevalue("pg_dsn")}
            section["memory"] = {**store, **memory_keys,
                                 "recall": {"timeout_ms": 5000, **(recall or {})}}
        sections: dict[str, Any] = {"memproxy": section}
        if mappings is not None:
            sections["user_id_mappings"] = mappings
        settings = make_settings(upstream.url, **sections)
        client: TestClient[web.Request, web.Application] = await aiohttp_client(
            create_app(settings))
        return Proxy(client, upstream)

    return start


@pytest.fixture
def memory_log(json_log_file: TextIO, monkeypatch: pytest.MonkeyPatch) -> TextIO:
    """memproxy's JSON log lines in a file.

    The loggers on the memory path are replaced by fresh ones for the test: structlog keeps
    a logger bound to the configuration (and file) in force when it was first used.
    """
    for module, name in ((memproxy.app, "memproxy"), (memproxy.logs, "memproxy"),
                         (stage_module, "memproxy.memory"),
                         (sqlite_backend, "memproxy.memory")):
        monkeypatch.setattr(module, "log", structlog.get_logger(name))
    return json_log_file


@contextlib.contextmanager
def write_locked(path: Path) -> Iterator[None]:
    """The memory file's write lock held by another connection, as another process would."""
    other = sqlite3.connect(path, isolation_level=None)
    try:
        other.execute("BEGIN EXCLUSIVE")
        yield
    finally:
        if other.in_transaction:
            other.execute("ROLLBACK")
        other.close()


# -- requests that get no block go upstream byte for byte ------------------------------------

@dataclass(frozen=True)
class Untouched:
    """A request memproxy must pass on exactly as the client sent it."""

    method: str
    path: str
    body: bytes | None
    headers: tuple[tuple[str, str], ...] = ()
    #: memproxy keeps memory (``memproxy.memory.backend: local``).
    memory: bool = True
    #: The user has a memory that the request's words would recall.
    seeded: bool = True


UNTOUCHED = {
    "memory off": Untouched("POST", CHAT, odd_json(ASK), memory=False, seeded=False),
    "the model list": Untouched("GET", "/v1/models", None),
    "another endpoint": Untouched(
        "POST", "/v1/embeddings", b'{"model": "emb-fake", "input": "my cat Zorblax"}'),
    "a body that is not JSON": Untouched("POST", CHAT, ASK.encode() + b' {"model": '),
    "JSON that is not an object": Untouched("POST", CHAT, json.dumps([ASK]).encode()),
    "messages as a string": Untouched(
        "POST", CHAT, json.dumps({"model": "gpt-fake", "messages": ASK}).encode()),
    "a role no API has": Untouched("POST", CHAT, json.dumps(
        {"model": "gpt-fake", "messages": [{"role": "wizard", "content": ASK}]}).encode()),
    "a content part without a type": Untouched("POST", CHAT, json.dumps(
        {"model": "gpt-fake", "messages": [{"role": "user", "content": [{"text": ASK}]}]}
    ).encode()),
    "a key given twice": Untouched(
        "POST", CHAT, b'{"model": "gpt-fake", "model": "gpt-fake", "messages": '
        b'[{"role": "user", "content": "' + ASK.encode() + b'"}]}'),
    "an Anthropic system prompt that is a number": Untouched(
        "POST", "/v1/messages", json.dumps({"model": "claude-fake", "max_tokens": 9, "system": 7,
                                            "messages": [{"role": "user", "content": ASK}]}
                                           ).encode()),
    "the user's first conversation": Untouched("POST", CHAT, odd_json(ASK), seeded=False),
    "x-memory-mode: off": Untouched("POST", CHAT, odd_json(ASK),
                                    headers=((MODE_HEADER, "off"),)),
    "x-memory-mode: off on Messages": Untouched(
        "POST", "/v1/messages", json.dumps(conversation("messages", [ASK])).encode(),
        headers=((MODE_HEADER, "Off"),)),
}


@pytest.mark.parametrize("case", UNTOUCHED.values(), ids=UNTOUCHED.keys())
async def test_a_request_that_gets_no_block_reaches_the_upstream_byte_for_byte(
    start: Start, case: Untouched
) -> None:
    proxy = await start(memory=case.memory)
    if case.seeded:
        await proxy.tell("ann", ZORBLAX)
        control = await proxy.ask("chat", "ann", [ASK])
        assert ZORBLAX in (control.block or "")  # the same words, understood, get the fact

    got = await proxy.send(case.method, case.path, case.body, user="ann",
                           headers=dict(case.headers))

    assert got.upstream is not None
    assert got.upstream.body == got.sent
    assert MEMORIES_HEADER not in got.headers
    assert MODE_HEADER not in got.upstream.headers
    assert got.upstream.headers["x-sm-user-id"] == "ann"  # routing still happened


# -- x-memory-mode ---------------------------------------------------------------------------

@pytest.mark.parametrize(("mode", "recalls", "stores"), [
    (None, True, True), ("on", True, True), ("read", True, False), ("write", False, True),
    ("off", False, False), ("Read", True, False),
], ids=["absent", "on", "read", "write", "off", "capitalised"])
async def test_the_memory_mode_decides_whether_a_request_recalls_and_whether_it_is_stored(
    start: Start, mode: str | None, recalls: bool, stores: bool
) -> None:
    proxy = await start()
    await proxy.tell("ann", ZORBLAX)
    text = f"{LOCKER} {ASK}"

    got = await proxy.ask("chat", "ann", [text], headers={MODE_HEADER: mode} if mode else {})

    assert got.status == 200
    assert got.upstream is not None
    assert MODE_HEADER not in got.upstream.headers
    if recalls:
        assert ZORBLAX in (got.block or "")
        assert got.memories >= 1
    else:
        assert got.upstream.body == got.sent
        assert MEMORIES_HEADER not in got.headers
    await proxy.tell("ann", MARKER)
    stored = {m["text"] for m in await proxy.kept("ann")}
    assert (text in stored) == stores


@pytest.mark.parametrize("api", list(PATHS))
async def test_an_unknown_memory_mode_gets_400_in_the_clients_dialect(
    start: Start, api: str
) -> None:
    proxy = await start()
    got = await proxy.ask(api, "ann", [ASK], headers={MODE_HEADER: "sometimes"})

    assert got.status == 400
    assert got.upstream is None
    error = json.loads(got.body)
    if api == "messages":
        assert error["type"] == "error"
        assert error["error"]["type"] == "invalid_request_error"
        message = error["error"]["message"]
    else:
        assert error["error"]["type"] == "invalid_request_error"
        assert error["error"]["code"] == "invalid_memory_mode"
        message = error["error"]["message"]
    assert MODE_HEADER in message and "sometimes" in message


# -- unrecognised clients --------------------------------------------------------------------

PATTERNS = {"header_patterns": [
    {"header": "user-agent", "pattern": "^known-tool/", "user_id": "known-tool"}]}
STRANGER = {"User-Agent": "mystery-client/1.0"}
KNOWN = {"User-Agent": "known-tool/2.0"}


async def test_an_unrecognised_client_gets_no_memory_by_default(start: Start) -> None:
    proxy = await start(mappings=PATTERNS)
    told = await proxy.ask("chat", None, [ZORBLAX], headers=STRANGER)
    asked = await proxy.ask("chat", None, [ASK], headers=STRANGER)
    for got in (told, asked):
        assert got.status == 200
        assert got.upstream is not None and got.upstream.body == got.sent
        assert MEMORIES_HEADER not in got.headers

    # A recognised client of the same memproxy does get memory; its write comes after the
    # stranger's, so the stranger's would have been stored by now.
    await proxy.tell(None, ZORBLAX, headers=KNOWN, kept_as="known-tool")
    known = await proxy.ask("chat", None, [ASK], headers=KNOWN)
    assert ZORBLAX in (known.block or "")
    assert await proxy.kept("default") == []


async def test_an_unrecognised_client_gets_memory_with_for_unidentified(start: Start) -> None:
    proxy = await start(mappings=PATTERNS, for_unidentified=True)
    await proxy.tell(None, ZORBLAX, headers=STRANGER, kept_as="default")
    asked = await proxy.ask("chat", None, [ASK], headers=STRANGER)
    assert ZORBLAX in (asked.block or "")
    assert asked.memories >= 1


# -- never worse than no memory --------------------------------------------------------------

BUDGET_MS = 100


async def sleep_long(*args: Any, **kwargs: Any) -> Any:
    """A store call that takes far longer than any recall budget."""
    await asyncio.sleep(10)
    raise AssertionError("the store call was not given up")


@pytest.mark.parametrize("request_of", ["a new conversation", "a later request"])
async def test_a_recall_slower_than_its_budget_is_skipped_and_the_request_goes_on_unchanged(
    start: Start, monkeypatch: pytest.MonkeyPatch, request_of: str
) -> None:
    proxy = await start(recall={"timeout_ms": BUDGET_MS})
    await proxy.tell("ann", ZORBLAX)  # so that a recall in time would have found a block
    if request_of == "a new conversation":
        body = odd_json(ASK)
        monkeypatch.setattr(proxy.stage.store, "recall", sleep_long)
    else:
        opened = await proxy.ask("chat", "ann", [ASK])
        assert ZORBLAX in (opened.block or "")
        await proxy.tell("ann", MARKER)  # the writer has stored the conversation's block
        body = json.dumps(conversation("chat", [ASK, proxy.upstream.reply, "Why?"])).encode()
        monkeypatch.setattr(proxy.stage.store, "pinned", sleep_long)

    started = time.perf_counter()
    got = await proxy.send("POST", CHAT, body, user="ann")
    elapsed = time.perf_counter() - started

    assert got.status == 200
    assert got.upstream is not None and got.upstream.body == got.sent
    assert MEMORIES_HEADER not in got.headers
    assert elapsed < BUDGET_MS / 1000 + 0.4
    assert await proxy.metric("memproxy_memory_skipped_total", reason="recall_timeout") == 1


async def test_another_writer_holding_the_memory_file_never_holds_up_a_request(
    start: Start, memory_file: Path
) -> None:
    proxy = await start(recall={"timeout_ms": BUDGET_MS})
    await proxy.tell("ann", ZORBLAX)
    reply = proxy.upstream.reply
    with write_locked(memory_file):  # as another worker process would, in a long write
        for turns in ([ASK], [ASK, reply, "Why?"], [ZORBLAX], [ZORBLAX, reply, ASK]):
            started = time.perf_counter()
            got = await proxy.ask("chat", "ann", turns)
            assert got.status == 200
            assert time.perf_counter() - started < BUDGET_MS / 1000 + 0.4


async def test_a_conversation_keeps_its_block_while_another_writer_holds_the_memory_file(
    start: Start, memory_file: Path
) -> None:
    proxy = await start(recall={"timeout_ms": BUDGET_MS})
    await proxy.tell("ann", ZORBLAX)
    reply = proxy.upstream.reply
    turns = [ASK]
    with write_locked(memory_file):
        first = await proxy.ask("chat", "ann", turns)
        turns = [*turns, reply, "Why does she?"]
        during = await proxy.ask("chat", "ann", turns)
        await asyncio.sleep(2 * BUDGET_MS / 1000)
    await proxy.tell("ann", MARKER)  # the writer has caught up with whatever was waiting
    after = await proxy.ask("chat", "ann", [*turns, reply, "Thanks."])

    blocks = [got.block for got in (first, during, after)]
    assert blocks[0] == blocks[1] == blocks[2], blocks


_TRACEBACK = re.compile(r"Traceback \(most recent call last\)|File \"[^\"]*\", line \d+")


async def write_damaged_database(path: Path) -> None:
    """A real memory file whose header is intact and whose pages are garbage."""
    store = SqliteMemoryStore(path)
    await store.add([NewMemory("ann", f"c{i}", "user", f"{ZORBLAX} ({i})", time.time(),
                               "explicit_header", "test", "gpt-fake") for i in range(50)])
    await store.close()
    data = path.read_bytes()
    path.write_bytes(data[:100] + random.Random(7).randbytes(max(len(data), 8192) - 100))


@pytest.mark.parametrize("damage", ["garbage", "damaged pages"])
async def test_a_corrupt_memory_file_leaves_requests_unchanged_and_health_says_why(
    start: Start, memory_file: Path, memory_log: TextIO, capfd: pytest.CaptureFixture[str],
    damage: str
) -> None:
    if damage == "garbage":
        memory_file.write_bytes(random.Random(3).randbytes(64 * 1024))
    else:
        await write_damaged_database(memory_file)

    proxy = await start()  # starts at all
    async with proxy.client.get("/health") as response:
        at_start = (await response.json())["memory"]
    answers = [
        await proxy.send("POST", CHAT, odd_json(ASK), user="ann"),
        await proxy.ask("messages", "ann", [ZORBLAX], stream=True),
        await proxy.ask("responses", "ann", [ZORBLAX, proxy.upstream.reply, ASK]),
    ]
    await proxy.stage.flush()
    async with proxy.client.get("/health") as response:
        health_status, health = response.status, await response.json()
    async with proxy.client.get("/memory-routing/memory/ann") as response:
        admin_answer = await response.read()

    for got in answers:
        assert got.status == 200, got.body
        assert got.upstream is not None and got.upstream.body == got.sent
        assert MEMORIES_HEADER not in got.headers
    assert at_start["status"] == "degraded"
    assert "memory file" in at_start["detail"]
    # Memory failing fails no request, so memproxy itself stays healthy.
    assert health_status == 200 and health["status"] == "ok"
    assert health["memory"]["status"] == "degraded"
    assert isinstance(health["memory"]["detail"], str) and health["memory"]["detail"].strip()
    log = read_log(memory_log)
    assert {"memory_unavailable", "memory_failed"} <= {line["event"] for line in log}
    out, err = capfd.readouterr()
    everything = [*(got.body.decode(errors="replace") for got in answers), json.dumps(health),
                  admin_answer.decode(errors="replace"), *map(json.dumps, log), out, err]
    assert not [text for text in everything if _TRACEBACK.search(text)]


async def test_the_admin_api_on_a_corrupt_memory_file_answers_a_json_error_saying_why(
    start: Start, memory_file: Path
) -> None:
    memory_file.write_bytes(random.Random(3).randbytes(64 * 1024))
    proxy = await start()

    async with proxy.client.get("/memory-routing/memory/ann") as response:
        assert response.content_type == "application/json", await response.text()
        error = (await response.json())["error"]
    assert error["message"] and error["code"]


async def test_a_full_write_queue_never_holds_up_requests_and_drops_are_counted_and_logged(
    start: Start, memory_log: TextIO, monkeypatch: pytest.MonkeyPatch
) -> None:
    proxy = await start(queue=1)
    release = asyncio.Event()
    store_add = proxy.stage.store.add

    async def blocked_add(memories: Sequence[NewMemory]) -> int:
        await release.wait()
        return await store_add(memories)

    monkeypatch.setattr(proxy.stage.store, "add", blocked_add)
    facts = [f"My favourite number is {1000 + i}." for i in range(5)]
    try:
        for fact in facts:
            started = time.perf_counter()
            got = await proxy.ask("chat", "ann", [fact])
            assert got.status == 200
            assert time.perf_counter() - started < 1.0
        # The first exchange is with the blocked store, the second waits in the queue of
        # one, the other three are dropped: two memories each (the message and the answer).
        assert await proxy.metric("memproxy_memory_writes_total", outcome="queued") == 4
        assert await proxy.metric("memproxy_memory_writes_total", outcome="dropped") == 6
        # Logged when dropping starts; the next drops go into the next line, a few seconds
        # later, so a long outage does not write a line per request.
        dropped = [line for line in read_log(memory_log)
                   if line["event"] == "memory_write_dropped"]
        assert [(line["memories"], line["dropped_total"]) for line in dropped] == [(2, 2)]
        assert "memproxy.memory.queue" in dropped[0]["reason"]
    finally:
        release.set()
    kept = await proxy.wait_until_kept("ann", *facts[:2])
    assert not {m["text"] for m in kept} & set(facts[2:])


# -- isolation -------------------------------------------------------------------------------

async def test_fifty_users_at_once_each_get_their_own_secret_and_nobody_elses(
    start: Start
) -> None:
    proxy = await start()
    users = [f"user-{i:02d}" for i in range(50)]
    told = {user: f"Remember this: my secret code word is zq{secrets.token_hex(5)}."
            for user in users}
    gate = asyncio.Semaphore(10)

    async def converse(user: str) -> None:
        async with gate:
            first = await proxy.ask("chat", user, [told[user]])
            second = await proxy.ask("chat", user, [told[user], proxy.upstream.reply,
                                                    "Thanks, keep it safe."])
            assert first.status == second.status == 200

    order = list(users)
    random.Random(5).shuffle(order)
    await asyncio.gather(*(converse(user) for user in order))
    await asyncio.gather(*(proxy.wait_until_kept(user, told[user]) for user in users))

    async def question(user: str) -> tuple[str, Exchange]:
        async with gate:
            return user, await proxy.ask("chat", user, ["What is my secret code word?"])

    asked = dict(await asyncio.gather(*(question(user) for user in order)))
    secret_of = {user: text.rsplit(" ", 1)[1].rstrip(".") for user, text in told.items()}
    for user, got in asked.items():
        assert got.upstream is not None and got.upstream.headers["x-sm-user-id"] == user
        block = got.block or ""
        assert secret_of[user] in block
        leaked = [other for other, secret in secret_of.items()
                  if other != user and secret in got.upstream.text()]
        assert not leaked, f"{user}'s request carried the secrets of {leaked}"


WORDS = ("apple", "banjo", "cobalt", "dune", "ember", "fjord", "garnet", "harbor")
NAMES = ("ann", "ben", "cid")


@pytest.fixture
async def shared_proxy(start: Start) -> Proxy:
    return await start()


@settings(max_examples=15, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(told=st.lists(st.tuples(st.sampled_from(NAMES),
                               st.lists(st.sampled_from(WORDS), min_size=1, max_size=4)
                               .map(" ".join)), min_size=1, max_size=6),
       asked=st.lists(st.sampled_from(WORDS), min_size=1, max_size=3).map(" ".join))
async def test_a_block_holds_only_the_asking_users_own_words(
    shared_proxy: Proxy, told: list[tuple[str, str]], asked: str
) -> None:
    proxy = shared_proxy
    run = uuid.uuid4().hex[:8]  # the examples share one memproxy; each has users of its own
    for name, text in told:
        await proxy.tell(f"{run}-{name}", text)

    for name in NAMES:
        got = await proxy.ask("chat", f"{run}-{name}", [asked], headers={MODE_HEADER: "read"})
        own = {text for who, text in told if who == name}
        shown = snippets(got.block)
        assert {text for _, text in shown} <= own | {proxy.upstream.reply}, (name, told)
        if any(set(text.split()) & set(asked.split()) for text in own if text != asked):
            assert shown  # and a word the user did say brings it back


# -- when a write becomes visible ------------------------------------------------------------

@pytest.mark.parametrize("stream", [False, True], ids=["json", "streamed"])
@pytest.mark.parametrize("api", list(PATHS))
async def test_an_exchange_is_recallable_within_a_second_of_the_answer_ending(
    start: Start, api: str, stream: bool
) -> None:
    proxy = await start()
    got = await proxy.ask(api, "ann", [LOCKER], stream=stream)
    ended = time.monotonic()
    assert got.status == 200
    assert got.headers["Content-Type"].startswith(
        "text/event-stream" if stream else "application/json")

    kept = await proxy.wait_until_kept("ann", LOCKER, proxy.upstream.reply, timeout=1.0)

    assert time.monotonic() - ended < 1.0
    assert {m["text"]: m["role"] for m in kept} == {LOCKER: "user",
                                                   proxy.upstream.reply: "assistant"}
    recalled = await proxy.ask(api, "ann", [ASK_LOCKER])
    assert LOCKER in (recalled.block or "")


# -- the block across a conversation ---------------------------------------------------------

@pytest.mark.parametrize("api", list(PATHS))
async def test_every_later_request_of_a_conversation_carries_its_first_block_byte_for_byte(
    start: Start, api: str
) -> None:
    proxy = await start()
    reply = proxy.upstream.reply
    await proxy.tell("ann", ZORBLAX)
    turns = [ASK]
    first = await proxy.ask(api, "ann", turns)
    assert first.block is not None and ZORBLAX in first.block
    # A new memory that a fresh recall for the later questions would bring in.
    tuna = "My cat Zorblax adores tuna."
    await proxy.tell("ann", tuna)

    later = []
    for question in ("Does my cat Zorblax like tuna?", "What else does Zorblax adore?"):
        turns = [*turns, reply, question]
        later.append(await proxy.ask(api, "ann", turns))

    serialised = json.dumps(first.block, ensure_ascii=False).encode()
    for got in [first, *later]:
        assert got.upstream is not None and serialised in got.upstream.body
        assert got.block == first.block
        assert got.memories == first.memories
    fresh = await proxy.ask(api, "ann", ["What else does Zorblax adore?"])
    assert tuna in (fresh.block or "")  # a new conversation does recall afresh
    assert tuna not in first.block
    assert await proxy.metric("memproxy_memory_skipped_total", reason="no_pin") == 0


async def test_a_conversation_quiet_for_the_pin_lifetime_loses_its_pin_and_goes_on_without_a_block(
    start: Start, memory_log: TextIO, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The lifetime (30 days) and the hourly sweep, shortened to fractions of a second.
    monkeypatch.setattr(stage_module, "PIN_LIFETIME", 0.5)
    monkeypatch.setattr(stage_module, "PIN_SWEEP_DELAY", 0.0)
    monkeypatch.setattr(stage_module, "PIN_SWEEP_INTERVAL", 0.1)
    proxy = await start()
    await proxy.tell("ann", ZORBLAX)
    first = await proxy.ask("chat", "ann", [ASK])
    assert first.block is not None and ZORBLAX in first.block
    parsed = read_request(api_format("POST", PATHS["chat"]), first.sent)
    assert parsed is not None
    conversation = stage_module.conversation_id("ann", None, parsed)
    assert conversation is not None

    deadline = time.monotonic() + 10
    while await proxy.stage.store.pinned("ann", conversation) is not None:
        assert time.monotonic() < deadline, "the quiet conversation's pin was never dropped"
        await asyncio.sleep(0.05)
    dropped = [line for line in read_log(memory_log) if line["event"] == "memory_pins_dropped"]
    assert dropped and dropped[0]["pins"] >= 1

    assert await proxy.metric("memproxy_memory_skipped_total", reason="no_pin") == 0
    later = await proxy.ask("chat", "ann", [ASK, proxy.upstream.reply, "And what else?"])
    assert later.status == 200 and later.block is None
    assert await proxy.metric("memproxy_memory_skipped_total", reason="no_pin") == 1
    fresh = await proxy.ask("chat", "ann", ["Tell me about my cat Zorblax again"])
    assert ZORBLAX in (fresh.block or "")  # memory itself goes on: new conversations recall


@pytest.mark.parametrize("api", list(PATHS))
async def test_with_every_turn_each_user_message_gets_a_fresh_recall(
    start: Start, api: str
) -> None:
    proxy = await start(recall={"when": "every_turn"})
    await proxy.tell("ann", ZORBLAX)
    await proxy.tell("ann", LOCKER)

    first = await proxy.ask(api, "ann", [ASK])
    second = await proxy.ask(api, "ann", [ASK, proxy.upstream.reply, ASK_LOCKER])

    assert ZORBLAX in (first.block or "") and LOCKER not in (first.block or "")
    assert LOCKER in (second.block or "")
    assert second.memories >= 1


# -- erasure ---------------------------------------------------------------------------------

async def test_an_erased_memory_is_gone_from_the_next_conversations_block(start: Start) -> None:
    proxy = await start()
    await proxy.tell("ann", ZORBLAX)
    await proxy.tell("ann", LOCKER)
    before = await proxy.ask("chat", "ann", [ASK_LOCKER])
    assert LOCKER in (before.block or "")
    (memory,) = [m for m in await proxy.kept("ann") if m["text"] == LOCKER]

    async with proxy.client.delete(f"/memory-routing/memory/ann/{memory['id']}") as response:
        assert response.status == 200
        assert await response.json() == {"deleted": 1}

    after = await proxy.ask("chat", "ann", ["Remind me of my locker code, please?"])
    running = await proxy.ask("chat", "ann", [ASK_LOCKER, proxy.upstream.reply, "Thanks!"])
    for got in (after, running):
        assert got.upstream is not None and "4711" not in got.upstream.text()
    kept_cat = await proxy.ask("chat", "ann", [ASK])
    assert ZORBLAX in (kept_cat.block or "")  # the other memory is still recalled


async def test_an_erased_user_starts_the_next_conversation_without_a_block(
    start: Start
) -> None:
    proxy = await start()
    await proxy.tell("ann", ZORBLAX)
    async with proxy.client.delete("/memory-routing/memory/ann") as response:
        assert response.status == 200
        assert (await response.json())["deleted"] >= 1

    got = await proxy.ask("chat", "ann", [ASK])

    assert got.upstream is not None and got.upstream.body == got.sent
    assert MEMORIES_HEADER not in got.headers
