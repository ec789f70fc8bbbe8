"""Serve an application until SIGINT or SIGTERM, then shut down gracefully.

SIGHUP, when an ``on_hangup`` callback is given, reloads the config instead.
After the shutdown these signals are ignored: the process is on its way out.

On a signal memproxy stops accepting connections at once, lets requests and
streams in flight finish for up to ``grace`` seconds, then runs the
application's cleanup (closing the upstream session and stopping LiteLLM).
"""

from __future__ import annotations

import asyncio
import gc
import signal
from collections.abc import Callable

import structlog
from aiohttp import web

from memproxy.server import HeadLimits, LimitedAppRunner

log = structlog.get_logger("memproxy")

#: The signals memproxy handles; once it has shut down, they are ignored.
STOP_SIGNALS = frozenset({signal.SIGINT, signal.SIGTERM, signal.SIGHUP})


def make_runner(
    app: web.Application, *, grace: float, request_head: float, max_header_size: int
) -> web.AppRunner:
    """The runner memproxy serves ``app`` with.

    Each request head must arrive within ``request_head`` seconds and fit in
    ``max_header_size`` bytes (see :mod:`memproxy.server`); the keep-alive
    time comes with ``app`` itself.
    """
    return LimitedAppRunner(app, limits=HeadLimits(request_head, max_header_size),
                            handler_cancellation=True, access_log=None,
                            shutdown_timeout=grace)


async def serve_until_signalled(
    app: web.Application,
    host: str,
    port: int,
    *,
    grace: float,
    request_head: float,
    max_header_size: int,
    on_ready: Callable[[], None] | None = None,
    reuse_port: bool = False,
    on_hangup: Callable[[], object] | None = None,
) -> None:
    """Run ``app`` on ``host:port``; return after a signal and a graceful shutdown."""
    runner = make_runner(app, grace=grace, request_head=request_head,
                         max_header_size=max_header_size)
    stop = asyncio.Event()

    def on_signal() -> None:
        if stop.is_set():
            log.info("memproxy_already_stopping", grace_s=grace)
        stop.set()

    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, on_signal)
    if on_hangup is not None:
        loop.add_signal_handler(signal.SIGHUP, on_hangup)
    try:
        await runner.setup()  # starts LiteLLM first when memproxy supervises it
        # Everything built so far (modules, config, detectors) lives as long as the
        # process. Frozen, the collector stops walking it on every full collection,
        # which otherwise pauses the loop for ~15 ms: long enough to hold back events.
        gc.collect()
        gc.freeze()
        site = web.TCPSite(runner, host, port, reuse_address=True, reuse_port=reuse_port or None)
        await site.start()
        log.info("memproxy_listening", url=f"http://{host}:{port}")
        if on_ready is not None:
            on_ready()
        await stop.wait()
        log.info("memproxy_stopping", grace_s=grace)
    finally:
        # Signal handlers stay installed until the end: a second signal must not cut
        # the graceful shutdown short (the grace period already bounds it).
        try:
            await runner.cleanup()
        finally:
            # From here the process only exits. A late signal (a supervisor repeating
            # itself) is ignored, never left to its default action, which would turn a
            # clean exit into a death by signal. See also memproxy.__main__._run.
            for signum in STOP_SIGNALS:
                loop.add_signal_handler(signum, _ignore)


def _ignore() -> None:
    pass
