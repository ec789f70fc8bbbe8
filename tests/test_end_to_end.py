"""The whole chain, for real: SDK clients -> memproxy start -> the real LiteLLM -> a fake provider.

``memproxy start`` runs as a separate process, so its supervisor spawns the real
``litellm`` binary. The only stand-in is the LLM provider (memproxy/demo_provider.py),
which records every request it gets; the assertions are about what it recorded.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import anthropic
import httpx
import openai
import pytest
from aiohttp.test_utils import unused_port

from memproxy.supervisor import find_litellm
from tests.helpers import START_TIMEOUT, Chain, Provider, start_chain, stop_chain

ROOT = Path(__file__).resolve().parent.parent
HASH_SECRET = "e2e-hash-secret-0123456789abcdef"
SM_KEY = "sm-e2e-supermemory-key"
CLAUDE_CODE_UA = "claude-cli/2.1.197 (external, cli)"
JAVA_UA = "OpenAIClientImpl/Java"

try:
    find_litellm()
except Exception:  # pragma: no cover - only without the litellm extra
    pytest.skip("litellm is not installed (pip install -e '.[litellm]')", allow_module_level=True)


def config_text(provider: Provider, *, api_key_hash: bool) -> str:
    """Laid out as the bundled config.yaml: LiteLLM forwards client headers to the
    Supermemory-routed model only, and adds the Supermemory key to it itself."""
    return f"""
model_list:
  - model_name: gpt-fake
    litellm_params: {{model: openai/gpt-fake, api_base: "{provider.url}/v1", api_key: sk-prov}}
  - model_name: claude-fake
    litellm_params:
      model: anthropic/claude-fake
      api_base: "{provider.url}/v3/api.anthropic.com"
      api_key: sk-ant-prov
      extra_headers: {{x-supermemory-api-key: os.environ/SUPERMEMORY_API_KEY}}
litellm_settings:
  model_group_settings:
    forward_client_headers_to_llm_api: [claude-fake]
user_id_mappings:
  header_patterns:
    - {{header: user-agent, pattern: '^claude-cli/', user_id: claude-code}}
    - {{header: user-agent, pattern: '^OpenAIClient(Async)?Impl/Java', user_id: jetbrains}}
memproxy:
  headers: {{supermemory_api_key: null}}
  detectors:
    api_key_hash:
      enabled: {str(api_key_hash).lower()}
      options: {{secret: "{HASH_SECRET}", per_tool: true}}
"""


@pytest.fixture(scope="module")
def with_memory(tmp_path_factory: pytest.TempPathFactory, provider: Provider) -> Iterator[Chain]:
    """The key hash on and a Supermemory key set."""
    chain = start_chain(tmp_path_factory.mktemp("with_memory"),
                        config_text(provider, api_key_hash=True),
                        env={"SUPERMEMORY_API_KEY": SM_KEY})
    yield chain
    stop_chain(chain)


@pytest.fixture(scope="module")
def plain(tmp_path_factory: pytest.TempPathFactory, provider: Provider) -> Iterator[Chain]:
    """No key hash: unrecognised clients get the default."""
    chain = start_chain(tmp_path_factory.mktemp("plain"),
                        config_text(provider, api_key_hash=False),
                        env={"SUPERMEMORY_API_KEY": SM_KEY})
    yield chain
    stop_chain(chain)


# -- the calls a client can make --------------------------------------------------------

Call = Callable[[Chain, str | None, dict[str, str]], int]


def chat(model: str, stream: bool) -> Call:
    def call(chain: Chain, user_agent: str | None, headers: dict[str, str]) -> int:
        client = chain.openai(user_agent)
        messages: Any = [{"role": "user", "content": "hello"}]
        if not stream:
            reply = client.chat.completions.create(model=model, messages=messages,
                                                   extra_headers=headers)
            assert reply.choices[0].message.content == "Hello from the fake provider."
            return 1
        pieces = [c.choices[0].delta.content or "" for c in client.chat.completions.create(
            model=model, messages=messages, stream=True, extra_headers=headers) if c.choices]
        assert "".join(pieces) == "Hello from the fake provider."
        return len([p for p in pieces if p])
    return call


def messages(stream: bool) -> Call:
    def call(chain: Chain, user_agent: str | None, headers: dict[str, str]) -> int:
        client = chain.anthropic(user_agent)
        kwargs: Any = {"model": "claude-fake", "max_tokens": 50,
                       "messages": [{"role": "user", "content": "hello"}],
                       "extra_headers": headers}
        if not stream:
            reply = client.messages.create(**kwargs)
            assert reply.content[0].text == "Hello from the fake provider."  # type: ignore[union-attr]
            return 1
        deltas = []
        with client.messages.stream(**kwargs) as events:
            for event in events:
                if event.type == "content_block_delta" and event.delta.type == "text_delta":
                    deltas.append(event.delta.text)
        assert "".join(deltas) == "Hello from the fake provider."
        return len(deltas)
    return call


CALLS = {
    "chat-openai-model": chat("gpt-fake", False),
    "chat-openai-model-stream": chat("gpt-fake", True),
    "chat-anthropic-model": chat("claude-fake", False),
    "chat-anthropic-model-stream": chat("claude-fake", True),
    "messages": messages(False),
    "messages-stream": messages(True),
}


def one_call(provider: Provider, chain: Chain, call: Call, user_agent: str | None,
             headers: dict[str, str]) -> dict[str, Any]:
    provider.mark()
    call(chain, user_agent, headers)
    calls = provider.new_calls()
    assert len(calls) == 1, [c["path"] for c in calls]
    return dict(calls[0]["headers"])


def key_hash(key: str) -> str:
    return "key-" + hmac.new(HASH_SECRET.encode(), key.encode(), hashlib.sha256).hexdigest()[:16]


MEMORY_HEADERS = ("x-sm-user-id", "x-sm-conversation-id", "x-supermemory-api-key")
SUPERMEMORY_CALLS = [name for name in CALLS if "openai-model" not in name]
OTHER_CALLS = [name for name in CALLS if "openai-model" in name]


@pytest.mark.parametrize("name", SUPERMEMORY_CALLS)
def test_each_detection_path_reaches_the_supermemory_model(
    name: str, provider: Provider, with_memory: Chain
) -> None:
    call = CALLS[name]
    cases: list[tuple[str | None, dict[str, str], str]] = [
        (None, {"x-memory-user-id": "alice"}, "alice"),
        (CLAUDE_CODE_UA, {}, key_hash(with_memory.key) + ":claude-code"),
        (JAVA_UA, {}, key_hash(with_memory.key) + ":jetbrains"),
        (None, {}, key_hash(with_memory.key)),
        (None, {"x-sm-user-id": "mallory"}, key_hash(with_memory.key)),
    ]
    for user_agent, headers, expected in cases:
        seen = one_call(provider, with_memory, call, user_agent, headers)
        assert seen.get("x-sm-user-id") == expected, (user_agent, headers)
        assert "x-memory-user-id" not in seen
        # LiteLLM added the key itself (os.environ/ in extra_headers resolved).
        assert seen.get("x-supermemory-api-key") == SM_KEY


@pytest.mark.parametrize("name", OTHER_CALLS)
def test_another_provider_gets_neither_the_user_id_nor_the_key(
    name: str, provider: Provider, with_memory: Chain
) -> None:
    seen = one_call(provider, with_memory, CALLS[name], CLAUDE_CODE_UA,
                    {"X-Claude-Code-Session-Id": "5d1e-session"})
    assert [h for h in MEMORY_HEADERS if h in seen] == []
    assert SM_KEY not in str(seen)


def test_memproxy_start_warns_about_nothing_in_this_layout(with_memory: Chain) -> None:
    assert b"config_warning" not in with_memory.log.read_bytes()


@pytest.mark.parametrize("name", ["chat-anthropic-model", "messages-stream"])
def test_unrecognised_client_lands_in_default_and_its_supermemory_key_is_dropped(
    name: str, provider: Provider, plain: Chain
) -> None:
    seen = one_call(provider, plain, CALLS[name], None, {"x-supermemory-api-key": "client-key"})
    assert seen.get("x-sm-user-id") == "default"
    assert "client-key" not in str(seen)


def test_anthropic_model_is_called_through_the_supermemory_router_path(
    provider: Provider, with_memory: Chain
) -> None:
    provider.mark()
    CALLS["messages"](with_memory, CLAUDE_CODE_UA, {})
    CALLS["chat-anthropic-model"](with_memory, None, {})
    assert [c["path"] for c in provider.new_calls()] == [
        "/v3/api.anthropic.com/v1/messages", "/v3/api.anthropic.com/v1/messages"]


@pytest.mark.parametrize("name", ["chat-openai-model-stream", "chat-anthropic-model-stream",
                                  "messages-stream"])
def test_streamed_answers_reach_the_sdk_in_several_chunks(
    name: str, with_memory: Chain
) -> None:
    assert CALLS[name](with_memory, None, {}) >= 3


def test_claude_code_session_becomes_the_conversation_id(
    provider: Provider, with_memory: Chain
) -> None:
    seen = one_call(provider, with_memory, CALLS["messages-stream"], CLAUDE_CODE_UA,
                    {"X-Claude-Code-Session-Id": "5d1e-session"})
    assert seen.get("x-sm-conversation-id") == "5d1e-session"


def test_litellm_that_dies_is_restarted_and_clients_get_quick_503s_meanwhile(
    provider: Provider, plain: Chain
) -> None:
    old_pid = plain.litellm_pid()
    os.kill(old_pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    status = 200
    while time.monotonic() < deadline and status != 503:
        started = time.monotonic()
        resp = httpx.post(plain.url + "/v1/chat/completions", json={}, timeout=10,
                             headers={"Authorization": f"Bearer {plain.key}"})
        status = resp.status_code
        time.sleep(0.05)
    assert status == 503
    assert time.monotonic() - started < 1.0
    assert resp.headers["Retry-After"] == "2"
    assert resp.json()["error"]["code"] == "upstream_unavailable"
    assert plain.health()["status"] == "degraded"

    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline and plain.health()["status"] != "ok":
        time.sleep(0.5)
    health = plain.health()
    assert health["status"] == "ok"
    assert health["litellm"]["restarts"] == 1
    assert health["litellm"]["pid"] != old_pid
    seen = one_call(provider, plain, CALLS["chat-anthropic-model"], CLAUDE_CODE_UA, {})
    assert seen.get("x-sm-user-id") == "claude-code"


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie has exited; only its parent has yet to collect it.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"
    except (FileNotFoundError, IndexError):
        return False


def wait_gone(pid: int, timeout: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not pid_alive(pid):
            return True
        time.sleep(0.1)
    return False


def test_a_wrong_or_missing_key_is_explained_once_per_client(plain: Chain) -> None:
    url = plain.url + "/v1/chat/completions"
    body = {"model": "gpt-fake", "messages": [{"role": "user", "content": "hello"}]}
    for _ in range(3):
        wrong = httpx.post(url, json=body, timeout=30, headers={
            "Authorization": "Bearer sk-not-the-master-key", "User-Agent": CLAUDE_CODE_UA})
        assert wrong.status_code == 400  # LiteLLM's own answer, left as it is
        assert "No connected db" in wrong.text
    missing = httpx.post(url, json=body, timeout=30, headers={"User-Agent": "curl/8.5.0"})
    assert missing.status_code >= 400
    time.sleep(0.3)  # log lines are flushed once per event-loop iteration
    warnings = [json.loads(line) for line in plain.log.read_text().splitlines()
                if '"litellm_rejected_key"' in line]
    by_client = {w["client"]: w for w in warnings}
    assert len([w for w in warnings if w["client"] == "claude-code"]) == 1
    assert "master key" in by_client["claude-code"]["problem"]
    assert "LITELLM_MASTER_KEY" in by_client["claude-code"]["fix"]
    assert "sk-not-the-master-key" not in plain.log.read_text()
    shown = httpx.get(plain.url + "/memory-routing/status", timeout=5).json()["key_problems"]
    assert any(k["client"] == "claude-code" and k["count"] >= 3 for k in shown)


# These two end the module's chains, so they come last.

def test_sigterm_stops_memproxy_and_litellm(with_memory: Chain) -> None:
    litellm = with_memory.litellm_pid()
    with_memory.process.send_signal(signal.SIGTERM)
    assert with_memory.process.wait(timeout=40) == 0
    assert wait_gone(litellm)
    assert b"litellm_stopped" in with_memory.log.read_bytes()


def test_sigkill_of_memproxy_takes_litellm_with_it(plain: Chain) -> None:
    litellm = plain.litellm_pid()
    plain.process.send_signal(signal.SIGKILL)
    plain.process.wait(timeout=10)
    assert wait_gone(litellm), "LiteLLM outlived a SIGKILLed memproxy"


def test_quick_start_answers_offline_with_a_generated_key(tmp_path: Path) -> None:
    """The README's quick start: bundled config, no keys at all, then the example client,
    and memory at work: a second conversation gets what the first one said."""
    shutil.copy(ROOT / "config.yaml", tmp_path / "config.yaml")  # its memory file goes there
    port, litellm_port = unused_port(), unused_port()
    env = {k: v for k, v in os.environ.items()
           if k not in ("LITELLM_MASTER_KEY", "SUPERMEMORY_API_KEY", "LITELLM_CONFIG",
                        "LITELLM_BASE_URL", "OPENAI_API_KEY", "ANTHROPIC_API_KEY")}
    log = tmp_path / "start.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "memproxy", "start", "--litellm-port", str(litellm_port),
             "--memoryproxy-port", str(port)],
            stdout=out, stderr=subprocess.STDOUT, env=env, cwd=tmp_path)
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while "is up." not in log.read_text() and time.monotonic() < deadline:
            assert process.poll() is None, log.read_text()
            time.sleep(0.2)
        banner = log.read_text()
        key = next(word for word in banner.split() if word.startswith("sk-memproxy-"))
        assert banner.count(key) == 2  # once as the key, once in the curl line; never logged
        example = subprocess.run(
            [sys.executable, str(ROOT / "examples" / "openai_sdk.py")], capture_output=True,
            text=True, timeout=60,
            env={**env, "MEMPROXY_URL": f"http://127.0.0.1:{port}", "MEMPROXY_KEY": key})
        assert example.returncode == 0, example.stderr
        assert "memory user: openai-python decided by header_patterns" in example.stdout
        assert 'memproxy-demo here. You said: "What did we talk about last time?". Your ' \
               "memory space: openai-python." in example.stdout
        assert 'streamed: memproxy-demo here. You said: "Say hello.".' in example.stdout
        by_curl = subprocess.run(["sh", str(ROOT / "examples" / "curl.sh")],
                                 capture_output=True, text=True, timeout=60,
                                 env={**env, "MEMPROXY_URL": f"http://127.0.0.1:{port}",
                                      "MEMPROXY_KEY": key})
        assert by_curl.returncode == 0, by_curl.stderr
        assert "x-memproxy-user-id: curl" in by_curl.stdout
        assert "Your memory space: curl." in by_curl.stdout
        assert by_curl.stdout.count("data: {") > 3  # the streamed answer, event by event
        assert f"Memory    {tmp_path / 'memproxy-memory.db'}" in banner
        assert "Demo      http://127.0.0.1:8766" in banner

        # Streams arrive event by event, on the Responses API and on Anthropic's Messages.
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=key)
        with client.responses.stream(model="memproxy-demo", input="Stream me.") as events:
            deltas = [e.delta for e in events if e.type == "response.output_text.delta"]
        assert len(deltas) >= 3
        assert "".join(deltas).startswith('memproxy-demo here. You said: "Stream me.".')
        claude = anthropic.Anthropic(base_url=f"http://127.0.0.1:{port}", api_key=key)
        with claude.messages.stream(model="memproxy-demo-claude", max_tokens=100, messages=[
                {"role": "user", "content": "Stream me too."}]) as stream:
            pieces = list(stream.text_stream)
        assert len(pieces) >= 3
        assert "".join(pieces) == ('memproxy-demo here. You said: "Stream me too.". Your memory '
                                   "space: anthropic-python. Memories in this request: 0.")

        client.chat.completions.create(model="memproxy-demo", messages=[
            {"role": "user", "content": "My favourite colour is teal."}])
        kept = ""
        deadline = time.monotonic() + 5
        while "teal" not in kept and time.monotonic() < deadline:
            kept = subprocess.run([sys.executable, "-m", "memproxy", "memory", "list",
                                   "openai-python"], capture_output=True, text=True,
                                  timeout=60, cwd=tmp_path, env=env).stdout
        assert "user: My favourite colour is teal." in kept
        second = client.chat.completions.with_raw_response.create(
            model="memproxy-demo",
            messages=[{"role": "user", "content": "What is my favourite colour?"}])
        memories = int(second.headers["x-memproxy-memories"])
        assert memories >= 1
        # The demo provider counted the memories memproxy added to the request.
        assert second.parse().choices[0].message.content.endswith(
            f"Memories in this request: {memories}.")
    finally:
        process.send_signal(signal.SIGINT)
        process.wait(timeout=40)
    assert process.returncode == 0


def test_litellm_that_cannot_start_is_reported_with_its_last_output(tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text("model_list: []\ngeneral_settings:\n  master_key: sk-1234\n")
    env = {k: v for k, v in os.environ.items() if k != "LITELLM_MASTER_KEY"}
    result = subprocess.run(
        [sys.executable, "-m", "memproxy", "start", "--config", str(config),
         "--litellm-port", str(unused_port()), "--memoryproxy-port", str(unused_port())],
        capture_output=True, text=True, timeout=START_TIMEOUT, env=env)
    assert result.returncode == 1
    assert "cannot start LiteLLM: LiteLLM exited with status" in result.stderr
    assert "LiteLLM's last output:" in result.stderr
    assert "master key" in result.stderr.lower()
    assert "Traceback" not in result.stderr.split("LiteLLM's last output:")[0]



def client_tool(name: str) -> str | None:
    """A real client's command: in $MEMPROXY_CLIENT_TOOLS (e.g. the node_modules/.bin of
    ``npm install --prefix DIR @openai/codex @anthropic-ai/claude-code``), else on PATH."""
    folder = os.environ.get("MEMPROXY_CLIENT_TOOLS")
    if folder and (Path(folder) / name).is_file():
        return str(Path(folder) / name)
    return shutil.which(name)


@pytest.mark.skipif(not (client_tool("codex") and client_tool("claude")),
                    reason="codex and claude not found (set MEMPROXY_CLIENT_TOOLS)")
def test_codex_and_claude_code_answer_offline_from_the_demo_models(tmp_path: Path) -> None:
    codex, claude = client_tool("codex"), client_tool("claude")
    assert codex and claude
    demo_port = unused_port()
    config = (ROOT / "config.yaml").read_text().replace("8766", str(demo_port))
    chain = start_chain(tmp_path, config, env={})
    try:
        (tmp_path / "codex").mkdir()
        (tmp_path / "codex" / "config.toml").write_text(
            'model = "memproxy-demo"\nmodel_provider = "memproxy"\n\n'
            '[model_providers.memproxy]\nname = "memproxy"\n'
            f'base_url = "{chain.url}/v1"\nenv_key = "MEMPROXY_KEY"\nwire_api = "responses"\n')
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("OPENAI_", "ANTHROPIC_", "CODEX_", "CLAUDE_"))}
        ran = subprocess.run(
            [codex, "exec", "--skip-git-repo-check", "Say hi to the demo."],
            capture_output=True, text=True, timeout=120, cwd=tmp_path,
            env={**env, "CODEX_HOME": str(tmp_path / "codex"), "MEMPROXY_KEY": chain.key})
        assert ran.returncode == 0, ran.stderr
        assert 'memproxy-demo here. You said: "Say hi to the demo.". Your memory space: ' \
               "codex." in ran.stdout

        (tmp_path / "home").mkdir()
        ran = subprocess.run(
            [claude, "-p", "Say hi to the demo."], capture_output=True, text=True,
            timeout=120, cwd=tmp_path,
            env={**env, "HOME": str(tmp_path / "home"), "ANTHROPIC_BASE_URL": chain.url,
                 "ANTHROPIC_API_KEY": chain.key, "ANTHROPIC_MODEL": "memproxy-demo-claude",
                 "ANTHROPIC_DEFAULT_HAIKU_MODEL": "memproxy-demo-claude",
                 "DISABLE_TELEMETRY": "1", "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1"})
        assert ran.returncode == 0, ran.stderr
        assert 'memproxy-demo here. You said: "Say hi to the demo.". Your memory space: ' \
               "claude-code." in ran.stdout
    finally:
        stop_chain(chain)


def test_the_llm_command_answers_offline_from_the_demo_model(tmp_path: Path) -> None:
    """simonw's ``llm``, set up as the README's client table says: an OpenAI-compatible
    model whose base URL is memproxy's."""
    llm = Path(sys.executable).parent / "llm"
    assert llm.exists(), "llm is part of the test extra"
    demo_port = unused_port()
    config = (ROOT / "config.yaml").read_text().replace("8766", str(demo_port))
    chain = start_chain(tmp_path, config, env={})
    try:
        home = tmp_path / "llm"
        home.mkdir()
        (home / "extra-openai-models.yaml").write_text(
            f"- model_id: memproxy-demo\n  model_name: memproxy-demo\n"
            f"  api_base: {chain.url}/v1\n  api_key_name: memproxy\n")
        (home / "keys.json").write_text(json.dumps({"memproxy": chain.key}))
        env = {k: v for k, v in os.environ.items() if not k.startswith("OPENAI_")}
        ran = subprocess.run([str(llm), "-m", "memproxy-demo", "Say hi to the demo."],
                             capture_output=True, text=True, timeout=120,
                             env={**env, "LLM_USER_PATH": str(home)})
        assert ran.returncode == 0, ran.stderr
        assert 'memproxy-demo here. You said: "Say hi to the demo.". Your memory space: ' \
               "openai-python." in ran.stdout
    finally:
        stop_chain(chain)
