"""``memproxy start`` owns its LiteLLM: a taken port, a crash loop, and where LiteLLM's output goes.

Each test runs ``python -m memproxy start`` as a process with the real ``litellm``
binary, as a user would, and reads what the user reads: the exit status, the
messages, memproxy's log, LiteLLM's log file and ``/health``.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from aiohttp.test_utils import unused_port

from memproxy.supervisor import find_litellm
from tests.helpers import START_TIMEOUT, Chain, start_chain, stop_chain

try:
    find_litellm()
except Exception:  # pragma: no cover - only without the litellm extra
    pytest.skip("litellm is not installed (pip install -e '.[litellm]')", allow_module_level=True)

CONFIG = """
model_list:
  - model_name: demo
    litellm_params: {model: openai/demo, api_key: sk-unused, mock_response: "Hello."}
"""
CLEAN_ENV = {k: v for k, v in os.environ.items()
             if k not in ("LITELLM_MASTER_KEY", "LITELLM_CONFIG", "LITELLM_BASE_URL")}


def json_lines(text: str) -> list[dict[str, Any]]:
    """memproxy's own log lines (JSON, since not on a terminal), without the banner."""
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


@pytest.fixture(scope="module")
def other_litellm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[int, int]]:
    """A LiteLLM that memproxy did not start, on a port of its own: ``(port, pid)``."""
    tmp = tmp_path_factory.mktemp("other_litellm")
    (tmp / "config.yaml").write_text(CONFIG)
    port = unused_port()
    env = {**CLEAN_ENV, "LITELLM_MASTER_KEY": "sk-other-" + secrets.token_hex(16),
           "LITELLM_LOCAL_MODEL_COST_MAP": "True"}
    with (tmp / "output.log").open("wb") as out:
        process = subprocess.Popen(
            [find_litellm(), "--config", str(tmp / "config.yaml"), "--port", str(port),
             "--host", "127.0.0.1"], stdout=out, stderr=subprocess.STDOUT, env=env, cwd=tmp)
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            assert process.poll() is None, (tmp / "output.log").read_text()
            assert time.monotonic() < deadline, "the other LiteLLM did not start"
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health/liveliness",
                             timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        yield port, process.pid
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def test_start_refuses_a_port_another_litellm_already_holds(
    tmp_path: Path, other_litellm: tuple[int, int]
) -> None:
    port, other_pid = other_litellm
    (tmp_path / "config.yaml").write_text(CONFIG)
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "memproxy", "start", "--config", str(tmp_path / "config.yaml"),
         "--litellm-port", str(port), "--memoryproxy-port", str(unused_port())],
        capture_output=True, text=True, timeout=60, env=CLEAN_ENV, cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert time.monotonic() - started < 30  # no waiting for a LiteLLM of its own
    assert (f"cannot start LiteLLM: port {port} on 127.0.0.1 is already in use by pid "
            f"{other_pid}") in result.stderr
    assert "--litellm-port PORT" in result.stderr
    assert f"serve --litellm-url http://127.0.0.1:{port}" in result.stderr
    assert "is up" not in result.stderr + result.stdout
    assert "sk-memproxy-" not in result.stderr + result.stdout  # no key the other one rejects
    assert not (tmp_path / "litellm.log").exists()  # nothing was spawned
    # The other LiteLLM is left alone.
    assert httpx.get(f"http://127.0.0.1:{port}/health/liveliness", timeout=5).status_code == 200


@pytest.fixture
def chain(tmp_path: Path) -> Iterator[Chain]:
    chain = start_chain(tmp_path, CONFIG, env={})
    yield chain
    stop_chain(chain)


def take_port(port: int, timeout: float = 10.0) -> socket.socket:
    """Listen on ``port`` as soon as it is free, as another program might."""
    deadline = time.monotonic() + timeout
    while True:
        holder = socket.socket()
        holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            holder.bind(("127.0.0.1", port))
            holder.listen()
            return holder
        except OSError:
            holder.close()
            if time.monotonic() > deadline:
                raise
            time.sleep(0.01)


def test_a_crash_loop_is_an_error_health_says_why_and_litellm_has_its_own_log(
    tmp_path: Path, chain: Chain
) -> None:
    for _ in range(3):  # each one probes LiteLLM's liveness: never a line in memproxy's log
        assert chain.health()["status"] == "ok"
    litellm = chain.health()["litellm"]
    port = int(litellm["url"].rsplit(":", 1)[1])

    os.kill(int(litellm["pid"]), signal.SIGKILL)
    holder = take_port(port)  # restarts now find the port taken, again and again
    try:
        deadline = time.monotonic() + 30
        while (not chain.health()["litellm"]["detail"].startswith("crash-looping")
               and time.monotonic() < deadline):
            time.sleep(0.2)
        health = chain.health()
        assert health["status"] == "degraded"
        assert health["litellm"]["detail"].startswith(
            f"crash-looping: port {port} is already in use by pid {os.getpid()}")
        assert health["litellm"]["restarts"] >= 1
        assert health["litellm"]["failures"] >= 2
    finally:
        holder.close()

    # Once the port is free again, LiteLLM comes back.
    deadline = time.monotonic() + START_TIMEOUT
    while chain.health()["status"] != "ok" and time.monotonic() < deadline:
        time.sleep(0.5)
    assert chain.health()["litellm"]["detail"] == "ok"

    output = chain.log.read_text()
    lines = json_lines(output)
    loops = [line for line in lines if line["event"] == "litellm_crash_loop"]
    assert loops and all(line["level"] == "error" for line in loops)
    assert f"port {port} is already in use" in loops[0]["reason"]
    assert not [line for line in lines if line["event"] == "litellm_output"]
    assert "liveliness" not in output
    # LiteLLM's own warnings still reach memproxy's log, at their level.
    assert [line for line in lines
            if line["event"] == "litellm_warning" and line["level"] == "warning"]

    litellm_log = tmp_path / "litellm.log"  # beside the config file
    assert f"its output: {litellm_log}" in output  # in the banner
    kept = litellm_log.read_text()
    assert "Uvicorn running on" in kept
    assert '"GET /health/liveliness HTTP/1.1" 200' in kept
    assert "\x1b[" not in kept


def test_a_litellm_that_cannot_start_logs_one_error_and_writes_the_log_asked_for(
    tmp_path: Path,
) -> None:
    config = tmp_path / "config.yaml"
    config.write_text("model_list: []\ngeneral_settings:\n  master_key: sk-1234\n")
    litellm_log = tmp_path / "elsewhere.log"
    result = subprocess.run(
        [sys.executable, "-m", "memproxy", "start", "--config", str(config),
         "--litellm-port", str(unused_port()), "--memoryproxy-port", str(unused_port()),
         "--litellm-log", str(litellm_log)],
        capture_output=True, text=True, timeout=START_TIMEOUT, env=CLEAN_ENV)
    assert result.returncode == 1
    errors = [line for line in json_lines(result.stdout) if line["event"] == "litellm_error"]
    # A traceback of hundreds of lines is one error: the exception it ended with.
    assert [line["line"] for line in errors][:1] == [
        "UnsafeMasterKeyError: LiteLLM proxy refused to start: the master key is a publicly "
        "known default. The fix is printed once the server exits."]
    assert len(errors) <= 3
    assert all(line["level"] == "error" for line in errors)
    assert "Traceback" not in result.stdout
    kept = litellm_log.read_text()
    assert "Traceback (most recent call last):" in kept and "\x1b[" not in kept
    assert not (tmp_path / "litellm.log").exists()


def demo_config(port: int) -> str:
    return (f"model_list:\n  - model_name: demo\n    litellm_params: {{model: openai/demo, "
            f"api_key: sk-unused, api_base: 'http://127.0.0.1:{port}/v1'}}\n"
            f"memproxy:\n  demo_provider: {{port: {port}}}\n")


def test_a_taken_demo_provider_port_is_said_before_litellm_starts(tmp_path: Path) -> None:
    port = unused_port()
    (tmp_path / "config.yaml").write_text(demo_config(port))
    with socket.create_server(("127.0.0.1", port)):
        result = subprocess.run(
            [sys.executable, "-m", "memproxy", "start", "--litellm-port", str(unused_port()),
             "--port", str(unused_port())],
            capture_output=True, text=True, timeout=START_TIMEOUT, env=CLEAN_ENV, cwd=tmp_path)
    assert result.returncode == 1
    assert f"cannot start the demo provider: port {port} is already in use" in result.stderr
    assert "memproxy.demo_provider.port" in result.stderr
    assert "litellm_spawned" not in result.stderr


def test_the_demo_provider_answers_through_the_chain_is_restarted_if_it_dies_and_health_says_so(
    tmp_path: Path
) -> None:
    port = unused_port()
    chain = start_chain(tmp_path, demo_config(port), env={})
    try:
        def ask() -> str:
            return str(chain.openai().chat.completions.create(
                model="demo", messages=[{"role": "user", "content": "hi"}]
            ).choices[0].message.content)

        assert ask().startswith('memproxy-demo here. You said: "hi".')
        demo = chain.health()["demo_provider"]
        assert (demo["status"], demo["url"], demo["restarts"]) == (
            "ok", f"http://127.0.0.1:{port}", 0)
        spawned = [line for line in json_lines(chain.log.read_text())
                   if line["event"] == "demo_provider_spawned"]
        assert demo["pid"] == spawned[0]["pid"]
        os.kill(spawned[0]["pid"], signal.SIGKILL)
        # Until it is back, /health says so (it waits a second before the restart).
        deadline = time.monotonic() + 10
        while (health := chain.health())["demo_provider"]["status"] == "ok":
            assert time.monotonic() < deadline, "/health never said the demo provider died"
            time.sleep(0.05)
        assert health["status"] == "degraded"
        assert health["demo_provider"]["detail"] == "killed by SIGKILL; restarting"
        deadline = time.monotonic() + 20
        while len([line for line in json_lines(chain.log.read_text())
                   if line["event"] == "demo_provider_ready"]) < 2:
            assert time.monotonic() < deadline, chain.log.read_text()
            time.sleep(0.2)
        assert ask().startswith("memproxy-demo here.")
        health = chain.health()
        assert health["status"] == "ok"
        assert health["demo_provider"]["restarts"] == 1
        assert health["demo_provider"]["pid"] not in (None, spawned[0]["pid"])
    finally:
        stop_chain(chain)
    events = [line["event"] for line in json_lines(chain.log.read_text())]
    assert events.index("litellm_stopped") < events.index("demo_provider_stopped")
