"""Claiming work items so that concurrent workers never hold the same one.

A claim is one atomic UPDATE over a sub-select of claimable rows (pending, or running with an
expired lease), returning the claimed ids:

- PostgreSQL: the sub-select locks its rows `FOR UPDATE SKIP LOCKED`, so two workers claiming at
  once each get different rows, neither waits for the other.
- SQLite has no row locks: every transaction starts with `BEGIN IMMEDIATE` (db.session), so
  claims run one after another, each seeing the previous one's result. Same guarantee, serialised.

Status changes after a claim are conditional on still holding it (same worker, status running):
a worker whose lease expired and whose item was claimed again cannot overwrite the new owner's
result. Leases are renewed by `heartbeat`. How long a lease lasts is the caller's (the platform's
setting `lease_seconds`); this module sets no default of its own.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Sequence, TypeVar

from sqlalchemy import or_, select, update
from sqlalchemy.orm import Session

from db.models import WorkItem, WorkStatus, utcnow

Item = TypeVar("Item", bound=WorkItem)

class LostClaimError(RuntimeError):
    """The item is no longer held by this worker (its lease expired and someone else claimed it)."""


def claim(
    session: Session,
    model: type[Item],
    worker: str,
    limit: int,
    lease: timedelta,
    where: Sequence = (),
    now: datetime | None = None,
    dead_owners: Sequence[str] = (),
) -> list[int]:
    """Claim up to `limit` items of `model` matching `where`; returns their ids, oldest first.

    Claimable: pending items, running items whose lease expired, and running items of `dead_owners`
    (workers known to be dead, whose leases need not be waited out)."""
    now = now or utcnow()
    taken_over = (model.status == WorkStatus.running) & (model.lease_expires_at < now)
    if dead_owners:
        taken_over = taken_over | ((model.status == WorkStatus.running) & model.claimed_by.in_(list(dead_owners)))
    claimable = (
        select(model.id)
        .where(
            or_(model.status == WorkStatus.pending, taken_over),
            *where,
        )
        .order_by(model.id)
        .limit(limit)
        .with_for_update(skip_locked=True)  # rendered on PostgreSQL; SQLite serialises instead
    )
    claimed = session.execute(
        update(model)
        .where(model.id.in_(claimable.scalar_subquery()))
        .values(
            status=WorkStatus.running,
            claimed_by=worker,
            lease_expires_at=now + lease,
            attempts=model.attempts + 1,
            started_at=now,
            error=None,
        )
        .returning(model.id)
        .execution_options(synchronize_session=False)
    ).scalars()
    return sorted(claimed)


def _held(model: type[Item], item_id: int, worker: str):
    return (model.id == item_id) & (model.status == WorkStatus.running) & (model.claimed_by == worker)


def complete(session: Session, model: type[Item], item_id: int, worker: str, **values) -> None:
    """Mark a held item done, with its result columns, in one conditional UPDATE."""
    _transition(session, model, item_id, worker, status=WorkStatus.done, lease_expires_at=None,
                finished_at=utcnow(), **values)


def fail(session: Session, model: type[Item], item_id: int, worker: str, error: str) -> None:
    """Mark a held item failed with its reason; a later run may retry it (see `retry_failed`)."""
    _transition(session, model, item_id, worker, status=WorkStatus.failed, lease_expires_at=None,
                finished_at=utcnow(), error=error[:4000])


def heartbeat(session: Session, model: type[Item], ids: Sequence[int], worker: str, lease: timedelta) -> int:
    """Extend the lease of items this worker still holds; returns how many it holds."""
    result = session.execute(
        update(model)
        .where(model.id.in_(list(ids)), model.status == WorkStatus.running, model.claimed_by == worker)
        .values(lease_expires_at=utcnow() + lease)
        .execution_options(synchronize_session=False)
    )
    return result.rowcount


def renew_all(session: Session, model: type[Item], worker: str, lease: timedelta) -> int:
    """Extend the lease of every item `worker` holds (its heartbeat); returns how many it holds."""
    result = session.execute(
        update(model)
        .where(model.status == WorkStatus.running, model.claimed_by == worker)
        .values(lease_expires_at=utcnow() + lease)
        .execution_options(synchronize_session=False)
    )
    return result.rowcount


def release_all(session: Session, model: type[Item], worker: str, ids: Sequence[int] | None = None) -> int:
    """Give back the items `worker` holds (all, or those of `ids`): pending again, the attempt not counted.
    For a worker that stops, or a step that ends without finishing what it claimed."""
    where = [model.status == WorkStatus.running, model.claimed_by == worker]
    if ids is not None:
        where.append(model.id.in_(list(ids)))
    result = session.execute(
        update(model).where(*where)
        .values(status=WorkStatus.pending, claimed_by=None, lease_expires_at=None, attempts=model.attempts - 1)
        .execution_options(synchronize_session=False)
    )
    return result.rowcount


def holders(session: Session, model: type[Item], where: Sequence = ()) -> list[str]:
    """The workers holding running items of `model` matching `where`."""
    return sorted(session.scalars(select(model.claimed_by).where(model.status == WorkStatus.running, *where)
                                  .distinct()))


def retry_failed(session: Session, model: type[Item], where: Sequence = ()) -> int:
    """Put failed items back to pending (a re-run does the missing work, failed included)."""
    result = session.execute(
        update(model)
        .where(model.status == WorkStatus.failed, *where)
        .values(status=WorkStatus.pending, claimed_by=None, lease_expires_at=None)
        .execution_options(synchronize_session=False)
    )
    return result.rowcount


def _transition(session: Session, model: type[Item], item_id: int, worker: str, **values) -> None:
    result = session.execute(
        update(model).where(_held(model, item_id, worker)).values(**values).execution_options(synchronize_session=False)
    )
    if result.rowcount != 1:
        raise LostClaimError(f"{model.__tablename__} {item_id} is no longer held by {worker}")
