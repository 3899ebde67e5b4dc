"""The platform's servers on one host without Docker: PostgreSQL (Debian's binaries), an S3 endpoint (moto) and a
Prefect server whose database is on that PostgreSQL.

`dreamcache stack up` runs them for trying the full path (docs/operations.md, "One host"), and the test suite
starts the same servers (tests/servers.py). Throwaway by design: trust authentication on 127.0.0.1, no fsync,
objects in moto's memory, everything in temporary folders that go when the servers stop. The stack that keeps
its data is infra/compose.yaml.
"""

from __future__ import annotations

import glob
import logging
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
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
        "(`make test` and `make stack` do this when run as root)"
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
        # A session of its own: the server pg_ctl leaves behind is not in the terminal's process group, so a
        # Ctrl-C reaches only the process that started it, which then stops it in order.
        subprocess.run([*prefix, *args], check=True, capture_output=True, text=True, start_new_session=True)

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
        from psycopg import sql

        with psycopg.connect(f"host=127.0.0.1 port={self.port} user=postgres dbname=postgres",
                             autocommit=True) as conn:
            # The name is data: psycopg quotes it as an identifier (composed, never a formatted string).
            conn.execute(sql.Composed([sql.SQL("CREATE DATABASE "), sql.Identifier(name)]))
        return self.url(name)

    def destroy(self, mode: str = "immediate") -> None:
        try:
            if (self.data / "postmaster.pid").exists():  # started, and not stopped already
                self.stop(mode)
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
        self.home.mkdir(parents=True, exist_ok=True)
        self.log = open(self.home / "server.log", "w")
        # `python -m prefect`: works wherever prefect imports, with or without its console script on PATH. A session
        # of its own, so that stopping it reaches whatever it starts, and a terminal's Ctrl-C does not.
        command = [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(self.port)]
        self.process = subprocess.Popen(command, env=self.env, stdout=self.log, stderr=subprocess.STDOUT,
                                        start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"prefect server exited: {(self.home / 'server.log').read_text()[-2000:]}")
            try:
                urllib.request.urlopen(f"{self.url}/health", timeout=2)
                return self
            except OSError:
                time.sleep(0.5)
        raise TimeoutError(f"prefect server did not answer in {timeout}s (its log: {self.home / 'server.log'})")

    def stop(self) -> None:
        if self.process:
            for sig, patience in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
                try:
                    os.killpg(self.process.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    self.process.wait(timeout=patience)
                    break
                except subprocess.TimeoutExpired:
                    continue
            self.log.close()
            self.process = None


# moto accepts any credentials; these keep a real AWS profile of the environment out of the way.
S3_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                  "AWS_DEFAULT_REGION": "us-east-1"}


class S3Server:
    """moto's S3 over real HTTP on a free port, served by a thread of this process; objects in memory."""

    def __init__(self):
        self.server = None
        self.endpoint = ""

    def start(self) -> "S3Server":
        from moto.server import ThreadedMotoServer

        logging.getLogger("werkzeug").setLevel(logging.WARNING)  # not a line per request
        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self.server.start()
        host, port = self.server.get_host_and_port()
        self.endpoint = f"http://{host}:{port}"
        return self

    def create_bucket(self, name: str) -> None:
        import boto3

        keys = dict(aws_access_key_id=S3_CREDENTIALS["AWS_ACCESS_KEY_ID"],
                    aws_secret_access_key=S3_CREDENTIALS["AWS_SECRET_ACCESS_KEY"])
        boto3.client("s3", endpoint_url=self.endpoint, region_name=S3_CREDENTIALS["AWS_DEFAULT_REGION"],
                     **keys).create_bucket(Bucket=name)

    def stop(self) -> None:
        if self.server:
            self.server.stop()
            self.server = None


BUCKET = "dreamcache"


class Stack:
    """The three servers together: the platform's database and Prefect's on one PostgreSQL, a bucket on S3."""

    def __init__(self):
        self.postgres: PostgresServer | None = None
        self.s3 = S3Server()
        self.prefect: PrefectServer | None = None
        self.dir = Path(tempfile.mkdtemp(prefix="dreamcache-stack-"))
        self.database_url = ""

    def start(self, prefect_timeout: float = 180) -> "Stack":
        """Start them all, or none: whatever started is stopped again if one fails (or on Ctrl-C)."""
        try:
            self.postgres = PostgresServer().start()
            self.database_url = self.postgres.create_database("dreamcache")
            prefect_database = self.postgres.create_database("prefect").replace("+psycopg:", "+asyncpg:")
            self.s3.start().create_bucket(BUCKET)
            self.prefect = PrefectServer(self.dir / "prefect", prefect_database)
            self.prefect.start(prefect_timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def environment(self) -> dict[str, str]:
        """The settings that point the platform, boto3 and Prefect's client at this stack."""
        return {"DREAMCACHE_DATABASE_URL": self.database_url, "DREAMCACHE_OBJECTS_URL": f"s3://{BUCKET}/platform",
                "AWS_ENDPOINT_URL": self.s3.endpoint, **S3_CREDENTIALS, "PREFECT_API_URL": self.prefect.url}

    def describe(self) -> list[str]:
        return [f"PostgreSQL on 127.0.0.1:{self.postgres.port} (databases dreamcache and prefect, user postgres)",
                f"S3 (moto) on {self.s3.endpoint} (bucket {BUCKET})",
                f"Prefect server on {self.prefect.url} (UI: {self.prefect.url.removesuffix('/api')})"]

    def alive(self) -> str | None:
        """None while every server runs, else which one has stopped."""
        if self.prefect and self.prefect.process and self.prefect.process.poll() is not None:
            return f"the Prefect server exited (its log: {self.prefect.home / 'server.log'})"
        if self.postgres and not (self.postgres.data / "postmaster.pid").exists():
            return "PostgreSQL stopped"
        return None

    def stop(self) -> None:
        """Prefect first (it uses PostgreSQL), then S3, then PostgreSQL; their folders go with them."""
        try:
            if self.prefect:
                self.prefect.stop()
            self.s3.stop()
        finally:
            if self.postgres:
                self.postgres.destroy(mode="fast")
            shutil.rmtree(self.dir, ignore_errors=True)


class StackState:
    """Where a running `dreamcache stack up` leaves its process id and settings (env.sh), for `stack down` and for
    other shells."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.pid_file = folder / "pid"
        self.env_file = folder / "env.sh"

    def running_pid(self) -> int | None:
        """The process of the stack that runs now, or None (no stack, or one that died without clearing up)."""
        try:
            pid = int(self.pid_file.read_text())
        except (OSError, ValueError):
            return None
        return pid if is_stack_process(pid) else None

    def write(self, pid: int, environment: dict[str, str]) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        self.env_file.write_text("".join(f"{line}\n" for line in export_lines(environment)))
        self.pid_file.write_text(f"{pid}\n")

    def clear(self) -> None:
        for path in (self.pid_file, self.env_file):
            path.unlink(missing_ok=True)


def is_stack_process(pid: int) -> bool:
    """Whether `pid` is a live `dreamcache stack up` (a recycled process id is not; an exited one, a zombie
    included, has no command line)."""
    try:
        command = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return False
    return " stack up" in command


def export_lines(environment: dict[str, str]) -> list[str]:
    return [f"export {name}={shlex.quote(value)}" for name, value in environment.items()]
