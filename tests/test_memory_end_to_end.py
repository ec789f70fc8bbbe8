"""Memory, for real: the SDKs through ``memproxy start`` and the real LiteLLM to the fake provider.

What a user would notice: a fact told in one conversation comes back, inside the memory
block, in a later conversation of the same client, and never in another client's; the
block a conversation got stays byte for byte the same on its later requests, with every
``cache_control`` marker where the client put it; and the owner can see and erase it.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from memproxy.supervisor import find_litellm
from tests.helpers import Chain, Provider, start_chain, stop_chain

try:
    find_litellm()
except Exception:  # pragma: no cover - only without the litellm extra
    pytest.skip("litellm is not installed (pip install -e '.[litellm]')", allow_module_level=True)

FACT = "My cat is called Zorblax and she hates thunderstorms."
QUESTION = "What is my cat called?"
CLAUDE_CODE_UA = "claude-cli/2.1.197 (external, cli)"


def memory_config(provider: Provider, db: Path) -> str:
    return f"""
model_list:
  - model_name: gpt-fake
    litellm_params: {{model: openai/gpt-fake, api_base: "{provider.url}/v1", api_key: sk-prov}}
  - model_name: claude-fake
    litellm_params: {{model: anthropic/claude-fake, api_base: "{provider.url}",
                      api_key: sk-ant-prov}}
user_id_mappings:
  header_patterns:
    - {{header: user-agent, pattern: '^claude-cli/', user_id: claude-code}}
    - {{header: user-agent, pattern: '^(Async)?OpenAI/Python', user_id: openai-python}}
    - {{header: user-agent, pattern: '^(Async)?Anthropic/Python', user_id: anthropic-python}}
memproxy:
  headers: {{supermemory_api_key: null}}
  memory:
    backend: local
    path: {db}
"""


@pytest.fixture(scope="module")
def remembering(tmp_path_factory: pytest.TempPathFactory,
                provider: Provider) -> Iterator[Chain]:
    tmp = tmp_path_factory.mktemp("remembering")
    chain = start_chain(tmp, memory_config(provider, tmp / "memory.db"), env={})
    yield chain
    stop_chain(chain)


def model_bodies(provider: Provider) -> list[dict[str, Any]]:
    return [json.loads(call["body"]) for call in provider.new_calls()]


def wait_until_kept(chain: Chain, user_id: str, text: str, timeout: float = 5.0) -> None:
    """Writes happen off the request path; wait for the memory to be listed."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        listed = httpx.get(f"{chain.url}/memory-routing/memory/{user_id}", timeout=5).json()
        if any(text in m["text"] for m in listed.get("memories", [])):
            return
        time.sleep(0.05)
    pytest.fail(f"{text!r} was not kept for {user_id} within {timeout} s")


@pytest.mark.parametrize("stream", [False, True])
def test_a_fact_told_by_the_openai_sdk_comes_back_in_its_next_conversation(
    provider: Provider, remembering: Chain, stream: bool
) -> None:
    client = remembering.openai()
    fact = FACT.replace("Zorblax", f"Zorblax{int(stream)}")
    told = client.chat.completions.create(
        model="gpt-fake", stream=stream,
        messages=[{"role": "system", "content": "Be brief."},
                  {"role": "user", "content": fact}])
    if stream:
        assert "".join(c.choices[0].delta.content or "" for c in told if c.choices)
    wait_until_kept(remembering, "openai-python", fact)

    provider.mark()
    raw = client.chat.completions.with_raw_response.create(
        model="gpt-fake", messages=[{"role": "system", "content": "Be brief."},
                                    {"role": "user", "content": QUESTION}])
    assert int(raw.headers["x-memproxy-memories"]) >= 1
    (body,) = model_bodies(provider)
    system = [m["content"] for m in body["messages"] if m["role"] == "system"]
    assert system[0] == "Be brief."  # the client's own system message comes first
    assert any(fact in text for text in system[1:]), system
    assert body["messages"][-1] == {"role": "user", "content": QUESTION}


@pytest.mark.parametrize("stream", [False, True])
def test_a_fact_told_by_the_anthropic_sdk_comes_back_in_its_next_conversation(
    provider: Provider, remembering: Chain, stream: bool
) -> None:
    client = remembering.anthropic()
    fact = FACT.replace("Zorblax", f"Quibble{int(stream)}")
    kwargs: Any = {"model": "claude-fake", "max_tokens": 50, "system": "Be brief."}
    if stream:
        with client.messages.stream(messages=[{"role": "user", "content": fact}],
                                    **kwargs) as events:
            assert events.get_final_text()
    else:
        client.messages.create(messages=[{"role": "user", "content": fact}], **kwargs)
    wait_until_kept(remembering, "anthropic-python", fact)

    provider.mark()
    raw = client.messages.with_raw_response.create(
        messages=[{"role": "user", "content": QUESTION}], **kwargs)
    assert int(raw.headers["x-memproxy-memories"]) >= 1
    (body,) = model_bodies(provider)
    texts = [block["text"] for block in body["system"]] if isinstance(body["system"], list) \
        else [body["system"]]
    assert texts[0] == "Be brief."
    assert any(fact in text for text in texts[1:])


def test_another_client_never_gets_those_memories(
    provider: Provider, remembering: Chain
) -> None:
    secret = "My dog Wuffington is afraid of vacuum cleaners."
    remembering.anthropic().messages.create(model="claude-fake", max_tokens=50,
                                            messages=[{"role": "user", "content": secret}])
    wait_until_kept(remembering, "anthropic-python", secret)
    provider.mark()
    remembering.openai().chat.completions.create(
        model="gpt-fake", messages=[{"role": "user", "content": "Is my dog Wuffington afraid "
                                                                "of vacuum cleaners?"}])
    (body,) = model_bodies(provider)
    assert "afraid of vacuum cleaners." not in json.dumps(body)


def claude_code_request(turns: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "model": "claude-fake", "max_tokens": 64, "stream": True,
        "system": [{"type": "text", "text": "You are Claude Code."},
                   {"type": "text", "text": "Long project instructions...",
                    "cache_control": {"type": "ephemeral"}}],
        "tools": [{"name": "Read", "description": "read a file",
                   "input_schema": {"type": "object", "properties": {}}}],
        "messages": turns,
    }


def test_a_claude_code_conversation_keeps_its_markers_and_its_block(
    provider: Provider, remembering: Chain
) -> None:
    headers = {"User-Agent": CLAUDE_CODE_UA, "x-api-key": remembering.key,
               "anthropic-version": "2023-06-01", "x-claude-code-session-id": "cc-1"}
    url = remembering.url + "/v1/messages?beta=true"
    httpx.post(url, headers={**headers, "x-claude-code-session-id": "cc-0"}, timeout=30,
               json=claude_code_request([{"role": "user", "content": FACT}])).read()
    wait_until_kept(remembering, "claude-code", FACT)

    first = [{"role": "user", "content": [
        {"type": "text", "text": "<system-reminder>files...</system-reminder>"},
        {"type": "text", "text": QUESTION, "cache_control": {"type": "ephemeral"}}]}]
    later = [*first,
             {"role": "assistant", "content": [
                 {"type": "tool_use", "id": "t1", "name": "Read", "input": {}}]},
             {"role": "user", "content": [
                 {"type": "tool_result", "tool_use_id": "t1", "content": "file text"}]}]
    provider.mark()
    for turns in (first, later):
        answer = httpx.post(url, headers=headers, json=claude_code_request(turns), timeout=30)
        assert answer.status_code == 200
        assert int(answer.headers["x-memproxy-memories"]) >= 1
    bodies = model_bodies(provider)
    assert len(bodies) == 2
    systems = [body["system"] for body in bodies]
    assert systems[0] == systems[1]  # the same block, byte for byte, on the later request
    assert systems[0][1]["cache_control"] == {"type": "ephemeral"}
    assert "cache_control" not in systems[0][-1]
    assert FACT in systems[0][-1]["text"]
    assert bodies[0]["messages"][0]["content"][1]["cache_control"] == {"type": "ephemeral"}


def test_the_owner_sees_and_erases_memories(remembering: Chain) -> None:
    client = remembering.openai()
    client.chat.completions.create(
        model="gpt-fake", messages=[{"role": "user", "content": "My locker code is 4711."}])
    wait_until_kept(remembering, "openai-python", "4711")
    users = httpx.get(remembering.url + "/memory-routing/memory", timeout=5).json()["users"]
    assert "openai-python" in [u["user_id"] for u in users]
    export = httpx.get(remembering.url + "/memory-routing/memory/openai-python/export",
                       timeout=5)
    assert any("4711" in json.loads(line)["text"] for line in export.text.splitlines())
    deleted = httpx.delete(remembering.url + "/memory-routing/memory/openai-python", timeout=5)
    assert deleted.json()["deleted"] >= 1
    listed = httpx.get(remembering.url + "/memory-routing/memory/openai-python", timeout=5)
    assert listed.json()["memories"] == []


@pytest.mark.parametrize("stream", [False, True])
def test_a_fact_told_through_the_responses_api_comes_back_in_its_instructions(
    provider: Provider, remembering: Chain, stream: bool
) -> None:
    client = remembering.openai(user_agent="codex_exec/0.50.0 (Linux; x86_64)")
    fact = f"My bike is a green Brompton number {int(stream)}."
    headers = {"x-memory-user-id": "responses-user"}
    if stream:
        with client.responses.stream(model="gpt-fake", instructions="Be brief.", input=fact,
                                     extra_headers=headers) as events:
            assert events.get_final_response().output_text
    else:
        assert client.responses.create(model="gpt-fake", instructions="Be brief.", input=fact,
                                       extra_headers=headers).output_text
    wait_until_kept(remembering, "responses-user", fact)

    provider.mark()
    raw = client.responses.with_raw_response.create(
        model="gpt-fake", instructions="Be brief.", input="What bike do I ride?",
        extra_headers=headers)
    assert int(raw.headers["x-memproxy-memories"]) >= 1
    (body,) = model_bodies(provider)
    assert body["instructions"].startswith("Be brief.\n\n<memories")
    assert fact in body["instructions"]
    assert body["input"] == "What bike do I ride?"
