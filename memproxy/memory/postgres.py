"""The team memory backend: PostgreSQL, through psycopg 3 and its connection pool.

Why it is built this way:

- **One table of memories, every statement keyed by the user id.** Each query names the
  user id in its WHERE clause and every index leads with it, so a query reads that user's
  rows only and costs the same in a table of a million memories as with the user alone.
  Row-level separation is what a shared server needs: thousands of users, one schema.
- **Ranking with PostgreSQL's own full-text search.** Each memory has a ``tsvector`` of
  three weighted parts, as the local backend's index has three columns: its text (A),
  the text of its neighbours in the conversation (B), and its date in words (C, in the
  ``simple`` configuration, so that "may" the month is not dropped as an English
  stopword). Recall ranks with ``ts_rank`` over an OR of the query's words; the choice
  of words, the packing and the block are :mod:`memproxy.memory.recall`'s, shared with
  the local backend. ``ts_rank`` has no inverse document frequency, so its order differs
  from BM25's; ``python -m bench.locomo --backend postgres`` measures what that costs.
  ``ts_rank`` reads every memory it scores, so for a user with many memories only those
  that match the query's rarer words are scored (:func:`_rarest`); how common a word is
  comes from a second vector of each memory's own text, counted from its index alone.
  The search index is a GIN index over ``(user_id, search)`` when the ``btree_gin``
  extension can be created (it ships with PostgreSQL and is trusted), else over
  ``search`` alone; start-up logs which.
- **Writes of one user are serialised across replicas** with a transaction-scoped
  advisory lock on the user id: the duplicate check (clients resend their history, to
  any replica) and the neighbour update of a conversation see every earlier write.
- **Erasure** deletes the rows and rewrites the neighbours whose context held the text, in
  one transaction: the moment it commits, no query, index scan or recall can return the
  text. PostgreSQL keeps deleted rows' bytes in the table's pages as dead tuples until
  ``VACUUM`` prunes them; the store runs ``VACUUM`` on its tables after each erasure, in
  the background (see docs/memory.md for what stays in WAL and backups).
- **The schema is versioned** (table ``memproxy_schema``) and created or upgraded at
  start-up under an advisory lock, so replicas starting at once upgrade it once; with
  ``memory.migrate: false`` operators run ``python -m memproxy memory migrate-db``.
- **The connection string is a secret.** It never appears in logs, errors or endpoints;
  :meth:`PostgresMemoryStore.describe` names the server without the password, and every
  error text passes :meth:`PostgresMemoryStore.redact`.
- **The pool opens without waiting.** A replica started while the server is down serves
  requests without memory; the pool keeps connecting in the background, and the schema
  is checked on the first connection that works.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from typing import Any

import psycopg
import structlog
from psycopg import AsyncConnection
from psycopg.conninfo import conninfo_to_dict
from psycopg.rows import TupleRow
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from memproxy.memory import recall as ranking
from memproxy.memory.sqlite import ACTIVITY_KEPT_MINUTES, fingerprint
from memproxy.memory.store import (
    ROLES,
    Memory,
    NewMemory,
    Recalled,
    SchemaError,
    SeenClient,
    StoreUnavailable,
    UserSummary,
    message_digest,
    split_text,
)

log = structlog.get_logger("memproxy.memory")
# The pool logs every failed connection attempt; memproxy says once that memory is down
# (memory_failed) and once that it is back (memory_back).
logging.getLogger("psycopg.pool").setLevel(logging.ERROR)

#: The layout this code writes; kept in ``memproxy_schema``.
SCHEMA_VERSION = 2
#: The advisory lock that serialises schema changes ("memproxy" in ASCII, as a number).
SCHEMA_LOCK = 0x6D656D70726F7879
#: Connections per process at most.
POOL_SIZE = 8
#: How long a write waits for a connection before it counts as failed, in seconds.
WRITE_CONNECT_TIMEOUT = 5.0
#: How long a read (the admin API, the status page) waits for one. Recall has its own,
#: shorter budget (``memory.recall.timeout_ms``).
READ_CONNECT_TIMEOUT = 2.0
#: Memories a recall scores at most, as far as the query's rarest word allows (:func:`_rarest`).
MAX_SCORED = 1000
#: After a failed connection attempt, calls fail at once for this many seconds.
FAIL_FAST = 1.0
#: ``ts_rank``'s weights for the parts D, C, B, A: unused, date, neighbours, own text.
#: The same proportions as the local backend's BM25 weights (text 1, context 0.5, date 0.5).
RANK_WEIGHTS = "{0, 0.5, 0.5, 1}"
#: ``ts_rank`` normalisation: divide by 1 + the logarithm of the memory's length, as
#: BM25 prefers the shorter of two memories that match as well.
RANK_NORMALISATION = 1

_MEMORY_COLUMNS = "id, conversation_id, role, text, created_at, client, user_agent, model"

# The search vector of a memory from its text, its neighbours' text and its date in words.
_SEARCH = ("setweight(to_tsvector('english', %(text)s), 'A') || "
           "setweight(to_tsvector('english', %(context)s), 'B') || "
           "setweight(to_tsvector('simple', %(date)s), 'C')")
# The query: any of the words, in the English configuration (stemmed, as the local
# backend's porter tokenizer stems) or, for the date part, as written.
_QUERY = "(to_tsquery('english', %(english)s) || to_tsquery('simple', %(simple)s))"
# The memories scored: those that match the query's rarer words (see _rarest).
_POOL = "(to_tsquery('english', %(pool_english)s) || to_tsquery('simple', %(pool_simple)s))"


def _create_v1(search_indexes: Sequence[str]) -> tuple[str, ...]:
    return (
        "CREATE SEQUENCE memproxy_memory_id",
        """CREATE TABLE memproxy_memories(
            id              bigint PRIMARY KEY DEFAULT nextval('memproxy_memory_id'),
            user_id         text NOT NULL,
            conversation_id text NOT NULL,
            role            text NOT NULL,
            text            text NOT NULL,
            created_at      double precision NOT NULL,
            client          text NOT NULL,
            user_agent      text NOT NULL,
            model           text NOT NULL,
            message         bytea NOT NULL,    -- digest of conversation, role and message text
            context         text NOT NULL,     -- the neighbours' text, for the search vector
            search          tsvector NOT NULL, -- text (A), neighbours (B), date (C): ranking
            words           tsvector NOT NULL  -- the text alone: how common a word is
        )""",
        "ALTER SEQUENCE memproxy_memory_id OWNED BY memproxy_memories.id",
        "CREATE INDEX memproxy_memories_conversation "
        "ON memproxy_memories(user_id, conversation_id, id)",
        "CREATE INDEX memproxy_memories_time ON memproxy_memories(user_id, created_at, id)",
        "CREATE INDEX memproxy_memories_message ON memproxy_memories(user_id, message)",
        *search_indexes,
        """CREATE TABLE memproxy_users(
            user_id    text PRIMARY KEY,
            memories   bigint NOT NULL DEFAULT 0,
            last_write double precision NOT NULL DEFAULT 0
        )""",
        """CREATE TABLE memproxy_pins(
            user_id         text NOT NULL,
            conversation_id text NOT NULL,
            block           text NOT NULL,
            PRIMARY KEY (user_id, conversation_id)
        )""",
        """CREATE TABLE memproxy_clients(
            fingerprint text PRIMARY KEY,       -- the identifying headers, as JSON
            count       bigint NOT NULL,
            first_seen  double precision NOT NULL,
            last_seen   double precision NOT NULL
        )""",
        """CREATE TABLE memproxy_activity(
            minute    bigint NOT NULL,          -- unix time // 60
            label     text NOT NULL,
            succeeded boolean NOT NULL,
            count     bigint NOT NULL,
            PRIMARY KEY (minute, label, succeeded)
        )""",
    )


_PER_USER_INDEXES = (
    "CREATE INDEX memproxy_memories_search ON memproxy_memories USING gin(user_id, search)",
    "CREATE INDEX memproxy_memories_words ON memproxy_memories USING gin(user_id, words)",
)
_PLAIN_INDEXES = (
    "CREATE INDEX memproxy_memories_search ON memproxy_memories USING gin(search)",
    "CREATE INDEX memproxy_memories_words ON memproxy_memories USING gin(words)",
)


def describe_dsn(dsn: str) -> str:
    """The server a connection string names, without its password: ``user@host:port/db``."""
    try:
        parts = conninfo_to_dict(dsn)
    except Exception:
        return "(a connection string memproxy cannot read)"
    host = str(parts.get("host") or "localhost")
    port = str(parts.get("port") or "5432")
    user = str(parts.get("user") or "")
    dbname = str(parts.get("dbname") or user or "")
    return f"{user + '@' if user else ''}{host}:{port}/{dbname}"


class PostgresMemoryStore:
    """:class:`memproxy.memory.store.MemoryStore` in a PostgreSQL database."""

    def __init__(self, dsn: str, *, pool_size: int = POOL_SIZE, migrate: bool = True,
                 connect_timeout: float = 5.0) -> None:
        self._dsn = dsn
        self._secrets = [value for value in _secrets_of(dsn) if value]
        self._migrate = migrate
        self._pool: AsyncConnectionPool[AsyncConnection[TupleRow]] = AsyncConnectionPool(
            dsn, min_size=1, max_size=pool_size, open=False, name="memproxy-memory",
            kwargs={"autocommit": True, "connect_timeout": max(1, round(connect_timeout))},
            timeout=READ_CONNECT_TIMEOUT,
            check=AsyncConnectionPool.check_connection, reconnect_timeout=0,
            connection_class=_recording_connection(self),
            reconnect_failed=self._reconnect_failed)
        self._down = False  # no connection could be made, the last time one was tried
        self._failed_at = 0.0  # when that was (monotonic)
        self._last_error: str | None = None  # why, as libpq said it
        self._schema_ready = False
        self._schema_lock = asyncio.Lock()
        self._vacuum: asyncio.Task[None] | None = None
        self._vacuum_again = False
        self._opened = False

    def describe(self) -> str:
        """The database, for logs and the status page: no password."""
        return describe_dsn(self._dsn)

    def redact(self, text: str) -> str:
        """``text`` with the connection string's password (and the string itself) blanked."""
        for secret in self._secrets:
            text = text.replace(secret, "***")
        return text

    def _reconnect_failed(self, pool: AsyncConnectionPool[Any]) -> None:
        """The pool gave up connecting: the server is down until a connection works again.

        While it is down, calls fail at once (:meth:`_run`) instead of each waiting for a
        connection until its timeout; one call per :data:`FAIL_FAST` seconds tries again.
        """
        self._down = True
        self._failed_at = time.monotonic()

    def _unavailable(self, exc: BaseException | None = None) -> StoreUnavailable:
        why = self._last_error or "no connection could be made"
        if exc is not None and not isinstance(exc, PoolTimeout):
            why = f"{type(exc).__name__}: {exc}".strip()
        return StoreUnavailable(self.redact(f"cannot reach {self.describe()}: {why}"))

    async def open(self) -> None:
        """Start the pool, then check or create the schema.

        A server that is down fails this call (after :data:`WRITE_CONNECT_TIMEOUT` at
        most), not the store: the pool keeps connecting in the background, and every
        later call checks the schema until one connection works.
        """
        if not self._opened:
            self._opened = True
            await self._pool.open(wait=False)
        async with self._reaching():
            await self._ensure_schema()

    @contextlib.asynccontextmanager
    async def _reaching(self) -> AsyncIterator[None]:
        """Turn "cannot reach the server" errors into :class:`StoreUnavailable`, with libpq's
        reason and without the password."""
        try:
            yield
        except PoolTimeout:
            # Every connection busy (the server is fine), or none can be made (it is not).
            raise self._unavailable() from None
        except (psycopg.OperationalError, OSError) as exc:
            self._down = True
            self._failed_at = time.monotonic()
            raise self._unavailable(exc) from None

    async def migrate(self) -> tuple[int, int]:
        """Create or upgrade the schema now; returns the layout before and after."""
        if not self._opened:
            self._opened = True
            await self._pool.open(wait=False)
        async with self._reaching(), \
                self._pool.connection(timeout=WRITE_CONNECT_TIMEOUT) as connection:
            return await _migrate(connection)

    async def _ensure_schema(self) -> None:
        if self._schema_ready:
            return
        async with self._schema_lock:
            await self._check_schema()

    async def _check_schema(self) -> None:
        if self._schema_ready:  # another task checked it while this one waited for the lock
            return
        async with self._pool.connection(timeout=WRITE_CONNECT_TIMEOUT) as connection:
            if self._migrate:
                before, after = await _migrate(connection)
                if before != after:
                    log.info("memory_schema_upgraded", database=self.describe(),
                             layout_before=before, layout=after)
            else:
                version = await _version(connection)
                if version != SCHEMA_VERSION:
                    raise SchemaError(
                        f"the memory database has layout {version}, this memproxy needs "
                        f"{SCHEMA_VERSION}; run: python -m memproxy memory migrate-db "
                        "(memproxy.memory.migrate is false)")
            per_user = await _has_per_user_index(connection)
        log.info("memory_database", database=self.describe(), layout=SCHEMA_VERSION,
                 search_index="gin(user_id, search) with btree_gin" if per_user else
                 "gin(search): btree_gin could not be created, so a recall reads "
                 "every user's matches of its words before it keeps the user's own")
        self._schema_ready = True

    async def _run(self, work: Callable[[AsyncConnection[TupleRow]], Awaitable[Any]],
                   *, timeout: float | None = None) -> Any:
        """``work`` on a pooled connection; a server that cannot be reached raises
        :class:`StoreUnavailable`, with the password blanked from its message."""
        if self._down:
            now = time.monotonic()
            if now - self._failed_at < FAIL_FAST:
                raise self._unavailable()
            self._failed_at = now  # this call tries; the others keep failing fast meanwhile
        await self.open()
        async with self._reaching(), self._pool.connection(timeout=timeout) as connection:
            self._down = False
            self._last_error = None
            return await work(connection)

    # -- writing -------------------------------------------------------------------------

    async def add(self, memories: Sequence[NewMemory]) -> int:
        by_user: dict[str, list[tuple[NewMemory, list[str]]]] = {}
        for memory in memories:
            if memory.role not in ROLES:
                raise ValueError(f"a memory's role is one of {ROLES}, not {memory.role!r}")
            memory = _storable(memory)
            parts = split_text(memory.text)
            if parts:
                by_user.setdefault(memory.user_id, []).append((memory, parts))

        async def work(connection: AsyncConnection[TupleRow]) -> int:
            written = 0
            for user_id, mine in by_user.items():
                async with connection.transaction():
                    await _lock_user(connection, user_id)
                    written += await _add_for_user(connection, user_id, mine)
            return written

        result: int = await self._run(work, timeout=WRITE_CONNECT_TIMEOUT)
        return result

    async def pin(self, user_id: str, conversation_id: str, block: str) -> None:
        async def work(connection: AsyncConnection[TupleRow]) -> None:
            async with connection.transaction():
                await connection.execute(
                    "INSERT INTO memproxy_users(user_id) VALUES (%s) ON CONFLICT DO NOTHING",
                    (user_id,))
                await connection.execute(
                    "INSERT INTO memproxy_pins(user_id, conversation_id, block, pinned_at) "
                    "VALUES (%s, %s, %s, %s) ON CONFLICT (user_id, conversation_id) "
                    "DO UPDATE SET block = excluded.block, pinned_at = excluded.pinned_at",
                    (user_id, _text(conversation_id), _text(block), time.time()))

        await self._run(work, timeout=WRITE_CONNECT_TIMEOUT)

    async def forget_quiet_pins(self, before: float) -> int:
        async def work(connection: AsyncConnection[TupleRow]) -> int:
            cursor = await connection.execute(
                "DELETE FROM memproxy_pins p WHERE p.pinned_at < %(before)s AND NOT EXISTS ("
                "SELECT 1 FROM memproxy_memories m WHERE m.user_id = p.user_id "
                "AND m.conversation_id = p.conversation_id AND m.created_at >= %(before)s)",
                {"before": before})
            return cursor.rowcount

        result: int = await self._run(work, timeout=WRITE_CONNECT_TIMEOUT)
        return result

    # -- erasing -------------------------------------------------------------------------

    async def delete(self, user_id: str, memory_id: int) -> int:
        async def work(connection: AsyncConnection[TupleRow]) -> int:
            async with connection.transaction():
                await _lock_user(connection, user_id)
                cursor = await connection.execute(
                    "DELETE FROM memproxy_memories WHERE user_id = %s AND id = %s "
                    "RETURNING conversation_id", (user_id, memory_id))
                row = await cursor.fetchone()
                if row is None:
                    return 0
                await _reindex_around(connection, user_id, row[0], memory_id)
                await connection.execute("DELETE FROM memproxy_pins WHERE user_id = %s",
                                         (user_id,))
                await connection.execute(
                    "UPDATE memproxy_users SET memories = memories - 1 WHERE user_id = %s",
                    (user_id,))
            return 1

        erased: int = await self._run(work, timeout=WRITE_CONNECT_TIMEOUT)
        if erased:
            self._vacuum_soon()
        return erased

    async def delete_user(self, user_id: str) -> int:
        async def work(connection: AsyncConnection[TupleRow]) -> int:
            async with connection.transaction():
                await _lock_user(connection, user_id)
                cursor = await connection.execute(
                    "DELETE FROM memproxy_users WHERE user_id = %s RETURNING memories",
                    (user_id,))
                row = await cursor.fetchone()
                await connection.execute("DELETE FROM memproxy_memories WHERE user_id = %s",
                                         (user_id,))
                await connection.execute("DELETE FROM memproxy_pins WHERE user_id = %s",
                                         (user_id,))
            return 0 if row is None else int(row[0])

        erased: int = await self._run(work, timeout=WRITE_CONNECT_TIMEOUT)
        if erased:
            self._vacuum_soon()
        return erased

    def _vacuum_soon(self) -> None:
        """Prune the erased rows' dead tuples and index entries, once at a time, off the path."""
        if self._vacuum is not None and not self._vacuum.done():
            self._vacuum_again = True
            return
        self._vacuum = asyncio.create_task(self._vacuum_tables())

    async def _vacuum_tables(self) -> None:
        while True:
            self._vacuum_again = False
            try:
                await self.vacuum()
            except Exception as exc:
                log.warning("memory_vacuum_failed", error=self.redact(f"{exc}"),
                            reason="erased rows stay as dead tuples until autovacuum runs")
            if not self._vacuum_again:
                return

    async def vacuum(self) -> None:
        """``VACUUM`` the memory tables now, index entries included."""
        async def work(connection: AsyncConnection[TupleRow]) -> None:
            await connection.execute(
                "VACUUM (INDEX_CLEANUP ON) memproxy_memories, memproxy_pins")

        await self._run(work, timeout=WRITE_CONNECT_TIMEOUT)

    async def compact(self) -> None:
        """``VACUUM FULL``: the memory tables rewritten into new files, the old ones deleted.

        Plain ``VACUUM`` (run after each erasure) frees a deleted row's space for reuse
        but leaves its bytes in the page until a new row overwrites them; ``VACUUM FULL``
        writes only the live rows. It locks the tables while it runs: recall is skipped
        (within its budget) and writes wait, so it is an operator's task.
        """
        async def work(connection: AsyncConnection[TupleRow]) -> None:
            await connection.execute(
                "VACUUM FULL memproxy_memories, memproxy_pins, memproxy_users")

        await self._run(work)

    # -- reading -------------------------------------------------------------------------

    async def recall(self, user_id: str, query: str, *, max_tokens: int,
                     exclude_conversation: str | None, now: float | None = None) -> Recalled:
        async def work(connection: AsyncConnection[TupleRow]) -> Recalled:
            hits = await _match(connection, user_id, _text(query), ranking.CANDIDATES,
                                exclude=exclude_conversation, now=now)
            chosen = ranking.pack(hits, max_tokens)
            return Recalled(ranking.render(chosen), chosen)

        result: Recalled = await self._run(work)
        return result

    async def search(self, user_id: str, query: str, *, limit: int) -> list[Memory]:
        async def work(connection: AsyncConnection[TupleRow]) -> list[Memory]:
            hits = await _match(connection, user_id, _text(query), limit)
            return [memory for memory, _ in hits]

        result: list[Memory] = await self._run(work)
        return result

    async def recent(self, user_id: str, *, limit: int) -> list[Memory]:
        return await self._listed(user_id, "DESC", limit)

    async def export(self, user_id: str) -> list[Memory]:
        return await self._listed(user_id, "ASC", None)

    async def _listed(self, user_id: str, order: str, limit: int | None) -> list[Memory]:
        async def work(connection: AsyncConnection[TupleRow]) -> list[Memory]:
            cursor = await connection.execute(
                f"SELECT {_MEMORY_COLUMNS} FROM memproxy_memories WHERE user_id = %s "
                f"ORDER BY created_at {order}, id {order} LIMIT %s", (user_id, limit))
            return [_memory(user_id, row) for row in await cursor.fetchall()]

        result: list[Memory] = await self._run(work)
        return result

    async def users(self) -> list[UserSummary]:
        async def work(connection: AsyncConnection[TupleRow]) -> list[UserSummary]:
            cursor = await connection.execute(
                "SELECT user_id, memories, last_write FROM memproxy_users ORDER BY user_id")
            return [UserSummary(u, int(m), float(w)) for u, m, w in await cursor.fetchall()]

        result: list[UserSummary] = await self._run(work)
        return result

    async def pinned(self, user_id: str, conversation_id: str) -> str | None:
        async def work(connection: AsyncConnection[TupleRow]) -> str | None:
            cursor = await connection.execute(
                "SELECT block FROM memproxy_pins WHERE user_id = %s AND conversation_id = %s",
                (user_id, _text(conversation_id)))
            row = await cursor.fetchone()
            return None if row is None else str(row[0])

        result: str | None = await self._run(work)
        return result

    async def size_bytes(self) -> int:
        async def work(connection: AsyncConnection[TupleRow]) -> int:
            cursor = await connection.execute(
                "SELECT coalesce(sum(pg_total_relation_size(c.oid)), 0) FROM pg_class c "
                "WHERE c.relkind = 'r' AND c.relname IN "
                "('memproxy_memories', 'memproxy_pins', 'memproxy_users')")
            row = await cursor.fetchone()
            return 0 if row is None else int(row[0])

        result: int = await self._run(work, timeout=WRITE_CONNECT_TIMEOUT)
        return result

    # -- the team's view: clients nobody recognised, activity per memory space ------------

    async def add_seen_clients(self, seen: Sequence[SeenClient]) -> None:
        async def work(connection: AsyncConnection[TupleRow]) -> None:
            async with connection.cursor() as cursor:
                await cursor.executemany(
                    "INSERT INTO memproxy_clients VALUES (%s, %s, %s, %s) "
                    "ON CONFLICT (fingerprint) DO UPDATE SET "
                    "count = memproxy_clients.count + excluded.count, "
                    "first_seen = least(memproxy_clients.first_seen, excluded.first_seen), "
                    "last_seen = greatest(memproxy_clients.last_seen, excluded.last_seen)",
                    [(_text(fingerprint(c.headers)), c.count, c.first_seen, c.last_seen)
                     for c in seen])

        await self._run(work, timeout=WRITE_CONNECT_TIMEOUT)

    async def seen_clients(self, limit: int) -> list[SeenClient]:
        async def work(connection: AsyncConnection[TupleRow]) -> list[SeenClient]:
            cursor = await connection.execute(
                "SELECT fingerprint, count, first_seen, last_seen FROM memproxy_clients "
                "ORDER BY count DESC, last_seen DESC LIMIT %s", (limit,))
            return [SeenClient(dict(json.loads(f)), int(n), first, last)
                    for f, n, first, last in await cursor.fetchall()]

        result: list[SeenClient] = await self._run(work)
        return result

    async def add_activity(self, counts: dict[tuple[int, str, bool], int]) -> None:
        if not counts:
            return

        async def work(connection: AsyncConnection[TupleRow]) -> None:
            async with connection.cursor() as cursor:
                await cursor.executemany(
                    "INSERT INTO memproxy_activity VALUES (%s, %s, %s, %s) "
                    "ON CONFLICT (minute, label, succeeded) DO UPDATE SET "
                    "count = memproxy_activity.count + excluded.count",
                    [(minute, _text(label), ok, n) for (minute, label, ok), n in counts.items()])
                oldest = max(minute for minute, _, _ in counts) - ACTIVITY_KEPT_MINUTES
                await cursor.execute("DELETE FROM memproxy_activity WHERE minute < %s",
                                     (oldest,))

        await self._run(work, timeout=WRITE_CONNECT_TIMEOUT)

    async def activity(self, since_minute: int) -> dict[tuple[str, bool], int]:
        async def work(connection: AsyncConnection[TupleRow]) -> dict[tuple[str, bool], int]:
            cursor = await connection.execute(
                "SELECT label, succeeded, sum(count) FROM memproxy_activity "
                "WHERE minute >= %s GROUP BY label, succeeded", (since_minute,))
            return {(label, ok): int(n) for label, ok, n in await cursor.fetchall()}

        result: dict[tuple[str, bool], int] = await self._run(work)
        return result

    async def close(self) -> None:
        if self._vacuum is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._vacuum, 5)
        await self._pool.close()


def _recording_connection(store: PostgresMemoryStore) -> type[AsyncConnection[TupleRow]]:
    """A connection class that keeps why its last connection attempt failed, for messages.

    The pool only says it timed out; libpq's reason ("password authentication failed",
    "Connection refused") is what an operator needs.
    """

    class RecordingConnection(AsyncConnection[TupleRow]):
        @classmethod
        async def connect(cls, *args: Any, **kwargs: Any) -> Any:
            try:
                return await super().connect(*args, **kwargs)
            except psycopg.OperationalError as exc:
                store._last_error = store.redact(" ".join(f"{exc}".split()))
                raise

    return RecordingConnection


# -- schema ---------------------------------------------------------------------------------

async def _version(connection: AsyncConnection[TupleRow]) -> int:
    cursor = await connection.execute("SELECT to_regclass('memproxy_schema') IS NOT NULL")
    row = await cursor.fetchone()
    if row is None or not row[0]:
        return 0
    cursor = await connection.execute("SELECT version FROM memproxy_schema")
    row = await cursor.fetchone()
    return 0 if row is None else int(row[0])


async def _migrate(connection: AsyncConnection[TupleRow]) -> tuple[int, int]:
    """Bring the schema to :data:`SCHEMA_VERSION`, one replica at a time."""
    async with connection.transaction():
        await connection.execute("SELECT pg_advisory_xact_lock(%s)", (SCHEMA_LOCK,))
        before = await _version(connection)
        if before > SCHEMA_VERSION:
            raise SchemaError(
                f"the memory database was written by a newer memproxy (layout {before}; this "
                f"one knows up to {SCHEMA_VERSION})")
        if before == 0:
            await connection.execute("CREATE TABLE memproxy_schema(version integer NOT NULL)")
            await connection.execute("INSERT INTO memproxy_schema VALUES (0)")
        for step in range(before, SCHEMA_VERSION):
            await MIGRATIONS[step](connection)
        await connection.execute("UPDATE memproxy_schema SET version = %s", (SCHEMA_VERSION,))
    return before, SCHEMA_VERSION


async def _to_v1(connection: AsyncConnection[TupleRow]) -> None:
    search_indexes = _PER_USER_INDEXES
    try:
        async with connection.transaction():  # a savepoint: a refusal leaves the rest intact
            await connection.execute("CREATE EXTENSION IF NOT EXISTS btree_gin")
    except Exception as exc:
        log.warning("memory_btree_gin_missing", error=f"{exc}".strip(),
                    fix="CREATE EXTENSION btree_gin as a superuser, then restart memproxy "
                        "after dropping index memproxy_memories_search")
        search_indexes = _PLAIN_INDEXES
    for statement in _create_v1(search_indexes):
        await connection.execute(statement)


async def _to_v2(connection: AsyncConnection[TupleRow]) -> None:
    """Layout 2: each pin says when it was written, so the pins of quiet conversations go.

    The pins already there count as written now: their conversations get the full time.
    """
    await connection.execute("ALTER TABLE memproxy_pins ADD COLUMN pinned_at double precision "
                             "NOT NULL DEFAULT extract(epoch FROM now())")
    await connection.execute("CREATE INDEX memproxy_pins_time ON memproxy_pins(pinned_at)")


#: Steps that upgrade the schema from layout ``k`` to ``k + 1``, run in order.
MIGRATIONS: dict[int, Callable[[AsyncConnection[TupleRow]], Awaitable[None]]] = {
    0: _to_v1, 1: _to_v2}


async def _has_per_user_index(connection: AsyncConnection[TupleRow]) -> bool:
    cursor = await connection.execute(
        "SELECT indexdef FROM pg_indexes WHERE indexname = 'memproxy_memories_search'")
    row = await cursor.fetchone()
    return row is not None and "user_id" in str(row[0])


# -- writing --------------------------------------------------------------------------------

async def _lock_user(connection: AsyncConnection[TupleRow], user_id: str) -> None:
    """Serialise this transaction with every other write of the user, on any replica."""
    await connection.execute("SELECT pg_advisory_xact_lock(hashtextextended(%s, 1))",
                             (user_id,))


@dataclasses.dataclass(slots=True)
class _Row:
    id: int
    conversation_id: str
    text: str
    created_at: float


async def _add_for_user(connection: AsyncConnection[TupleRow], user_id: str,
                        mine: Sequence[tuple[NewMemory, list[str]]]) -> int:
    await connection.execute(
        "INSERT INTO memproxy_users(user_id) VALUES (%s) ON CONFLICT DO NOTHING", (user_id,))
    new: list[tuple[NewMemory, bytes, list[str]]] = []
    seen: set[bytes] = set()
    for memory, parts in mine:
        digest = message_digest(memory)
        if digest in seen:
            continue
        seen.add(digest)
        new.append((memory, digest, parts))
    if new:
        cursor = await connection.execute(
            "SELECT message FROM memproxy_memories WHERE user_id = %s AND message = ANY(%s)",
            (user_id, [digest for _, digest, _ in new]))
        stored = {bytes(row[0]) for row in await cursor.fetchall()}
        new = [entry for entry in new if entry[1] not in stored]
    count = sum(len(parts) for _, _, parts in new)
    if not count:
        return 0
    cursor = await connection.execute(
        "SELECT nextval('memproxy_memory_id') FROM generate_series(1, %s)", (count,))
    ids = iter(sorted(int(row[0]) for row in await cursor.fetchall()))
    rows: list[tuple[_Row, NewMemory, bytes]] = []
    for memory, digest, parts in new:
        for part in parts:
            rows.append((_Row(next(ids), memory.conversation_id, part, memory.created_at),
                         memory, digest))
    by_conversation: dict[str, list[tuple[_Row, NewMemory, bytes]]] = {}
    for entry in rows:
        by_conversation.setdefault(entry[0].conversation_id, []).append(entry)
    window = ranking.CONTEXT_WINDOW
    inserts: list[dict[str, Any]] = []
    updates: list[dict[str, Any]] = []
    for conversation_id, group in by_conversation.items():
        cursor = await connection.execute(
            "SELECT id, conversation_id, text, created_at FROM memproxy_memories "
            "WHERE user_id = %s AND conversation_id = %s ORDER BY id DESC LIMIT %s",
            (user_id, conversation_id, 2 * window))
        earlier = [_Row(*row) for row in await cursor.fetchall()][::-1]
        context = ranking.neighbour_texts([r.text for r in earlier] + [r.text for r, _, _ in group])
        for i in range(max(0, len(earlier) - window), len(earlier)):
            updates.append(_search_values(earlier[i], context[i], user_id=user_id))
        for i, (row, memory, digest) in enumerate(group, start=len(earlier)):
            values = _search_values(row, context[i], user_id=user_id)
            values.update(role=memory.role, client=memory.client, user_agent=memory.user_agent,
                          model=memory.model, message=digest)
            inserts.append(values)
    async with connection.cursor() as cursor:
        await cursor.executemany(
            f"INSERT INTO memproxy_memories({_MEMORY_COLUMNS}, user_id, message, context, search, "
            "words) VALUES (%(id)s, %(conversation_id)s, %(role)s, %(text)s, %(created_at)s, "
            "%(client)s, %(user_agent)s, %(model)s, %(user_id)s, %(message)s, %(context)s, "
            f"{_SEARCH}, to_tsvector('english', %(text)s))", inserts)
        if updates:
            await cursor.executemany(_UPDATE_SEARCH, updates)
    await connection.execute(
        "UPDATE memproxy_users SET memories = memories + %s, last_write = %s WHERE user_id = %s",
        (len(rows), time.time(), user_id))
    return len(rows)


_UPDATE_SEARCH = ("UPDATE memproxy_memories SET context = %(context)s, search = "
                  f"{_SEARCH} WHERE user_id = %(user_id)s AND id = %(id)s")


def _search_values(row: _Row, context: str, *, user_id: str) -> dict[str, Any]:
    return {"id": row.id, "conversation_id": row.conversation_id, "text": row.text,
            "created_at": row.created_at, "context": context, "user_id": user_id,
            "date": ranking.date_words(row.created_at)}


async def _reindex_around(connection: AsyncConnection[TupleRow], user_id: str,
                          conversation_id: str, erased_id: int) -> None:
    """Rewrite the context of the memories whose neighbour was just erased."""
    window = ranking.CONTEXT_WINDOW
    cursor = await connection.execute(
        "(SELECT id, conversation_id, text, created_at FROM memproxy_memories "
        " WHERE user_id = %(u)s AND conversation_id = %(c)s AND id < %(id)s "
        " ORDER BY id DESC LIMIT %(n)s) UNION ALL "
        "(SELECT id, conversation_id, text, created_at FROM memproxy_memories "
        " WHERE user_id = %(u)s AND conversation_id = %(c)s AND id > %(id)s "
        " ORDER BY id LIMIT %(n)s)",
        {"u": user_id, "c": conversation_id, "id": erased_id, "n": 2 * window})
    rows = sorted((_Row(*row) for row in await cursor.fetchall()), key=lambda r: r.id)
    before = sum(1 for row in rows if row.id < erased_id)
    context = ranking.neighbour_texts([row.text for row in rows])
    touched = range(max(0, before - window), min(len(rows), before + window))
    if touched:
        async with connection.cursor() as update:
            await update.executemany(_UPDATE_SEARCH, [
                _search_values(rows[i], context[i], user_id=user_id) for i in touched])



def _text(text: str) -> str:
    """``text`` as PostgreSQL can store it: valid UTF-8, no NUL characters."""
    try:
        text.encode()
    except UnicodeEncodeError:
        text = text.encode(errors="replace").decode()
    return text.replace("\x00", "\ufffd")


def _storable(memory: NewMemory) -> NewMemory:
    return dataclasses.replace(
        memory, conversation_id=_text(memory.conversation_id), text=_text(memory.text),
        client=_text(memory.client), user_agent=_text(memory.user_agent),
        model=_text(memory.model))


# -- reading --------------------------------------------------------------------------------

async def _match(connection: AsyncConnection[TupleRow], user_id: str, query: str, limit: int,
                 *, exclude: str | None = None,
                 now: float | None = None) -> list[tuple[Memory, float]]:
    """The best matches of ``query`` among the user's memories, best first, with scores."""
    if limit <= 0:
        return []
    memories = await _memory_count(connection, user_id)
    if not memories:
        return []
    terms = ranking.words(query)
    if terms and memories >= ranking.SHARES_MIN_MEMORIES:
        # A user with fewer memories than MAX_SCORED has every match scored: no need to
        # count how many each word matches.
        own, matching = await _term_counts(connection, user_id, terms,
                                           int(ranking.COMMON_SHARE * memories) + 1,
                                           matching=memories > MAX_SCORED)
        # query_terms asks one word at a time; the counts were taken in one round trip.
        terms = ranking.query_terms(query, memories, lambda term, cap: own.get(term, 0))
        pool = _rarest(terms, matching) if matching else terms
    else:
        pool = terms
    if not terms:
        return []
    conditions = ["user_id = %(user_id)s", f"search @@ {_POOL}"]
    if exclude is not None:
        conditions.append("conversation_id <> %(exclude)s")
    if now is not None:
        conditions.append("created_at <= %(now)s")
    cursor = await connection.execute(
        f"SELECT {_MEMORY_COLUMNS}, ts_rank(%(weights)s, search, {_QUERY}, %(norm)s) AS score "
        f"FROM memproxy_memories WHERE {' AND '.join(conditions)} "
        "ORDER BY score DESC, id LIMIT %(limit)s",
        {"user_id": user_id, "english": " | ".join(terms),
         "simple": " | ".join(f"{term}:C" for term in terms),
         "pool_english": " | ".join(pool),
         "pool_simple": " | ".join(f"{term}:C" for term in pool), "exclude": exclude,
         "now": now, "weights": RANK_WEIGHTS, "norm": RANK_NORMALISATION, "limit": limit})
    return [(_memory(user_id, row[:-1]), float(row[-1])) for row in await cursor.fetchall()]


async def _memory_count(connection: AsyncConnection[TupleRow], user_id: str) -> int:
    cursor = await connection.execute(
        "SELECT memories FROM memproxy_users WHERE user_id = %s", (user_id,))
    row = await cursor.fetchone()
    return 0 if row is None else int(row[0])


async def _term_counts(connection: AsyncConnection[TupleRow], user_id: str,
                       terms: Sequence[str], cap: int, *,
                       matching: bool) -> tuple[dict[str, int], dict[str, int]]:
    """For each term, how many of the user's memories have it in their own text (up to
    ``cap``), and, if ``matching``, how many a search for it matches in any part (up to
    :data:`MAX_SCORED`; else none are counted).

    Both come from the GIN indexes alone: a lexeme without a weight needs no recheck, and
    a vacuumed table answers a count without reading its rows. (The second counts a word's
    unstemmed form in every part, not only the date: a count of a little more than the
    search will match.)
    """
    anywhere = ("(SELECT count(*) FROM (SELECT 1 FROM memproxy_memories m "
                "WHERE m.user_id = %(user)s AND m.search @@ (to_tsquery('english', t.term) "
                "|| to_tsquery('simple', t.term)) LIMIT %(most)s) matching)") if matching else "0"
    cursor = await connection.execute(
        "SELECT t.term, "
        "(SELECT count(*) FROM (SELECT 1 FROM memproxy_memories m WHERE m.user_id = %(user)s "
        f"  AND m.words @@ to_tsquery('english', t.term) LIMIT %(cap)s) own), {anywhere} "
        "FROM unnest(%(terms)s::text[]) AS t(term)",
        {"user": user_id, "cap": cap, "most": MAX_SCORED + 1, "terms": list(terms)})
    own: dict[str, int] = {}
    counts: dict[str, int] = {}
    for term, in_text, found in await cursor.fetchall():
        own[term] = int(in_text)
        if matching:
            counts[term] = int(found)
    return own, counts


def _rarest(terms: Sequence[str], matching: dict[str, int]) -> list[str]:
    """The terms whose matches together stay within :data:`MAX_SCORED`, rarest first kept.

    ``ts_rank`` scores every memory it is given, at a few microseconds each, so a user with
    many memories and a question of common words would spend longer than the recall budget
    scoring memories that match nothing but those words. Only memories that match one of
    the rarer words are scored (with every word of the query): the words BM25 would weigh
    most. The rarest word always stays. Order in the query is kept.
    """
    kept: set[str] = set()
    total = 0
    for term in sorted(terms, key=lambda t: matching.get(t, 0)):
        total += matching.get(term, 0)
        if kept and total > MAX_SCORED:
            break
        kept.add(term)
    return [term for term in terms if term in kept]


def _memory(user_id: str, row: Sequence[Any]) -> Memory:
    memory_id, conversation_id, role, text, created_at, client, user_agent, model = row
    return Memory(id=int(memory_id), user_id=user_id, conversation_id=conversation_id,
                  role=role, text=text, created_at=float(created_at), client=client,
                  user_agent=user_agent, model=model)


def _secrets_of(dsn: str) -> Iterable[str]:
    """The parts of a connection string that must never be shown."""
    yield dsn
    with contextlib.suppress(Exception):
        password = conninfo_to_dict(dsn).get("password")
        if password:
            yield str(password)

