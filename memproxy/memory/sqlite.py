"""The embedded memory backend: one SQLite file, full-text search with FTS5, standard library only.

Why it is built this way:

- **Each user has tables of their own**: ``memory_<k>`` (the messages), ``memory_<k>_index``
  (their FTS5 index) and ``pins_<k>`` (pinned blocks), where ``k`` is a number the shared
  ``users`` table gives the user id. Every query names one user's tables only, so no
  statement can read another user's rows, whatever its WHERE clause; the index's term
  statistics (BM25's document frequencies) are the user's own, so other users' words do
  not change a user's ranking; and a query reads only that user's postings, so a recall
  costs the same in a file of a million memories as with that user alone in the file.
- **Erasure rebuilds the user's tables.** Deleting a row does not remove every copy of its
  text from an SQLite file: FTS5 keeps a deleted document's terms in its index segments
  until they are merged, and when a B-tree page is rebuilt while balancing, the cells
  that moved out can stay behind in the page's unused space. So :meth:`delete` copies the
  user's remaining memories into new tables, indexes them afresh, and drops the old ones.
  With ``PRAGMA secure_delete`` every page of a dropped table is overwritten with zeros,
  the new tables are written from the remaining rows only, and a ``TRUNCATE`` checkpoint
  then copies the result into the database file and empties the ``-wal`` file (which
  still holds earlier versions of the pages). The cost is proportional to that one
  user's memories; :meth:`delete_user` simply drops the tables. ``secure_delete`` is on
  for every write, so pages freed by ordinary work (index merges) hold nothing either.
- **The index is contentless** (``content=''``): the text is stored once, in the memory
  table. Each memory's index row has three columns: its text, the text of its
  neighbours in the conversation, and its date in words (see
  :mod:`memproxy.memory.recall` for why). A new message changes its predecessors'
  neighbour column, so the writer removes their old index rows (FTS5's ``'delete'``
  command, given the exact values, recomputed from the memory table) and adds new ones.
- **Memory ids are unique in the file**, from a counter, so an id names one memory even
  when it is another user's, and ids survive a user's rebuild.
- **One writer thread per process, readers on their own connections.** Writes are
  serialised on one connection (``BEGIN IMMEDIATE``); reads run on a few other
  connections in threads and see every write committed before they started. WAL lets
  readers and the writer work at once, and ``busy_timeout`` makes the writers of several
  processes (``serve --workers N``) wait for each other instead of failing.

The price of tables per user is paid in the schema. A connection reads the whole schema
when it opens and again after it changed (a new user, an erasure), and with FTS5 tables
that work grows with the square of their number: about 8 ms with 100 users, 200 ms with
1,000 and 2 s with 3,000 (``python -m bench.memory_speed`` measures it). One file suits up
to about a thousand memory users; past that, a recall right after a new user appeared
runs into the recall timeout once per connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import json
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

import structlog

from memproxy.memory import recall as ranking
from memproxy.memory.store import (
    ROLES,
    Memory,
    NewMemory,
    Recalled,
    SeenClient,
    UserSummary,
    message_digest,
    split_text,
)

log = structlog.get_logger("memproxy.memory")

#: The layout this code writes; kept in the file as ``PRAGMA user_version``.
SCHEMA_VERSION = 3
#: How long a write waits for another process's write, in seconds.
BUSY_TIMEOUT = 10.0
#: Threads (each with its own connection) that serve reads.
READERS = 2
#: Checkpoints tried after an erasure while readers keep the old pages in use.
CHECKPOINT_ATTEMPTS = 3

_SCHEMA = (
    """CREATE TABLE users(
        user_id    TEXT PRIMARY KEY,
        tables     INTEGER NOT NULL UNIQUE,  -- k in the names of the user's tables
        memories   INTEGER NOT NULL DEFAULT 0,
        last_write REAL NOT NULL DEFAULT 0   -- when a memory was last written (unix time)
    ) WITHOUT ROWID""",
    "CREATE TABLE counters(name TEXT PRIMARY KEY, value INTEGER NOT NULL) WITHOUT ROWID",
    "INSERT INTO counters VALUES ('memory_id', 0), ('tables', 0)",
)

# Layout 2: what every process using the file has seen (``serve --workers N``), for the
# status page and the unrecognised-client inbox.
_TEAM_VIEW = (
    """CREATE TABLE clients(
        fingerprint TEXT PRIMARY KEY,   -- the identifying headers, as JSON
        count       INTEGER NOT NULL,
        first_seen  REAL NOT NULL,
        last_seen   REAL NOT NULL
    ) WITHOUT ROWID""",
    """CREATE TABLE activity(
        minute    INTEGER NOT NULL,     -- unix time // 60
        label     TEXT NOT NULL,
        succeeded INTEGER NOT NULL,
        count     INTEGER NOT NULL,
        PRIMARY KEY (minute, label, succeeded)
    ) WITHOUT ROWID""",
)


def _to_v2(connection: sqlite3.Connection) -> None:
    for statement in _TEAM_VIEW:
        connection.execute(statement)


def _to_v3(connection: sqlite3.Connection) -> None:
    """Layout 3: each pin says when it was written, so the pins of quiet conversations go.

    The pins already there count as written now: their conversations get the full time.
    """
    now = time.time()
    for (key,) in connection.execute("SELECT tables FROM users").fetchall():
        connection.execute(f"ALTER TABLE {_Tables(key).pins} "
                           f"ADD COLUMN pinned_at REAL NOT NULL DEFAULT {now!r}")


#: Steps that upgrade a file from layout ``k`` to ``k + 1``, run in order on open.
MIGRATIONS: dict[int, Callable[[sqlite3.Connection], None]] = {1: _to_v2, 2: _to_v3}

_USER_SCHEMA = (
    """CREATE TABLE {memory}(
        id              INTEGER PRIMARY KEY,
        conversation_id TEXT NOT NULL,
        role            TEXT NOT NULL,
        text            TEXT NOT NULL,
        created_at      REAL NOT NULL,
        client          TEXT NOT NULL,
        user_agent      TEXT NOT NULL,
        model           TEXT NOT NULL,
        message         BLOB NOT NULL  -- digest of conversation, role and whole message text
    )""",
    "CREATE INDEX {memory}_conversation ON {memory}(conversation_id, id)",
    "CREATE INDEX {memory}_time ON {memory}(created_at, id)",
    "CREATE INDEX {memory}_message ON {memory}(message)",
    """CREATE VIRTUAL TABLE {index} USING fts5(
        text, context, date, content='', tokenize='porter unicode61 remove_diacritics 2')""",
    """CREATE TABLE {pins}(
        conversation_id TEXT PRIMARY KEY,
        block           TEXT NOT NULL,
        pinned_at       REAL NOT NULL       -- unix time
    ) WITHOUT ROWID""",
)

_COLUMNS = "id, conversation_id, role, text, created_at, client, user_agent, model"
_BM25 = "bm25({index}, " + ", ".join(map(str, ranking.WEIGHTS)) + ")"
# Ids bound into one IN (...) list at most.
_IDS_PER_QUERY = 500

T = TypeVar("T")


class MemoryFileError(Exception):
    """The memory file cannot be used by this version of memproxy."""


@dataclass(frozen=True, slots=True)
class _Tables:
    """The names of one user's tables."""

    key: int

    @property
    def memory(self) -> str:
        return f"memory_{self.key}"

    @property
    def index(self) -> str:
        return f"memory_{self.key}_index"

    @property
    def pins(self) -> str:
        return f"pins_{self.key}"


class _Row(NamedTuple):
    """What the index needs of a memory."""

    id: int
    conversation_id: str
    text: str
    created_at: float


class SqliteMemoryStore:
    """:class:`memproxy.memory.store.MemoryStore` in one SQLite file.

    The file is opened, and created if need be, by the first call (or :meth:`open`).
    """

    def __init__(self, path: str | os.PathLike[str], *, readers: int = READERS,
                 busy_timeout: float = BUSY_TIMEOUT) -> None:
        self.path = Path(path)
        self._busy_timeout = busy_timeout
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="memory-writer")
        self._readers = ThreadPoolExecutor(readers, thread_name_prefix="memory-reader")
        self._write_connection: sqlite3.Connection | None = None
        self._local = threading.local()
        self._read_connections: list[sqlite3.Connection] = []
        self._lock = threading.Lock()
        self._opened = False
        self._closed = False

    async def open(self) -> None:
        """Open the file, creating or upgrading its tables; later calls do nothing."""
        if not self._opened:
            await self._write(lambda connection: None)
            self._opened = True

    async def add(self, memories: Sequence[NewMemory]) -> int:
        for memory in memories:
            if memory.role not in ROLES:
                raise ValueError(f"a memory's role is one of {ROLES}, not {memory.role!r}")
        return await self._write(partial(_add, memories=[_encodable(m) for m in memories]))

    async def recall(self, user_id: str, query: str, *, max_tokens: int,
                     exclude_conversation: str | None, now: float | None = None) -> Recalled:
        return await self._read(partial(_recall, user_id=user_id, query=_utf8(query),
                                        max_tokens=max_tokens,
                                        exclude=exclude_conversation, now=now))

    async def search(self, user_id: str, query: str, *, limit: int) -> list[Memory]:
        return await self._read(partial(_search, user_id=user_id, query=_utf8(query),
                                        limit=limit))

    async def recent(self, user_id: str, *, limit: int) -> list[Memory]:
        return await self._read(partial(_listed, user_id=user_id, newest_first=True,
                                        limit=limit))

    async def users(self) -> list[UserSummary]:
        return await self._read(_users)

    async def export(self, user_id: str) -> list[Memory]:
        return await self._read(partial(_listed, user_id=user_id, newest_first=False,
                                        limit=-1))

    async def delete(self, user_id: str, memory_id: int) -> int:
        return await self._write(partial(_delete, user_id=user_id, memory_id=memory_id))

    async def delete_user(self, user_id: str) -> int:
        return await self._write(partial(_delete_user, user_id=user_id))

    async def pinned(self, user_id: str, conversation_id: str) -> str | None:
        return await self._read(partial(_pinned, user_id=user_id,
                                        conversation_id=conversation_id))

    async def pin(self, user_id: str, conversation_id: str, block: str) -> None:
        await self._write(partial(_pin, user_id=user_id, conversation_id=conversation_id,
                                  block=block))

    async def forget_quiet_pins(self, before: float) -> int:
        users = await self._read(_table_keys)
        dropped = 0
        for key in users:  # a transaction each: other processes' writes wait for one user only
            dropped += await self._write(partial(_forget_quiet_pins, tables=_Tables(key),
                                                 before=before))
        return dropped

    async def size_bytes(self) -> int:
        return await asyncio.to_thread(self._size_bytes)

    async def compact(self) -> None:
        await self._write(_vacuum)

    async def add_seen_clients(self, seen: Sequence[SeenClient]) -> None:
        await self._write(partial(_add_seen_clients, seen=seen))

    async def seen_clients(self, limit: int) -> list[SeenClient]:
        return await self._read(partial(_seen_clients, limit=limit))

    async def add_activity(self, counts: dict[tuple[int, str, bool], int]) -> None:
        await self._write(partial(_add_activity, counts=counts))

    async def activity(self, since_minute: int) -> dict[tuple[str, bool], int]:
        return await self._read(partial(_activity, since_minute=since_minute))

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._writer, self._close_writer)
        await asyncio.to_thread(self._close_readers)

    # -- threads and connections -----------------------------------------------------------

    async def _write(self, work: Callable[[sqlite3.Connection], T]) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._writer, self._in_writer, work)

    async def _read(self, work: Callable[[sqlite3.Connection], T]) -> T:
        await self.open()
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._readers, self._in_reader, work)

    def _in_writer(self, work: Callable[[sqlite3.Connection], T]) -> T:
        if self._write_connection is None:
            connection = _connect(self.path, self._busy_timeout)
            try:
                _prepare(connection)
            except BaseException:
                connection.close()
                raise
            self._write_connection = connection
        return work(self._write_connection)

    def _in_reader(self, work: Callable[[sqlite3.Connection], T]) -> T:
        connection: sqlite3.Connection | None = getattr(self._local, "connection", None)
        if connection is None:
            connection = _connect(self.path, self._busy_timeout)
            self._local.connection = connection
            with self._lock:
                self._read_connections.append(connection)
        with _transaction(connection, write=False):
            return work(connection)

    def _close_writer(self) -> None:
        if self._write_connection is not None:
            self._write_connection.close()
            self._write_connection = None

    def _close_readers(self) -> None:
        self._writer.shutdown()
        self._readers.shutdown()
        with self._lock:
            for connection in self._read_connections:
                connection.close()
            self._read_connections.clear()

    def _size_bytes(self) -> int:
        files = (self.path, self.path.with_name(self.path.name + "-wal"))
        return sum(f.stat().st_size for f in files if f.exists())


# -- the file ---------------------------------------------------------------------------------

def _connect(path: Path, busy_timeout: float) -> sqlite3.Connection:
    connection = sqlite3.connect(path, timeout=busy_timeout, isolation_level=None,
                                 check_same_thread=False, cached_statements=256)
    _use_wal(connection, time.monotonic() + busy_timeout)
    for pragma in ("synchronous = NORMAL", "secure_delete = ON", "temp_store = MEMORY"):
        connection.execute(f"PRAGMA {pragma}")
    return connection


def _use_wal(connection: sqlite3.Connection, deadline: float) -> None:
    """Switch a new file to WAL, which a file keeps; retried while another process opens it.

    Two processes opening a new file at once can each hold a lock the other's switch
    needs; SQLite then answers "locked" to one of them at once, without waiting.
    """
    while True:
        try:
            connection.execute("PRAGMA journal_mode = WAL")
            return
        except sqlite3.OperationalError as exc:
            if exc.sqlite_errorcode != sqlite3.SQLITE_BUSY or time.monotonic() > deadline:
                raise
            time.sleep(0.02)


def _prepare(connection: sqlite3.Connection) -> None:
    """Create the shared tables of a new file, or bring an older file's layout up to date."""
    with _transaction(connection, write=True):
        version: int = connection.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise MemoryFileError(
                f"the memory file was written by a newer memproxy (layout {version}; this one "
                f"knows up to {SCHEMA_VERSION})")
        if version == 0:
            for statement in (*_SCHEMA, *_TEAM_VIEW):
                connection.execute(statement)
        else:
            for step in range(version, SCHEMA_VERSION):
                MIGRATIONS[step](connection)
        connection.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")


@contextlib.contextmanager
def _transaction(connection: sqlite3.Connection, *, write: bool) -> Iterator[None]:
    """One transaction; a write one takes the file's write lock at once (so never deadlocks)."""
    connection.execute("BEGIN IMMEDIATE" if write else "BEGIN")
    try:
        yield
    except BaseException:
        if connection.in_transaction:
            connection.execute("ROLLBACK")
        raise
    connection.execute("COMMIT")


def _checkpoint(connection: sqlite3.Connection) -> None:
    """Copy the WAL into the database file and empty it, so old page versions are gone."""
    for _ in range(CHECKPOINT_ATTEMPTS):
        busy = connection.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0]
        if not busy:
            return
    log.warning("memory_checkpoint_incomplete", attempts=CHECKPOINT_ATTEMPTS,
                reason="readers kept old pages in use; the -wal file still holds them until "
                       "the next checkpoint")


def _next(connection: sqlite3.Connection, counter: str, count: int = 1) -> int:
    """The first of ``count`` new numbers from a counter."""
    last: int = connection.execute(
        "UPDATE counters SET value = value + ? WHERE name = ? RETURNING value",
        (count, counter)).fetchone()[0]
    return last - count + 1


# -- users and their tables -------------------------------------------------------------------

def _user(connection: sqlite3.Connection, user_id: str) -> tuple[_Tables, int] | None:
    """The user's tables and number of memories; ``None`` for a user with neither."""
    row = connection.execute("SELECT tables, memories FROM users WHERE user_id = ?",
                             (user_id,)).fetchone()
    return None if row is None else (_Tables(row[0]), row[1])


def _tables_for_writing(connection: sqlite3.Connection, user_id: str) -> _Tables:
    found = _user(connection, user_id)
    if found is not None:
        return found[0]
    tables = _create_tables(connection)
    connection.execute("INSERT INTO users(user_id, tables) VALUES (?, ?)",
                       (user_id, tables.key))
    return tables


def _create_tables(connection: sqlite3.Connection) -> _Tables:
    tables = _Tables(_next(connection, "tables"))
    for statement in _USER_SCHEMA:
        connection.execute(statement.format(memory=tables.memory, index=tables.index,
                                            pins=tables.pins))
    return tables


def _drop_tables(connection: sqlite3.Connection, tables: _Tables) -> None:
    for table in (tables.index, tables.memory, tables.pins):
        connection.execute(f"DROP TABLE {table}")


# -- writing ------------------------------------------------------------------------------------

def _utf8(text: str) -> str:
    """``text`` with anything UTF-8 cannot hold (lone surrogates from JSON) replaced."""
    try:
        text.encode()
    except UnicodeEncodeError:
        return text.encode(errors="replace").decode()
    return text


def _encodable(memory: NewMemory) -> NewMemory:
    return dataclasses.replace(
        memory, user_id=_utf8(memory.user_id), conversation_id=_utf8(memory.conversation_id),
        text=_utf8(memory.text), client=_utf8(memory.client),
        user_agent=_utf8(memory.user_agent), model=_utf8(memory.model))


def _add(connection: sqlite3.Connection, memories: Sequence[NewMemory]) -> int:
    by_user: dict[str, list[tuple[NewMemory, list[str]]]] = {}
    for memory in memories:
        parts = split_text(memory.text)
        if parts:
            by_user.setdefault(memory.user_id, []).append((memory, parts))
    written = 0
    with _transaction(connection, write=True):
        for user_id, mine in by_user.items():
            tables = _tables_for_writing(connection, user_id)
            rows = [row for memory, parts in mine
                    for row in _insert(connection, tables, memory, parts)]
            _index_appended(connection, tables, rows)
            if rows:
                connection.execute(
                    "UPDATE users SET memories = memories + ?, last_write = ? WHERE user_id = ?",
                    (len(rows), time.time(), user_id))
            written += len(rows)
    return written



def _insert(connection: sqlite3.Connection, tables: _Tables, memory: NewMemory,
            parts: Sequence[str]) -> list[_Row]:
    """Store one message as one memory per part; none if it is already stored."""
    message = message_digest(memory)
    if connection.execute(f"SELECT 1 FROM {tables.memory} WHERE message = ? LIMIT 1",
                          (message,)).fetchone():
        return []
    first = _next(connection, "memory_id", len(parts))
    rows = [_Row(first + i, memory.conversation_id, part, memory.created_at)
            for i, part in enumerate(parts)]
    connection.executemany(
        f"INSERT INTO {tables.memory}({_COLUMNS}, message) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
        [(row.id, row.conversation_id, memory.role, row.text, row.created_at, memory.client,
          memory.user_agent, memory.model, message) for row in rows])
    return rows


def _index_appended(connection: sqlite3.Connection, tables: _Tables,
                    rows: Sequence[_Row]) -> None:
    """Index new memories; re-index the earlier ones whose neighbours they became.

    New memories always come last in their conversation (ids only grow). The last
    :data:`~memproxy.memory.recall.CONTEXT_WINDOW` earlier memories gain neighbours:
    their index rows are removed with the values they were indexed with (computed from
    their own neighbours, hence twice the window is read) and added again.
    """
    window = ranking.CONTEXT_WINDOW
    for conversation_id, group in _by_conversation(rows):
        new = list(group)
        earlier = [_Row(*row) for row in connection.execute(
            f"SELECT id, conversation_id, text, created_at FROM {tables.memory} "
            "WHERE conversation_id = ? AND id < ? ORDER BY id DESC LIMIT ?",
            (conversation_id, new[0].id, 2 * window))][::-1]
        before = ranking.neighbour_texts([row.text for row in earlier])
        after = ranking.neighbour_texts([row.text for row in earlier + new])
        for i in range(max(0, len(earlier) - window), len(earlier)):
            _index(connection, tables, earlier[i], before[i], remove=True)
            _index(connection, tables, earlier[i], after[i])
        for i, row in enumerate(new, start=len(earlier)):
            _index(connection, tables, row, after[i])


def _by_conversation(rows: Iterable[_Row]) -> Iterator[tuple[str, Iterator[_Row]]]:
    """Rows grouped by conversation, each group in id order."""
    return itertools.groupby(sorted(rows, key=lambda r: (r.conversation_id, r.id)),
                             key=lambda r: r.conversation_id)


def _index(connection: sqlite3.Connection, tables: _Tables, row: _Row, neighbours: str, *,
           remove: bool = False) -> None:
    """Add a memory's index row, or remove it (given exactly the values it was added with)."""
    values = (row.id, row.text, neighbours, ranking.date_words(row.created_at))
    if remove:
        connection.execute(
            f"INSERT INTO {tables.index}({tables.index}, rowid, text, context, date) "
            "VALUES ('delete', ?, ?, ?, ?)", values)
    else:
        connection.execute(
            f"INSERT INTO {tables.index}(rowid, text, context, date) VALUES (?, ?, ?, ?)",
            values)


def _pin(connection: sqlite3.Connection, user_id: str, conversation_id: str, block: str) -> None:
    with _transaction(connection, write=True):
        tables = _tables_for_writing(connection, user_id)
        connection.execute(f"INSERT OR REPLACE INTO {tables.pins}(conversation_id, block, "
                           "pinned_at) VALUES (?, ?, ?)", (conversation_id, block, time.time()))


def _table_keys(connection: sqlite3.Connection) -> list[int]:
    return [key for (key,) in connection.execute("SELECT tables FROM users")]


def _forget_quiet_pins(connection: sqlite3.Connection, tables: _Tables, before: float) -> int:
    with _transaction(connection, write=True):
        if connection.execute("SELECT 1 FROM users WHERE tables = ?",
                              (tables.key,)).fetchone() is None:
            return 0  # the user was erased, or their tables rebuilt, since they were listed
        dropped: int = connection.execute(
            f"DELETE FROM {tables.pins} WHERE pinned_at < ? AND conversation_id NOT IN "
            f"(SELECT conversation_id FROM {tables.memory} WHERE created_at >= ?)",
            (before, before)).rowcount
    return dropped


# -- erasing ------------------------------------------------------------------------------------

def _delete(connection: sqlite3.Connection, user_id: str, memory_id: int) -> int:
    with _transaction(connection, write=True):
        found = _user(connection, user_id)
        if found is None:
            return 0
        tables = found[0]
        if not connection.execute(f"DELETE FROM {tables.memory} WHERE id = ?",
                                  (memory_id,)).rowcount:
            return 0
        _rebuild(connection, user_id, tables)
        connection.execute("UPDATE users SET memories = memories - 1 WHERE user_id = ?",
                           (user_id,))
    _checkpoint(connection)
    return 1


def _rebuild(connection: sqlite3.Connection, user_id: str, old: _Tables) -> None:
    """Move the user's memories into new tables, index them afresh, drop the old tables.

    Pins are not carried over: a pinned block may hold text that was just erased.
    """
    new = _create_tables(connection)
    connection.execute(f"INSERT INTO {new.memory} SELECT * FROM {old.memory} ORDER BY id")
    rows = connection.execute(
        f"SELECT id, conversation_id, text, created_at FROM {new.memory} "
        "ORDER BY conversation_id, id")
    for _, group in _by_conversation(_Row(*row) for row in rows):
        conversation = list(group)
        neighbours = ranking.neighbour_texts([row.text for row in conversation])
        for row, context in zip(conversation, neighbours, strict=True):
            _index(connection, new, row, context)
    _drop_tables(connection, old)
    connection.execute("UPDATE users SET tables = ? WHERE user_id = ?", (new.key, user_id))


def _vacuum(connection: sqlite3.Connection) -> None:
    """Rebuild the file without its free pages (erasure needs no VACUUM: see the module)."""
    connection.execute("VACUUM")
    _checkpoint(connection)


def _delete_user(connection: sqlite3.Connection, user_id: str) -> int:
    with _transaction(connection, write=True):
        found = _user(connection, user_id)
        if found is None:
            return 0
        tables, memories = found
        _drop_tables(connection, tables)
        connection.execute("DELETE FROM users WHERE user_id = ?", (user_id,))
    _checkpoint(connection)
    return memories


# -- reading ------------------------------------------------------------------------------------

def _recall(connection: sqlite3.Connection, user_id: str, query: str, max_tokens: int,
            exclude: str | None, now: float | None) -> Recalled:
    found = _user(connection, user_id)
    if found is None:
        return Recalled("", ())
    tables, count = found
    terms = ranking.query_terms(query, count, partial(_count_term, connection, tables))
    skipped = 0 if exclude is None else connection.execute(
        f"SELECT count(*) FROM {tables.memory} WHERE conversation_id = ?",
        (exclude,)).fetchone()[0]
    hits = _match(connection, tables, terms, ranking.CANDIDATES + skipped)
    memories = _memories(connection, tables, user_id, [memory_id for memory_id, _ in hits])
    candidates = [(memories[memory_id], score) for memory_id, score in hits
                  if memory_id in memories
                  and memories[memory_id].conversation_id != exclude
                  and (now is None or memories[memory_id].created_at <= now)]
    chosen = ranking.pack(candidates, max_tokens)
    return Recalled(ranking.render(chosen), chosen)


def _search(connection: sqlite3.Connection, user_id: str, query: str,
            limit: int) -> list[Memory]:
    found = _user(connection, user_id)
    if found is None:
        return []
    tables, count = found
    terms = ranking.query_terms(query, count, partial(_count_term, connection, tables))
    hits = _match(connection, tables, terms, limit)
    memories = _memories(connection, tables, user_id, [memory_id for memory_id, _ in hits])
    return [memories[memory_id] for memory_id, _ in hits if memory_id in memories]


def _quoted(term: str) -> str:
    return '"' + term.replace('"', '""') + '"'


def _count_term(connection: sqlite3.Connection, tables: _Tables, term: str, cap: int) -> int:
    """How many of the user's memories have ``term`` in their own text, counted up to ``cap``."""
    count: int = connection.execute(
        f"SELECT count(*) FROM (SELECT rowid FROM {tables.index} WHERE {tables.index} MATCH ? "
        "LIMIT ?)", (f"text : {_quoted(term)}", cap)).fetchone()[0]
    return count


def _match(connection: sqlite3.Connection, tables: _Tables, terms: Sequence[str],
           limit: int) -> list[tuple[int, float]]:
    """``(memory id, score)`` of the best matches of any of ``terms``, best first."""
    if not terms or limit <= 0:
        return []
    query = "{text context date} : (" + " OR ".join(map(_quoted, terms)) + ")"
    bm25 = _BM25.format(index=tables.index)
    return connection.execute(
        f"SELECT rowid, -{bm25} FROM {tables.index} WHERE {tables.index} MATCH ? "
        f"ORDER BY {bm25}, rowid LIMIT ?", (query, limit)).fetchall()


def _memories(connection: sqlite3.Connection, tables: _Tables, user_id: str,
              ids: Sequence[int]) -> dict[int, Memory]:
    found: dict[int, Memory] = {}
    for start in range(0, len(ids), _IDS_PER_QUERY):
        part = ids[start:start + _IDS_PER_QUERY]
        rows = connection.execute(
            f"SELECT {_COLUMNS} FROM {tables.memory} WHERE id IN "
            f"({', '.join('?' * len(part))})", part)
        found.update((row[0], _memory(user_id, row)) for row in rows)
    return found


def _memory(user_id: str, row: Any) -> Memory:
    memory_id, conversation_id, role, text, created_at, client, user_agent, model = row
    return Memory(id=memory_id, user_id=user_id, conversation_id=conversation_id, role=role,
                  text=text, created_at=created_at, client=client, user_agent=user_agent,
                  model=model)


def _listed(connection: sqlite3.Connection, user_id: str, newest_first: bool,
            limit: int) -> list[Memory]:
    """The user's memories by time of writing (``limit`` -1: all of them)."""
    found = _user(connection, user_id)
    if found is None:
        return []
    order = "DESC" if newest_first else "ASC"
    rows = connection.execute(
        f"SELECT {_COLUMNS} FROM {found[0].memory} "
        f"ORDER BY created_at {order}, id {order} LIMIT ?", (limit,))
    return [_memory(user_id, row) for row in rows]


def _users(connection: sqlite3.Connection) -> list[UserSummary]:
    rows = connection.execute("SELECT user_id, memories, last_write FROM users ORDER BY user_id")
    return [UserSummary(user_id, memories, last_write) for user_id, memories, last_write in rows]


def _pinned(connection: sqlite3.Connection, user_id: str, conversation_id: str) -> str | None:
    found = _user(connection, user_id)
    if found is None:
        return None
    row = connection.execute(f"SELECT block FROM {found[0].pins} WHERE conversation_id = ?",
                             (conversation_id,)).fetchone()
    return None if row is None else str(row[0])


# -- the team's view ----------------------------------------------------------------------------

#: Minutes of activity kept; the status page shows the last hour.
ACTIVITY_KEPT_MINUTES = 24 * 60


def fingerprint(headers: dict[str, str]) -> str:
    """A client's identifying headers as one key (JSON of the sorted pairs)."""
    return json.dumps(sorted(headers.items()), ensure_ascii=False, separators=(",", ":"))


def _add_seen_clients(connection: sqlite3.Connection, seen: Sequence[SeenClient]) -> None:
    with _transaction(connection, write=True):
        connection.executemany(
            "INSERT INTO clients VALUES (?, ?, ?, ?) ON CONFLICT (fingerprint) DO UPDATE SET "
            "count = count + excluded.count, first_seen = min(first_seen, excluded.first_seen), "
            "last_seen = max(last_seen, excluded.last_seen)",
            [(_utf8(fingerprint(c.headers)), c.count, c.first_seen, c.last_seen) for c in seen])


def _seen_clients(connection: sqlite3.Connection, limit: int) -> list[SeenClient]:
    rows = connection.execute(
        "SELECT fingerprint, count, first_seen, last_seen FROM clients "
        "ORDER BY count DESC, last_seen DESC LIMIT ?", (limit,))
    return [SeenClient(dict(json.loads(f)), n, first, last) for f, n, first, last in rows]


def _add_activity(connection: sqlite3.Connection,
                  counts: dict[tuple[int, str, bool], int]) -> None:
    if not counts:
        return
    with _transaction(connection, write=True):
        connection.executemany(
            "INSERT INTO activity VALUES (?, ?, ?, ?) ON CONFLICT (minute, label, succeeded) "
            "DO UPDATE SET count = count + excluded.count",
            [(minute, _utf8(label), ok, n) for (minute, label, ok), n in counts.items()])
        connection.execute("DELETE FROM activity WHERE minute < ?",
                           (max(minute for minute, _, _ in counts) - ACTIVITY_KEPT_MINUTES,))


def _activity(connection: sqlite3.Connection, since_minute: int) -> dict[tuple[str, bool], int]:
    rows = connection.execute(
        "SELECT label, succeeded, sum(count) FROM activity WHERE minute >= ? "
        "GROUP BY label, succeeded", (since_minute,))
    return {(label, bool(ok)): n for label, ok, n in rows}
