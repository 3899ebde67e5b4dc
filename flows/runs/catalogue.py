"""The catalogue run: ingest, segment, cache once, generate in batches, score, write back.

One orchestration, two ways to run it. On Prefect (`catalogue_run`, a deployment, the UI) every
step is a task, the unit of retry; generation goes out in batches, in-process or to long-lived GPU
task workers, and large plans are sharded into child flow runs. Embedded (`run_embedded`, the
CLI without a Prefect server) the same steps run directly in this process with a progress bar.
Tasks take and return keys (ids, URIs), never images or tensors. What the run shows in the UI (its
artifacts) is flows/runs/run_report.py's; how the platform's log lines reach a run's logs, flows/runs/run_logs.py's.

(No `from __future__ import annotations` here: Prefect reads the flow's parameter types at run time.)
"""


import logging
import threading
import time
from typing import Callable, NamedTuple, Sequence
from uuid import UUID

from prefect import flow, task
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel
from tqdm.auto import tqdm

from sqlalchemy import select

from db.models import RejectedItem
from db.session import transaction
from dreamcache.core.schedulers import TAKES_ETA
from flows.platform.places import InvalidInputs, Places
from flows.steps.source import IMAGE_SUFFIXES, Listing, SourceItem, list_source
from flows.steps.prompts import Prompts, check_templates, load_prompts
from flows.steps import publish, review
from flows.steps import assets, caches, generate, ingest, plan, run_record, segment, sheets
from flows.steps.shared import chunks
from flows.platform import liveness
from flows.platform.failures import is_expected, one_line, retry_unless_permanent
from flows.platform.params import CatalogueRunParams, parse_rule, shop_formats
from flows.platform.resources import get_platform, require_named_stores
from flows.runs.run_logs import log_platform_info, send_platform_logs_to_prefect
from flows.runs.run_report import report_run, thumbnail
from flows.steps.run_summary import DryRunSummary, RunSummary

# Named, not __name__: a worker runs this file as the script `catalogue`, and only the platform's loggers
# (PLATFORM_LOGGERS) reach the flow run's logs.
logger = logging.getLogger("flows.runs.catalogue")

# Products per ingest/segment/cache/contact-sheet task: 10,000 products make ~630 task runs.
INGEST_BATCH = 64
# Generation batches per generation task: within a task, one batch is written out (PNGs, uploads, database)
# while the next is denoised, so the GPU does not wait for the writes (`steps.generate`).
TASK_BATCHES = 4


# Tasks: each reads its inputs from the database and object store by key, so a retry is safe.
# NO_CACHE: whether work is done is the database's answer, never a cached task result.
step_task = task(retries=2, retry_delay_seconds=5, retry_condition_fn=retry_unless_permanent, cache_policy=NO_CACHE)


@step_task
def ingest_task(run_id: int, items: list[SourceItem], places: Places) -> list[int]:
    return ingest.ingest(get_platform(), run_id, items, places)


@step_task
def segment_task(run_id: int, subject_ids: list[int]) -> list[int]:
    return segment.segment(get_platform(), run_id, subject_ids)


@step_task
def cache_task(run_id: int, subject_ids: list[int], preparation: caches.Preparation) -> list[int]:
    return caches.cache(get_platform(), run_id, subject_ids, preparation)


@step_task
def plan_task(run_id: int, cache_ids: list[int], params: CatalogueRunParams, templates: list[str]) -> dict:
    return plan.plan(get_platform(), run_id, cache_ids, params, templates)


@task(retries=2, retry_delay_seconds=10, retry_condition_fn=retry_unless_permanent, cache_policy=NO_CACHE)
def generate_task(generation_ids: list[int], output_prefix: str, batch_size: int,
                  compare_text_only: bool) -> dict:
    result = generate.generate(get_platform(), generation_ids, output_prefix, batch_size, compare_text_only)
    return dict(done=len(result.done), failed=len(result.failed), skipped=len(result.skipped))


@step_task
def contact_sheets_task(subject_ids: list[int], output_prefix: str) -> dict[str, str]:
    return sheets.contact_sheets(get_platform(), subject_ids, output_prefix)


@step_task
def assets_task(run_id: int, subject_ids: list[int], output_prefix: str, formats: list[str], cutout: bool,
                packshot: bool) -> dict[str, list[str]]:
    return assets.product_assets(get_platform(), run_id, subject_ids, output_prefix, shop_formats(formats), cutout,
                                 packshot)


@step_task
def approve_task(generation_ids: list[int], approve_if: list[str], keep_best: int) -> dict:
    return review.auto_approve(get_platform(), generation_ids, [parse_rule(rule) for rule in approve_if], keep_best)


@step_task
def publish_task(run_id: int, prefix: str) -> dict:
    return publish.publish(get_platform(), run_id, prefix)


class Runner:
    """How the orchestration executes a task over many inputs, and reports progress."""

    def map(self, fn, args: Sequence[tuple]) -> list:
        raise NotImplementedError

    def generate(self, run_id: int, todo: list[int], params: CatalogueRunParams) -> None:
        raise NotImplementedError

    def report(self, summary: RunSummary) -> None:
        pass


class EmbeddedRunner(Runner):
    """Everything in this process, no Prefect server: the tasks' functions called directly."""

    def __init__(self, progress: bool = True):
        self.progress = progress

    def map(self, fn, args):
        return [fn.fn(*a) for a in args]

    def generate(self, run_id, todo, params):
        # The bar moves as each image is recorded, with tqdm's rate, and says which step the batch being denoised
        # is at (on a CPU a batch takes minutes). Images are recorded on the generation's writer thread as well
        # as this one, hence the lock.
        lock = threading.Lock()
        with tqdm(total=len(todo), desc="generating", unit="image", disable=not self.progress) as bar:
            def advance(images: int) -> None:
                with lock:
                    bar.update(images)

            def stepped(shots: int, step: int, steps: int) -> None:
                with lock:
                    bar.set_postfix_str(f"batch of {shots}: step {step}/{steps}")

            for batch in chunks(todo, params.batch_size * TASK_BATCHES):
                generate.generate(get_platform(), batch, params.output_prefix, params.batch_size,
                                  params.compare_text_only, on_settled=advance, on_step=stepped)


class PrefectRunner(Runner):
    """Tasks submitted in the current flow run; generation sharded into child flow runs."""

    def map(self, fn, args):
        futures = [fn.submit(*a) for a in args]
        return [f.result() for f in futures]

    def generate(self, run_id, todo, params):
        from prefect.artifacts import create_progress_artifact

        progress_id = create_progress_artifact(progress=0.0, description="Images generated in this run (%)")
        shards = chunks(todo, params.shard_size)
        done = 0
        for index, shard in enumerate(shards):
            progress = Progress(artifact_id=progress_id, done=done, total=len(todo))
            if len(shards) == 1:
                generate_batches(shard, params, progress)
            else:
                generate_shard.with_options(flow_run_name=f"run-{run_id}-shard-{index + 1}-of-{len(shards)}")(
                    shard, params, progress)
            done += len(shard)

    def report(self, summary: RunSummary) -> None:
        report_run(summary)
        logger.info("run %s %s: %s products listed, %s ingested, %s cached, %s inputs rejected; %s images generated, "
                    "%s failed; output %s", summary.run_id, summary.status, summary.products_listed,
                    summary.products_ingested, summary.products_cached, summary.rejected, summary.images_generated,
                    summary.images_failed, summary.output)


# On load of this file, in every process that runs the flow or its tasks (a worker runs it as the script
# `catalogue`): the platform's log lines made in a run go to that run's logs (flows/runs/run_logs.py).
send_platform_logs_to_prefect()


class Progress(BaseModel):
    """The run's progress artifact, updated as batches finish (also from child runs)."""

    artifact_id: UUID | None = None
    done: int = 0
    total: int = 1

    def advance(self, images: int) -> None:
        from prefect.artifacts import update_progress_artifact

        self.done += images
        if self.artifact_id:
            update_progress_artifact(artifact_id=self.artifact_id, progress=min(100.0, 100.0 * self.done / self.total))


def wait_for_deferred(future, patience_s: float = 60.0) -> None:
    """Wait for a task sent to the task workers (`.delay()`).

    `.delay()` returns before the server has given the task run its first state, and Prefect's
    `wait()` raises "has no state ... hasn't started yet" when it reads the run in that moment (seen
    under load with a few dozen deferred batches); that is not a failure, so ask again.
    """
    deadline = time.monotonic() + patience_s
    while True:
        try:
            return future.wait()
        except RuntimeError as exc:
            if "has no state" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def generate_batches(todo: list[int], params: CatalogueRunParams, progress: Progress) -> None:
    batches = chunks(todo, params.batch_size * TASK_BATCHES)
    if params.execution == "task-workers":
        # Long-lived GPU workers (`dreamcache worker`) run these; the results are in the database.
        futures = [generate_task.delay(batch, params.output_prefix, params.batch_size,
                                         params.compare_text_only) for batch in batches]
        for batch, future in zip(batches, futures):
            wait_for_deferred(future)
            progress.advance(len(batch))
            logger.info("batch of %d images finished (%d of %d)", len(batch), progress.done, progress.total)
    else:
        for batch in batches:  # one at a time: one job per GPU
            result = generate_task(batch, params.output_prefix, params.batch_size, params.compare_text_only)
            progress.advance(len(batch))
            logger.info("batch of %d images: %d done, %d failed, %d already made (%d of %d)", len(batch),
                        result["done"], result["failed"], result["skipped"], progress.done, progress.total)


@flow(name="catalogue-shard", persist_result=False)
def generate_shard(generation_ids: list[int], params: CatalogueRunParams, progress: Progress) -> None:
    """A child run generating one shard of a large plan (keeps each flow run small)."""
    log_platform_info()
    generate_batches(generation_ids, params, progress)


def orchestrate(params: CatalogueRunParams, runner: Runner, flow_run_id: str | None = None,
                name: str | None = None, on_stage: Callable[[str], None] = lambda stage: None,
                ) -> RunSummary | DryRunSummary:
    platform = get_platform()
    recommended = params.recommended(platform.settings.recommended)
    try:
        params = params.with_recommended(recommended)
    except ValueError as exc:  # an eta the preset's sampler does not take
        raise InvalidInputs(f"{exc}, or name the {' or '.join(TAKES_ETA)} sampler (the {params.preset} preset samples with "
                            f"{recommended.sampler})") from None
    preparation = caches.Preparation(params.negative_prompt, recommended.reference_mode, recommended.latent)
    on_stage("checking inputs")
    inputs = prepare(params, Places.for_run(params.source, platform.settings.allowed_sources))
    if params.dry_run:
        return run_record.dry_run(params, inputs)
    platform.migrate()
    run_id = run_record.start_run(platform, params, flow_run_id, name)
    removed = platform.objects.remove_stale_temporaries()
    if removed:
        logger.info("removed %d temporary objects left by writers that died", removed)
    try:
        listing, prompts, places = inputs
        run_record.reject(platform, run_id, "ingest", listing.rejected)
        run_record.reject(platform, run_id, "prompts", prompts.rejected)
        if listing.skipped:
            logger.warning("run %d: %d files of %s are not product images and are skipped (e.g. %s)", run_id,
                           len(listing.skipped), params.source, ", ".join(listing.skipped[:5]))
        logger.info("run %d: %d products listed from %s (%d rejected), %d prompts", run_id, len(listing.items),
                    params.source, len(listing.rejected), len(prompts.templates))
        batches = chunks(listing.items, INGEST_BATCH)
        on_stage(f"ingesting {len(listing.items)} products")
        subject_ids = sorted({i for ids in runner.map(ingest_task, [(run_id, b, places) for b in batches])
                              for i in ids})
        logger.info("run %d: %d products ingested", run_id, len(subject_ids))
        on_stage("segmenting")
        groups = chunks(subject_ids, INGEST_BATCH)
        usable = [i for ids in runner.map(segment_task, [(run_id, g) for g in groups]) for i in ids]
        on_stage("caching")
        cache_ids = [i for ids in runner.map(cache_task, [(run_id, g, preparation)
                                                          for g in chunks(usable, INGEST_BATCH)]) for i in ids]
        planned = runner.map(plan_task, [(run_id, cache_ids, params, prompts.templates)])[0]
        if not planned["planned"]:
            with transaction(platform.sessions) as session:
                waiting = caches.open_caches(session, platform, usable, preparation)
            if not waiting:  # else another run holds the caches: this one ends incomplete, naming them
                raise NothingPlanned(nothing_planned(platform, run_id, len(listing.items), len(cache_ids)))
        todo = planned["todo"]
        made = len(planned["planned"]) - len(todo)  # done by earlier runs (or this one's earlier attempt)
        logger.info("run %d: %d products cached; %d images already made, %d to generate in batches of %d (%s)",
                    run_id, len(cache_ids), made, len(todo), params.batch_size, params.execution)
        if todo:
            platform.load("scorer")
        on_stage(f"images: {made} already made, {len(todo)} to do")
        runner.generate(run_id, todo, params)
        on_stage("contact sheets")
        sheet_uris = {}
        for part in runner.map(contact_sheets_task,
                               [(g, params.output_prefix) for g in chunks(usable, INGEST_BATCH)]):
            sheet_uris.update(part)
        asset_uris = {}
        if params.cutout or params.packshot:
            on_stage("cut-outs and packshots")
            for part in runner.map(assets_task, [(run_id, g, params.output_prefix, params.formats, params.cutout,
                                                  params.packshot) for g in chunks(usable, INGEST_BATCH)]):
                asset_uris.update(part)
        # The run's own rules approve what passes them; the rest waits for a reviewer.
        runner.map(approve_task, [(planned["planned"], params.approve_if, params.keep_best)])
        with transaction(platform.sessions) as session:
            caches_open = caches.open_caches(session, platform, usable, preparation)
        summary = run_record.summarise(
            platform, run_id, len(listing.items) + len(listing.rejected), subject_ids, cache_ids, len(todo), sheet_uris,
            params.output_prefix, caches_open, already_made=made, repaired=planned["repaired"], assets=asset_uris,
            skipped=listing.skipped)
    except KeyboardInterrupt:
        run_record.cancel_run(platform, run_id, "interrupted (SIGINT)")
        raise
    except liveness.Cancelled as exc:
        run_record.cancel_run(platform, run_id, f"stopped ({exc})")
        raise
    except Exception as exc:
        run_record.finish_run(platform, run_id, {}, error=f"{type(exc).__name__}: {exc}")
        raise
    run_record.finish_run(platform, run_id, summary)
    runner.report(summary)
    return summary


class NothingPlanned(InvalidInputs):
    """A run whose products and prompts make no image at all: it fails, naming why, rather than completing."""


def nothing_planned(platform, run_id: int, listed: int, cached: int) -> str:
    """Why a run planned no image, in one line: how far its products got, and its first rejection."""
    with transaction(platform.sessions) as session:
        first = session.execute(select(RejectedItem.stage, RejectedItem.item, RejectedItem.reason)
                                .where(RejectedItem.run_id == run_id).order_by(RejectedItem.id.desc())).first()
    why = f"; the last rejection, at {first.stage}: {first.item}: {first.reason}" if first else ""
    return (f"run {run_id} planned no image: of {listed} products {cached} were cached, and no prompt could be made "
            f"for any of them{why}")


class Inputs(NamedTuple):
    listing: Listing
    prompts: Prompts
    places: Places


def prepare(params: CatalogueRunParams, places: Places) -> Inputs:
    """Everything a run reads before it works, checked: the source lies in the run's places and lists at
    least one usable product; the prompt file exists, is text and holds prompts. A problem here stops
    the run before anything is written (InvalidInputs); a bad product or prompt line is only rejected."""
    listing = list_source(params.source, places)
    prompts = load_prompts(params, places)
    # A template naming a manifest column that a product lacks: that product and template are rejected now,
    # with the reason; a product no template can be filled for is not ingested at all.
    unusable, pairs = check_templates(listing.items, prompts.templates)
    prompts.rejected.extend(pairs)
    if unusable and len(unusable) == len(listing.items):
        raise InvalidInputs(f"no product of {params.source} can fill any prompt template (the first, {pairs[0][0]}: "
                            f"{pairs[0][1]})")
    dropped = set(unusable)
    listing.items[:] = [item for item in listing.items if item.sku not in dropped]
    listing.rejected.extend((sku, "no prompt template can be filled for it: each names a column it has no value "
                                  "for (see the rejections at prompts)") for sku in unusable)
    if not listing.items:
        if not listing.rejected:
            raise InvalidInputs(f"source {params.source} holds no product images "
                                f"({', '.join(sorted(IMAGE_SUFFIXES))}); check the folder or prefix")
        item, reason = listing.rejected[0]
        raise InvalidInputs(f"source {params.source}: none of its {len(listing.rejected)} products can be used "
                            f"(the first, {item}: {reason})")
    return Inputs(listing, prompts, places)


@flow(name="catalogue-run", flow_run_name="catalogue-{params.output_prefix}", persist_result=False)
def catalogue_run(params: CatalogueRunParams) -> dict:
    """Personalised product shots for a catalogue: ingest, segment, cache once, generate, score, write back.
    Returns the run's summary as its record keeps it (`RunSummary.as_record`: JSON, for the API and the UI)."""
    from prefect import get_run_logger
    from prefect.runtime import flow_run
    from prefect.states import Failed

    log_platform_info()
    try:
        require_named_stores(get_platform().settings, f"flow run {flow_run.name}")
        summary = orchestrate(params, PrefectRunner(), flow_run_id=str(flow_run.id), name=flow_run.name)
        if isinstance(summary, RunSummary) and summary.status == "completed":
            summary = review_and_publish(params, summary, on_prefect=True)
    except Exception as exc:
        # The run's state says why in one line, the line `dreamcache run` prints after "error:"; calling the
        # flow raises `exc` itself. A failure named on purpose (a bad input, S3's NoSuchBucket) needs no
        # traceback; anything else (a bug) gets its traceback in the run's log.
        if not is_expected(exc):
            get_run_logger().error("the run failed: %s", one_line(exc), exc_info=exc)
        return Failed(message=one_line(exc), data=exc)
    if isinstance(summary, RunSummary) and summary.status == "incomplete":  # the flow run fails: schedulers see it
        incomplete = RunIncomplete(summary)
        return Failed(message=str(incomplete), data=incomplete)
    return summary.as_record()


# How often a paused run asks the server whether a reviewer has answered.
REVIEW_POLL_S = 5


def wait_for_review(run_id: int, pending: int, timeout_minutes: int):
    """Pause this flow run until a reviewer answers the form in the Prefect UI (a `review.ReviewDecision`),
    or None when nobody has within the timeout: the shots then wait for `dreamcache review`."""
    from prefect.exceptions import FlowPauseTimeout
    from prefect.flow_runs import pause_flow_run

    with transaction(get_platform().sessions) as session:
        rows = review.pending_shots(session, run_id)
    logger.info("run %d: %d shots wait for review; the flow run pauses for up to %d minutes (resume it in the UI "
                "with a decision)", run_id, pending, timeout_minutes)
    try:
        return pause_flow_run(wait_for_input=review.ReviewDecision.with_initial_data(
            description=review.review_markdown(rows, run_id, picture=thumbnail)), timeout=timeout_minutes * 60,
            poll_interval=REVIEW_POLL_S)
    except FlowPauseTimeout:
        logger.warning("run %d: no review decision within %d minutes; the shots wait for `dreamcache review %d`",
                       run_id, timeout_minutes, run_id)
        return None


def review_and_publish(params: CatalogueRunParams, summary: RunSummary, on_prefect: bool = False) -> RunSummary:
    """After a completed run: the reviewer's decision (when the run pauses for one: Prefect only), then the
    approved shots published (when the run names a prefix). Both are added to the run's summary."""
    platform, run_id = get_platform(), summary.run_id
    facts = {}
    if params.review == "pause" and summary.review["pending"]:
        if not on_prefect:
            logger.warning("run %d: review=pause needs a Prefect run; the %d shots waiting for review wait for "
                           "`dreamcache review %d`", run_id, summary.review["pending"], run_id)
        else:
            decision = wait_for_review(run_id, summary.review["pending"], params.review_timeout_minutes)
            try:
                if decision is not None:
                    facts["review_decision"] = review.decide(platform, run_id, decision.approve, decision.reject,
                                                             decision.rest, decision.reviewer, decision.note)
                    with transaction(platform.sessions) as session:
                        facts["review"] = run_record.review_counts(session, run_id)
                    counts = facts["review"]
                    logger.info("run %d reviewed: %d approved, %d rejected, %d still waiting", run_id,
                                counts["approved"], counts["rejected"], counts["pending"])
            except review.ReviewError as exc:  # the form's answer, not the run, is wrong: the shots keep waiting
                facts["review_error"] = str(exc)
                logger.error("run %d: the review decision was not applied: %s; decide with `dreamcache review %d`",
                             run_id, exc, run_id)
    if params.publish_prefix:
        facts["published"] = (publish_task if on_prefect else publish_task.fn)(run_id, params.publish_prefix)
        published = facts["published"]
        logger.info("run %d published to %s: %d added, %d withdrawn, %d in all", run_id, params.publish_prefix,
                    published.get("added", 0), published.get("withdrawn", 0), published.get("total", 0))
    if not facts:
        return summary
    summary = summary.model_copy(update=facts)
    run_record.record(platform, summary)
    return summary


class RunIncomplete(RuntimeError):
    """A run that ended with planned work still open (held by other workers); carries its summary."""

    def __init__(self, summary: RunSummary):
        super().__init__(f"incomplete: {summary.images_open} images and {summary.caches_open} product caches are "
                         "still open (held by other workers); run again once they are free")
        self.summary = summary


def run_embedded(params: CatalogueRunParams, progress: bool = True) -> dict:
    """The same run without Prefect: every step in this process (the embedded default). Returns the summary's
    record, as the flow run does."""
    def stage(text: str) -> None:
        if progress:
            tqdm.write(text)

    summary = orchestrate(params, EmbeddedRunner(progress), name="embedded", on_stage=stage)
    if isinstance(summary, RunSummary) and summary.status == "completed":
        summary = review_and_publish(params, summary)
    return summary.as_record()
