"""The memory stage of the request path: recall before a request, capture after its answer.

For a chat request of a client that has memory, :meth:`MemoryStage.before`
reads the body in its API's dialect, finds the conversation, and adds the
user's relevant memories from earlier conversations as one block (the same
block on every request of a conversation, so prompt caches keep hitting).
The returned :class:`Turn` reads the model's answer as it passes; once the
answer ended well, the user's new message and the answer are queued for the
store and written off the request path.

Nothing here may make a request worse than no memory at all: a body it does
not understand, a slow or failing store, a full queue — the request goes on
exactly as the client sent it, and the reason is logged and counted.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import re
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Protocol

import structlog
from multidict import CIMultiDictProxy

from memproxy.config import MemorySettings
from memproxy.memory import MODES, InvalidMemoryMode
from memproxy.memory.dialects import AnswerReader, ApiFormat, Conversation, api_format, read_request
from memproxy.memory.dialects import insert_block as insert_memory_block
from memproxy.memory.store import MemoryStore, NewMemory, StoreUnavailable
from memproxy.routing import MEMORY_MODE_HEADER

log = structlog.get_logger("memproxy.memory")

#: Recalls the status page lists.
RECENT_RECALLS = 20
#: Writes handed to the store at once.
WRITE_BATCH = 200
#: A store that cannot be reached is tried again after this many seconds, then twice as
#: long each time, up to RETRY_MAX.
RETRY_FIRST = 0.25
RETRY_MAX = 2.0
#: Dropped memories are logged at most once per this many seconds (with their count).
DROP_LOG_INTERVAL = 10.0
#: How long a stopping memproxy waits for queued memories to reach the store.
FLUSH_TIMEOUT = 5.0
#: A conversation's pinned block is dropped once the conversation has stored nothing for
#: this many seconds (and was pinned as long ago): a conversation resumed later goes on
#: without a block, as one that began before memory was on. Without this, every
#: conversation would leave a pin behind for good.
PIN_LIFETIME = 30 * 86400.0
#: Seconds from start to the first look for pins of quiet conversations, and between looks.
PIN_SWEEP_DELAY = 60.0
PIN_SWEEP_INTERVAL = 3600.0
#: How each memory starts in a block (see memproxy.memory.recall), for counting them.
_SNIPPET = re.compile(r"^\[\d{4}-\d{2}-\d{2}\] ", re.MULTILINE)


class MemoryCounters(Protocol):
    """What the stage reports (the Prometheus metrics implement it)."""

    def recalled(self, seconds: float, memories: int) -> None: ...

    def skipped(self, reason: str) -> None: ...

    def writes(self, *, queued: int = 0, written: int = 0, dropped: int = 0) -> None: ...

    def stored_bytes(self, size: int) -> None: ...


@dataclass(slots=True)
class Turn:
    """One request's part in memory: the body to send, and the answer to capture."""

    body: bytes
    #: Memories in the block that went into the request (0: none).
    injected: int
    _stage: MemoryStage
    _write: list[NewMemory] = field(default_factory=list)
    _reader: AnswerReader | None = None

    def feed(self, chunk: bytes) -> None:
        """A piece of the answer, as it passes to the client."""
        if self._reader is not None:
            self._reader.feed(chunk)

    def finish(self, status: int, complete: bool) -> None:
        """The answer ended; store the exchange if it was a whole, successful one.

        Only the first call counts.
        """
        reader, self._reader = self._reader, None
        if reader is None or not (complete and 200 <= status < 300):
            return
        answer = reader.text()
        if answer is None:
            return
        user = self._write[0]
        self._stage.enqueue([*self._write, NewMemory(
            user_id=user.user_id, conversation_id=user.conversation_id, role="assistant",
            text=answer, created_at=time.time(), client=user.client,
            user_agent=user.user_agent, model=user.model)])


def conversation_id(user_id: str, given: str | None, conversation: Conversation) -> str | None:
    """The client's conversation id, or one derived from the user and the first message.

    A conversation resends its first message on every request, so the derived
    id is the same for all of them and different for the next conversation.
    """
    if given:
        return given
    if not conversation.first_user_text:
        return None
    digest = hashlib.sha256(f"{user_id}\0{conversation.first_user_text}".encode())
    return "c-" + digest.hexdigest()[:24]


class MemoryStage:
    """Recall and capture for every request that gets memory; one per application."""

    def __init__(self, settings: MemorySettings, store: MemoryStore,
                 counters: MemoryCounters, *, place: str = "") -> None:
        """``place`` says where memory is kept, for people (never a password)."""
        self.settings = settings
        self.store = store
        self.place = place
        self.counters = counters
        self._queue: asyncio.Queue[list[NewMemory]] = asyncio.Queue(maxsize=settings.queue)
        self._writer: asyncio.Task[None] | None = None
        self._sweeper: asyncio.Task[None] | None = None
        self._pinning: set[asyncio.Task[None]] = set()
        self._unwritten_pins: dict[tuple[str, str], str] = {}
        #: The last recalls, newest last, for the status page: (time, user, memories, ms).
        self.recent: deque[tuple[float, str, int, float]] = deque(maxlen=RECENT_RECALLS)
        #: Why memory is not working right now (``None``: it is).
        self.degraded: str | None = None
        #: Memories dropped since start (a full queue, a store that refused them).
        self.dropped = 0
        self._unlogged_drops = 0
        self._drop_logged = -DROP_LOG_INTERVAL
        self._in_hand: list[NewMemory] = []

    def applies(self, method: str, path: str, headers: CIMultiDictProxy[str], *,
                unrecognised: bool) -> tuple[ApiFormat, str] | None:
        """The API and the memory mode of a request that may get memory, else ``None``.

        Raises :class:`InvalidMemoryMode` for an unknown ``x-memory-mode``.
        """
        mode = headers.get(MEMORY_MODE_HEADER, "on").strip().lower()
        if mode not in MODES:
            raise InvalidMemoryMode(f"{MEMORY_MODE_HEADER} must be one of {', '.join(MODES)}, "
                                    f"got {mode[:40]!r}")
        if mode == "off" or (unrecognised and not self.settings.for_unidentified):
            return None
        found = api_format(method, path)
        return (found, mode) if found is not None else None

    async def before(self, found: ApiFormat, mode: str, body: bytes, *, user_id: str,
                     conversation: str | None, client: str, user_agent: str) -> Turn | None:
        """The request's memory: its new body and what to capture; ``None`` to leave it be."""
        parsed = read_request(found, body)
        if parsed is None:
            self.counters.skipped("body_not_understood")
            return None
        conv_id = conversation_id(user_id, conversation, parsed)
        if conv_id is None:
            self.counters.skipped("no_conversation")
            return None
        turn = Turn(body, 0, self)
        if mode in ("on", "read"):
            block, count = await self._block(user_id, conv_id, parsed)
            if block:
                turn.body = insert_memory_block(parsed, block)
                turn.injected = count
        if mode in ("on", "write") and parsed.new_user_text:
            turn._write.append(NewMemory(
                user_id=user_id, conversation_id=conv_id, role="user",
                text=parsed.new_user_text, created_at=time.time(), client=client,
                user_agent=user_agent, model=parsed.model or ""))
            turn._reader = AnswerReader(found, event_stream=parsed.stream)
        return turn

    async def _block(self, user_id: str, conv_id: str,
                     parsed: Conversation) -> tuple[str, int]:
        """The block for this request, within the recall budget; ``("", 0)`` for none.

        A conversation's first request pins the block it carried, an empty one included,
        so its later requests carry exactly that.
        """
        first_request = self.settings.recall.when == "first_turn" and parsed.turns == 1
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.recall.timeout_ms / 1000
        block, count = await self._recall(user_id, conv_id, parsed)
        if first_request:
            # The pin is written in a task of its own: the writer may be busy (another
            # process, an erasure), and the request waits for it only for what is left of
            # the recall budget. Until it is written, this process's later requests of the
            # conversation find it in _unwritten_pins; the wait is for the others (other
            # workers, other replicas), which may get the conversation's next request as
            # soon as this answer is out.
            self._unwritten_pins[user_id, conv_id] = block
            task = asyncio.create_task(self._pin(user_id, conv_id, block))
            self._pinning.add(task)
            task.add_done_callback(self._pinning.discard)
            remaining = deadline - loop.time()
            if remaining > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(asyncio.shield(task), remaining)
        return block, count

    async def _pin(self, user_id: str, conv_id: str, block: str) -> None:
        try:
            await self.store.pin(user_id, conv_id, block)
        except Exception as exc:
            self._fault("pin", exc)
        finally:
            if self._unwritten_pins.get((user_id, conv_id)) == block:
                del self._unwritten_pins[user_id, conv_id]

    def forget(self, user_id: str) -> None:
        """Drop what is held for ``user_id`` in this process: their memories were erased."""
        for key in [k for k in self._unwritten_pins if k[0] == user_id]:
            del self._unwritten_pins[key]

    async def _recall(self, user_id: str, conv_id: str,
                      parsed: Conversation) -> tuple[str, int]:
        recall = self.settings.recall
        first_turn = recall.when == "first_turn"
        started = time.perf_counter()
        try:
            async with asyncio.timeout(recall.timeout_ms / 1000):
                if first_turn and parsed.turns > 1:
                    # A later request: the block its first request got, or none (it began
                    # before memory was on): one appearing mid-conversation would only
                    # break the client's cache. A first request always recalls afresh, as
                    # another conversation may have opened with the same words before.
                    pinned = self._unwritten_pins.get((user_id, conv_id))
                    if pinned is None:
                        pinned = await self.store.pinned(user_id, conv_id)
                    if pinned is None:
                        # Begun before memory was on, its pin dropped as quiet, or the pin
                        # not written yet when another process took this request.
                        self.counters.skipped("no_pin")
                    if not pinned:
                        return "", 0
                    return pinned, len(_SNIPPET.findall(pinned))
                query = parsed.new_user_text or parsed.first_user_text or ""
                if not query:
                    return "", 0
                recalled = await self.store.recall(
                    user_id, query, max_tokens=recall.max_tokens, exclude_conversation=conv_id)
        except TimeoutError:
            self.counters.skipped("recall_timeout")
            log.warning("memory_recall_skipped", reason="slower than "
                        f"memproxy.memory.recall.timeout_ms ({recall.timeout_ms} ms)")
            return "", 0
        except Exception as exc:  # a broken store must not break the request
            self._fault("recall", exc)
            return "", 0
        self._recovered()
        seconds = time.perf_counter() - started
        self.counters.recalled(seconds, len(recalled.memories))
        self.recent.append((time.time(), user_id, len(recalled.memories),
                            round(seconds * 1000, 1)))
        return recalled.block, len(recalled.memories)

    def enqueue(self, memories: list[NewMemory]) -> None:
        """Queue memories for the store; when the queue is full they are dropped and counted."""
        try:
            self._queue.put_nowait(memories)
        except asyncio.QueueFull:
            self._dropped(len(memories), "the write queue is full (memproxy.memory.queue)")
            return
        self.counters.writes(queued=len(memories))

    def _dropped(self, count: int, reason: str) -> None:
        """Count memories that will never be written; log them, once per few seconds."""
        self.counters.writes(dropped=count)
        self.dropped += count
        self._unlogged_drops += count
        now = time.monotonic()
        if now - self._drop_logged >= DROP_LOG_INTERVAL:
            log.warning("memory_write_dropped", memories=self._unlogged_drops,
                        dropped_total=self.dropped, reason=reason)
            self._drop_logged = now
            self._unlogged_drops = 0

    async def _write_forever(self) -> None:
        while True:
            batch = await self._queue.get()
            while len(batch) < WRITE_BATCH and not self._queue.empty():
                batch += self._queue.get_nowait()
            self._in_hand = batch
            await self._write(batch)
            self._in_hand = []

    async def _write(self, batch: list[NewMemory]) -> None:
        """Hand ``batch`` to the store; while the store cannot be reached, try again.

        Meanwhile the queue holds what comes in, up to ``memory.queue``; more is
        dropped and counted (:meth:`enqueue`). Any other error drops the batch: trying
        it again would only fail again and hold up every later write.
        """
        delay = RETRY_FIRST
        while True:
            try:
                written = await self.store.add(batch)
            except StoreUnavailable as exc:
                self._fault("write", exc, retrying=True)
                await asyncio.sleep(delay)
                delay = min(delay * 2, RETRY_MAX)
                continue
            except Exception as exc:
                self._dropped(len(batch), f"the store refused them: {type(exc).__name__}")
                self._fault("write", exc)
                return
            break
        self._recovered()
        self.counters.writes(written=written)
        with contextlib.suppress(Exception):  # the size is only a figure for metrics
            self.counters.stored_bytes(await self.store.size_bytes())

    def _fault(self, during: str, exc: Exception, *, retrying: bool = False) -> None:
        error = f"{type(exc).__name__}: {exc}".rstrip(": ")
        # A store that cannot be reached is logged when the outage starts, not on each
        # request while it lasts (memory_back says when it ended); other errors each time.
        ongoing = self.degraded is not None and isinstance(exc, StoreUnavailable)
        self.degraded = f"{during} failed: {error}"
        if retrying:
            self.degraded += f"; {self._queue.qsize() + 1} batches wait to be written"
        self.counters.skipped(f"{during}_failed")
        if not ongoing:
            log.error("memory_failed", during=during, error=error,
                      **({"then": "requests go on without memory; writes wait in the queue "
                                  "and are retried"} if isinstance(exc, StoreUnavailable)
                         else {}))

    def _recovered(self) -> None:
        """The store answered: memory works again, if it did not."""
        if self.degraded is not None:
            log.info("memory_back", queued=self._queue.qsize(),
                     reason="the store answers again" + (
                         "; queued memories are being written" if self._queue.qsize() else ""))
            self.degraded = None

    async def _sweep_pins_forever(self) -> None:
        await asyncio.sleep(PIN_SWEEP_DELAY)
        while True:
            await self.sweep_pins()
            await asyncio.sleep(PIN_SWEEP_INTERVAL)

    async def sweep_pins(self) -> int:
        """Drop the pins of conversations quiet for :data:`PIN_LIFETIME`; how many went."""
        try:
            dropped = await self.store.forget_quiet_pins(time.time() - PIN_LIFETIME)
        except Exception as exc:  # housekeeping: the next sweep tries again
            log.warning("memory_pin_sweep_failed", error=f"{type(exc).__name__}: {exc}")
            return 0
        if dropped:
            log.info("memory_pins_dropped", pins=dropped,
                     reason=f"their conversations stored nothing for "
                            f"{PIN_LIFETIME / 86400:g} days")
        return dropped

    async def flush(self) -> None:
        """Wait until every queued memory and pin has been handed to the store."""
        while not self._queue.empty() or self._in_hand:
            await asyncio.sleep(0.01)
        await asyncio.gather(*self._pinning, return_exceptions=True)

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        """The writer task, for the application's life; queued writes are flushed at the end."""
        self._writer = asyncio.create_task(self._write_forever())
        self._sweeper = asyncio.create_task(self._sweep_pins_forever())
        try:
            yield
        finally:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.flush(), FLUSH_TIMEOUT)
            self._writer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._writer
            unwritten = len(self._in_hand) + sum(
                len(self._queue.get_nowait()) for _ in range(self._queue.qsize()))
            if unwritten:
                self._drop_logged = -DROP_LOG_INTERVAL  # say it, however recent the last one
                self._dropped(unwritten, f"memproxy stopped while the store was unreachable "
                                         f"(waited {FLUSH_TIMEOUT:g} s)")
            await self.store.close()


StoreFactory = Callable[[MemorySettings], MemoryStore]
