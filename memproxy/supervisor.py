"""The LiteLLM child process: spawn, wait until ready, restart with backoff, stop.

``memproxy start`` runs the real ``litellm`` binary beside memproxy. The child
lives in its own process group and is told by the kernel to die with its
parent (``PR_SET_PDEATHSIG``), so it never outlives memproxy, even when
memproxy is killed with SIGKILL.

``start`` owns its LiteLLM: it refuses a port something else already listens
on, and it calls LiteLLM ready only once its own child listens on the port
(another LiteLLM answering there would take requests with keys it does not
know). LiteLLM's output goes to a file of its own; memproxy's log carries only
LiteLLM's warnings and errors (see :class:`OutputSorter`).

When the config asks for it (``memproxy.demo_provider``), ``start`` also runs the
offline demo provider the demo models point at (:class:`DemoProviderSupervisor`):
started before LiteLLM, restarted if it dies, stopped after LiteLLM.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import re
import shutil
import signal
import socket
import sys
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, TextIO

import aiohttp
import structlog
from aiohttp import web

log = structlog.get_logger("memproxy.supervisor")

LIVELINESS_PATH = "/health/liveliness"
_PR_SET_PDEATHSIG = 1
#: LiteLLM's output file (``start --litellm-log``) is moved to ``NAME.1``, replacing the one
#: before, when it passes this many characters: LiteLLM writes a line per request, and one
#: per liveliness probe, so without this it would grow for as long as memproxy runs.
LOG_FILE_LIMIT = 20 * 1024 * 1024
#: A child that exits sooner than this after its start counts towards a crash loop.
STABLE_AFTER_S = 60.0
#: This many quick exits in a row make a crash loop.
CRASH_LOOP_AFTER = 2


class LiteLLMStartError(Exception):
    """LiteLLM could not be started; the message says why and what to do."""


class LiteLLMPortInUse(LiteLLMStartError):
    """Something already listens on the LiteLLM port, so memproxy cannot run its own."""

    def __init__(self, host: str, port: int) -> None:
        self.port = port
        holder = describe_holder(port)
        #: In a few words, for ``/health``.
        self.reason = f"port {port} is already in use{f' by {holder}' if holder else ''}"
        super().__init__(
            f"port {port} on {host} is already in use{f' by {holder}' if holder else ''}, "
            f"so memproxy cannot run its own LiteLLM there.\n"
            f"  Stop that process, or give LiteLLM another port:  --litellm-port PORT\n"
            f"  To put memproxy in front of a LiteLLM that already runs there instead:\n"
            f"    python -m memproxy serve --litellm-url http://{host}:{port}"
        )


def check_port_free(host: str, port: int) -> None:
    """Raise :class:`LiteLLMPortInUse` when ``host:port`` cannot be bound.

    The probe binds with ``SO_REUSEADDR``, as LiteLLM's server (uvicorn) does, so
    connections still in TIME_WAIT from an earlier run do not count as taken;
    on Linux a listening socket still does.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise LiteLLMPortInUse(host, port) from exc


_PROC = Path("/proc")


def listening_inodes(port: int) -> set[str] | None:
    """Inodes of the TCP sockets listening on ``port``; ``None`` without Linux's ``/proc``."""
    tables = [_PROC / "net" / "tcp", _PROC / "net" / "tcp6"]
    if not tables[0].exists():
        return None
    inodes = set()
    for table in tables:
        try:
            rows = table.read_text().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            fields = row.split()  # sl local rem st tx:rx tr:when retrnsmt uid timeout inode
            if (len(fields) > 9 and fields[3] == "0A"  # TCP_LISTEN
                    and int(fields[1].rsplit(":", 1)[1], 16) == port):
                inodes.add(fields[9])
    return inodes


def _holds_socket(pid: int, sockets: set[str]) -> bool:
    """Whether process ``pid`` has one of ``sockets`` (``socket:[inode]``) open."""
    try:
        fds = list((_PROC / str(pid) / "fd").iterdir())
    except OSError:  # gone, or not ours to look at
        return False
    for fd in fds:
        with contextlib.suppress(OSError):
            if os.readlink(fd) in sockets:
                return True
    return False


def _pids() -> Iterator[int]:
    for entry in _PROC.iterdir():
        if entry.name.isdigit():
            yield int(entry.name)


def _process_group(pid: int) -> int | None:
    try:
        # The fields after the command name, which is in parentheses and may hold any text.
        return int((_PROC / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[2])
    except (OSError, IndexError, ValueError):
        return None


def describe_holder(port: int) -> str:
    """``pid N (command)`` of the process listening on ``port``, or ``""`` if unknown."""
    inodes = listening_inodes(port)
    if not inodes:
        return ""
    sockets = {f"socket:[{inode}]" for inode in inodes}
    for pid in _pids():
        if _holds_socket(pid, sockets):
            try:
                argv = (_PROC / str(pid) / "cmdline").read_bytes().split(b"\0")
                command = b" ".join(argv).decode("utf-8", "replace").strip()[:120]
            except OSError:
                command = ""
            return f"pid {pid}" + (f" ({command})" if command else "")
    return ""


def group_listens(pgid: int, port: int) -> bool | None:
    """Whether a process of group ``pgid`` listens on ``port``; ``None``: cannot tell here.

    The child is a process-group leader (``start_new_session``), and whatever it
    forks to serve (uvicorn workers) stays in its group, so the group's open
    sockets are the child's.
    """
    inodes = listening_inodes(port)
    if inodes is None:
        return None
    if not inodes:
        return False
    sockets = {f"socket:[{inode}]" for inode in inodes}
    if _holds_socket(pgid, sockets):
        return True
    return any(_process_group(pid) == pgid and _holds_socket(pid, sockets)
               for pid in _pids() if pid != pgid)


# -- LiteLLM's output ---------------------------------------------------------------------

_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
#: LiteLLM's own logger: ``17:09:54 - LiteLLM Proxy:WARNING: file.py:126 - text``.
_LITELLM_LEVEL = re.compile(r"^[\d:.]+ - LiteLLM[\w ]*:(DEBUG|INFO|WARNING|ERROR|CRITICAL): ?")
#: uvicorn's: ``ERROR:    [Errno 98] error while attempting to bind ...``.
_UVICORN_LEVEL = re.compile(r"^(DEBUG|INFO|WARNING|ERROR|CRITICAL): +")
_TRACEBACK = "Traceback (most recent call last):"
#: Lines between the parts of a chained traceback.
_CHAINED = ("During handling of the above exception", "The above exception was the direct")


def strip_ansi(text: str) -> str:
    """``text`` without terminal colour and cursor codes."""
    return _ANSI.sub("", text)


@dataclass(frozen=True, slots=True)
class OutputLine:
    """What one of LiteLLM's lines is worth to memproxy's log."""

    level: str  # "warning" or "error"
    text: str
    #: The exception a traceback ended with: the most telling error of a failed start.
    traceback: bool = False


class OutputSorter:
    """Picks LiteLLM's warnings and errors out of its output, line by line.

    A level marker in the line decides (LiteLLM's ``LiteLLM Proxy:WARNING:``,
    uvicorn's ``ERROR:``); a traceback, however long, becomes one error: its
    last line, the exception. Everything else (the logo, banners, access lines
    such as the liveness probes memproxy itself sends) is not for memproxy's log.
    """

    def __init__(self) -> None:
        self._in_traceback = False

    def feed(self, line: str) -> OutputLine | None:
        """The line to log for ``line`` (ANSI codes already stripped), if any."""
        if _TRACEBACK in line:
            self._in_traceback = True
            return None
        if self._in_traceback:
            if not line.strip() or line[:1].isspace() or line.startswith(_CHAINED):
                return None
            self._in_traceback = False
            return OutputLine("error", _exception_text(line), traceback=True)
        marked = _LITELLM_LEVEL.match(line) or _UVICORN_LEVEL.match(line)
        if marked is None or marked.group(1) not in ("WARNING", "ERROR", "CRITICAL"):
            return None
        text = line[marked.end():].strip()
        return OutputLine("warning" if marked.group(1) == "WARNING" else "error", text)


def _exception_text(line: str) -> str:
    """``pkg.module.SomeError: text`` as ``SomeError: text``."""
    name, sep, message = line.strip().partition(": ")
    if " " in name:  # not an exception's qualified name
        return line.strip()
    return name.rsplit(".", 1)[-1] + sep + message


def short_reason(error: str) -> str:
    """The gist of an error line: ``[Errno 98] error while ... : address already in use``
    becomes ``address already in use``."""
    if error.startswith("[Errno"):
        error = error.rsplit(": ", 1)[-1]
    return error[:200]


async def child_answers(session: aiohttp.ClientSession, process: asyncio.subprocess.Process,
                        port: int, url: str) -> bool:
    """Whether ``url`` answers 200 and the socket listening on ``port`` is the child's.

    Another process answering there must never make a child "ready" (see
    :meth:`LiteLLMSupervisor._wait_ready`); where ``/proc`` cannot tell, a live
    child on a port that was free is taken to be the one answering.
    """
    if group_listens(process.pid, port) is False:
        return False
    try:
        async with session.get(url, timeout=aiohttp.ClientTimeout(total=2)) as resp:
            return resp.status == 200
    except (aiohttp.ClientError, TimeoutError):
        return False


async def stop_process_group(process: asyncio.subprocess.Process | None, timeout: float,
                             kill_event: str) -> None:
    """SIGTERM to a child's process group, SIGKILL after ``timeout`` seconds."""
    if process is None or process.returncode is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        await asyncio.wait_for(process.wait(), timeout)
    except TimeoutError:
        log.warning(kill_event, pid=process.pid, after_s=timeout)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        await process.wait()


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
        "  Install it beside memproxy:  pip install 'memproxy-llm[litellm]'\n"
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
    """Keeps one LiteLLM child running and says whether it is ready, and if not, why."""

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
        log_file: Path | None = None,
    ) -> None:
        """``on_restart`` is called each time LiteLLM is restarted (metrics count them);
        ``log_file``, when given, gets all of LiteLLM's output, appended."""
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
        self.log_file = log_file
        self.ready = False
        #: LiteLLM's latest lines, for the message when it cannot start.
        self.last_lines: deque[str] = deque(maxlen=40)
        #: Quick exits in a row (see :data:`STABLE_AFTER_S`); reset by a child that lasts.
        self.failures = 0
        #: Why LiteLLM is not ready, once a child has failed; ``None`` while all is well.
        self.problem: str | None = None
        self._last_error: OutputLine | None = None
        self._spawned_at = 0.0
        self._log: TextIO | None = None
        self._log_size = 0
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

    @property
    def detail(self) -> str:
        """LiteLLM's state in a few words, for ``/health``."""
        if self.ready:
            return "ok"
        if self.problem is None:
            return "restarting"
        if self.failures >= CRASH_LOOP_AFTER:
            return f"crash-looping: {self.problem}"
        return f"restarting after: {self.problem}"

    async def start(self) -> None:
        """Spawn LiteLLM and wait until it answers; raise :class:`LiteLLMStartError` if not."""
        executable = self.executable or find_litellm()
        if self.log_file is not None:
            try:
                self._open_log()
            except OSError as exc:
                raise LiteLLMStartError(
                    f"cannot write LiteLLM's log {self.log_file}: {exc.strerror or exc}"
                ) from exc
        try:
            await self._spawn(executable)
            await self._wait_ready()
        except BaseException:
            self._close_log()
            raise
        self._watch = asyncio.create_task(self._watch_and_restart(executable))

    async def _spawn(self, executable: str) -> None:
        # Checked before every spawn, restarts included: a port taken while LiteLLM was
        # down is said as such, rather than as LiteLLM's own bind failure seconds later.
        check_port_free(self.host, self.port)
        command = [executable, "--config", str(self.config), "--port", str(self.port),
                   "--host", self.host]
        self._last_error = None
        self._spawned_at = time.monotonic()
        self._process = await asyncio.create_subprocess_exec(
            *command, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT, env=self.env, start_new_session=True,
            preexec_fn=die_with_parent,
        )
        log.info("litellm_spawned", pid=self._process.pid, port=self.port,
                 output=str(self.log_file) if self.log_file else None)
        self._pump = asyncio.create_task(self._pump_output(self._process))

    async def _pump_output(self, process: asyncio.subprocess.Process) -> None:
        """LiteLLM's output into its log file; its warnings and errors into memproxy's log."""
        assert process.stdout is not None
        sorter = OutputSorter()
        while True:
            try:
                raw = await process.stdout.readline()
            except ValueError:  # a line longer than the stream limit
                continue
            if not raw:
                return
            text = strip_ansi(raw.decode("utf-8", "replace")).rstrip()
            if self._log is not None:
                self._write_log(text + "\n")
            if not text.strip() or LIVELINESS_PATH in text:
                continue  # memproxy's own probes would push the useful lines out
            self.last_lines.append(text)
            line = sorter.feed(text)
            if line is None:
                continue
            if line.level == "error":
                # A traceback's exception says more than the lines that follow it
                # (uvicorn's "Application startup failed. Exiting.").
                if line.traceback or not (self._last_error and self._last_error.traceback):
                    self._last_error = line
                log.error("litellm_error", source="litellm", pid=process.pid, line=line.text)
            else:
                log.warning("litellm_warning", source="litellm", pid=process.pid,
                            line=line.text)

    def _failure(self, headline: str) -> LiteLLMStartError:
        tail = "\n".join(f"    {line}" for line in list(self.last_lines)[-15:])
        return LiteLLMStartError(
            f"{headline}\n  LiteLLM's last output:\n{tail or '    (nothing)'}"
        )

    async def _drain_output(self) -> None:
        """Let the pump read what an exited child wrote last (its error, most often)."""
        if self._pump:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._pump, 2)

    def _reason(self, fallback: str) -> str:
        """Why the current child failed: its most telling error line, else ``fallback``."""
        if self._last_error is not None:
            return short_reason(self._last_error.text)
        return fallback

    async def _wait_ready(self) -> None:
        """Wait until the child, and no other process, answers LiteLLM's liveness probe.

        Another process answering on the port must never make LiteLLM "ready": it
        would get every request, with a key it does not know. The port was free just
        before the spawn (:func:`check_port_free`), but it could be taken between that
        check and the child's bind, and then the child fails while the other server
        answers. So the probe counts only once the listening socket on the port is
        held by the child's process group (read from ``/proc``). Where ``/proc`` cannot
        tell (not Linux), a live child on a port that was free is taken to be the one
        answering.
        """
        process = self._process
        assert process is not None
        deadline = time.monotonic() + self.ready_timeout
        async with aiohttp.ClientSession() as session:
            while True:
                if process.returncode is not None:
                    await self._drain_output()
                    raise self._failure(
                        f"LiteLLM exited with status {process.returncode} while starting"
                    )
                if await child_answers(session, process, self.port,
                                       self.url + LIVELINESS_PATH):
                    self.ready = True
                    self.problem = None
                    log.info("litellm_ready", url=self.url, pid=process.pid)
                    return
                if time.monotonic() > deadline:
                    await self._terminate()
                    await self._drain_output()
                    raise self._failure(
                        f"LiteLLM did not answer {LIVELINESS_PATH} within "
                        f"{self.ready_timeout:.0f} s"
                    )
                await asyncio.sleep(0.2)

    def _failed(self, reason: str, **fields: object) -> None:
        """Count a failed child; the second quick one in a row is a crash loop."""
        self.failures += 1
        self.problem = reason
        crash_loop = self.failures >= CRASH_LOOP_AFTER
        log.error("litellm_crash_loop" if crash_loop else "litellm_failed", reason=reason,
                  failures=self.failures, restarts=self.restarts, **fields)

    async def _watch_and_restart(self, executable: str) -> None:
        backoff = 1.0
        while not self._stop_requested.is_set():
            assert self._process is not None
            code = await self._process.wait()
            if self._stop_requested.is_set():
                return
            self.ready = False
            if time.monotonic() - self._spawned_at > STABLE_AFTER_S:
                backoff = 1.0
                self.failures = 0
            await self._drain_output()
            # Killed by a signal: that is the reason, not an error it logged long before.
            reason = _exit_text(code) if code < 0 else self._reason(_exit_text(code))
            self._failed(reason, status=code, restart_in_s=backoff)
            while True:
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
                    break
                except LiteLLMPortInUse as exc:
                    self._failed(exc.reason, restart_in_s=backoff)
                except LiteLLMStartError as exc:
                    self._failed(self._reason(str(exc).splitlines()[0]), restart_in_s=backoff)
                except OSError as exc:
                    self.problem = f"cannot run LiteLLM: {exc}"
                    log.error("litellm_restart_failed", error=str(exc))
                    return

    async def _terminate(self) -> None:
        await stop_process_group(self._process, self.stop_timeout, "litellm_kill")

    def _open_log(self) -> None:
        assert self.log_file is not None
        self._log = self.log_file.open("a", encoding="utf-8", buffering=1)
        self._log_size = os.fstat(self._log.fileno()).st_size

    def _write_log(self, text: str) -> None:
        """A line into LiteLLM's file, moved aside to ``NAME.1`` once it passes the limit."""
        assert self._log is not None and self.log_file is not None
        try:
            self._log.write(text)
            self._log_size += len(text)
            if self._log_size > LOG_FILE_LIMIT:
                self._log.close()
                os.replace(self.log_file, self.log_file.with_name(self.log_file.name + ".1"))
                self._open_log()
        except (OSError, ValueError) as exc:  # disk full, a folder gone: LiteLLM goes on
            if self._log is None or self._log.closed:
                self._log = None
                log.warning("litellm_log_stopped", file=str(self.log_file),
                            error=f"{type(exc).__name__}: {exc}")

    def _close_log(self) -> None:
        if self._log is not None:
            with contextlib.suppress(OSError):
                self._log.close()
            self._log = None

    async def stop(self) -> None:
        """Terminate LiteLLM (SIGTERM, then SIGKILL after ``stop_timeout``)."""
        self._stop_requested.set()
        self.ready = False
        if self._watch:
            self._watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watch
        await self._terminate()
        await self._drain_output()
        self._close_log()
        if self._process is not None:
            log.info("litellm_stopped", status=self._process.returncode)


def _exit_text(code: int) -> str:
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"killed by {signal.Signals(-code).name}"
    return f"exited with status {code}"


class Child(Protocol):
    """A supervised child process: LiteLLM, or the demo provider."""

    async def start(self) -> None: ...

    async def stop(self) -> None: ...


def supervised(child: Child) -> Callable[[web.Application], AsyncIterator[None]]:
    """A ``cleanup_ctx`` that starts ``child`` before memproxy serves and stops it after."""

    async def child_ctx(app: web.Application) -> AsyncIterator[None]:
        await child.start()
        try:
            yield
        finally:
            await child.stop()

    return child_ctx


# -- the offline demo provider --------------------------------------------------------------


class DemoProviderError(Exception):
    """The demo provider could not be started; the message says why and what to do."""


class DemoProviderSupervisor:
    """Keeps the offline demo provider (:mod:`memproxy.demo_provider`) running.

    It answers the bundled config's demo models, so the chain works with no network and
    no provider key. Started before LiteLLM (which asks its providers for their models at
    start) and stopped after it; restarted with backoff if it dies; like LiteLLM, it lives
    in its own process group and dies with memproxy.
    """

    def __init__(self, *, host: str = "127.0.0.1", port: int, ready_timeout: float = 20.0,
                 stop_timeout: float = 5.0, max_backoff: float = 30.0) -> None:
        self.host = host
        self.port = port
        self.url = f"http://{host}:{port}"
        self.ready_timeout = ready_timeout
        self.stop_timeout = stop_timeout
        self.max_backoff = max_backoff
        self.restarts = 0
        #: Whether it answers right now, and if not, why (for /health and the status page).
        self.ready = False
        self.detail = "not started"
        self._process: asyncio.subprocess.Process | None = None
        self._spawned_at = 0.0
        self._output: asyncio.Task[None] | None = None
        self._watch: asyncio.Task[None] | None = None
        self._stopping = asyncio.Event()

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None

    async def start(self) -> None:
        """Spawn it and wait until it answers; raise :class:`DemoProviderError` if not."""
        await self._spawn()
        await self._wait_ready()
        self._watch = asyncio.create_task(self._watch_and_restart())

    async def _spawn(self) -> None:
        try:
            check_port_free(self.host, self.port)
        except LiteLLMPortInUse as exc:
            raise DemoProviderError(
                f"{exc.reason}, so the demo provider cannot listen there.\n"
                f"  Stop that process, or set memproxy.demo_provider.port to a free port (and "
                f"the demo models' api_base with it), or memproxy.demo_provider: null"
            ) from None
        self._spawned_at = time.monotonic()
        self._process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "memproxy.demo_provider", "--host", self.host,
            "--port", str(self.port), "--demo",
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE, start_new_session=True,
            preexec_fn=die_with_parent,
        )
        log.info("demo_provider_spawned", pid=self._process.pid, url=self.url)
        self._output = asyncio.create_task(self._log_output(self._process))

    async def _log_output(self, process: asyncio.subprocess.Process) -> None:
        """Whatever it writes (a traceback, most often) goes into memproxy's log."""
        assert process.stderr is not None
        while True:
            try:
                raw = await process.stderr.readline()
            except ValueError:  # a line longer than the stream limit
                continue
            if not raw:
                return
            if text := raw.decode("utf-8", "replace").rstrip():
                log.warning("demo_provider_output", pid=process.pid, line=text)

    async def _wait_ready(self) -> None:
        """Wait until the child itself, no other process, answers ``GET /``."""
        process = self._process
        assert process is not None
        deadline = time.monotonic() + self.ready_timeout
        async with aiohttp.ClientSession() as session:
            while True:
                if process.returncode is not None:
                    if self._output:
                        with contextlib.suppress(Exception):
                            await asyncio.wait_for(self._output, 2)
                    raise DemoProviderError(
                        f"the demo provider {_exit_text(process.returncode)} while starting "
                        f"(its output is in memproxy's log)")
                if await child_answers(session, process, self.port, self.url + "/"):
                    log.info("demo_provider_ready", url=self.url, pid=process.pid)
                    self.ready, self.detail = True, "running"
                    return
                if time.monotonic() > deadline:
                    await self._terminate()
                    raise DemoProviderError(
                        f"the demo provider did not answer on {self.url} within "
                        f"{self.ready_timeout:.0f} s")
                await asyncio.sleep(0.1)

    async def _watch_and_restart(self) -> None:
        backoff = 1.0
        while not self._stopping.is_set():
            assert self._process is not None
            code = await self._process.wait()
            if self._stopping.is_set():
                return
            if time.monotonic() - self._spawned_at > STABLE_AFTER_S:
                backoff = 1.0
            self.ready, self.detail = False, f"{_exit_text(code)}; restarting"
            log.error("demo_provider_failed", reason=_exit_text(code), restart_in_s=backoff)
            while not self._stopping.is_set():
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, self.max_backoff)
                self.restarts += 1
                try:
                    await self._spawn()
                    await self._wait_ready()
                    break
                except (DemoProviderError, OSError) as exc:
                    reason = str(exc).splitlines()[0]
                    self.detail = f"{reason}; restarting"
                    log.error("demo_provider_failed", reason=reason, restart_in_s=backoff)

    async def _terminate(self) -> None:
        await stop_process_group(self._process, self.stop_timeout, "demo_provider_kill")

    async def stop(self) -> None:
        """Terminate it (SIGTERM, then SIGKILL after ``stop_timeout``)."""
        self._stopping.set()
        self.ready, self.detail = False, "stopped"
        if self._watch:
            self._watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watch
        await self._terminate()
        if self._output:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._output, 2)
        if self._process is not None:
            log.info("demo_provider_stopped", status=self._process.returncode)

