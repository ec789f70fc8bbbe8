"""Who may use memproxy's own endpoints: the status data, the inbox, reload, metrics.

These endpoints show every memory space and other clients' User-Agents, and
reload changes the running config, so they answer only:

- a request with ``Authorization: Bearer <memproxy.admin.token>``, from anywhere; or
- a client whose address is in ``memproxy.admin.networks`` (loopback by default),
  and then only by a name that cannot be a rebound DNS name (``localhost``, an IP
  address, ``memproxy.host`` or one of ``memproxy.admin.hosts``), only same-origin
  when a browser says where it comes from (``Origin``), and, for requests that
  change something, never with a body type a cross-site form can send without
  asking first. A web page the operator happens to have open can then neither read
  these endpoints (DNS rebinding) nor post to them (cross-site requests).
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable
from ipaddress import ip_address
from urllib.parse import urlsplit

from aiohttp import hdrs, web

from memproxy.config import AdminAccess, Settings
from memproxy.errors import Dialect, error_response

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

# The body types a cross-site form or a no-cors fetch may send without a CORS preflight.
CORS_SIMPLE_TYPES = frozenset({"text/plain", "application/x-www-form-urlencoded",
                               "multipart/form-data"})
STATE_CHANGING = frozenset({"POST", "PUT", "PATCH", "DELETE"})


def _is_ip(host: str) -> bool:
    try:
        ip_address(host.strip("[]"))
    except ValueError:
        return False
    return True


def _host_allowed(host: str, settings: Settings) -> bool:
    host = host.lower().rstrip(".")
    return (_is_ip(host) or host == "localhost" or host.endswith(".localhost")
            or host == settings.host.lower() or host in settings.admin.hosts)


def _has_token(request: web.Request, admin: AdminAccess) -> bool:
    if admin.token is None:
        return False
    scheme, _, given = request.headers.get(hdrs.AUTHORIZATION, "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(
        given.strip().encode("utf-8", "surrogateescape"), admin.token.reveal().encode())


def _in_networks(request: web.Request, admin: AdminAccess) -> bool:
    try:
        address = ip_address((request.remote or "").partition("%")[0])
    except ValueError:
        return False
    return any(address in network for network in admin.networks)


def admin_refusal(request: web.Request, settings: Settings) -> str | None:
    """Why ``request`` may not use an admin endpoint, or ``None`` when it may."""
    admin = settings.admin
    if _has_token(request, admin):
        return None
    if not _in_networks(request, admin):
        return ("memproxy's admin endpoints answer only clients in memproxy.admin.networks "
                "(loopback by default) or requests with Authorization: Bearer "
                "<memproxy.admin.token>")
    host_header = request.headers.get(hdrs.HOST)
    host = urlsplit(f"//{host_header}").hostname if host_header else None
    if host_header and (host is None or not _host_allowed(host, settings)):
        return (f"memproxy's admin endpoints do not answer to the host name {host!r}; use "
                "localhost or an IP address, or list the name in memproxy.admin.hosts")
    origin = request.headers.get(hdrs.ORIGIN)
    if origin is not None:
        parts = urlsplit(origin)
        if parts.scheme not in ("http", "https") or parts.netloc.lower() != (
                host_header or "").lower():
            return "memproxy's admin endpoints do not answer requests from other web sites"
    if request.method in STATE_CHANGING and request.content_type in CORS_SIMPLE_TYPES:
        return (f"send this request without a {request.content_type} body (a type web forms "
                "can send from other sites)")
    return None


def admin_only(
    handler: Handler,
    settings_of: Callable[[web.Request], Settings],
    *,
    open_to_anyone: Callable[[AdminAccess], bool] = lambda admin: False,
) -> Handler:
    """``handler``, answering only requests :func:`admin_refusal` lets through."""

    async def guarded(request: web.Request) -> web.StreamResponse:
        settings = settings_of(request)
        if not open_to_anyone(settings.admin):
            why = admin_refusal(request, settings)
            if why is not None:
                return error_response(Dialect.OPENAI, 403, why, "admin_not_allowed")
        return await handler(request)

    return guarded
