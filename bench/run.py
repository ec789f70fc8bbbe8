#!/usr/bin/env python3
"""memproxy benchmark: memproxy against nginx and a direct floor, in one interleaved run.

Usage (from the repository root)::

    bench/run.sh            # default run, about 4 minutes
    bench/run.sh --quick    # one short round, about a minute
    bench/run.sh --profile  # py-spy profile of memproxy under load (profile_memproxy.py)

Everything runs on 127.0.0.1: a fake upstream (nginx answering the plain POST
itself, a small Python server behind it for the event streams and the large
upload), nginx as a reference proxy with a ``map`` on User-Agent, memproxy
with one worker, two workers and one worker on uvloop, and a minimal aiohttp
proxy (``aiohttp_baseline.py``) that shows what the aiohttp building blocks
alone cost. Each round measures every target in turn (order rotated per
round): latency at concurrency 1, throughput and proxy CPU at concurrency 32,
and 50 concurrent event streams plus single streams one at a time.
Figures are medians over rounds of per-round differences or ratios, so slow
drift of a shared machine affects all targets alike. Then a fresh memproxy is
measured for memory: idle, one 50 MiB upload, and 1,000 open streams.

Prints a table and writes ``bench/results/latest.json`` (raw figures),
``bench/results/latest.md`` and ``bench/results/latency.png``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(BENCH))

import nginx_conf  # noqa: E402
import report  # noqa: E402
from procs import (  # noqa: E402
    ProcessGroup,
    cpu_seconds,
    cpu_times,
    descendants,
    free_port,
    listeners,
    memory_kib,
    reset_peak_rss,
    tree_memory_kib,
    wait_for_port,
)
from stats import percentile  # noqa: E402
from stream_client import (  # noqa: E402
    CLIENTS,
    hold_streams,
    one_at_a_time,
    post_large,
    run_streams,
    summarize,
)

T = TypeVar("T")
# Environment variables that would change what memproxy does or how it writes its log.
SCRUBBED_ENV = ("SUPERMEMORY_API_KEY", "LITELLM_BASE_URL", "LITELLM_CONFIG",
                "MEMPROXY_HASH_SECRET", "PYTHONUNBUFFERED", "PYTHONASYNCIODEBUG", "PYTHONDEVMODE")
BODY_1K = json.dumps({"model": "memproxy-demo", "messages": [
    {"role": "user", "content": "x" * 957}]}, separators=(",", ":")).encode()


class BenchAborted(Exception):
    """The run was stopped by a signal or by its time limit."""


@dataclass
class Settings:
    """How long and how hard each part of the benchmark runs."""

    rounds: int = 3
    c1_seconds: int = 4
    c32_seconds: int = 7
    connections: int = 32
    wrk_threads: int = 2
    streams: int = 50
    stream_repeats: int = 2
    lone_streams: int = 20
    events: int = 20
    interval_ms: float = 10.0
    hold_streams: int = 1000
    large_body_mb: int = 50
    warmup_seconds: int = 1

    @classmethod
    def quick(cls) -> Settings:
        return cls(rounds=1, c1_seconds=2, c32_seconds=3)


@dataclass
class Target:
    """One thing the load is sent to."""

    key: str
    label: str
    port: int = 0
    process: subprocess.Popen[bytes] | None = None
    direct: bool = False
    available: bool = True
    note: str = ""
    memory: dict[str, Any] = field(default_factory=dict)
    log_path: Path | None = None
    log_lines: int = 0

    def pids(self) -> list[int]:
        return descendants(self.process.pid) if self.process is not None else []


def run_async(factory: Callable[[], Awaitable[T]]) -> T:
    """Run a coroutine on a fresh loop (uvloop when it is installed)."""
    async def main() -> T:
        return await factory()
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main())
    return uvloop.run(main())


def child_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in SCRUBBED_ENV}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env


def command_version(argv: list[str]) -> str:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    text = (done.stdout + done.stderr).strip().splitlines()
    return text[0].strip() if text else "unknown"


def machine_info(python: str) -> dict[str, Any]:
    cpu_model = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    probe = subprocess.run(
        [python, "-c", "import sys, aiohttp, multidict, yarl, structlog, memproxy\n"
         "try:\n import uvloop; u = uvloop.__version__\nexcept ImportError:\n u = None\n"
         "print(sys.version.split()[0], aiohttp.__version__, multidict.__version__, "
         "yarl.__version__, structlog.__version__, memproxy.__version__, u)"],
        capture_output=True, text=True, env=child_env(), timeout=60)
    names = ["python", "aiohttp", "multidict", "yarl", "structlog", "memproxy", "uvloop"]
    versions = dict(zip(names, probe.stdout.split(), strict=False)) if probe.returncode == 0 else {}
    git = command_version(["git", "-C", str(REPO), "describe", "--always", "--dirty"])
    return {
        "nproc": os.cpu_count(), "cpus_usable": len(os.sched_getaffinity(0)),
        "cpu_model": cpu_model, "kernel": platform.release(), "versions": versions,
        "nginx": command_version(["nginx", "-v"]), "wrk": command_version(["wrk", "-v"]),
        "git": git, "loadavg_start": os.getloadavg(),
    }


def count_request_lines(path: Path) -> int:
    """Per-request log lines (JSON with ``"event": "request"``) memproxy wrote to ``path``."""
    count = 0
    with path.open("rb") as log:
        for line in log:
            if b'"event": "request"' in line or b'"event":"request"' in line:
                count += 1
    return count


class Bench:
    """One benchmark run: owns its processes and its working folder."""

    def __init__(self, args: argparse.Namespace, settings: Settings) -> None:
        self.args = args
        self.s = settings
        self.python: str = args.python
        self.group = ProcessGroup()
        self.work = Path(tempfile.mkdtemp(prefix="memproxy-bench-"))
        self.work.chmod(0o755)  # nginx workers run as an unprivileged user when started as root
        self.config_path = self.work / "memproxy.yaml"
        self.upstream_port = 0
        self.upstream: subprocess.Popen[bytes] | None = None
        self.targets: list[Target] = []
        self.rounds: list[dict[str, Any]] = []
        self.log_lines: list[str] = []

    # ---- setup -------------------------------------------------------------------------

    def say(self, message: str) -> None:
        print(message, flush=True)

    def write_memproxy_config(
        self, path: Path | None = None, log_level: str = "info"
    ) -> tuple[list[tuple[str, str]], str]:
        """memproxy's config for the run: the bundled one, with JSON logs at ``log_level``.

        Returns the User-Agent rules and the default id, for nginx's ``map``.
        """
        import yaml

        config = yaml.safe_load(Path(self.args.config).read_text()) or {}
        section = config.setdefault("memproxy", {}) or {}
        config["memproxy"] = section
        section["log"] = {"format": "json", "level": log_level}
        (path or self.config_path).write_text(yaml.safe_dump(config, sort_keys=False))
        mappings = config.get("user_id_mappings") or {}
        rules = [(r["pattern"], r["user_id"]) for r in mappings.get("header_patterns") or []
                 if str(r.get("header", "")).lower() == "user-agent"]
        return rules, str(mappings.get("default_user_id", "default"))

    def start_nginx(self, name: str, conf: str, port: int) -> subprocess.Popen[bytes]:
        path = self.work / f"{name}.conf"
        path.write_text(conf)
        process = self.group.start(name, ["nginx", "-p", str(self.work), "-e",
                                          str(self.work / f"{name}-error.log"), "-c", str(path),
                                          "-g", "daemon off;"],
                                   stderr=(self.work / f"{name}.stderr").open("wb"))
        wait_for_port(port, 15, process)
        return process

    def memproxy_argv(self, port: int, workers: int, uvloop: bool,
                      config: Path | None = None) -> list[str]:
        head = [self.python, str(BENCH / "uvloop_serve.py")] if uvloop else \
            [self.python, "-m", "memproxy"]
        argv = [*head, "serve", "--config", str(config or self.config_path), "--port", str(port),
                "--litellm-url", f"http://127.0.0.1:{self.upstream_port}"]
        if workers > 1:
            argv += ["--workers", str(workers)]
        return argv

    def workers_supported(self) -> bool:
        done = subprocess.run([self.python, "-m", "memproxy", "serve", "--help"],
                              capture_output=True, text=True, env=child_env(), timeout=60)
        return "--workers" in done.stdout

    def start_memproxy(self, target: Target, workers: int = 1, uvloop: bool = False,
                       log_path: Path | None = None, config: Path | None = None) -> None:
        target.port = free_port()
        target.log_path = log_path or self.work / f"{target.key}.log"
        stdout = target.log_path.open("wb")
        stderr = (self.work / f"{target.key}.stderr").open("wb")
        target.process = self.group.start(
            target.key, self.memproxy_argv(target.port, workers, uvloop, config),
            stdout=stdout, stderr=stderr, env=child_env(), cwd=self.work)
        deadline = time.monotonic() + 60
        while listeners(target.port) < workers:
            if target.process.poll() is not None or time.monotonic() > deadline:
                err = (self.work / f"{target.key}.stderr").read_text()[-2000:]
                raise RuntimeError(f"{target.label} did not start (status "
                                   f"{target.process.poll()}):\n{err}")
            time.sleep(0.05)

    def start_baseline(self) -> Target:
        """The minimal aiohttp proxy, in front of the fake upstream."""
        baseline = Target("aiohttp-baseline", "minimal aiohttp proxy (reference)")
        baseline.port = free_port()
        baseline.process = self.group.start(
            baseline.key, [self.python, str(BENCH / "aiohttp_baseline.py"),
                           str(baseline.port), f"http://127.0.0.1:{self.upstream_port}"],
            env=child_env(), stderr=(self.work / "aiohttp-baseline.stderr").open("wb"))
        wait_for_port(baseline.port, 30, baseline.process)
        return baseline

    def start_upstream(self) -> None:
        """The fake upstream: nginx on ``upstream_port``, the Python stream server behind it."""
        slow_port = free_port()
        self.upstream_port = free_port()
        slow = self.group.start("sse-upstream", [self.python, str(BENCH / "sse_upstream.py"),
                                                 str(slow_port)], env=child_env())
        wait_for_port(slow_port, 30, slow)
        self.upstream = self.start_nginx(
            "upstream", nginx_conf.upstream_conf(self.work, self.upstream_port, slow_port),
            self.upstream_port)

    def setup(self) -> None:
        rules, default_id = self.write_memproxy_config()
        self.start_upstream()

        direct = Target("direct", "direct to upstream (floor)", port=self.upstream_port,
                        direct=True)
        nginx = Target("nginx", "nginx, map on User-Agent (1 worker)")
        nginx.port = free_port()
        nginx.process = self.start_nginx(
            "proxy", nginx_conf.proxy_conf(self.work, nginx.port, self.upstream_port, rules,
                                           default_id), nginx.port)
        self.targets = [direct, nginx]

        if not self.args.no_baseline:
            self.targets.append(self.start_baseline())

        one = Target("memproxy", "memproxy, 1 worker")
        self.start_memproxy(one)
        self.targets.append(one)

        if not self.args.no_uvloop:
            loop = Target("memproxy-uvloop", "memproxy, 1 worker, uvloop")
            try:
                import uvloop  # noqa: F401
            except ImportError:
                loop.available = False
                loop.note = "not available: uvloop is not installed"
            else:
                self.start_memproxy(loop, uvloop=True)
            self.targets.append(loop)

        two = Target("memproxy-2w", "memproxy, 2 workers")
        if self.workers_supported():
            self.start_memproxy(two, workers=2)
        else:
            two.available = False
            two.note = "not available: `serve --workers` is not accepted by this memproxy"
        self.targets.append(two)

        time.sleep(1.0)
        for target in self.live(proxies_only=True):
            if target.key.startswith("memproxy"):
                target.memory["idle_rss_kib"] = tree_memory_kib(target.pids()[0])["VmRSS"]
        self.preflight()

    def live(self, proxies_only: bool = False) -> list[Target]:
        return [t for t in self.targets if t.available and not (proxies_only and t.direct)]

    def preflight(self) -> None:
        """One request per known client through each target: the echoed id must match."""
        for target in self.live():
            for user_agent, user_id in CLIENTS:
                headers = {"User-Agent": user_agent, "Content-Type": "application/json"}
                if target.direct:
                    headers["x-sm-user-id"] = user_id
                request = urllib.request.Request(
                    f"http://127.0.0.1:{target.port}/v1/chat/completions", data=BODY_1K,
                    headers=headers, method="POST")
                with urllib.request.urlopen(request, timeout=10) as answer:
                    echoed = answer.headers.get("x-echo-user-id")
                if echoed != user_id:
                    raise RuntimeError(
                        f"{target.label}: User-Agent {user_agent!r} reached the upstream with "
                        f"x-sm-user-id {echoed!r}, expected {user_id!r}. The benchmark's "
                        f"clients (bench/stream_client.py CLIENTS) assume the bundled "
                        f"header_patterns of {self.args.config}.")

    # ---- measurements ------------------------------------------------------------------

    def wrk(self, target: Target, connections: int, threads: int, seconds: int) -> dict[str, Any]:
        argv = ["wrk", f"-t{threads}", f"-c{connections}", f"-d{seconds}s", "--timeout", "5s",
                "--latency", "-s", str(BENCH / "wrk" / "post.lua"),
                f"http://127.0.0.1:{target.port}/v1/chat/completions",
                "--", "direct" if target.direct else "proxy",
                *(f"{ua}\t{uid}" for ua, uid in CLIENTS)]
        status, out, err = self.group.run("wrk", argv, timeout=seconds + 30)
        for line in out.splitlines():
            if line.startswith("BENCH_JSON "):
                result: dict[str, Any] = json.loads(line[len("BENCH_JSON "):])
                result["rps"] = result["requests"] / (result["duration_us"] / 1e6)
                return result
        raise RuntimeError(f"wrk against {target.label} printed no result (status {status}):"
                           f"\n{out[-1500:]}\n{err[-1500:]}")

    def load_run(self, target: Target, seconds: int) -> dict[str, Any]:
        pids = target.pids()
        upstream_pids = descendants(self.upstream.pid) if self.upstream else []
        before, upstream_before = cpu_times(pids), cpu_seconds(upstream_pids)
        result = self.wrk(target, self.s.connections, self.s.wrk_threads, seconds)
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

    def stream_run(self, target: Target, events: int | None = None) -> dict[str, Any]:
        """Concurrent streams (``stream_repeats`` batches, pooled), then lone streams."""
        count = events or self.s.events
        repeats = self.s.stream_repeats if events is None else 1
        pids = target.pids()
        before = cpu_seconds(pids)
        started = time.monotonic()
        results = []
        for _ in range(repeats):
            results += run_async(lambda: run_streams(
                target.port, streams=self.s.streams, events=count,
                interval_ms=self.s.interval_ms, direct=target.direct))
        elapsed = time.monotonic() - started
        raw = summarize(results, count)
        out: dict[str, Any] = {k: v for k, v in raw.items() if not isinstance(v, list)}
        cpu = cpu_seconds(pids) - before
        out["proxy_cpu_s"] = cpu
        out["proxy_cpu_share"] = cpu / elapsed if pids else float("nan")
        out["proxy_cpu_us_per_event"] = (cpu / max(1, len(results) * count) * 1e6
                                         if pids else float("nan"))
        if events is None:  # a measured run: also the time to first event of lone streams
            alone = run_async(lambda: one_at_a_time(target.port, count=self.s.lone_streams,
                                                    direct=target.direct))
            raw["ttfb_alone_us"] = [(r.first_event_ns - r.sent_ns) / 1000 for r in alone
                                    if r.first_event_ns is not None]
            out["errors"] += sum(1 for r in alone if r.first_event_ns is None or r.error)
            out["wrong_id"] += sum(1 for r in alone if r.echoed_user_id != r.user_id_expected)
        for name in ("ttfb_us", "event_delay_us", "event_delay_mid_us", "added_gap_us",
                     "ttfb_alone_us"):
            if name not in raw:
                continue
            values = raw[name]
            out[name] = {f"p{p:g}": percentile(values, p) for p in (50, 90, 99, 99.9)}
            out[name]["max"] = max(values) if values else float("nan")
            out[name]["n"] = len(values)
        return out

    def warm_up(self) -> None:
        for target in self.live():
            self.wrk(target, self.s.connections, self.s.wrk_threads, self.s.warmup_seconds)
            self.stream_run(target, events=3)

    def measure_rounds(self) -> None:
        targets = self.live()
        for index in range(self.s.rounds):
            shift = index % len(targets)
            order = targets[shift:] + targets[:shift]
            record: dict[str, Any] = {"round": index + 1, "order": [t.key for t in order],
                                      "c1": {}, "c32": {}, "sse": {},
                                      "loadavg": os.getloadavg()}
            self.say(f"round {index + 1}/{self.s.rounds}: {', '.join(t.key for t in order)}")
            for target in order:
                record["c1"][target.key] = self.wrk(target, 1, 1, self.s.c1_seconds)
            for target in order:
                record["c32"][target.key] = self.load_run(target, self.s.c32_seconds)
            for target in order:
                self.stream_run(target, events=2)  # fills the proxy's upstream connection pool
                record["sse"][target.key] = self.stream_run(target)
            self.say("  " + "  ".join(
                f"{k}: p50 {record['c1'][k]['latency_us']['percentiles']['50']} µs, "
                f"{record['c32'][k]['rps']:,.0f} req/s" for k in record["order"]))
            self.rounds.append(record)

    def final_memory(self) -> None:
        for target in self.live(proxies_only=True):
            pids = target.pids()
            per_process = [memory_kib(pid) for pid in pids]
            target.memory["hwm_kib_sum"] = sum(m["VmHWM"] for m in per_process)
            target.memory["hwm_kib_max_process"] = max((m["VmHWM"] for m in per_process),
                                                       default=0)
            target.memory["processes"] = len(pids)
            if target.log_path is not None:
                target.log_lines = count_request_lines(target.log_path)


    def memory_tests(self) -> dict[str, Any]:
        """A fresh memproxy (1 worker): idle RSS, a large upload, 1,000 open streams."""
        target = Target("memproxy-memory", "memproxy, 1 worker (memory tests)")
        log_path = self.work / "memproxy-memory.log"
        self.start_memproxy(target, log_path=log_path)
        assert target.process is not None
        pid = target.process.pid
        out: dict[str, Any] = {}
        try:
            time.sleep(1.0)
            out["idle_rss_kib"] = memory_kib(pid)["VmRSS"]

            request = urllib.request.Request(
                f"http://127.0.0.1:{target.port}/v1/chat/completions", data=BODY_1K,
                headers={"User-Agent": "curl/8.5.0", "Content-Type": "application/json"},
                method="POST")
            with urllib.request.urlopen(request, timeout=10) as answer:
                answer.read()
            time.sleep(0.2)
            out["log_line"] = self.check_log_line(log_path)
            out["rss_after_one_request_kib"] = memory_kib(pid)["VmRSS"]

            size = self.s.large_body_mb * 1024 * 1024
            before = memory_kib(pid)["VmRSS"]
            reset_ok = reset_peak_rss(pid)
            peak = [before]
            stop = threading.Event()

            def sample() -> None:
                while not stop.is_set():
                    peak[0] = max(peak[0], memory_kib(pid)["VmRSS"])
                    time.sleep(0.002)

            sampler = threading.Thread(target=sample, daemon=True)
            sampler.start()
            try:
                upload = run_async(lambda: post_large(target.port, size))
            finally:
                stop.set()
                sampler.join()
            hwm = memory_kib(pid)["VmHWM"] if reset_ok else 0
            out["large_body"] = {
                "bytes": size, **upload, "rss_before_kib": before,
                "peak_rss_sampled_kib": peak[0], "hwm_after_reset_kib": hwm if reset_ok else None,
                "peak_minus_before_kib": max(peak[0], hwm) - before,
                "peak_minus_idle_kib": max(peak[0], hwm) - out["idle_rss_kib"],
            }

            async def many_streams() -> dict[str, Any]:
                results, transports = await hold_streams(target.port, self.s.hold_streams)
                await asyncio.sleep(1.0)
                rss = memory_kib(pid)
                opened = sum(1 for r in results if r.first_event_ns is not None)
                wrong = sum(1 for r in results if r.echoed_user_id != r.user_id_expected)
                for transport in transports:
                    transport.close()
                await asyncio.sleep(1.5)
                return {"streams": len(results), "streams_receiving": opened,
                        "wrong_id": wrong, "rss_kib": rss["VmRSS"],
                        "rss_after_close_kib": memory_kib(pid)["VmRSS"]}

            out["open_streams"] = run_async(many_streams)
            out["hwm_kib"] = memory_kib(pid)["VmHWM"]
        finally:
            self.group.stop(target.process)
        return out

    def check_log_line(self, log_path: Path) -> dict[str, Any]:
        """The per-request log line must be there, as JSON: it is part of the measured cost."""
        for line in reversed(log_path.read_text().splitlines()):
            with contextlib.suppress(ValueError):
                entry = json.loads(line)
                if entry.get("event") == "request":
                    return {"present": True, "format": "json", "example": entry}
        return {"present": False}


def check_tools() -> list[str]:
    problems = []
    for tool in ("nginx", "wrk"):
        if shutil.which(tool) is None:
            problems.append(f"{tool} is not installed (Debian/Ubuntu: "
                            f"sudo apt-get install -y nginx wrk)")
    return problems


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="one short round (about a minute)")
    parser.add_argument("--rounds", type=int, help="rounds of interleaved measurements")
    parser.add_argument("--seconds", type=int, help="length of each concurrency-32 run")
    parser.add_argument("--python", default=sys.executable,
                        help="Python with memproxy installed (default: this one)")
    parser.add_argument("--config", default=str(REPO / "config.yaml"),
                        help="config whose user_id_mappings the proxies use")
    parser.add_argument("--no-uvloop", action="store_true", help="skip the uvloop target")
    parser.add_argument("--no-memory", action="store_true", help="skip the memory tests")
    parser.add_argument("--no-baseline", action="store_true",
                        help="skip the minimal aiohttp proxy (the reference for memproxy's "
                             "own cost)")
    parser.add_argument("--output", default=str(BENCH / "results"),
                        help="folder for latest.json, latest.md and latency.png")
    parser.add_argument("--max-minutes", type=float, default=15,
                        help="stop everything after this long, whatever happens (15)")
    parser.add_argument("--profile", action="store_true",
                        help="instead of the benchmark: profile memproxy under load with py-spy")
    parser.add_argument("--profile-seconds", type=int, default=20)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    problems = check_tools()
    if problems:
        print("memproxy bench: missing tools:\n  " + "\n  ".join(problems), file=sys.stderr)
        return 2
    settings = Settings.quick() if args.quick else Settings()
    if args.rounds:
        settings.rounds = args.rounds
    if args.seconds:
        settings.c32_seconds = args.seconds

    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 65536), hard))

    def abort(signum: int, frame: object) -> None:
        raise BenchAborted(f"stopped by {signal.Signals(signum).name}")

    for signum in (signal.SIGTERM, signal.SIGHUP, signal.SIGALRM):
        signal.signal(signum, abort)
    signal.alarm(int(args.max_minutes * 60))

    bench = Bench(args, settings)
    started = time.time()
    try:
        if args.profile:
            import profile_memproxy
            return profile_memproxy.run(bench, args)
        bench.say(f"memproxy bench: working in {bench.work}; starting processes")
        meta = machine_info(args.python)
        bench.setup()
        bench.say("targets: " + ", ".join(
            f"{t.key} ({f'127.0.0.1:{t.port}' if t.available else t.note})"
            for t in bench.targets))
        bench.warm_up()
        bench.measure_rounds()
        bench.final_memory()
        for target in bench.live(proxies_only=True):
            bench.group.stop(target.process)  # type: ignore[arg-type]
        memory = {} if args.no_memory else bench.memory_tests()
    except (KeyboardInterrupt, BenchAborted) as exc:
        print(f"\nmemproxy bench: aborted ({str(exc) or 'interrupted'}); stopping processes",
              file=sys.stderr)
        return 130
    finally:
        signal.alarm(0)
        bench.group.stop_all()
        if not os.environ.get("BENCH_KEEP_WORKDIR"):
            shutil.rmtree(bench.work, ignore_errors=True)

    meta.update({
        "command": " ".join(["bench/run.sh", *(argv if argv is not None else sys.argv[1:])]),
        "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        "duration_s": round(time.time() - started, 1), "loadavg_end": os.getloadavg(),
        "settings": settings.__dict__,
        "upstream": "nginx (1 worker, `return 200` with echoed headers) for the POST; "
                    "a raw-asyncio Python server behind it for /sse and /upload",
        "pinning": "none: every process may run on either core",
    })
    results = report.build(meta, bench.targets, bench.rounds, memory)
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    (output / "latest.json").write_text(json.dumps(results, indent=1, default=str))
    text, markdown = report.tables(results)
    (output / "latest.md").write_text(markdown)
    print()
    print(text)
    plot = report.plot(results, output / "latency.png")
    print(f"\nraw figures: {output / 'latest.json'}\ntables: {output / 'latest.md'}"
          + (f"\nplot: {plot}" if plot else "\nplot: skipped (pip install -r "
             "bench/requirements.txt for matplotlib)"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
