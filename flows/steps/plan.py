"""Plan: every (cache, prompt, seed) of a run recorded once; what is still to do returned."""

from __future__ import annotations

import json
from typing import Sequence

from sqlalchemy import select, update

from db import claims
from db.models import Generation, Prompt, Subject, SubjectCache, WorkStatus
from db.repository import ids_by_key, insert_missing
from db.session import transaction
from dreamcache.core.guidance import uses_image_scale
from flows.params import CatalogueRunParams
from flows.platform import Platform
from flows.steps.prompts import load_prompts, render_prompt
from flows.steps.runs import reject
from flows.steps.shared import chunks, sha256


def generation_parameters(platform: Platform, params: CatalogueRunParams) -> dict:
    """Everything besides cache, prompt and seed that decides an image; its hash is part of the key."""
    pipe, ident = platform.pipeline, platform.identity
    return dict(guidance=params.guidance, text_scale=params.text_scale,
                image_scale=params.image_scale if uses_image_scale(params.guidance) else None, steps=params.steps,
                sampler=type(pipe.scheduler).__name__, resolution=params.resolution or pipe.resolution,
                base_model_id=ident.base_model_id, adapter_id=ident.adapter_id,
                base_model_revision=ident.base_model_revision)


def plan(platform: Platform, run_id: int, cache_ids: Sequence[int], params: CatalogueRunParams) -> list[int]:
    """Record every (cache, prompt, seed) of the run once; returns the generations still to do."""
    templates = load_prompts(params)
    gen_params = generation_parameters(platform, params)
    params_hash = sha256(json.dumps(gen_params, sort_keys=True))
    columns = {k: gen_params[k] for k in ("guidance", "text_scale", "image_scale", "steps", "sampler", "resolution",
                                          "base_model_id", "adapter_id")}
    rows, rejected = [], []
    with transaction(platform.sessions) as s:
        caches = s.execute(select(SubjectCache.id, Subject).join(Subject, Subject.id == SubjectCache.subject_id)
                           .where(SubjectCache.id.in_(cache_ids))).all()
        texts = {}
        for cache_id, subject in caches:
            for template in templates:
                try:
                    text = render_prompt(template, subject)
                except ValueError as exc:
                    rejected.append((subject.sku, str(exc)))
                    continue
                texts[sha256(text)] = text
                offset = int(sha256(subject.sku)[:8], 16) % 1_000_000 if params.seed_policy == "per-product" else 0
                for k in range(params.images_per_prompt):
                    rows.append(dict(subject_cache_id=cache_id, prompt_sha=sha256(text), seed=params.seed + offset + k))
        insert_missing(s, Prompt, [dict(text=t, text_sha256=h) for h, t in texts.items()])
        prompt_ids = {k[0]: v for k, v in ids_by_key(s, Prompt, ["text_sha256"], [(h,) for h in texts]).items()}
        generation_rows = [dict(subject_cache_id=r["subject_cache_id"], prompt_id=prompt_ids[r["prompt_sha"]],
                                seed=r["seed"], params_sha256=params_hash, parameters=gen_params, run_id=run_id,
                                **columns) for r in rows]
        for part in chunks(generation_rows, 1000):
            insert_missing(s, Generation, part)
        keys = [(r["subject_cache_id"], r["prompt_id"], r["seed"], params_hash) for r in generation_rows]
        ids = ids_by_key(s, Generation, ["subject_cache_id", "prompt_id", "seed", "params_sha256"], keys)
        todo = sorted(s.scalars(select(Generation.id).where(Generation.id.in_(list(ids.values())),
                                                            Generation.status != WorkStatus.done))) if ids else []
        if todo:
            claims.retry_failed(s, Generation, [Generation.id.in_(todo)])
            # Work someone else left unfinished now belongs to this run's record.
            s.execute(update(Generation).where(Generation.id.in_(todo)).values(run_id=run_id)
                      .execution_options(synchronize_session=False))
    reject(platform, run_id, "plan", rejected)
    return todo
