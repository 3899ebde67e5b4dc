"""Caches: each product's DreamCache features, once per model configuration, verified on load."""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from typing import Sequence

from sqlalchemy import select

from db import claims, queries
from db.models import Subject, SubjectCache, WorkStatus
from db.objects import CorruptObject, ObjectNotFound
from db.repository import insert_missing
from db.session import transaction
from db.tensors import requeue_cache
from dreamcache.core.cache import FeatureCache
from dreamcache.core.errors import DreamCacheError
from dreamcache.core.images import decode_image
from flows.platform import liveness
from flows.platform.resources import Platform, worker_id
from flows.steps.shared import chunks, giving_back, product_image, reference

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Preparation:
    """How a cache's pass is prepared: the method's way (empty text, the segmented product letterboxed on
    white, the VAE latent's mode) unless told otherwise. The authors' released inference uses its negative
    prompt as the text, the product photo stretched to the square and a sampled latent."""

    text: str = ""
    reference_mode: str = "letterbox"
    latent: str = "mode"

    def tag(self) -> str:
        """The `subject_caches.preparation` column: '' for the method's way, else the whole recipe as JSON."""
        return "" if self == Preparation() else json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_tag(cls, tag: str) -> "Preparation":
        return cls(**json.loads(tag)) if tag else cls()


def cache_key(platform: Platform, preparation: Preparation = Preparation()) -> dict:
    """The model configuration and preparation a cache is made for (its identity besides the subject)."""
    ident = platform.identity
    return dict(base_model_id=ident.base_model_id, base_model_revision=ident.base_model_revision,
                adapter_id=ident.adapter_id, layer_preset=ident.layer_preset, resolution=platform.pipeline.resolution,
                timestep=1, preparation=preparation.tag())


def open_caches(session, platform: Platform, subject_ids: Sequence[int],
                preparation: Preparation = Preparation()) -> list[int]:
    """The ids of these products' caches for the loaded model that are not finished (pending, or held)."""
    key = cache_key(platform, preparation)
    return sorted(session.scalars(select(SubjectCache.id).where(
        SubjectCache.subject_id.in_(list(subject_ids)), SubjectCache.status.in_([WorkStatus.pending, WorkStatus.running]),
        *[getattr(SubjectCache, k) == v for k, v in key.items()])))


def cache(platform: Platform, run_id: int, subject_ids: Sequence[int],
          preparation: Preparation = Preparation()) -> list[int]:
    """Cache each product's features once per model configuration and preparation; returns the ready cache ids."""
    ident, key = platform.identity, cache_key(platform, preparation)
    with transaction(platform.sessions) as s:
        insert_missing(s, SubjectCache, [dict(key, subject_id=i, dtype=ident.dtype) for i in subject_ids])
        mine = s.scalars(select(SubjectCache.id).where(
            SubjectCache.subject_id.in_(subject_ids), *[getattr(SubjectCache, k) == v for k, v in key.items()])).all()
        claims.retry_failed(s, SubjectCache, [SubjectCache.id.in_(mine)])
        platform.heartbeat.start()  # what this process claims stays claimed only while it lives
        claimed = claims.claim(s, SubjectCache, worker_id(), len(mine) or 1, platform.lease, [SubjectCache.id.in_(mine)],
                               dead_owners=liveness.dead_owners(s, SubjectCache))
    with giving_back(platform, SubjectCache, claimed):
        for batch in chunks(claimed, 32):
            _compute_caches(platform, batch)
    with transaction(platform.sessions) as s:
        return sorted(s.scalars(select(SubjectCache.id).where(SubjectCache.id.in_(mine),
                                                              SubjectCache.status == WorkStatus.done)))


def _compute_caches(platform: Platform, cache_ids: Sequence[int], reuse: bool = True) -> None:
    """Compute claimed caches; products whose image is identical (another SKU, same photo) share one.

    reuse=False computes even where a finished cache of the same image exists (it was found damaged).
    """
    me = worker_id()
    with transaction(platform.sessions) as s:
        rows = s.execute(select(SubjectCache, Subject.content_sha256).join(Subject, Subject.id == SubjectCache.subject_id)
                         .where(SubjectCache.id.in_(cache_ids)).order_by(SubjectCache.id)).all()
        done_by_content = queries.done_caches_by_content(s, [row for row, _ in rows], [c for _, c in rows]) if reuse else {}
        todo = {}
        preparation = Preparation.from_tag(rows[0][0].preparation) if rows else Preparation()
        for row, content in rows:
            if content not in done_by_content and content not in todo:
                segmentation, image = reference(platform, s, row.subject_id)
                if preparation.reference_mode == "stretch":  # the authors' way: the whole photo, stretched
                    image = decode_image(product_image(platform, s.get(Subject, row.subject_id)), f"subject {row.subject_id}")
                todo[content] = (row, (segmentation, image))
    try:
        computed = platform.pipeline.cache_subjects([image for _, (_, image) in todo.values()], seed=0,
                                                    **asdict(preparation)) if todo else []
    except Exception as exc:
        with transaction(platform.sessions) as s:
            for row, _ in rows:
                claims.fail(s, SubjectCache, row.id, me, f"caching failed: {exc}")
        raise
    for content, feature_cache in zip(todo, computed):
        stored = platform.tensors.put(feature_cache.to_bytes())  # the object first, then the rows
        done_by_content[content] = dict(tensor_uri=stored.uri, sha256=stored.sha256, bytes=stored.size)
    segmentation = {content: seg.id for content, (_, (seg, _)) in todo.items()}
    with transaction(platform.sessions) as s:
        for row, content in rows:
            claims.complete(s, SubjectCache, row.id, me, segmentation_id=segmentation.get(content),
                            **done_by_content[content])


def load_cache(platform: Platform, cache_id: int) -> FeatureCache:
    """A verified cache; a missing or corrupt one is recomputed from its reference and recorded."""
    with transaction(platform.sessions) as s:
        row = s.get(SubjectCache, cache_id)
        digest, subject_id = row.sha256, row.subject_id
    try:
        return FeatureCache.from_bytes(platform.tensors.get(digest), source=f"cache {cache_id}")
    except (ObjectNotFound, CorruptObject, DreamCacheError) as exc:
        logger.warning("cache %s of subject %s is unusable (%s): recomputing it", cache_id, subject_id, exc)
        if isinstance(exc, CorruptObject):
            platform.objects.delete(platform.tensors.key(digest))  # useless, and other rows must not trust it
        with transaction(platform.sessions) as s:
            requeue_cache(s, cache_id, f"recomputed: {exc}")
            claims.claim(s, SubjectCache, worker_id(), 1, platform.lease, [SubjectCache.id == cache_id])
        _compute_caches(platform, [cache_id], reuse=False)
        with transaction(platform.sessions) as s:
            row = s.get(SubjectCache, cache_id)
            row.error = f"recomputed after: {exc}"[:4000]  # done, with the repair on record
            digest = row.sha256
        return FeatureCache.from_bytes(platform.tensors.get(digest), source=f"cache {cache_id}")
