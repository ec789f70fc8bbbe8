"""Requests per memory space over the last hour, in one-minute buckets, by outcome.

Success and failure are counted apart: a client whose every request fails is
as busy as a healthy one, and the status page must not show it as healthy.
"""

from __future__ import annotations

import time
from collections import Counter, deque
from collections.abc import Mapping

from memproxy.metrics import UserIdLabels
from memproxy.observers import RequestRecord

WINDOW_MINUTES = 60


class ActivityWindow:
    """Counts requests per (bounded) user label and outcome for each of the last 60 minutes."""

    def __init__(self, labels: UserIdLabels, minutes: int = WINDOW_MINUTES) -> None:
        self.labels = labels
        self.minutes = minutes
        #: Per minute: counts keyed by (label, whether LiteLLM answered with a 2xx).
        self._buckets: deque[tuple[int, Counter[tuple[str, bool]]]] = deque(maxlen=minutes)

    def request_done(self, record: RequestRecord) -> None:
        """Count a request that reached detection under its memory space's label."""
        if record.detector is not None:
            self.record(self.labels.label(record), record.succeeded)

    def record(self, label: str, succeeded: bool, now: float | None = None) -> None:
        minute = int((time.time() if now is None else now) // 60)
        if not self._buckets or self._buckets[-1][0] != minute:
            self._buckets.append((minute, Counter()))
        self._buckets[-1][1][label, succeeded] += 1

    def totals(self, now: float | None = None) -> dict[str, dict[str, int]]:
        """Per label in the window, ``{"succeeded": 2xx answers, "failed": all others}``.

        Labels come busiest first (both outcomes together).
        """
        oldest = int((time.time() if now is None else now) // 60) - self.minutes + 1
        total: Counter[tuple[str, bool]] = Counter()
        for minute, counts in self._buckets:
            if minute >= oldest:
                total.update(counts)
        return by_label(total)


def by_label(counts: Mapping[tuple[str, bool], int]) -> dict[str, dict[str, int]]:
    """Counts per ``(label, succeeded)`` as ``{label: {"succeeded": n, "failed": n}}``,
    busiest label first."""
    per_label: dict[str, dict[str, int]] = {}
    for (label, succeeded), count in counts.items():
        outcomes = per_label.setdefault(label, {"succeeded": 0, "failed": 0})
        outcomes["succeeded" if succeeded else "failed"] += count
    return dict(sorted(per_label.items(), key=lambda item: -sum(item[1].values())))
