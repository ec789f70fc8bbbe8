"""Speed of the memory store: recall among a million memories, writes per second, erasure.

Run from the repository root::

    python -m bench.memory_speed                  # SQLite; the first run builds the file (minutes)
    python -m bench.memory_speed --rebuild        # build the file again
    python -m bench.memory_speed --users 10 --per-user 2000   # a quick look, small file
    python -m bench.memory_speed --backend postgres           # a throwaway PostgreSQL server
    python -m bench.memory_speed --backend postgres --dsn postgresql://me@db/postgres

The store holds ``--users`` users of ``--per-user`` memories each (by default 100 x 10,000:
1,000,000 rows), written through the store's :meth:`add` in conversations of 25 messages,
so it is exactly what memproxy would write. The text is synthetic: common English words and
a Zipf-distributed vocabulary of 30,000 made-up words, 8 to 45 words a message.

With ``--backend sqlite`` (the default) the file is built once into ``--cache`` (by default
under /tmp) and reused; every measurement runs on a copy, so the cached file stays as built.
With ``--backend postgres`` the rows go into a database of the benchmark's own, built on
every run (minutes) and dropped at the end: on the server ``--dsn`` names (its role must be
allowed to create databases), or else on a throwaway server (``tests/postgres_server.py``)
started for the run and stopped when it ends, also on Ctrl-C, SIGTERM or the time limit.
That server runs with ``fsync``, ``synchronous_commit`` and ``full_page_writes`` off, so
its write figures are optimistic: a commit does not wait for the disk. The server's settings
are printed with the figures. After building, ``VACUUM ANALYZE`` leaves the table as
autovacuum would on a server that has been running.

Measured, for one user with ``--per-user`` memories:

- recall latency (the whole :meth:`recall` call, as the request path awaits it) at 1,500
  and 500 tokens, for questions made of words from that user's memories;
- the same while another task writes memories at the same time;
- sustained writes: one memory per :meth:`add` call (one transaction each), and batches of
  200 (what the request path's writer hands over under load);
- erasing one memory (SQLite rebuilds the user's tables; PostgreSQL deletes the row and
  rewrites its neighbours' context, then vacuums in the background) and the whole user;
- the first recall of a freshly opened store, and the size on disk;
- SQLite only, in a separate file with ``--many-users`` users of one memory each: the first
  recall of a freshly opened store, and the first recall after a new user appeared (each
  user's tables are in the schema, which every connection reads again when it changes).
  PostgreSQL keeps every user in one table, so it has no such cost.

The run stops by itself after ``--max-minutes`` (building included).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import random
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from bench.harness import (
    BenchAborted,
    create_database,
    drop_database,
    percentile,
    postgres_execute,
    postgres_server,
    postgres_settings,
    time_limit,
)
from memproxy.memory.recall import STOPWORDS
from memproxy.memory.sqlite import SqliteMemoryStore
from memproxy.memory.store import MemoryStore, NewMemory

SESSION = 25            # messages per conversation
BATCH = 20 * SESSION    # messages per add() while building
START = 1_672_531_200.0  # 2023-01-01, UTC
TARGET_WRITES = 500.0
COMMON = [*sorted(w for w in STOPWORDS if len(w) > 1 and "'" not in w)[:150],
          "day", "time", "love", "work", "great", "family", "friends", "fun", "new", "feel",
          "happy", "kids", "trip", "book", "music"]


@dataclass(frozen=True, slots=True)
class Backend:
    """What differs between the stores the benchmark measures."""

    name: str
    target_p95_ms: float
    open: Callable[[], MemoryStore]
    #: What a store holds, for the first recall's line.
    holds: str
    #: What erasing one memory does, in words.
    erasure: str
    #: What the size covers.
    size: str


def sqlite_backend(path: Path) -> Backend:
    return Backend("SQLite", 20.0, lambda: SqliteMemoryStore(path),
                   "users' tables in the schema", "the user's tables rebuilt", "file")


def postgres_backend(dsn: str) -> Backend:
    from memproxy.memory.postgres import PostgresMemoryStore

    return Backend("PostgreSQL", 30.0, lambda: PostgresMemoryStore(dsn),
                   "users in one table; a new connection pool",
                   "the row deleted, its neighbours' context rewritten; VACUUM follows in "
                   "the background", "tables and indexes")


class Text:
    """Synthetic messages: common words, and made-up words with Zipf frequencies."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        syllables = ["ka", "lo", "mi", "ten", "ra", "su", "vel", "an", "dor", "pi", "ne", "sha",
                     "tor", "gu", "ber"]
        made_up = {"".join(self.rng.choice(syllables) for _ in range(self.rng.randint(2, 4)))
                   for _ in range(60_000)}
        self.rare = sorted(made_up)[:30_000]
        self.weights = list(itertools.accumulate(1 / (k + 1) ** 1.05
                                                 for k in range(len(self.rare))))

    def message(self) -> str:
        count = self.rng.randint(8, 45)
        common = sum(self.rng.random() < 0.55 for _ in range(count))
        words = (self.rng.choices(COMMON, k=common)
                 + self.rng.choices(self.rare, cum_weights=self.weights, k=count - common))
        self.rng.shuffle(words)
        return " ".join(words).capitalize() + "."

    def conversation(self, user: str, name: str, day: int) -> list[NewMemory]:
        at = START + day * 86_400
        return [NewMemory(user_id=user, conversation_id=name,
                          role=("user", "assistant")[i % 2], text=self.message(),
                          created_at=at + i * 30, client="bench", user_agent="bench/1",
                          model="bench-model")
                for i in range(SESSION)]


def users(count: int) -> list[str]:
    return [f"user{u}" for u in range(count)]


# -- building the store -----------------------------------------------------------------------

async def fill(store: MemoryStore, n_users: int, per_user: int, deadline: float) -> None:
    """Write every user's memories through the store, in batches of :data:`BATCH`."""
    text = Text(seed=7)
    started = time.monotonic()
    for number, user in enumerate(users(n_users), start=1):
        for batch in batches(text, user, per_user):
            if time.monotonic() > deadline:
                raise BenchAborted("the time limit passed while building the store")
            await store.add(batch)
        if number % 10 == 0 or number == n_users:
            elapsed = time.monotonic() - started
            print(f"  built {number}/{n_users} users ({number * per_user:,} memories) in "
                  f"{elapsed:.0f} s ({number * per_user / elapsed:,.0f} memories/s)", flush=True)


async def build(path: Path, n_users: int, per_user: int, deadline: float) -> None:
    """Write the file through the store, into a temporary name renamed when complete."""
    partial_path = path.with_name(path.name + ".building")
    remove(partial_path)
    store = SqliteMemoryStore(partial_path)
    try:
        await fill(store, n_users, per_user, deadline)
    finally:
        await store.close()
    partial_path.rename(path)


def batches(text: Text, user: str, per_user: int) -> Iterator[list[NewMemory]]:
    pending: list[NewMemory] = []
    for day in range(per_user // SESSION):
        pending += text.conversation(user, f"conversation-{day}", day)
        if len(pending) >= BATCH:
            yield pending
            pending = []
    if pending:
        yield pending


def remove(path: Path) -> None:
    for suffix in ("", "-wal", "-shm"):
        path.with_name(path.name + suffix).unlink(missing_ok=True)


# -- measuring ----------------------------------------------------------------------------------

def questions(rng: random.Random, texts: list[str], count: int) -> list[tuple[str, str]]:
    """Questions made of 2 to 6 words of one of the user's memories and a common word,
    each with the memory it came from."""
    asked = []
    for text in rng.sample(texts, count):
        words = [w for w in text.lower().rstrip(".").split() if w not in STOPWORDS]
        picked = rng.sample(words, min(len(words), rng.randint(2, 6)))
        asked.append((f"What did I say about {' '.join(picked)} and the {rng.choice(COMMON)}?",
                      text))
    return asked


async def time_recalls(store: MemoryStore, user: str, asked: list[tuple[str, str]],
                       budget: int) -> tuple[list[float], float]:
    """Each recall's time in ms, and the share of blocks holding the memory asked about."""
    took, found = [], 0
    for question, source in asked:
        started = time.perf_counter()
        recalled = await store.recall(user, question, max_tokens=budget,
                                      exclude_conversation=None)
        took.append((time.perf_counter() - started) * 1000)
        found += source in recalled.block
    return took, found / len(asked)


def latency(label: str, took: list[float], found: float) -> float:
    p95 = percentile(took, 95)
    print(f"{label}: p50 {percentile(took, 50):.1f} ms, p95 {p95:.1f} ms, "
          f"max {max(took):.1f} ms (n={len(took)}; the memory asked about in "
          f"{found:.0%} of blocks)", flush=True)
    return p95


async def time_writes(store: MemoryStore, text: Text, user: str, count: int,
                      per_call: int) -> float:
    memories = [m for day in range(count // SESSION + 1)
                for m in text.conversation(user, f"written-{per_call}-{day}", 900 + day)][:count]
    started = time.perf_counter()
    for start in range(0, count, per_call):
        await store.add(memories[start:start + per_call])
    return count / (time.perf_counter() - started)


async def write_while(store: MemoryStore, text: Text, user: str, stop: asyncio.Event) -> int:
    written = 0
    day = 2000
    while not stop.is_set():
        for memory in text.conversation(user, f"concurrent-{day}", day)[:2]:
            written += await store.add([memory])
        day += 1
    return written


async def measure(backend: Backend, args: argparse.Namespace) -> dict[str, float]:
    rng = random.Random(11)
    text = Text(seed=99)
    big = f"user{min(42, args.users - 1)}"
    figures: dict[str, float] = {}

    started = time.perf_counter()
    store = backend.open()
    await store.recall(big, "what about the trip", max_tokens=1500, exclude_conversation=None)
    figures["first_recall_ms"] = (time.perf_counter() - started) * 1000
    print(f"open and first recall: {figures['first_recall_ms']:.0f} ms "
          f"({args.users} {backend.holds})", flush=True)
    try:
        texts = [m.text for m in await store.export(big)]
        asked = questions(rng, texts, args.queries)
        await time_recalls(store, big, asked[:20], 1500)  # warm the caches
        for budget in (1500, 500):
            took, found = await time_recalls(store, big, asked, budget)
            figures[f"recall_p95_ms_{budget}"] = latency(
                f"recall, {len(texts):,} memories, {budget} tokens", took, found)

        stop = asyncio.Event()
        writer = asyncio.create_task(write_while(store, text, "user0", stop))
        took, found = await time_recalls(store, big, asked, 1500)
        stop.set()
        concurrent = await writer
        figures["recall_p95_ms_writing"] = latency(
            f"recall, 1500 tokens, while {concurrent} memories were written", took, found)

        for per_call in (1, 200):
            rate = await time_writes(store, text, big, args.writes, per_call)
            figures[f"writes_per_s_{per_call}"] = rate
            print(f"writes, {per_call} per add(): {rate:,.0f} memories/s "
                  f"({args.writes:,} memories)", flush=True)

        ids = [m.id for m in (await store.recent(big, limit=3))]
        held = {u.user_id: u.memories for u in await store.users()}[big]
        took = []
        for memory_id in ids:
            begun = time.perf_counter()
            await store.delete(big, memory_id)
            took.append((time.perf_counter() - begun) * 1000)
        figures["delete_ms"] = percentile(took, 50)
        print(f"delete one memory of {held:,} ({backend.erasure}): "
              f"{figures['delete_ms']:.0f} ms (median of {len(took)})", flush=True)

        figures["size_mb"] = await store.size_bytes() / 1e6
        print(f"{backend.size}: {figures['size_mb']:,.0f} MB", flush=True)

        victim = next(user for user in users(args.users) if user != big)
        begun = time.perf_counter()
        erased = await store.delete_user(victim)
        figures["delete_user_ms"] = (time.perf_counter() - begun) * 1000
        print(f"delete a user of {erased:,} memories: {figures['delete_user_ms']:.0f} ms",
              flush=True)
    finally:
        await store.close()
    return figures


async def many_users(folder: Path, count: int) -> None:
    path = folder / f"memory-{count}-users.db"
    remove(path)
    store = SqliteMemoryStore(path)
    await store.add([NewMemory(f"user{u}", "c", "user", f"a first message from user {u}",
                               START, "bench", "bench/1", "bench-model") for u in range(count)])
    await store.close()
    store = SqliteMemoryStore(path)
    try:
        started = time.perf_counter()
        await store.recall("user1", "first message", max_tokens=500, exclude_conversation=None)
        opened = (time.perf_counter() - started) * 1000
        await store.add([NewMemory("newcomer", "c", "user", "hello", START, "bench", "", "")])
        started = time.perf_counter()
        await store.recall("user1", "first message", max_tokens=500, exclude_conversation=None)
        after = (time.perf_counter() - started) * 1000
    finally:
        await store.close()
        size = path.stat().st_size / 1e6
        remove(path)
    print(f"{count:,} users of one memory: open and first recall {opened:.0f} ms, first "
          f"recall after a new user {after:.0f} ms, file {size:.0f} MB", flush=True)


def verdict(backend: Backend, figures: dict[str, float]) -> None:
    p95 = figures["recall_p95_ms_1500"]
    writes = figures["writes_per_s_1"]
    target = backend.target_p95_ms
    print(f"\n{backend.name}: recall p95 {p95:.1f} ms (target at most {target:.0f} ms): "
          f"{'met' if p95 <= target else 'MISSED'}")
    if backend.name == "SQLite":
        print(f"writes {writes:,.0f}/s one per call (target at least {TARGET_WRITES:.0f}/s): "
              f"{'met' if writes >= TARGET_WRITES else 'MISSED'}")
    else:  # the write target is the embedded store's; none was set for a database server
        print(f"writes {writes:,.0f}/s one per call, {figures['writes_per_s_200']:,.0f}/s in "
              "batches of 200 (what the write queue hands over)")


async def run_sqlite(args: argparse.Namespace) -> None:
    deadline = time.monotonic() + args.max_minutes * 60
    cache = args.cache or Path(f"/tmp/memproxy-bench/memory-{args.users}x{args.per_user}.db")
    cache.parent.mkdir(parents=True, exist_ok=True)
    if args.rebuild:
        remove(cache)
    if not cache.exists():
        print(f"building {cache} ({args.users * args.per_user:,} memories, once)", flush=True)
        await build(cache, args.users, args.per_user, deadline)
    print(f"file {cache}: {cache.stat().st_size / 1e6:,.0f} MB", flush=True)
    work = cache.with_name(cache.stem + "-work.db")
    remove(work)
    shutil.copyfile(cache, work)
    backend = sqlite_backend(work)
    try:
        figures = await measure(backend, args)
    finally:
        remove(work)
    if args.many_users:
        await many_users(cache.parent, args.many_users)
    verdict(backend, figures)


async def run_postgres(args: argparse.Namespace, server_dsn: str) -> None:
    deadline = time.monotonic() + args.max_minutes * 60
    print(await postgres_settings(server_dsn), flush=True)
    name, dsn = await create_database(server_dsn, "speed")
    try:
        backend = postgres_backend(dsn)
        store = backend.open()
        print(f"building database {name} ({args.users * args.per_user:,} memories; it is "
              "dropped at the end)", flush=True)
        started = time.monotonic()
        try:
            await fill(store, args.users, args.per_user, deadline)
        finally:
            await store.close()
        built = time.monotonic() - started
        begun = time.monotonic()
        await postgres_execute(dsn, "VACUUM ANALYZE")
        print(f"built in {built:.0f} s ({args.users * args.per_user / built:,.0f} memories/s);"
              f" VACUUM ANALYZE {time.monotonic() - begun:.0f} s", flush=True)
        figures = await measure(backend, args)
    finally:
        await drop_database(server_dsn, name)
    if args.many_users:
        print("many users: skipped for PostgreSQL (every user is in one table)")
    verdict(backend, figures)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.memory_speed",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", choices=("sqlite", "postgres"), default="sqlite",
                        help="the store to measure (default sqlite)")
    parser.add_argument("--dsn", default=None,
                        help="postgres: a server to create the benchmark's database on (libpq "
                             "string or postgresql:// URL); default: a throwaway server")
    parser.add_argument("--users", type=int, default=100)
    parser.add_argument("--per-user", type=int, default=10_000)
    parser.add_argument("--queries", type=int, default=300)
    parser.add_argument("--writes", type=int, default=3000)
    parser.add_argument("--cache", type=Path, default=None,
                        help="sqlite: the built file (default /tmp/memproxy-bench/memory-UxN.db)")
    parser.add_argument("--rebuild", action="store_true", help="sqlite: build the file again")
    parser.add_argument("--many-users", type=int, default=1000,
                        help="sqlite: users in the schema-size measurement (0: skip it)")
    parser.add_argument("--max-minutes", type=float, default=30)
    args = parser.parse_args(argv)
    if args.dsn is not None and args.backend != "postgres":
        parser.error("--dsn goes with --backend postgres")
    try:
        with time_limit(args.max_minutes):
            if args.backend == "sqlite":
                asyncio.run(run_sqlite(args))
            else:
                with postgres_server(args.dsn) as server_dsn:
                    asyncio.run(run_postgres(args, server_dsn))
    except BenchAborted as exc:
        print(f"stopped: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("stopped by Ctrl-C", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
