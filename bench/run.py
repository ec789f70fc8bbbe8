"""memproxy benchmark: memproxy against nginx and a direct floor, in one interleaved run.

Usage (``bench/run.sh`` runs ``python -m bench.run`` with this checkout on the path)::

    bench/run.sh            # default run, about 4 minutes
    bench/run.sh --quick    # one short round, about a minute
    bench/run.sh --profile  # py-spy profile of memproxy under load (profile_memproxy.py)

Everything runs on 127.0.0.1: a fake upstream (nginx answering the plain POST
itself, a small Python server behind it for the event streams and the large
upload), nginx as a reference proxy with a ``map`` on User-Agent, memproxy
with one worker, with two workers and with one worker on uvloop
(``memproxy.event_loop: uvloop``), and a minimal aiohttp proxy
(``aiohttp_baseline.py``) that shows what the aiohttp building blocks alone
cost. Each round measures every target in turn (order rotated per round):
latency at concurrency 1, throughput and proxy CPU at concurrency 32, and 50
concurrent event streams plus single streams one at a time. Figures are
medians over rounds of per-round differences or ratios, so slow drift of a
shared machine affects all targets alike. Then a fresh memproxy is measured
for memory: idle, one 50 MiB upload, and 1,000 open streams.

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
import shutil
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import uvloop
from aiohttp.test_utils import unused_port

from bench import nginx_conf, profile_memproxy, report
from bench.harness import (
    BENCH,
    CLIENTS,
    REPO,
    BenchAborted,
    Lab,
    Target,
    child_env,
    cpu_seconds,
    memory_kib,
    percentile,
    reset_peak_rss,
    time_limit,
)
from bench.stream_client import hold_streams, one_at_a_time, post_large, run_streams, summarize

BODY_1K = json.dumps({"model": "memproxy-demo", "messages": [
    {"role": "user", "content": "x" * 957}]}, separators=(",", ":")).encode()


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


def command_version(argv: list[str]) -> str:
    """The first line ``argv`` prints, or ``unknown``."""
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    text = (done.stdout + done.stderr).strip().splitlines()
    return text[0].strip() if text else "unknown"


def machine_info(python: str) -> dict[str, Any]:
    """The machine and the versions a run's figures belong to."""
    cpu_model = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    names = ["aiohttp", "multidict", "yarl", "structlog", "memproxy", "uvloop"]
    probe = subprocess.run(
        [python, "-c", f"import sys, {', '.join(names)}\n"
         f"print(sys.version.split()[0], {', '.join(f'{n}.__version__' for n in names)})"],
        capture_output=True, text=True, env=child_env(), timeout=60)
    versions = (dict(zip(["python", *names], probe.stdout.split(), strict=False))
                if probe.returncode == 0 else {})
    return {
        "nproc": os.cpu_count(), "cpus_usable": len(os.sched_getaffinity(0)),
        "cpu_model": cpu_model, "kernel": platform.release(), "versions": versions,
        "nginx": command_version(["nginx", "-v"]), "wrk": command_version(["wrk", "-v"]),
        "git": command_version(["git", "-C", str(REPO), "describe", "--always", "--dirty"]),
        "loadavg_start": os.getloadavg(),
    }


def count_request_lines(path: Path) -> int:
    """Per-request log lines (JSON with ``"event": "request"``) memproxy wrote to ``path``."""
    with path.open("rb") as log:
        return sum(1 for line in log
                   if b'"event": "request"' in line or b'"event":"request"' in line)


class Bench:
    """One benchmark run over the processes of ``lab``."""

    def __init__(self, lab: Lab, settings: Settings, args: argparse.Namespace) -> None:
        self.lab = lab
        self.s = settings
        self.args = args
        self.config = lab.memproxy_config("memproxy")
        self.targets: list[Target] = []
        self.rounds: list[dict[str, Any]] = []
        self.memory: dict[str, Any] = {}

    def say(self, message: str) -> None:
        print(message, flush=True)

    # ---- setup -------------------------------------------------------------------------

    def setup(self) -> None:
        lab = self.lab
        lab.start_upstream()
        direct = Target("direct", "direct to upstream (floor)", port=lab.upstream_port,
                        direct=True)
        nginx = Target("nginx", "nginx, map on User-Agent (1 worker)", port=unused_port())
        nginx.process = lab.start_nginx(
            "proxy", nginx_conf.proxy_conf(lab.work, nginx.port, lab.upstream_port,
                                           *lab.user_agent_rules()), nginx.port)
        self.targets = [direct, nginx]
        if not self.args.no_baseline:
            self.targets.append(lab.start_baseline())

        one = Target("memproxy", "memproxy, 1 worker")
        lab.start_memproxy(one, self.config)
        loop = Target("memproxy-uvloop", "memproxy, 1 worker, uvloop")
        lab.start_memproxy(loop, lab.memproxy_config("memproxy-uvloop", event_loop="uvloop"))
        two = Target("memproxy-2w", "memproxy, 2 workers")
        lab.start_memproxy(two, self.config, workers=2)
        self.targets += [one, loop, two]

        time.sleep(1.0)
        for target in self.memproxies():
            target.memory["idle_rss_kib"] = sum(memory_kib(p)["VmRSS"] for p in target.pids())
        self.preflight()

    def proxies(self) -> list[Target]:
        return [t for t in self.targets if not t.direct]

    def memproxies(self) -> list[Target]:
        return [t for t in self.targets if t.key.startswith("memproxy")]

    def preflight(self) -> None:
        """One request per known client through each target: the echoed id must match."""
        for target in self.targets:
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
                        f"clients (CLIENTS in bench/harness.py) assume the bundled "
                        f"header_patterns of {self.lab.config}.")

    # ---- measurements ------------------------------------------------------------------

    def stream_run(self, target: Target, events: int | None = None) -> dict[str, Any]:
        """Concurrent streams (``stream_repeats`` batches, pooled), then lone streams.

        With ``events`` given: one unmeasured batch of that many events (a warm-up).
        """
        count = events or self.s.events
        repeats = self.s.stream_repeats if events is None else 1
        pids = target.pids()
        before = cpu_seconds(pids)
        started = time.monotonic()
        results = []
        for _ in range(repeats):
            results += uvloop.run(run_streams(
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
            alone = uvloop.run(one_at_a_time(target.port, count=self.s.lone_streams,
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
        for target in self.targets:
            self.lab.wrk(target, self.s.connections, self.s.wrk_threads, self.s.warmup_seconds)
            self.stream_run(target, events=3)

    def measure_rounds(self) -> None:
        targets = self.targets
        for index in range(self.s.rounds):
            shift = index % len(targets)
            order = targets[shift:] + targets[:shift]
            record: dict[str, Any] = {"round": index + 1, "order": [t.key for t in order],
                                      "c1": {}, "c32": {}, "sse": {},
                                      "loadavg": os.getloadavg()}
            self.say(f"round {index + 1}/{self.s.rounds}: {', '.join(t.key for t in order)}")
            for target in order:
                record["c1"][target.key] = self.lab.wrk(target, 1, 1, self.s.c1_seconds)
            for target in order:
                record["c32"][target.key] = self.lab.load_run(
                    target, self.s.c32_seconds, self.s.connections, self.s.wrk_threads)
            for target in order:
                self.stream_run(target, events=2)  # fills the proxy's upstream connection pool
                record["sse"][target.key] = self.stream_run(target)
            self.say("  " + "  ".join(
                f"{k}: p50 {record['c1'][k]['latency_us']['percentiles']['50']} µs, "
                f"{record['c32'][k]['rps']:,.0f} req/s" for k in record["order"]))
            self.rounds.append(record)

    def final_memory(self) -> None:
        """Each proxy's peak memory over the run, then stop them all."""
        for target in self.proxies():
            per_process = [memory_kib(pid) for pid in target.pids()]
            target.memory["hwm_kib_sum"] = sum(m["VmHWM"] for m in per_process)
            target.memory["hwm_kib_max_process"] = max((m["VmHWM"] for m in per_process),
                                                       default=0)
            target.memory["processes"] = len(per_process)
            if target.log_path is not None:
                target.log_lines = count_request_lines(target.log_path)
            self.lab.stop(target)

    def memory_tests(self) -> dict[str, Any]:
        """A fresh memproxy (1 worker): idle RSS, a large upload, 1,000 open streams."""
        target = Target("memproxy-memory", "memproxy, 1 worker (memory tests)")
        self.lab.start_memproxy(target, self.config)
        assert target.process is not None and target.log_path is not None
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
            out["log_line"] = self.check_log_line(target.log_path)
            out["rss_after_one_request_kib"] = memory_kib(pid)["VmRSS"]
            out["large_body"] = self.large_upload(target, out["idle_rss_kib"])
            out["open_streams"] = uvloop.run(self.open_streams(target))
            out["hwm_kib"] = memory_kib(pid)["VmHWM"]
        finally:
            self.lab.stop(target)
        return out

    def large_upload(self, target: Target, idle_kib: int) -> dict[str, Any]:
        """One large POST while the RSS is sampled every 2 ms (and VmHWM read after a reset)."""
        assert target.process is not None
        pid = target.process.pid
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
            upload = uvloop.run(post_large(target.port, size))
        finally:
            stop.set()
            sampler.join()
        hwm = memory_kib(pid)["VmHWM"] if reset_ok else 0
        return {"bytes": size, **upload, "rss_before_kib": before,
                "peak_rss_sampled_kib": peak[0], "hwm_after_reset_kib": hwm if reset_ok else None,
                "peak_minus_before_kib": max(peak[0], hwm) - before,
                "peak_minus_idle_kib": max(peak[0], hwm) - idle_kib}

    async def open_streams(self, target: Target) -> dict[str, Any]:
        """RSS with ``hold_streams`` streams open, and after closing them."""
        assert target.process is not None
        pid = target.process.pid
        results, transports = await hold_streams(target.port, self.s.hold_streams)
        await asyncio.sleep(1.0)
        rss = memory_kib(pid)
        for transport in transports:
            transport.close()
        await asyncio.sleep(1.5)
        return {"streams": len(results),
                "streams_receiving": sum(1 for r in results if r.first_event_ns is not None),
                "wrong_id": sum(1 for r in results if r.echoed_user_id != r.user_id_expected),
                "rss_kib": rss["VmRSS"], "rss_after_close_kib": memory_kib(pid)["VmRSS"]}

    def check_log_line(self, log_path: Path) -> dict[str, Any]:
        """The per-request log line must be there, as JSON: it is part of the measured cost."""
        for line in reversed(log_path.read_text().splitlines()):
            with contextlib.suppress(ValueError):
                entry = json.loads(line)
                if entry.get("event") == "request":
                    return {"present": True, "format": "json", "example": entry}
        return {"present": False}

    def run(self) -> None:
        """Every measurement, in order."""
        self.say(f"memproxy bench: working in {self.lab.work}; starting processes")
        self.setup()
        self.say("targets: " + ", ".join(f"{t.key} (127.0.0.1:{t.port})" for t in self.targets))
        self.warm_up()
        self.measure_rounds()
        self.final_memory()
        if not self.args.no_memory:
            self.memory = self.memory_tests()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="bench/run.sh", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="one short round (about a minute)")
    parser.add_argument("--rounds", type=int, help="rounds of interleaved measurements")
    parser.add_argument("--seconds", type=int, help="length of each concurrency-32 run")
    parser.add_argument("--python", default=sys.executable,
                        help="Python with memproxy installed (default: this one)")
    parser.add_argument("--config", default=str(REPO / "config.yaml"),
                        help="config whose user_id_mappings the proxies use")
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
    missing = [tool for tool in ("nginx", "wrk") if shutil.which(tool) is None]
    if missing:
        print(f"memproxy bench: missing {' and '.join(missing)} (Debian/Ubuntu: sudo apt-get "
              f"install -y nginx wrk; nginx need not run as a service)", file=sys.stderr)
        return 2
    settings = Settings.quick() if args.quick else Settings()
    settings.rounds = args.rounds or settings.rounds
    settings.c32_seconds = args.seconds or settings.c32_seconds
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)

    lab = Lab(args.python, Path(args.config))
    started = time.time()
    try:
        with time_limit(args.max_minutes):
            if args.profile:
                return profile_memproxy.run(lab, output, args.profile_seconds)
            meta = machine_info(args.python)
            bench = Bench(lab, settings, args)
            bench.run()
    except (KeyboardInterrupt, BenchAborted) as exc:
        print(f"\nmemproxy bench: aborted ({str(exc) or 'interrupted'}); stopping processes",
              file=sys.stderr)
        return 130
    finally:
        lab.close()

    meta.update({
        "command": " ".join(["bench/run.sh", *(argv if argv is not None else sys.argv[1:])]),
        "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        "duration_s": round(time.time() - started, 1), "loadavg_end": os.getloadavg(),
        "settings": asdict(settings),
        "upstream": "nginx (1 worker, `return 200` with echoed headers) for the POST; "
                    "a raw-asyncio Python server behind it for /sse and /upload",
        "pinning": "none: every process may run on either core",
    })
    results = report.build(meta, bench.targets, bench.rounds, bench.memory)
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
