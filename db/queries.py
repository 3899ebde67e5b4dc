"""Read-only queries the platform asks of its database (the flows' steps and summaries)."""

from __future__ import annotations

from typing import Sequence

from sqlalchemy import Integer, func, select
from sqlalchemy.orm import Session

from db.models import Generation, Prompt, Score, Subject, SubjectCache, WorkStatus


# Ids bound in one IN (...): PostgreSQL takes at most 65,535 parameters a statement, and a run can plan more shots.
IDS_PER_QUERY = 10_000


def scores_by_generation(session: Session, generation_ids: Sequence[int]) -> dict[int, dict[str, float]]:
    """generation id -> {score name: value}, masked metrics prefixed "m" (mdino, mclip_i): the names of
    `dreamcache.perception.scoring.METRICS`, spelled as `metric_name` does (this layer does not load the models)."""
    out: dict[int, dict[str, float]] = {}
    ids = list(generation_ids)
    for start in range(0, len(ids), IDS_PER_QUERY):
        for score in session.scalars(select(Score).where(Score.generation_id.in_(ids[start:start + IDS_PER_QUERY]))):
            out.setdefault(score.generation_id, {})[("m" if score.masked else "") + score.metric] = score.value
    return out


def shots_without_masked_scores(session: Session, run_id: int) -> int:
    """The run's done shots that were scored but got no masked score: the segmenter found no product in them."""
    scored = select(Score.generation_id).group_by(Score.generation_id).having(
        func.max(Score.masked.cast(Integer)) == 0)
    return session.scalar(select(func.count()).select_from(Generation).where(
        Generation.run_id == run_id, Generation.status == WorkStatus.done, Generation.id.in_(scored))) or 0


def score_rows(session: Session, generation_ids: Sequence[int]) -> dict[int, list[dict]]:
    """generation id -> its scores as rows (metric, masked, value, scorer_model_id)."""
    out: dict[int, list[dict]] = {}
    for score in session.scalars(select(Score).where(Score.generation_id.in_(list(generation_ids)))):
        out.setdefault(score.generation_id, []).append(dict(metric=score.metric, masked=score.masked, value=score.value,
                                                            scorer_model_id=score.scorer_model_id))
    return out


def done_caches_by_content(session: Session, rows: Sequence[SubjectCache], contents: Sequence[str]) -> dict[str, dict]:
    """Finished caches of the same model configuration as rows[0] for the same image contents, by content
    hash: products whose image is identical (another SKU, the same photo) share one cache."""
    if not rows:
        return {}
    first = rows[0]
    found = session.execute(
        select(Subject.content_sha256, SubjectCache.tensor_uri, SubjectCache.sha256, SubjectCache.bytes)
        .join(Subject, Subject.id == SubjectCache.subject_id)
        .where(Subject.content_sha256.in_(list(contents)), SubjectCache.status == WorkStatus.done,
               SubjectCache.base_model_id == first.base_model_id,
               SubjectCache.base_model_revision == first.base_model_revision,
               SubjectCache.adapter_id == first.adapter_id, SubjectCache.layer_preset == first.layer_preset,
               SubjectCache.resolution == first.resolution, SubjectCache.timestep == first.timestep,
               SubjectCache.preparation == first.preparation)).all()
    return {content: dict(tensor_uri=uri, sha256=digest, bytes=size) for content, uri, digest, size in found}


def best_scores(session: Session, run_id: int) -> list[dict]:
    """Per product of the run: images generated and its best score of each metric."""
    done = session.execute(
        select(Subject.sku, Generation.id).join(SubjectCache, SubjectCache.subject_id == Subject.id)
        .join(Generation, Generation.subject_cache_id == SubjectCache.id)
        .where(Generation.run_id == run_id, Generation.status == WorkStatus.done)).all()
    scores = scores_by_generation(session, [g for _, g in done])
    rows: dict[str, dict] = {}
    for sku, generation_id in done:
        row = rows.setdefault(sku, {"sku": sku, "images": 0})
        row["images"] += 1
        for metric, value in scores.get(generation_id, {}).items():
            row[f"best_{metric}"] = round(max(value, row.get(f"best_{metric}", -1.0)), 4)
    return sorted(rows.values(), key=lambda r: r["sku"])


def failures_by_sku(session: Session, run_id: int) -> dict[str, int]:
    """Per product of the run: how many of its images failed (each keeps its reason in `generations.error`)."""
    failed = session.execute(
        select(Subject.sku, func.count(Generation.id)).join(SubjectCache, SubjectCache.subject_id == Subject.id)
        .join(Generation, Generation.subject_cache_id == SubjectCache.id)
        .where(Generation.run_id == run_id, Generation.status == WorkStatus.failed).group_by(Subject.sku)).all()
    return dict(failed)


def shots(session: Session, *where) -> list[tuple[Generation, Subject, str]]:
    """Generations matching `where`, each with its product and prompt text, ordered by (SKU, prompt, seed, id)
    the same way on either database (sorted here: PostgreSQL's collation orders text unlike SQLite's)."""
    rows = session.execute(
        select(Generation, Subject, Prompt.text).join(Prompt, Prompt.id == Generation.prompt_id)
        .join(SubjectCache, SubjectCache.id == Generation.subject_cache_id)
        .join(Subject, Subject.id == SubjectCache.subject_id).where(*where)).all()
    return sorted((tuple(row) for row in rows), key=lambda r: (r[1].sku, r[2], r[0].seed, r[0].id))
