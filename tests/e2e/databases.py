"""Real database servers for the sink tests: Debian's PostgreSQL (initdb + pg_ctl in a
temporary directory, as the `postgres` user when run as root), on a free loopback port,
stopped at the end. Queries go through `psql`, which the package brings."""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path


def _bin(name: str) -> str:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"),
                   key=lambda p: int(p.split("/")[4]) if p.split("/")[4].isdigit() else 0)
    if not found:
        raise RuntimeError(f"PostgreSQL's {name} not found: scripts/test installs the postgresql package")
    return found[-1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Postgres:
    """One PostgreSQL server; superuser `freshet` (password `s3cret`, md5 over TCP)."""

    USER = "freshet"
    PASSWORD = "s3cret"

    def __init__(self):
        self.dir = Path(tempfile.mkdtemp(prefix="freshet-pg-"))
        self.data = self.dir / "data"
        self.port = free_port()
        self.as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []

    def _run(self, *cmd: str, check=True, **kw):
        return subprocess.run([*self.as_user, *cmd], check=check, capture_output=True, text=True, **kw)

    def start(self, settings: dict | None = None) -> "Postgres":
        """Starts the server (`settings`: more `-c name=value` of its configuration)."""
        if self.as_user:
            shutil.chown(self.dir, "postgres", "postgres")
        if not self.data.exists():
            pwfile = self.dir / "pw"
            pwfile.write_text(self.PASSWORD + "\n")
            if self.as_user:
                shutil.chown(pwfile, "postgres", "postgres")
            self._run(_bin("initdb"), "-D", str(self.data), "-U", self.USER, "--pwfile", str(pwfile),
                      "--auth-local=trust", "--auth-host=md5", "-E", "UTF8", "--no-sync")
        extra = "".join(f" -c {k}={v}" for k, v in (settings or {}).items())
        self._run(_bin("pg_ctl"), "-D", str(self.data), "-l", str(self.dir / "log"), "-w", "-t", "60",
                  "-o", f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1{extra}", "start")
        return self

    def stop(self, mode: str = "fast") -> None:
        self._run(_bin("pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "stop", check=False)

    def close(self) -> None:
        self.stop("immediate")
        shutil.rmtree(self.dir, ignore_errors=True)

    def url(self, db: str) -> str:
        return f"postgres://{self.USER}:{self.PASSWORD}@127.0.0.1:{self.port}/{db}"

    def psql(self, sql: str, db: str = "postgres") -> list[list[str]]:
        """Rows of `sql` (fields as text, NULL as '')."""
        out = subprocess.run(["psql", "-h", "127.0.0.1", "-p", str(self.port), "-U", self.USER, "-d", db,
                              "-v", "ON_ERROR_STOP=1", "-At", "-F", "\t", "-c", sql],
                             check=True, capture_output=True, text=True,
                             env={**os.environ, "PGPASSWORD": self.PASSWORD})
        return [line.split("\t") for line in out.stdout.splitlines()]

    def create_db(self, db: str) -> None:
        self.psql(f"CREATE DATABASE {db}")


class Redis:
    """One redis-server, durable at each write (appendfsync always), no password."""

    def __init__(self):
        self.dir = Path(tempfile.mkdtemp(prefix="freshet-redis-"))
        self.port = free_port()
        self.proc: subprocess.Popen | None = None

    def start(self) -> "Redis":
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.dir),
             "--appendonly", "yes", "--appendfsync", "always", "--save", "", "--daemonize", "no"],
            stdout=open(self.dir / "log", "ab"), stderr=subprocess.STDOUT)
        from helpers import wait_until
        wait_until(lambda: self._ping(), timeout=30, what="redis-server answering PING")
        return self

    def _ping(self) -> bool:
        try:
            return self.cli("PING") == ["PONG"]
        except subprocess.CalledProcessError:
            return False

    def url(self, db: int = 0) -> str:
        return f"redis://127.0.0.1:{self.port}/{db}"

    def cli(self, *args: str, db: int = 0) -> list[str]:
        out = subprocess.run(["redis-cli", "-h", "127.0.0.1", "-p", str(self.port), "-n", str(db), "--raw", *args],
                             check=True, capture_output=True, text=True, timeout=30)
        if out.stdout.startswith("ERR") or "Connection refused" in out.stderr:
            raise subprocess.CalledProcessError(1, args, out.stdout, out.stderr)
        return out.stdout.splitlines()

    def close(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(10)
        shutil.rmtree(self.dir, ignore_errors=True)
