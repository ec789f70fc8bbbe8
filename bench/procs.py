"""Child processes for the benchmark: start, find, measure and always stop them.

Every process is started in its own session (so its whole group, workers
included, can be signalled by one id) and with ``PR_SET_PDEATHSIG``, so it
dies with the benchmark even if the benchmark itself is killed.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import IO

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


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
    """The processes one benchmark run started; :meth:`stop_all` ends every one of them."""

    def __init__(self) -> None:
        self.processes: list[tuple[str, subprocess.Popen[bytes]]] = []

    def start(
        self,
        name: str,
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
        self.processes.append((name, process))
        return process

    def run(self, name: str, argv: Sequence[str], timeout: float,
            env: dict[str, str] | None = None) -> tuple[int, str, str]:
        """Run a command to completion (killed after ``timeout`` s); returns (status, out, err)."""
        process = self.start(name, argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
        try:
            out, err = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.stop(process, timeout=2)
            out, err = process.communicate()
        # Forgotten only once finished: an interrupted run stays listed for stop_all().
        self.processes = [(n, p) for n, p in self.processes if p is not process]
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
        for _, process in reversed(self.processes):
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
        if not entry.isdigit():
            continue
        fields = _read_stat(int(entry))
        if fields is not None:
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


def tree_memory_kib(pid: int) -> dict[str, int]:
    """``VmRSS`` and ``VmHWM`` summed over ``pid`` and its descendants."""
    total = {"VmRSS": 0, "VmHWM": 0}
    for each in descendants(pid):
        for key, value in memory_kib(each).items():
            total[key] += value
    return total


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
