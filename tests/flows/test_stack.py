"""`dreamcache stack up`: PostgreSQL, S3 (moto) and a Prefect server whose database is on that PostgreSQL, each
answering at the settings it prints; `dreamcache stack down`, or Ctrl-C, stops them all and leaves no process,
port or folder behind."""

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import urllib.request
from pathlib import Path

import boto3
import psycopg
import pytest

ROOT = Path(__file__).resolve().parents[2]
GUARD_S = 600  # a hung stack is killed rather than hanging the suite (no bound on how long it takes)


def _environment(home: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DREAMCACHE_", "PREFECT_", "AWS_"))}
    env["DREAMCACHE_HOME"] = str(home)
    return env


def _processes() -> dict[int, tuple[str, int]]:
    """Every process: its command line and its parent."""
    found = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
                parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            found[int(entry.name)] = (command, parent)
    return found


def _answers(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(2)
        return s.connect_ex(("127.0.0.1", port)) == 0


@pytest.mark.parametrize("stop_with", ["stack down", "ctrl-c"])
def test_the_stack_starts_answers_and_stops_leaving_nothing(tmp_path, stop_with):
    env = _environment(tmp_path / "home")
    up = subprocess.Popen([sys.executable, "-m", "flows.cli", "stack", "up"], cwd=ROOT, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    guard = threading.Timer(GUARD_S, up.kill)
    guard.start()
    try:
        printed = ""
        for line in up.stdout:
            printed += line
            if line.startswith("Ctrl-C"):
                break
        exports = dict(re.findall(r"^export (\w+)=(\S+)$", printed, re.M))
        assert set(exports) == {"DREAMCACHE_DATABASE_URL", "DREAMCACHE_OBJECTS_URL", "AWS_ENDPOINT_URL",
                                "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION",
                                "PREFECT_API_URL"}, printed
        assert (tmp_path / "home" / "stack" / "env.sh").read_text() == "".join(
            f"export {k}={v}\n" for k, v in exports.items())

        # PostgreSQL: the platform's database, and Prefect's (its tables made by the Prefect server).
        database = exports["DREAMCACHE_DATABASE_URL"].replace("+psycopg", "")
        with psycopg.connect(database) as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)
        with psycopg.connect(database.rsplit("/", 1)[0] + "/prefect") as conn:
            assert conn.execute("SELECT count(*) FROM information_schema.tables WHERE table_name = 'flow_run'"
                                ).fetchone() == (1,)
        # S3: the bucket of DREAMCACHE_OBJECTS_URL, read and written.
        bucket, _, prefix = exports["DREAMCACHE_OBJECTS_URL"].removeprefix("s3://").partition("/")
        s3 = boto3.client("s3", endpoint_url=exports["AWS_ENDPOINT_URL"], region_name=exports["AWS_DEFAULT_REGION"],
                          aws_access_key_id=exports["AWS_ACCESS_KEY_ID"],
                          aws_secret_access_key=exports["AWS_SECRET_ACCESS_KEY"])
        s3.put_object(Bucket=bucket, Key=f"{prefix}/hello", Body=b"hi")
        assert s3.get_object(Bucket=bucket, Key=f"{prefix}/hello")["Body"].read() == b"hi"
        # Prefect: its API answers.
        with urllib.request.urlopen(exports["PREFECT_API_URL"] + "/health", timeout=10) as response:
            assert response.status == 200

        ports = [int(re.search(r":(\d+)", url.split("//")[-1]).group(1)) for url in (
            database, exports["AWS_ENDPOINT_URL"], exports["PREFECT_API_URL"])]
        assert all(_answers(port) for port in ports)
        before = _processes()
        # The programs themselves (not a helper that names the port on its way: runuser, pg_ctl, a shell), by their
        # whole ports (another test's server beside this one may have one that starts with the same digits).
        servers = {pid for pid, (command, _) in before.items()
                   if re.match(rf"\S*/bin/postgres .*-p {ports[0]}(\s|$)", command)
                   or re.match(rf"\S*python\S* -m prefect server start .*--port {ports[2]}(\s|$)", command)}
        # A backend PostgreSQL has just forked still shows its postmaster's command line until it names itself.
        servers = {pid for pid in servers if before[pid][1] not in servers}
        assert len(servers) == 2, "\n".join(f"{pid}: {before[pid]}" for pid in servers)  # postmaster, Prefect server
        started = set(servers)  # and everything they started: PostgreSQL's backends, the Prefect server's children
        while more := {pid for pid, (_, parent) in before.items() if parent in started} - started:
            started |= more
        assert len(started) > 2
        started = {pid: before[pid] for pid in started}
        # Their folders: PostgreSQL's cluster, and the stack's own (the Prefect server's home).
        (postmaster,) = [pid for pid in servers if " -D " in before[pid][0]]
        (prefect,) = servers - {postmaster}
        prefect_home = dict(line.split("=", 1) for line in Path(f"/proc/{prefect}/environ").read_bytes().decode(
            errors="replace").split("\0") if "=" in line)["PREFECT_HOME"]
        folders = [Path(re.search(r"-D (\S+)/data", before[postmaster][0]).group(1)), Path(prefect_home).parent]
        assert all(folder.is_dir() for folder in folders)

        if stop_with == "stack down":
            down = subprocess.run([sys.executable, "-m", "flows.cli", "stack", "down"], cwd=ROOT, env=env,
                                  capture_output=True, text=True, timeout=GUARD_S)
            assert down.returncode == 0 and f"stack stopped (process {up.pid})" in down.stdout, down
            assert up.poll() is not None  # `stack down` returns once the stack's process is gone
        else:
            up.send_signal(signal.SIGINT)
        rest = up.stdout.read()
        assert up.wait(timeout=GUARD_S) == 0, printed + rest
    finally:
        guard.cancel()
        if up.poll() is None:  # a failed assertion: the stack stops its servers on Ctrl-C (killed, it would leak them)
            up.send_signal(signal.SIGINT)
            try:
                up.wait(timeout=120)
            except subprocess.TimeoutExpired:
                up.kill()
    assert "stack stopped: PostgreSQL, S3 and the Prefect server are down" in rest

    after = _processes()
    assert [pid for pid, entry in started.items() if after.get(pid) == entry] == []
    assert not any(_answers(port) for port in ports)
    assert [folder for folder in folders if folder.exists()] == []
    assert not (tmp_path / "home" / "stack" / "pid").exists() and not (tmp_path / "home" / "stack" / "env.sh").exists()
    again = subprocess.run([sys.executable, "-m", "flows.cli", "stack", "down"], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=GUARD_S)
    assert again.returncode == 0 and "no stack is running" in again.stdout
