"""The unrecognised-client inbox: clients only the default detector matched, with a rule each.

Requests are grouped by a fingerprint of the headers that identify a tool
(never credentials): User-Agent, Claude Code's ``x-app``, Codex's
``originator``, OpenRouter-style ``x-title``, and the SDK's
``x-stainless-lang``/``x-stainless-package-version``. For each fingerprint the
inbox keeps counts, first and last seen, and a ready-to-paste
``header_patterns`` entry. It holds at most ``capacity`` fingerprints,
forgetting the least recently seen first.

Only requests to model endpoints count (:func:`talks_to_a_model`): the inbox is
for clients that talk to models. A ``HEAD /`` reachability probe or a
``/favicon.ico`` is made by the HTTP library under a client (Claude Code's
probe says ``Bun/...``), and a rule made from it would name the runtime, not
the tool.
"""

from __future__ import annotations

import re
import time
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import yaml

from memproxy.identifiers import check_id
from memproxy.logs import iso_time
from memproxy.memory.store import SeenClient
from memproxy.observers import RequestRecord

IDENTIFYING_HEADERS = ("user-agent", "x-app", "originator", "x-title",
                       "x-stainless-lang", "x-stainless-package-version")
MAX_VALUE_LENGTH = 200
#: A product token of the ASCII characters tools use in their names ("Zed", "Go-http-client").
_PRODUCT = re.compile(r"[A-Za-z0-9._+-]+")
_SLUG = re.compile(r"[^a-z0-9._-]+")
#: What a bare word may hold in a suggestion; YAML may still read it as a number or a bool.
_BARE_WORD = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_YAML_STR = "tag:yaml.org,2002:str"
_RESOLVER = yaml.resolver.Resolver()
#: A model endpoint anywhere in the path, with what lies under it: OpenAI's and LiteLLM's
#: (``/v1/chat/completions``, ``/openai/deployments/x/chat/completions``, ``/v1/responses/ID``,
#: ``/v1/models``, which SDKs ask to list models), Anthropic's (``/v1/messages``,
#: ``/v1/messages/count_tokens``) and Gemini's (``/v1beta/models/NAME:generateContent``).
_MODEL_ENDPOINT = re.compile(
    r"/(?:chat/completions|completions|responses|messages|embeddings|models)(?:[/:]|$)")
#: Methods no model call uses: reachability probes and CORS preflights.
_PROBE_METHODS = frozenset({"HEAD", "OPTIONS"})


def talks_to_a_model(method: str, path: str) -> bool:
    """Whether a request is a client talking to a model API, rather than a probe."""
    return method.upper() not in _PROBE_METHODS and _MODEL_ENDPOINT.search(path) is not None


def suggest_rule(fingerprint: Mapping[str, str]) -> dict[str, str] | None:
    """A ``header_patterns`` entry for this client's tool, or ``None`` when none is safe.

    The pattern holds printable ASCII only: YAML folds some other characters (U+2028,
    U+0085) into spaces, and aiohttp hands invalid UTF-8 over as lone surrogates, which
    YAML cannot read. It takes in the character after the product token, so a tool whose
    name merely starts the same way does not match.
    """
    agent = fingerprint.get("user-agent", "")
    product = _PRODUCT.match(agent)
    if product:
        after = agent[product.end():product.end() + 1]
        end: str | None
        if after:
            end = _escape(after) if _printable_ascii(after) else None
        else:  # the token is the whole value: anchor it, unless the inbox cut the value short
            end = "$" if len(agent) < MAX_VALUE_LENGTH else None
        if end is not None:
            return {"header": "user-agent", "pattern": "^" + _escape(product.group()) + end,
                    "user_id": _slug(product.group())}
    for header in ("x-app", "originator", "x-title"):
        value = fingerprint.get(header, "")
        if value and _printable_ascii(value):
            end = "$" if len(value) < MAX_VALUE_LENGTH else ""
            return {"header": header, "pattern": "^" + _escape(value) + end,
                    "user_id": _slug(value)}
    return None


def _printable_ascii(text: str) -> bool:
    return text.isascii() and text.isprintable()


def _escape(text: str) -> str:
    # Dashes and spaces need no escape (no character class, no verbose flag); bare, they
    # keep rules readable.
    return re.escape(text).replace("\\-", "-").replace("\\ ", " ")


def _slug(text: str) -> str:
    slug = _SLUG.sub("-", text.lower()).strip("-.")[:64] or "client"
    return slug if check_id(slug) is None else "client"


def rule_as_yaml(rule: Mapping[str, str]) -> str:
    """One line to paste under ``user_id_mappings.header_patterns``."""
    pattern = rule["pattern"].replace("'", "''")
    return (f"- {{header: {_yaml_text(rule['header'])}, pattern: '{pattern}', "
            f"user_id: {_yaml_text(rule['user_id'])}}}")


def _yaml_text(text: str) -> str:
    """``text`` as YAML reads it back as that text: bare when it can be, else quoted.

    Bare ``yes``, ``null``, ``123`` or ``0x1f`` would come back as a bool, nothing or a
    number, which the config refuses as a user id.
    """
    # The loader's own resolver, asked as for a bare scalar; the stubs leave it untyped.
    if _BARE_WORD.fullmatch(text) and _RESOLVER.resolve(  # type: ignore[no-untyped-call]
            yaml.ScalarNode, text, (True, False)) == _YAML_STR:
        return text
    return "'" + text.replace("'", "''") + "'"


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

    def request_done(self, record: RequestRecord) -> None:
        """Keep the clients that no detector recognised, when they talk to a model."""
        if record.unrecognised and talks_to_a_model(record.method, record.path):
            self.record(record.headers)

    def record(self, headers: Mapping[str, str]) -> None:
        key = fingerprint_of(headers)
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
        return describe_clients([SeenClient(e.fingerprint, e.count, e.first_seen, e.last_seen)
                                 for e in entries[:limit]])


def fingerprint_of(headers: Mapping[str, str]) -> tuple[tuple[str, str], ...]:
    """The headers that identify a tool, values cut to :data:`MAX_VALUE_LENGTH`."""
    return tuple((name, headers[name][:MAX_VALUE_LENGTH])
                 for name in IDENTIFYING_HEADERS if name in headers)


def describe_clients(clients: Sequence[SeenClient]) -> list[dict[str, Any]]:
    """Clients as the inbox lists them, each with its suggested rule."""
    result = []
    for client in clients:
        rule = suggest_rule(client.headers)
        result.append({
            "headers": client.headers,
            "count": client.count,
            "first_seen": iso_time(client.first_seen),
            "last_seen": iso_time(client.last_seen),
            "suggested_rule": rule,
            "suggested_yaml": rule_as_yaml(rule) if rule else None,
        })
    return result

