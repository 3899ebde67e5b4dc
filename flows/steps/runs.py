"""The run record: started, rejected inputs, finished with its summary; and the dry run."""

from __future__ import annotations

import logging
from typing import Iterable

from sqlalchemy import func, select

from db.models import Generation, RejectedItem, Run, RunStatus, WorkStatus, utcnow
from db.session import transaction
from dreamcache.core.images import decode_image
from flows.params import CatalogueRunParams
from flows.platform import Platform
from flows.sources import list_source, read_uri
from flows.steps.prompts import load_prompts

logger = logging.getLogger(__name__)


def start_run(platform: Platform, params: CatalogueRunParams, flow_run_id: str | None = None,
              name: str | None = None) -> int:
    with transaction(platform.sessions) as s:
        if flow_run_id:  # a retried flow run continues its own record
            existing = s.scalar(select(Run).where(Run.flow_run_id == flow_run_id))
            if existing:
                existing.status, existing.finished_at, existing.error = RunStatus.running, None, None
                return existing.id
        run = Run(flow_run_id=flow_run_id, name=name, parameters=params.model_dump(mode="json"),
                  status=RunStatus.running, started_at=utcnow())
        s.add(run)
        s.flush()
        return run.id


def finish_run(platform: Platform, run_id: int, summary: dict, error: str | None = None) -> None:
    with transaction(platform.sessions) as s:
        run = s.get(Run, run_id)
        run.status = RunStatus.failed if error else RunStatus.completed
        run.finished_at, run.summary, run.error = utcnow(), summary, error


def reject(platform: Platform, run_id: int, stage: str, rejected: Iterable[tuple[str, str]]) -> None:
    rows = [dict(run_id=run_id, stage=stage, item=item[:1024], reason=reason) for item, reason in rejected]
    if rows:
        with transaction(platform.sessions) as s:
            s.execute(RejectedItem.__table__.insert(), rows)
        for row in rows:
            logger.warning("rejected at %s: %s: %s", stage, row["item"], row["reason"])


def summarise(platform: Platform, run_id: int, listed: int, subject_ids, cache_ids, planned: int,
              sheets: dict[str, str], output_prefix: str) -> dict:
    with transaction(platform.sessions) as s:
        counts = dict(s.execute(select(Generation.status, func.count()).where(Generation.run_id == run_id)
                                .group_by(Generation.status)).all())
        rejected = [dict(stage=r.stage, item=r.item, reason=r.reason)
                    for r in s.scalars(select(RejectedItem).where(RejectedItem.run_id == run_id).order_by(RejectedItem.id))]
    return dict(
        products_listed=listed, products_ingested=len(subject_ids), products_cached=len(cache_ids),
        rejected=len(rejected), rejections=rejected[:100], images_planned=planned,
        images_generated=counts.get(WorkStatus.done, 0), images_failed=counts.get(WorkStatus.failed, 0),
        images_open=counts.get(WorkStatus.pending, 0) + counts.get(WorkStatus.running, 0),
        contact_sheets=sheets, output=platform.objects.uri(output_prefix),
    )


def dry_run(platform: Platform, params: CatalogueRunParams) -> dict:
    """What a run would do: inputs listed and validated, prompts read, images counted; nothing written."""
    listing = list_source(params.source)
    bad = list(listing.rejected)
    for item in listing.items:
        try:
            decode_image(read_uri(item.uri), item.uri)
        except Exception as exc:
            bad.append((item.uri, str(exc)))
    good = len(listing.items) - (len(bad) - len(listing.rejected))
    prompts = load_prompts(params)
    return dict(dry_run=True, products_listed=len(listing.items), products_valid=good, rejected=len(bad),
                rejections=[dict(stage="ingest", item=i, reason=r) for i, r in bad[:100]], prompts=len(prompts),
                images_planned=good * len(prompts) * params.images_per_prompt)
