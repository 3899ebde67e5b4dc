"""What several steps use: content hashes, batching, images in and out of the object store."""

from __future__ import annotations

import hashlib
import io
from typing import Sequence

from PIL import Image
from sqlalchemy import select

from db.models import Segmentation
from flows.platform import Platform


def sha256(data: bytes | str) -> str:
    return hashlib.sha256(data.encode() if isinstance(data, str) else data).hexdigest()


def chunks(items: Sequence, size: int) -> list[list]:
    return [list(items[i : i + size]) for i in range(0, len(items), size)]


def read_image(platform: Platform, key: str) -> Image.Image:
    return Image.open(io.BytesIO(platform.objects.get(key)))


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def reference(platform: Platform, s, subject_id: int) -> tuple[Segmentation, Image.Image]:
    seg = s.scalars(select(Segmentation).where(Segmentation.subject_id == subject_id,
                                               Segmentation.quality != "rejected").order_by(Segmentation.id)).first()
    data = platform.objects.get(platform.objects.key_of(seg.reference_uri))
    return seg, Image.open(io.BytesIO(data)).convert("RGB")
