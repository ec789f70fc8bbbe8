"""Which store keeps memory: built from the config, or from an address on the command line.

``memproxy.memory.backend: local`` keeps memory in an SQLite file, ``postgres`` in a
PostgreSQL database (the ``[postgres]`` extra: psycopg is imported only then). The
command line names stores as ``sqlite:PATH`` or ``postgres:DSN`` (``memory copy``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from memproxy.config import ConfigError, Settings
from memproxy.memory.sqlite import SqliteMemoryStore
from memproxy.memory.store import MemoryStore, NewMemory

#: Memories handed to the target of a copy at once.
COPY_BATCH = 500


def memory_store(settings: Settings) -> MemoryStore | None:
    """The store of ``memproxy.memory``, or ``None`` when memproxy keeps no memory itself."""
    memory = settings.memory
    if memory.backend == "local":
        return SqliteMemoryStore(settings.memory_file)
    if memory.backend == "postgres":
        assert memory.dsn is not None  # the config refuses postgres without a dsn
        from memproxy.memory.postgres import PostgresMemoryStore

        return PostgresMemoryStore(memory.dsn.reveal(), pool_size=memory.pool_size,
                                   migrate=memory.migrate)
    return None


def where(settings: Settings) -> str:
    """Where memory is kept, for people: the file, or the database without its password."""
    memory = settings.memory
    if memory.backend == "local":
        return str(settings.memory_file)
    if memory.backend == "postgres" and memory.dsn is not None:
        from memproxy.memory.postgres import describe_dsn

        return "postgres " + describe_dsn(memory.dsn.reveal())
    return memory.backend


def store_at(address: str, option: str) -> MemoryStore:
    """The store an address names: ``sqlite:PATH`` or ``postgres:DSN``."""
    kind, sep, rest = address.partition(":")
    if sep and kind == "sqlite" and rest:
        return SqliteMemoryStore(rest)
    if sep and kind in ("postgres", "postgresql") and rest:
        try:
            from memproxy.memory.postgres import PostgresMemoryStore
        except ImportError:
            raise ConfigError(option, "postgres needs psycopg, which is not installed",
                              "pip install 'memproxy-llm[postgres]'") from None
        # postgres:postgresql://... and postgres:host=... are both libpq strings.
        return PostgresMemoryStore(address if kind == "postgresql" else rest)
    raise ConfigError(option, "is not a memory store address",
                      "write sqlite:PATH (a memory file) or postgres:DSN (a libpq connection "
                      "string or postgresql:// URL)")


@dataclass(slots=True)
class CopyReport:
    """What a copy did."""

    users: int = 0
    read: int = 0
    #: Memories the target did not have yet (the rest it had: an earlier, interrupted copy).
    written: int = 0


async def copy_memories(source: MemoryStore, target: MemoryStore, *,
                        progress: Callable[[str, int, int], None] | None = None) -> CopyReport:
    """Copy every user's memories from ``source`` into ``target``; safe to run again.

    The target's duplicate check (same user, conversation, role and text) makes a
    copy resumable: after an interruption the same command skips what arrived and
    writes the rest. A long message that the source split into parts is copied part by
    part, each a memory of its own, so the parts keep their text and their order.
    Pinned blocks are not copied: a conversation recalls afresh on the target.
    """
    report = CopyReport()
    for user in await source.users():
        kept = await source.export(user.user_id)
        report.users += 1
        report.read += len(kept)
        for start in range(0, len(kept), COPY_BATCH):
            batch = [NewMemory(user_id=m.user_id, conversation_id=m.conversation_id,
                               role=m.role, text=m.text, created_at=m.created_at,
                               client=m.client, user_agent=m.user_agent, model=m.model)
                     for m in kept[start:start + COPY_BATCH]]
            report.written += await target.add(batch)
        if progress is not None:
            progress(user.user_id, len(kept), report.written)
    return report
