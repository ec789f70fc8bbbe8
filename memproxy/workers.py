"""Several memproxy processes on one port (SO_REUSEPORT), for more than one core.

One Python process uses at most one core. With ``serve --workers N`` the parent
validates the config once, starts N worker processes that all listen on the
same port with ``SO_REUSEPORT`` (the kernel spreads connections across them),
passes SIGINT/SIGTERM on to them, and restarts a worker that dies. Workers die
with the parent (``PR_SET_PDEATHSIG``).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from types import FrameType

import structlog

from memproxy.metrics import prepare_multiprocess_dir, worker_exited
from memproxy.runner import STOP_SIGNALS
from memproxy.supervisor import die_with_parent

log = structlog.get_logger("memproxy")

WORKER_ENV = "MEMPROXY_WORKER"


def run_worker_pool(worker_argv: Sequence[str], workers: int, *, grace: float) -> int:
    """Run ``python -m memproxy <worker_argv>`` ``workers`` times until a signal."""
    stopping = False
    metrics_dir = prepare_multiprocess_dir()

    def spawn(index: int) -> subprocess.Popen[bytes]:
        process = subprocess.Popen(
            [sys.executable, "-m", "memproxy", *worker_argv],
            env={**os.environ, WORKER_ENV: str(index)}, preexec_fn=die_with_parent,
        )
        log.info("worker_started", worker=index, pid=process.pid)
        return process

    def on_signal(signum: int, frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True
        for process in pool:
            if process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    process.send_signal(signum)

    def on_hangup(signum: int, frame: FrameType | None) -> None:
        for process in pool:
            if process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    process.send_signal(signal.SIGHUP)

    pool = [spawn(i) for i in range(workers)]
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, on_signal)
    signal.signal(signal.SIGHUP, on_hangup)
    try:
        while not stopping:
            for index, process in enumerate(pool):
                code = process.poll()
                if code is None or stopping:
                    continue
                if code == 2:  # a usage error (port taken, bad config): restarting won't help
                    log.error("worker_failed", worker=index, status=code)
                    on_signal(signal.SIGTERM, None)
                    break
                log.error("worker_exited", worker=index, status=code, restart_in_s=1)
                worker_exited(process.pid)
                time.sleep(1)
                pool[index] = spawn(index)
            time.sleep(0.2)
        deadline = time.monotonic() + grace + 10
        for process in pool:
            try:
                process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
    finally:
        # The pool is down and the process exits: late signals are ignored rather than
        # left to their default action, which would make a clean stop look like a crash.
        for signum in STOP_SIGNALS:
            signal.signal(signum, signal.SIG_IGN)
        shutil.rmtree(metrics_dir, ignore_errors=True)
    clean = (0, -signal.SIGTERM, -signal.SIGINT)
    return 0 if all(p.returncode in clean for p in pool) else 1
