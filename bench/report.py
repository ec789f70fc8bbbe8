"""Turn the raw rounds into per-target figures, check them against the goals, print and plot."""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.harness import BENCH, Target, median, spread

NAN = float("nan")


def _errors(wrk_result: dict[str, Any]) -> int:
    return int(sum(wrk_result["errors"].values()))


def _round_figures(key: str, record: dict[str, Any]) -> dict[str, float]:
    c1 = record["c1"][key]
    floor = record["c1"]["direct"]
    p, fp = c1["latency_us"]["percentiles"], floor["latency_us"]["percentiles"]
    c32 = record["c32"][key]
    nginx = record["c32"].get("nginx")
    sse, sse_floor = record["sse"][key], record["sse"]["direct"]
    return {
        "c1_p50_us": p["50"], "c1_p99_us": p["99"],
        "added_p50_us": p["50"] - fp["50"], "added_p99_us": p["99"] - fp["99"],
        "rps": c32["rps"],
        "vs_nginx": c32["rps"] / nginx["rps"] if nginx else NAN,
        "cpu_us_per_request": NAN if key == "direct" else c32["proxy_cpu_us_per_request"],
        "system_cpu_us_per_request": (NAN if key == "direct"
                                      else c32["proxy_system_us_per_request"]),
        "upstream_cpu_us_per_request": c32["upstream_cpu_us_per_request"],
        "c32_p50_us": c32["latency_us"]["percentiles"]["50"],
        "c32_p99_us": c32["latency_us"]["percentiles"]["99"],
        "ttfb_p50_us": sse["ttfb_us"]["p50"],
        "added_ttfb_us": sse["ttfb_us"]["p50"] - sse_floor["ttfb_us"]["p50"],
        "ttfb_alone_p50_us": sse["ttfb_alone_us"]["p50"],
        "added_ttfb_alone_us": sse["ttfb_alone_us"]["p50"] - sse_floor["ttfb_alone_us"]["p50"],
        "event_delay_p50_us": sse["event_delay_us"]["p50"],
        "event_delay_p99_us": sse["event_delay_us"]["p99"],
        "added_event_p99_us": sse["event_delay_us"]["p99"] - sse_floor["event_delay_us"]["p99"],
        "added_event_mid_p99_us": (sse["event_delay_mid_us"]["p99"]
                                   - sse_floor["event_delay_mid_us"]["p99"]),
        "gap_p99_us": sse["added_gap_us"]["p99"],
        "coalesced_reads": sse["coalesced_reads"],
        "sse_cpu_us_per_event": sse.get("proxy_cpu_us_per_event", NAN),
        "sse_cpu_share": sse.get("proxy_cpu_share", NAN),
        "errors": _errors(c1) + _errors(c32) + sse["errors"],
        "wrong_id": c1["wrong_id"] + c32["wrong_id"] + sse["wrong_id"],
        "checked": c1["checked"] + c32["checked"] + sse["streams"],
    }


def build(meta: dict[str, Any], targets: Sequence[Target], rounds: list[dict[str, Any]],
          memory: dict[str, Any]) -> dict[str, Any]:
    """Everything the run measured: raw rounds, per-target medians and the goal checks."""
    summary: dict[str, Any] = {}
    for target in targets:
        entry: dict[str, Any] = {"label": target.label, "memory": target.memory,
                                 "request_log_lines": target.log_lines}
        if rounds:
            per_round = [_round_figures(target.key, r) for r in rounds]
            entry["per_round"] = per_round
            entry["median"] = {k: median([r[k] for r in per_round]) for k in per_round[0]}
            entry["range"] = {k: spread([r[k] for r in per_round]) for k in per_round[0]}
            entry["totals"] = {k: sum(r[k] for r in per_round)
                               for k in ("errors", "wrong_id", "coalesced_reads", "checked")}
        summary[target.key] = entry
    results = {"meta": meta, "summary": summary, "memory": memory, "rounds": rounds}
    results["checks"] = checks(results)
    return results


def _mb(kib: float | None) -> float:
    return NAN if kib is None else kib * 1024 / 1e6


def checks(results: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's goals: each with the measured value, and met or missed by how much."""
    summary, memory = results["summary"], results["memory"]
    out: list[dict[str, Any]] = []

    def figure(key: str, name: str) -> float:
        return float(summary.get(key, {}).get("median", {}).get(name, NAN))

    def add(goal: str, value: float, limit: float, unit: str, at_least: bool = False) -> None:
        if value != value:
            out.append({"goal": goal, "value": None, "verdict": "not measured"})
            return
        met = value >= limit if at_least else value <= limit
        if met:
            verdict = "met"
        elif at_least:
            verdict = f"missed: {value / limit:.2f} of the goal ({limit - value:.3g} {unit} short)"
        elif limit:
            verdict = f"missed by {value - limit:.3g} {unit} ({value / limit:.1f}x the goal)"
        else:
            verdict = f"missed: {value:.3g} {unit}".rstrip()
        out.append({"goal": goal, "value": value, "unit": unit, "verdict": verdict})

    add("added median latency at c=1, 1 worker: at most 150 µs",
        figure("memproxy", "added_p50_us"), 150, "µs")
    add("proxy CPU per request, 1 worker: at most 80 µs",
        figure("memproxy", "cpu_us_per_request"), 80, "µs")
    add("throughput at c=32, 1 worker: at least 0.5 x nginx",
        figure("memproxy", "vs_nginx"), 0.5, "x nginx", at_least=True)
    add("throughput at c=32, 2 workers: at least 0.7 x nginx",
        figure("memproxy-2w", "vs_nginx"), 0.7, "x nginx", at_least=True)
    memproxy_totals = [e["totals"] for k, e in summary.items()
                       if k.startswith("memproxy") and "totals" in e]
    coalesced = (sum(t["coalesced_reads"] for t in memproxy_totals) if memproxy_totals
                 else NAN)
    add("streaming: no coalesced events (reads with more than one event), all memproxy "
        "targets", coalesced, 0, "reads")
    add("streaming: added per-event delay p99 at most 1 ms",
        figure("memproxy", "added_event_p99_us") / 1000, 1, "ms")
    add("streaming: added time to first event at most 1 ms (50 streams at once)",
        figure("memproxy", "added_ttfb_us") / 1000, 1, "ms")
    add("streaming: added time to first event at most 1 ms (one stream alone)",
        figure("memproxy", "added_ttfb_alone_us") / 1000, 1, "ms")
    add("idle RSS at most 60 MB", _mb(memory.get("idle_rss_kib")), 60, "MB")
    add("RSS with 1,000 open streams at most 200 MB",
        _mb(memory.get("open_streams", {}).get("rss_kib")), 200, "MB")
    large = memory.get("large_body", {})
    add(f"{large.get('bytes', 0) // 2**20} MiB upload: peak RSS minus idle at most one copy",
        _mb(large.get("peak_minus_idle_kib")), large.get("bytes", 0) / 1e6, "MB")
    errors = sum(e.get("totals", {}).get("errors", 0) for e in summary.values())
    wrong = sum(e.get("totals", {}).get("wrong_id", 0) for e in summary.values())
    wrong += memory.get("open_streams", {}).get("wrong_id", 0)
    add("errors, all targets: 0", errors, 0, "")
    add("wrong-id responses, all targets: 0", wrong, 0, "")
    return out


def _fmt(value: float, digits: int = 0, scale: float = 1.0) -> str:
    if value != value:
        return "-"
    return f"{value / scale:,.{digits}f}"


REQUEST_COLUMNS = (
    ("target", None),
    ("added p50 c=1 (µs)", ("added_p50_us", 0, 1)),
    ("added p99 c=1 (µs)", ("added_p99_us", 0, 1)),
    ("req/s c=32", ("rps", 0, 1)),
    ("x nginx", ("vs_nginx", 2, 1)),
    ("CPU/req (µs)", ("cpu_us_per_request", 0, 1)),
    ("of which kernel (µs)", ("system_cpu_us_per_request", 0, 1)),
    ("VmHWM (MB)", "hwm"),
    ("errors", "errors"),
    ("wrong id", "wrong_id"),
)
STREAM_COLUMNS = (
    ("target", None),
    ("added TTFB, 50 streams (ms)", ("added_ttfb_us", 2, 1000)),
    ("added TTFB, 1 stream (ms)", ("added_ttfb_alone_us", 2, 1000)),
    ("event delay p99 (ms)", ("event_delay_p99_us", 2, 1000)),
    ("added event delay p99 (ms)", ("added_event_p99_us", 2, 1000)),
    ("same, mid-stream events (ms)", ("added_event_mid_p99_us", 2, 1000)),
    ("added gap p99 (ms)", ("gap_p99_us", 2, 1000)),
    ("coalesced reads", "coalesced_reads"),
    ("CPU/event (µs)", ("sse_cpu_us_per_event", 0, 1)),
)


def _row(entry: dict[str, Any], columns: tuple[tuple[str, Any], ...]) -> list[str]:
    cells = [entry["label"]]
    if "median" not in entry:
        return cells + ["not measured"] + [""] * (len(columns) - 2)
    med = entry["median"]
    for _, spec in columns[1:]:
        if isinstance(spec, tuple):
            key, digits, scale = spec
            cells.append(_fmt(med[key], digits, scale))
        elif spec == "hwm":
            hwm = entry["memory"].get("hwm_kib_sum")
            procs = entry["memory"].get("processes", 1)
            cells.append("-" if hwm is None else
                         f"{_mb(hwm):.0f}" + (f" ({procs} proc.)" if procs > 1 else ""))
        else:
            cells.append(str(entry["totals"][spec]))
    return cells


def _text_table(columns: tuple[tuple[str, Any], ...], rows: list[list[str]]) -> list[str]:
    header = [name for name, _ in columns]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                       for i, (c, w) in enumerate(zip(r, widths, strict=True)))
             for r in [header, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return lines


def _md_table(columns: tuple[tuple[str, Any], ...], rows: list[list[str]]) -> list[str]:
    header = [name for name, _ in columns]
    return ["| " + " | ".join(header) + " |", "| --- |" + " ---: |" * (len(header) - 1),
            *("| " + " | ".join(r) + " |" for r in rows)]


def tables(results: dict[str, Any]) -> tuple[str, str]:
    """The figures as plain-text tables (for the terminal) and as Markdown."""
    entries = list(results["summary"].values())
    request_rows = [_row(e, REQUEST_COLUMNS) for e in entries]
    stream_rows = [_row(e, STREAM_COLUMNS) for e in entries]
    settings = results["meta"].get("settings", {})
    stream_title = (f"Streams: {settings.get('stream_repeats')} x {settings.get('streams')} "
                    f"concurrent streams of "
                    f"{settings.get('events')} events {settings.get('interval_ms', 0):g} ms apart; "
                    f"'1 stream': {settings.get('lone_streams')} single streams one at a time")

    memory = results["memory"]
    mem_lines: list[str] = []
    if memory:
        large = memory.get("large_body", {})
        streams = memory.get("open_streams", {})
        mem_lines = [
            f"memproxy idle RSS after start: {_mb(memory.get('idle_rss_kib')):.1f} MB",
            f"RSS with {streams.get('streams_receiving', 0):,} of {streams.get('streams', 0):,} "
            f"streams open: {_mb(streams.get('rss_kib')):.1f} MB "
            f"(after closing them: {_mb(streams.get('rss_after_close_kib')):.1f} MB)",
            f"{large.get('bytes', 0) // 2**20} MiB upload (status {large.get('status')}, "
            f"upstream got {large.get('upstream_bytes')} bytes in "
            f"{large.get('seconds', 0):.2f} s): peak RSS "
            f"{_mb(large.get('peak_rss_sampled_kib')):.1f} MB sampled, "
            f"peak minus idle {_mb(large.get('peak_minus_idle_kib')):.1f} MB",
            f"request log line on, JSON: {memory.get('log_line', {}).get('present')}",
        ]
    logged = [f"{e['label']}: {e['request_log_lines']:,}" for e in entries
              if e.get("request_log_lines")]
    if logged:
        mem_lines.append("request log lines written during the run: " + ", ".join(logged))
    check_lines = [f"{c['verdict']:<45} {c['goal']}"
                   + ("" if c.get("value") is None else f"  [{c['value']:.3g} {c['unit']}]")
                   for c in results["checks"]]
    rounds = len(results["rounds"])
    note = (f"Medians over {rounds} round(s); 'added' = target minus direct in the same round; "
            "CPU/req = utime+stime of the proxy's processes over the c=32 run / requests.")
    goal_rows = [
        f"| {c['goal']} | "
        + ("-" if c.get("value") is None else f"{c['value']:.3g} {c['unit']}".strip())
        + f" | {c['verdict']} |"
        for c in results["checks"]
    ]
    text_out = "\n".join([
        *_text_table(REQUEST_COLUMNS, request_rows), "", stream_title + ":", "",
        *_text_table(STREAM_COLUMNS, stream_rows), "", note, "", *mem_lines, "",
        "Goals:", *check_lines,
    ])
    md_out = "\n".join([
        *_md_table(REQUEST_COLUMNS, request_rows), "", stream_title + ":", "",
        *_md_table(STREAM_COLUMNS, stream_rows), "", note, "",
        *(f"- {line}" for line in mem_lines), "",
        "| goal | measured | verdict |", "| --- | ---: | --- |", *goal_rows,
    ]) + "\n"
    return text_out, md_out


PLOTTED = (("direct", "tab:gray"), ("nginx", "tab:green"), ("memproxy", "tab:red"),
           ("memproxy-uvloop", "tab:purple"), ("memproxy-2w", "tab:orange"),
           ("aiohttp-baseline", "tab:blue"))


def _tail(p: float) -> float:
    """Percentile ``p`` on a scale that gives each extra "nine" the same height."""
    return -math.log10(1 - p / 100)


def plot(results: dict[str, Any], path: Path) -> Path | None:
    """Latency percentiles at c=1, one line per round and target (None without matplotlib)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(9, 5.5), dpi=110)
    for key, colour in PLOTTED:
        entry = results["summary"].get(key)
        if not entry or "median" not in entry:
            continue
        for index, record in enumerate(results["rounds"]):
            points = record["c1"][key]["latency_us"]["percentiles"]
            ps = sorted(points, key=float)
            ax.plot([points[p] for p in ps], [_tail(float(p)) for p in ps], color=colour,
                    alpha=0.8,
                    linewidth=1.4, marker=".", markersize=3,
                    label=entry["label"] if index == 0 else None)
    ax.set_xscale("log")
    ax.set_xlabel("latency of one 1 KB POST at concurrency 1 (µs, log scale)")
    ax.set_ylabel("percentile (tail-stretched scale)")
    ticks = [10, 50, 75, 90, 95, 99, 99.9, 99.99]
    ax.set_yticks([_tail(p) for p in ticks], [f"{p:g}" for p in ticks])
    ax.grid(True, which="both", alpha=0.3)
    meta = results["meta"]
    ax.set_title(f"memproxy latency distribution, one line per round "
                 f"({meta.get('nproc')} cores, {meta.get('started_utc', '')})", fontsize=10)
    ax.legend(loc="lower right", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def main() -> int:
    """Rebuild the tables, goal checks and plot of a saved run: ``python -m bench.report FILE``."""
    path = Path(sys.argv[1] if len(sys.argv) > 1 else BENCH / "results" / "latest.json")
    results = json.loads(path.read_text())
    results["checks"] = checks(results)
    path.write_text(json.dumps(results, indent=1, default=str))
    text, markdown = tables(results)
    path.with_suffix(".md").write_text(markdown)
    print(text)
    plot(results, path.with_name("latency.png"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
