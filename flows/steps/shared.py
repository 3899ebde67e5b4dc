"""What several steps use: content hashes, batching, images in and out of the object store, claims
given back."""

from __future__ import annotations

import hashlib
import io
import logging
from contextlib import contextmanager
from typing import Sequence

from PIL import Image
from sqlalchemy import select

from db import claims
from db.models import Segmentation
from db.objects import CorruptObject, ObjectNotFound
from db.session import transaction
from flows.platform.resources import Platform, worker_id
from flows.steps.layout import product_key
from flows.steps.source import read_uri

logger = logging.getLogger(__name__)


def sha256(data: bytes | str) -> str:
    return hashlib.sha256(data.encode() if isinstance(data, str) else data).hexdigest()


def chunks(items: Sequence, size: int) -> list[list]:
    return [list(items[i : i + size]) for i in range(0, len(items), size)]


def product_image(platform: Platform, subject) -> bytes:
    """A subject's image as ingested: ingest's copy, checked against the subject's content hash. A copy
    lost or damaged since is restored from the source, if the source still has that content."""
    try:
        return platform.objects.get(product_key(subject.content_sha256), expected_sha256=subject.content_sha256)
    except (ObjectNotFound, CorruptObject):
        try:
            data = read_uri(subject.source_uri)
        except Exception as exc:
            raise SourceChanged(f"{subject.sku}: the copy of its image is gone and {subject.source_uri} cannot be "
                                f"read ({exc}); restore the file and run again") from None
        if sha256(data) != subject.content_sha256:
            raise SourceChanged(f"{subject.sku}: the copy of its image is gone and {subject.source_uri} has changed "
                                "since it was ingested; run again to ingest the new image") from None
        platform.objects.put(product_key(subject.content_sha256), data)
        return data


class SourceChanged(RuntimeError):
    """A product's image is no longer what its subject row was recorded with (and no copy is left)."""


def read_image(platform: Platform, key: str) -> Image.Image:
    return Image.open(io.BytesIO(platform.objects.get(key)))


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def segmentation(s, subject_id: int) -> Segmentation:
    """A subject's usable cut-out (its first, by id)."""
    return s.scalars(select(Segmentation).where(Segmentation.subject_id == subject_id,
                                                Segmentation.quality != "rejected").order_by(Segmentation.id)).first()


def reference(platform: Platform, s, subject_id: int) -> tuple[Segmentation, Image.Image]:
    seg = segmentation(s, subject_id)
    data = platform.objects.get(platform.objects.key_of(seg.reference_uri))
    return seg, Image.open(io.BytesIO(data)).convert("RGB")


@contextmanager
def giving_back(platform: Platform, model, ids: Sequence[int]):
    """A step never ends holding claims: whatever of `ids` it has not finished when the block ends (an
    error, a signal) is given back at once, not left to its lease (which this live process would renew)."""
    try:
        yield
    finally:
        try:
            with transaction(platform.sessions) as s:
                released = claims.release_all(s, model, worker_id(), ids)
            if released:
                logger.warning("gave back %d unfinished %s", released, model.__tablename__)
        except Exception as exc:  # the database away: the lease runs out instead
            logger.warning("could not give back unfinished %s (%s): their leases run out", model.__tablename__, exc)
