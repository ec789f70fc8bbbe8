"""Evidence recall on LoCoMo: how much of what a question needs reaches the model.

Run from the repository root::

    python -m bench.locomo                         # both budgets, all five conversations
    python -m bench.locomo --budgets 500 --conversations 26,30 --max-minutes 5
    python -m bench.locomo --backend postgres      # the same with PostgreSQL memory

What it measures, and why. When memproxy keeps memory itself, the first request of a new
conversation gets one block of the user's earlier messages, at most
``memproxy.memory.recall.max_tokens``. An answer can only use what is in that block, so the
figure that matters is how often the messages that hold an answer are in it. LoCoMo
(long conversations between two people, with questions annotated with the turns that
answer them) gives exactly that: the *evidence recall* of a question is the share of its
evidence turns whose text is wholly inside the block, and this benchmark reports its mean
per question category (1 multi-hop, 2 temporal, 3 open-domain, 4 single-hop; category 5,
questions with no answer, is left out, as are questions without evidence), per
conversation and over all of them.

How. Everything runs on 127.0.0.1 through the real request path, as a client would use it:

- a fake upstream, standing in for LiteLLM: it answers ``POST /v1/chat/completions`` with the
  answer it was told to give, streamed as ``chat.completion.chunk`` events and ``[DONE]``, and
  keeps every request body it receives, so the block is read where the model would read it;
- ``python -m memproxy serve`` as a child process, with ``memproxy.memory.backend: local``
  and a fresh SQLite file for each budget (``--backend postgres``: ``backend: postgres`` and
  a fresh database for each budget, see below), and one memory user per conversation (the
  explicit ``x-memory-user-id`` header, which memproxy honours from loopback);
- each LoCoMo session is replayed as one memproxy conversation (``x-sm-conversation-id:
  <conversation>-s<N>``): speaker A's turns are the user's messages, speaker B's the
  answers the fake upstream streams back, every request carrying the full history (a
  system message, all earlier turns of the session, the new user message). Images go as
  ``image_url`` parts, as clients send them (they are not stored); the dataset's image
  captions are never sent. Consecutive turns of one speaker become one message (paragraphs).
  A session that opens with speaker B gets the user opener :data:`OPENER`, and a session
  that ends with speaker A gets the answer :data:`CLOSER`: a memory is written only for a
  user message that got a complete answer, and both texts are stopwords only, so no
  question's words can match them;
- after each session the benchmark polls the admin API until every memory it sent is
  visible and records the delay from the end of the session's last answer;
- then each question opens a conversation of its own, with ``x-memory-mode: read`` so that
  the questions are not stored and cannot be recalled by the next ones, and the block in the
  request body the upstream received is scored. The same question is sent once more with
  ``x-memory-mode: off``, as a paired control for latency.

The session's date and time goes in the system message, where clients put the current
date. memproxy does not read it: it stamps each memory with the wall clock at the moment it
is captured and offers no way to give a date, so the dated snippets of the block show the
day of the run, and the date field of the index holds that day for every memory. The
metric does not use dates; temporal questions lose whatever the dates would have added.

A turn counts as recalled when a snippet of the block with the turn's role has exactly the
turn's text after the one normalisation the store applies (leading and trailing white space
removed); the raw text without that normalisation is reported too.

Latency is reported three ways, each for what it is: memproxy's own histogram
``memproxy_memory_recall_seconds`` over the questions (mean exact, percentiles as bucket
bounds); the time from the client sending a question to the upstream receiving it, with
memory and, for the same question, with memory off (the difference is what the memory stage
adds before the request leaves memproxy); and the client's time to the first byte, both ways.

With ``--backend postgres`` each budget's database is created on the server ``--dsn`` names
(its role must be allowed to create databases) and dropped when the budget is done; without
``--dsn``, on a throwaway server (``tests/postgres_server.py``) started for the run and stopped
when it ends. That server runs with ``fsync`` and ``synchronous_commit`` off (printed at the
start), which flatters write visibility a little and recall not at all. The two backends
share the choice of words and the packing of the block, and rank differently: the local one
with FTS5's BM25, PostgreSQL with ``ts_rank`` (no inverse document frequency), so recall
figures may differ between them.

The data (CC BY-NC 4.0, evaluation only) is read from ``--data`` (by default the
repository's parent's ``shared/locomo``) and never copied: the results file
(``bench/results/locomo-latest.json``, ``locomo-postgres-latest.json`` with ``--backend
postgres``; not tracked) holds figures and turn ids only. Only ``speaker_a``,
``speaker_b``, ``session_N``, ``session_N_date_time`` and ``qa`` are read; the authors'
summaries, observations and event annotations are not. The run stops by itself after
``--max-minutes``; memproxy, the fake upstream and a throwaway PostgreSQL server are
stopped on every exit.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import platform
import re
import shutil
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import yaml
from aiohttp import web
from aiohttp.test_utils import unused_port
from prometheus_client.parser import text_string_to_metric_families

import memproxy
from bench.harness import (
    REPO,
    BenchAborted,
    ProcessGroup,
    child_env,
    create_database,
    drop_database,
    percentile,
    postgres_server,
    postgres_settings,
)
from memproxy.memory.recall import BLOCK_OPEN, BLOCK_OUTRO, BYTES_PER_TOKEN
from memproxy.memory.store import split_text

DEFAULT_DATA = REPO.parent / "shared" / "locomo"
RESULTS = {"local": REPO / "bench" / "results" / "locomo-latest.json",
           "postgres": REPO / "bench" / "results" / "locomo-postgres-latest.json"}
CATEGORIES = {1: "multi-hop", 2: "temporal", 3: "open-domain", 4: "single-hop"}
#: What the user says when a session opens with speaker B (stopwords only).
OPENER = "Hi!"
#: The answer to a session's last message when speaker A has it (stopwords only).
CLOSER = "OK."
#: The answer the fake upstream gives to a question (read mode: never stored).
QUESTION_ANSWER = "I will look into that."
SYSTEM = "You are a helpful assistant."
MODEL = "locomo-replay"
#: Header that tells the fake upstream which of its expected requests this is.
REQUEST_HEADER = "x-locomo-request"
#: Characters per streamed chunk of an answer.
CHUNK = 24
POLL_SECONDS = 0.005
#: A memory count that stops growing for this long is taken as final.
STALL_SECONDS = 3.0
# A snippet of the block: "[YYYY-MM-DD] role: text" (see memproxy.memory.recall.SNIPPET).
_SNIPPET_HEAD = re.compile(r"^\[\d{4}-\d{2}-\d{2}\] (user|assistant): ", re.MULTILINE)
# An evidence id, forgiving malformed ones ("D:3:4", two ids in one string "D1:2; D1:3").
_EVIDENCE = re.compile(r"D\s*:?\s*(\d+)\s*:\s*(\d+)")
_WELL_FORMED = re.compile(r"D\d+:\d+")
_SESSION_KEY = re.compile(r"session_(\d+)")


class ReplayError(Exception):
    """A request of the replay did not go as a client needs it to."""


class TimeLimit(Exception):
    """The run took ``--max-minutes``."""


# -- the data ---------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Utterance:
    """One turn of a LoCoMo session."""

    dia_id: str
    role: str  # "user" (speaker A) or "assistant" (speaker B)
    text: str
    images: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Exchange:
    """One request of the replay: the user's message, and the answer the upstream gives."""

    user: str
    images: tuple[str, ...]
    answer: str


@dataclass(frozen=True, slots=True)
class Session:
    number: int
    date_time: str
    exchanges: tuple[Exchange, ...]


@dataclass(frozen=True, slots=True)
class Question:
    index: int  # its place in the file's qa list
    category: int
    text: str
    evidence: tuple[str, ...]  # dia ids of turns that exist


@dataclass
class Conversation:
    name: str
    sessions: list[Session]
    turns: dict[str, Utterance]
    questions: list[Question]
    #: Evidence ids that name no turn, as written in the file.
    dropped_evidence: list[str] = field(default_factory=list)
    #: Malformed evidence ids that were read as ids of turns (e.g. "D:3:4").
    repaired_evidence: list[str] = field(default_factory=list)
    #: Questions of categories 1-4 left out: no evidence, or none that names a turn.
    without_evidence: int = 0
    openers: int = 0
    closers: int = 0
    merged_turns: int = 0

    @property
    def user_id(self) -> str:
        return f"locomo-{self.name}"


def load(path: Path) -> Conversation:
    """A conversation file, reading only the speakers, the sessions, their dates and qa."""
    raw = json.loads(path.read_text())
    speakers = {raw["speaker_a"]: "user", raw["speaker_b"]: "assistant"}
    numbers = sorted(int(m.group(1)) for key in raw if (m := _SESSION_KEY.fullmatch(key)))
    conversation = Conversation(path.stem, [], {}, [])
    for number in numbers:
        utterances = [Utterance(t["dia_id"], speakers[t["speaker"]], t["text"],
                                tuple(_images(t.get("img_url"))))
                      for t in raw[f"session_{number}"]]
        conversation.turns.update((u.dia_id, u) for u in utterances)
        conversation.sessions.append(Session(
            number, str(raw.get(f"session_{number}_date_time", "")),
            _exchanges(utterances, conversation)))
    for index, qa in enumerate(raw["qa"]):
        if qa.get("category") not in CATEGORIES:
            continue
        evidence: list[str] = []
        for item in qa.get("evidence") or ():
            found = _EVIDENCE.findall(str(item))
            if found and not _WELL_FORMED.fullmatch(str(item)):
                conversation.repaired_evidence.append(str(item))
            if not found:
                conversation.dropped_evidence.append(str(item))
            for session, turn in found:
                dia_id = f"D{int(session)}:{int(turn)}"
                if dia_id in conversation.turns:
                    evidence.append(dia_id)
                else:
                    conversation.dropped_evidence.append(str(item))
        if evidence:
            conversation.questions.append(Question(index, qa["category"], qa["question"],
                                                   tuple(dict.fromkeys(evidence))))
        else:
            conversation.without_evidence += 1
    return conversation


def _images(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, list):
        return [v for v in value if isinstance(v, str)]
    return []


def _exchanges(utterances: Sequence[Utterance],
               conversation: Conversation) -> tuple[Exchange, ...]:
    """The session's requests: runs of one speaker merged, an opener or closer where needed."""
    runs: list[tuple[str, str, tuple[str, ...]]] = []
    for role, group in itertools.groupby(utterances, key=lambda u: u.role):
        turns = list(group)
        conversation.merged_turns += len(turns) - 1
        runs.append((role, "\n\n".join(t.text for t in turns),
                     tuple(image for t in turns for image in t.images)))
    if runs and runs[0][0] == "assistant":
        runs.insert(0, ("user", OPENER, ()))
        conversation.openers += 1
    if runs and runs[-1][0] == "user":
        runs.append(("assistant", CLOSER, ()))
        conversation.closers += 1
    return tuple(Exchange(user[1], user[2], answer[1])
                 for user, answer in zip(runs[::2], runs[1::2], strict=True))


def memories_written(session: Session) -> int:
    """How many memories the store keeps for a replayed session (it drops exact repeats)."""
    users = {e.user.strip() for e in session.exchanges if e.user.strip()}
    answers = {e.answer for e in session.exchanges if e.answer.strip()}
    return sum(len(split_text(text)) for text in [*users, *answers])


# -- the fake upstream ------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Received:
    body: bytes
    at: float  # perf_counter() when the request reached the upstream


class FakeUpstream:
    """LiteLLM's stand-in: streams the answer it was told to give and keeps each request."""

    def __init__(self) -> None:
        self.port = 0
        self._answers: dict[str, str] = {}
        self._received: dict[str, Received] = {}
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post("/v1/chat/completions", self._chat)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        self.port = unused_port()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def expect(self, key: str, answer: str) -> None:
        self._answers[key] = answer

    def take(self, key: str) -> Received:
        try:
            return self._received.pop(key)
        except KeyError:
            raise ReplayError(f"the upstream never received request {key}") from None

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        at = time.perf_counter()
        key = request.headers.get(REQUEST_HEADER, "")
        body = await request.read()
        answer = self._answers.pop(key, None)
        if answer is None:
            return web.json_response({"error": {"message": f"unexpected request {key!r}"}},
                                     status=500)
        self._received[key] = Received(body, at)
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                               "Cache-Control": "no-cache"})
        await response.prepare(request)
        pieces = [""] + [answer[i:i + CHUNK] for i in range(0, len(answer), CHUNK)]
        for number, piece in enumerate(pieces):
            delta = {"role": "assistant", "content": piece} if number == 0 else {"content": piece}
            await response.write(_event(key, delta, None))
        await response.write(_event(key, {}, "stop"))
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response


def _event(key: str, delta: dict[str, str], finish: str | None) -> bytes:
    chunk = {"id": f"chatcmpl-{key}", "object": "chat.completion.chunk", "created": 0,
             "model": MODEL, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
    return b"data: " + json.dumps(chunk, ensure_ascii=False).encode() + b"\n\n"


# -- memproxy -------------------------------------------------------------------------------

class Memproxy:
    """``python -m memproxy serve`` with memory at one budget, as a child process.

    ``memory`` is the config's ``memproxy.memory`` section without ``recall``: where the
    memory is kept.
    """

    def __init__(self, group: ProcessGroup, work: Path, budget: int, upstream_port: int,
                 memory: dict[str, Any]) -> None:
        self.group = group
        self.work = work
        self.budget = budget
        self.upstream_port = upstream_port
        self.port = 0
        self.memory = memory
        self.log_path = work / f"memproxy-{budget}.log"
        self.stderr_path = work / f"memproxy-{budget}.stderr"
        self.process: Any = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> None:
        self.port = unused_port()
        config = self.work / f"memproxy-{self.budget}.yaml"
        config.write_text(yaml.safe_dump({
            "user_id_mappings": {"custom_header": "x-memory-user-id",
                                 "default_user_id": "default"},
            "memproxy": {
                "host": "127.0.0.1",
                "port": self.port,
                "headers": {"supermemory_api_key": None},
                "log": {"format": "json", "level": "info"},
                "memory": {**self.memory, "recall": {"max_tokens": self.budget}},
            },
        }, sort_keys=False))
        argv = [sys.executable, "-m", "memproxy", "serve", "--config", str(config),
                "--port", str(self.port),
                "--litellm-url", f"http://127.0.0.1:{self.upstream_port}"]
        self.process = self.group.start(argv, stdout=self.log_path.open("wb"),
                                        stderr=self.stderr_path.open("wb"), env=child_env(),
                                        cwd=self.work)
        deadline = time.monotonic() + 60
        while True:
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise ReplayError(f"memproxy did not start (status {self.process.poll()}):\n"
                                  f"{self.stderr_path.read_text()[-2000:]}")
            with contextlib.suppress(OSError):
                _, writer = await asyncio.open_connection("127.0.0.1", self.port)
                writer.close()
                await writer.wait_closed()
                return
            await asyncio.sleep(0.05)

    def stop(self) -> None:
        if self.process is not None:
            self.group.stop(self.process)
            self.process = None

    def log_events(self) -> dict[str, int]:
        """How often each warning or error event appears in memproxy's log."""
        found: dict[str, int] = {}
        with contextlib.suppress(FileNotFoundError):
            for line in self.log_path.read_text(errors="replace").splitlines():
                with contextlib.suppress(ValueError):
                    entry = json.loads(line)
                    if isinstance(entry, dict) and entry.get("level") in ("warning", "error"):
                        name = str(entry.get("event"))
                        found[name] = found.get(name, 0) + 1
        return found


# -- the client -------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Sent:
    """One request as the client saw it, and the body the upstream got."""

    upstream_body: bytes
    forward_s: float  # client sent -> upstream received
    first_byte_s: float  # client sent -> first byte of the answer
    done: float  # perf_counter() when the answer had been read whole
    memories: int  # memproxy's x-memproxy-memories


class Client:
    """A chat client of memproxy whose requests the fake upstream answers."""

    def __init__(self, http: aiohttp.ClientSession, proxy: Memproxy,
                 upstream: FakeUpstream) -> None:
        self.http = http
        self.proxy = proxy
        self.upstream = upstream
        self._keys = itertools.count(1)

    async def chat(self, messages: list[dict[str, Any]], *, user_id: str, conversation: str,
                   answer: str, mode: str = "on") -> Sent:
        key = str(next(self._keys))
        self.upstream.expect(key, answer)
        payload = json.dumps({"model": MODEL, "stream": True, "messages": messages},
                             ensure_ascii=False).encode()
        headers = {"Content-Type": "application/json", "Authorization": "Bearer sk-locomo",
                   "x-memory-user-id": user_id, "x-sm-conversation-id": conversation,
                   "x-memory-mode": mode, REQUEST_HEADER: key}
        started = time.perf_counter()
        first: float | None = None
        chunks: list[bytes] = []
        async with self.http.post(f"{self.proxy.url}/v1/chat/completions", data=payload,
                                  headers=headers) as response:
            async for chunk in response.content.iter_any():
                if first is None:
                    first = time.perf_counter()
                chunks.append(chunk)
            done = time.perf_counter()
            status = response.status
            memories = int(response.headers.get("x-memproxy-memories", "0"))
        body = b"".join(chunks)
        if status != 200 or not body.rstrip().endswith(b"data: [DONE]"):
            raise ReplayError(f"request {key} ({conversation}) got {status}: {body[:300]!r}")
        received = self.upstream.take(key)
        return Sent(received.body, received.at - started, (first or done) - started, done,
                    memories)

    async def memory_count(self, user_id: str) -> int:
        """The user's memories, from the admin API's list of users."""
        async with self.http.get(f"{self.proxy.url}/memory-routing/memory") as response:
            users = (await response.json())["users"]
        return next((int(u["memories"]) for u in users if u["user_id"] == user_id), 0)

    async def listed(self, user_id: str) -> int:
        """The user's memories as the per-user listing returns them (at most 1,000)."""
        async with self.http.get(f"{self.proxy.url}/memory-routing/memory/{user_id}",
                                 params={"limit": "1000"}) as response:
            return len((await response.json())["memories"])

    async def metrics(self) -> dict[str, Any]:
        """The recall histogram and the skipped-recall counters, from /metrics."""
        async with self.http.get(f"{self.proxy.url}/metrics") as response:
            text = await response.text()
        found: dict[str, Any] = {"buckets": {}, "count": 0.0, "sum": 0.0, "skipped": {}}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == "memproxy_memory_recall_seconds_bucket":
                    found["buckets"][sample.labels["le"]] = sample.value
                elif sample.name == "memproxy_memory_recall_seconds_count":
                    found["count"] = sample.value
                elif sample.name == "memproxy_memory_recall_seconds_sum":
                    found["sum"] = sample.value
                elif sample.name == "memproxy_memory_skipped_total":
                    found["skipped"][sample.labels.get("reason", "")] = sample.value
        return found


def user_message(text: str, images: Iterable[str]) -> dict[str, Any]:
    """The user's message: plain text, or text and image parts when images were shared."""
    urls = list(images)
    if not urls:
        return {"role": "user", "content": text}
    parts: list[dict[str, Any]] = [{"type": "text", "text": text}]
    parts += [{"type": "image_url", "image_url": {"url": url}} for url in urls]
    return {"role": "user", "content": parts}


# -- one budget -------------------------------------------------------------------------------

async def replay(client: Client, conversation: Conversation) -> dict[str, Any]:
    """Every session as a conversation of its own; the visibility delay after each."""
    expected = 0
    requests = 0
    delays: list[float] = []
    shortfall = 0
    started = time.perf_counter()
    for session in conversation.sessions:
        history: list[dict[str, Any]] = [
            {"role": "system", "content": f"{SYSTEM} Current date and time: "
                                          f"{session.date_time}."}]
        last_done = time.perf_counter()
        for exchange in session.exchanges:
            message = user_message(exchange.user, exchange.images)
            sent = await client.chat([*history, message], user_id=conversation.user_id,
                                     conversation=f"{conversation.name}-s{session.number}",
                                     answer=exchange.answer)
            history += [message, {"role": "assistant", "content": exchange.answer}]
            last_done = sent.done
            requests += 1
        expected += memories_written(session)
        seen, delay = await wait_visible(client, conversation.user_id, expected, last_done)
        if delay is not None:
            delays.append(delay)
        else:
            shortfall += expected - seen
            expected = seen
    listed = await client.listed(conversation.user_id)
    return {"sessions": len(conversation.sessions), "requests": requests,
            "memories": expected, "listed": listed, "missing_memories": shortfall,
            "visibility_s": delays, "seconds": time.perf_counter() - started}


async def wait_visible(client: Client, user_id: str, expected: int,
                       since: float) -> tuple[int, float | None]:
    """Poll until the user has ``expected`` memories: (count, seconds after ``since``).

    The delay is ``None`` when the count stopped short of ``expected``.
    """
    last, changed = -1, time.perf_counter()
    while True:
        count = await client.memory_count(user_id)
        now = time.perf_counter()
        if count >= expected:
            return count, now - since
        if count != last:
            last, changed = count, now
        elif now - changed > STALL_SECONDS:
            return count, None
        await asyncio.sleep(POLL_SECONDS)


def block_in(body: bytes) -> str | None:
    """The memory block among the system messages of a request body, if there is one."""
    for message in json.loads(body).get("messages", []):
        content = message.get("content")
        if message.get("role") == "system" and isinstance(content, str) \
                and BLOCK_OPEN in content:
            return content
    return None


def snippets(block: str) -> list[tuple[str, str]]:
    """``(role, text)`` of each memory shown in a block, in order."""
    end = block.rfind("\n" + BLOCK_OUTRO)
    if end < 0:
        end = len(block)
    heads = list(_SNIPPET_HEAD.finditer(block, 0, end))
    found = []
    for head, following in itertools.zip_longest(heads, heads[1:]):
        stop = following.start() - 1 if following is not None else end
        found.append((head.group(1), block[head.end():stop]))
    return found


def recalled(turn: Utterance, shown: Sequence[tuple[str, str]], *, normalise: bool) -> bool:
    """Whether the turn's text is a memory of the block (or a paragraph of a merged one)."""
    text = turn.text.strip() if normalise else turn.text
    return any(role == turn.role and (text == memory or text in memory.split("\n\n"))
               for role, memory in shown)


async def ask(client: Client, conversation: Conversation, question: Question,
              number: int) -> dict[str, Any]:
    """The question in a new conversation, with memory and again without; its score."""
    messages = [{"role": "system", "content": SYSTEM},
                {"role": "user", "content": question.text}]
    conv_id = f"{conversation.name}-q{question.index}"

    async def send(mode: str) -> Sent:
        return await client.chat(messages, user_id=conversation.user_id,
                                 conversation=f"{conv_id}-{mode}", answer=QUESTION_ANSWER,
                                 mode=mode)

    # Alternate the order, so that neither kind always comes first on a warm path.
    if number % 2:
        control, sent = await send("off"), await send("read")
    else:
        sent, control = await send("read"), await send("off")
    block = block_in(sent.upstream_body)
    shown = snippets(block) if block else []
    turns = [conversation.turns[dia_id] for dia_id in question.evidence]
    found = [t.dia_id for t in turns if recalled(t, shown, normalise=True)]
    exact = [t.dia_id for t in turns if recalled(t, shown, normalise=False)]
    return {
        "conversation": conversation.name, "qa_index": question.index,
        "category": question.category, "evidence": list(question.evidence),
        "found": found, "found_exact": exact,
        "recall": len(found) / len(turns), "recall_exact": len(exact) / len(turns),
        "block": block is not None, "memories": sent.memories, "snippets": len(shown),
        "block_tokens": len(block.encode()) / BYTES_PER_TOKEN if block else 0.0,
        "forward_ms": sent.forward_s * 1000, "first_byte_ms": sent.first_byte_s * 1000,
        "forward_off_ms": control.forward_s * 1000,
        "first_byte_off_ms": control.first_byte_s * 1000,
    }


async def run_budget(budget: int, conversations: Sequence[Conversation], upstream: FakeUpstream,
                     group: ProcessGroup, work: Path, memory: dict[str, Any],
                     into: dict[str, Any]) -> None:
    """Replay and ask at one budget, with a memproxy and a memory file or database of its own.

    ``into`` is filled as the run goes, so an interrupted run still reports what it did.
    """
    proxy = Memproxy(group, work, budget, upstream.port, memory)
    into.update(budget=budget, replay={}, questions=[], phases={})
    started = time.perf_counter()
    try:
        await proxy.start()
        timeout = aiohttp.ClientTimeout(total=120)
        async with aiohttp.ClientSession(timeout=timeout) as http:
            client = Client(http, proxy, upstream)
            for conversation in conversations:
                into["replay"][conversation.name] = await replay(client, conversation)
                figures = into["replay"][conversation.name]
                worst = max(figures["visibility_s"], default=float("nan")) * 1000
                print(f"  [{budget}] replayed {conversation.name}: {figures['sessions']} "
                      f"sessions, {figures['requests']} requests, {figures['memories']} "
                      f"memories in {figures['seconds']:.1f} s; worst visibility "
                      f"{worst:.0f} ms", flush=True)
            into["phases"]["replay_s"] = time.perf_counter() - started
            before = await client.metrics()
            asked = time.perf_counter()
            number = 0
            for conversation in conversations:
                for question in conversation.questions:
                    into["questions"].append(await ask(client, conversation, question, number))
                    number += 1
                print(f"  [{budget}] asked {conversation.name}: "
                      f"{len(conversation.questions)} questions", flush=True)
            into["phases"]["questions_s"] = time.perf_counter() - asked
            stored = 0
            for conversation in conversations:
                stored += (await client.memory_count(conversation.user_id)
                           - into["replay"][conversation.name]["memories"])
            into["stored_by_questions"] = stored
            after = await client.metrics()
            into["recall_histogram"] = histogram_delta(before, after)
    finally:
        proxy.stop()
        into["log_events"] = proxy.log_events()
        into["phases"]["total_s"] = time.perf_counter() - started


def histogram_delta(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """What the recall histogram and the skip counters gained between two scrapes."""
    buckets = {le: after["buckets"][le] - before["buckets"].get(le, 0.0)
               for le in after["buckets"]}
    skipped = {reason: value - before["skipped"].get(reason, 0.0)
               for reason, value in after["skipped"].items()}
    return {"count": after["count"] - before["count"], "sum_s": after["sum"] - before["sum"],
            "buckets": buckets, "skipped": {k: v for k, v in skipped.items() if v}}


def bucket_bound(histogram: dict[str, Any], p: float) -> float:
    """The upper bound, in seconds, of the bucket that holds the ``p``-th percentile."""
    count = histogram["count"]
    if not count:
        return float("nan")
    for le, cumulative in sorted(histogram["buckets"].items(), key=lambda b: float(b[0])):
        if cumulative >= count * p / 100:
            return float(le)
    return float("inf")


# -- figures ----------------------------------------------------------------------------------

def mean(values: Sequence[float]) -> float:
    return statistics.fmean(values) if values else float("nan")


def summarise(run: dict[str, Any], names: Sequence[str]) -> dict[str, Any]:
    """Recall by conversation and category, latency, tokens and visibility of one budget."""
    questions = run["questions"]
    scores: dict[str, dict[str, dict[str, float]]] = {}
    for name in [*names, "all"]:
        mine = [q for q in questions if name in ("all", q["conversation"])]
        groups = {label: [q for q in mine if q["category"] == category]
                  for category, label in CATEGORIES.items()}
        groups["overall"] = mine
        scores[name] = {label: {"questions": len(group),
                                "recall": mean([q["recall"] for q in group]),
                                "recall_exact": mean([q["recall_exact"] for q in group])}
                        for label, group in groups.items()}
    forward = [q["forward_ms"] for q in questions]
    forward_off = [q["forward_off_ms"] for q in questions]
    first = [q["first_byte_ms"] for q in questions]
    first_off = [q["first_byte_off_ms"] for q in questions]
    added = [a - b for a, b in zip(forward, forward_off, strict=True)]
    added_first = [a - b for a, b in zip(first, first_off, strict=True)]
    histogram = run.get("recall_histogram") or {"count": 0, "sum_s": 0.0, "buckets": {}}
    tokens = [q["block_tokens"] for q in questions]
    visibility = [d for r in run["replay"].values() for d in r["visibility_s"]]
    return {
        "scores": scores,
        "latency_ms": {
            "histogram_recalls": histogram["count"],
            "histogram_mean": histogram["sum_s"] / histogram["count"] * 1000
            if histogram["count"] else float("nan"),
            "histogram_p50_at_most": bucket_bound(histogram, 50) * 1000,
            "histogram_p95_at_most": bucket_bound(histogram, 95) * 1000,
            "skipped": histogram.get("skipped", {}),
            **{f"{name}_p{p}": percentile(values, p)
               for name, values in (("forward", forward), ("forward_off", forward_off),
                                    ("forward_added", added), ("first_byte", first),
                                    ("first_byte_off", first_off),
                                    ("first_byte_added", added_first))
               for p in (50, 95)},
        },
        "tokens": {"mean": mean(tokens), "max": max(tokens, default=0.0),
                   "without_block": sum(not q["block"] for q in questions),
                   "mean_snippets": mean([q["snippets"] for q in questions])},
        "visibility_ms": {"sessions": len(visibility),
                          "p50": percentile(visibility, 50) * 1000,
                          "max": max(visibility, default=float("nan")) * 1000},
        "missing_memories": sum(r["missing_memories"] for r in run["replay"].values()),
        "over_budget": sum(q["block_tokens"] > run["budget"] for q in questions),
    }


def print_budget(run: dict[str, Any], summary: dict[str, Any], names: Sequence[str]) -> None:
    budget = run["budget"]
    print(f"\nbudget {budget} tokens: evidence recall (mean over questions of the share of "
          "evidence turns wholly in the block; questions in brackets)")
    labels = [*CATEGORIES.values(), "overall"]
    print(f"{'conversation':<14}" + "".join(f"{label:>16}" for label in labels))
    for name in [*names, "all"]:
        row = summary["scores"][name]
        cells = "".join(
            f"{row[label]['recall']:>10.3f} ({row[label]['questions']:>3})" if
            row[label]["questions"] else f"{'-':>16}" for label in labels)
        print(f"{'all' if name == 'all' else name:<14}{cells}")
    overall = summary["scores"]["all"]["overall"]
    print(f"text compared after stripping white space at both ends (what the store does): "
          f"{overall['recall']:.3f}; raw text: {overall['recall_exact']:.3f}")
    tokens = summary["tokens"]
    print(f"tokens injected per question (block bytes / {BYTES_PER_TOKEN}): mean "
          f"{tokens['mean']:.0f}, max {tokens['max']:.0f}; {tokens['mean_snippets']:.1f} "
          f"memories a block on average; questions without a block: {tokens['without_block']}"
          f", blocks over the budget: {summary['over_budget']}")
    latency = summary["latency_ms"]
    print(f"recall, memproxy_memory_recall_seconds ({latency['histogram_recalls']:.0f} "
          f"recalls): mean {latency['histogram_mean']:.2f} ms, p50 <= "
          f"{latency['histogram_p50_at_most']:g} ms, p95 <= "
          f"{latency['histogram_p95_at_most']:g} ms (bucket bounds); skipped: "
          f"{latency['skipped'] or 'none'}")
    print(f"client sent -> upstream received: with memory p50 {latency['forward_p50']:.2f} / "
          f"p95 {latency['forward_p95']:.2f} ms, memory off p50 "
          f"{latency['forward_off_p50']:.2f} / p95 {latency['forward_off_p95']:.2f} ms; added "
          f"by memory (paired) p50 {latency['forward_added_p50']:.2f} / p95 "
          f"{latency['forward_added_p95']:.2f} ms")
    print(f"time to first byte: with memory p50 {latency['first_byte_p50']:.2f} / p95 "
          f"{latency['first_byte_p95']:.2f} ms, memory off p50 "
          f"{latency['first_byte_off_p50']:.2f} / p95 {latency['first_byte_off_p95']:.2f} ms; "
          f"added (paired) p50 {latency['first_byte_added_p50']:.2f} / p95 "
          f"{latency['first_byte_added_p95']:.2f} ms")
    visibility = summary["visibility_ms"]
    print(f"writes visible after the session's last answer: p50 {visibility['p50']:.1f} ms, "
          f"worst {visibility['max']:.1f} ms over {visibility['sessions']} sessions; "
          f"memories never visible: {summary['missing_memories']}; memories the questions "
          f"added: {run.get('stored_by_questions', 'not checked')}")
    phases = run["phases"]
    print(f"run: replay {phases.get('replay_s', float('nan')):.1f} s, questions "
          f"{phases.get('questions_s', float('nan')):.1f} s; memproxy log warnings/errors: "
          f"{run.get('log_events') or 'none'}")


# -- the command ------------------------------------------------------------------------------

async def main_async(args: argparse.Namespace, results: dict[str, Any]) -> None:
    paths = [args.data / f"{name}.json" for name in args.conversations] if args.conversations \
        else sorted(args.data.glob("*.json"))
    missing = [str(p) for p in paths if not p.is_file()]
    if not paths or missing:
        raise ReplayError(f"no LoCoMo conversation at {missing or args.data}")
    conversations = [load(path) for path in paths]
    names = [c.name for c in conversations]
    results["conversations"] = {c.name: {
        "sessions": len(c.sessions), "turns": len(c.turns), "questions": len(c.questions),
        "without_evidence": c.without_evidence, "dropped_evidence": c.dropped_evidence,
        "repaired_evidence": c.repaired_evidence,
        "openers": c.openers, "closers": c.closers, "merged_turns": c.merged_turns,
    } for c in conversations}
    for c in conversations:
        print(f"{c.name}: {len(c.sessions)} sessions, {len(c.turns)} turns, "
              f"{len(c.questions)} questions (left out without usable evidence: "
              f"{c.without_evidence}; evidence ids dropped: {c.dropped_evidence or 'none'}, "
              f"repaired: {c.repaired_evidence or 'none'}); "
              f"openers {c.openers}, closers {c.closers}, merged turns {c.merged_turns}",
              flush=True)
    group = ProcessGroup()
    upstream = FakeUpstream()
    work = Path(tempfile.mkdtemp(prefix="memproxy-locomo-"))
    try:
        with contextlib.ExitStack() as stack:
            server_dsn = None
            if args.backend == "postgres":
                server_dsn = stack.enter_context(postgres_server(args.dsn))
                results["postgres"] = await postgres_settings(server_dsn)
                print(results["postgres"], flush=True)
            await upstream.start()
            for budget in args.budgets:
                run: dict[str, Any] = {}
                results["runs"].append(run)
                async with memory_section(server_dsn, work, budget) as memory:
                    await run_budget(budget, conversations, upstream, group, work, memory, run)
                run["summary"] = summarise(run, names)
                print_budget(run, run["summary"], names)
    finally:
        group.stop_all()
        await upstream.stop()
        shutil.rmtree(work, ignore_errors=True)


@contextlib.asynccontextmanager
async def memory_section(server_dsn: str | None, work: Path,
                         budget: int) -> AsyncIterator[dict[str, Any]]:
    """Where one budget's memproxy keeps memory: a new SQLite file in ``work``, or (with a
    PostgreSQL server) a new database, dropped when the budget is done."""
    if server_dsn is None:
        yield {"backend": "local", "path": str(work / f"memory-{budget}.db")}
        return
    name, dsn = await create_database(server_dsn, f"locomo_{budget}")
    try:
        yield {"backend": "postgres", "dsn": dsn}
    finally:
        await drop_database(server_dsn, name)


@contextlib.asynccontextmanager
async def stopped_by_signals() -> AsyncIterator[None]:
    """SIGTERM and SIGHUP cancel the run, as Ctrl-C does."""
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    assert task is not None
    for signum in (signal.SIGTERM, signal.SIGHUP):
        loop.add_signal_handler(signum, task.cancel)
    try:
        yield
    finally:
        for signum in (signal.SIGTERM, signal.SIGHUP):
            loop.remove_signal_handler(signum)


async def bounded(args: argparse.Namespace, results: dict[str, Any]) -> None:
    async with stopped_by_signals():
        try:
            async with asyncio.timeout(args.max_minutes * 60) as limit:
                await main_async(args, results)
        except TimeoutError:
            if limit.expired():
                raise TimeLimit(f"the time limit of {args.max_minutes:g} minutes passed") \
                    from None
            raise


def write_results(results: dict[str, Any]) -> None:
    path = RESULTS[results["backend"]]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=1, allow_nan=True) + "\n")
    print(f"\nraw figures: {path.relative_to(REPO)}")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.locomo",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA,
                        help=f"folder of the LoCoMo conversation files (default {DEFAULT_DATA})")
    parser.add_argument("--budgets", default="1500,500",
                        help="recall budgets in tokens, comma-separated (default 1500,500)")
    parser.add_argument("--conversations", default="",
                        help="conversation files by name, e.g. 26,30 (default: all in --data)")
    parser.add_argument("--backend", choices=("local", "postgres"), default="local",
                        help="where memproxy keeps memory: an SQLite file, or a PostgreSQL "
                             "database (default local)")
    parser.add_argument("--dsn", default=None,
                        help="postgres: a server to create each budget's database on (libpq "
                             "string or postgresql:// URL); default: a throwaway server")
    parser.add_argument("--max-minutes", type=float, default=20,
                        help="the run stops by itself after this long (default 20)")
    args = parser.parse_args(argv)
    if args.dsn is not None and args.backend != "postgres":
        parser.error("--dsn goes with --backend postgres")
    try:
        args.budgets = [int(b) for b in args.budgets.split(",") if b.strip()]
    except ValueError:
        parser.error("--budgets takes whole numbers, e.g. 1500,500")
    if not args.budgets or min(args.budgets) < 1:
        parser.error("--budgets needs at least one budget of 1 token or more")
    args.conversations = [c.strip() for c in args.conversations.split(",") if c.strip()]
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.time()
    results: dict[str, Any] = {
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        "complete": False, "data": str(args.data), "backend": args.backend,
        "budgets": args.budgets,
        "versions": {"memproxy": memproxy.__version__, "python": platform.python_version(),
                     "aiohttp": aiohttp.__version__},
        "machine": {"platform": platform.platform(), "processor": platform.machine()},
        "runs": [],
    }
    status = 1
    try:
        asyncio.run(bounded(args, results))
        results["complete"] = True
        status = 0
    except TimeLimit as exc:
        print(f"stopped: {exc}", file=sys.stderr)
    except (KeyboardInterrupt, asyncio.CancelledError):
        print("stopped by a signal", file=sys.stderr)
    except (ReplayError, BenchAborted) as exc:
        print(f"failed: {exc}", file=sys.stderr)
    finally:
        results["duration_s"] = time.time() - started
        write_results(results)
        print(f"run time {results['duration_s']:.0f} s", flush=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
