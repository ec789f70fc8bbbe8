"""What memproxy answers itself instead of forwarding."""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Callable
from importlib import resources
from typing import Any

import aiohttp
from aiohttp import web

from memproxy import __version__
from memproxy.activity import ActivityWindow
from memproxy.errors import dialect_of, error_response
from memproxy.forwarding import CLIENT_SESSION, Forwarder
from memproxy.inbox import UnmatchedInbox
from memproxy.key_problems import KeyProblems
from memproxy.logs import iso_time
from memproxy.memory.endpoints import list_users
from memproxy.memory.stage import MemoryStage
from memproxy.metrics import Metrics
from memproxy.reload import ReloadResult
from memproxy.routing import Refusal, client_request
from memproxy.supervisor import LIVELINESS_PATH, DemoProviderSupervisor, LiteLLMSupervisor
from memproxy.team_view import TeamView
from memproxy.workers import WORKER_ENV

HEALTH_TIMEOUT = 2.0


def routing_info(forwarder: Forwarder, request: web.Request) -> dict[str, object]:
    """Where the caller's own request would land: the seed's debug document, extended."""
    policy = forwarder.policy
    _, client = client_request(request.headers, path=request.path,
                               query_string=request.query_string, remote=request.remote)
    return {**policy.describe(policy.route(client), client), "litellm_url": forwarder.upstream}


async def info_handler(request: web.Request) -> web.Response:
    forwarder = request.app[FORWARDER]
    try:
        return web.json_response(routing_info(forwarder, request))
    except Refusal as exc:
        return error_response(dialect_of(request.path, request.headers), exc.status, str(exc),
                              exc.code)


async def litellm_alive(app: web.Application) -> tuple[bool, str]:
    """Ask LiteLLM's unauthenticated liveliness probe; ``(ok, detail)``."""
    try:
        async with app[CLIENT_SESSION].get(
            app[FORWARDER].upstream + LIVELINESS_PATH,
            timeout=aiohttp.ClientTimeout(total=HEALTH_TIMEOUT),
        ) as response:
            await response.read()
            if response.status == 200:
                return True, "ok"
            return False, f"{LIVELINESS_PATH} answered {response.status}"
    except (TimeoutError, aiohttp.ClientError) as exc:
        return False, f"unreachable ({type(exc).__name__})"


async def health(app: web.Application) -> tuple[bool, dict[str, object]]:
    """memproxy's state and LiteLLM's, as ``/health`` and the status page show them."""
    forwarder = app[FORWARDER]
    supervisor = app.get(SUPERVISOR)
    litellm: dict[str, object] = {"url": forwarder.upstream}
    if supervisor is not None and not supervisor.ready:
        # Why, from the supervisor: "crash-looping: address already in use", say.
        ok, detail = False, supervisor.detail
    else:
        ok, detail = await litellm_alive(app)
    if supervisor is not None:
        litellm.update(supervised=True, pid=supervisor.pid, restarts=supervisor.restarts,
                       failures=supervisor.failures)
    litellm.update(status="ok" if ok else "unavailable", detail=detail)
    body: dict[str, object] = {
        "memproxy": {"status": "ok", "version": __version__,
                     "uptime_s": round(time.monotonic() - app[STARTED], 1)},
        "litellm": litellm,
    }
    demo = app.get(DEMO_PROVIDER)
    if demo is not None:
        # The demo models' provider: while it is down, they fail as a real provider would.
        body["demo_provider"] = {"status": "ok" if demo.ready else "unavailable",
                                 "detail": demo.detail, "url": demo.url, "pid": demo.pid,
                                 "restarts": demo.restarts}
        ok = ok and demo.ready
    body = {"status": "ok" if ok else "degraded", **body}
    memory = app.get(MEMORY)
    if memory is not None:
        # Memory failing never fails a request (they go on without it), so it does not
        # make memproxy unhealthy for a load balancer; it is reported here for operators.
        body["memory"] = ({"status": "degraded", "detail": memory.degraded}
                          if memory.degraded else {"status": "ok"})
    return ok, body


async def health_handler(request: web.Request) -> web.Response:
    ok, body = await health(request.app)
    return web.json_response(body, status=200 if ok else 503)


async def metrics_handler(request: web.Request) -> web.Response:
    body, content_type = request.app[METRICS].render()
    response = web.Response(body=body)
    response.headers["Content-Type"] = content_type
    return response


async def unmatched_clients(app: web.Application, limit: int) -> list[dict[str, Any]]:
    """The unrecognised clients of every process sharing the store, else of this one."""
    team = app.get(TEAM_VIEW)
    if team is not None:
        with contextlib.suppress(Exception):  # the store is down: this process's own
            return await team.clients(limit)
    return app[INBOX].top(limit)


async def requests_last_hour(app: web.Application) -> dict[str, dict[str, int]]:
    """Requests per memory space in the last hour, of every process sharing the store."""
    team = app.get(TEAM_VIEW)
    if team is not None:
        with contextlib.suppress(Exception):
            return await team.totals()
    return app[ACTIVITY].totals()


async def unmatched_handler(request: web.Request) -> web.Response:
    text = request.query.get("limit", "50")
    # ASCII digits only: isdigit() alone also accepts '²' and '①', which int() refuses.
    if not (text.isascii() and text.isdigit()):
        return error_response(dialect_of(request.path, request.headers), 400,
                              "limit must be a whole number from 1 to 200", "invalid_limit")
    # Clamped to the inbox's capacity; a long number by its length, before int() reads it.
    digits = text.lstrip("0")
    limit = 200 if len(digits) > 3 else min(max(int(digits or "0"), 1), 200)
    return web.json_response({
        "unmatched": await unmatched_clients(request.app, limit),
        "how_to_use": "paste suggested_yaml under user_id_mappings.header_patterns, test it "
                      "with 'memproxy explain --rule ...', then reload",
    })


async def reload_handler(request: web.Request) -> web.Response:
    if WORKER_ENV in os.environ:
        # One of several workers: the parent passes SIGHUP on to every worker.
        os.kill(os.getppid(), signal.SIGHUP)
        return web.json_response({"reloaded": "requested for all workers"}, status=202)
    result = request.app[RELOAD]()
    body = {"reloaded": result.ok, "message": result.message,
            "detector_chain": result.detector_chain}
    return web.json_response(body, status=200 if result.ok else 400)


async def status_json_handler(request: web.Request) -> web.Response:
    forwarder = request.app[FORWARDER]
    _, state = await health(request.app)
    state.update(
        detector_chain=forwarder.policy.chain.describe(),
        default_user_id=forwarder.settings.mappings.default_user_id,
        unidentified=forwarder.policy.unidentified,
        explicit_id_trust=forwarder.policy.trust.trust,
        requests_last_hour=await requests_last_hour(request.app),
        unmatched=await unmatched_clients(request.app, 20),
        shared_view=_shared_view(request.app),
        memory=await memory_status(request.app),
        key_problems=request.app[KEY_PROBLEMS].listed(),
        worker=os.environ.get(WORKER_ENV),
    )
    return web.json_response(state)


def _shared_view(app: web.Application) -> str:
    """Whose requests the page counts: every process sharing the store, or this one."""
    team = app.get(TEAM_VIEW)
    if team is None:
        return "this process only (memproxy keeps no memory store to share)"
    if team.unavailable is not None:
        return f"this process only: the memory store is unavailable ({team.unavailable})"
    return "every memproxy process sharing the memory store"


async def memory_status(app: web.Application) -> dict[str, object] | None:
    """What the status page shows of memory: the file, the spaces, the last recalls."""
    memory = app.get(MEMORY)
    if memory is None:
        return None
    try:
        users = (await list_users(memory.store))[:50]
    except Exception as exc:  # the page must still show, and say why memory is missing
        users = []
        memory.degraded = memory.degraded or f"cannot read memory: {type(exc).__name__}"
    return {
        "file": memory.place,
        "status": "degraded" if memory.degraded else "ok",
        "detail": memory.degraded,
        "users": users,
        "recent_recalls": [{"at": iso_time(at), "user_id": user, "memories": count, "ms": ms}
                           for at, user, count, ms in reversed(memory.recent)],
    }


STATUS_PAGE = resources.files("memproxy").joinpath("status_page.html")


async def status_page_handler(request: web.Request) -> web.Response:
    return web.Response(body=STATUS_PAGE.read_bytes(), content_type="text/html",
                        charset="utf-8", headers={"Cache-Control": "no-store"})


FORWARDER = web.AppKey("forwarder", Forwarder)
METRICS = web.AppKey("metrics", Metrics)
INBOX = web.AppKey("inbox", UnmatchedInbox)
ACTIVITY = web.AppKey("activity", ActivityWindow)
TEAM_VIEW = web.AppKey("team_view", TeamView)
MEMORY = web.AppKey("memory", MemoryStage)
KEY_PROBLEMS = web.AppKey("key_problems", KeyProblems)
SUPERVISOR = web.AppKey("supervisor", LiteLLMSupervisor)
DEMO_PROVIDER = web.AppKey("demo_provider", DemoProviderSupervisor)
RELOAD: web.AppKey[Callable[[], ReloadResult]] = web.AppKey("reload")
STARTED = web.AppKey("started", float)
