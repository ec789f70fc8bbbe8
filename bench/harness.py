"""What the benchmark and the profile share: child processes, /proc readings, percentiles,
and the lab of processes on 127.0.0.1 that both measure.

Every child is started in its own session (so its whole group, workers included, can be
signalled by one id) and with ``PR_SET_PDEATHSIG``, so it dies with the benchmark even if
the benchmark itself is killed.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import tempfile
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import yaml
from aiohttp.test_utils import unused_port

from bench import nginx_conf

if TYPE_CHECKING:
    from psycopg.abc import Query

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
_PR_SET_PDEATHSIG = 1
# Environment variables that would change what memproxy does or how it writes its log.
SCRUBBED_ENV = ("SUPERMEMORY_API_KEY", "LITELLM_BASE_URL", "LITELLM_CONFIG",
                "MEMPROXY_HASH_SECRET", "PYTHONUNBUFFERED", "PYTHONASYNCIODEBUG", "PYTHONDEVMODE")
# (User-Agent, the memory user id the bundled config gives it)
CLIENTS: tuple[tuple[str, str], ...] = (
    ("claude-cli/2.0.14 (external, cli)", "claude-code"),
    ("OpenAIClientImpl/Java unknown", "jetbrains"),
    ("codex_cli_rs/0.46.0 (Debian 12.0.0; x86_64) xterm-256color", "codex"),
    ("AsyncAnthropic/Python 0.69.0", "anthropic-python"),
    ("OpenAI/Python 1.109.1", "openai-python"),
    ("curl/8.5.0", "curl"),
)


# ---- percentiles --------------------------------------------------------------------------

def percentile(values: Sequence[float], p: float) -> float:
    """The ``p``-th percentile (0-100) of ``values``, linearly interpolated; NaN for none."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = (len(ordered) - 1) * p / 100
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def median(values: Sequence[float]) -> float:
    """The median of the values that are numbers (a missed figure is NaN), or NaN."""
    clean = [v for v in values if v == v]
    return statistics.median(clean) if clean else float("nan")


def spread(values: Sequence[float]) -> tuple[float, float]:
    """(min, max) of the values that are numbers, or (NaN, NaN)."""
    clean = [v for v in values if v == v]
    return (min(clean), max(clean)) if clean else (float("nan"), float("nan"))


# ---- processes and /proc ------------------------------------------------------------------

def _die_with_parent() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


def wait_for_port(
    port: int, timeout: float, process: subprocess.Popen[bytes] | None = None
) -> None:
    """Return once 127.0.0.1:``port`` accepts connections; raise after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"{process.args!r} exited with status {process.returncode}")
        with socket.socket() as sock:
            sock.settimeout(0.2)
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout:.0f} s")


class ProcessGroup:
    """The processes one run started; :meth:`stop_all` ends every one of them."""

    def __init__(self) -> None:
        self.processes: list[subprocess.Popen[bytes]] = []

    def start(
        self,
        argv: Sequence[str],
        *,
        stdout: IO[bytes] | int | None = subprocess.DEVNULL,
        stderr: IO[bytes] | int | None = None,
        env: dict[str, str] | None = None,
        cwd: str | Path | None = None,
    ) -> subprocess.Popen[bytes]:
        process = subprocess.Popen(
            list(argv), stdout=stdout, stderr=stderr, env=env, cwd=cwd,
            stdin=subprocess.DEVNULL, start_new_session=True, preexec_fn=_die_with_parent,
        )
        self.processes.append(process)
        return process

    def run(self, argv: Sequence[str], timeout: float) -> tuple[int, str, str]:
        """Run a command to completion (killed after ``timeout`` s); returns (status, out, err)."""
        process = self.start(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            out, err = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.stop(process, timeout=2)
            out, err = process.communicate()
        # Forgotten only once finished: an interrupted run stays listed for stop_all().
        self.processes.remove(process)
        return process.returncode, out.decode(errors="replace"), err.decode(errors="replace")

    def stop(self, process: subprocess.Popen[bytes], timeout: float = 5.0) -> None:
        """SIGTERM the process's group, then SIGKILL it if it is still there after ``timeout``."""
        if process.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(process.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=timeout)
        # Workers may outlive a parent that has already exited: kill what is left of the group.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=timeout)

    def stop_all(self) -> None:
        for process in reversed(self.processes):
            self.stop(process)
        self.processes.clear()


def _read_stat(pid: int) -> list[str] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # The command name (field 2) may contain spaces: split after its closing parenthesis.
    return text[text.rindex(")") + 2:].split()


def descendants(pid: int) -> list[int]:
    """``pid`` and every live process below it."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (fields := _read_stat(int(entry))) is not None:
            children.setdefault(int(fields[1]), []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        todo.extend(children.get(current, ()))
    return found


def cpu_times(pids: Iterable[int]) -> tuple[float, float]:
    """(user, system) CPU seconds of ``pids`` (each process's own, not its children's)."""
    user = system = 0
    for pid in pids:
        fields = _read_stat(pid)
        if fields is not None:
            user += int(fields[11])    # utime
            system += int(fields[12])  # stime
    return user / CLOCK_TICKS, system / CLOCK_TICKS


def cpu_seconds(pids: Iterable[int]) -> float:
    """User plus system CPU time of ``pids``."""
    return sum(cpu_times(pids))


def memory_kib(pid: int) -> dict[str, int]:
    """``VmRSS`` and ``VmHWM`` of one process, in KiB (0 when it is gone)."""
    out = {"VmRSS": 0, "VmHWM": 0}
    with contextlib.suppress(FileNotFoundError, ProcessLookupError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in out:
                out[key] = int(value.split()[0])
    return out


def listeners(port: int) -> int:
    """How many sockets listen on TCP ``port`` (several with ``SO_REUSEPORT``)."""
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(FileNotFoundError):
            for line in Path(table).read_text().splitlines()[1:]:
                fields = line.split()
                if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                    count += 1
    return count


def reset_peak_rss(pid: int) -> bool:
    """Reset ``VmHWM`` to the current RSS (``clear_refs`` 5); False where not permitted."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
    except OSError:
        return False
    return True


class BenchAborted(Exception):
    """The run was stopped by a signal or by its time limit."""


@contextlib.contextmanager
def time_limit(minutes: float) -> Iterator[None]:
    """Turn SIGTERM, SIGHUP and ``minutes`` passing into :class:`BenchAborted`.

    Also raises the open-file limit: the memory test holds 1,000 streams open.
    """
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 65536), hard))

    def abort(signum: int, frame: object) -> None:
        raise BenchAborted(f"stopped by {signal.Signals(signum).name}")

    previous = {s: signal.signal(s, abort) for s in (signal.SIGTERM, signal.SIGHUP,
                                                       signal.SIGALRM)}
    signal.alarm(int(minutes * 60))
    try:
        yield
    finally:
        signal.alarm(0)
        for signum, handler in previous.items():
            signal.signal(signum, handler)


# ---- the lab ------------------------------------------------------------------------------

@dataclass
class Target:
    """One thing the load is sent to."""

    key: str
    label: str
    port: int = 0
    process: subprocess.Popen[bytes] | None = None
    direct: bool = False
    memory: dict[str, Any] = field(default_factory=dict)
    log_path: Path | None = None
    log_lines: int = 0

    def pids(self) -> list[int]:
        return descendants(self.process.pid) if self.process is not None else []


def child_env() -> dict[str, str]:
    """This environment without what would change memproxy; this checkout's code first."""
    env = {k: v for k, v in os.environ.items() if k not in SCRUBBED_ENV}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env


class Lab:
    """The processes of one run and their working folder; :meth:`close` removes both."""

    def __init__(self, python: str, config: Path) -> None:
        self.python = python
        self.config = config  # the config whose user_id_mappings every proxy follows
        self.group = ProcessGroup()
        self.work = Path(tempfile.mkdtemp(prefix="memproxy-bench-"))
        self.work.chmod(0o755)  # nginx workers run as an unprivileged user when started as root
        self.upstream_port = 0
        self.upstream: subprocess.Popen[bytes] | None = None

    def close(self) -> None:
        self.group.stop_all()
        if not os.environ.get("BENCH_KEEP_WORKDIR"):
            shutil.rmtree(self.work, ignore_errors=True)

    def memproxy_config(self, name: str, *, log_level: str = "info",
                        event_loop: str = "asyncio") -> Path:
        """The bundled config with JSON logs at ``log_level`` on ``event_loop``, as a file.

        Memory is off: the proxies compared here do no recall or capture, so with it on
        memproxy would be measured doing work they skip. What memory costs is measured by
        ``python -m bench.memory_speed`` and ``python -m bench.locomo``.
        """
        config = yaml.safe_load(self.config.read_text()) or {}
        section = config["memproxy"] = config.get("memproxy") or {}
        section["memory"] = {"backend": "off"}
        section["log"] = {"format": "json", "level": log_level}
        section["event_loop"] = event_loop
        path = self.work / f"{name}.yaml"
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        return path

    def user_agent_rules(self) -> tuple[list[tuple[str, str]], str]:
        """The config's User-Agent ``header_patterns`` and default id, for nginx's ``map``."""
        mappings = (yaml.safe_load(self.config.read_text()) or {}).get("user_id_mappings") or {}
        rules = [(r["pattern"], r["user_id"]) for r in mappings.get("header_patterns") or []
                 if str(r.get("header", "")).lower() == "user-agent"]
        return rules, str(mappings.get("default_user_id", "default"))

    def start_nginx(self, name: str, conf: str, port: int) -> subprocess.Popen[bytes]:
        path = self.work / f"{name}.conf"
        path.write_text(conf)
        process = self.group.start(
            ["nginx", "-p", str(self.work), "-e", str(self.work / f"{name}-error.log"),
             "-c", str(path), "-g", "daemon off;"],
            stderr=(self.work / f"{name}.stderr").open("wb"))
        wait_for_port(port, 15, process)
        return process

    def start_upstream(self) -> None:
        """The fake upstream: nginx on ``upstream_port``, the Python stream server behind it."""
        slow_port = unused_port()
        self.upstream_port = unused_port()
        slow = self.group.start([self.python, "-m", "bench.sse_upstream", str(slow_port)],
                                env=child_env())
        wait_for_port(slow_port, 30, slow)
        self.upstream = self.start_nginx(
            "upstream", nginx_conf.upstream_conf(self.work, self.upstream_port, slow_port),
            self.upstream_port)

    def start_memproxy(self, target: Target, config: Path, workers: int = 1) -> None:
        """``python -m memproxy serve`` with ``config``; its stdout (the log) goes to a file."""
        target.port = unused_port()
        target.log_path = self.work / f"{target.key}.log"
        stderr_path = self.work / f"{target.key}.stderr"
        argv = [self.python, "-m", "memproxy", "serve", "--config", str(config),
                "--port", str(target.port), "--workers", str(workers),
                "--litellm-url", f"http://127.0.0.1:{self.upstream_port}"]
        target.process = self.group.start(argv, stdout=target.log_path.open("wb"),
                                          stderr=stderr_path.open("wb"), env=child_env(),
                                          cwd=self.work)
        deadline = time.monotonic() + 60
        while listeners(target.port) < workers:
            if target.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{target.label} did not start (status "
                                   f"{target.process.poll()}):\n"
                                   f"{stderr_path.read_text()[-2000:]}")
            time.sleep(0.05)

    def start_baseline(self) -> Target:
        """The minimal aiohttp proxy, in front of the fake upstream."""
        baseline = Target("aiohttp-baseline", "minimal aiohttp proxy (reference)")
        baseline.port = unused_port()
        baseline.process = self.group.start(
            [self.python, "-m", "bench.aiohttp_baseline", str(baseline.port),
             f"http://127.0.0.1:{self.upstream_port}"],
            env=child_env(), stderr=(self.work / "aiohttp-baseline.stderr").open("wb"))
        wait_for_port(baseline.port, 30, baseline.process)
        return baseline

    def stop(self, target: Target) -> None:
        if target.process is not None:
            self.group.stop(target.process)

    @staticmethod
    def wrk_argv(target: Target, connections: int, threads: int, seconds: int) -> list[str]:
        """wrk sending the 1 KB POST of ``wrk/post.lua`` as each of :data:`CLIENTS` in turn."""
        return ["wrk", f"-t{threads}", f"-c{connections}", f"-d{seconds}s", "--timeout", "5s",
                "--latency", "-s", str(BENCH / "wrk" / "post.lua"),
                f"http://127.0.0.1:{target.port}/v1/chat/completions",
                "--", "direct" if target.direct else "proxy",
                *(f"{ua}\t{uid}" for ua, uid in CLIENTS)]

    def wrk(self, target: Target, connections: int, threads: int, seconds: int) -> dict[str, Any]:
        """One wrk run; the figures ``post.lua`` prints, plus requests per second."""
        status, out, err = self.group.run(
            self.wrk_argv(target, connections, threads, seconds), timeout=seconds + 30)
        for line in out.splitlines():
            if line.startswith("BENCH_JSON "):
                result: dict[str, Any] = json.loads(line[len("BENCH_JSON "):])
                result["rps"] = result["requests"] / (result["duration_us"] / 1e6)
                return result
        raise RuntimeError(f"wrk against {target.label} printed no result (status {status}):"
                           f"\n{out[-1500:]}\n{err[-1500:]}")

    def load_run(self, target: Target, seconds: int, connections: int = 32,
                 threads: int = 2) -> dict[str, Any]:
        """A wrk run with the CPU time the target and the upstream spent on it."""
        pids = target.pids()
        upstream_pids = descendants(self.upstream.pid) if self.upstream else []
        before, upstream_before = cpu_times(pids), cpu_seconds(upstream_pids)
        result = self.wrk(target, connections, threads, seconds)
        after = cpu_times(pids)
        result["proxy_user_s"] = after[0] - before[0]
        result["proxy_system_s"] = after[1] - before[1]
        result["proxy_cpu_s"] = result["proxy_user_s"] + result["proxy_system_s"]
        result["upstream_cpu_s"] = cpu_seconds(upstream_pids) - upstream_before
        requests = max(1, result["requests"])
        result["proxy_cpu_us_per_request"] = result["proxy_cpu_s"] / requests * 1e6
        result["proxy_system_us_per_request"] = result["proxy_system_s"] / requests * 1e6
        result["upstream_cpu_us_per_request"] = result["upstream_cpu_s"] / requests * 1e6
        return result


#: PostgreSQL settings that decide what a write costs, printed with the figures.
POSTGRES_SETTINGS = ("fsync", "synchronous_commit", "full_page_writes", "shared_buffers")


# -- PostgreSQL: the server, and databases of the benchmarks' own ------------------------------

@contextlib.contextmanager
def postgres_server(dsn: str | None) -> Iterator[str]:
    """A connection string to create databases with: ``dsn``, or a throwaway server's.

    The throwaway server (``tests/postgres_server.py``: initdb and pg_ctl on a temporary
    folder) is stopped and its folder deleted when the block ends, however it ends.
    """
    if dsn is not None:
        yield dsn
        return
    from tests.postgres_server import PostgresServer, binaries

    bindir = binaries()
    if bindir is None:
        raise BenchAborted("no PostgreSQL programs (initdb, pg_ctl) found: apt-get install "
                           "postgresql, or name a server with --dsn")
    print(f"starting a throwaway PostgreSQL server ({bindir}); it is stopped at the end",
          flush=True)
    server = PostgresServer(bindir)
    try:
        yield server.dsn("postgres")
    finally:
        server.close()
        print("throwaway PostgreSQL server stopped", flush=True)


async def postgres_execute(dsn: str, *statements: Query) -> tuple[object, ...] | None:
    """Run the statements outside a transaction; the first row of the last one, if any."""
    import psycopg

    row: tuple[object, ...] | None = None
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as connection:
        for statement in statements:
            cursor = await connection.execute(statement)
            row = await cursor.fetchone() if cursor.description else None
    return row


async def create_database(dsn: str, purpose: str) -> tuple[str, str]:
    """A new, empty database on the server ``dsn`` names: (its name, its connection string)."""
    from psycopg import sql
    from psycopg.conninfo import make_conninfo

    name = f"memproxy_bench_{purpose}_{os.getpid()}"
    await postgres_execute(
        dsn, sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)),
        sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    return name, make_conninfo(dsn, dbname=name)


async def drop_database(dsn: str, name: str) -> None:
    from psycopg import sql

    await postgres_execute(
        dsn, sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


async def postgres_settings(dsn: str) -> str:
    """The server's version and the settings that decide what a write costs, in words,
    with a warning when commits do not wait for the disk."""
    row = await postgres_execute(dsn, "SELECT current_setting('server_version'), "
                                      "current_setting('fsync'), "
                                      "current_setting('synchronous_commit'), "
                                      "current_setting('full_page_writes'), "
                                      "current_setting('shared_buffers')")
    assert row is not None
    version, *values = (str(value) for value in row)
    settings = dict(zip(POSTGRES_SETTINGS, values, strict=True))
    said = f"PostgreSQL {version}: " + ", ".join(f"{k} {v}" for k, v in settings.items())
    if settings["fsync"] == "off" or settings["synchronous_commit"] == "off":
        said += ("\nNOTE: commits do not wait for the disk (fsync or synchronous_commit off, "
                 "as on the throwaway test server): write figures are optimistic")
    return said
