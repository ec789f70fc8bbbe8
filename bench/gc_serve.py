"""``python -m memproxy`` with its garbage-collector pauses recorded.

``python bench/gc_serve.py --report FILE [--freeze] serve --config ...`` runs
memproxy's CLI unchanged, times every collection through ``gc.callbacks`` and,
when memproxy exits, writes per-generation counts and pause times to FILE as
JSON. With ``--freeze``, ``gc.freeze()`` is called once the imports are done,
so the collector no longer walks the objects that exist at start-up (a trial
of that fix, without changing memproxy).
"""

from __future__ import annotations

import atexit
import gc
import json
import sys
import time
from typing import Any

pauses: dict[int, list[float]] = {0: [], 1: [], 2: []}
collected: dict[int, int] = {0: 0, 1: 0, 2: 0}
_started: dict[int, float] = {}


def _on_gc(phase: str, info: dict[str, Any]) -> None:
    generation = info["generation"]
    if phase == "start":
        _started[generation] = time.perf_counter()
    elif generation in _started:
        pauses[generation].append(time.perf_counter() - _started.pop(generation))
        collected[generation] += info.get("collected", 0)


def _report(path: str, frozen: int) -> None:
    summary: dict[str, Any] = {"frozen_objects": frozen}
    for generation, values in pauses.items():
        ordered = sorted(values)
        summary[f"gen{generation}"] = {
            "count": len(ordered),
            "total_ms": round(sum(ordered) * 1000, 2),
            "median_ms": round(ordered[len(ordered) // 2] * 1000, 3) if ordered else None,
            "max_ms": round(ordered[-1] * 1000, 3) if ordered else None,
            "objects_freed": collected[generation],
        }
    with open(path, "w") as out:
        json.dump(summary, out)


def main() -> int:
    args = sys.argv[1:]
    freeze = "--freeze" in args
    if freeze:
        args.remove("--freeze")
    report = args[args.index("--report") + 1]
    del args[args.index("--report"):args.index("--report") + 2]

    from memproxy.__main__ import main as memproxy_main

    frozen = 0
    if freeze:
        gc.freeze()
        frozen = gc.get_freeze_count()
    gc.callbacks.append(_on_gc)
    atexit.register(_report, report, frozen)
    return memproxy_main(args)


if __name__ == "__main__":
    sys.exit(main())
