"""The LiteLLM child process, without LiteLLM: what a user sees when it is missing, and how
the supervisor reads and judges a child, played here by small Python scripts."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO

import httpx
import pytest
from aiohttp.test_utils import unused_port

from memproxy import supervisor
from memproxy.supervisor import (
    LiteLLMPortInUse,
    LiteLLMStartError,
    LiteLLMSupervisor,
    OutputLine,
    OutputSorter,
    check_port_free,
    find_litellm,
    strip_ansi,
)


def test_missing_litellm_says_how_to_install_it_or_use_serve(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(supervisor.sys, "executable", str(tmp_path / "python"))
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(LiteLLMStartError) as caught:
        find_litellm()
    message = str(caught.value)
    assert "pip install 'memproxy-llm[litellm]'" in message
    assert "serve --litellm-url" in message


def test_litellm_beside_the_running_python_is_preferred(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    fake = tmp_path / "litellm"
    fake.write_text("#!/bin/sh\n")
    fake.chmod(0o755)
    monkeypatch.setattr(supervisor.sys, "executable", str(tmp_path / "python"))
    monkeypatch.setenv("PATH", "/nonexistent")
    assert find_litellm() == str(fake)


def test_start_proxies_is_the_start_command_under_its_old_name() -> None:
    script = Path(sys.executable).parent / "start-proxies"
    if not script.exists():
        pytest.skip("memproxy is not installed as a package here")
    result = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0
    assert "--litellm-port" in result.stdout
    assert "--memoryproxy-port" in result.stdout
    by_module = subprocess.run([sys.executable, "-m", "memproxy", "start-proxies", "--help"],
                               capture_output=True, text=True, timeout=60)
    assert by_module.returncode == 0
    assert "--litellm-port" in by_module.stdout


# -- LiteLLM's output ------------------------------------------------------------------

# As LiteLLM 1.108.7 writes them (colour codes included).
LITELLM_LINES = [
    "INFO:     Started server process [19729]",
    "\x1b[1;37m#------------------------------------------------------------#\x1b[0m",
    "17:09:28 - LiteLLM Proxy:WARNING: login_throttle.py:126 - trusted_proxy_ranges is not set",
    "\x1b[32mLiteLLM: Proxy initialized with Config, Set models:\x1b[0m",
    'INFO:     127.0.0.1:37894 - "GET /health/liveliness HTTP/1.1" 200 OK',
    "ERROR:    [Errno 98] error while attempting to bind on address ('127.0.0.1', 18765): "
    "address already in use",
    "ERROR:    Traceback (most recent call last):",
    '  File "/x/starlette/routing.py", line 661, in lifespan',
    "    async with self.lifespan_context(app) as maybe_state:",
    "",
    "During handling of the above exception, another exception occurred:",
    "",
    "Traceback (most recent call last):",
    '  File "/x/litellm/proxy/auth/master_key_boot_check.py", line 132, in enforce',
    "    raise UnsafeMasterKeyError(",
    "litellm.proxy.auth.master_key_boot_check.UnsafeMasterKeyError: LiteLLM proxy refused "
    "to start: the master key is a publicly known default.",
    "ERROR:    Application startup failed. Exiting.",
    "17:10:00 - LiteLLM Router:ERROR: router.py:99 - no deployment for model",
]


def test_only_warnings_and_errors_are_picked_and_a_traceback_is_one_error() -> None:
    sorter = OutputSorter()
    picked = [line for text in LITELLM_LINES if (line := sorter.feed(strip_ansi(text)))]
    assert picked == [
        OutputLine("warning", "login_throttle.py:126 - trusted_proxy_ranges is not set"),
        OutputLine("error", "[Errno 98] error while attempting to bind on address "
                            "('127.0.0.1', 18765): address already in use"),
        OutputLine("error", "UnsafeMasterKeyError: LiteLLM proxy refused to start: the master "
                            "key is a publicly known default.", traceback=True),
        OutputLine("error", "Application startup failed. Exiting."),
        OutputLine("error", "router.py:99 - no deployment for model"),
    ]


def test_colour_codes_are_stripped() -> None:
    assert strip_ansi(LITELLM_LINES[3]) == "LiteLLM: Proxy initialized with Config, Set models:"


# -- the port ---------------------------------------------------------------------------

def test_a_taken_port_is_refused_with_its_number_and_holder_and_what_to_do() -> None:
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        port = other.getsockname()[1]
        with pytest.raises(LiteLLMPortInUse) as caught:
            check_port_free("127.0.0.1", port)
    message = str(caught.value)
    assert f"port {port} on 127.0.0.1 is already in use by pid {os.getpid()}" in message
    assert "--litellm-port PORT" in message
    assert f"serve --litellm-url http://127.0.0.1:{port}" in message
    check_port_free("127.0.0.1", port)  # free again once closed


# -- children played by scripts ----------------------------------------------------------

SERVER = """
import http.server, sys
class Alive(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200); self.end_headers(); self.wfile.write(b'"alive"')
    def log_message(self, *args):
        print('INFO:     127.0.0.1:1 - "GET /health/liveliness HTTP/1.1" 200 OK', flush=True)
http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), Alive).serve_forever()
"""

# A LiteLLM stand-in: "serve" answers the probe itself; "elsewhere" leaves that to a
# process outside its group and idles; "once" serves on its first run only, then fails
# to bind, as LiteLLM does on a taken port.
CHILD = """
import os, subprocess, sys, time
mode, state = sys.argv[1], sys.argv[2]
port = sys.argv[sys.argv.index("--port") + 1]
server = [sys.executable, "-c", {server!r}, port]
print("\\x1b[32mLiteLLM: Proxy initialized\\x1b[0m", flush=True)
if mode == "elsewhere":
    other = subprocess.Popen(server, start_new_session=True,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    with open(state, "w") as out:
        out.write(str(other.pid))
    time.sleep(60)
elif mode == "once" and os.path.exists(state):
    print("ERROR:    [Errno 98] error while attempting to bind on address "
          f"('127.0.0.1', {{port}}): address already in use", flush=True)
    sys.exit(1)
else:
    open(state, "w").close()
    os.execv(sys.executable, server)
"""


def child_script(tmp_path: Path, mode: str) -> str:
    script = tmp_path / f"litellm-{mode}"
    script.write_text(f"#!/bin/sh\nexec {sys.executable} {tmp_path / 'child.py'} {mode} "
                      f"{tmp_path / 'state'} \"$@\"\n")
    script.chmod(0o755)
    (tmp_path / "child.py").write_text(CHILD.format(server=SERVER))
    return str(script)


@pytest.fixture
def elsewhere(tmp_path: Path) -> Iterator[Path]:
    """Where the "elsewhere" child writes the pid of its server; that server is ended after."""
    yield tmp_path / "state"
    with contextlib.suppress(FileNotFoundError, ValueError, ProcessLookupError):
        os.kill(int((tmp_path / "state").read_text()), signal.SIGKILL)


async def test_a_server_outside_the_childs_group_never_makes_litellm_ready(
    tmp_path: Path, elsewhere: Path
) -> None:
    port = unused_port()
    watched = LiteLLMSupervisor(config=tmp_path / "config.yaml", port=port, ready_timeout=3,
                                executable=child_script(tmp_path, "elsewhere"))
    with pytest.raises(LiteLLMStartError, match="did not answer /health/liveliness"):
        await watched.start()
    assert not watched.ready
    # Something did answer the probe all along: the child's unrelated neighbour.
    assert httpx.get(f"http://127.0.0.1:{port}/health/liveliness").status_code == 200


async def read_log(file: TextIO) -> list[dict[str, object]]:
    await asyncio.sleep(0)  # the writer flushes at the end of the loop iteration
    file.flush()
    return [json.loads(line) for line in Path(file.name).read_text().splitlines()]


async def test_a_crash_loop_is_an_error_with_its_reason_and_the_output_has_its_own_file(
    tmp_path: Path, json_log_file: TextIO
) -> None:
    litellm_log = tmp_path / "litellm.log"
    watched = LiteLLMSupervisor(config=tmp_path / "config.yaml", port=unused_port(),
                                ready_timeout=10, max_backoff=1,
                                executable=child_script(tmp_path, "once"), log_file=litellm_log)
    await watched.start()
    try:
        assert watched.ready and watched.detail == "ok"
        httpx.get(watched.url + "/health/liveliness")
        assert watched.pid is not None
        os.kill(watched.pid, signal.SIGKILL)
        deadline = time.monotonic() + 20
        while watched.failures < 3 and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        assert watched.detail == "crash-looping: address already in use"
        assert not watched.ready and watched.restarts >= 2
    finally:
        await watched.stop()

    lines = await read_log(json_log_file)
    errors = [line for line in lines if line["level"] == "error"]
    assert {"litellm_failed", "litellm_crash_loop", "litellm_error"} <= {
        line["event"] for line in errors}
    assert any(line["event"] == "litellm_crash_loop"
               and line["reason"] == "address already in use" for line in errors)
    assert not [line for line in lines if "liveliness" in json.dumps(line)]
    assert not [line for line in lines if line["event"] == "litellm_output"]

    output = litellm_log.read_text()
    assert "LiteLLM: Proxy initialized" in output and "\x1b[" not in output
    assert "address already in use" in output
    assert "GET /health/liveliness" in output  # LiteLLM's own file keeps all it wrote


async def test_litellms_output_file_is_moved_aside_when_it_passes_its_limit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(supervisor, "LOG_FILE_LIMIT", 1000)
    litellm_log = tmp_path / "litellm.log"
    litellm_log.write_text("from an earlier run\n" * 40)  # 800 characters: nearly full
    watched = LiteLLMSupervisor(config=tmp_path / "config.yaml", port=unused_port(),
                                ready_timeout=10, executable=child_script(tmp_path, "serve"),
                                log_file=litellm_log)
    await watched.start()
    try:
        async with httpx.AsyncClient() as client:
            for _ in range(40):  # a line of 67 characters each in LiteLLM's output
                await client.get(watched.url + "/health/liveliness")
    finally:
        await watched.stop()  # which reads what LiteLLM wrote to the end

    current, previous = litellm_log.read_text(), Path(f"{litellm_log}.1").read_text()
    assert len(current) <= 1000 and len(previous) <= 1000 + 100  # the limit, and a line
    assert "from an earlier run" not in current + previous  # two files at most are kept
    assert current.endswith('"GET /health/liveliness HTTP/1.1" 200 OK\n')
    assert not (tmp_path / "litellm.log.2").exists()
