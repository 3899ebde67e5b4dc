"""Ingest: each product image read, checked and recorded once per (SKU, content)."""

from __future__ import annotations

from typing import Sequence

from sqlalchemy import func, select, update

from db.models import SUPERSEDED, Generation, ReviewState, Subject, SubjectCache, utcnow
from db.repository import ids_by_key, insert_missing
from db.session import transaction
from dreamcache.core.errors import DreamCacheError
from dreamcache.core.images import decode_image
from flows.platform.resources import Platform
from flows.platform.places import Places
from flows.steps.source import MAX_IMAGE_BYTES, SourceItem
from flows.steps.run_record import reject
from flows.steps.layout import product_key
from flows.steps.shared import sha256


def ingest(platform: Platform, run_id: int, items: Sequence[SourceItem], places: Places) -> list[int]:
    """Read and validate each image, keep a copy of it in the object store, record each product once per
    (SKU, content); bad images, and images outside the run's `places`, are rejected. A product already known
    takes its category and manifest columns from this source: they are the source's, whatever came before.

    Every later step reads the copy, never the source again: a source file changed or deleted during
    the run cannot give a product another image than the one its content hash names.
    """
    rows, rejected = [], []
    for item in items:
        try:
            data = places.read(item.uri, item.uri, limit=MAX_IMAGE_BYTES)
            decode_image(data, item.uri)
        except DreamCacheError as exc:
            rejected.append((item.uri, str(exc)))
            continue
        except Exception as exc:  # unreachable URI, permissions, ...: this item only
            rejected.append((item.uri, f"cannot be read: {exc}"))
            continue
        digest = sha256(data)
        if not platform.objects.exists(product_key(digest)):
            platform.objects.put(product_key(digest), data)  # the copy first, then the row that names it
        rows.append(dict(sku=item.sku, category=item.category, source_uri=item.uri, content_sha256=digest,
                         attributes=item.attributes))
    reject(platform, run_id, "ingest", rejected)
    with transaction(platform.sessions) as s:
        insert_missing(s, Subject, rows)
        ids = ids_by_key(s, Subject, ["sku", "content_sha256"], [(r["sku"], r["content_sha256"]) for r in rows])
        known = {row.id: (row.category, row.attributes) for row in
                 s.execute(select(Subject.id, Subject.category, Subject.attributes).where(Subject.id.in_(ids.values())))}
        for r in rows:
            subject_id = ids[(r["sku"], r["content_sha256"])]
            if known[subject_id] != (r["category"], r["attributes"]):
                s.execute(update(Subject).where(Subject.id == subject_id)
                          .values(category=r["category"], attributes=r["attributes"]))
        supersede(s, {r["sku"]: r["content_sha256"] for r in rows})
    return sorted(set(ids.values()))


def supersede(s, current: dict[str, str]) -> None:
    """The rule for a changed source image: the image a SKU was last ingested with is its product. The shots
    of its other images are kept (nothing made is lost) but superseded: rejected for review and publishing
    (`reviewed_by` "superseded", the note says why), and left off the contact sheet. Shots superseded earlier
    whose image is current again go back to pending review."""
    changed = set(s.scalars(select(Subject.sku).where(Subject.sku.in_(list(current)))
                            .group_by(Subject.sku).having(func.count() > 1)))
    now = utcnow()
    for sku in sorted(changed):
        shots = (select(Generation.id).join(SubjectCache, SubjectCache.id == Generation.subject_cache_id)
                 .join(Subject, Subject.id == SubjectCache.subject_id).where(Subject.sku == sku))
        s.execute(update(Generation).where(
            Generation.id.in_(shots.where(Subject.content_sha256 != current[sku])),
            Generation.reviewed_by.is_distinct_from(SUPERSEDED)).values(
            review=ReviewState.rejected, reviewed_by=SUPERSEDED, reviewed_at=now,
            review_note=f"{sku}'s image changed (now content {current[sku][:12]}): this shot shows the old one")
            .execution_options(synchronize_session=False))
        s.execute(update(Generation).where(
            Generation.id.in_(shots.where(Subject.content_sha256 == current[sku])),
            Generation.reviewed_by == SUPERSEDED).values(
            review=ReviewState.pending, reviewed_by=None, reviewed_at=None, review_note=None)
            .execution_options(synchronize_session=False))
