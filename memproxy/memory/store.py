"""The storage contract of memproxy's memory: what every backend keeps, and how it is asked.

A backend keeps, per memory user id, the text of each user message and each model answer,
and gives it back four ways: as the block a new conversation starts with
(:meth:`MemoryStore.recall`), as best matches and newest first for the admin API, and as a
full export. Every method takes the user id and touches only that user's memories: one
user's memories never reach another user's request.

Long texts are stored as several memories (:func:`split_text`), so that recall can bring
back the one paragraph of a long answer that matters instead of all of it or nothing.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

#: Who said a memory: the person using the client, or the model answering them.
ROLES = ("user", "assistant")

#: The longest memory, in characters; longer texts are split (:func:`split_text`).
#:
#: Recall's budgets start around 500 tokens (2,000 bytes), and a block should hold several
#: memories, so one memory takes at most about half of the smallest useful block. Messages
#: of ordinary conversation are shorter than this and stay whole, as they were when the
#: ranking was tuned; what gets split is long answers, pasted documents and code, whose
#: paragraphs are about this size and carry one point each.
CHUNK_CHARS = 1000

# Where a long text may be cut, most preferred first: between paragraphs, between lines,
# after a sentence, between words. Text with none of these is cut every CHUNK_CHARS.
_BOUNDARIES = (
    re.compile(r"\n[ \t]*\n\s*"),
    re.compile(r"\n\s*"),
    re.compile(r"(?<=[.!?…])\s+"),
    re.compile(r"\s+"),
)


@dataclass(frozen=True, slots=True)
class NewMemory:
    """A message to remember, as the request path captured it."""

    user_id: str
    conversation_id: str
    role: str  # "user" | "assistant"
    text: str
    created_at: float  # unix seconds
    client: str  # the detector that decided the user id, e.g. "header_patterns"
    user_agent: str
    model: str


@dataclass(frozen=True, slots=True)
class Memory:
    """One stored memory: a whole message, or one part of a long one."""

    id: int
    user_id: str
    conversation_id: str
    role: str
    text: str
    created_at: float
    client: str
    user_agent: str
    model: str


@dataclass(frozen=True, slots=True)
class UserSummary:
    """A memory user id, how many memories it has, and when one was last written."""

    user_id: str
    memories: int
    last_write: float


@dataclass(frozen=True, slots=True)
class SeenClient:
    """A client no detector recognised: its identifying headers, and how often it came."""

    headers: dict[str, str]
    count: int
    first_seen: float
    last_seen: float


class SchemaError(Exception):
    """The memory database's layout is not the one this memproxy uses."""


class StoreUnavailable(Exception):
    """The store cannot be reached right now (a database server down or failing over).

    Worth trying again later, unlike other errors. The message never holds a secret.
    """


@dataclass(frozen=True, slots=True)
class Recalled:
    """What a new conversation starts with."""

    block: str  # the text to inject, "" when nothing was found
    memories: tuple[Memory, ...]  # the memories in the block, in the order shown


class MemoryStore(Protocol):
    """A memory backend. Every method is about one user id and never reads another's rows."""

    async def open(self) -> None:
        """Connect, and create or upgrade the schema; memproxy calls it once at start-up."""
        ...

    async def add(self, memories: Sequence[NewMemory]) -> int:
        """Store messages; returns the number of memories written.

        A text longer than :data:`CHUNK_CHARS` becomes several memories
        (:func:`split_text`). A message already stored for the same user, conversation
        and role with the same text is not stored again: clients resend their history,
        and requests are retried.
        """
        ...

    async def recall(self, user_id: str, query: str, *, max_tokens: int,
                     exclude_conversation: str | None, now: float | None = None) -> Recalled:
        """The block for a new conversation that opens with ``query``.

        At most ``max_tokens`` (4 bytes of UTF-8 each, the whole block counted), whole
        memories only, the same block for the same stored memories and query. Memories of
        ``exclude_conversation`` never appear, nor memories written after ``now``.
        """
        ...

    async def search(self, user_id: str, query: str, *, limit: int) -> list[Memory]:
        """The best matches for ``query``, best first."""
        ...

    async def recent(self, user_id: str, *, limit: int) -> list[Memory]:
        """The newest memories, newest first."""
        ...

    async def users(self) -> list[UserSummary]:
        """Every user id that has memories or pins."""
        ...

    async def export(self, user_id: str) -> list[Memory]:
        """All of the user's memories, oldest first."""
        ...

    async def delete(self, user_id: str, memory_id: int) -> int:
        """Erase one memory of this user: 1, or 0 when the user has no memory with that id.

        Once this returns, the text is gone from recall, from every index and from the
        stored bytes; the user's pinned blocks are dropped too (one may hold the text).
        """
        ...

    async def delete_user(self, user_id: str) -> int:
        """Erase everything kept for the user; returns the number of memories erased."""
        ...

    async def pinned(self, user_id: str, conversation_id: str) -> str | None:
        """The block the conversation got at its first request, or ``None``."""
        ...

    async def pin(self, user_id: str, conversation_id: str, block: str) -> None:
        """Keep the block of a conversation's first request for its later requests.

        Every later request then gets the same bytes, so prompt caches keep hitting. A new
        pin replaces the old one (a conversation's first request is the only one pinned,
        and another conversation may have opened with the same words); deleting any memory
        of the user drops the user's pins.
        """
        ...

    async def forget_quiet_pins(self, before: float) -> int:
        """Drop the pins of conversations quiet since ``before`` (unix time).

        A pin goes when it was written before ``before`` and its conversation has stored
        no memory since. Returns the number dropped.
        """
        ...

    async def size_bytes(self) -> int:
        """The size of the backend's files, for metrics."""
        ...

    async def compact(self) -> None:
        """Rewrite the stored files whole, leaving no free space behind (an operator's task)."""
        ...

    # The team's view: what every process sharing this backend has seen, for the status
    # page and the unrecognised-client inbox. Processes send what they counted since their
    # last report; the backend adds it up.

    async def add_seen_clients(self, seen: Sequence[SeenClient]) -> None:
        """Add these counts of unrecognised clients, keyed by their identifying headers."""
        ...

    async def seen_clients(self, limit: int) -> list[SeenClient]:
        """The unrecognised clients every process has seen, most requests first."""
        ...

    async def add_activity(self, counts: dict[tuple[int, str, bool], int]) -> None:
        """Add requests per ``(minute, memory space label, succeeded)``; minute = unix // 60."""
        ...

    async def activity(self, since_minute: int) -> dict[tuple[str, bool], int]:
        """Requests per ``(label, succeeded)`` since ``since_minute``, from every process."""
        ...

    async def close(self) -> None:
        """Finish pending work and release the files."""
        ...


def split_text(text: str, limit: int = CHUNK_CHARS) -> list[str]:
    """``text`` as parts of at most ``limit`` characters, cut where its structure allows.

    Each part is as long as it can be without passing ``limit``, and is cut between
    paragraphs if possible, else between lines, after a sentence, between words, and only
    as a last resort inside a word. Parts have no surrounding white space; a blank text has
    none.
    """
    text = text.strip()
    if not text:
        return []
    return _split(text, limit, 0)


def _split(text: str, limit: int, level: int) -> list[str]:
    if len(text) <= limit:
        return [text]
    if level == len(_BOUNDARIES):
        return [text[start:start + limit] for start in range(0, len(text), limit)]
    parts: list[str] = []
    current = ""
    for piece in _pieces(text, _BOUNDARIES[level]):
        if len((current + piece).rstrip()) <= limit:
            current += piece
            continue
        if current.strip():
            parts.append(current.strip())
        if len(piece.rstrip()) > limit:
            parts.extend(_split(piece.strip(), limit, level + 1))
            current = ""
        else:
            current = piece
    if current.strip():
        parts.append(current.strip())
    return parts


def _pieces(text: str, boundary: re.Pattern[str]) -> list[str]:
    """``text`` cut after each match of ``boundary``, the separator kept with its piece."""
    pieces: list[str] = []
    start = 0
    for match in boundary.finditer(text):
        pieces.append(text[start:match.end()])
        start = match.end()
    pieces.append(text[start:])
    return pieces


def message_digest(memory: NewMemory) -> bytes:
    """What makes a message a duplicate: the same conversation, role and text (16 bytes)."""
    digest = hashlib.blake2b(digest_size=16)
    for field in (memory.conversation_id, memory.role, memory.text):
        data = field.encode()
        digest.update(len(data).to_bytes(8, "big"))
        digest.update(data)
    return digest.digest()
