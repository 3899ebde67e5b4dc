"""Real servers for the tests: Debian's PostgreSQL, started and stopped by the suite."""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def postgres_bin_dir() -> Path:
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(p.split("/")[-2]))
    if candidates:
        return Path(candidates[-1])
    initdb = shutil.which("initdb")
    if initdb:
        return Path(initdb).parent
    raise RuntimeError(
        "PostgreSQL server binaries (initdb, pg_ctl) not found: install them with `apt-get install postgresql` "
        "(`make test` does this when run as root)"
    )


class PostgresServer:
    """A throwaway cluster on a free port, trust authentication, no fsync."""

    def __init__(self):
        self.bin = postgres_bin_dir()
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="dreamcache-pg-"))
        self.data = self.dir / "data"
        self.as_root = os.geteuid() == 0  # initdb refuses root: run the server as the postgres user

    def _run(self, *args: str) -> None:
        prefix = ["runuser", "-u", "postgres", "--"] if self.as_root else []
        subprocess.run([*prefix, *args], check=True, capture_output=True, text=True)

    def start(self) -> "PostgresServer":
        if self.as_root:
            shutil.chown(self.dir, "postgres", "postgres")
        self._run(str(self.bin / "initdb"), "-D", str(self.data), "--auth=trust", "--no-sync", "-U", "postgres")
        self.resume()
        return self

    def resume(self) -> None:
        options = f"-h 127.0.0.1 -p {self.port} -k {self.dir} -F -c max_connections=200"
        self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-w", "-l", str(self.dir / "log"), "-o", options,
                  "start")

    def stop(self, mode: str = "fast") -> None:
        self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-w", "-m", mode, "stop")

    def url(self, database: str = "postgres") -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{database}"

    def create_database(self, name: str) -> str:
        import psycopg

        with psycopg.connect(f"host=127.0.0.1 port={self.port} user=postgres dbname=postgres",
                             autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def destroy(self) -> None:
        try:
            self.stop("immediate")
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)


class PrefectServer:
    """`prefect server start` on a free port with its own PREFECT_HOME, and its database there (SQLite) or the one
    given (`postgresql+asyncpg://...`, as the compose stack has it)."""

    def __init__(self, home: Path, database_url: str | None = None):
        self.port = free_port()
        self.home = home
        self.url = f"http://127.0.0.1:{self.port}/api"
        self.env = dict(os.environ, PREFECT_HOME=str(home), PREFECT_API_URL=self.url,
                        PREFECT_SERVER_ANALYTICS_ENABLED="false", DO_NOT_TRACK="1",
                        PREFECT_UI_API_URL=self.url, PREFECT_SERVER_LOGGING_LEVEL="WARNING")
        if database_url:
            self.env["PREFECT_API_DATABASE_CONNECTION_URL"] = database_url
        self.process = None

    def start(self, timeout: float = 90) -> "PrefectServer":
        import sys
        import time
        import urllib.request

        self.log = open(self.home / "server.log", "w")
        # `python -m prefect`: works wherever prefect imports, with or without its console script on PATH.
        command = [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(self.port)]
        self.process = subprocess.Popen(command, env=self.env, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"prefect server exited: {(self.home / 'server.log').read_text()[-2000:]}")
            try:
                urllib.request.urlopen(f"{self.url}/health", timeout=2)
                return self
            except OSError:
                time.sleep(0.5)
        raise TimeoutError(f"prefect server did not answer in {timeout}s")

    def stop(self) -> None:
        if self.process:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
            self.log.close()
