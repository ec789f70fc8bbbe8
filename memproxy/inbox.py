"""The unrecognised-client inbox: clients only the default detector matched, with a rule each.

Requests are grouped by a fingerprint of the headers that identify a tool
(never credentials): User-Agent, Claude Code's ``x-app``, Codex's
``originator``, OpenRouter-style ``x-title``, and the SDK's
``x-stainless-lang``/``x-stainless-package-version``. For each fingerprint the
inbox keeps counts, first and last seen, and a ready-to-paste
``header_patterns`` entry. It holds at most ``capacity`` fingerprints,
forgetting the least recently seen first.
"""

from __future__ import annotations

import re
import time
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from memproxy.identifiers import check_id

IDENTIFYING_HEADERS = ("user-agent", "x-app", "originator", "x-title",
                       "x-stainless-lang", "x-stainless-package-version")
MAX_VALUE_LENGTH = 200
_PRODUCT = re.compile(r"[^\s/;()]+")
_SLUG = re.compile(r"[^a-z0-9._-]+")


def suggest_rule(fingerprint: Mapping[str, str]) -> dict[str, str] | None:
    """A ``header_patterns`` entry that would match this client, or ``None``."""
    agent = fingerprint.get("user-agent")
    if agent:
        product = _PRODUCT.match(agent)
        if product:
            separator = "/" if agent[product.end():product.end() + 1] == "/" else ""
            return {"header": "user-agent",
                    "pattern": "^" + _escape(product.group()) + separator,
                    "user_id": _slug(product.group())}
    for header in ("x-app", "originator", "x-title"):
        value = fingerprint.get(header)
        if value:
            return {"header": header, "pattern": "^" + _escape(value) + "$",
                    "user_id": _slug(value)}
    return None


def _escape(text: str) -> str:
    # A dash needs no escape outside a character class; leaving it bare keeps rules readable.
    return re.escape(text).replace("\\-", "-")


def _slug(text: str) -> str:
    slug = _SLUG.sub("-", text.lower()).strip("-.")[:64] or "client"
    return slug if check_id(slug) is None else "client"


def rule_as_yaml(rule: Mapping[str, str]) -> str:
    """One line to paste under ``user_id_mappings.header_patterns``."""
    pattern = rule["pattern"].replace("'", "''")
    return f"- {{header: {rule['header']}, pattern: '{pattern}', user_id: {rule['user_id']}}}"


@dataclass
class Entry:
    fingerprint: dict[str, str]
    count: int = 0
    first_seen: float = field(default_factory=time.time)
    last_seen: float = field(default_factory=time.time)


class UnmatchedInbox:
    """Bounded record of the clients that fell through to the default."""

    def __init__(self, capacity: int = 200) -> None:
        self.capacity = capacity
        self._entries: OrderedDict[tuple[tuple[str, str], ...], Entry] = OrderedDict()

    def record(self, headers: Mapping[str, str]) -> None:
        key = tuple((name, headers[name][:MAX_VALUE_LENGTH])
                    for name in IDENTIFYING_HEADERS if name in headers)
        entry = self._entries.get(key)
        if entry is None:
            entry = Entry(dict(key))
            self._entries[key] = entry
            if len(self._entries) > self.capacity:
                self._entries.popitem(last=False)
        else:
            self._entries.move_to_end(key)
        entry.count += 1
        entry.last_seen = time.time()

    def top(self, limit: int = 50) -> list[dict[str, Any]]:
        """The most frequent fingerprints, each with its suggested rule."""
        entries = sorted(self._entries.values(), key=lambda e: (-e.count, -e.last_seen))
        result = []
        for entry in entries[:limit]:
            rule = suggest_rule(entry.fingerprint)
            result.append({
                "headers": entry.fingerprint,
                "count": entry.count,
                "first_seen": _iso(entry.first_seen),
                "last_seen": _iso(entry.last_seen),
                "suggested_rule": rule,
                "suggested_yaml": rule_as_yaml(rule) if rule else None,
            })
        return result


def _iso(timestamp: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(timestamp))
