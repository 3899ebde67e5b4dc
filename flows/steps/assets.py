"""Product assets: each product's transparent cut-out and its white packshot in each of the run's formats."""

from __future__ import annotations

from typing import Sequence

import numpy as np
from sqlalchemy import select, update

from db.models import ProductAsset, Subject
from db.objects import put_if_changed
from db.repository import insert_missing
from db.session import transaction
from dreamcache.core.images import decode_image
from dreamcache.perception.segmentation import cutout, packshot
from flows.platform.params import Format
from flows.platform.resources import Platform
from flows.steps.layout import cutout_key, packshot_key
from flows.steps.plan import generation_canvas
from flows.steps.shared import png, product_image, read_image, segmentation


def product_assets(platform: Platform, run_id: int, subject_ids: Sequence[int], output_prefix: str,
                   formats: Sequence[Format], with_cutout: bool, with_packshot: bool) -> dict[str, list[str]]:
    """Write the asked-for assets of each product under `{output_prefix}/{sku}/` and record them
    (`product_assets`); returns their URIs by SKU. A file is written only when its bytes differ from
    the stored one, so a re-run writes nothing."""
    if not (with_cutout or with_packshot):
        return {}
    resolution, multiple = platform.pipeline.resolution, platform.pipeline.size_multiple
    out: dict[str, list[str]] = {}
    with transaction(platform.sessions) as s:
        subjects = s.scalars(select(Subject).where(Subject.id.in_(list(subject_ids))).order_by(Subject.id)).all()
        masks = {subject.id: segmentation(s, subject.id).mask_uri for subject in subjects}
    for subject in subjects:
        photo = decode_image(product_image(platform, subject), subject.source_uri)
        mask = np.asarray(read_image(platform, platform.objects.key_of(masks[subject.id])).convert("L")) > 127
        made = []  # (kind, aspect, image, key)
        if with_cutout:
            made.append(("cutout", None, cutout(photo, mask), cutout_key(output_prefix, subject.sku)))
        if with_packshot:
            for shop_format in formats:
                size = shop_format.size(generation_canvas(shop_format, resolution, multiple))
                made.append(("packshot", shop_format.aspect, packshot(photo, mask, size),
                             packshot_key(output_prefix, subject.sku, size)))
        for kind, aspect, image, key in made:
            stored = put_if_changed(platform.objects, key, png(image), "image/png")
            with transaction(platform.sessions) as s:
                row = dict(run_id=run_id, subject_id=subject.id, kind=kind, aspect=aspect, width=image.width,
                           height=image.height, uri=stored.uri, sha256=stored.sha256, bytes=stored.size)
                if not insert_missing(s, ProductAsset, [row]):  # the same file, made again from another photo
                    s.execute(update(ProductAsset).where(ProductAsset.uri == stored.uri).values(**row))
            out.setdefault(subject.sku, []).append(stored.uri)
    return out
