"""Where memproxy's CPU goes under load: py-spy samples of one worker at concurrency 32.

``bench/run.sh --profile`` starts the fake upstream and, in turn, memproxy on
the stdlib asyncio loop and on uvloop. Each gets the concurrency-32 POST load
from wrk while ``py-spy record --format raw --function`` samples it (py-spy
pauses the process for each sample; without pausing, many sampled stacks come
out torn). The collapsed stacks are kept in ``bench/results/profile-<loop>.txt``
and summarised in ``profile-<loop>-summary.txt``: self time by function, self
time by component, and inclusive time of the steps of a forwarded request.
Then, in ``profile-attribution.txt``, memproxy's CPU per request is split by
interleaved runs: memproxy, memproxy with its request log line off, and the
minimal aiohttp proxy of ``aiohttp_baseline.py``; and memproxy's
garbage-collector pauses are timed, as it is and with ``gc.freeze()``
(``gc_serve.py``).

Only Python frames are sampled: time in C code (the HTTP parser, ``json``,
socket calls) counts toward the Python function that called it, and time in
uvloop's own C code shows as ``asyncio.Runner.run``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any

from procs import cpu_seconds, descendants, free_port, wait_for_port
from stats import median

if TYPE_CHECKING:
    from run import Bench

# Components for self time, by the file of the sampled leaf frame; the first match wins.
COMPONENTS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("memproxy's own code", ("memproxy/",)),
    ("structlog (the request log line)", ("structlog/",)),
    ("json (log rendering)", ("json/",)),
    ("aiohttp server (web_protocol, web_request, web_response, web_app, web_urldispatcher)",
     ("aiohttp/web_",)),
    ("aiohttp client (client, client_reqrep, client_proto, connector)",
     ("aiohttp/client", "aiohttp/connector")),
    ("aiohttp shared (http_writer, streams, helpers, payload)", ("aiohttp/",)),
    ("multidict, yarl", ("multidict/", "yarl/")),
    ("prometheus_client (metrics)", ("prometheus_client/",)),
    ("asyncio event loop and transports (with uvloop: its C code, as Runner.run)",
     ("asyncio/", "selectors.py")),
)
# Steps of one forwarded request: inclusive time = samples with such a frame anywhere on the stack.
STEPS: tuple[tuple[str, str], ...] = (
    ("Forwarder.handle (the whole handler)", "handle (memproxy/forwarding.py"),
    ("  request.read (client body)", "read (aiohttp/web_request.py"),
    ("  detection (detect_user / identify)", "detect"),
    ("  strip_hop_by_hop (header copies)", "strip_hop_by_hop"),
    ("  ClientSession._request (the upstream call)", "_request (aiohttp/client.py"),
    ("  _relay (the answer back to the client)", "_relay (memproxy/forwarding.py"),
    ("  log_request (the request log line, whole call)", "log_request (memproxy/logs.py"),
    ("  _observe (metrics, inbox, activity)", "_observe (memproxy/forwarding.py"),
    ("aiohttp server: data_received (parsing)", "data_received (aiohttp/web_protocol.py"),
    ("aiohttp server: RequestHandler._handle_request", "_handle_request (aiohttp/web_protocol"),
    ("aiohttp server: finish_response (writing the answer)",
     "finish_response (aiohttp/web_protocol.py"),
    ("aiohttp client: data_received (parsing the upstream answer)",
     "data_received (aiohttp/client_proto.py"),
    ("asyncio transports: write / _read_ready", "(asyncio/selector_events.py"),
)


def frame_file(frame: str) -> str:
    """The file part of ``func (path/file.py:12)``."""
    return frame.rpartition(" (")[2].rsplit(":", 1)[0]


RATE = 200


def parse_raw(path: Path) -> list[tuple[list[str], int]]:
    """py-spy's raw (collapsed) format: ``frame;frame;... count`` per line, root first."""
    stacks = []
    for line in path.read_text().splitlines():
        frames_text, _, count = line.rpartition(" ")
        if not frames_text or not count.isdigit():
            continue
        frames = [f for f in frames_text.split(";")
                  if not f.startswith(("process ", "thread "))]
        stacks.append((frames, int(count)))
    return stacks


def short(frame: str) -> str:
    """``func (/long/path/site-packages/pkg/mod.py:12)`` -> ``func (pkg/mod.py:12)``."""
    name, _, where = frame.partition(" (")
    where = where.rstrip(")")
    for marker in ("site-packages/", "/lib/python3.", "/work/main/"):
        if marker in where:
            where = where.split(marker, 1)[1]
            if marker == "/lib/python3.":
                where = where.split("/", 1)[1] if "/" in where else where
    return f"{name} ({where})"


def summarise(stacks: list[tuple[list[str], int]], top: int = 25) -> dict[str, Any]:
    total = sum(count for _, count in stacks) or 1
    self_time: Counter[str] = Counter()
    components: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    steps: Counter[str] = Counter()
    for frames, count in stacks:
        if not frames:  # a sample with no Python frame at all
            self_time["(no Python frame)"] += count
            continue
        leaf = frames[-1]
        self_time[short(leaf)] += count
        where = frame_file(short(leaf))
        component = next((name for name, prefixes in COMPONENTS
                          if where.startswith(prefixes) or f"/{prefixes[0]}" in where),
                         "other")
        components[component] += count
        for frame in {short(f) for f in frames}:
            inclusive[frame] += count
        shortened = [short(f) for f in frames]
        for label, marker in STEPS:
            if any(marker in f for f in shortened):
                steps[label] += count

    def pct(n: int) -> float:
        return round(100 * n / total, 1)

    return {
        "samples": total,
        "self_top": [(name, pct(n)) for name, n in self_time.most_common(top)],
        "self_by_component": [(name, pct(n)) for name, n in components.most_common()],
        "inclusive_top": [(name, pct(n)) for name, n in inclusive.most_common(top + 15)],
        "steps": [(label, pct(steps[label])) for label, _ in STEPS],
    }


def format_summary(title: str, summary: dict[str, Any], extra: list[str]) -> str:
    lines = [title, *extra, f"busy samples: {summary['samples']}", "",
             "self time by component (% of busy samples):"]
    lines += [f"  {p:5.1f}%  {name}" for name, p in summary["self_by_component"]]
    lines += ["", "inclusive time of the steps of a request:"]
    lines += [f"  {p:5.1f}%  {label}" for label, p in summary["steps"]]
    lines += ["", "top functions by self time:"]
    lines += [f"  {p:5.1f}%  {name}" for name, p in summary["self_top"]]
    lines += ["", "top functions by inclusive time:"]
    lines += [f"  {p:5.1f}%  {name}" for name, p in summary["inclusive_top"]]
    return "\n".join(lines) + "\n"


def attribute(bench: Bench, rounds: int = 3, seconds: int = 6) -> str:
    """CPU per request of memproxy, memproxy without its request log line, and minimal aiohttp.

    Interleaved runs at concurrency 32; medians. The differences split
    memproxy's CPU into the aiohttp floor, the log line and its other work.
    """
    from run import Target

    quiet = bench.work / "memproxy-no-request-log.yaml"
    bench.write_memproxy_config(quiet, log_level="warning")
    full = Target("memproxy", "memproxy (request log line on)")
    bench.start_memproxy(full)
    silent = Target("memproxy-no-log", "memproxy, log level warning (no request line)")
    bench.start_memproxy(silent, config=quiet)
    baseline = bench.start_baseline()
    targets = [full, silent, baseline]
    for target in targets:
        bench.wrk(target, 32, 2, 1)
    cpu: dict[str, list[float]] = {t.key: [] for t in targets}
    rps: dict[str, list[float]] = {t.key: [] for t in targets}
    for _ in range(rounds):
        for target in targets:
            result = bench.load_run(target, seconds)
            cpu[target.key].append(result["proxy_cpu_us_per_request"])
            rps[target.key].append(result["rps"])
    for target in targets:
        assert target.process is not None
        bench.group.stop(target.process)
    med = {key: median(values) for key, values in cpu.items()}
    lines = [f"CPU per request at c=32, median of {rounds} interleaved {seconds} s runs:"]
    lines += [f"  {med[t.key]:6.0f} µs  ({median(rps[t.key]):,.0f} req/s)  {t.label}  "
              f"[{', '.join(f'{v:.0f}' for v in cpu[t.key])}]" for t in targets]
    lines += [
        f"  the request log line: {med['memproxy'] - med['memproxy-no-log']:.0f} µs per request",
        f"  memproxy's other own work: "
        f"{med['memproxy-no-log'] - med['aiohttp-baseline']:.0f} µs per request",
        f"  aiohttp server + client floor: {med['aiohttp-baseline']:.0f} µs per request",
    ]
    return "\n".join(lines) + "\n"


def gc_pauses(bench: Bench, seconds: int = 8, stream_runs: int = 20) -> str:
    """Garbage-collector pauses of memproxy under load, as it is and with ``gc.freeze()``.

    Each variant gets the concurrency-32 load, then ``stream_runs`` rounds of
    50 concurrent streams; a pause longer than the 10 ms between events shows
    up as coalesced events.
    """
    from run import Target, child_env

    lines = [f"Garbage collection under wrk -c32 for {seconds} s, then {stream_runs} x "
             f"{bench.s.streams} streams of {bench.s.events} events:"]
    for name, extra in (("as is", []), ("with gc.freeze() after imports", ["--freeze"])):
        report = bench.work / f"gc-{len(extra)}.json"
        target = Target(f"memproxy-gc-{len(extra)}", f"memproxy, {name}")
        target.port = free_port()
        target.process = bench.group.start(
            target.key, [bench.python, str(Path(__file__).with_name("gc_serve.py")), *extra,
                         "--report", str(report), "serve", "--config", str(bench.config_path),
                         "--port", str(target.port),
                         "--litellm-url", f"http://127.0.0.1:{bench.upstream_port}"],
            stdout=subprocess.DEVNULL, env=child_env())
        wait_for_port(target.port, 60, target.process)
        bench.wrk(target, 32, 2, 1)
        load = bench.load_run(target, seconds)
        coalesced = 0
        worst = 0.0
        for _ in range(stream_runs):
            streams = bench.stream_run(target, events=bench.s.events)
            coalesced += streams["coalesced_reads"]
            worst = max(worst, streams["event_delay_us"]["max"])
        bench.group.stop(target.process)
        data = json.loads(report.read_text())
        gen = [data[f"gen{g}"] for g in range(3)]
        lines.append(
            f"  memproxy {name}: {load['requests']:,} requests, then the streams; "
            f"objects frozen at start: {data['frozen_objects']:,}; "
            f"full collections (gen 2): {gen[2]['count']}, median {gen[2]['median_ms']} ms, "
            f"max {gen[2]['max_ms']} ms, {gen[2]['objects_freed']:,} objects freed; "
            f"gen 0: {gen[0]['count']} x {gen[0]['median_ms']} ms, "
            f"gen 1: {gen[1]['count']} x {gen[1]['median_ms']} ms; GC total "
            f"{sum(g['total_ms'] for g in gen):.0f} ms; streams: {coalesced} coalesced reads, "
            f"worst event delay {worst / 1000:.1f} ms")
    return "\n".join(lines) + "\n"


def run(bench: Bench, args: argparse.Namespace) -> int:
    """Profile memproxy (asyncio, then uvloop) under wrk's concurrency-32 load."""
    from run import Target

    py_spy = shutil.which("py-spy") or str(Path(args.python).with_name("py-spy"))
    if not Path(py_spy).exists() and shutil.which(py_spy) is None:
        print("profile: py-spy is not installed (pip install py-spy)", file=sys.stderr)
        return 2
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    seconds = args.profile_seconds
    bench.write_memproxy_config()
    bench.start_upstream()
    for name, uvloop in (("asyncio", False), ("uvloop", True)):
        target = Target(f"memproxy-{name}", f"memproxy, 1 worker, {name}")
        bench.start_memproxy(target, uvloop=uvloop)
        assert target.process is not None
        bench.wrk(target, 32, 2, 2)  # warm-up: connection pools, caches
        raw = output / f"profile-{name}.txt"
        load = bench.group.start("wrk", [
            "wrk", "-t2", "-c32", f"-d{seconds + 4}s", "--timeout", "5s",
            "-s", str(Path(__file__).with_name("wrk") / "post.lua"),
            f"http://127.0.0.1:{target.port}/v1/chat/completions", "--", "proxy",
            *(f"{ua}\t{uid}" for ua, uid in __import__("stream_client").CLIENTS)],
            stdout=subprocess.PIPE)
        time.sleep(2)
        pids = descendants(target.process.pid)
        cpu_before = cpu_seconds(pids)
        status, _, err = bench.group.run("py-spy", [
            py_spy, "record", "--pid", str(target.process.pid), "--duration", str(seconds),
            "--rate", str(RATE), "--format", "raw", "--function",
            "-o", str(raw)], timeout=seconds + 60)
        cpu = cpu_seconds(pids) - cpu_before
        wrk_out = load.communicate(timeout=seconds + 30)[0].decode()
        bench.group.stop(target.process)
        if status != 0:
            print(f"profile: py-spy failed ({status}):\n{err[-2000:]}", file=sys.stderr)
            return 1
        requests = next((line for line in wrk_out.splitlines() if "requests in" in line), "")
        summary = summarise(parse_raw(raw))
        text = format_summary(
            f"memproxy on {name}, 1 worker, wrk -t2 -c32, py-spy {seconds} s at {RATE} Hz",
            summary, [f"wrk: {requests.strip()}",
                      f"memproxy CPU while sampled: {cpu:.1f} s over {seconds} s"])
        (output / f"profile-{name}-summary.txt").write_text(text)
        print(text)
    text = attribute(bench) + "\n" + gc_pauses(bench)
    (output / "profile-attribution.txt").write_text(text)
    print(text)
    print(f"collapsed stacks and summaries in {output}/profile-*.txt")
    return 0
