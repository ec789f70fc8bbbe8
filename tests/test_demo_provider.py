"""The offline demo provider: what its answers say, in each API's format."""

from __future__ import annotations

from typing import Any

import aiohttp
import pytest

from memproxy.config import DemoProviderSettings, parse_settings
from memproxy.demo_provider import DemoProvider
from memproxy.memory.dialects import AnswerReader, ApiFormat

BLOCK = ('<memories source="memproxy">\nExcerpts ...:\n[2026-01-02] user: I like teal.\n'
         "[2026-01-03] assistant: Noted.\n</memories>")
REQUESTS: dict[ApiFormat, tuple[str, dict[str, Any]]] = {
    ApiFormat.CHAT: ("/v1/chat/completions", {"messages": [
        {"role": "system", "content": BLOCK},
        {"role": "user", "content": "earlier"}, {"role": "assistant", "content": "yes"},
        {"role": "user", "content": [{"type": "text", "text": "What  colour\ndo I like?"}]}]}),
    ApiFormat.MESSAGES: ("/v1/messages", {"max_tokens": 10, "system": BLOCK, "messages": [
        {"role": "user", "content": [{"type": "text", "text": "What colour do I like?"}]}]}),
    ApiFormat.RESPONSES: ("/v1/responses", {"instructions": BLOCK, "input": [
        {"type": "message", "role": "user",
         "content": [{"type": "input_text", "text": "What colour do I like?"}]}]}),
}
EXPECTED = ('memproxy-demo here. You said: "What colour do I like?". Your memory space: ann. '
            "Memories in this request: 2.")


@pytest.mark.parametrize("format", list(ApiFormat))
async def test_a_demo_answer_says_what_reached_the_provider(format: ApiFormat) -> None:
    path, body = REQUESTS[format]
    async with DemoProvider(demo=True, chunk_delay=0) as provider, \
            aiohttp.ClientSession() as session:
        for stream in (True, False):
            reader = AnswerReader(format, event_stream=stream)
            async with session.post(provider.url + path, json={**body, "stream": stream},
                                    headers={"x-sm-user-id": "ann"}) as got:
                assert got.status == 200
                async for chunk in got.content.iter_any():
                    reader.feed(chunk)
            assert reader.text() == EXPECTED


async def test_without_the_memory_header_or_a_block_the_demo_says_so() -> None:
    async with DemoProvider(demo=True) as provider, aiohttp.ClientSession() as session:
        long_text = "word " * 100
        async with session.post(provider.url + "/v1/chat/completions", json={
                "messages": [{"role": "user", "content": long_text}]}) as got:
            text = (await got.json())["choices"][0]["message"]["content"]
    said = text.split('"')[1]
    assert said.endswith("...") and len(said) <= 203
    assert text.endswith("Your memory space: not forwarded. Memories in this request: 0.")


def test_the_demo_provider_runs_only_when_configured() -> None:
    assert parse_settings({}).demo_provider is None
    assert parse_settings({"memproxy": {"demo_provider": None}}).demo_provider is None
    assert parse_settings({"memproxy": {"demo_provider": {}}}).demo_provider == \
        DemoProviderSettings(host="127.0.0.1", port=8766)
    assert parse_settings({"memproxy": {"demo_provider": {"port": 9000}}}).demo_provider == \
        DemoProviderSettings(port=9000)
