"""An offline LLM provider on loopback that speaks the OpenAI and Anthropic wire formats.

``memproxy start`` runs it for the bundled config's demo models (``memproxy.demo_provider``),
so every client, streaming included, can try the whole chain with no network and no
provider key. With ``demo`` on, each answer says what reached the provider: the last user
text, the memory space (``x-sm-user-id``) and how many memories memproxy added. Without it,
every answer is the fixed ``reply``.

It records every request (method, path, query, headers, body) before answering, so tests
can check exactly what reached the provider, e.g. through a real LiteLLM proxy.

In-process use::

    async with DemoProvider() as provider:
        ...  # point a client or LiteLLM at provider.url (OpenAI: provider.url + "/v1")
        assert provider.find("/v1/chat/completions")

As a separate process::

    python -m memproxy.demo_provider --port 0 [--demo] [--record /tmp/requests.jsonl]

prints ``READY http://127.0.0.1:PORT`` once listening and runs until stopped; each recorded
request is appended to the record file as one JSON line (only when ``--record`` is given:
the demo keeps nothing).

Endpoints (matched by path suffix, so any prefix such as ``/v3/api.anthropic.com`` works):

- ``GET .../models``: OpenAI model list, or the Anthropic one when the request carries
  ``anthropic-version`` or ``x-api-key``.
- ``POST .../chat/completions``: non-streaming and SSE streaming (``chat.completion.chunk``),
  with a usage chunk when ``stream_options.include_usage`` is set.
- ``POST .../embeddings``: float lists, or base64 when ``encoding_format`` is ``base64``.
- ``POST .../responses``: non-streaming and the streamed Responses event sequence.
- ``POST .../messages``: Anthropic Messages, non-streaming and the real streamed event sequence.
- ``POST .../messages/count_tokens``.
- ``GET``/``HEAD /``: 200, anything else: 404 (still recorded).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import itertools
import json
import re
import signal
import socket
import struct
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self, TextIO

from aiohttp import web
from multidict import CIMultiDictProxy

DEFAULT_REPLY = "Hello from the fake provider."
DEFAULT_CHUNK_DELAY = 0.005
EMBEDDING_DIMENSIONS = 8
#: Requests a demo provider keeps in ``requests``.
DEMO_KEEPS = 20
#: How much of the user's text a demo answer repeats.
DEMO_ECHO_CHARS = 200
#: The header memproxy names the memory space in (its default ``memproxy.headers.user_id``).
MEMORY_SPACE_HEADER = "x-sm-user-id"
#: memproxy's memory block, and one memory in it (``[YYYY-MM-DD] role: text``).
MEMORY_BLOCK = re.compile(r'<memories source="memproxy">(.*?)</memories>', re.DOTALL)
MEMORY_SNIPPET = re.compile(r"\[\d{4}-\d{2}-\d{2}\] ")
#: Context a client adds to the user's turn (Claude Code's reminders), not the user's words.
CLIENT_CONTEXT = re.compile(r"<system-reminder>.*?</system-reminder>", re.DOTALL)


@dataclass(frozen=True)
class RecordedRequest:
    """One request as the fake provider received it."""

    method: str
    path: str
    query: str
    headers: dict[str, str]  # lower-cased names; the last value of a repeated header wins
    body: bytes

    def json(self) -> Any:
        """The body parsed as JSON."""
        return json.loads(self.body)

    def text(self) -> str:
        """The body decoded as UTF-8 (invalid bytes replaced)."""
        return self.body.decode("utf-8", errors="replace")

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable form (body as text), as written to the record file."""
        return {
            "method": self.method,
            "path": self.path,
            "query": self.query,
            "headers": self.headers,
            "body": self.text(),
        }


def _strings(value: Any) -> Iterable[str]:
    """Every string inside a JSON value."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from _strings(item)


def _text_of(content: Any) -> str:
    """The text of one message's content: a string, or the text parts of a list."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = [part.get("text") for part in content if isinstance(part, dict)
                 and part.get("type") in ("text", "input_text")]
        return "\n".join(t for t in texts if isinstance(t, str))
    return ""


def last_user_text(payload: dict[str, Any]) -> str:
    """The latest user text of a Chat Completions, Messages or Responses request body."""
    items = payload.get("messages")
    if items is None:
        items = payload.get("input")
    if isinstance(items, str):
        return items
    for item in reversed(items if isinstance(items, list) else []):
        if isinstance(item, dict) and item.get("role") == "user":
            text = _text_of(item.get("content"))
            text = CLIENT_CONTEXT.sub("", MEMORY_BLOCK.sub("", text)).strip()
            if text:
                return text
    return ""


def memories_in(payload: dict[str, Any]) -> int:
    """How many memories memproxy's memory blocks in the request hold."""
    return sum(len(MEMORY_SNIPPET.findall(block))
               for text in _strings(payload) for block in MEMORY_BLOCK.findall(text))


def demo_answer(payload: dict[str, Any], headers: CIMultiDictProxy[str]) -> str:
    """What the demo answers: what it was sent, as the provider saw it."""
    said = " ".join(last_user_text(payload).split())
    if len(said) > DEMO_ECHO_CHARS:
        said = said[:DEMO_ECHO_CHARS].rstrip() + "..."
    space = headers.get(MEMORY_SPACE_HEADER) or "not forwarded"
    return (f"memproxy-demo here. You said: \"{said}\". "
            f"Your memory space: {space}. Memories in this request: {memories_in(payload)}.")


def split_reply(text: str) -> list[str]:
    """Split text into word-sized stream chunks ("Hello", " from", ...) that join back to it."""
    chunks: list[str] = []
    for i, word in enumerate(text.split(" ")):
        chunks.append(word if i == 0 else " " + word)
    return [c for c in chunks if c] or [text]


def _approx_tokens(value: Any) -> int:
    """A deterministic, rough token count (about four characters a token)."""
    if value is None:
        return 0
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
    return max(1, len(text) // 4)


def _sse_data(payload: Any) -> bytes:
    return b"data: " + json.dumps(payload).encode() + b"\n\n"


def _sse_event(name: str, payload: Any) -> bytes:
    return f"event: {name}\n".encode() + _sse_data(payload)


class DemoProvider:
    """An offline OpenAI/Anthropic provider served by aiohttp on loopback."""

    def __init__(
        self,
        reply: str = DEFAULT_REPLY,
        chunks: Sequence[str] | None = None,
        chunk_delay: float = DEFAULT_CHUNK_DELAY,
        model_ids: Iterable[str] = ("gpt-fake", "claude-fake"),
        record_file: str | Path | None = None,
        demo: bool = False,
    ) -> None:
        """
        reply: the assistant text of every answer.
        chunks: how streams split the reply (default: word by word, see ``split_reply``).
        chunk_delay: seconds to wait between stream events.
        model_ids: what the model lists return.
        record_file: if set, each recorded request is appended there as a JSON line.
        demo: answer with what the request carried (see ``demo_answer``) instead of ``reply``.
        """
        self.reply = reply
        self.demo = demo
        self.chunks: list[str] | None = list(chunks) if chunks is not None else None
        self.chunk_delay = chunk_delay
        self.model_ids: list[str] = list(model_ids)
        self.requests: list[RecordedRequest] = []
        self._record_path = Path(record_file) if record_file is not None else None
        self._record_fh: TextIO | None = None
        self._ids = itertools.count(1)
        self._runner: web.ServerRunner | None = None
        self._host = "127.0.0.1"
        self._port: int | None = None

    # ----------------------------------------------------------------- lifecycle

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        """Start listening (port 0 picks a free one); returns the base URL."""
        if self._runner is not None:
            raise RuntimeError("DemoProvider already started")
        if self._record_path is not None:
            self._record_fh = self._record_path.open("a", encoding="utf-8")
        # A low-level server rather than an Application: every request reaches _handle,
        # whatever its method or target (even CONNECT host:443), so all of them are recorded.
        server = web.Server(self._handle)
        runner = web.ServerRunner(server, handle_signals=False)
        await runner.setup()
        sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(128)
        sock.setblocking(False)
        site = web.SockSite(runner, sock)
        await site.start()
        self._runner = runner
        self._host = host
        self._port = sock.getsockname()[1]
        return self.url

    async def stop(self) -> None:
        """Stop listening and close the record file."""
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self._record_fh is not None:
            self._record_fh.close()
            self._record_fh = None

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("DemoProvider not started")
        return self._port

    @property
    def url(self) -> str:
        """Base URL without a trailing slash, e.g. ``http://127.0.0.1:PORT``."""
        host = f"[{self._host}]" if ":" in self._host else self._host
        return f"http://{host}:{self.port}"

    # ----------------------------------------------------------------- recorded requests

    def clear(self) -> None:
        """Forget the recorded requests."""
        self.requests.clear()

    def find(self, path_suffix: str, method: str | None = None) -> list[RecordedRequest]:
        """Recorded requests whose path ends with ``path_suffix`` (and of ``method``, if given)."""
        return [
            r
            for r in self.requests
            if r.path.endswith(path_suffix) and (method is None or r.method == method.upper())
        ]

    def last(self, path_suffix: str = "", method: str | None = None) -> RecordedRequest:
        """The latest recorded request matching like ``find``; AssertionError if none."""
        found = self.find(path_suffix, method)
        if not found:
            seen = [f"{r.method} {r.path}" for r in self.requests]
            raise AssertionError(f"no request to *{path_suffix} recorded; seen: {seen}")
        return found[-1]

    async def wait_for(
        self, path_suffix: str, count: int = 1, timeout: float = 5.0
    ) -> list[RecordedRequest]:
        """Wait until at least ``count`` requests match ``path_suffix``; returns them all."""
        deadline = asyncio.get_running_loop().time() + timeout
        while len(found := self.find(path_suffix)) < count:
            if asyncio.get_running_loop().time() > deadline:
                raise AssertionError(
                    f"{len(found)} request(s) to *{path_suffix} after {timeout}s, wanted {count}"
                )
            await asyncio.sleep(0.01)
        return found

    def _record(self, recorded: RecordedRequest) -> None:
        self.requests.append(recorded)
        if self.demo:  # a demo runs for days: it keeps only the latest few
            del self.requests[:-DEMO_KEEPS]
        if self._record_fh is not None:
            self._record_fh.write(json.dumps(recorded.to_dict()) + "\n")
            self._record_fh.flush()

    # ----------------------------------------------------------------- dispatch

    async def _handle(self, request: web.BaseRequest) -> web.StreamResponse:
        body = await request.content.read()  # no size limit, unlike request.read()
        self._record(
            RecordedRequest(
                method=request.method,
                path=request.path or request.raw_path,  # CONNECT host:port has no path
                query=request.query_string,
                headers={k.lower(): v for k, v in request.headers.items()},
                body=body,
            )
        )
        path = request.path.rstrip("/")
        method = request.method

        if method in ("GET", "HEAD") and path == "":
            return web.Response(text="memproxy demo provider\n")
        if method == "GET" and path.endswith("/models"):
            return self._models(request)
        if method != "POST":
            return self._error(404, f"no route for {method} {request.path}")

        try:
            payload = json.loads(body) if body else {}
        except ValueError:
            return self._error(400, "request body is not JSON")
        if not isinstance(payload, dict):
            return self._error(400, "request body is not a JSON object")

        reply = self.answer(payload, request.headers)
        if path.endswith("/messages/count_tokens"):
            return web.json_response({"input_tokens": self._anthropic_input_tokens(payload)})
        if path.endswith("/messages"):
            if payload.get("stream"):
                return await self._anthropic_stream(request, payload, reply)
            return web.json_response(self._anthropic_message(payload, reply))
        if path.endswith("/chat/completions"):
            if payload.get("stream"):
                return await self._chat_stream(request, payload, reply)
            return web.json_response(self._chat_completion(payload, reply))
        if path.endswith("/embeddings"):
            return web.json_response(self._embeddings(payload))
        if path.endswith("/responses"):
            if payload.get("stream"):
                return await self._responses_stream(request, payload, reply)
            return web.json_response(self._response_object(payload, reply, "completed"))
        return self._error(404, f"no route for {method} {request.path}")

    @staticmethod
    def _error(status: int, message: str) -> web.Response:
        return web.json_response(
            {"error": {"message": message, "type": "invalid_request_error", "code": None}},
            status=status,
        )

    async def _open_stream(self, request: web.BaseRequest) -> web.StreamResponse:
        response = web.StreamResponse(
            headers={
                "Content-Type": "text/event-stream; charset=utf-8",
                "Cache-Control": "no-cache",
            }
        )
        await response.prepare(request)
        return response

    async def _pause(self) -> None:
        if self.chunk_delay > 0:
            await asyncio.sleep(self.chunk_delay)

    def stream_pieces(self, reply: str | None = None) -> list[str]:
        """The text pieces a stream sends: ``chunks``, or else the reply split word by word."""
        if self.chunks is not None:
            return list(self.chunks)
        return split_reply(self.reply if reply is None else reply)

    def answer(self, payload: dict[str, Any], headers: CIMultiDictProxy[str]) -> str:
        """The assistant text for this request: ``reply``, or in demo mode what it carried."""
        return demo_answer(payload, headers) if self.demo else self.reply

    def _next_id(self, prefix: str) -> str:
        return f"{prefix}{next(self._ids):06d}"

    # ----------------------------------------------------------------- models

    def _models(self, request: web.BaseRequest) -> web.Response:
        created = 1_700_000_000
        if "anthropic-version" in request.headers or "x-api-key" in request.headers:
            data = [
                {
                    "type": "model",
                    "id": model_id,
                    "display_name": model_id,
                    "created_at": "2025-01-01T00:00:00Z",
                }
                for model_id in self.model_ids
            ]
            return web.json_response(
                {
                    "data": data,
                    "has_more": False,
                    "first_id": data[0]["id"] if data else None,
                    "last_id": data[-1]["id"] if data else None,
                }
            )
        return web.json_response(
            {
                "object": "list",
                "data": [
                    {
                        "id": model_id,
                        "object": "model",
                        "created": created,
                        "owned_by": "fake-provider",
                    }
                    for model_id in self.model_ids
                ],
            }
        )

    # ----------------------------------------------------------------- OpenAI chat

    def _chat_usage(self, payload: dict[str, Any], reply: str) -> dict[str, Any]:
        prompt = _approx_tokens(payload.get("messages"))
        completion = _approx_tokens(reply)
        return {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
            "completion_tokens_details": {
                "reasoning_tokens": 0,
                "audio_tokens": 0,
                "accepted_prediction_tokens": 0,
                "rejected_prediction_tokens": 0,
            },
        }

    def _chat_completion(self, payload: dict[str, Any], reply: str) -> dict[str, Any]:
        return {
            "id": self._next_id("chatcmpl-fake"),
            "object": "chat.completion",
            "created": int(time.time()),
            "model": payload.get("model", "gpt-fake"),
            "choices": [
                {
                    "index": 0,
                    "message": {
                        "role": "assistant",
                        "content": reply,
                        "refusal": None,
                        "annotations": [],
                    },
                    "logprobs": None,
                    "finish_reason": "stop",
                }
            ],
            "usage": self._chat_usage(payload, reply),
            "service_tier": "default",
            "system_fingerprint": "fp_fake",
        }

    async def _chat_stream(
        self, request: web.BaseRequest, payload: dict[str, Any], reply: str
    ) -> web.StreamResponse:
        include_usage = bool((payload.get("stream_options") or {}).get("include_usage"))
        base = {
            "id": self._next_id("chatcmpl-fake"),
            "object": "chat.completion.chunk",
            "created": int(time.time()),
            "model": payload.get("model", "gpt-fake"),
            "service_tier": "default",
            "system_fingerprint": "fp_fake",
        }

        def chunk(delta: dict[str, Any], finish_reason: str | None = None) -> dict[str, Any]:
            out: dict[str, Any] = {
                **base,
                "choices": [
                    {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
                ],
            }
            if include_usage:
                out["usage"] = None
            return out

        response = await self._open_stream(request)
        await response.write(
            _sse_data(chunk({"role": "assistant", "content": "", "refusal": None}))
        )
        for piece in self.stream_pieces(reply):
            await self._pause()
            await response.write(_sse_data(chunk({"content": piece})))
        await self._pause()
        await response.write(_sse_data(chunk({}, "stop")))
        if include_usage:
            await response.write(
                _sse_data({**base, "choices": [], "usage": self._chat_usage(payload, reply)})
            )
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response

    # ----------------------------------------------------------------- OpenAI embeddings

    def _embeddings(self, payload: dict[str, Any]) -> dict[str, Any]:
        raw = payload.get("input", "")
        inputs: list[Any] = (
            raw if isinstance(raw, list) and raw and not isinstance(raw[0], int) else [raw]
        )
        as_base64 = payload.get("encoding_format") == "base64"
        data = []
        for index, item in enumerate(inputs):
            seed = sum(json.dumps(item).encode()) % 97
            vector = [
                round(((seed + 7 * i) % 19) / 19.0 - 0.5, 6) for i in range(EMBEDDING_DIMENSIONS)
            ]
            embedding: Any = (
                base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
                if as_base64
                else vector
            )
            data.append({"object": "embedding", "index": index, "embedding": embedding})
        tokens = _approx_tokens(raw)
        return {
            "object": "list",
            "data": data,
            "model": payload.get("model", "text-embedding-fake"),
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }

    # ----------------------------------------------------------------- OpenAI responses

    def _responses_usage(self, payload: dict[str, Any], reply: str) -> dict[str, Any]:
        prompt = _approx_tokens(payload.get("input"))
        completion = _approx_tokens(reply)
        return {
            "input_tokens": prompt,
            "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": completion,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": prompt + completion,
        }

    def _response_object(
        self,
        payload: dict[str, Any],
        text: str | None,
        status: str,
        response_id: str | None = None,
        message_id: str | None = None,
    ) -> dict[str, Any]:
        output: list[dict[str, Any]] = []
        if text is not None:
            output.append(
                self._response_message(message_id or self._next_id("msg_fake"), text, "completed")
            )
        return {
            "id": response_id or self._next_id("resp_fake"),
            "object": "response",
            "created_at": int(time.time()),
            "status": status,
            "error": None,
            "incomplete_details": None,
            "instructions": payload.get("instructions"),
            "max_output_tokens": payload.get("max_output_tokens"),
            "model": payload.get("model", "gpt-fake"),
            "output": output,
            "parallel_tool_calls": True,
            "previous_response_id": payload.get("previous_response_id"),
            "reasoning": {"effort": None, "summary": None},
            "store": payload.get("store", True),
            "temperature": 1.0,
            "text": {"format": {"type": "text"}},
            "tool_choice": "auto",
            "tools": [],
            "top_p": 1.0,
            "truncation": "disabled",
            "usage": self._responses_usage(payload, text or "") if status == "completed"
            else None,
            "user": None,
            "metadata": {},
        }

    @staticmethod
    def _response_message(message_id: str, text: str, status: str) -> dict[str, Any]:
        return {
            "type": "message",
            "id": message_id,
            "status": status,
            "role": "assistant",
            "content": [{"type": "output_text", "text": text, "annotations": []}]
            if status == "completed"
            else [],
        }

    async def _responses_stream(
        self, request: web.BaseRequest, payload: dict[str, Any], reply: str
    ) -> web.StreamResponse:
        response_id = self._next_id("resp_fake")
        message_id = self._next_id("msg_fake")
        sequence = itertools.count(0)
        response = await self._open_stream(request)

        async def send(name: str, data: dict[str, Any]) -> None:
            await response.write(
                _sse_event(name, {"type": name, "sequence_number": next(sequence), **data})
            )

        in_progress = self._response_object(payload, None, "in_progress", response_id)
        await send("response.created", {"response": in_progress})
        await send("response.in_progress", {"response": in_progress})
        await send(
            "response.output_item.added",
            {"output_index": 0, "item": self._response_message(message_id, "", "in_progress")},
        )
        await send(
            "response.content_part.added",
            {
                "item_id": message_id,
                "output_index": 0,
                "content_index": 0,
                "part": {"type": "output_text", "text": "", "annotations": []},
            },
        )
        for piece in self.stream_pieces(reply):
            await self._pause()
            await send(
                "response.output_text.delta",
                {
                    "item_id": message_id,
                    "output_index": 0,
                    "content_index": 0,
                    "delta": piece,
                    "logprobs": [],
                },
            )
        await self._pause()
        text = "".join(self.stream_pieces(reply))
        await send(
            "response.output_text.done",
            {
                "item_id": message_id,
                "output_index": 0,
                "content_index": 0,
                "text": text,
                "logprobs": [],
            },
        )
        await send(
            "response.content_part.done",
            {
                "item_id": message_id,
                "output_index": 0,
                "content_index": 0,
                "part": {"type": "output_text", "text": text, "annotations": []},
            },
        )
        await send(
            "response.output_item.done",
            {"output_index": 0, "item": self._response_message(message_id, text, "completed")},
        )
        done = self._response_object(payload, text, "completed", response_id, message_id)
        await send("response.completed", {"response": done})
        await response.write_eof()
        return response

    # ----------------------------------------------------------------- Anthropic messages

    @staticmethod
    def _anthropic_input_tokens(payload: dict[str, Any]) -> int:
        return _approx_tokens(payload.get("messages")) + _approx_tokens(payload.get("system"))

    def _anthropic_usage(self, payload: dict[str, Any], output_tokens: int) -> dict[str, Any]:
        return {
            "input_tokens": self._anthropic_input_tokens(payload),
            "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": 0,
            "output_tokens": output_tokens,
        }

    def _anthropic_message(self, payload: dict[str, Any], reply: str) -> dict[str, Any]:
        return {
            "id": self._next_id("msg_fake"),
            "type": "message",
            "role": "assistant",
            "model": payload.get("model", "claude-fake"),
            "content": [{"type": "text", "text": reply}],
            "stop_reason": "end_turn",
            "stop_sequence": None,
            "usage": self._anthropic_usage(payload, _approx_tokens(reply)),
        }

    async def _anthropic_stream(
        self, request: web.BaseRequest, payload: dict[str, Any], reply: str
    ) -> web.StreamResponse:
        response = await self._open_stream(request)
        message = {
            "id": self._next_id("msg_fake"),
            "type": "message",
            "role": "assistant",
            "model": payload.get("model", "claude-fake"),
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": self._anthropic_usage(payload, 1),
        }
        await response.write(
            _sse_event("message_start", {"type": "message_start", "message": message})
        )
        await response.write(
            _sse_event(
                "content_block_start",
                {
                    "type": "content_block_start",
                    "index": 0,
                    "content_block": {"type": "text", "text": ""},
                },
            )
        )
        await response.write(_sse_event("ping", {"type": "ping"}))
        for piece in self.stream_pieces(reply):
            await self._pause()
            await response.write(
                _sse_event(
                    "content_block_delta",
                    {
                        "type": "content_block_delta",
                        "index": 0,
                        "delta": {"type": "text_delta", "text": piece},
                    },
                )
            )
        await self._pause()
        await response.write(
            _sse_event("content_block_stop", {"type": "content_block_stop", "index": 0})
        )
        await response.write(
            _sse_event(
                "message_delta",
                {
                    "type": "message_delta",
                    "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                    "usage": {
                        "output_tokens": _approx_tokens("".join(self.stream_pieces(reply)))
                    },
                },
            )
        )
        await response.write(_sse_event("message_stop", {"type": "message_stop"}))
        await response.write_eof()
        return response


# --------------------------------------------------------------------- command line


async def _serve(args: argparse.Namespace) -> None:
    provider = DemoProvider(reply=args.reply, chunk_delay=args.delay, record_file=args.record,
                            demo=args.demo)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await provider.start(args.host, args.port)
    print(f"READY {provider.url}", flush=True)
    try:
        await stop.wait()
    finally:
        await provider.stop()


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m memproxy.demo_provider",
        description="An offline OpenAI/Anthropic provider: memproxy's demo models and its tests.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument(
        "--port", type=int, default=0, help="0 picks a free port (see the READY line)"
    )
    parser.add_argument(
        "--record", metavar="FILE", help="append recorded requests here as JSON lines"
    )
    parser.add_argument("--reply", default=DEFAULT_REPLY, help="assistant text of every answer")
    parser.add_argument(
        "--demo", action="store_true",
        help="answer with what the request carried: the user's text, the memory space and "
             "the number of memories memproxy added (instead of --reply)")
    parser.add_argument(
        "--delay", type=float, default=DEFAULT_CHUNK_DELAY, help="seconds between stream events"
    )
    asyncio.run(_serve(parser.parse_args(argv)))


if __name__ == "__main__":
    main(sys.argv[1:])
