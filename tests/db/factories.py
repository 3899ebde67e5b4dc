"""Rows for the db tests, inserted through the ORM models."""

from __future__ import annotations

import hashlib

from db.models import Generation, Prompt, Run, Score, Subject, SubjectCache, WorkStatus


def sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def subject(session, sku: str, category: str = "mug") -> Subject:
    row = Subject(sku=sku, category=category, source_uri=f"s3://catalogue/{sku}.png", content_sha256=sha(sku))
    session.add(row)
    session.flush()
    return row


def cache(session, subject_row: Subject, status=WorkStatus.done) -> SubjectCache:
    row = SubjectCache(subject_id=subject_row.id, base_model_id="sd21-base", base_model_revision="f" * 64,
                       adapter_id="dreamcache-default", layer_preset="default", resolution=512, dtype="float16",
                       status=status)
    session.add(row)
    session.flush()
    return row


def prompt(session, text: str) -> Prompt:
    row = Prompt(text=text, text_sha256=sha(text))
    session.add(row)
    session.flush()
    return row


def run(session, name: str = "nightly") -> Run:
    row = Run(name=name, flow_run_id=sha(name)[:36])
    session.add(row)
    session.flush()
    return row


def generation(session, cache_row, prompt_row, seed: int, run_row=None, status=WorkStatus.pending, **values):
    defaults = dict(params_sha256=sha("params"), sampler="DDIMScheduler", guidance="combined", text_scale=7.5,
                    image_scale=0.35, steps=50, resolution=512, base_model_id="sd21-base",
                    adapter_id="dreamcache-default")
    row = Generation(subject_cache_id=cache_row.id, prompt_id=prompt_row.id, seed=seed, status=status,
                     run_id=run_row.id if run_row else None, **{**defaults, **values})
    session.add(row)
    session.flush()
    return row


def score(session, generation_row, metric: str, value: float, masked: bool = False) -> Score:
    row = Score(generation_id=generation_row.id, metric=metric, masked=masked, value=value,
                scorer_model_id=f"{metric}-scorer")
    session.add(row)
    session.flush()
    return row
