"""`dreamcache worker` stops gracefully on SIGTERM, as Kubernetes sends it (docs/reliability.md, "Error catalogue"):
it takes no more work, finishes what it holds, says so and exits 143; nothing it held is lost or left claimed."""

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from sqlalchemy import func, select

from db.models import Generation
from tests.helpers import home_database

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def worker_env(prefect_server, platform_env, tmp_path):
    platform_env.setenv("PREFECT_API_URL", prefect_server.url)
    # Under Prefect the stores are named, here the embedded ones on purpose (flows.platform.resources.require_named_stores).
    platform_env.setenv("DREAMCACHE_DATABASE_URL", f"sqlite:///{tmp_path / 'home' / 'dreamcache.db'}")
    platform_env.setenv("DREAMCACHE_OBJECTS_URL", str(tmp_path / "home" / "objects"))
    platform_env.setenv("PREFECT_HOME", str(prefect_server.home))
    return platform_env


def start_worker(log: Path) -> subprocess.Popen:
    """A `dreamcache worker` process, once it is subscribed to the server (its model loaded)."""
    out = open(log, "w")
    worker = subprocess.Popen([sys.executable, "-m", "flows.cli", "worker"], cwd=ROOT, env=dict(os.environ),
                              stdout=out, stderr=subprocess.STDOUT)
    out.close()
    deadline = time.monotonic() + 120
    while "Subscribing to runs" not in log.read_text():
        assert worker.poll() is None and time.monotonic() < deadline, log.read_text()
        time.sleep(0.2)
    return worker


def stop(worker: subprocess.Popen, log: Path, patience_s: float = 300) -> None:
    """SIGTERM, then wait for the worker to exit (`patience_s` only keeps a worker that ignores it from hanging
    the suite: it is no speed bound)."""
    worker.send_signal(signal.SIGTERM)
    try:
        worker.wait(timeout=patience_s)
    except subprocess.TimeoutExpired:
        worker.kill()
        pytest.fail(f"the worker ignored SIGTERM for {patience_s}s: {log.read_text()[-2000:]}")


def test_an_idle_worker_stops_on_sigterm_with_its_code_and_no_traceback(worker_env, tmp_path):
    log = tmp_path / "worker.log"
    worker = start_worker(log)
    stop(worker, log)
    output = log.read_text()
    assert worker.returncode == 143, output  # its own handler's code: the signal's default would be -15
    assert "worker stopped by SIGTERM: took no more work and finished the batches it held" in output
    assert "Traceback" not in output


def test_a_worker_stopped_mid_batch_finishes_what_it_holds_and_loses_nothing(worker_env, catalogue, tmp_path):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.runs.catalogue import catalogue_run
    from flows.platform.params import CatalogueRunParams

    engine = home_database(tmp_path / "home")
    first_log, second_log = tmp_path / "first.log", tmp_path / "second.log"
    first = start_worker(first_log)
    name = f"{socket.gethostname()}:{first.pid}"
    params = CatalogueRunParams(source=str(catalogue), prompts=["a {category} on a beach"], images_per_prompt=4,
                                steps=2, batch_size=1, execution="task-workers")  # 3 tasks of 4 batches
    result = {}

    def run():  # in a thread of its own, so that a run waiting forever for a lost batch fails the test
        with temporary_settings(updates={PREFECT_API_URL: os.environ["PREFECT_API_URL"]}):
            result["summary"] = catalogue_run(params)

    flow = threading.Thread(target=run, daemon=True)
    flow.start()
    second = None
    try:
        deadline, held = time.monotonic() + 240, 0
        while time.monotonic() < deadline and not held:
            time.sleep(0.05)
            try:
                with engine.connect() as db:
                    held = db.scalar(select(func.count()).where(Generation.status == "running",
                                                                Generation.claimed_by == name))
            except Exception:
                continue  # the schema may not exist yet
        assert held, first_log.read_text()
        stop(first, first_log, patience_s=120)  # mid-batch
        with engine.connect() as db:
            left_running = db.scalar(select(func.count()).where(Generation.status == "running",
                                                                Generation.claimed_by == name))
            done_by_first = db.scalar(select(func.count()).where(Generation.status == "done",
                                                                 Generation.claimed_by == name))
        second = start_worker(second_log)
        flow.join(timeout=240)
        assert not flow.is_alive(), "the run still waits for a batch the stopped worker took and never ran"
    finally:
        for process in (first, second):
            if process is not None and process.poll() is None:
                process.send_signal(signal.SIGTERM)
                process.wait(timeout=60)
    summary = result["summary"]
    output = first_log.read_text()
    assert first.returncode == 143, output
    assert "worker stopped by SIGTERM" in output and "Traceback" not in output
    assert left_running == 0 and done_by_first >= held  # it finished what it held
    assert summary["images_generated"] == 12 and summary["status"] == "completed"
    with engine.connect() as db:
        statuses = db.execute(select(Generation.status, func.count()).group_by(Generation.status)).all()
        workers = set(db.scalars(select(Generation.claimed_by).distinct()).all())
    assert dict(statuses) == {"done": 12}
    assert name in workers and len(workers) == 2  # the second worker made the rest
    assert second.returncode == 143
    engine.dispose()
