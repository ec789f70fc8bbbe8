"""Requests per memory space over the last hour, in one-minute buckets."""

from __future__ import annotations

import time
from collections import Counter, deque

from memproxy.metrics import UserIdLabels
from memproxy.observers import RequestRecord

WINDOW_MINUTES = 60


class ActivityWindow:
    """Counts requests per (bounded) user label for each of the last 60 minutes."""

    def __init__(self, labels: UserIdLabels, minutes: int = WINDOW_MINUTES) -> None:
        self.labels = labels
        self.minutes = minutes
        self._buckets: deque[tuple[int, Counter[str]]] = deque(maxlen=minutes)

    def request_done(self, record: RequestRecord) -> None:
        """Count a request that reached detection under its memory space's label."""
        if record.detector is not None:
            self.record(self.labels.label(record))

    def record(self, label: str, now: float | None = None) -> None:
        minute = int((time.time() if now is None else now) // 60)
        if not self._buckets or self._buckets[-1][0] != minute:
            self._buckets.append((minute, Counter()))
        self._buckets[-1][1][label] += 1

    def totals(self, now: float | None = None) -> dict[str, int]:
        """Requests per label in the window, most first."""
        oldest = int((time.time() if now is None else now) // 60) - self.minutes + 1
        total: Counter[str] = Counter()
        for minute, counts in self._buckets:
            if minute >= oldest:
                total.update(counts)
        return dict(total.most_common())
