"""The run record: started, rejected inputs, finished with its summary; and the dry run."""

from __future__ import annotations

import logging
from typing import Iterable, Sequence

from sqlalchemy import func, select

from db import claims, queries
from db.models import Generation, RejectedItem, ReviewState, Run, RunStatus, WorkStatus, utcnow
from db.session import transaction
from dreamcache.core.images import decode_image
from flows.platform import liveness
from flows.platform.params import CatalogueRunParams
from flows.platform.resources import Platform, worker_id
from flows.steps.source import MAX_IMAGE_BYTES
from flows.steps.run_summary import DryRunSummary, Rejection, RunSummary

logger = logging.getLogger(__name__)


def start_run(platform: Platform, params: CatalogueRunParams, flow_run_id: str | None = None,
              name: str | None = None) -> int:
    """The run's record, owned by this process and kept alive by its heartbeat; runs whose owner died
    are marked `crashed` first (their claims are free to take: see `liveness`)."""
    me, now = worker_id(), utcnow()
    with transaction(platform.sessions) as s:
        liveness.mark_dead_runs(s, platform.lease)
        run = s.scalar(select(Run).where(Run.flow_run_id == flow_run_id)) if flow_run_id else None
        if run:  # a retried flow run continues its own record
            run.status, run.finished_at, run.error = RunStatus.running, None, None
            run.owner, run.heartbeat_at = me, now
        else:
            run = Run(flow_run_id=flow_run_id, name=name, parameters=params.model_dump(mode="json"),
                      status=RunStatus.running, started_at=now, owner=me, heartbeat_at=now)
            s.add(run)
            s.flush()
        run_id = run.id
    platform.heartbeat.own(run_id)
    return run_id


def finish_run(platform: Platform, run_id: int, summary: RunSummary | dict, error: str | None = None,
               status: RunStatus | None = None) -> RunStatus:
    """Record how the run ended: `failed` with an error, else `completed` when nothing it planned is open
    (done, or failed with a reason) and `incomplete` when something is, or the `status` given. A run that
    worked records its RunSummary (its status set here); one that failed or was cancelled, what it knows."""
    with transaction(platform.sessions) as s:
        run = s.get(Run, run_id)
        if status is None:
            open_work = summary.open_work if isinstance(summary, RunSummary) else 0
            status = RunStatus.failed if error else RunStatus.incomplete if open_work else RunStatus.completed
        if isinstance(summary, RunSummary):
            summary.status = status.value
            record = summary.as_record()
        else:
            record = {**summary, "status": status.value}
        run.status, run.finished_at, run.summary, run.error = status, utcnow(), record, error
    platform.heartbeat.disown(run_id)
    return status


def cancel_run(platform: Platform, run_id: int, reason: str) -> int:
    """A run stopped by a signal: every item this process holds given back, the run `cancelled`;
    returns how many items were given back."""
    me = worker_id()
    with transaction(platform.sessions) as s:
        released = sum(claims.release_all(s, model, me) for model in liveness.WORK_ITEMS)
    finish_run(platform, run_id, {"cancelled": reason, "released": released}, error=reason, status=RunStatus.cancelled)
    logger.warning("run %d cancelled (%s): %d claimed items given back", run_id, reason, released)
    return released


# A run's log names the first rejections of each stage; a manifest of 10,000 bad rows is one line more.
LOGGED_REJECTIONS = 20


def reject(platform: Platform, run_id: int, stage: str, rejected: Iterable[tuple[str, str]]) -> None:
    rows = [dict(run_id=run_id, stage=stage, item=item[:1024], reason=reason) for item, reason in rejected]
    if rows:
        with transaction(platform.sessions) as s:
            s.execute(RejectedItem.__table__.insert(), rows)
        for row in rows[:LOGGED_REJECTIONS]:
            logger.warning("rejected at %s: %s: %s", stage, one_line(row["item"]), one_line(row["reason"]))
        if len(rows) > LOGGED_REJECTIONS:
            logger.warning("rejected at %s: %d more; every one is in rejected_items (run %s)", stage,
                           len(rows) - LOGGED_REJECTIONS, run_id)


def one_line(text: str) -> str:
    """`text` fit for one log line: a newline or other control character in a file name shown escaped."""
    return text if text.isprintable() else text.encode("unicode_escape").decode("ascii")


def summarise(platform: Platform, run_id: int, listed: int, subject_ids, cache_ids, planned: int,
              sheets: dict[str, str], output_prefix: str, caches_open: Sequence[int] = (), *, already_made: int = 0,
              repaired: int = 0, assets: dict[str, list[str]] | None = None,
              skipped: Sequence[str] = ()) -> RunSummary:
    """The run's summary: what the orchestration counted, and what the database says of the run's shots;
    `caches_open`: the ids of its products' caches still unfinished (held elsewhere)."""
    with transaction(platform.sessions) as s:
        counts = dict(s.execute(select(Generation.status, func.count()).where(Generation.run_id == run_id)
                                .group_by(Generation.status)).all())
        held = liveness.held_items(s, run_id, caches_open)
        rejected = [Rejection(stage=r.stage, item=r.item, reason=r.reason)
                    for r in s.scalars(select(RejectedItem).where(RejectedItem.run_id == run_id).order_by(RejectedItem.id))]
        products, review = queries.best_scores(s, run_id), review_counts(s, run_id)
        not_found = queries.shots_without_masked_scores(s, run_id)
    return RunSummary(
        run_id=run_id, products_listed=listed, products_ingested=len(subject_ids), products_cached=len(cache_ids),
        rejected=len(rejected), rejections=rejected[:100], files_skipped=len(skipped), skipped=list(skipped[:20]),
        images_planned=planned, images_already_made=already_made, shots_repaired=repaired,
        images_generated=counts.get(WorkStatus.done, 0), images_failed=counts.get(WorkStatus.failed, 0),
        images_open=counts.get(WorkStatus.pending, 0) + counts.get(WorkStatus.running, 0),
        caches_open=len(caches_open), held=held, output=platform.objects.uri(output_prefix), contact_sheets=sheets,
        assets=assets or {}, products=products, products_not_found=not_found, review=review)


def review_counts(session, run_id: int) -> dict[str, int]:
    """How many of the run's done shots are approved, rejected, and waiting for review."""
    counts = {state.value: 0 for state in ReviewState}
    for state, n in session.execute(select(Generation.review, func.count())
                                    .where(Generation.run_id == run_id, Generation.status == WorkStatus.done)
                                    .group_by(Generation.review)).all():
        counts[ReviewState(state).value] = n
    return counts


def record(platform: Platform, summary: RunSummary) -> None:
    """The run's summary again, with facts learned after its record was finished (its review, its publication)."""
    with transaction(platform.sessions) as s:
        s.get(Run, summary.run_id).summary = summary.as_record()


def dry_run(params: CatalogueRunParams, inputs) -> DryRunSummary:
    """What a run would do: inputs listed and validated (`catalogue.prepare`), every image read and decoded,
    images counted; nothing written."""
    listing, prompts, places = inputs
    bad = list(listing.rejected) + list(prompts.rejected)
    good = 0
    for item in listing.items:
        try:
            decode_image(places.read(item.uri, item.uri, limit=MAX_IMAGE_BYTES), item.uri)
            good += 1
        except Exception as exc:
            bad.append((item.uri, str(exc)))
    return DryRunSummary(
        products_listed=len(listing.items) + len(listing.rejected), products_valid=good, rejected=len(bad),
        rejections=[Rejection(stage="inputs", item=i, reason=r) for i, r in bad[:100]],
        files_skipped=len(listing.skipped), skipped=listing.skipped[:20], prompts=len(prompts.templates),
        images_planned=good * len(prompts.templates) * params.images_per_prompt * len(params.shop_formats))
