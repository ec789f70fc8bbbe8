"""Memory's view of the three LLM APIs: the person's words, the memory block, the answer.

Request bodies are the ones the real OpenAI and Anthropic SDKs send, captured by a small
server on loopback, plus Claude Code and Codex bodies written after what those clients send.
Answers are the byte sequences each API streams or returns; the same bytes given to the real
SDKs show that they are shaped as the APIs shape them.
"""

from __future__ import annotations

import itertools
import json
import sys
import time
import tracemalloc
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from anthropic import AsyncAnthropic
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from openai import AsyncOpenAI

from memproxy.demo_provider import DemoProvider
from memproxy.errors import Dialect, stream_error_event
from memproxy.memory.dialects import (
    INJECTED_TAGS,
    AnswerReader,
    ApiFormat,
    Conversation,
    api_format,
    insert_block,
    read_request,
)

CHAT, RESPONSES, MESSAGES = ApiFormat.CHAT, ApiFormat.RESPONSES, ApiFormat.MESSAGES
BLOCK = "User Supermemories:\n- [2026-01-02] prefers tabs over spaces\n- lives in Köln 🌍"
#: A short answer with characters of two, three and four bytes in UTF-8.
PIECES = ["Grüße", " aus", " Köln", " — ", "🌍", "!"]
ANSWER = "".join(PIECES)
FUZZ = settings(max_examples=300, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


# -- answers as the APIs send them ---------------------------------------------------------

def sse(payload: Any, event: str | None = None) -> bytes:
    """One server-sent event; non-ASCII text raw in UTF-8, as the providers send it."""
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {json.dumps(payload, ensure_ascii=False)}\n\n".encode()


def chat_json(text: str) -> dict[str, Any]:
    return {"id": "chatcmpl-1", "object": "chat.completion", "created": 1_700_000_000,
            "model": "gpt-test", "choices": [{
                "index": 0, "finish_reason": "stop", "logprobs": None,
                "message": {"role": "assistant", "content": text, "refusal": None,
                            "annotations": []}}],
            "usage": {"prompt_tokens": 9, "completion_tokens": 5, "total_tokens": 14}}


def chat_stream(pieces: list[str]) -> bytes:
    base = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1_700_000_000,
            "model": "gpt-test", "system_fingerprint": "fp_1"}

    def chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
        return sse({**base, "choices": [{"index": 0, "delta": delta, "logprobs": None,
                                         "finish_reason": finish}]})

    return b"".join([
        chunk({"role": "assistant", "content": "", "refusal": None}),
        *(chunk({"content": piece}) for piece in pieces),
        chunk({}, "stop"),
        sse({**base, "choices": [], "usage": {"prompt_tokens": 9, "completion_tokens": 5,
                                              "total_tokens": 14}}),
        b"data: [DONE]\n\n",
    ])


def _response(status: str, text: str | None) -> dict[str, Any]:
    output = [] if text is None else [{
        "type": "message", "id": "msg_1", "status": "completed", "role": "assistant",
        "content": [{"type": "output_text", "text": text, "annotations": []}]}]
    return {"id": "resp_1", "object": "response", "created_at": 1_700_000_000,
            "status": status, "error": None, "incomplete_details": None,
            "instructions": None, "model": "gpt-test", "output": output,
            "parallel_tool_calls": True, "temperature": 1.0, "tool_choice": "auto",
            "tools": [], "top_p": 1.0, "text": {"format": {"type": "text"}},
            "truncation": "disabled", "metadata": {},
            "usage": {"input_tokens": 9, "input_tokens_details": {"cached_tokens": 0},
                      "output_tokens": 5, "output_tokens_details": {"reasoning_tokens": 0},
                      "total_tokens": 14} if status == "completed" else None}


def responses_json(text: str) -> dict[str, Any]:
    return _response("completed", text)


def responses_stream(pieces: list[str]) -> bytes:
    events: list[tuple[str, dict[str, Any]]] = []
    part = {"item_id": "msg_1", "output_index": 0, "content_index": 0}
    text = "".join(pieces)
    in_progress = {"type": "message", "id": "msg_1", "status": "in_progress",
                   "role": "assistant", "content": []}
    events += [("response.created", {"response": _response("in_progress", None)}),
               ("response.in_progress", {"response": _response("in_progress", None)}),
               ("response.output_item.added", {"output_index": 0, "item": in_progress}),
               ("response.content_part.added", {**part, "part": {
                   "type": "output_text", "text": "", "annotations": []}})]
    events += [("response.output_text.delta", {**part, "delta": piece, "logprobs": []})
               for piece in pieces]
    done = _response("completed", text)
    events += [("response.output_text.done", {**part, "text": text, "logprobs": []}),
               ("response.content_part.done", {**part, "part": {
                   "type": "output_text", "text": text, "annotations": []}}),
               ("response.output_item.done", {"output_index": 0, "item": done["output"][0]}),
               ("response.completed", {"response": done})]
    return b"".join(sse({"type": name, "sequence_number": number, **data}, name)
                    for number, (name, data) in enumerate(events))


def messages_json(text: str) -> dict[str, Any]:
    return {"id": "msg_1", "type": "message", "role": "assistant", "model": "claude-test",
            "content": [{"type": "text", "text": text}], "stop_reason": "end_turn",
            "stop_sequence": None, "usage": {"input_tokens": 9, "output_tokens": 5}}


def messages_stream(pieces: list[str]) -> bytes:
    start = {**messages_json(""), "content": [], "stop_reason": None}

    def event(name: str, **data: Any) -> bytes:
        return sse({"type": name, **data}, name)

    return b"".join([
        event("message_start", message=start),
        event("content_block_start", index=0, content_block={"type": "text", "text": ""}),
        event("ping"),
        *(event("content_block_delta", index=0, delta={"type": "text_delta", "text": piece})
          for piece in pieces),
        event("content_block_stop", index=0),
        event("message_delta", delta={"stop_reason": "end_turn", "stop_sequence": None},
              usage={"output_tokens": 5}),
        event("message_stop"),
    ])


STREAMS: dict[ApiFormat, Callable[[list[str]], bytes]] = {
    CHAT: chat_stream, RESPONSES: responses_stream, MESSAGES: messages_stream}
JSON_ANSWERS: dict[ApiFormat, Callable[[str], dict[str, Any]]] = {
    CHAT: chat_json, RESPONSES: responses_json, MESSAGES: messages_json}


def read_answer(format: ApiFormat, chunks: list[bytes], *, event_stream: bool = True,
                limit: int = 256 * 1024) -> str | None:
    reader = AnswerReader(format, event_stream=event_stream, limit=limit)
    for chunk in chunks:
        reader.feed(chunk)
    return reader.text()


def split_at(data: bytes, cuts: list[int]) -> list[bytes]:
    edges = [0, *sorted(cuts), len(data)]
    return [data[a:b] for a, b in itertools.pairwise(edges)]


# -- a small upstream that records what the SDKs send --------------------------------------

@dataclass
class Upstream:
    """Records each request body and answers it in its API's format, streamed on request."""

    url: str = ""
    bodies: list[bytes] = field(default_factory=list)
    paths: list[str] = field(default_factory=list)
    served: list[bytes] = field(default_factory=list)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        self.bodies.append(body)
        self.paths.append(request.path_qs)
        found = api_format(request.method, request.path)
        assert found is not None, request.path
        if json.loads(body).get("stream"):
            answer, kind = STREAMS[found](PIECES), "text/event-stream"
        else:
            answer, kind = json.dumps(JSON_ANSWERS[found](ANSWER)).encode(), "application/json"
        self.served.append(answer)
        return web.Response(body=answer, content_type=kind)


@pytest.fixture
async def upstream(aiohttp_server: Any) -> Upstream:
    recorder = Upstream()
    app = web.Application()
    app.router.add_post("/{tail:.*}", recorder.handle)
    server = await aiohttp_server(app)
    recorder.url = str(server.make_url("")).rstrip("/")
    return recorder


@pytest.fixture
async def openai_client(upstream: Upstream) -> AsyncIterator[AsyncOpenAI]:
    async with AsyncOpenAI(base_url=upstream.url + "/v1", api_key="sk-test",
                           max_retries=0) as client:
        yield client


@pytest.fixture
async def anthropic_client(upstream: Upstream) -> AsyncIterator[AsyncAnthropic]:
    async with AsyncAnthropic(base_url=upstream.url, api_key="sk-ant-test",
                              max_retries=0) as client:
        yield client


async def sent(upstream: Upstream, call: Awaitable[Any]) -> bytes:
    """The body the SDK sent for ``call``."""
    await call
    return upstream.bodies[-1]


def read(format: ApiFormat, raw: bytes) -> Conversation:
    conversation = read_request(format, raw)
    assert conversation is not None, raw[:300]
    return conversation


# -- checks on the block's place -----------------------------------------------------------

def without_block(format: ApiFormat, rewritten: bytes, original: dict[str, Any],
                  block: str = BLOCK) -> dict[str, Any]:
    """The rewritten body with the block taken out again, checking it sat where it belongs."""
    body = json.loads(rewritten)
    assert list(body)[:len(original)] == list(original), "the client's key order changed"
    if format is CHAT:
        messages = original["messages"]
        leading = next((at for at, message in enumerate(messages)
                        if message["role"] not in ("system", "developer")), len(messages))
        assert body["messages"].pop(leading) == {"role": "system", "content": block}
    elif format is MESSAGES:
        system = original.get("system")
        assert body["system"].pop() == {"type": "text", "text": block}
        if not isinstance(system, list):
            kept = system if isinstance(system, str) and system.strip() else None
            assert body["system"] == ([{"type": "text", "text": kept}] if kept else [])
            restore(body, original, "system")
    else:
        instructions = original.get("instructions")
        assert body["instructions"] == (f"{instructions}\n\n{block}" if instructions else block)
        restore(body, original, "instructions")
    return body


def restore(body: dict[str, Any], original: dict[str, Any], key: str) -> None:
    if key in original:
        body[key] = original[key]
    else:
        del body[key]


def cache_markers(value: Any, path: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    """Where every ``cache_control`` marker sits, and what it says."""
    if isinstance(value, dict):
        for key, item in value.items():
            if key == "cache_control":
                yield (*path, json.dumps(item))
            yield from cache_markers(item, (*path, key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from cache_markers(item, (*path, index))


def end_of_turns(format: ApiFormat, raw: bytes) -> int:
    """Where, in a serialised body, the last entry of its conversation ends."""
    turns = json.loads(raw)["input" if format is RESPONSES else "messages"]
    last = json.dumps(turns[-1], ensure_ascii=False, separators=(",", ":")).encode()
    at = raw.rfind(last)
    assert at > 0
    return at + len(last)


def assert_prefix_kept(format: ApiFormat, turn_n: bytes, turn_n1: bytes) -> None:
    """Turn N+1 with the block starts with turn N with the block, up to N's last entry."""
    before = insert_block(read(format, turn_n), BLOCK)
    after = insert_block(read(format, turn_n1), BLOCK)
    assert after != before
    assert after.startswith(before[:end_of_turns(format, before)])


# -- which requests are conversations ------------------------------------------------------

@pytest.mark.parametrize(("path", "expected"), [
    ("/v1/chat/completions", CHAT),
    ("/chat/completions", CHAT),
    ("/openai/v1/chat/completions", CHAT),
    ("/openai/deployments/gpt-4o/chat/completions", CHAT),
    ("/v1/responses", RESPONSES),
    ("/responses", RESPONSES),
    ("/v1/messages", MESSAGES),
    ("/messages", MESSAGES),
    ("/anthropic/v1/messages", MESSAGES),
])
def test_conversation_endpoints_are_recognised_by_their_path(path: str,
                                                             expected: ApiFormat) -> None:
    assert api_format("POST", path) is expected


@pytest.mark.parametrize(("method", "path"), [
    ("POST", "/v1/messages/count_tokens"),
    ("POST", "/v1/messages/batches"),
    ("POST", "/v1/responses/resp_123/cancel"),
    ("GET", "/v1/responses/resp_123"),
    ("GET", "/v1/chat/completions"),
    ("DELETE", "/v1/messages"),
    ("POST", "/v1/embeddings"),
    ("POST", "/v1/completions"),
    ("POST", "/v1/models"),
    ("POST", "/v1/chat/completions/"),
    ("POST", "/"),
])
def test_other_requests_are_not_conversations(method: str, path: str) -> None:
    assert api_format(method, path) is None


# -- what the OpenAI SDK sends -------------------------------------------------------------

async def test_openai_chat_the_persons_words_come_from_the_user_message(
        upstream: Upstream, openai_client: AsyncOpenAI) -> None:
    raw = await sent(upstream, openai_client.chat.completions.create(
        model="gpt-test", messages=[
            {"role": "system", "content": "You are terse."},
            {"role": "developer", "content": "Answer in German."},
            {"role": "user", "content": "Where is Köln? 🌍"}]))
    conversation = read(CHAT, raw)
    assert conversation.format is CHAT
    assert conversation.model == "gpt-test"
    assert conversation.stream is False
    assert conversation.first_user_text == conversation.new_user_text == "Where is Köln? 🌍"
    assert conversation.turns == 1
    assert conversation.body == json.loads(raw)


async def test_openai_chat_text_parts_are_words_and_images_audio_files_are_not(
        upstream: Upstream, openai_client: AsyncOpenAI) -> None:
    raw = await sent(upstream, openai_client.chat.completions.create(
        model="gpt-test", stream=True, messages=[{"role": "user", "content": [
            {"type": "text", "text": "What is in this picture?"},
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}},
            {"type": "input_audio", "input_audio": {"data": "UklGRg==", "format": "wav"}},
            {"type": "file", "file": {"file_id": "file-1"}},
            {"type": "text", "text": "  And which city?  "}]}]))
    conversation = read(CHAT, raw)
    assert conversation.stream is True
    assert conversation.new_user_text == "What is in this picture?\n\nAnd which city?"


async def test_openai_chat_a_turn_of_tool_results_has_no_new_words(
        upstream: Upstream, openai_client: AsyncOpenAI) -> None:
    raw = await sent(upstream, openai_client.chat.completions.create(
        model="gpt-test", messages=[
            {"role": "system", "content": "You can look up the weather."},
            {"role": "user", "content": "Weather in Köln?"},
            {"role": "assistant", "content": None, "tool_calls": [{
                "id": "call_1", "type": "function",
                "function": {"name": "weather", "arguments": '{"city": "Köln"}'}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": "12 °C, rain"}]))
    conversation = read(CHAT, raw)
    assert conversation.first_user_text == "Weather in Köln?"
    assert conversation.new_user_text is None
    assert conversation.turns == 2


async def test_openai_responses_a_string_input_is_one_user_turn(
        upstream: Upstream, openai_client: AsyncOpenAI) -> None:
    raw = await sent(upstream, openai_client.responses.create(
        model="gpt-test", input="Summarise our plan."))
    conversation = read(RESPONSES, raw)
    assert (conversation.first_user_text, conversation.new_user_text, conversation.turns) == \
        ("Summarise our plan.", "Summarise our plan.", 1)
    assert "instructions" not in conversation.body


async def test_openai_responses_list_input_reads_user_items_only(
        upstream: Upstream, openai_client: AsyncOpenAI) -> None:
    raw = await sent(upstream, openai_client.responses.create(
        model="gpt-test", instructions="You are a helpful assistant.", input=[
            {"role": "developer", "content": "Be brief."},
            {"type": "message", "role": "user", "content": [
                {"type": "input_text", "text": "Describe this diagram."},
                {"type": "input_image", "image_url": "data:image/png;base64,iVBORw0KGgo=",
                 "detail": "auto"},
                {"type": "input_file", "file_id": "file-1"}]},
            {"type": "message", "role": "assistant", "id": "msg_1", "status": "completed",
             "content": [{"type": "output_text", "text": "It shows a proxy.",
                          "annotations": []}]},
            {"role": "user", "content": "Which proxy?"}]))
    conversation = read(RESPONSES, raw)
    assert conversation.first_user_text == "Describe this diagram."
    assert conversation.new_user_text == "Which proxy?"
    assert conversation.turns == 2


async def test_openai_responses_function_output_last_means_no_new_words(
        upstream: Upstream, openai_client: AsyncOpenAI) -> None:
    raw = await sent(upstream, openai_client.responses.create(
        model="gpt-test", input=[
            {"role": "user", "content": "Weather in Köln?"},
            {"type": "reasoning", "id": "rs_1", "summary": []},
            {"type": "function_call", "call_id": "call_1", "name": "weather",
             "arguments": '{"city": "Köln"}'},
            {"type": "function_call_output", "call_id": "call_1", "output": "12 °C"}]))
    conversation = read(RESPONSES, raw)
    assert conversation.first_user_text == "Weather in Köln?"
    assert conversation.new_user_text is None
    assert conversation.turns == 2


# -- what the Anthropic SDK sends ----------------------------------------------------------

async def test_anthropic_string_system_and_string_content(
        upstream: Upstream, anthropic_client: AsyncAnthropic) -> None:
    raw = await sent(upstream, anthropic_client.messages.create(
        model="claude-test", max_tokens=64, system="You are terse.",
        messages=[{"role": "user", "content": "Hello, Claude"}]))
    conversation = read(MESSAGES, raw)
    assert conversation.model == "claude-test"
    assert conversation.new_user_text == conversation.first_user_text == "Hello, Claude"
    assert conversation.turns == 1


async def test_anthropic_tool_use_and_tool_result_turns(
        upstream: Upstream, anthropic_client: AsyncAnthropic) -> None:
    raw = await sent(upstream, anthropic_client.messages.create(
        model="claude-test", max_tokens=64, messages=[
            {"role": "user", "content": [
                {"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                             "data": "iVBORw0KGgo="}},
                {"type": "text", "text": "What city is this?"}]},
            {"role": "assistant", "content": [
                {"type": "thinking", "thinking": "Looks like Köln.", "signature": "sig"},
                {"type": "text", "text": "Let me check."},
                {"type": "tool_use", "id": "toolu_1", "name": "lookup",
                 "input": {"q": "cathedral"}}]},
            {"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": "toolu_1",
                 "content": [{"type": "text", "text": "Cologne Cathedral"}]}]}]))
    conversation = read(MESSAGES, raw)
    assert conversation.first_user_text == "What city is this?"
    assert conversation.new_user_text is None
    assert conversation.turns == 2


async def test_anthropic_images_and_documents_are_not_words(
        upstream: Upstream, anthropic_client: AsyncAnthropic) -> None:
    raw = await sent(upstream, anthropic_client.messages.create(
        model="claude-test", max_tokens=64, messages=[{"role": "user", "content": [
            {"type": "image", "source": {"type": "url", "url": "https://example.com/a.png"}},
            {"type": "document", "source": {"type": "text", "media_type": "text/plain",
                                            "data": "a long file"}}]}]))
    conversation = read(MESSAGES, raw)
    assert (conversation.first_user_text, conversation.new_user_text) == (None, None)
    assert conversation.turns == 1


# -- Claude Code and Codex -----------------------------------------------------------------

CLAUDE_CODE_SYSTEM = [
    {"type": "text", "text": "You are Claude Code, Anthropic's official CLI for Claude."},
    {"type": "text", "text": "\nYou are an interactive CLI tool that helps users with "
     "software engineering tasks.\n", "cache_control": {"type": "ephemeral"}},
]
REMINDER_CLAUDE_MD = ("<system-reminder>\nAs you answer the user's questions, you can use the "
                      "following context:\n# claudeMd\nUse tabs.\n\n      IMPORTANT: this "
                      "context may or may not be relevant.\n</system-reminder>\n")
REMINDER_TODO = ("<system-reminder>This is a reminder that your todo list is currently empty. "
                 "DO NOT mention this to the user explicitly.</system-reminder>")


def claude_code_body(*later: dict[str, Any]) -> dict[str, Any]:
    """A body in the shape Claude Code sends to ``/v1/messages?beta=true``."""
    messages = [
        {"role": "user", "content": [
            {"type": "text", "text": REMINDER_CLAUDE_MD},
            {"type": "text", "text": REMINDER_TODO},
            {"type": "text", "text": "Why does the login test fail on CI?",
             "cache_control": {"type": "ephemeral"}}]},
        *later,
    ]
    return {"model": "claude-sonnet-4-5-20250929", "messages": messages,
            "system": CLAUDE_CODE_SYSTEM,
            "tools": [{"name": "Read", "description": "Reads a file.", "input_schema": {
                "type": "object", "properties": {"file_path": {"type": "string"}},
                "required": ["file_path"], "additionalProperties": False,
                "$schema": "http://json-schema.org/draft-07/schema#"}}],
            "metadata": {"user_id": "user_0a1b_account__session_5f6e"},
            "max_tokens": 32000, "stream": True}


CLAUDE_CODE_TOOL_TURN = [
    {"role": "assistant", "content": [
        {"type": "text", "text": "Let me read the test."},
        {"type": "tool_use", "id": "toolu_01", "name": "Read",
         "input": {"file_path": "/repo/tests/test_login.py"}}]},
    {"role": "user", "content": [
        {"type": "tool_result", "tool_use_id": "toolu_01",
         "content": "     1\timport pytest\n     2\t"},
        {"type": "text", "text": "<system-reminder>\nWhenever you read a file, consider "
         "whether it looks malicious.\n</system-reminder>",
         "cache_control": {"type": "ephemeral"}}]},
]


def dumps(body: dict[str, Any]) -> bytes:
    return json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode()


async def test_claude_codes_beta_query_is_not_part_of_the_path(upstream: Upstream) -> None:
    async with aiohttp.ClientSession() as session, session.post(
            upstream.url + "/v1/messages?beta=true", data=dumps(claude_code_body()),
            headers={"content-type": "application/json"}) as answer:
        assert answer.status == 200  # the upstream found the API from the path alone
    assert upstream.paths[-1] == "/v1/messages?beta=true"
    assert read_answer(MESSAGES, [upstream.served[-1]]) == ANSWER


def test_claude_code_reminders_are_not_the_persons_words() -> None:
    conversation = read(MESSAGES, dumps(claude_code_body()))
    assert conversation.first_user_text == "Why does the login test fail on CI?"
    assert conversation.new_user_text == "Why does the login test fail on CI?"
    assert conversation.stream is True
    assert conversation.turns == 1


def test_claude_code_tool_result_turn_with_a_reminder_has_no_new_words() -> None:
    conversation = read(MESSAGES, dumps(claude_code_body(*CLAUDE_CODE_TOOL_TURN)))
    assert conversation.first_user_text == "Why does the login test fail on CI?"
    assert conversation.new_user_text is None
    assert conversation.turns == 2


@pytest.mark.parametrize("content", [
    "<command-message>init is analyzing your codebase…</command-message>\n"
    "<command-name>/init</command-name>\n<command-args></command-args>",
    "<local-command-caveat>Caveat: The messages below were generated by the user while running "
    "local commands. DO NOT respond to these messages.</local-command-caveat>",
    "Caveat: The messages below were generated by the user while running local commands. "
    "DO NOT respond to these messages or otherwise consider them in your response unless the "
    "user explicitly asks you to.",
    "<local-command-stdout>Set model to opus</local-command-stdout>",
    "<local-command-stderr>Error: unknown command</local-command-stderr>",
    "<bash-input>git status</bash-input>",
    "<bash-stdout>On branch main</bash-stdout><bash-stderr></bash-stderr>",
    "[Request interrupted by user]",
    "[Request interrupted by user for tool use]",
    [{"type": "text", "text": "<system-reminder>Only a reminder</system-reminder>"}],
])
def test_claude_code_commands_and_markers_are_not_the_persons_words(content: Any) -> None:
    body = claude_code_body({"role": "assistant", "content": "The test mocks the clock."},
                            {"role": "user", "content": content})
    conversation = read(MESSAGES, dumps(body))
    assert conversation.new_user_text is None
    assert conversation.first_user_text == "Why does the login test fail on CI?"


def test_the_persons_words_around_injected_blocks_are_kept() -> None:
    text = ("[Request interrupted by user]\n<system-reminder>\nfile\ncontents\n"
            "</system-reminder>\nPlease  keep <b>this</b>\n\n<system-reminder>x</system-reminder>"
            " and this.\n<system-reminder>never closed")
    body = {"model": "m", "messages": [{"role": "user", "content": text}]}
    assert read(CHAT, dumps(body)).new_user_text == \
        "Please  keep <b>this</b>\n\n and this.\n<system-reminder>never closed"


def test_stripping_injected_text_stays_fast_on_hostile_input() -> None:
    opening = "".join(f"<{tag}>" for tag in INJECTED_TAGS)
    text = opening * 5_000 + "words"  # 95,000 blocks opened, none closed
    raw = dumps({"model": "m", "messages": [{"role": "user", "content": text}]})
    started = time.perf_counter()
    assert read(CHAT, raw).new_user_text == text  # nothing closes: nothing is removed
    assert time.perf_counter() - started < 2


CODEX_INSTRUCTIONS = "You are Codex, based on GPT-5. You are running as a coding agent."


def codex_body(*later: dict[str, Any]) -> dict[str, Any]:
    """A body in the shape Codex streams to ``/v1/responses``: context as user messages."""
    def user(text: str) -> dict[str, Any]:
        return {"type": "message", "role": "user",
                "content": [{"type": "input_text", "text": text}]}

    return {"model": "gpt-5-codex", "instructions": CODEX_INSTRUCTIONS, "input": [
        {"type": "message", "role": "developer", "content": [
            {"type": "input_text", "text": "<permissions instructions>sandbox: "
             "workspace-write</permissions instructions>"}]},
        user("# AGENTS.md instructions for /home/me/repo\n\n<INSTRUCTIONS>\nRun the tests "
             "with pytest.\n</INSTRUCTIONS>"),
        user("<environment_context>\n  <cwd>/home/me/repo</cwd>\n  <shell>bash</shell>\n"
             "</environment_context>"),
        user("Fix the flaky login test."),
        *later,
    ], "tools": [], "tool_choice": "auto", "parallel_tool_calls": False,
        "reasoning": {"effort": "medium", "summary": "auto"}, "store": False, "stream": True,
        "include": ["reasoning.encrypted_content"], "prompt_cache_key": "0199a2b3"}


CODEX_TOOL_TURN = [
    {"type": "reasoning", "summary": [], "content": None, "encrypted_content": "gAAAAB"},
    {"type": "function_call", "name": "shell", "arguments": '{"command":["pytest"]}',
     "call_id": "call_1"},
    {"type": "function_call_output", "call_id": "call_1", "output": "1 failed"},
]


def test_codex_context_messages_are_not_the_persons_words() -> None:
    conversation = read(RESPONSES, dumps(codex_body()))
    assert conversation.first_user_text == "Fix the flaky login test."
    assert conversation.new_user_text == "Fix the flaky login test."
    assert conversation.turns == 1  # its context comes as user messages, yet this is turn one
    later = read(RESPONSES, dumps(codex_body(*CODEX_TOOL_TURN)))
    assert (later.first_user_text, later.new_user_text, later.turns) == \
        ("Fix the flaky login test.", None, 2)


# -- bodies that are declined --------------------------------------------------------------

DECLINED = {
    "not JSON": (CHAT, b"{'model': 'gpt'}"),
    "truncated": (CHAT, b'{"model":"gpt","messages":[{"role":"user","content":"hi"}'),
    "empty": (CHAT, b""),
    "an array": (CHAT, b'[{"role":"user","content":"hi"}]'),
    "a string": (MESSAGES, b'"hi"'),
    "not UTF-8": (CHAT, b'{"model":"gpt","messages":[{"role":"user","content":"\xff"}]}'),
    "a byte order mark": (CHAT, b'\xef\xbb\xbf{"model":"gpt","messages":[]}'),
    "UTF-16": (CHAT, '{"model":"gpt","messages":[]}'.encode("utf-16")),
    "a lone surrogate": (CHAT, b'{"model":"gpt","messages":[{"role":"user",'
                               b'"content":"\\ud800"}]}'),
    "NaN": (CHAT, b'{"model":"gpt","messages":[],"temperature":NaN}'),
    "an infinite number": (CHAT, b'{"model":"gpt","messages":[],"temperature":1e400}'),
    "a duplicate key": (CHAT, b'{"model":"gpt","messages":[],"model":"other"}'),
    "a number as model": (CHAT, b'{"model":4,"messages":[]}'),
    "no messages": (CHAT, b'{"model":"gpt"}'),
    "messages not a list": (CHAT, b'{"model":"gpt","messages":{"role":"user"}}'),
    "a message not an object": (CHAT, b'{"model":"gpt","messages":["hi"]}'),
    "a message without role": (CHAT, b'{"model":"gpt","messages":[{"content":"hi"}]}'),
    "an unknown role": (CHAT, b'{"model":"gpt","messages":[{"role":"human","content":"hi"}]}'),
    "a role that is a list": (CHAT, b'{"model":"gpt","messages":[{"role":["user"]}]}'),
    "content a number": (CHAT, b'{"model":"gpt","messages":[{"role":"user","content":1}]}'),
    "a part not an object": (CHAT, b'{"model":"gpt","messages":[{"role":"user",'
                                   b'"content":["hi"]}]}'),
    "a part without type": (CHAT, b'{"model":"gpt","messages":[{"role":"user",'
                                  b'"content":[{"text":"hi"}]}]}'),
    "a text part without text": (MESSAGES, b'{"model":"c","messages":[{"role":"user",'
                                           b'"content":[{"type":"text"}]}]}'),
    "a system role in Anthropic messages": (MESSAGES, b'{"model":"c","messages":[{"role":'
                                                      b'"system","content":"hi"}]}'),
    "system a number": (MESSAGES, b'{"model":"c","system":1,"messages":[]}'),
    "system blocks not objects": (MESSAGES, b'{"model":"c","system":["hi"],"messages":[]}'),
    "an OpenAI thread message": (MESSAGES, b'{"role":"user","content":"hi"}'),
    "instructions a list": (RESPONSES, b'{"model":"gpt","instructions":["hi"],"input":"x"}'),
    "input a number": (RESPONSES, b'{"model":"gpt","input":3}'),
    "an item not an object": (RESPONSES, b'{"model":"gpt","input":["hi"]}'),
    "an item without type or role": (RESPONSES, b'{"model":"gpt","input":[{"content":"x"}]}'),
    "an item of unknown role": (RESPONSES, b'{"model":"gpt","input":[{"role":"robot",'
                                           b'"content":"x"}]}'),
    "a deeply nested body": (CHAT, b'{"model":"gpt","messages":[],"x":' + b"[" * 5000
                             + b"]" * 5000 + b"}"),
}


@pytest.mark.parametrize(("format", "raw"), DECLINED.values(), ids=list(DECLINED))
def test_bodies_not_fully_understood_are_declined(format: ApiFormat, raw: bytes) -> None:
    assert read_request(format, raw) is None


WORDS = ["user", "assistant", "system", "developer", "tool", "function", "message", "text",
         "input_text", "output_text", "image", "tool_result", "function_call",
         "function_call_output", "reasoning", "item_reference",
         "<system-reminder>x</system-reminder>", "[Request interrupted by user]", "\ud800"]
SCALARS = (st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False)
           | st.text(max_size=8) | st.sampled_from(WORDS))
JSON_VALUES = st.recursive(
    SCALARS, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
        st.text(max_size=4), inner, max_size=4), max_leaves=20)
#: Values that are often of the shape the APIs define and sometimes not.
WORD = st.sampled_from(WORDS) | JSON_VALUES
PART = st.fixed_dictionaries({"type": WORD}, optional={"text": WORD, "cache_control": WORD})
CONTENT = WORD | st.lists(PART | WORD, max_size=4)
MESSAGE = st.fixed_dictionaries({"role": WORD}, optional={"content": CONTENT, "type": WORD})
MESSAGE_LIST = st.lists(MESSAGE | WORD, max_size=5)
BODIES = st.fixed_dictionaries({}, optional={
    "model": WORD, "stream": WORD, "messages": MESSAGE_LIST, "input": MESSAGE_LIST | WORD,
    "system": CONTENT, "instructions": WORD, "temperature": WORD})


@FUZZ
@given(value=JSON_VALUES | BODIES, ascii=st.booleans())
def test_any_json_is_read_or_declined_and_what_is_read_takes_a_block(
        value: Any, ascii: bool) -> None:
    raw = json.dumps(value, ensure_ascii=ascii).encode("utf-8", "surrogatepass")
    for format in ApiFormat:
        conversation = read_request(format, raw)
        if conversation is None:
            continue
        rewritten = insert_block(conversation, BLOCK)
        assert without_block(format, rewritten, conversation.body) == conversation.body
        assert conversation.turns >= (conversation.new_user_text is not None)


@FUZZ
@given(raw=st.binary(max_size=300))
def test_any_bytes_are_read_or_declined(raw: bytes) -> None:
    for format in ApiFormat:
        conversation = read_request(format, raw)
        if conversation is not None:
            insert_block(conversation, BLOCK)


def test_a_body_that_parses_serialises_again_from_a_deeper_call() -> None:
    def deeper(frames: int, conversation: Conversation) -> bytes:
        if frames:
            return deeper(frames - 1, conversation)
        return insert_block(conversation, BLOCK)

    read_depths = []
    for depth in range(500, 1000, 7):
        raw = b'{"model":"gpt","messages":[],"x":' + b"[" * depth + b"]" * depth + b"}"
        conversation = read_request(CHAT, raw)
        if conversation is not None:
            read_depths.append(depth)
            assert deeper(40, conversation).startswith(b'{"model":"gpt","messages":[{')
    assert read_depths
    assert read_depths[-1] < 990


# -- where the block goes ------------------------------------------------------------------

CHAT_BODY = {"model": "gpt-test", "messages": [
    {"role": "system", "content": "You are terse."},
    {"role": "developer", "content": [{"type": "text", "text": "Answer in German."}]},
    {"role": "user", "content": "Hi"},
    {"role": "system", "content": "A later system message stays where it is."},
    {"role": "assistant", "content": "Hallo"},
    {"role": "user", "content": "Again"}], "temperature": 0.2, "x-unknown": {"kept": [1, 2.5]}}


def test_chat_block_follows_the_leading_system_and_developer_messages() -> None:
    rewritten = json.loads(insert_block(read(CHAT, dumps(CHAT_BODY)), BLOCK))
    assert [m["role"] for m in rewritten["messages"]] == \
        ["system", "developer", "system", "user", "system", "assistant", "user"]
    assert rewritten["messages"][2] == {"role": "system", "content": BLOCK}
    assert without_block(CHAT, dumps(rewritten), CHAT_BODY) == CHAT_BODY


def test_chat_block_comes_first_without_a_system_message() -> None:
    body = {"model": "gpt-test", "messages": [{"role": "user", "content": "Hi"}]}
    rewritten = json.loads(insert_block(read(CHAT, dumps(body)), BLOCK))
    assert rewritten["messages"] == [{"role": "system", "content": BLOCK},
                                     {"role": "user", "content": "Hi"}]


@pytest.mark.parametrize("system", [
    "You are terse.",
    [{"type": "text", "text": "You are terse.", "cache_control": {"type": "ephemeral"}}],
    [{"type": "text", "text": "A"}, {"type": "text", "text": "B",
                                     "cache_control": {"type": "ephemeral", "ttl": "1h"}}],
    [],
    None,
    "",
    " \n",
], ids=["string", "list with marker", "marker on the last block", "empty list", "null",
        "empty string", "blank string"])
def test_anthropic_block_is_the_last_system_block(system: Any) -> None:
    body: dict[str, Any] = {"model": "claude-test", "max_tokens": 10, "messages": [
        {"role": "user", "content": "Hi"}]}
    body["system"] = system
    rewritten = insert_block(read(MESSAGES, dumps(body)), BLOCK)
    assert json.loads(rewritten)["system"][-1] == {"type": "text", "text": BLOCK}
    assert without_block(MESSAGES, rewritten, body) == body
    assert list(cache_markers(json.loads(rewritten))) == list(cache_markers(body))


def test_anthropic_without_system_gets_a_one_block_system() -> None:
    body = {"model": "claude-test", "max_tokens": 10,
            "messages": [{"role": "user", "content": "Hi"}]}
    rewritten = json.loads(insert_block(read(MESSAGES, dumps(body)), BLOCK))
    assert rewritten["system"] == [{"type": "text", "text": BLOCK}]
    assert list(rewritten) == [*body, "system"]


def test_claude_code_cache_markers_stay_where_claude_code_put_them() -> None:
    body = claude_code_body(*CLAUDE_CODE_TOOL_TURN)
    rewritten = insert_block(read(MESSAGES, dumps(body)), BLOCK)
    assert list(cache_markers(json.loads(rewritten))) == list(cache_markers(body))
    assert len(list(cache_markers(body))) == 3
    assert without_block(MESSAGES, rewritten, body) == body
    assert json.loads(rewritten)["system"] == [*CLAUDE_CODE_SYSTEM,
                                               {"type": "text", "text": BLOCK}]


@pytest.mark.parametrize(("instructions", "expected"), [
    ("Be brief.", "Be brief.\n\n" + BLOCK),
    (None, BLOCK),
    ("", BLOCK),
    ("absent", BLOCK),
])
def test_responses_block_is_appended_to_the_instructions(instructions: str | None,
                                                         expected: str) -> None:
    body: dict[str, Any] = {"model": "gpt-test", "input": "Hi", "stream": True}
    if instructions != "absent":
        body["instructions"] = instructions
    rewritten = insert_block(read(RESPONSES, dumps(body)), BLOCK)
    assert json.loads(rewritten)["instructions"] == expected
    assert without_block(RESPONSES, rewritten, body) == body


@pytest.mark.parametrize("format", list(ApiFormat))
def test_the_same_request_and_block_give_the_same_bytes(format: ApiFormat) -> None:
    body = {CHAT: CHAT_BODY, MESSAGES: claude_code_body(*CLAUDE_CODE_TOOL_TURN),
            RESPONSES: codex_body(*CODEX_TOOL_TURN)}[format]
    raw = dumps(body)
    conversation = read(format, raw)
    first = insert_block(conversation, BLOCK)
    assert insert_block(conversation, BLOCK) == first
    assert insert_block(read(format, raw), BLOCK) == first
    assert conversation.body == body  # inserting leaves the conversation as it was read


@pytest.mark.parametrize("block", ["", "  \n"])
def test_a_blank_block_changes_nothing(block: str) -> None:
    raw = dumps(claude_code_body())
    assert insert_block(read(MESSAGES, raw), block) == raw


def test_a_block_with_a_broken_surrogate_still_makes_valid_utf8() -> None:
    rewritten = insert_block(read(CHAT, dumps(CHAT_BODY)), "memory \ud83c and more")
    assert json.loads(rewritten.decode("utf-8"))["messages"][2]["content"] == \
        "memory \ufffd and more"


async def test_sdk_bodies_come_back_byte_for_byte_around_the_block(
        upstream: Upstream, openai_client: AsyncOpenAI,
        anthropic_client: AsyncAnthropic) -> None:
    chat = await sent(upstream, openai_client.chat.completions.create(
        model="gpt-test", messages=[{"role": "user", "content": "Grüße 🌍"}]))
    messages = await sent(upstream, anthropic_client.messages.create(
        model="claude-test", max_tokens=10, messages=[{"role": "user", "content": "Grüße 🌍"}]))
    responses = await sent(upstream, openai_client.responses.create(
        model="gpt-test", input="Grüße 🌍"))
    for format, raw in ((CHAT, chat), (MESSAGES, messages), (RESPONSES, responses)):
        assert insert_block(read(format, raw), "") == raw


# -- the prefix a prompt cache needs -------------------------------------------------------

async def test_chat_prefix_stays_the_same_when_the_conversation_grows(
        upstream: Upstream, openai_client: AsyncOpenAI) -> None:
    messages: list[Any] = [{"role": "system", "content": "You are terse."},
                           {"role": "user", "content": "Where is Köln?"}]
    turn_n = await sent(upstream, openai_client.chat.completions.create(
        model="gpt-test", messages=messages, stream=True, stream_options={
            "include_usage": True}))
    messages += [{"role": "assistant", "content": ANSWER},
                 {"role": "user", "content": "And Bonn?"}]
    turn_n1 = await sent(upstream, openai_client.chat.completions.create(
        model="gpt-test", messages=messages, stream=True, stream_options={
            "include_usage": True}))
    assert_prefix_kept(CHAT, turn_n, turn_n1)


async def test_responses_prefix_stays_the_same_when_the_conversation_grows(
        upstream: Upstream, openai_client: AsyncOpenAI) -> None:
    items: list[Any] = [{"role": "user", "content": "Where is Köln?"}]
    turn_n = await sent(upstream, openai_client.responses.create(model="gpt-test",
                                                                 input=items))
    items += [{"role": "assistant", "content": ANSWER}, {"role": "user", "content": "Bonn?"}]
    turn_n1 = await sent(upstream, openai_client.responses.create(model="gpt-test",
                                                                  input=items))
    assert_prefix_kept(RESPONSES, turn_n, turn_n1)
    assert_prefix_kept(RESPONSES, dumps(codex_body()), dumps(codex_body(*CODEX_TOOL_TURN)))


async def test_anthropic_prefix_stays_the_same_when_the_conversation_grows(
        upstream: Upstream, anthropic_client: AsyncAnthropic) -> None:
    system = [{"type": "text", "text": "You are terse.", "cache_control": {"type": "ephemeral"}}]
    messages: list[Any] = [{"role": "user", "content": "Where is Köln?"}]
    turn_n = await sent(upstream, anthropic_client.messages.create(
        model="claude-test", max_tokens=64, system=system, messages=messages))
    messages += [{"role": "assistant", "content": ANSWER}, {"role": "user", "content": "Bonn?"}]
    turn_n1 = await sent(upstream, anthropic_client.messages.create(
        model="claude-test", max_tokens=64, system=system, messages=messages))
    assert_prefix_kept(MESSAGES, turn_n, turn_n1)
    assert_prefix_kept(MESSAGES, dumps(claude_code_body()),
                       dumps(claude_code_body(*CLAUDE_CODE_TOOL_TURN)))


# -- reading answers -----------------------------------------------------------------------

async def test_streamed_answers_read_as_the_sdks_read_them(
        upstream: Upstream, openai_client: AsyncOpenAI,
        anthropic_client: AsyncAnthropic) -> None:
    chunks = await openai_client.chat.completions.create(
        model="gpt-test", messages=[{"role": "user", "content": "Hi"}], stream=True)
    chat = "".join([c.choices[0].delta.content or "" async for c in chunks if c.choices])
    assert read_answer(CHAT, [upstream.served[-1]]) == chat == ANSWER

    async with openai_client.responses.stream(model="gpt-test", input="Hi") as stream:
        responses = (await stream.get_final_response()).output_text
    assert read_answer(RESPONSES, [upstream.served[-1]]) == responses == ANSWER

    async with anthropic_client.messages.stream(
            model="claude-test", max_tokens=64,
            messages=[{"role": "user", "content": "Hi"}]) as events:
        messages = await events.get_final_text()
    assert read_answer(MESSAGES, [upstream.served[-1]]) == messages == ANSWER


async def test_json_answers_read_as_the_sdks_read_them(
        upstream: Upstream, openai_client: AsyncOpenAI,
        anthropic_client: AsyncAnthropic) -> None:
    chat = await openai_client.chat.completions.create(
        model="gpt-test", messages=[{"role": "user", "content": "Hi"}])
    assert read_answer(CHAT, [upstream.served[-1]], event_stream=False) == \
        chat.choices[0].message.content == ANSWER
    responses = await openai_client.responses.create(model="gpt-test", input="Hi")
    assert read_answer(RESPONSES, [upstream.served[-1]], event_stream=False) == \
        responses.output_text == ANSWER
    messages = await anthropic_client.messages.create(
        model="claude-test", max_tokens=64, messages=[{"role": "user", "content": "Hi"}])
    assert read_answer(MESSAGES, [upstream.served[-1]], event_stream=False) == \
        "".join(block.text for block in messages.content if block.type == "text") == ANSWER


@pytest.mark.parametrize("format", list(ApiFormat))
async def test_the_demo_providers_answers_are_read(format: ApiFormat) -> None:
    path = {CHAT: "/v1/chat/completions", RESPONSES: "/v1/responses",
            MESSAGES: "/v1/messages"}[format]
    body = {"model": "gpt-fake", "max_tokens": 10, "messages": [{"role": "user", "content": "x"}],
            "input": "x", "stream_options": {"include_usage": True}}
    async with DemoProvider(reply="Hallo aus Köln 🌍", chunk_delay=0) as provider, \
            aiohttp.ClientSession() as session:
        for stream in (True, False):
            reader = AnswerReader(format, event_stream=stream)
            async with session.post(provider.url + path, json={**body, "stream": stream}) as got:
                async for chunk in got.content.iter_any():
                    reader.feed(chunk)
            assert reader.text() == "Hallo aus Köln 🌍"


@pytest.mark.parametrize("format", list(ApiFormat))
def test_a_stream_split_at_any_byte_reads_the_same(format: ApiFormat) -> None:
    data = STREAMS[format](PIECES)
    assert read_answer(format, [data]) == ANSWER
    assert read_answer(format, [data[i:i + 1] for i in range(len(data))]) == ANSWER
    for cut in range(len(data) + 1):
        assert read_answer(format, [data[:cut], data[cut:]]) == ANSWER, cut


@FUZZ
@given(format=st.sampled_from(ApiFormat), data=st.data())
def test_a_stream_split_anywhere_many_times_reads_the_same(format: ApiFormat,
                                                           data: st.DataObject) -> None:
    stream = STREAMS[format](PIECES)
    cuts = data.draw(st.lists(st.integers(0, len(stream)), max_size=40))
    assert read_answer(format, split_at(stream, cuts)) == ANSWER


@pytest.mark.parametrize("format", list(ApiFormat))
def test_json_answers_split_anywhere_read_the_same(format: ApiFormat) -> None:
    data = json.dumps(JSON_ANSWERS[format](ANSWER), ensure_ascii=False).encode()
    for cut in range(len(data) + 1):
        assert read_answer(format, [data[:cut], data[cut:]], event_stream=False) == ANSWER


@pytest.mark.parametrize("format", list(ApiFormat))
def test_a_json_answer_to_a_streaming_request_is_read(format: ApiFormat) -> None:
    # LiteLLM answers JSON to a streaming /v1/messages call for some models.
    data = b"\n" + json.dumps(JSON_ANSWERS[format](ANSWER)).encode()
    assert read_answer(format, [data[:1], data[1:5], data[5:]], event_stream=True) == ANSWER


@pytest.mark.parametrize("format", list(ApiFormat))
def test_a_stream_given_to_a_json_reader_is_not_understood(format: ApiFormat) -> None:
    assert read_answer(format, [STREAMS[format](PIECES)], event_stream=False) is None


def test_event_stream_framing_variants_read_the_same() -> None:
    chunk = {"id": "c", "object": "chat.completion.chunk", "choices": [
        {"index": 0, "delta": {"content": "Grüße"}, "finish_reason": None}]}
    body = json.dumps(chunk, indent=1, ensure_ascii=False).replace("\n", "\r\ndata:")
    data = ("\ufeff: keep-alive comment\r\nretry: 1000\r\nid: 7\r\nevent: chunk\r\n"
            f"data:{body}\r\n\r\n"
            'data: {"choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}\r\n\r\n'
            "data: [DONE]\r\n\r\n").encode()
    assert read_answer(CHAT, [data]) == "Grüße"
    assert read_answer(CHAT, [data[i:i + 1] for i in range(len(data))]) == "Grüße"


def test_litellms_done_marker_after_a_responses_stream_is_ignored() -> None:
    # LiteLLM ends its /v1/responses streams with "data: [DONE]", which OpenAI does not send.
    stream = responses_stream(PIECES) + b"data: [DONE]\n\n"
    assert read_answer(RESPONSES, [stream]) == ANSWER
    unfinished = stream[:stream.index(b"event: response.completed")]
    assert read_answer(RESPONSES, [unfinished + b"data: [DONE]\n\n"]) is None


def test_only_the_first_choice_of_several_is_the_answer() -> None:
    def chunk(index: int, text: str | None, finish: str | None = None) -> bytes:
        return sse({"choices": [{"index": index, "delta": {"content": text},
                                 "finish_reason": finish}]})

    data = b"".join([chunk(0, "one"), chunk(1, "two"), chunk(0, " uno"), chunk(1, None, "stop"),
                     chunk(0, None, "stop"), b"data: [DONE]\n\n"])
    assert read_answer(CHAT, [data]) == "one uno"


def test_separate_text_blocks_read_as_paragraphs_streamed_or_not() -> None:
    content = [{"type": "text", "text": "Let me check."},
               {"type": "tool_use", "id": "toolu_1", "name": "lookup", "input": {}},
               {"type": "text", "text": "It is Köln."}]
    answer = {**messages_json(""), "content": content}
    streamed = b"".join([
        sse({"type": "message_start", "message": {**answer, "content": []}}),
        sse({"type": "content_block_delta", "index": 0,
             "delta": {"type": "text_delta", "text": "Let me check."}}),
        sse({"type": "content_block_delta", "index": 1,
             "delta": {"type": "input_json_delta", "partial_json": "{}"}}),
        sse({"type": "content_block_delta", "index": 2,
             "delta": {"type": "text_delta", "text": "It is Köln."}}),
        sse({"type": "message_stop"})])
    expected = "Let me check.\n\nIt is Köln."
    assert read_answer(MESSAGES, [streamed]) == expected
    assert read_answer(MESSAGES, [json.dumps(answer).encode()], event_stream=False) == expected


def test_thinking_tool_calls_and_reasoning_are_not_the_answer() -> None:
    thinking = sse({"type": "content_block_delta", "index": 0,
                    "delta": {"type": "thinking_delta", "thinking": "hmm"}})
    assert read_answer(MESSAGES, [thinking, sse({"type": "message_stop"})]) is None
    tool_only = sse({"choices": [{"index": 0, "finish_reason": "tool_calls", "delta": {
        "tool_calls": [{"index": 0, "id": "call_1", "function": {"name": "f"}}]}}]})
    assert read_answer(CHAT, [tool_only, b"data: [DONE]\n\n"]) is None
    response = {**responses_json(""), "output": [
        {"type": "reasoning", "id": "rs_1", "summary": [{"type": "summary_text", "text": "x"}]},
        {"type": "function_call", "call_id": "c", "name": "f", "arguments": "{}"},
        {"type": "message", "role": "assistant", "content": [
            {"type": "output_text", "text": "Done.", "annotations": []},
            {"type": "refusal", "refusal": "no"}]}]}
    assert read_answer(RESPONSES, [json.dumps(response).encode()], event_stream=False) == "Done."
    chat = chat_json("")
    chat["choices"][0]["message"]["content"] = [{"type": "text", "text": "Hallo"}]
    assert read_answer(CHAT, [json.dumps(chat).encode()], event_stream=False) == "Hallo"


def test_a_responses_stream_without_deltas_takes_the_completed_output() -> None:
    data = sse({"type": "response.completed", "response": responses_json(ANSWER)})
    assert read_answer(RESPONSES, [data]) == ANSWER


ERROR_ENDINGS = {
    "anthropic error event": (MESSAGES, sse({"type": "error", "error": {
        "type": "overloaded_error", "message": "Overloaded"}}, "error")),
    "openai chat error": (CHAT, sse({"error": {"message": "boom", "type": "server_error"}})),
    "responses failed": (RESPONSES, sse({"type": "response.failed", "response": {
        **_response("failed", None), "error": {"code": "server_error", "message": "x"}}})),
    "responses error": (RESPONSES, sse({"type": "error", "code": "server_error",
                                        "message": "x"}, "error")),
    "memproxy's own, anthropic": (MESSAGES, stream_error_event(Dialect.ANTHROPIC, "broke")),
    "memproxy's own, openai": (CHAT, stream_error_event(Dialect.OPENAI, "broke")),
    "memproxy's own, responses": (RESPONSES, stream_error_event(Dialect.OPENAI, "broke")),
}


@pytest.mark.parametrize(("format", "ending"), ERROR_ENDINGS.values(), ids=list(ERROR_ENDINGS))
def test_a_stream_that_ends_in_an_error_has_no_answer(format: ApiFormat, ending: bytes) -> None:
    stream = STREAMS[format](PIECES)
    half = stream[:stream.index(b"\n\n", len(stream) // 2) + 2]
    assert read_answer(format, [half, ending]) is None
    assert read_answer(format, [stream, ending]) is None


@pytest.mark.parametrize(("format", "ending"), [
    (CHAT, b'"finish_reason": "stop"'),
    (RESPONSES, b"event: response.completed"),
    (MESSAGES, b"event: message_stop"),
])
def test_a_stream_cut_short_has_no_answer(format: ApiFormat, ending: bytes) -> None:
    stream = STREAMS[format](PIECES)
    assert read_answer(format, [stream[:stream.index(ending)]]) is None


@pytest.mark.parametrize("body", [
    {"error": {"message": "rate limited", "type": "rate_limit_error"}},
    {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}},
    {**_response("failed", None), "error": {"code": "server_error", "message": "x"}},
])
@pytest.mark.parametrize("format", list(ApiFormat))
def test_json_error_answers_have_no_answer(format: ApiFormat, body: dict[str, Any]) -> None:
    assert read_answer(format, [json.dumps(body).encode()], event_stream=False) is None


@pytest.mark.parametrize("format", list(ApiFormat))
def test_an_empty_answer_is_none(format: ApiFormat) -> None:
    assert read_answer(format, [STREAMS[format]([])]) is None
    assert read_answer(format, [STREAMS[format](["  ", "\n"])]) is None
    assert read_answer(format, [json.dumps(JSON_ANSWERS[format]("")).encode()],
                       event_stream=False) is None
    assert read_answer(format, [], event_stream=False) is None
    assert read_answer(format, []) is None


@pytest.mark.parametrize("format", list(ApiFormat))
def test_answers_over_the_limit_are_given_up(format: ApiFormat) -> None:
    long = ["x" * 100] * 20
    assert read_answer(format, [STREAMS[format](long)], limit=100_000) == "x" * 2000
    assert read_answer(format, [STREAMS[format](long)], limit=1999) is None
    assert read_answer(format, [json.dumps(JSON_ANSWERS[format]("x" * 2000)).encode()],
                       event_stream=False, limit=1999) is None
    one_long_event = sse({"choices": [{"index": 0, "delta": {"content": "y" * 3000}}]})
    assert read_answer(format, [one_long_event], limit=2000) is None


@pytest.mark.parametrize(("event_stream", "chunk"), [
    (True, b"data: " + b"x" * 65536),  # a line that never ends
    (True, b"data: x\n" * 8192),  # an event that never ends
    (False, b"{" + b" " * 65535),  # a JSON body that never ends
])
def test_the_reader_holds_no_more_than_its_limit(event_stream: bool, chunk: bytes) -> None:
    reader = AnswerReader(CHAT, event_stream=event_stream, limit=256 * 1024)
    tracemalloc.start()
    try:
        for _ in range(320):  # 20 MiB
            reader.feed(chunk)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert reader.text() is None
    assert peak < 2 * 1024 * 1024


@FUZZ
@given(format=st.sampled_from(ApiFormat), event_stream=st.booleans(),
       chunks=st.lists(st.binary(max_size=64), max_size=12))
def test_any_bytes_never_make_the_reader_raise(format: ApiFormat, event_stream: bool,
                                               chunks: list[bytes]) -> None:
    result = read_answer(format, chunks, event_stream=event_stream, limit=256)
    assert result is None or isinstance(result, str)


EVENT_WORDS = ["content_block_delta", "text_delta", "message_stop", "error",
               "response.output_text.delta", "response.completed", "response.incomplete",
               "response.failed", "stop", "[DONE]", "\ud83c"]
EVENT_KEYS = ["type", "delta", "text", "content", "choices", "index", "finish_reason", "error",
              "response", "output", "output_text", "output_index", "content_index", "message"]
EVENT_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=6)
    | st.sampled_from(EVENT_WORDS),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
        st.sampled_from(EVENT_KEYS), inner, max_size=5), max_leaves=25)
EVENT_WORD = st.sampled_from(EVENT_WORDS) | EVENT_JSON
TEXT_PART = st.fixed_dictionaries({"type": st.sampled_from(["text", "output_text"]) | EVENT_WORD},
                                  optional={"text": EVENT_WORD})
TEXTS = EVENT_WORD | st.lists(TEXT_PART | EVENT_WORD, max_size=3)
CHOICE = st.fixed_dictionaries({}, optional={
    "index": st.just(0) | EVENT_WORD, "finish_reason": EVENT_WORD,
    "delta": st.fixed_dictionaries({}, optional={"content": EVENT_WORD}) | EVENT_WORD,
    "message": st.fixed_dictionaries({}, optional={"content": TEXTS}) | EVENT_WORD})
RESPONSE = st.fixed_dictionaries({}, optional={
    "status": st.sampled_from(["completed", "failed"]) | EVENT_WORD, "output_text": EVENT_WORD,
    "output": st.lists(st.fixed_dictionaries({"type": st.just("message") | EVENT_WORD},
                                             optional={"content": TEXTS}) | EVENT_WORD,
                       max_size=3) | EVENT_WORD})
EVENTS = EVENT_JSON | st.fixed_dictionaries({}, optional={
    "choices": st.lists(CHOICE | EVENT_WORD, max_size=3) | EVENT_WORD, "error": EVENT_WORD,
    "type": EVENT_WORD, "index": EVENT_WORD, "output_index": EVENT_WORD,
    "delta": st.fixed_dictionaries({}, optional={"type": EVENT_WORD, "text": EVENT_WORD})
    | EVENT_WORD, "response": RESPONSE | EVENT_WORD, "content": TEXTS}) | RESPONSE


@FUZZ
@given(events=st.lists(EVENTS, max_size=8), data=st.data())
def test_any_events_never_make_the_reader_raise(events: list[Any], data: st.DataObject) -> None:
    # ASCII-escaped, so that lone surrogates reach the reader as JSON escapes.
    stream = b"".join(b"data: " + json.dumps(event).encode() + b"\n\n" for event in events)
    stream += data.draw(st.sampled_from([b"", b"data: [DONE]\n\n", sse({"type": "message_stop"})]))
    chunks = split_at(stream, data.draw(st.lists(st.integers(0, len(stream)), max_size=6)))
    answers = [read_answer(format, chunks, event_stream=event_stream)
               for format in ApiFormat for event_stream in (True, False)]
    answers += [read_answer(format, [json.dumps(event).encode()], event_stream=False)
                for format in ApiFormat for event in events]
    for answer in answers:
        assert answer is None or answer.strip()
        if answer is not None:
            answer.encode("utf-8")  # whatever comes back can be stored


def test_the_recursion_limit_is_not_reached_by_nested_answers() -> None:
    nested = b"[" * (sys.getrecursionlimit() * 2) + b"]" * (sys.getrecursionlimit() * 2)
    assert read_answer(CHAT, [b"data: " + nested + b"\n\n"]) is None
    assert read_answer(CHAT, [nested], event_stream=False) is None
