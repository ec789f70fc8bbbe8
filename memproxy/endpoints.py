"""What memproxy answers itself instead of forwarding."""

from __future__ import annotations

import aiohttp
from aiohttp import web

from memproxy import __version__
from memproxy.errors import dialect_of, error_response
from memproxy.forwarding import Forwarder, Refusal
from memproxy.supervisor import LiteLLMSupervisor

LIVELINESS_PATH = "/health/liveliness"
HEALTH_TIMEOUT = 2.0


def routing_info(forwarder: Forwarder, request: web.Request) -> dict[str, object]:
    """Where the caller's own request would land: the seed's debug document, extended."""
    decision, with_memory = forwarder.identify(request)
    return {
        "user_id": decision.user_id if with_memory else None,
        "detector": decision.detector,
        "reason": decision.reason if with_memory else
        "unrecognised client: memory headers are left out (memproxy.unidentified: no_memory)",
        "detector_chain": forwarder.chain.describe(),
        "injected_headers": forwarder.injected.describe(decision.user_id, request.headers)
        if with_memory else {},
        "explicit_id_trust": forwarder.trust.trust,
        "unidentified": forwarder.unidentified,
        "litellm_url": forwarder.upstream,
    }


async def info_handler(request: web.Request) -> web.Response:
    forwarder = request.app[FORWARDER]
    try:
        return web.json_response(routing_info(forwarder, request))
    except Refusal as exc:
        return error_response(dialect_of(request.path, request.headers), exc.status, str(exc),
                              exc.code)


async def litellm_alive(forwarder: Forwarder) -> tuple[bool, str]:
    """Ask LiteLLM's unauthenticated liveliness probe; ``(ok, detail)``."""
    assert forwarder.session is not None
    try:
        async with forwarder.session.get(
            forwarder.upstream + LIVELINESS_PATH,
            timeout=aiohttp.ClientTimeout(total=HEALTH_TIMEOUT),
        ) as response:
            await response.read()
            if response.status == 200:
                return True, "ok"
            return False, f"{LIVELINESS_PATH} answered {response.status}"
    except (TimeoutError, aiohttp.ClientError) as exc:
        return False, f"unreachable ({type(exc).__name__})"


async def health_handler(request: web.Request) -> web.Response:
    forwarder = request.app[FORWARDER]
    supervisor = request.app.get(SUPERVISOR)
    litellm: dict[str, object] = {"url": forwarder.upstream}
    if supervisor is not None and not supervisor.ready:
        ok, detail = False, "restarting"
    else:
        ok, detail = await litellm_alive(forwarder)
    if supervisor is not None:
        litellm.update(supervised=True, pid=supervisor.pid, restarts=supervisor.restarts)
    litellm.update(status="ok" if ok else "unavailable", detail=detail)
    body = {
        "status": "ok" if ok else "degraded",
        "memproxy": {"status": "ok", "version": __version__},
        "litellm": litellm,
    }
    return web.json_response(body, status=200 if ok else 503)


FORWARDER = web.AppKey("forwarder", Forwarder)
SUPERVISOR = web.AppKey("supervisor", LiteLLMSupervisor)
