"""The steps of a catalogue run, as plain functions: keys in, keys out, idempotent.

The Prefect flow (flows/catalogue.py) wraps each as a task (the unit of retry); the embedded run
(flows/embedded.py) calls them directly. Every step reads its inputs from the database and the
object store and writes its outputs there first, so a step that is retried, or a run that is
re-run, finds finished work and skips it. Objects are written before the rows that point to them.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import string
import time
from dataclasses import dataclass, field
from typing import Iterable, Sequence

from PIL import Image
from sqlalchemy import func, select, update

from db import claims
from db.models import (
    Generation, Prompt, RejectedItem, Run, RunStatus, Score, Segmentation, Subject, SubjectCache, WorkStatus, utcnow,
)
from db.objects import CorruptObject, ObjectNotFound
from db.repository import ids_by_key, insert_missing
from db.session import transaction
from db.tensors import requeue_cache
from dreamcache.cache import FeatureCache
from dreamcache.contact_sheet import contact_sheet
from dreamcache.errors import DreamCacheError
from dreamcache.images import decode_image
from dreamcache.segmentation import SegmentationError
from flows.params import CatalogueRunParams, check_prompt
from flows.platform import Platform, safe_key_part, worker_id
from flows.sources import SourceItem, list_source, read_uri

logger = logging.getLogger(__name__)


def sha256(data: bytes | str) -> str:
    return hashlib.sha256(data.encode() if isinstance(data, str) else data).hexdigest()


def chunks(items: Sequence, size: int) -> list[list]:
    return [list(items[i : i + size]) for i in range(0, len(items), size)]


# --- the run record --------------------------------------------------------------------------

def start_run(platform: Platform, params: CatalogueRunParams, flow_run_id: str | None = None,
              name: str | None = None) -> int:
    with transaction(platform.sessions) as s:
        if flow_run_id:  # a retried flow run continues its own record
            existing = s.scalar(select(Run).where(Run.flow_run_id == flow_run_id))
            if existing:
                existing.status, existing.finished_at, existing.error = RunStatus.running, None, None
                return existing.id
        run = Run(flow_run_id=flow_run_id, name=name, parameters=params.model_dump(mode="json"),
                  status=RunStatus.running, started_at=utcnow())
        s.add(run)
        s.flush()
        return run.id


def finish_run(platform: Platform, run_id: int, summary: dict, error: str | None = None) -> None:
    with transaction(platform.sessions) as s:
        run = s.get(Run, run_id)
        run.status = RunStatus.failed if error else RunStatus.completed
        run.finished_at, run.summary, run.error = utcnow(), summary, error


def reject(platform: Platform, run_id: int, stage: str, rejected: Iterable[tuple[str, str]]) -> None:
    rows = [dict(run_id=run_id, stage=stage, item=item[:1024], reason=reason) for item, reason in rejected]
    if rows:
        with transaction(platform.sessions) as s:
            s.execute(RejectedItem.__table__.insert(), rows)
        for row in rows:
            logger.warning("rejected at %s: %s: %s", stage, row["item"], row["reason"])


# --- prompts ---------------------------------------------------------------------------------

def load_prompts(params: CatalogueRunParams) -> list[str]:
    templates = list(params.prompts)
    if params.prompt_file:
        try:
            lines = read_uri(params.prompt_file).decode("utf-8").splitlines()
        except UnicodeDecodeError as exc:
            raise ValueError(f"prompt file {params.prompt_file} is not UTF-8 text (byte {exc.start}): "
                             "save it as UTF-8, one prompt per line") from None
        templates += [check_prompt(line, f"{params.prompt_file} line {n}")
                      for n, line in enumerate(lines, start=1) if line.strip() and not line.lstrip().startswith("#")]
    return list(dict.fromkeys(templates))


def render_prompt(template: str, subject: Subject) -> str:
    """The template with {sku}, {category} and manifest fields filled in; an unknown {field} stays as written.

    Only plain {name} fields: str.format's {x.attr}, {x[i]} and {x:>999999999} would let a template
    reach object attributes or build enormous strings, so they are refused with the template named.
    """
    fields = {**{k: str(v) for k, v in (subject.attributes or {}).items()},
              "sku": subject.sku, "category": subject.category or "product"}
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise ValueError(f"prompt template {template!r} is not valid ({exc}): write a literal brace as {{{{ or }}}}") \
            from None
    parts = []
    for literal, name, spec, conversion in parsed:
        parts.append(literal)
        if name is None:
            continue
        if not name.isidentifier() or spec or conversion:
            raise ValueError(f"prompt template {template!r}: {{{name}}} is not a plain field; use {{sku}}, "
                             "{category} or a manifest column, without '.', '[', '!' or ':'")
        parts.append(fields.get(name, "{" + name + "}"))
    return check_prompt("".join(parts), f"prompt {template!r} for {subject.sku}")


# --- ingest ----------------------------------------------------------------------------------

def ingest(platform: Platform, run_id: int, items: Sequence[SourceItem]) -> list[int]:
    """Read and validate each image, record each product once per (SKU, content); bad images are rejected."""
    rows, rejected = [], []
    for item in items:
        try:
            data = read_uri(item.uri)
            decode_image(data, item.uri)
        except DreamCacheError as exc:
            rejected.append((item.uri, str(exc)))
            continue
        except Exception as exc:  # unreachable URI, permissions, ...: this item only
            rejected.append((item.uri, f"cannot be read: {exc}"))
            continue
        rows.append(dict(sku=item.sku, category=item.category, source_uri=item.uri, content_sha256=sha256(data),
                         attributes=item.attributes))
    reject(platform, run_id, "ingest", rejected)
    with transaction(platform.sessions) as s:
        insert_missing(s, Subject, rows)
        ids = ids_by_key(s, Subject, ["sku", "content_sha256"], [(r["sku"], r["content_sha256"]) for r in rows])
    return sorted(set(ids.values()))


# --- segment ---------------------------------------------------------------------------------

def segment(platform: Platform, run_id: int, subject_ids: Sequence[int]) -> list[int]:
    """Cut each product out once per method; returns the subjects with a usable cut-out."""
    method = platform.segmenter.method
    resolution = platform.pipeline.resolution
    with transaction(platform.sessions) as s:
        done = {row.subject_id: row for row in s.scalars(
            select(Segmentation).where(Segmentation.subject_id.in_(subject_ids),
                                       Segmentation.method.like(method + "%")))}
        subjects = s.scalars(select(Subject).where(Subject.id.in_(subject_ids))).all()
    usable, rejected, rows = [], [], []
    for subject in subjects:
        if subject.id in done:
            if done[subject.id].quality != "rejected":
                usable.append(subject.id)
            continue
        try:
            image = decode_image(read_uri(subject.source_uri), subject.source_uri)
            cut = platform.segmenter.segment(image, subject.category, name=f"{subject.sku} ({subject.source_uri})")
        except (SegmentationError, DreamCacheError) as exc:
            rejected.append((subject.sku, str(exc)))
            # Every row names every column: one multi-row INSERT needs the same keys in each row.
            rows.append(dict(subject_id=subject.id, method=method, mask_uri=None, reference_uri=None,
                             area_fraction=None, largest_component_share=None, touches_border=None,
                             quality="rejected", message=str(exc)))
            continue
        folder = f"subjects/{subject.content_sha256}/{safe_key_part(cut.method)}"
        mask = platform.objects.put(f"{folder}/mask.png", _png(Image.fromarray(cut.mask)), "image/png")
        reference = platform.objects.put(f"{folder}/reference-{resolution}.png",
                                         _png(cut.subject_on_white(image, resolution)), "image/png")
        rows.append(dict(subject_id=subject.id, method=cut.method, mask_uri=mask.uri, reference_uri=reference.uri,
                         area_fraction=cut.area_fraction, largest_component_share=cut.largest_component_share,
                         touches_border=cut.touches_border, quality=cut.quality, message="; ".join(cut.warnings) or None))
        usable.append(subject.id)
    reject(platform, run_id, "segment", rejected)
    with transaction(platform.sessions) as s:
        insert_missing(s, Segmentation, rows)
    return sorted(usable)


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _reference(platform: Platform, s, subject_id: int) -> tuple[Segmentation, Image.Image]:
    seg = s.scalars(select(Segmentation).where(Segmentation.subject_id == subject_id,
                                               Segmentation.quality != "rejected").order_by(Segmentation.id)).first()
    data = platform.objects.get(platform.objects.key_of(seg.reference_uri))
    return seg, Image.open(io.BytesIO(data)).convert("RGB")


# --- cache -----------------------------------------------------------------------------------

def cache(platform: Platform, run_id: int, subject_ids: Sequence[int]) -> list[int]:
    """Cache each product's features once per model configuration; returns the ready cache ids."""
    ident, pipe = platform.identity, platform.pipeline
    key = dict(base_model_id=ident.base_model_id, base_model_revision=ident.base_model_revision,
               adapter_id=ident.adapter_id, layer_preset=ident.layer_preset, resolution=pipe.resolution, timestep=1)
    with transaction(platform.sessions) as s:
        insert_missing(s, SubjectCache, [dict(key, subject_id=i, dtype=ident.dtype) for i in subject_ids])
        mine = s.scalars(select(SubjectCache.id).where(
            SubjectCache.subject_id.in_(subject_ids), *[getattr(SubjectCache, k) == v for k, v in key.items()])).all()
        claims.retry_failed(s, SubjectCache, [SubjectCache.id.in_(mine)])
        claimed = claims.claim(s, SubjectCache, worker_id(), len(mine) or 1, platform.lease, [SubjectCache.id.in_(mine)])
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
        done_by_content = _done_caches_by_content(s, [row for row, _ in rows], [c for _, c in rows]) if reuse else {}
        todo = {}
        for row, content in rows:
            if content not in done_by_content and content not in todo:
                todo[content] = (row, _reference(platform, s, row.subject_id))
    try:
        computed = platform.pipeline.cache_subjects([image for _, (_, image) in todo.values()], seed=0) if todo else []
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


def _done_caches_by_content(s, rows: Sequence[SubjectCache], contents: Sequence[str]) -> dict[str, dict]:
    """Finished caches of the same model configuration for the same image content, by content hash."""
    if not rows:
        return {}
    first = rows[0]
    found = s.execute(
        select(Subject.content_sha256, SubjectCache.tensor_uri, SubjectCache.sha256, SubjectCache.bytes)
        .join(Subject, Subject.id == SubjectCache.subject_id)
        .where(Subject.content_sha256.in_(list(contents)), SubjectCache.status == WorkStatus.done,
               SubjectCache.base_model_id == first.base_model_id,
               SubjectCache.base_model_revision == first.base_model_revision,
               SubjectCache.adapter_id == first.adapter_id, SubjectCache.layer_preset == first.layer_preset,
               SubjectCache.resolution == first.resolution, SubjectCache.timestep == first.timestep)).all()
    return {content: dict(tensor_uri=uri, sha256=digest, bytes=size) for content, uri, digest, size in found}


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


# --- plan ------------------------------------------------------------------------------------

def generation_parameters(platform: Platform, params: CatalogueRunParams) -> dict:
    """Everything besides cache, prompt and seed that decides an image; its hash is part of the key."""
    pipe, ident = platform.pipeline, platform.identity
    return dict(guidance=params.guidance, text_scale=params.text_scale,
                image_scale=params.image_scale if params.guidance == "combined" else None, steps=params.steps,
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


# --- generate --------------------------------------------------------------------------------

@dataclass
class BatchResult:
    done: list[int] = field(default_factory=list)
    failed: list[int] = field(default_factory=list)
    skipped: list[int] = field(default_factory=list)  # done already, or held by another worker


def output_key(prefix: str, sku: str, identity: str) -> str:
    return f"{prefix}/{safe_key_part(sku)}/{identity[:20]}.png"


def sidecar_key(shot_key: str) -> str:
    return shot_key.removesuffix(".png") + ".json"


def text_only_key(shot_key: str) -> str:
    """Where a shot's text-only twin (same prompt and seed, no cache) is stored: beside the shot."""
    return shot_key.removesuffix(".png") + ".text-only.png"


def generate(platform: Platform, generation_ids: Sequence[int], output_prefix: str, batch_size: int = 16,
             compare_text_only: bool = False) -> BatchResult:
    """The batch function of a GPU worker: claim, generate, write images and sidecars, score, record.

    With `compare_text_only`, each shot's text-only twin is generated in the same pipeline call and
    stored beside it. The twin is no part of the generation's identity: asking for it regenerates nothing.
    """
    me = worker_id()
    with transaction(platform.sessions) as s:
        claimed = claims.claim(s, Generation, me, len(generation_ids), platform.lease,
                               [Generation.id.in_(list(generation_ids))])
    result = BatchResult(skipped=sorted(set(generation_ids) - set(claimed)))
    if not claimed:
        return result
    with transaction(platform.sessions) as s:
        rows = s.execute(
            select(Generation, Prompt.text, Subject).join(Prompt, Prompt.id == Generation.prompt_id)
            .join(SubjectCache, SubjectCache.id == Generation.subject_cache_id)
            .join(Subject, Subject.id == SubjectCache.subject_id).where(Generation.id.in_(claimed))
            .order_by(Generation.id)).all()
        references = {subject.id: _reference(platform, s, subject.id)[1] for _, _, subject in rows}
    caches = {}
    for gen, _, subject in rows:
        if gen.subject_cache_id not in caches:
            try:
                caches[gen.subject_cache_id] = load_cache(platform, gen.subject_cache_id)
            except Exception as exc:  # neither loadable nor recomputable: this product's images fail, not the batch
                caches[gen.subject_cache_id] = exc
    unusable = [(g, t, sub) for g, t, sub in rows if isinstance(caches[g.subject_cache_id], Exception)]
    if unusable:
        with transaction(platform.sessions) as s:
            for gen, _, subject in unusable:
                claims.fail(s, Generation, gen.id, me, f"feature cache of {subject.sku} unavailable: "
                                                       f"{caches[gen.subject_cache_id]}")
        result.failed += [g.id for g, _, _ in unusable]
        rows = [r for r in rows if not isinstance(caches[r[0].subject_cache_id], Exception)]
    size = batch_size
    while rows:
        part = rows[:size]
        # Renew the leases of what this call still holds: a long (or split) batch is not taken over.
        with transaction(platform.sessions) as s:
            claims.heartbeat(s, Generation, [g.id for g, _, _ in rows], me, platform.lease)
        try:
            _generate_part(platform, part, caches, references, output_prefix, compare_text_only, result)
        except GpuOutOfMemory as exc:
            if len(part) > 1:  # the images are fine, the batch is too large: retry smaller, keep that size
                size = max(1, len(part) // 2)
                logger.warning("out of GPU memory for a batch of %d images (generations %s): splitting it, "
                               "batches of %d from now on", len(part), [g.id for g, _, _ in part], size)
                _free_gpu_memory()
                continue
            gen, _, subject = part[0]
            with transaction(platform.sessions) as s:
                claims.fail(s, Generation, gen.id, me, f"out of GPU memory for a single image of {subject.sku} "
                                                       f"(generation {gen.id}): {exc.__cause__}")
            result.failed.append(gen.id)
        rows = rows[len(part):]
    return result


class GpuOutOfMemory(RuntimeError):
    """The pipeline ran out of GPU memory for a batch; a smaller batch may fit."""


def _is_out_of_memory(exc: BaseException) -> bool:
    import torch

    return isinstance(exc, torch.cuda.OutOfMemoryError)


def _free_gpu_memory() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _generate_part(platform, part, caches, references, output_prefix, compare_text_only: bool,
                   result: BatchResult) -> None:
    """Generate, write and record one batch; raises GpuOutOfMemory (nothing recorded) for the caller to split."""
    me, pipe, first = worker_id(), platform.pipeline, part[0][0]
    texts, seeds = [text for _, text, _ in part], [g.seed for g, _, _ in part]
    subjects = [caches[g.subject_cache_id] for g, _, _ in part]
    if compare_text_only:  # the twins as rows without a subject: each image depends on its own row only
        texts, seeds, subjects = texts * 2, seeds * 2, subjects + [None] * len(part)
    started = time.perf_counter()
    try:
        images = pipe(texts, subject=subjects, seed=seeds, guidance=first.guidance, guidance_scale=first.text_scale,
                      image_guidance_scale=first.image_scale, num_inference_steps=first.steps,
                      resolution=first.resolution, batch_size=len(texts), progress=False).images
    except Exception as exc:
        if _is_out_of_memory(exc):
            raise GpuOutOfMemory(f"out of GPU memory for a batch of {len(texts)} images") from exc
        logger.exception("generation batch %s failed", [g.id for g, _, _ in part])
        with transaction(platform.sessions) as s:
            for gen, _, _ in part:
                claims.fail(s, Generation, gen.id, me, f"{type(exc).__name__}: {exc}")
        result.failed += [g.id for g, _, _ in part]
        return
    seconds = (time.perf_counter() - started) / len(texts)  # per image, twins too: comparable across runs
    images, twins = images[: len(part)], images[len(part) :] or [None] * len(part)
    scores = (platform.scorer.score(images, [references[sub.id] for _, _, sub in part], [t for _, t, _ in part],
                                    [sub.category for _, _, sub in part],
                                    names=[f"{sub.sku} seed {g.seed}" for g, _, sub in part])
              if platform.scorer.available else [[] for _ in part])
    for (gen, text, subject), image, twin, image_scores in zip(part, images, twins, scores):
        identity = sha256(f"{subject.content_sha256}|{sha256(text)}|{gen.seed}|{gen.params_sha256}")
        key = output_key(output_prefix, subject.sku, identity)
        sidecar = dict(generation_id=gen.id, sku=subject.sku, category=subject.category, prompt=text, seed=gen.seed,
                       parameters=gen.parameters, scores={s.label: s.value for s in image_scores},
                       scorer_models=sorted({s.scorer_model_id for s in image_scores}))
        try:
            if twin is not None:  # written first: the sidecar that names it must not point to nothing
                sidecar["text_only_uri"] = platform.objects.put(text_only_key(key), _png(twin), "image/png").uri
            stored = platform.objects.put(key, _png(image), "image/png")
            platform.objects.put(sidecar_key(key), json.dumps(sidecar, indent=2).encode(), "application/json")
            with transaction(platform.sessions) as s:
                insert_missing(s, Score, [dict(generation_id=gen.id, metric=sc.metric, masked=sc.masked, value=sc.value,
                                               scorer_model_id=sc.scorer_model_id) for sc in image_scores])
                claims.complete(s, Generation, gen.id, me, output_uri=stored.uri, duration_s=seconds)
            result.done.append(gen.id)
        except claims.LostClaimError:
            result.skipped.append(gen.id)  # our lease ran out and another worker took it over
        except Exception as exc:  # an upload that failed after its retries: the item fails, the batch goes on
            with transaction(platform.sessions) as s:
                claims.fail(s, Generation, gen.id, me, f"writing results failed: {exc}")
            result.failed.append(gen.id)


# --- contact sheets and summary ----------------------------------------------------------------

def contact_sheets(platform: Platform, run_id: int, subject_ids: Sequence[int], output_prefix: str,
                   per_sheet: int = 12) -> dict[str, str]:
    """One contact sheet per product: reference, then its best shots of this run with their scores (each beside
    its text-only twin where the sidecar names one)."""
    sheets = {}
    with transaction(platform.sessions) as s:
        for subject in s.scalars(select(Subject).where(Subject.id.in_(subject_ids))):
            gens = s.execute(
                select(Generation, Prompt.text).join(Prompt, Prompt.id == Generation.prompt_id)
                .join(SubjectCache, SubjectCache.id == Generation.subject_cache_id)
                .where(SubjectCache.subject_id == subject.id, Generation.run_id == run_id,
                       Generation.status == WorkStatus.done).order_by(Generation.id)).all()
            if not gens:
                continue
            scores = _scores(s, [g.id for g, _ in gens])
            gens = sorted(gens, key=lambda g: -scores.get(g[0].id, {}).get("mdino", scores.get(g[0].id, {}).get("dino", 0)))
            shots, twins = [], []
            for gen, text in gens[:per_sheet]:
                key = platform.objects.key_of(gen.output_uri)
                values = "  ".join(f"{k} {v:.2f}" for k, v in sorted(scores.get(gen.id, {}).items()))
                shots.append((_image(platform, key), f"{text} (seed {gen.seed}) {values}"))
                twin_uri = json.loads(platform.objects.get(sidecar_key(key))).get("text_only_uri")
                twins.append((_image(platform, platform.objects.key_of(twin_uri)), f"{text} (seed {gen.seed})")
                             if twin_uri else None)
            _, reference = _reference(platform, s, subject.id)
            sheet = contact_sheet(reference, shots, title=f"{subject.sku} ({subject.category or 'product'})",
                                  text_only=twins)
            key = f"{output_prefix}/{safe_key_part(subject.sku)}/contact_sheet.png"
            sheets[subject.sku] = platform.objects.put(key, _png(sheet), "image/png").uri
    return sheets


def _image(platform: Platform, key: str) -> Image.Image:
    return Image.open(io.BytesIO(platform.objects.get(key)))


def _scores(s, generation_ids) -> dict[int, dict[str, float]]:
    out: dict[int, dict[str, float]] = {}
    for score in s.scalars(select(Score).where(Score.generation_id.in_(generation_ids))):
        out.setdefault(score.generation_id, {})[("m" if score.masked else "") + score.metric] = score.value
    return out


def summarise(platform: Platform, run_id: int, listed: int, subject_ids, cache_ids, planned: int,
              sheets: dict[str, str], output_prefix: str) -> dict:
    with transaction(platform.sessions) as s:
        counts = dict(s.execute(select(Generation.status, func.count()).where(Generation.run_id == run_id)
                                .group_by(Generation.status)).all())
        rejected = [dict(stage=r.stage, item=r.item, reason=r.reason)
                    for r in s.scalars(select(RejectedItem).where(RejectedItem.run_id == run_id).order_by(RejectedItem.id))]
    return dict(
        products_listed=listed, products_ingested=len(subject_ids), products_cached=len(cache_ids),
        rejected=len(rejected), rejections=rejected[:100], images_planned=planned,
        images_generated=counts.get(WorkStatus.done, 0), images_failed=counts.get(WorkStatus.failed, 0),
        images_open=counts.get(WorkStatus.pending, 0) + counts.get(WorkStatus.running, 0),
        contact_sheets=sheets, output=platform.objects.uri(output_prefix),
    )


def dry_run(platform: Platform, params: CatalogueRunParams) -> dict:
    """What a run would do: inputs listed and validated, prompts read, images counted; nothing written."""
    listing = list_source(params.source)
    bad = list(listing.rejected)
    for item in listing.items:
        try:
            decode_image(read_uri(item.uri), item.uri)
        except Exception as exc:
            bad.append((item.uri, str(exc)))
    good = len(listing.items) - (len(bad) - len(listing.rejected))
    prompts = load_prompts(params)
    return dict(dry_run=True, products_listed=len(listing.items), products_valid=good, rejected=len(bad),
                rejections=[dict(stage="ingest", item=i, reason=r) for i, r in bad[:100]], prompts=len(prompts),
                images_planned=good * len(prompts) * params.images_per_prompt)


def best_scores(platform: Platform, run_id: int) -> list[dict]:
    """Per product of the run: images generated and its best score of each metric."""
    rows: dict[str, dict] = {}
    with transaction(platform.sessions) as s:
        done = s.execute(
            select(Subject.sku, Generation.id).join(SubjectCache, SubjectCache.subject_id == Subject.id)
            .join(Generation, Generation.subject_cache_id == SubjectCache.id)
            .where(Generation.run_id == run_id, Generation.status == WorkStatus.done)).all()
        scores = _scores(s, [g for _, g in done])
    for sku, generation_id in done:
        row = rows.setdefault(sku, {"sku": sku, "images": 0})
        row["images"] += 1
        for metric, value in scores.get(generation_id, {}).items():
            row[f"best_{metric}"] = round(max(value, row.get(f"best_{metric}", -1.0)), 4)
    return sorted(rows.values(), key=lambda r: r["sku"])
