"""Clients that LiteLLM turns away for their API key, told apart from other errors.

LiteLLM's answers to a key mistake are opaque: a key that is not its master key
gets ``400 No connected db.`` (when LiteLLM has no database of virtual keys),
and a request without a key can get a bare ``500``. memproxy leaves LiteLLM's
answer as it is, but recognises these, logs one warning per client with the
fix, and lists them on the status page.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass

import structlog

from memproxy.logs import iso_time
from memproxy.observers import RequestRecord

log = structlog.get_logger("memproxy")

FIX = ("give the client the API key from memproxy start's banner, or your LITELLM_MASTER_KEY "
       "(a LiteLLM virtual key needs LiteLLM's database)")
MAX_CLIENTS = 100


def key_problem(status: int, body: bytes, *, sent_key: bool) -> str | None:
    """What was wrong with the client's key, judging from LiteLLM's answer, or ``None``."""
    if status == 400 and b"No connected db" in body:
        return ("LiteLLM refused the client's API key: it is not LiteLLM's master key, and "
                "LiteLLM has no database of virtual keys (400 No connected db.)")
    if status in (400, 401, 403) and (b"No api key passed in" in body
                                      or b"Malformed API Key" in body):
        return "the client sent no usable API key, and LiteLLM needs one"
    if status == 401:
        return "LiteLLM refused the client's API key (401)"
    if status == 500 and not sent_key:
        return "the client sent no API key, and LiteLLM failed the request (500)"
    return None


@dataclass
class KeyProblem:
    client: str
    problem: str
    count: int
    last_seen: float


class KeyProblems:
    """The observer: a warning the first time each client hits a key problem, and a list."""

    def __init__(self) -> None:
        self._clients: OrderedDict[tuple[str, str], KeyProblem] = OrderedDict()

    def request_done(self, record: RequestRecord) -> None:
        if record.key_problem is None:
            return
        agent = record.headers.get("user-agent", "")[:60]
        client = record.user_id or record.detector or "unknown"
        key = (client, record.key_problem)
        seen = self._clients.get(key)
        if seen is None:
            log.warning("litellm_rejected_key", client=client, user_agent=agent,
                        problem=record.key_problem, fix=FIX)
            seen = self._clients[key] = KeyProblem(client, record.key_problem, 0, 0.0)
            if len(self._clients) > MAX_CLIENTS:
                self._clients.popitem(last=False)
        self._clients.move_to_end(key)
        seen.count += 1
        seen.last_seen = time.time()

    def listed(self) -> list[dict[str, object]]:
        """For the status page: each client's problem, newest first, with the fix."""
        return [{"client": p.client, "problem": p.problem, "count": p.count,
                 "last_seen": iso_time(p.last_seen),
                 "fix": FIX} for p in reversed(self._clients.values())]
