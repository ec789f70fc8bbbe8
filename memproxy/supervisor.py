"""The LiteLLM child process: spawn, wait until ready, restart with backoff, stop.

``memproxy start`` runs the real ``litellm`` binary beside memproxy. The child
lives in its own process group and is told by the kernel to die with its
parent (``PR_SET_PDEATHSIG``), so it never outlives memproxy, even when
memproxy is killed with SIGKILL.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import shutil
import signal
import sys
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Mapping
from pathlib import Path

import aiohttp
import structlog
from aiohttp import web

log = structlog.get_logger("memproxy.supervisor")

LIVELINESS_PATH = "/health/liveliness"
_PR_SET_PDEATHSIG = 1


class LiteLLMStartError(Exception):
    """LiteLLM could not be started; the message says why and what to do."""


def find_litellm() -> str:
    """The ``litellm`` executable: beside this Python first (an unactivated venv), then PATH."""
    beside = Path(sys.executable).parent / "litellm"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which("litellm")
    if found:
        return found
    raise LiteLLMStartError(
        "the litellm command is not installed.\n"
        "  Install it beside memproxy:  pip install 'memproxy[litellm]'\n"
        "  or run memproxy alone in front of a LiteLLM that runs elsewhere:\n"
        "    python -m memproxy serve --litellm-url http://HOST:PORT"
    )


def die_with_parent() -> None:  # pragma: no cover - runs in the child before exec
    """In a child, before exec: ask the kernel for SIGTERM when the parent dies."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
        # The parent may have died between fork and prctl.
        if os.getppid() == 1:
            os._exit(1)


class LiteLLMSupervisor:
    """Keeps one LiteLLM child running and says whether it is ready."""

    def __init__(
        self,
        *,
        config: Path,
        port: int,
        host: str = "127.0.0.1",
        env: Mapping[str, str] | None = None,
        ready_timeout: float = 120.0,
        stop_timeout: float = 10.0,
        max_backoff: float = 30.0,
        executable: str | None = None,
        on_restart: Callable[[], None] | None = None,
    ) -> None:
        """``on_restart`` is called each time LiteLLM is restarted (metrics count them)."""
        self.config = config
        self.port = port
        self.host = host
        self.url = f"http://{host}:{port}"
        self.env = dict(os.environ if env is None else env)
        self.ready_timeout = ready_timeout
        self.stop_timeout = stop_timeout
        self.max_backoff = max_backoff
        self.executable = executable
        self.restarts = 0
        self.on_restart = on_restart
        self.ready = False
        self.last_lines: deque[str] = deque(maxlen=40)
        self._process: asyncio.subprocess.Process | None = None
        self._pump: asyncio.Task[None] | None = None
        self._watch: asyncio.Task[None] | None = None
        self._stop_requested = asyncio.Event()

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None

    def unavailable(self) -> str | None:
        """``None`` when LiteLLM is ready, else why not (for quick 503s)."""
        return None if self.ready else "LiteLLM is restarting"

    async def start(self) -> None:
        """Spawn LiteLLM and wait until it answers; raise :class:`LiteLLMStartError` if not."""
        executable = self.executable or find_litellm()
        await self._spawn(executable)
        await self._wait_ready()
        self._watch = asyncio.create_task(self._watch_and_restart(executable))

    async def _spawn(self, executable: str) -> None:
        command = [executable, "--config", str(self.config), "--port", str(self.port),
                   "--host", self.host]
        self._process = await asyncio.create_subprocess_exec(
            *command, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT, env=self.env, start_new_session=True,
            preexec_fn=die_with_parent,
        )
        log.info("litellm_spawned", pid=self._process.pid, port=self.port)
        self._pump = asyncio.create_task(self._pump_output(self._process))

    async def _pump_output(self, process: asyncio.subprocess.Process) -> None:
        """LiteLLM's output, line by line, into memproxy's log, tagged as LiteLLM's."""
        assert process.stdout is not None
        while True:
            try:
                raw = await process.stdout.readline()
            except ValueError:  # a line longer than the stream limit
                continue
            if not raw:
                return
            text = raw.decode("utf-8", "replace").rstrip()
            if text:
                self.last_lines.append(text)
                log.info("litellm_output", source="litellm", line=text)

    def _failure(self, headline: str) -> LiteLLMStartError:
        tail = "\n".join(f"    {line}" for line in list(self.last_lines)[-15:])
        return LiteLLMStartError(
            f"{headline}\n  LiteLLM's last output:\n{tail or '    (nothing)'}"
        )

    async def _wait_ready(self) -> None:
        assert self._process is not None
        deadline = time.monotonic() + self.ready_timeout
        async with aiohttp.ClientSession() as session:
            while True:
                if self._process.returncode is not None:
                    if self._pump:
                        with contextlib.suppress(Exception):
                            await asyncio.wait_for(self._pump, 2)
                    raise self._failure(
                        f"LiteLLM exited with status {self._process.returncode} while starting"
                    )
                try:
                    async with session.get(self.url + LIVELINESS_PATH,
                                           timeout=aiohttp.ClientTimeout(total=2)) as resp:
                        if resp.status == 200:
                            self.ready = True
                            log.info("litellm_ready", url=self.url, pid=self._process.pid)
                            return
                except (aiohttp.ClientError, TimeoutError):
                    pass
                if time.monotonic() > deadline:
                    await self._terminate()
                    raise self._failure(
                        f"LiteLLM did not answer {LIVELINESS_PATH} within "
                        f"{self.ready_timeout:.0f} s"
                    )
                await asyncio.sleep(0.2)

    async def _watch_and_restart(self, executable: str) -> None:
        backoff = 1.0
        while not self._stop_requested.is_set():
            assert self._process is not None
            started = time.monotonic()
            code = await self._process.wait()
            if self._stop_requested.is_set():
                return
            self.ready = False
            if time.monotonic() - started > 60:
                backoff = 1.0
            log.error("litellm_exited", status=code, restart_in_s=backoff,
                      last_line=self.last_lines[-1] if self.last_lines else "")
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, self.max_backoff)
            if self._stop_requested.is_set():
                return
            self.restarts += 1
            if self.on_restart is not None:
                self.on_restart()
            try:
                await self._spawn(executable)
                await self._wait_ready()
            except LiteLLMStartError as exc:
                log.error("litellm_restart_failed", error=str(exc).splitlines()[0])
            except OSError as exc:
                log.error("litellm_restart_failed", error=str(exc))
                return

    async def _terminate(self) -> None:
        process = self._process
        if process is None or process.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            await asyncio.wait_for(process.wait(), self.stop_timeout)
        except TimeoutError:
            log.warning("litellm_kill", pid=process.pid, after_s=self.stop_timeout)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            await process.wait()

    async def stop(self) -> None:
        """Terminate LiteLLM (SIGTERM, then SIGKILL after ``stop_timeout``)."""
        self._stop_requested.set()
        self.ready = False
        if self._watch:
            self._watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watch
        await self._terminate()
        if self._pump:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._pump, 2)
        if self._process is not None:
            log.info("litellm_stopped", status=self._process.returncode)


def supervised(supervisor: LiteLLMSupervisor) -> Callable[[web.Application],
                                                          AsyncIterator[None]]:
    """A ``cleanup_ctx`` that starts LiteLLM before memproxy serves and stops it after."""

    async def litellm_ctx(app: web.Application) -> AsyncIterator[None]:
        await supervisor.start()
        try:
            yield
        finally:
            await supervisor.stop()

    return litellm_ctx
