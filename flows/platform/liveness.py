"""Who is alive: heartbeats for this process's runs and claims, and the dead found out.

A worker is named "host:pid" (`platform.worker_id`). While it lives, a background thread renews
the leases of everything it holds and the heartbeat of the runs it owns, every quarter of the lease
(`DREAMCACHE_LEASE_SECONDS`, a minute by default). A worker is dead when its heartbeat is older
than the lease, or, at once, when it ran on this host and its process is gone: its items can be
claimed again without waiting, and its runs are marked `crashed`.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from datetime import timedelta
from typing import Iterable, Sequence

from sqlalchemy import select, update

from db import claims
from db.models import Generation, Run, RunStatus, Subject, SubjectCache, WorkStatus, utcnow
from db.session import transaction

logger = logging.getLogger(__name__)

WORK_ITEMS = (SubjectCache, Generation)


class Cancelled(BaseException):
    """The process was asked to stop (SIGTERM): a BaseException, so that no step's handler for its own
    errors takes it for one; the run gives its claims back and ends `cancelled`."""


def process_gone(worker: str) -> bool:
    """True when `worker` ("host:pid") ran on this host and its process no longer exists.

    Workers on other hosts cannot be checked from here: for them only the heartbeat tells.
    """
    host, _, pid = worker.rpartition(":")
    if host != socket.gethostname() or not pid.isdigit() or int(pid) == os.getpid():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    return False


def dead_owners(session, model) -> list[str]:
    """The holders of `model` items known dead now (their process gone on this host)."""
    return [worker for worker in claims.holders(session, model) if process_gone(worker)]


def mark_dead_runs(session, lease: timedelta) -> list[int]:
    """Mark `crashed` the running runs whose owner is dead; returns their ids."""
    now = utcnow()
    crashed = []
    for run in session.scalars(select(Run).where(Run.status == RunStatus.running)):
        if run.owner and process_gone(run.owner):
            reason = f"crashed: its process {run.owner} is gone"
        elif run.heartbeat_at is not None and run.heartbeat_at < now - lease:
            reason = f"crashed: no heartbeat from {run.owner} since {run.heartbeat_at.isoformat(timespec='seconds')}"
        else:
            continue
        run.status, run.finished_at, run.error = RunStatus.crashed, now, reason
        crashed.append(run.id)
        logger.warning("run %d %s", run.id, reason)
    return crashed


class Heartbeat:
    """Renews this worker's leases and its runs' heartbeats in the background while the process lives."""

    def __init__(self, sessions, worker: str, lease: timedelta):
        self.sessions, self.worker, self.lease = sessions, worker, lease
        self.runs: set[int] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._stop.clear()
            self._thread = threading.Thread(target=self._loop, name="dreamcache-heartbeat", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def own(self, run_id: int) -> None:
        with self._lock:
            self.runs.add(run_id)

    def disown(self, run_id: int) -> None:
        with self._lock:
            self.runs.discard(run_id)

    def beat(self) -> None:
        """One renewal: every lease this worker holds, every run it owns."""
        with self._lock:
            runs: Iterable[int] = sorted(self.runs)
        with transaction(self.sessions) as s:
            for model in WORK_ITEMS:
                claims.renew_all(s, model, self.worker, self.lease)
            if runs:
                s.execute(update(Run).where(Run.id.in_(runs), Run.status == RunStatus.running)
                          .values(heartbeat_at=utcnow()).execution_options(synchronize_session=False))

    def _loop(self) -> None:
        interval = self.lease.total_seconds() / 4
        while not self._stop.wait(interval):
            try:
                self.beat()
            except Exception as exc:  # the database away for a moment: the next beat tries again
                logger.warning("heartbeat of %s failed: %s", self.worker, exc)


def held_items(session, run_id: int, cache_ids: Sequence[int] = (), limit: int = 20) -> list[dict]:
    """What of a run's work other workers hold, first the product caches among `cache_ids` (its products'
    caches still open), then its images: each item, its holder, the run that holder is running (None when it
    runs none: a task worker) and when its lease ends."""
    caches = session.execute(
        select(SubjectCache.id, Subject.sku, SubjectCache.claimed_by, SubjectCache.lease_expires_at)
        .join(Subject, Subject.id == SubjectCache.subject_id)
        .where(SubjectCache.id.in_(list(cache_ids)), SubjectCache.status == WorkStatus.running)
        .order_by(SubjectCache.id).limit(limit)).all()
    images = session.execute(
        select(Generation.id, Generation.claimed_by, Generation.lease_expires_at)
        .where(Generation.run_id == run_id, Generation.status == WorkStatus.running)
        .order_by(Generation.id).limit(limit)).all()
    held = [(f"cache {i} of {sku}", worker, expiry) for i, sku, worker, expiry in caches]
    held += [(f"generation {i}", worker, expiry) for i, worker, expiry in images]
    held = held[:limit]
    runs = dict(session.execute(select(Run.owner, Run.id).where(
        Run.status == RunStatus.running, Run.owner.in_({worker for _, worker, _ in held}))).all())
    return [dict(item=item, held_by=worker, run=runs.get(worker),
                 free_at=expiry.isoformat(timespec="seconds") if expiry else None) for item, worker, expiry in held]


def held_line(held: dict) -> str:
    """One held item as the CLI and a run's log say it."""
    run = f" (run {held['run']})" if held["run"] is not None else ""
    return f"{held['item']} held by {held['held_by']} until {held['free_at']}{run}"
