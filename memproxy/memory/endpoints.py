"""Seeing and erasing memory: the admin API, and the functions the command line shares with it.

- ``GET /memory-routing/memory``: users with their number of memories and last write;
- ``GET /memory-routing/memory/{user_id}?q=TEXT&limit=N``: a user's memories, newest
  first, or the best matches for ``q``;
- ``GET /memory-routing/memory/{user_id}/export``: everything kept for the user, as JSON Lines;
- ``DELETE /memory-routing/memory/{user_id}/{id}`` and ``DELETE /memory-routing/memory/{user_id}``:
  ``{"deleted": N}``; once answered, the text is gone from recall, every index and the file.

They answer only the operator (the rule of :mod:`memproxy.admin`).
"""

from __future__ import annotations

import json
import re
from collections.abc import Awaitable, Callable
from typing import Any

import structlog
from aiohttp import web

from memproxy.errors import Dialect, error_response
from memproxy.identifiers import check_id
from memproxy.logs import iso_time
from memproxy.memory.store import Memory, MemoryStore

log = structlog.get_logger("memproxy.memory")

DEFAULT_LIMIT = 50
MAX_LIMIT = 1000
_DIGITS = re.compile(r"[0-9]{1,18}")


def memory_json(memory: Memory) -> dict[str, Any]:
    """One memory as the API and the command line show it."""
    return {"id": memory.id, "text": memory.text, "created_at": iso_time(memory.created_at),
            "conversation_id": memory.conversation_id, "role": memory.role,
            "client": memory.client, "user_agent": memory.user_agent, "model": memory.model}


async def list_users(store: MemoryStore) -> list[dict[str, Any]]:
    return [{"user_id": u.user_id, "memories": u.memories, "last_write": iso_time(u.last_write)}
            for u in await store.users()]


async def list_memories(store: MemoryStore, user_id: str, *, query: str | None,
                        limit: int) -> list[dict[str, Any]]:
    found = (await store.search(user_id, query, limit=limit) if query
             else await store.recent(user_id, limit=limit))
    return [memory_json(m) for m in found]


class BadRequest(Exception):
    """A request to the admin API memproxy cannot answer as asked; 400 with this message."""


def parse_user(value: str) -> str:
    problem = check_id(value)
    if problem:
        raise BadRequest(f"{value[:40]!r} is not a memory user id: {problem}")
    return value


def parse_limit(value: str | None) -> int:
    if value is None:
        return DEFAULT_LIMIT
    if not _DIGITS.fullmatch(value):
        raise BadRequest(f"limit must be a whole number from 1 to {MAX_LIMIT}")
    return max(1, min(int(value), MAX_LIMIT))


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def memory_routes(store_of: Callable[[web.Request], MemoryStore | None],
                  why_none: Callable[[web.Request], str],
                  erased: Callable[[str], None] = lambda user_id: None,
                  ) -> list[tuple[str, str, Handler]]:
    """The admin API's routes as ``(method, path, handler)``, for :func:`memproxy.app.create_app`.

    ``store_of`` gives the running store, or ``None`` when memproxy keeps no memory
    (then every route answers 404 with ``why_none``); ``erased`` is told whose memories
    were erased.
    """

    def guarded(handler: Callable[[web.Request, MemoryStore], Awaitable[web.StreamResponse]]
                ) -> Handler:
        async def answer(request: web.Request) -> web.StreamResponse:
            store = store_of(request)
            if store is None:
                return error_response(Dialect.OPENAI, 404, why_none(request), "memory_off")
            try:
                return await handler(request, store)
            except BadRequest as exc:
                return error_response(Dialect.OPENAI, 400, str(exc), "invalid_request")
            except Exception as exc:  # the memory file is locked, corrupt, gone...
                log.error("memory_admin_failed", path=request.path,
                          error=f"{type(exc).__name__}: {exc}")
                return error_response(Dialect.OPENAI, 503, f"the memory store failed: "
                                      f"{type(exc).__name__}: {exc}", "memory_unavailable")
        return answer

    async def users(request: web.Request, store: MemoryStore) -> web.StreamResponse:
        return web.json_response({"users": await list_users(store)})

    async def memories(request: web.Request, store: MemoryStore) -> web.StreamResponse:
        user_id = parse_user(request.match_info["user_id"])
        found = await list_memories(store, user_id, query=request.query.get("q") or None,
                                    limit=parse_limit(request.query.get("limit")))
        return web.json_response({"user_id": user_id, "memories": found})

    async def export(request: web.Request, store: MemoryStore) -> web.StreamResponse:
        user_id = parse_user(request.match_info["user_id"])
        lines = [json.dumps(memory_json(m), ensure_ascii=False) + "\n"
                 for m in await store.export(user_id)]
        return web.Response(body="".join(lines).encode(), content_type="application/x-ndjson",
                            headers={"Content-Disposition":
                                     f'attachment; filename="memproxy-{user_id}.jsonl"'})

    async def delete_one(request: web.Request, store: MemoryStore) -> web.StreamResponse:
        user_id = parse_user(request.match_info["user_id"])
        memory_id = request.match_info["memory_id"]
        if not _DIGITS.fullmatch(memory_id):
            raise BadRequest("a memory id is a whole number, as listed by GET")
        erased(user_id)
        return web.json_response({"deleted": await store.delete(user_id, int(memory_id))})

    async def delete_all(request: web.Request, store: MemoryStore) -> web.StreamResponse:
        user_id = parse_user(request.match_info["user_id"])
        erased(user_id)
        return web.json_response({"deleted": await store.delete_user(user_id)})

    base = "/memory-routing/memory"
    return [
        ("GET", base, guarded(users)),
        ("GET", base + "/{user_id}", guarded(memories)),
        ("GET", base + "/{user_id}/export", guarded(export)),
        ("DELETE", base + "/{user_id}/{memory_id}", guarded(delete_one)),
        ("DELETE", base + "/{user_id}", guarded(delete_all)),
    ]
