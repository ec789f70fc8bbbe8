"""``create_app(settings)``: the one factory the command line and the tests both use."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Sequence

import aiohttp
import structlog
from aiohttp import web

from memproxy.activity import ActivityWindow
from memproxy.admin import admin_only
from memproxy.config import Settings
from memproxy.detection import DetectorChain, build_detector_chain
from memproxy.endpoints import (
    ACTIVITY,
    DEMO_PROVIDER,
    FORWARDER,
    INBOX,
    KEY_PROBLEMS,
    MEMORY,
    METRICS,
    RELOAD,
    STARTED,
    SUPERVISOR,
    TEAM_VIEW,
    health_handler,
    info_handler,
    metrics_handler,
    reload_handler,
    status_json_handler,
    status_page_handler,
    unmatched_handler,
)
from memproxy.forwarding import CLIENT_SESSION, SMALL_BODY, Forwarder
from memproxy.inbox import UnmatchedInbox
from memproxy.key_problems import KeyProblems
from memproxy.logs import RequestLog
from memproxy.memory.backends import memory_store, where
from memproxy.memory.endpoints import memory_routes
from memproxy.memory.stage import MemoryStage
from memproxy.metrics import Metrics, UserIdLabels
from memproxy.reload import reload_config
from memproxy.supervisor import (
    DemoProviderSupervisor,
    LiteLLMSupervisor,
    supervised,
)
from memproxy.team_view import TeamView

log = structlog.get_logger("memproxy")

# How long start-up waits for the memory store (a database server may be down).
OPEN_TIMEOUT = 3.0
# Large enough for any header a real client sends; LiteLLM's own limit is similar.
MAX_LINE_SIZE = 16 * 1024
MAX_FIELD_SIZE = 64 * 1024
# The client session never adds headers of its own: what LiteLLM sees is what the client sent.
SKIP_AUTO_HEADERS = ("User-Agent", "Accept", "Accept-Encoding", "Content-Type")


def create_app(
    settings: Settings,
    *,
    chain: DetectorChain | None = None,
    extra_plugins: Sequence[object] = (),
    supervisor: LiteLLMSupervisor | None = None,
    metrics: Metrics | None = None,
    demo_provider: DemoProviderSupervisor | None = None,
) -> web.Application:
    """The memproxy application for ``settings``.

    The detector chain is built here unless given; ``extra_plugins`` are
    registered beside the built-ins and installed plugins. With a
    ``supervisor``, LiteLLM is started before memproxy accepts requests and
    stopped after the last one has finished; pass the ``metrics`` its restarts
    are counted in. A ``demo_provider`` is started before LiteLLM and stopped after it.
    """
    if chain is None:
        chain = build_detector_chain(settings, extra_plugins=extra_plugins)
    metrics = metrics if metrics is not None else Metrics(UserIdLabels())
    inbox = UnmatchedInbox()
    activity = ActivityWindow(metrics.user_ids)
    # The order they run in: the log line first, so it is written even if another fails.
    key_problems = KeyProblems()
    store = memory_store(settings)
    # With a store every process shares, the page shows what all of them saw.
    team = TeamView(store, metrics.user_ids) if store is not None else None
    observers = (RequestLog(), metrics, inbox, activity, key_problems,
                 *((team,) if team is not None else ()))
    memory = None if store is None else MemoryStage(settings.memory, store, metrics,
                                                    place=where(settings))
    forwarder = Forwarder(settings, chain, observers=observers,
                          open_streams=metrics.streams_open,
                          unavailable=supervisor.unavailable if supervisor else None,
                          memory=memory)
    # memproxy.max_body_size is the Forwarder's to enforce (it follows a reload); the
    # Forwarder reads bodies piece by piece, so aiohttp's own limit only bounds the
    # endpoints memproxy answers itself. The handler arguments reach every server the
    # app runs in, the tests' included.
    app = web.Application(client_max_size=SMALL_BODY,
                          handler_args={"max_line_size": MAX_LINE_SIZE,
                                        "max_field_size": MAX_FIELD_SIZE,
                                        "keepalive_timeout": settings.timeouts.keepalive})
    app[FORWARDER] = forwarder
    app[METRICS] = metrics
    app[INBOX] = inbox
    app[ACTIVITY] = activity
    app[KEY_PROBLEMS] = key_problems
    app[STARTED] = time.monotonic()
    app[RELOAD] = lambda: reload_config(forwarder, extra_plugins)
    app.cleanup_ctx.append(_client_session(settings))
    if team is not None:
        app[TEAM_VIEW] = team
    if memory is not None:
        app[MEMORY] = memory
        app.cleanup_ctx.append(_memory(memory, "the memory file" if settings.memory.backend
                                       == "local" else "the memory database"))
    if demo_provider is not None:
        app[DEMO_PROVIDER] = demo_provider
        app.cleanup_ctx.append(supervised(demo_provider))
    if supervisor is not None:
        app[SUPERVISOR] = supervisor
        app.cleanup_ctx.append(supervised(supervisor))

    def settings_of(request: web.Request) -> Settings:
        return request.app[FORWARDER].settings

    app.router.add_get("/memory-routing/info", info_handler)
    app.router.add_get("/memory-routing/unmatched", admin_only(unmatched_handler, settings_of))
    app.router.add_post("/memory-routing/reload", admin_only(reload_handler, settings_of))
    app.router.add_get("/memory-routing/status", admin_only(status_json_handler, settings_of))
    app.router.add_get("/memory-routing/", status_page_handler)
    app.router.add_get("/health", health_handler)
    app.router.add_get("/metrics", admin_only(
        metrics_handler, settings_of, open_to_anyone=lambda admin: admin.metrics == "anyone"))
    for method, path, handler in memory_routes(
            lambda request: memory.store if memory is not None else None,
            lambda request: "memproxy keeps no memory itself (memproxy.memory.backend is "
                            f"{settings.memory.backend}); set it to local or postgres",
            erased=memory.forget if memory is not None else lambda user_id: None):
        app.router.add_route(method, path, admin_only(handler, settings_of))
    app.router.add_route("*", "/{tail:.*}", forwarder.handle, expect_handler=forwarder.expect)
    return app


def _memory(memory: MemoryStage,
            what: str) -> Callable[[web.Application], AsyncIterator[None]]:
    """The memory store and its writer, open for the application's whole life."""

    async def memory_ctx(app: web.Application) -> AsyncIterator[None]:
        try:
            # A database that is down must not hold up the start: memproxy serves without
            # memory, and the store connects by itself once the server answers.
            await asyncio.wait_for(memory.store.open(), OPEN_TIMEOUT)
        except Exception as exc:  # memproxy serves on without memory; /health says why
            memory.degraded = f"cannot open {what}: {type(exc).__name__}: {exc}".rstrip(": ")
            log.error("memory_unavailable", error=memory.degraded)
        async with memory.running():
            team = app.get(TEAM_VIEW)
            if team is None:
                yield
            else:
                async with team.running():
                    yield

    return memory_ctx


def _client_session(settings: Settings) -> Callable[[web.Application], AsyncIterator[None]]:
    """The one upstream ClientSession, open for the application's whole life."""

    async def session_ctx(app: web.Application) -> AsyncIterator[None]:
        timeouts = settings.timeouts
        connector = aiohttp.TCPConnector(limit=0, ttl_dns_cache=300)
        async with aiohttp.ClientSession(
            connector=connector,
            timeout=aiohttp.ClientTimeout(
                total=timeouts.total, sock_connect=timeouts.connect,
                sock_read=timeouts.between_chunks,
            ),
            auto_decompress=False,
            skip_auto_headers=SKIP_AUTO_HEADERS,
            cookie_jar=aiohttp.DummyCookieJar(),
        ) as session:
            app[CLIENT_SESSION] = session
            yield

    return session_ctx
