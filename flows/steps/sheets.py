"""Contact sheets: per product, its reference and best shots (each beside its text-only twin)."""

from __future__ import annotations

import io
from typing import Sequence

from PIL import Image
from sqlalchemy import select

from db import queries
from db.models import Generation, Prompt, Subject, SubjectCache, WorkStatus
from db.objects import CorruptObject, ObjectNotFound, put_if_changed
from db.session import transaction
from dreamcache.perception.contact_sheet import contact_sheet
from dreamcache.perception.metrics import ranking_key
from flows.platform.resources import Platform
from flows.steps.layout import contact_sheet_key, text_only_key
from flows.steps.plan import remake
from flows.steps.shared import png, read_image, reference


def _format(gen: Generation) -> str:
    return "" if gen.aspect == "1:1" and gen.mode == "generate" else f", {gen.mode} {gen.aspect}"


def _damage(exc: Exception) -> str:
    return "missing" if isinstance(exc, ObjectNotFound) else "damaged (sha256 differs)"


def contact_sheets(platform: Platform, subject_ids: Sequence[int], output_prefix: str,
                   per_sheet: int = 12) -> dict[str, str]:
    """One contact sheet per product: reference, then its best shots under `output_prefix` with their scores
    (each beside its text-only twin where the sidecar names one).

    A sheet shows every done shot of the product under the prefix, whichever run made it: a product
    whose shots were finished by another run (after a crash, say) still gets its whole sheet. The sheet
    is written only when it differs from the one stored.
    """
    sheets = {}
    under_prefix = platform.objects.uri(output_prefix) + "/"
    with transaction(platform.sessions) as s:
        for subject in s.scalars(select(Subject).where(Subject.id.in_(subject_ids))):
            gens = s.execute(
                select(Generation, Prompt.text).join(Prompt, Prompt.id == Generation.prompt_id)
                .join(SubjectCache, SubjectCache.id == Generation.subject_cache_id)
                .where(SubjectCache.subject_id == subject.id, Generation.status == WorkStatus.done,
                       Generation.output_uri.startswith(under_prefix, autoescape=True))
                .order_by(Generation.id)).all()
            if not gens:
                continue
            scores = queries.scores_by_generation(s, [g.id for g, _ in gens])
            gens = sorted(gens, key=lambda g: (*ranking_key(scores.get(g[0].id, {})), g[0].id))
            shots, twins = [], []
            for gen, text in gens:
                if len(shots) == per_sheet:
                    break
                key = platform.objects.key_of(gen.output_uri)
                try:  # checked against its recorded sha256: a damaged shot is never shown, it is made again
                    shot = Image.open(io.BytesIO(platform.objects.get(key, expected_sha256=gen.output_sha256)))
                except (CorruptObject, ObjectNotFound) as exc:
                    remake(s, gen.id, f"its image {gen.output_uri} is {_damage(exc)} (found by the contact sheet)")
                    continue
                # A no-break space keeps each score's name and value on one caption line.
                values = "  ".join(f"{k}\u00a0{v:.2f}" for k, v in sorted(scores.get(gen.id, {}).items()))
                # The id is what a reviewer types to approve or reject it (`dreamcache review`, the paused run's form).
                label = f"#{gen.id} {text} (seed {gen.seed}{_format(gen)}) {values}"
                shots.append((shot, label))
                twin = text_only_key(key)  # its twin, if it has one (not read from the sidecar: that may be damaged)
                twins.append((read_image(platform, twin), f"{text} (seed {gen.seed})")
                             if platform.objects.exists(twin) else None)
            if not shots:
                continue
            _, product = reference(platform, s, subject.id)
            sheet = contact_sheet(product, shots, title=f"{subject.sku} ({subject.category or 'product'})",
                                  text_only=twins)
            key = contact_sheet_key(output_prefix, subject.sku)
            sheets[subject.sku] = put_if_changed(platform.objects, key, png(sheet), "image/png").uri
    return sheets
