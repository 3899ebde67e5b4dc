"""Segment: each product cut out once per method, its mask and reference on white stored."""

from __future__ import annotations

import logging
from typing import Sequence

from PIL import Image
from sqlalchemy import delete, select, update

from db.models import Segmentation, Subject, SubjectCache
from db.repository import insert_missing
from db.session import transaction
from dreamcache.core.errors import DreamCacheError
from dreamcache.core.images import decode_image
from dreamcache.perception.segmentation import SegmentationError
from flows.platform.resources import Platform
from flows.steps.layout import mask_key, reference_key, segmentation_folder
from flows.steps.run_record import reject
from flows.steps.shared import SourceChanged, png, product_image

logger = logging.getLogger(__name__)


def segment(platform: Platform, run_id: int, subject_ids: Sequence[int]) -> list[int]:
    """Cut each product out once per method; returns the subjects with a usable cut-out.

    A cut-out whose mask or reference has gone from the store since (a product at a time: one existence
    check each) is forgotten and made again; `dreamcache verify` checks their bytes."""
    method = platform.segmenter.method
    resolution = platform.pipeline.resolution
    with transaction(platform.sessions) as s:
        done = {row.subject_id: row for row in s.scalars(
            select(Segmentation).where(Segmentation.subject_id.in_(subject_ids),
                                       Segmentation.method.like(method + "%")))}
        lost = [row for row in done.values() if row.quality != "rejected" and not all(
            platform.objects.exists(platform.objects.key_of(uri)) for uri in (row.mask_uri, row.reference_uri))]
        for row in lost:
            logger.warning("the cut-out of subject %d is cut again: its mask or reference is missing", row.subject_id)
            s.execute(update(SubjectCache).where(SubjectCache.segmentation_id == row.id).values(segmentation_id=None))
            s.execute(delete(Segmentation).where(Segmentation.id == row.id))
            del done[row.subject_id]
        subjects = s.scalars(select(Subject).where(Subject.id.in_(subject_ids))).all()
    usable, rejected, rows = [], [], []
    for subject in subjects:
        if subject.id in done:
            if done[subject.id].quality != "rejected":
                usable.append(subject.id)
            continue
        try:
            image = decode_image(product_image(platform, subject), subject.source_uri)
            cut = platform.segmenter.segment(image, subject.category, name=f"{subject.sku} ({subject.source_uri})")
        except (SegmentationError, DreamCacheError, SourceChanged) as exc:
            rejected.append((subject.sku, str(exc)))
            # Every row names every column: one multi-row INSERT needs the same keys in each row.
            rows.append(dict(subject_id=subject.id, method=method, mask_uri=None, reference_uri=None,
                             mask_sha256=None, reference_sha256=None, area_fraction=None,
                             largest_component_share=None, touches_border=None, quality="rejected", message=str(exc)))
            continue
        folder = segmentation_folder(subject.content_sha256, cut.method)
        mask = platform.objects.put(mask_key(folder), png(Image.fromarray(cut.mask)), "image/png")
        reference = platform.objects.put(reference_key(folder, resolution),
                                         png(cut.subject_on_white(image, resolution)), "image/png")
        rows.append(dict(subject_id=subject.id, method=cut.method, mask_uri=mask.uri, reference_uri=reference.uri,
                         mask_sha256=mask.sha256, reference_sha256=reference.sha256, area_fraction=cut.area_fraction, largest_component_share=cut.largest_component_share,
                         touches_border=cut.touches_border, quality=cut.quality, message="; ".join(cut.warnings) or None))
        usable.append(subject.id)
    reject(platform, run_id, "segment", rejected)
    with transaction(platform.sessions) as s:
        insert_missing(s, Segmentation, rows)
    return sorted(usable)
