"""`dreamcache verify [--repair]`: every object the database says is done, checked by sha256.

What is checked, and what `--repair` does with what is damaged or missing:

| object | checked against | repair |
|---|---|---|
| shot image | the generation's recorded sha256 (size only for shots recorded before hashes were) | the generation goes back to pending: the next run over its catalogue makes it again |
| shot sidecar | the sidecar written again from the database (the row, its prompt and scores) | written again, from the database |
| feature cache | its sha256 (the tensor store's key) | the cache goes back to pending: the next run computes it again |
| mask, reference on white | the segmentation's recorded sha256 | the segmentation is forgotten: the next run cuts the product out again |
| product copy (`products/<sha>`) | the subject's content sha256 | restored from the product's source when the source still has that content; otherwise named, to be ingested again |

Shots sent back to pending (by `--repair`, a re-run's check or a contact sheet) are counted as waiting
for a run: verify says so rather than "all whole" until a run has made them again.

Every re-run also checks its own plan's shots cheaply (present, recorded size, sidecar present: one
listing) and makes broken ones again (`flows/steps/plan.py`); `verify` is the thorough check of
everything, for a schedule or after an incident.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field

from sqlalchemy import delete, func, select, update

from db import queries
from db.models import Generation, Prompt, Segmentation, Subject, SubjectCache, WorkStatus
from db.objects import CorruptObject, ObjectNotFound, ObjectStoreError
from db.session import transaction
from db.tensors import requeue_cache
from flows.platform.resources import Platform
from flows.steps.generate import read_sidecar, sidecar
from flows.steps.layout import product_key, sidecar_key, text_only_key
from flows.steps.shared import SourceChanged, product_image


@dataclass
class Report:
    checked: Counter = field(default_factory=Counter)  # kind -> objects checked
    waiting: int = 0  # shots found damaged earlier, pending until a run makes them again
    problems: list[dict] = field(default_factory=list)  # kind, item, uri, problem
    repaired: Counter = field(default_factory=Counter)

    def add(self, kind: str, item: int, uri: str, problem: str) -> None:
        self.problems.append(dict(kind=kind, item=item, uri=uri, problem=problem))


def _problem(platform: Platform, uri: str, sha256: str | None) -> str | None:
    """What is wrong with the object at `uri` (None: nothing)."""
    try:
        platform.objects.get(platform.objects.key_of(uri), expected_sha256=sha256)
    except ObjectNotFound:
        return "missing"
    except CorruptObject:
        return "damaged (sha256 differs)"
    except ObjectStoreError as exc:
        return f"unreadable ({exc})"
    return None


def verify(platform: Platform, repair: bool = False) -> Report:
    report = Report()
    with transaction(platform.sessions) as s:
        _shots(platform, s, report, repair)
        _caches(platform, s, report, repair)
        _segmentations(platform, s, report, repair)
        _products(platform, s, report, repair)
        report.waiting = s.scalar(select(func.count()).where(Generation.status == WorkStatus.pending,
                                                             Generation.error.startswith("made again")))
    return report


def _shots(platform: Platform, s, report: Report, repair: bool) -> None:
    rows = s.execute(select(Generation, Prompt.text, Subject).join(Prompt, Prompt.id == Generation.prompt_id)
                     .join(SubjectCache, SubjectCache.id == Generation.subject_cache_id)
                     .join(Subject, Subject.id == SubjectCache.subject_id)
                     .where(Generation.status == WorkStatus.done).order_by(Generation.id)).all()
    scores = queries.score_rows(s, [gen.id for gen, _, _ in rows])
    for gen, text, subject in rows:
        report.checked["shot"] += 1
        problem = _problem(platform, gen.output_uri, gen.output_sha256)
        if problem:
            report.add("shot", gen.id, gen.output_uri, problem)
            if repair:
                s.execute(update(Generation).where(Generation.id == gen.id).values(
                    status=WorkStatus.pending, output_uri=None, output_sha256=None, output_bytes=None,
                    error=f"made again: its image was {problem} (dreamcache verify)"))
                report.repaired["shot"] += 1
            continue
        report.checked["sidecar"] += 1
        key = platform.objects.key_of(gen.output_uri)
        twin = text_only_key(key)
        expected = sidecar(gen, subject, text, scores.get(gen.id, []),
                           platform.objects.uri(twin) if platform.objects.exists(twin) else None)
        try:
            written = platform.objects.get(sidecar_key(key))
        except ObjectNotFound:
            written = None
        if not _same_sidecar(written, expected):
            report.add("sidecar", gen.id, platform.objects.uri(sidecar_key(key)),
                       "missing" if written is None else "differs from the database")
            if repair:
                platform.objects.put(sidecar_key(key), expected, "application/json")
                report.repaired["sidecar"] += 1


def _same_sidecar(written: bytes | None, expected: bytes) -> bool:
    """The sidecar stored says what the database says; one in the older spelling of score names ("mclip-i") does too."""
    if written is None or written == expected:
        return written is not None
    try:
        return read_sidecar(written) == json.loads(expected)
    except (ValueError, TypeError, AttributeError):  # not JSON, or not a sidecar's shape: damaged
        return False


def _caches(platform: Platform, s, report: Report, repair: bool) -> None:
    for row in s.scalars(select(SubjectCache).where(SubjectCache.status == WorkStatus.done).order_by(SubjectCache.id)):
        report.checked["cache"] += 1
        problem = _problem(platform, row.tensor_uri, row.sha256)
        if problem:
            report.add("cache", row.id, row.tensor_uri, problem)
            if repair:
                requeue_cache(s, row.id, f"computed again: it was {problem} (dreamcache verify)")
                report.repaired["cache"] += 1


def _segmentations(platform: Platform, s, report: Report, repair: bool) -> None:
    for row in s.scalars(select(Segmentation).where(Segmentation.quality != "rejected").order_by(Segmentation.id)):
        problems = []
        for kind, uri, digest in (("mask", row.mask_uri, row.mask_sha256),
                                  ("reference", row.reference_uri, row.reference_sha256)):
            report.checked[kind] += 1
            problem = _problem(platform, uri, digest)
            if problem:
                report.add(kind, row.id, uri, problem)
                problems.append(kind)
        if problems and repair:
            s.execute(update(SubjectCache).where(SubjectCache.segmentation_id == row.id).values(segmentation_id=None))
            s.execute(delete(Segmentation).where(Segmentation.id == row.id))
            report.repaired["segmentation"] += 1


def _products(platform: Platform, s, report: Report, repair: bool) -> None:
    for subject in s.scalars(select(Subject).order_by(Subject.id)):
        report.checked["product"] += 1
        key = product_key(subject.content_sha256)
        problem = _problem(platform, platform.objects.uri(key), subject.content_sha256)
        if not problem:
            continue
        if repair:
            try:
                product_image(platform, subject)  # restores the copy from the source, when it has that content
                report.repaired["product"] += 1
                report.add("product", subject.id, platform.objects.uri(key), f"{problem}; restored from the source")
                continue
            except SourceChanged as exc:
                problem = f"{problem} and cannot be restored: {exc}"
        report.add("product", subject.id, platform.objects.uri(key), problem)
