"""Runs that tell the truth after a crash: signals end a run cleanly, dead owners are found at once, and a
run says `completed` only when nothing it planned is open (docs/reliability.md, "Liveness").

The runs are real `dreamcache run` processes or in-process runs on SQLite and a local object store; the
other workers are real processes too (a sleeping one is alive, an exited one is dead).
"""

import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import func, select, update
from typer.testing import CliRunner

from db.models import Generation, Run, SubjectCache, WorkStatus, utcnow
from flows.runs.catalogue import run_embedded
from flows.cli import EXIT_INCOMPLETE, EXIT_INTERRUPTED, EXIT_TERMINATED, app
from flows.platform.params import CatalogueRunParams
from tests.helpers import home_database

ROOT = Path(__file__).resolve().parents[2]
PROMPTS = ["a {category} on a beach", "a {category} in the snow"]
PLANNED = 3 * len(PROMPTS) * 2  # 3 products x 2 prompts x 2 images
STEPS = 12  # enough that a run is still generating when the test, polling the database, sees it mid-batch


def params(catalogue) -> CatalogueRunParams:
    return CatalogueRunParams(source=str(catalogue), prompts=PROMPTS, images_per_prompt=2, steps=STEPS, batch_size=2)


def cli_args(catalogue) -> list[str]:
    return ["run", "--embedded", "--source", str(catalogue), "--images-per-prompt", "2", "--steps", str(STEPS),
            "--batch-size", "2"] + [arg for p in PROMPTS for arg in ("-p", p)]


@pytest.fixture
def engine(platform_env, tmp_path):
    engine = home_database(tmp_path / "home")
    yield engine
    engine.dispose()


def counts(engine, model=Generation) -> dict[str, int]:
    with engine.connect() as db:
        return dict(db.execute(select(model.status, func.count()).group_by(model.status)).all())


def runs(engine) -> list:
    with engine.connect() as db:
        return db.execute(select(Run.id, Run.status, Run.error, Run.owner).order_by(Run.id)).all()


def dead_worker() -> str:
    """The name of a worker whose process has exited (on this host)."""
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    return f"{socket.gethostname()}:{gone.pid}"


def run_stopping(engine) -> None:
    """Wait until the run's first claims have been given back (it is stopping, not yet stopped)."""
    while True:
        with engine.connect() as db:
            if db.scalar(select(func.count()).where(Generation.status == "running")) < 2:
                return


def stop_mid_generation(catalogue, engine, signum, ignore_sigint: bool = False, times: int = 1) -> subprocess.CompletedProcess:
    """A `dreamcache run` in its own process, sent `signum` once it has finished some images and holds others.

    ignore_sigint: start it with SIGINT ignored, as a shell script's background job is."""
    run = subprocess.Popen([sys.executable, "-m", "flows.cli", *cli_args(catalogue)], cwd=ROOT, env=dict(os.environ),
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           preexec_fn=(lambda: signal.signal(signal.SIGINT, signal.SIG_IGN)) if ignore_sigint else None)
    me = f"{socket.gethostname()}:{run.pid}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and run.poll() is None:
        time.sleep(0.05)
        try:
            with engine.connect() as db:
                done = db.scalar(select(func.count()).where(Generation.status == "done"))
                mine = db.scalar(select(func.count()).where(Generation.status == "running", Generation.claimed_by == me))
        except Exception:
            continue  # the schema may not exist yet
        if done >= 2 and mine >= 1:  # images finished, and a batch of this process's in hand
            for n in range(times):
                run.send_signal(signum)
                if n + 1 < times:  # the next one while the run is stopping
                    run_stopping(engine)
            break
    output, _ = run.communicate(timeout=60)
    return subprocess.CompletedProcess(run.args, run.returncode, output.decode())


@pytest.mark.parametrize("signum, code, reason", [(signal.SIGTERM, EXIT_TERMINATED, "SIGTERM"),
                                                   (signal.SIGINT, EXIT_INTERRUPTED, "SIGINT")])
def test_a_signal_cancels_the_run_gives_its_claims_back_and_exits_with_its_code(catalogue, engine, signum, code, reason):
    stopped = stop_mid_generation(catalogue, engine, signum)
    assert stopped.returncode == code, stopped.stdout
    assert "the run is cancelled" in stopped.stdout
    (run,) = runs(engine)
    assert run.status == "cancelled" and reason in run.error
    left = counts(engine)
    assert "running" not in left and 2 <= left["done"] < PLANNED  # nothing held by the stopped process
    summary = run_embedded(params(catalogue), progress=False)  # at once: no lease to wait out
    assert summary["status"] == "completed" and summary["images_generated"] == PLANNED - left["done"]
    assert counts(engine) == {"done": PLANNED}


def test_sigint_cancels_a_run_started_with_it_ignored(catalogue, engine):
    stopped = stop_mid_generation(catalogue, engine, signal.SIGINT, ignore_sigint=True)
    assert stopped.returncode == EXIT_INTERRUPTED, stopped.stdout
    (run,) = runs(engine)
    assert run.status == "cancelled" and "SIGINT" in run.error


def test_a_killed_run_is_marked_crashed_and_a_rerun_takes_its_items_at_once(catalogue, engine, platform_env):
    # Leases far longer than the test: the re-run can finish only by finding the killed process gone, not by
    # waiting a lease out (a live holder's items would leave it incomplete, as the test below shows).
    platform_env.setenv("DREAMCACHE_LEASE_SECONDS", "3600")
    killed = stop_mid_generation(catalogue, engine, signal.SIGKILL)
    assert killed.returncode == -signal.SIGKILL, killed.stdout
    (run,) = runs(engine)
    assert run.status == "running"  # nobody has looked yet
    held = counts(engine)["running"]
    assert held >= 1
    with engine.connect() as db:  # the killed run's claims are far from expiring
        soonest = db.scalar(select(func.min(Generation.lease_expires_at)).where(Generation.status == "running"))
    assert soonest.replace(tzinfo=None) > utcnow().replace(tzinfo=None) + timedelta(minutes=50)
    summary = run_embedded(params(catalogue), progress=False)
    assert summary["status"] == "completed" and counts(engine) == {"done": PLANNED}
    dead, rerun = runs(engine)
    assert dead.status == "crashed" and f"its process {dead.owner} is gone" in dead.error
    assert rerun.status == "completed"


def test_caches_a_dead_process_held_are_computed_by_the_next_run(catalogue, engine):
    # The state a run killed while caching leaves: its caches claimed, with a lease that has not run out.
    first = run_embedded(params(catalogue).model_copy(update={"prompts": PROMPTS[:1]}), progress=False)
    assert first["status"] == "completed"
    with engine.begin() as db:
        db.execute(update(SubjectCache).values(status=WorkStatus.running, claimed_by=dead_worker(), tensor_uri=None,
                                               sha256=None, lease_expires_at=utcnow() + timedelta(minutes=10)))
    summary = run_embedded(params(catalogue), progress=False)
    assert summary["status"] == "completed" and summary["products_cached"] == 3
    assert counts(engine, SubjectCache) == {"done": 3} and counts(engine) == {"done": PLANNED}


def test_work_a_live_worker_holds_makes_the_run_incomplete_and_says_who_holds_it(catalogue, engine):
    assert run_embedded(params(catalogue), progress=False)["status"] == "completed"
    # Another worker, alive, holds two of the images (as if it had claimed them, mid-way through a batch).
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    holder = f"{socket.gethostname()}:{alive.pid}"
    try:
        with engine.begin() as db:
            ids = db.scalars(select(Generation.id).order_by(Generation.id.desc()).limit(2)).all()
            db.execute(update(Generation).where(Generation.id.in_(ids)).values(
                status=WorkStatus.running, claimed_by=holder, output_uri=None,
                lease_expires_at=utcnow() + timedelta(minutes=10)))
        result = CliRunner().invoke(app, cli_args(catalogue))
        assert result.exit_code == EXIT_INCOMPLETE, result.output
        assert "incomplete: 2 images and 0 product caches are still open" in result.output
        assert all(f"generation {i} held by {holder} until" in result.output for i in ids)
        assert runs(engine)[-1].status == "incomplete"
    finally:
        alive.kill()
        alive.wait()
    # The holder is gone now: the next run takes its two images over at once and completes.
    summary = run_embedded(params(catalogue), progress=False)
    assert summary["status"] == "completed" and summary["images_generated"] == 2
    assert counts(engine) == {"done": PLANNED}


def test_a_rerun_killed_too_leaves_nothing_the_third_run_cannot_finish(catalogue, engine):
    for _ in range(2):  # the run, and its re-run, each killed mid-generation
        killed = stop_mid_generation(catalogue, engine, signal.SIGKILL)
        assert killed.returncode == -signal.SIGKILL, killed.stdout
    summary = run_embedded(params(catalogue), progress=False)
    assert summary["status"] == "completed" and counts(engine) == {"done": PLANNED}
    first, second, third = runs(engine)
    assert (first.status, second.status, third.status) == ("crashed", "crashed", "completed")
    with engine.connect() as db:
        outputs = db.scalars(select(Generation.output_uri)).all()
    assert len(set(outputs)) == PLANNED  # each image once


def test_a_heartbeat_renews_what_its_worker_holds_and_its_runs(catalogue, engine):
    from flows.platform.resources import get_platform, worker_id

    summary = run_embedded(params(catalogue), progress=False)
    platform = get_platform()
    with engine.begin() as db:  # as if this process held two images and its run were still going
        ids = db.scalars(select(Generation.id).order_by(Generation.id).limit(2)).all()
        db.execute(update(Generation).where(Generation.id.in_(ids)).values(
            status=WorkStatus.running, claimed_by=worker_id(), lease_expires_at=utcnow()))
        db.execute(update(Run).values(status="running", heartbeat_at=utcnow() - timedelta(minutes=5)))
    platform.heartbeat.own(summary["run_id"])
    platform.heartbeat.beat()
    with engine.connect() as db:
        leases = db.scalars(select(Generation.lease_expires_at).where(Generation.id.in_(ids))).all()
        heartbeat = db.scalar(select(Run.heartbeat_at))
    soon = utcnow() + platform.lease - timedelta(seconds=5)
    assert all(lease.replace(tzinfo=soon.tzinfo) > soon for lease in leases)
    assert heartbeat.replace(tzinfo=soon.tzinfo) > utcnow() - timedelta(seconds=5)


def holds_the_write_lock(engine) -> bool:
    """Whether another process is inside a transaction on the SQLite file (each takes the write lock:
    db/session.py begins them IMMEDIATE)."""
    probe = sqlite3.connect(engine.url.database, timeout=0, isolation_level=None)
    try:
        probe.execute("BEGIN IMMEDIATE")
        probe.execute("ROLLBACK")
        return False
    except sqlite3.OperationalError:
        return True
    finally:
        probe.close()


def test_two_dreamcache_runs_at_once_on_sqlite_both_end_truthfully(catalogue, engine):
    # The first run is stopped (SIGSTOP) mid-generation while it holds images: alive, with a fresh heartbeat
    # and an hour's lease, so it is running for the whole of the second run, however long that takes.
    env = dict(os.environ, DREAMCACHE_LEASE_SECONDS="3600")
    first = subprocess.Popen([sys.executable, "-m", "flows.cli", *cli_args(catalogue)], cwd=ROOT, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    me = f"{socket.gethostname()}:{first.pid}"
    try:
        while first.poll() is None:
            time.sleep(0.05)
            try:
                with engine.connect() as db:
                    mine = db.scalar(select(func.count()).where(Generation.status == "running",
                                                                Generation.claimed_by == me))
            except Exception:
                continue  # the schema may not exist yet
            if mine:
                first.send_signal(signal.SIGSTOP)
                if not holds_the_write_lock(engine):
                    break
                first.send_signal(signal.SIGCONT)  # stopped inside a transaction: SQLite would stay locked
        second = subprocess.run([sys.executable, "-m", "flows.cli", *cli_args(catalogue)], cwd=ROOT, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=300)
    finally:
        first.send_signal(signal.SIGCONT)
    output = first.communicate(timeout=300)[0].decode()
    assert first.returncode == 0, output
    assert second.returncode == EXIT_INCOMPLETE, second.stdout.decode()
    assert "Traceback" not in second.stdout.decode() and f"held by {me} until" in second.stdout.decode()
    a, b = runs(engine)
    assert (a.status, b.status) == ("completed", "incomplete")  # neither taken for crashed: both were alive
    assert counts(engine) == {"done": PLANNED}
    with engine.connect() as db:
        assert len(set(db.scalars(select(Generation.output_uri)).all())) == PLANNED  # each image once


def test_a_run_without_a_heartbeat_for_longer_than_the_lease_is_crashed_on_sqlite(catalogue, engine):
    assert run_embedded(params(catalogue), progress=False)["status"] == "completed"
    with engine.begin() as db:  # a run of a worker on another host, silent for two hours
        db.execute(update(Run).values(status="running", owner="elsewhere:1",
                                      heartbeat_at=utcnow() - timedelta(hours=2)))
    assert run_embedded(params(catalogue), progress=False)["status"] == "completed"
    silent, rerun = runs(engine)
    assert silent.status == "crashed" and "no heartbeat from elsewhere:1 since" in silent.error


def test_a_second_sigterm_while_the_run_gives_its_claims_back_prints_no_traceback(catalogue, engine):
    stopped = stop_mid_generation(catalogue, engine, signal.SIGTERM, times=2)
    assert stopped.returncode == EXIT_TERMINATED, stopped.stdout
    assert "Traceback" not in stopped.stdout and "the run is cancelled" in stopped.stdout
    (run,) = runs(engine)
    assert run.status == "cancelled" and "running" not in counts(engine)
