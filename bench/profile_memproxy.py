"""Where memproxy's CPU goes under load: py-spy samples of one worker at concurrency 32.

``bench/run.sh --profile`` starts the fake upstream and, in turn, memproxy on
the stdlib asyncio loop and on uvloop (``memproxy.event_loop``). Each gets the
concurrency-32 POST load from wrk while ``py-spy record --format raw --function``
samples it (py-spy pauses the process for each sample; without pausing, many
sampled stacks come out torn). The collapsed stacks are kept in
``bench/results/profile-<loop>.txt`` and summarised in
``profile-<loop>-summary.txt``: self time by function, self time by component,
and inclusive time of the steps of a forwarded request.
Then, in ``profile-attribution.txt``, memproxy's CPU per request is split by
interleaved runs: memproxy, memproxy with its request log line off, and the
minimal aiohttp proxy of ``aiohttp_baseline.py``.

Only Python frames are sampled: time in C code (the HTTP parser, ``json``,
socket calls) counts toward the Python function that called it, and time in
uvloop's own C code shows as ``asyncio.Runner.run``.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

from bench.harness import REPO, Lab, Target, cpu_seconds, descendants, median

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


RATE = 200


def frame_file(frame: str) -> str:
    """The file part of ``func (path/file.py:12)``."""
    return frame.rpartition(" (")[2].rsplit(":", 1)[0]


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
    for marker in ("site-packages/", "/lib/python3.", f"{REPO}/"):
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


def attribute(lab: Lab, rounds: int = 3, seconds: int = 6) -> str:
    """CPU per request of memproxy, memproxy without its request log line, and minimal aiohttp.

    Interleaved runs at concurrency 32; medians. The differences split
    memproxy's CPU into the aiohttp floor, the log line and its other work.
    """
    full = Target("memproxy", "memproxy (request log line on)")
    lab.start_memproxy(full, lab.memproxy_config("memproxy"))
    silent = Target("memproxy-no-log", "memproxy, log level warning (no request line)")
    lab.start_memproxy(silent, lab.memproxy_config("memproxy-no-log", log_level="warning"))
    baseline = lab.start_baseline()
    targets = [full, silent, baseline]
    for target in targets:
        lab.wrk(target, 32, 2, 1)
    cpu: dict[str, list[float]] = {t.key: [] for t in targets}
    rps: dict[str, list[float]] = {t.key: [] for t in targets}
    for _ in range(rounds):
        for target in targets:
            result = lab.load_run(target, seconds)
            cpu[target.key].append(result["proxy_cpu_us_per_request"])
            rps[target.key].append(result["rps"])
    for target in targets:
        lab.stop(target)
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


def run(lab: Lab, output: Path, seconds: int) -> int:
    """Profile memproxy (asyncio, then uvloop) under wrk's concurrency-32 load."""
    py_spy = shutil.which("py-spy") or str(Path(lab.python).with_name("py-spy"))
    if not Path(py_spy).exists():
        print("profile: py-spy is not installed (pip install py-spy)", file=sys.stderr)
        return 2
    lab.start_upstream()
    for loop in ("asyncio", "uvloop"):
        target = Target(f"memproxy-{loop}", f"memproxy, 1 worker, {loop}")
        lab.start_memproxy(target, lab.memproxy_config(target.key, event_loop=loop))
        assert target.process is not None
        lab.wrk(target, 32, 2, 2)  # warm-up: connection pools, caches
        raw = output / f"profile-{loop}.txt"
        load = lab.group.start(lab.wrk_argv(target, 32, 2, seconds + 4), stdout=subprocess.PIPE)
        time.sleep(2)
        pids = descendants(target.process.pid)
        cpu_before = cpu_seconds(pids)
        status, _, err = lab.group.run([
            py_spy, "record", "--pid", str(target.process.pid), "--duration", str(seconds),
            "--rate", str(RATE), "--format", "raw", "--function", "-o", str(raw)],
            timeout=seconds + 60)
        cpu = cpu_seconds(pids) - cpu_before
        wrk_out = load.communicate(timeout=seconds + 30)[0].decode()
        lab.stop(target)
        if status != 0:
            print(f"profile: py-spy failed ({status}):\n{err[-2000:]}", file=sys.stderr)
            return 1
        requests = next((line for line in wrk_out.splitlines() if "requests in" in line), "")
        text = format_summary(
            f"memproxy on {loop}, 1 worker, wrk -t2 -c32, py-spy {seconds} s at {RATE} Hz",
            summarise(parse_raw(raw)),
            [f"wrk: {requests.strip()}",
             f"memproxy CPU while sampled: {cpu:.1f} s over {seconds} s"])
        (output / f"profile-{loop}-summary.txt").write_text(text)
        print(text)
    text = attribute(lab)
    (output / "profile-attribution.txt").write_text(text)
    print(text)
    print(f"collapsed stacks and summaries in {output}/profile-*.txt")
    return 0
