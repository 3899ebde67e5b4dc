"""Plan: every (cache, prompt, seed, format) of a run recorded once; what is still to do returned."""

from __future__ import annotations

import logging
from dataclasses import asdict
from typing import Sequence

from sqlalchemy import select, update

from db import claims
from db.models import Generation, Prompt, RejectedItem, Subject, SubjectCache, WorkStatus
from db.repository import ids_by_key, insert_missing
from db.session import transaction
from dreamcache.core.errors import DreamCacheError
from dreamcache.core.guidance import uses_image_scale
from dreamcache.core.placement import Placement, canvas_size
from flows.platform.params import SQUARE, CatalogueRunParams, Format
from flows.platform.resources import Platform
from flows.steps.layout import sidecar_key
from flows.steps.generation_settings import GenerationSettings
from flows.steps.prompts import MissingColumn, render_prompt
from flows.steps.run_record import reject
from flows.steps.shared import chunks, sha256

logger = logging.getLogger(__name__)


def generation_settings(platform: Platform, params: CatalogueRunParams,
                        shop_format: Format = SQUARE) -> GenerationSettings:
    """Everything besides cache, prompt and seed that decides an image; its hash is part of the key."""
    pipe, ident = platform.pipeline, platform.identity
    resolution = params.resolution or pipe.resolution
    settings = dict(
        guidance=params.guidance, text_scale=params.text_scale,
        image_scale=params.image_scale if uses_image_scale(params.guidance) else None, steps=params.steps,
        sampler=sampler_name(pipe, params.sampler), resolution=resolution, base_model_id=ident.base_model_id,
        adapter_id=ident.adapter_id, base_model_revision=ident.base_model_revision, eta=params.eta,
        negative_prompt=params.negative_prompt,
        deep_reuse_interval=params.deep_reuse_interval if params.deep_reuse_interval > 1 else None)
    if params.mode == "place":
        # The blend's own settings too: a shot placed with other ones is another shot. The product's category
        # is the negative prompt too: asked for "a mug on a beach", the model draws a second mug beside the
        # placed one (bench/results/placement_quality_cpu.json).
        settings.update(mode="place", negative_category=True, placement=asdict(Placement(
            x=params.placement_x, y=params.placement_y, scale=params.placement_scale, shadow=params.shadow)))
    if shop_format != SQUARE:
        canvas = generation_canvas(shop_format, resolution, pipe.size_multiple)
        settings.update(aspect=shop_format.aspect, canvas=canvas, size=shop_format.size(canvas))
    return GenerationSettings(**settings)


def generation_canvas(shop_format: Format, resolution: int, multiple: int) -> tuple[int, int]:
    """The size a format is generated at: the model's resolution on the short side (square: as it is)."""
    if shop_format.width == shop_format.height:
        return resolution, resolution
    return canvas_size(shop_format.width, shop_format.height, resolution, multiple)


def sampler_name(pipe, sampler: str) -> str:
    """What a shot records as its sampler: the name, or for the model's own scheduler its class (as before)."""
    return type(pipe.scheduler).__name__ if sampler == "model" else sampler


def plan(platform: Platform, run_id: int, cache_ids: Sequence[int], params: CatalogueRunParams,
         templates: Sequence[str]) -> dict:
    """Record every (cache, prompt, seed, format) of the run once; returns the generations still to do (`todo`),
    how many done ones were found broken and made pending again (`repaired`), and every one planned (`planned`)."""
    by_format = []  # (the settings' record, its hash, the columns it sets) per format of the run
    for shop_format in params.shop_formats:
        settings = generation_settings(platform, params, shop_format)
        by_format.append((settings.record(), settings.sha256, settings.columns()))
    rows, rejected = [], []
    with transaction(platform.sessions) as s:
        # Pairs the run rejected before it started (`catalogue.prepare`) are not rejected twice.
        checked = set(s.scalars(select(RejectedItem.item).where(RejectedItem.run_id == run_id,
                                                                RejectedItem.stage == "prompts")))
        caches = s.execute(select(SubjectCache.id, Subject).join(Subject, Subject.id == SubjectCache.subject_id)
                           .where(SubjectCache.id.in_(cache_ids))).all()
        texts = {}
        for cache_id, subject in caches:
            for template in templates:
                try:
                    text = render_prompt(template, subject)
                except MissingColumn as exc:  # the product's columns changed since the run checked them
                    if f"{subject.sku}: {template}"[:1024] not in checked:
                        rejected.append((f"{subject.sku}: {template}", str(exc)))
                    continue
                except ValueError as exc:
                    rejected.append((subject.sku, str(exc)))
                    continue
                texts[sha256(text)] = text
                offset = int(sha256(subject.sku)[:8], 16) % 1_000_000 if params.seed_policy == "per-product" else 0
                for gen_params, params_hash, columns in by_format:
                    for k in range(params.images_per_prompt):
                        rows.append(dict(subject_cache_id=cache_id, prompt_sha=sha256(text),
                                         seed=params.seed + offset + k, params_sha256=params_hash,
                                         parameters=gen_params, **columns))
        insert_missing(s, Prompt, [dict(text=t, text_sha256=h) for h, t in texts.items()])
        prompt_ids = {k[0]: v for k, v in ids_by_key(s, Prompt, ["text_sha256"], [(h,) for h in texts]).items()}
        generation_rows = [{**{k: v for k, v in r.items() if k != "prompt_sha"},
                            "prompt_id": prompt_ids[r["prompt_sha"]], "run_id": run_id} for r in rows]
        for part in chunks(generation_rows, 1000):
            insert_missing(s, Generation, part)
        keys = [(r["subject_cache_id"], r["prompt_id"], r["seed"], r["params_sha256"]) for r in generation_rows]
        ids = ids_by_key(s, Generation, ["subject_cache_id", "prompt_id", "seed", "params_sha256"], keys)
        repaired = check_done_shots(platform, s, list(ids.values()), params.output_prefix)
        todo = sorted(s.scalars(select(Generation.id).where(Generation.id.in_(list(ids.values())),
                                                            Generation.status != WorkStatus.done))) if ids else []
        if todo:
            claims.retry_failed(s, Generation, [Generation.id.in_(todo)])
            # Work someone else left unfinished now belongs to this run's record.
            s.execute(update(Generation).where(Generation.id.in_(todo)).values(run_id=run_id)
                      .execution_options(synchronize_session=False))
    reject(platform, run_id, "plan", rejected)
    return dict(todo=todo, repaired=repaired, planned=sorted(ids.values()))


class OutputsElsewhere(DreamCacheError):
    """Shots of the plan already exist under another output prefix: refused on purpose, never retried."""


def check_done_shots(platform: Platform, s, generation_ids: Sequence[int], output_prefix: str) -> int:
    """The cheap check of every re-run: each done shot of the plan is there, at its recorded size, with its
    sidecar (one listing of the prefix, no downloads). Those that are not go back to pending, to be made
    again; returns how many. (`dreamcache verify` checks the sha256 of everything.)

    A plan whose shots were made under another prefix is refused: each shot is written once."""
    done = s.execute(select(Generation.id, Generation.output_uri, Generation.output_bytes)
                     .where(Generation.id.in_(list(generation_ids)), Generation.status == WorkStatus.done)).all()
    under = platform.objects.uri(output_prefix) + "/"
    elsewhere = [uri for _, uri, _ in done if not uri.startswith(under)]
    if elsewhere:
        raise OutputsElsewhere(
            f"{len(elsewhere)} of the {len(generation_ids)} shots this run plans were made already, under another "
            f"output prefix (e.g. {elsewhere[0]}); each shot is written once: run with that output prefix, or copy "
            f"its folder to {under}")
    if not done:
        return 0
    sizes = platform.objects.sizes(output_prefix + "/")
    broken = {}
    for generation_id, uri, size in done:
        key = platform.objects.key_of(uri)
        if key not in sizes:
            broken[generation_id] = f"its image {uri} is missing"
        elif size is not None and sizes[key] != size:
            broken[generation_id] = f"its image {uri} has {sizes[key]} bytes, not the {size} written"
        elif sidecar_key(key) not in sizes:
            broken[generation_id] = f"the sidecar of {uri} is missing"
    for generation_id, reason in broken.items():
        remake(s, generation_id, reason)
    return len(broken)


def remake(s, generation_id: int, reason: str) -> None:
    """A done shot found missing or damaged goes back to pending, to be made again by the next run; the
    warning names it and why."""
    logger.warning("generation %d is made again: %s", generation_id, reason)
    s.execute(update(Generation).where(Generation.id == generation_id)
              .values(status=WorkStatus.pending, output_uri=None, output_sha256=None, output_bytes=None,
                      error=f"made again: {reason}").execution_options(synchronize_session=False))
