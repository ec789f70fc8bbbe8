"""Serve an application until SIGINT or SIGTERM, then shut down gracefully.

SIGHUP, when an ``on_hangup`` callback is given, reloads the config instead.
After the shutdown these signals are ignored: the process is on its way out.

On a signal memproxy stops accepting connections at once, says what it waits
for, lets requests and streams in flight finish for up to ``grace`` seconds (a
second signal: not a moment longer), cuts what is left, then runs the
application's cleanup (closing the upstream session and stopping LiteLLM).
memproxy drains itself rather than through aiohttp's shutdown timeout, which
waits up to twice its value (once for handlers to finish, once after
cancelling them).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import signal
import sys
from collections.abc import Callable
from dataclasses import dataclass

import structlog
from aiohttp import web

from memproxy.server import HeadLimits, LimitedAppRunner

log = structlog.get_logger("memproxy")

#: The signals memproxy handles; once it has shut down, they are ignored.
STOP_SIGNALS = frozenset({signal.SIGINT, signal.SIGTERM, signal.SIGHUP})
#: What aiohttp gives handlers still running once memproxy's own drain is over.
CUT_TIMEOUT = 0.5


@dataclass(frozen=True, slots=True)
class Drain:
    """How a shutdown learns what it waits for: requests in flight, and whom to tell."""

    in_flight: Callable[[], int]
    stopping: Callable[[], None]


def make_runner(
    app: web.Application, *, grace: float, request_head: float, max_header_size: int,
    drain_first: bool = False,
) -> web.AppRunner:
    """The runner memproxy serves ``app`` with.

    Each request head must arrive within ``request_head`` seconds and fit in
    ``max_header_size`` bytes (see :mod:`memproxy.server`); the keep-alive
    time comes with ``app`` itself.
    """
    return LimitedAppRunner(app, limits=HeadLimits(request_head, max_header_size),
                            handler_cancellation=True, access_log=None,
                            shutdown_timeout=CUT_TIMEOUT if drain_first else grace)


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
    drain: Drain | None = None,
) -> None:
    """Run ``app`` on ``host:port``; return after a signal and a graceful shutdown."""
    runner = make_runner(app, grace=grace, request_head=request_head,
                         max_header_size=max_header_size, drain_first=drain is not None)
    stop = asyncio.Event()
    now = asyncio.Event()

    def on_signal() -> None:
        if stop.is_set():
            log.info("memproxy_stopping_now", reason="a second stop signal")
            now.set()
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
        if drain is not None:
            await _drain(runner, drain, grace, now)
        else:
            log.info("memproxy_stopping", grace_s=grace)
    finally:
        try:
            await runner.cleanup()
        finally:
            # From here the process only exits. A late signal (a supervisor repeating
            # itself) is ignored, never left to its default action, which would turn a
            # clean exit into a death by signal. See also memproxy.__main__._run.
            for signum in STOP_SIGNALS:
                loop.add_signal_handler(signum, _ignore)


async def _drain(runner: web.AppRunner, drain: Drain, grace: float,
                 now: asyncio.Event) -> None:
    """Stop accepting, and wait for the requests in flight: ``grace`` seconds at most."""
    drain.stopping()
    for site in list(runner.sites):
        await site.stop()
    waiting = drain.in_flight()
    log.info("memproxy_stopping", waiting_for=waiting, grace_s=grace)
    if not waiting:
        return
    print(f"memproxy: stopping: waiting for {waiting} request{'s' * (waiting != 1)}, "
          f"up to {grace:g} s; press Ctrl-C again to stop now", file=sys.stderr, flush=True)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + grace
    while drain.in_flight() and not now.is_set() and loop.time() < deadline:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(now.wait(), min(0.05, deadline - loop.time()))
    if left := drain.in_flight():
        log.warning("memproxy_cutting_requests", requests=left,
                    reason="a second stop signal" if now.is_set() else
                    f"the grace period ({grace:g} s) is over")


def _ignore() -> None:
    pass
