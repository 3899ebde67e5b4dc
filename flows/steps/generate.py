"""Generate: a GPU worker's batch claimed, generated, written with sidecars, scored and recorded."""

from __future__ import annotations

import json
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from typing import Callable, Literal, Sequence

from PIL import Image
from sqlalchemy import delete, select
from sqlalchemy.exc import DBAPIError

from db import claims
from db.models import Generation, Prompt, Score, Segmentation, Subject, SubjectCache
from db.repository import insert_missing
from db.session import in_transaction, transaction
from dreamcache.core.images import decode_image
from dreamcache.core.placement import PlacedProduct, Placement
from dreamcache.perception.scoring import canonical_name, metric_name
from flows.platform import liveness
from flows.platform.resources import Platform, worker_id
from flows.steps.caches import load_cache
from flows.steps.generation_settings import GenerationSettings
from flows.steps.layout import output_key, sidecar_key, text_only_key
from flows.steps.shared import giving_back, png, product_image, read_image, reference, sha256

logger = logging.getLogger(__name__)


@dataclass
class BatchResult:
    done: list[int] = field(default_factory=list)
    failed: list[int] = field(default_factory=list)
    skipped: list[int] = field(default_factory=list)  # done already, or held by another worker
    # Told how many images settled (done, failed or skipped) as each does, from the thread that settled them:
    # a progress bar moves per image rather than once per call.
    on_settled: Callable[[int], None] | None = field(default=None, repr=False, compare=False)
    # Told (shots in the batch, steps done, steps) after each denoising step: on a CPU a batch takes minutes.
    on_step: Callable[[int, int, int], None] | None = field(default=None, repr=False, compare=False)

    def add(self, outcome: Literal["done", "failed", "skipped"], ids: Sequence[int]) -> None:
        getattr(self, outcome).extend(ids)
        if self.on_settled and ids:
            self.on_settled(len(ids))


def sidecar(gen: Generation, subject: Subject, prompt: str, scores: Sequence[dict], text_only_uri: str | None) -> bytes:
    """A shot's JSON sidecar: what the database says of it, so that it can be written again from there.

    `scores` are score rows (metric, masked, value, scorer_model_id)."""
    document = dict(generation_id=gen.id, sku=subject.sku, category=subject.category, prompt=prompt, seed=gen.seed,
                    parameters=gen.parameters,
                    scores=dict(sorted((metric_name(sc["metric"], sc["masked"]), sc["value"]) for sc in scores)),
                    scorer_models=sorted({sc["scorer_model_id"] for sc in scores}))
    if text_only_uri:
        document["text_only_uri"] = text_only_uri
    return json.dumps(document, indent=2).encode()


def read_sidecar(data: bytes) -> dict:
    """A sidecar as written by any version: score names in today's spelling (older sidecars wrote "mclip-i")."""
    document = json.loads(data)
    document["scores"] = {canonical_name(name): value for name, value in document.get("scores", {}).items()}
    return document


def generate(platform: Platform, generation_ids: Sequence[int], output_prefix: str, batch_size: int = 16,
             compare_text_only: bool = False, on_settled: Callable[[int], None] | None = None,
             on_step: Callable[[int, int, int], None] | None = None) -> BatchResult:
    """The batch function of a GPU worker: claim, generate, write images and sidecars, score, record.

    With `compare_text_only`, each shot's text-only twin is generated in the same pipeline call and
    stored beside it. The twin is no part of the generation's identity: asking for it regenerates nothing.
    `on_settled(n)` is called as images are recorded (done or failed) or found taken, `n` at a time;
    `on_step(shots, k, steps)` after each denoising step of a batch of `shots`.
    """
    me = worker_id()
    platform.heartbeat.start()  # what this process claims stays claimed only while it lives
    with transaction(platform.sessions) as s:
        claimed = claims.claim(s, Generation, me, len(generation_ids), platform.lease,
                               [Generation.id.in_(list(generation_ids))], dead_owners=liveness.dead_owners(s, Generation))
    result = BatchResult(on_settled=on_settled, on_step=on_step)
    result.add("skipped", sorted(set(generation_ids) - set(claimed)))
    if claimed:
        with giving_back(platform, Generation, claimed):
            _generate_claimed(platform, claimed, output_prefix, batch_size, compare_text_only, result)
    return result


def _generate_claimed(platform: Platform, claimed: list[int], output_prefix: str, batch_size: int,
                      compare_text_only: bool, result: BatchResult) -> None:
    me = worker_id()
    with transaction(platform.sessions) as s:
        rows = s.execute(
            select(Generation, Prompt.text, Subject).join(Prompt, Prompt.id == Generation.prompt_id)
            .join(SubjectCache, SubjectCache.id == Generation.subject_cache_id)
            .join(Subject, Subject.id == SubjectCache.subject_id).where(Generation.id.in_(claimed))
            .order_by(Generation.id)).all()
        cutouts = {subject.id: reference(platform, s, subject.id) for _, _, subject in rows}  # (segmentation, image)
    references = {subject_id: image for subject_id, (_, image) in cutouts.items()}
    placed = {}  # (subject id, placement) -> the product to place, for the rows in place mode
    for gen, _, subject in rows:
        where = GenerationSettings.of(gen).placement
        if where is not None and (subject.id, _key(where)) not in placed:
            try:
                placed[subject.id, _key(where)] = product_to_place(platform, subject, cutouts[subject.id][0], where)
            except Exception as exc:  # this product's shots fail (with the reason), not the batch
                placed[subject.id, _key(where)] = exc
    caches = {}
    for gen, _, subject in rows:
        if gen.subject_cache_id not in caches:
            try:
                caches[gen.subject_cache_id] = load_cache(platform, gen.subject_cache_id)
            except Exception as exc:  # neither loadable nor recomputable: this product's images fail, not the batch
                caches[gen.subject_cache_id] = exc
    problems = {}
    for gen, _, subject in rows:
        if isinstance(caches[gen.subject_cache_id], Exception):
            problems[gen.id] = f"feature cache of {subject.sku} unavailable: {caches[gen.subject_cache_id]}"
        elif isinstance(_placed(placed, gen, subject), Exception):
            problems[gen.id] = f"the product photo of {subject.sku} cannot be placed: {_placed(placed, gen, subject)}"
    if problems:
        with transaction(platform.sessions) as s:
            for generation_id, problem in problems.items():
                claims.fail(s, Generation, generation_id, me, problem)
        result.add("failed", sorted(problems))
        rows = [r for r in rows if r[0].id not in problems]
    # A batch is one canvas size: rows of the same size together, in generation order within each.
    rows.sort(key=lambda r: (_canvas(r[0]), r[0].id))
    size = batch_size
    # Two stages: this thread denoises (and scores) part k + 1 while the writer encodes, uploads and records part k,
    # so the GPU does not wait for the CPU and the object store (one writer: parts are recorded in order).
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="shot-writer") as writer:
        written = []
        while rows:
            part = [r for r in rows[:size] if _canvas(r[0]) == _canvas(rows[0][0])]
            # Renew the leases of what this call still holds: a long (or split) batch is not taken over.
            held = [g.id for g, _, _ in rows]
            in_transaction(platform.sessions, lambda s: claims.heartbeat(s, Generation, held, me, platform.lease))
            try:
                finish = _generate_part(platform, part, caches, references, placed, output_prefix, compare_text_only,
                                        result)
                if finish is not None:
                    written.append(writer.submit(finish))
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
                result.add("failed", [gen.id])
            rows = rows[len(part):]
        for done in written:
            done.result()  # a writer's unexpected error is this call's: raised, and what it held is given back


class GpuOutOfMemory(RuntimeError):
    """The pipeline ran out of GPU memory for a batch; a smaller batch may fit."""


def _is_out_of_memory(exc: BaseException) -> bool:
    import torch

    return isinstance(exc, torch.cuda.OutOfMemoryError)


def _free_gpu_memory() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _key(placement: dict) -> tuple:
    return tuple(sorted(placement.items()))


def _placed(placed: dict, gen: Generation, subject: Subject):
    where = GenerationSettings.of(gen).placement
    return None if where is None else placed[subject.id, _key(where)]


def _canvas(gen: Generation) -> tuple[int, int]:
    """The size a shot is generated at (`plan.generation_canvas`): its format's canvas, or the square."""
    return GenerationSettings.of(gen).canvas_size


# What a shot placed before the edge band, the limited cache and the shadow existed was made with (its recorded
# placement names none of them): made again, it is made as it was.
BEFORE_ISSUE_37 = dict(edge_band=0.0, cache_band=None, shadow="none")


def product_to_place(platform: Platform, subject: Subject, seg: Segmentation, where: dict) -> PlacedProduct:
    """A product's photo and mask (its cut-out `seg`), to be kept pixel-exact where `where` says."""
    photo = decode_image(product_image(platform, subject), subject.source_uri)
    mask = read_image(platform, platform.objects.key_of(seg.mask_uri)).convert("L")
    return PlacedProduct.from_photo(photo, mask, Placement(**(BEFORE_ISSUE_37 | where)))


def negative_prompt(gen: Generation, subject: Subject) -> str:
    """A shot's negative prompt: the run's, and in place mode the product's category ("a mug"), so that the
    scene has no second one."""
    settings = GenerationSettings.of(gen)
    texts = [settings.negative_prompt]
    if settings.negative_category and subject.category:
        texts.append(f"a {subject.category}")
    return ", ".join(t for t in texts if t)


def _generate_part(platform, part, caches, references, placed, output_prefix, compare_text_only: bool,
                   result: BatchResult) -> Callable[[], None] | None:
    """Generate one batch; returns the function that scores, writes and records it (for the writer thread),
    or None when the batch failed (recorded). Raises GpuOutOfMemory (nothing recorded) for the caller to split."""
    me, pipe, first = worker_id(), platform.pipeline, GenerationSettings.of(part[0][0])  # one run's: the part's
    texts, seeds = [text for _, text, _ in part], [g.seed for g, _, _ in part]
    subjects = [caches[g.subject_cache_id] for g, _, _ in part]
    products = [_placed(placed, g, sub) for g, _, sub in part]
    negatives = [negative_prompt(g, sub) for g, _, sub in part]
    if compare_text_only:  # the twins as rows without a subject: each image depends on its own row only
        texts, seeds, subjects, negatives = texts * 2, seeds * 2, subjects + [None] * len(part), negatives * 2
        products = products * 2  # a placed shot's twin places the product too: the cache's effect is the difference
    width, height = first.canvas_size
    started = time.perf_counter()
    try:
        images = pipe(texts, subject=subjects, seed=seeds, guidance=first.guidance, guidance_scale=first.text_scale,
                      image_guidance_scale=first.image_scale, num_inference_steps=first.steps,
                      width=width, height=height, placed=products if any(products) else None,
                      batch_size=len(texts), progress=False,
                      on_step=(lambda done: result.on_step(len(part), done, first.steps)) if result.on_step else None,
                      sampler=first.scheduler, eta=first.eta, negative_prompt=negatives,
                      deep_reuse_interval=first.deep_reuse_interval).images
    except Exception as exc:
        if _is_out_of_memory(exc):
            raise GpuOutOfMemory(f"out of GPU memory for a batch of {len(texts)} images") from exc
        logger.exception("generation batch %s failed", [g.id for g, _, _ in part])
        with transaction(platform.sessions) as s:
            for gen, _, _ in part:
                claims.fail(s, Generation, gen.id, me, f"{type(exc).__name__}: {exc}")
        result.add("failed", [g.id for g, _, _ in part])
        return None
    seconds = (time.perf_counter() - started) / len(texts)  # per image, twins too: comparable across runs
    images, twins = images[: len(part)], images[len(part) :] or [None] * len(part)
    # Scored here, on this thread: the GPU's work stays on one thread (a CUDA-graph capture must not meet
    # another thread's kernels); the writer gets only CPU and I/O work.
    scores = (platform.scorer.score(images, [references[sub.id] for _, _, sub in part], [t for _, t, _ in part],
                                    [sub.category for _, _, sub in part],
                                    names=[f"{sub.sku} seed {g.seed}" for g, _, sub in part])
              if platform.scorer.available else [[] for _ in part])
    return partial(_write_part, platform, part, images, twins, scores, products[: len(part)], output_prefix, seconds,
                   result)


def delivered(image: Image.Image, gen: Generation, product: PlacedProduct | None) -> Image.Image:
    """A shot as the shop gets it: resized to its format's size (the scene only; never cropped), and in place
    mode the product's own pixels pasted again at that size, from the full-resolution photo."""
    size, canvas = GenerationSettings.of(gen).size or image.size, image.size
    if size != canvas:
        image = image.resize(size, Image.Resampling.LANCZOS)
        if product is not None:  # where the scene was generated around it, scaled with the scene
            image = product.composite(image, generated_at=canvas)
    return image


def _write_part(platform, part, images, twins, scores, products, output_prefix: str, seconds: float,
                result: BatchResult) -> None:
    """Write each shot of a generated batch, its twin and its sidecar (PNG encoding, uploads), and record it
    done with its scores (or failed)."""
    me = worker_id()
    for (gen, text, subject), image, twin, image_scores, product in zip(part, images, twins, scores, products):
        image = delivered(image, gen, product)
        twin = delivered(twin, gen, product) if twin is not None else None
        identity = sha256(f"{subject.content_sha256}|{sha256(text)}|{gen.seed}|{gen.params_sha256}")
        key = output_key(output_prefix, subject.sku, identity)
        score_rows = [dict(generation_id=gen.id, metric=sc.metric, masked=sc.masked, value=sc.value,
                           scorer_model_id=sc.scorer_model_id) for sc in image_scores]
        written = []  # keys of this shot's objects written so far: removed again if the shot fails
        try:
            twin_uri = None
            if twin is not None:  # written first: the sidecar that names it must not point to nothing
                twin_uri = platform.objects.put(text_only_key(key), png(twin), "image/png").uri
                written.append(text_only_key(key))
            stored = platform.objects.put(key, png(image), "image/png")
            written.append(key)
            platform.objects.put(sidecar_key(key), sidecar(gen, subject, text, score_rows, twin_uri), "application/json")
            written.append(sidecar_key(key))
            # A database restart under the recording loses nothing: the transaction is run again.
            in_transaction(platform.sessions, partial(_record_done, gen.id, me, stored, seconds, score_rows))
            result.add("done", [gen.id])
        except claims.LostClaimError:
            result.add("skipped", [gen.id])  # our lease ran out and another worker took it over
        except DBAPIError:
            raise  # the database's fault, not the shot's: the run fails with it, and a re-run records the shot
        except Exception as exc:  # an upload that failed after its retries: the item fails, the batch goes on
            _remove(platform, written)
            with transaction(platform.sessions) as s:
                claims.fail(s, Generation, gen.id, me, f"writing results failed: {exc}")
            result.add("failed", [gen.id])


def _record_done(generation_id: int, me: str, stored, seconds: float, score_rows: list[dict], s) -> None:
    # A shot made again (it was lost or damaged) is scored again: its old image's scores go.
    s.execute(delete(Score).where(Score.generation_id == generation_id))
    insert_missing(s, Score, score_rows)
    claims.complete(s, Generation, generation_id, me, output_uri=stored.uri, output_sha256=stored.sha256,
                    output_bytes=stored.size, duration_s=seconds)


def _remove(platform: Platform, keys: Sequence[str]) -> None:
    """The objects of a shot that failed half-way: no row points to them, and on a full disk they hold space."""
    for key in keys:
        try:
            platform.objects.delete(key)
        except Exception as exc:  # the shot has failed already; a leftover is overwritten when it is made again
            logger.warning("%s of a failed shot is left in place: %s", key, exc)
