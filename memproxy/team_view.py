"""One view of every process: the unrecognised clients and the activity all of them saw.

Each memproxy process (every ``--workers`` worker, every replica behind a load
balancer) counts what it handles in its own :class:`~memproxy.inbox.UnmatchedInbox`
and :class:`~memproxy.activity.ActivityWindow`. When memproxy keeps memory itself,
the memory store is something all of them share (the SQLite file on one machine, the
PostgreSQL database for a team), so each process also adds its counts there, once a
second, and the status page and ``/memory-routing/unmatched`` read the sum. A process
that cannot reach the store keeps its counts and adds them when it can again (up to
:data:`MAX_PENDING` clients), and the page falls back to what the process saw itself.

``/metrics`` stays per process, as Prometheus expects: it adds the processes up itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import structlog

from memproxy.activity import WINDOW_MINUTES, by_label
from memproxy.inbox import describe_clients, fingerprint_of, talks_to_a_model
from memproxy.memory.store import MemoryStore, SeenClient
from memproxy.metrics import UserIdLabels
from memproxy.observers import RequestRecord

log = structlog.get_logger("memproxy")

#: Seconds between two reports of a process's counts.
REPORT_INTERVAL = 1.0
#: Distinct clients a process keeps while the store cannot be reached; more are not counted.
MAX_PENDING = 1000


class TeamView:
    """A request observer that adds this process's counts to the shared store."""

    def __init__(self, store: MemoryStore, labels: UserIdLabels) -> None:
        self.store = store
        self.labels = labels
        self._clients: dict[tuple[tuple[str, str], ...], list[float]] = {}
        self._activity: Counter[tuple[int, str, bool]] = Counter()
        self._reporting = asyncio.Lock()
        #: Why the shared view is not available right now (``None``: it is).
        self.unavailable: str | None = None

    def request_done(self, record: RequestRecord) -> None:
        if record.unrecognised and talks_to_a_model(record.method, record.path):
            key = fingerprint_of(record.headers)
            now = time.time()
            seen = self._clients.get(key)
            if seen is not None:
                seen[0] += 1
                seen[2] = now
            elif len(self._clients) < MAX_PENDING:
                self._clients[key] = [1, now, now]
        if record.detector is not None:
            self._activity[int(time.time() // 60), self.labels.label(record),
                           record.succeeded] += 1

    async def report(self) -> None:
        """Add what this process counted since its last report to the store."""
        async with self._reporting:
            clients, self._clients = self._clients, {}
            activity, self._activity = self._activity, Counter()
            try:
                if clients:
                    await self.store.add_seen_clients(
                        [SeenClient(dict(key), int(n), first, last)
                         for key, (n, first, last) in clients.items()])
                    clients = {}
                if activity:
                    await self.store.add_activity(dict(activity))
            except Exception as exc:
                self._keep(clients, activity)
                if self.unavailable is None:
                    log.warning("team_view_unavailable", error=f"{type(exc).__name__}: {exc}",
                                then="this process's counts wait and are added later")
                self.unavailable = f"{type(exc).__name__}"
                raise
            self.unavailable = None

    def _keep(self, clients: dict[tuple[tuple[str, str], ...], list[float]],
              activity: Counter[tuple[int, str, bool]]) -> None:
        """Put counts that did not reach the store back, for the next report."""
        for key, (n, first, last) in clients.items():
            seen = self._clients.get(key)
            if seen is not None:
                seen[0] += n
                seen[1] = min(seen[1], first)
            elif len(self._clients) < MAX_PENDING:
                self._clients[key] = [n, first, last]
        oldest = int(time.time() // 60) - WINDOW_MINUTES
        self._activity.update({k: n for k, n in activity.items() if k[0] >= oldest})

    async def clients(self, limit: int) -> list[dict[str, Any]]:
        """The unrecognised clients every process saw, as the inbox lists them."""
        with contextlib.suppress(Exception):  # the reading below says why, if it fails
            await self.report()
        seen = await self.store.seen_clients(limit)
        return describe_clients(seen)

    async def totals(self) -> dict[str, dict[str, int]]:
        """Requests per memory space over the last hour, from every process."""
        with contextlib.suppress(Exception):
            await self.report()
        since = int(time.time() // 60) - WINDOW_MINUTES + 1
        return by_label(await self.store.activity(since))

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        """Report once a second for the application's life, and once more at the end."""
        task = asyncio.create_task(self._report_forever())
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.report(), 2)

    async def _report_forever(self) -> None:
        while True:
            await asyncio.sleep(REPORT_INTERVAL)
            with contextlib.suppress(Exception):  # logged by report(); tried again later
                await self.report()
