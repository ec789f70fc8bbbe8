"""A throwaway PostgreSQL server for the tests: initdb and pg_ctl on a temporary folder.

Debian's ``postgresql`` package provides the programs (``/usr/lib/postgresql/N/bin``).
The server listens on a Unix socket in its own folder and on a free loopback port,
with trust authentication for the ``memproxy`` role and a password for ``secret_user``
(the tests that check a password never shows up use it). When memproxy's tests run as
root, the server runs as the ``postgres`` system user, as PostgreSQL requires.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from aiohttp.test_utils import unused_port

#: Set by .ci/run: PostgreSQL tests must run; a missing server fails them instead of skipping.
REQUIRED_ENV = "MEMPROXY_REQUIRE_POSTGRES"
HOW_TO_ENABLE = ("PostgreSQL tests skipped: initdb and pg_ctl not found. Install Debian's "
                 "postgresql package (apt-get install postgresql) and memproxy's extra "
                 "(pip install -e '.[postgres]') to run them; .ci/run does both.")
PASSWORD = "pg-test-password-7f3a9c"


def binaries() -> Path | None:
    """The folder with initdb and pg_ctl, newest version first; ``None`` when absent."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"),
                   key=lambda p: int(Path(p).parts[-3]), reverse=True)
    if found:
        return Path(found[0]).parent
    initdb = shutil.which("initdb")
    return Path(initdb).resolve().parent if initdb else None


class PostgresServer:
    """One PostgreSQL cluster in a temporary folder, started and stopped on demand."""

    def __init__(self, bindir: Path) -> None:
        self.bindir = bindir
        self.root = Path(tempfile.mkdtemp(prefix="memproxy-pg-"))
        self.data = self.root / "data"
        self.socket_dir = self.root / "socket"
        self.port = unused_port()
        self.as_user: str | None = None
        if os.geteuid() == 0:
            self.as_user = "postgres"
            self.root.chmod(0o755)
        self.socket_dir.mkdir()
        self._own(self.root)
        self._run("initdb", "-D", str(self.data), "-U", "memproxy", "--auth=trust",
                  "-E", "UTF8", "--locale=C.UTF-8")
        with (self.data / "postgresql.conf").open("a") as conf:
            conf.write(f"\nport = {self.port}\nlisten_addresses = '127.0.0.1'\n"
                       f"unix_socket_directories = '{self.socket_dir}'\n"
                       "max_connections = 200\nfsync = off\nsynchronous_commit = off\n"
                       "full_page_writes = off\nshared_buffers = 64MB\n")
        with (self.data / "pg_hba.conf").open("w") as hba:
            hba.write("local all secret_user scram-sha-256\n"
                      "host all secret_user 127.0.0.1/32 scram-sha-256\n"
                      "local all all trust\nhost all all 127.0.0.1/32 trust\n")
        self.start()
        self.sql(f"CREATE ROLE secret_user LOGIN PASSWORD '{PASSWORD}'")
        self.databases = 0

    def _own(self, path: Path) -> None:
        if self.as_user is not None:
            entry = pwd.getpwnam(self.as_user)
            for folder, _, files in os.walk(path):
                os.chown(folder, entry.pw_uid, entry.pw_gid)
                for name in files:
                    os.chown(os.path.join(folder, name), entry.pw_uid, entry.pw_gid)

    def _run(self, program: str, *args: str) -> subprocess.CompletedProcess[str]:
        argv = [str(self.bindir / program), *args]
        if self.as_user is not None:
            argv = ["runuser", "-u", self.as_user, "--", *argv]
        return subprocess.run(argv, check=True, capture_output=True, text=True, timeout=120)

    def start(self) -> None:
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.root / "server.log"),
                  "-w", "-t", "60", "start")

    def stop(self, mode: str = "fast") -> None:
        self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "-t", "60", "stop")

    def running(self) -> bool:
        status = subprocess.run(
            (["runuser", "-u", self.as_user, "--"] if self.as_user else [])
            + [str(self.bindir / "pg_ctl"), "-D", str(self.data), "status"],
            capture_output=True, timeout=30)
        return status.returncode == 0

    def sql(self, statement: str, database: str = "postgres") -> str:
        """Run one statement as the superuser; its output, unaligned."""
        result = subprocess.run(
            [str(self.bindir / "psql"), "-X", "-A", "-t", "-v", "ON_ERROR_STOP=1",
             "-h", str(self.socket_dir), "-p", str(self.port), "-U", "memproxy", "-d", database,
             "-c", statement], check=True, capture_output=True, text=True, timeout=120)
        return result.stdout.strip()

    def new_database(self, owner: str = "memproxy") -> str:
        """A fresh, empty database; its name."""
        self.databases += 1
        name = f"test_{self.databases}_{int(time.time() * 1000) % 100000}"
        self.sql(f"CREATE DATABASE {name} OWNER {owner}")
        return name

    def dsn(self, database: str, *, tcp: bool = False) -> str:
        """A libpq connection string for ``database`` as the trusted ``memproxy`` role."""
        if tcp:
            return f"postgresql://memproxy@127.0.0.1:{self.port}/{database}"
        return f"host={self.socket_dir} port={self.port} dbname={database} user=memproxy"

    def close(self) -> None:
        if self.running():
            self.stop("immediate")
        shutil.rmtree(self.root, ignore_errors=True)
