"""The catalogue run: ingest, segment, cache once, generate in batches, score, write back.

One orchestration, two ways to run it. On Prefect (`catalogue_run`, a deployment, the UI) every
step is a task, the unit of retry; generation goes out in batches, in-process or to long-lived GPU
task workers, and large plans are sharded into child flow runs. Embedded (`run_embedded`, the
CLI without a Prefect server) the same steps run directly in this process with a progress bar.
Tasks take and return keys (ids, URIs), never images or tensors.

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

from db import queries
from db.models import RejectedItem
from db.session import transaction
from dreamcache.perception.metrics import METRICS
from flows.platform.places import InvalidInputs, Places
from flows.steps.source import IMAGE_SUFFIXES, Listing, SourceItem, list_source
from flows.steps.prompts import Prompts, check_templates, load_prompts
from flows.steps import publish, review
from flows.steps import assets, caches, generate, ingest, plan, run_record, segment, sheets
from flows.steps.shared import chunks
from flows.platform import liveness
from flows.platform.failures import is_expected, one_line, retry_unless_permanent
from flows.platform.markdown import md, plain
from flows.platform.params import CatalogueRunParams, parse_rule, shop_formats
from flows.platform.resources import get_platform, require_named_stores

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

@task(retries=2, retry_delay_seconds=5, retry_condition_fn=retry_unless_permanent, cache_policy=NO_CACHE)
def ingest_task(run_id: int, items: list[SourceItem], places: Places) -> list[int]:
    return ingest.ingest(get_platform(), run_id, items, places)


@task(retries=2, retry_delay_seconds=5, retry_condition_fn=retry_unless_permanent, cache_policy=NO_CACHE)
def segment_task(run_id: int, subject_ids: list[int]) -> list[int]:
    return segment.segment(get_platform(), run_id, subject_ids)


@task(retries=2, retry_delay_seconds=5, retry_condition_fn=retry_unless_permanent, cache_policy=NO_CACHE)
def cache_task(run_id: int, subject_ids: list[int], preparation: caches.Preparation) -> list[int]:
    return caches.cache(get_platform(), run_id, subject_ids, preparation)


@task(retries=2, retry_delay_seconds=5, retry_condition_fn=retry_unless_permanent, cache_policy=NO_CACHE)
def plan_task(run_id: int, cache_ids: list[int], params: CatalogueRunParams, templates: list[str]) -> dict:
    return plan.plan(get_platform(), run_id, cache_ids, params, templates)


@task(retries=2, retry_delay_seconds=10, retry_condition_fn=retry_unless_permanent, cache_policy=NO_CACHE)
def generate_task(generation_ids: list[int], output_prefix: str, batch_size: int,
                  compare_text_only: bool) -> dict:
    result = generate.generate(get_platform(), generation_ids, output_prefix, batch_size, compare_text_only)
    return dict(done=len(result.done), failed=len(result.failed), skipped=len(result.skipped))


@task(retries=2, retry_delay_seconds=5, retry_condition_fn=retry_unless_permanent, cache_policy=NO_CACHE)
def contact_sheets_task(subject_ids: list[int], output_prefix: str) -> dict[str, str]:
    return sheets.contact_sheets(get_platform(), subject_ids, output_prefix)


@task(retries=2, retry_delay_seconds=5, retry_condition_fn=retry_unless_permanent, cache_policy=NO_CACHE)
def assets_task(run_id: int, subject_ids: list[int], output_prefix: str, formats: list[str], cutout: bool,
                packshot: bool) -> dict[str, list[str]]:
    return assets.product_assets(get_platform(), run_id, subject_ids, output_prefix, shop_formats(formats), cutout,
                                 packshot)


@task(retries=2, retry_delay_seconds=5, retry_condition_fn=retry_unless_permanent, cache_policy=NO_CACHE)
def approve_task(generation_ids: list[int], approve_if: list[str], keep_best: int) -> dict:
    return review.auto_approve(get_platform(), generation_ids, [parse_rule(rule) for rule in approve_if], keep_best)


@task(retries=2, retry_delay_seconds=5, retry_condition_fn=retry_unless_permanent, cache_policy=NO_CACHE)
def publish_task(run_id: int, prefix: str) -> dict:
    return publish.publish(get_platform(), run_id, prefix)


class Runner:
    """How the orchestration executes a task over many inputs, and reports progress."""

    def map(self, fn, args: Sequence[tuple]) -> list:
        raise NotImplementedError

    def generate(self, run_id: int, todo: list[int], params: CatalogueRunParams) -> None:
        raise NotImplementedError

    def report(self, summary: dict) -> None:
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

    def report(self, summary):
        from prefect.artifacts import create_markdown_artifact, create_table_artifact

        sheets = summary.get("contact_sheets", {})
        with transaction(get_platform().sessions) as session:
            failed = queries.failures_by_sku(session, summary["run_id"])
        create_table_artifact(key="catalogue-run-products", table=product_rows(summary.get("products", []), failed,
                                                                                sheets) or [{}],
                              description="Products of this run: images made and failed, best scores, contact sheet")
        lines = [f"# Catalogue run {summary.get('run_id')}: {summary.get('status')}", "",
                 f"{summary['images_generated']} images generated, {summary['images_failed']} failed"
                 + (f" ({summary['images_already_made']} already made)" if summary.get("images_already_made") else "")
                 + f", {summary['rejected']} inputs rejected; output `{summary['output']}`.", ""]
        if summary.get("products_not_found"):
            lines += [not_found_line(summary), ""]
        if summary.get("status") == "incomplete":
            lines += [f"**Incomplete**: {summary['images_open']} images and {summary['caches_open']} product caches "
                      "are still open; run again once they are free.", "", "| item | held by | its run | free at |",
                      "|---|---|---|---|"]
            lines += [f"| {md(h['item'])} | {h['held_by']} | {h['run'] or ''} | {h['free_at']} |"
                      for h in summary["held"]]
            lines += [""]
        review_counts = summary.get("review")
        if review_counts:
            lines += [f"Review: {review_counts['approved']} approved, {review_counts['rejected']} rejected, "
                      f"{review_counts['pending']} waiting (the ids are on the contact sheets).", ""]
        lines += ["## Contact sheets", ""]
        lines += sheet_lines(sheets) or ["(none)"]
        if summary.get("rejections"):
            lines += ["", "## Rejected inputs", "", "| stage | item | reason |", "|---|---|---|"]
            lines += [f"| {r['stage']} | {md(r['item'])} | {md(r['reason'])} |" for r in summary["rejections"]]
        create_markdown_artifact(key="catalogue-run-summary", markdown="\n".join(lines),
                                 description="The run's outcome, each product's contact sheet, the rejected inputs")
        logger.info("run %s %s: %s products listed, %s ingested, %s cached, %s inputs rejected; %s images generated, "
                    "%s failed; output %s", summary.get("run_id"), summary.get("status"), summary.get("products_listed"),
                    summary.get("products_ingested"), summary.get("products_cached"), summary.get("rejected"),
                    summary.get("images_generated"), summary.get("images_failed"), summary.get("output"))


# Contact sheets shown as pictures in a run's summary artifact; the others are listed as links.
MAX_PICTURES = 24
# A local store's sheet is embedded in the artifact, shrunk to this many pixels on its longer side.
PICTURE_SIDE = 1024
THUMBNAIL_SIDE = 72  # a shot's picture in the review form's table


def not_found_line(summary: dict) -> str:
    """The one line a run's summary gives to shots in which the segmenter found no product."""
    return (f"product not found in {summary['products_not_found']} of {summary['images_generated']} shots: "
            "they have no masked scores (mdino, mclip_i)")


def product_rows(products: list[dict], failed: dict[str, int], sheets: dict[str, str]) -> list[dict]:
    """The products table: one row per product of the run, each with the same columns (the UI takes its columns
    from the first row): images made and failed, the best score of each metric recorded, its contact sheet."""
    best = {row["sku"]: row for row in products}
    recorded = {key.removeprefix("best_") for row in products for key in row if key.startswith("best_")}
    metrics = [m for m in METRICS if m in recorded] + sorted(recorded - set(METRICS))
    rows = []
    for sku in sorted(set(best) | set(failed) | set(sheets)):
        row = dict(sku=md(sku), images=best.get(sku, {}).get("images", 0), failed=failed.get(sku, 0))
        row.update({f"best_{m}": best.get(sku, {}).get(f"best_{m}") for m in metrics})
        # Table cells that are text are rendered as markdown by the UI: a link is clickable.
        row["contact_sheet"] = f"[contact sheet](<{_public(sheets[sku])}>)" if sku in sheets else ""
        rows.append(row)
    return rows


def sheet_lines(sheets: dict[str, str]) -> list[str]:
    """Markdown of the contact sheets: a heading, the picture (the first MAX_PICTURES) and a link per product."""
    lines = []
    for index, (sku, uri) in enumerate(sorted(sheets.items())):
        url = _public(uri)
        picture = _picture(uri, url) if index < MAX_PICTURES else None
        lines += [f"### {md(sku)}", ""]
        lines += [f"![contact sheet of {plain(sku)}](<{picture}>)", ""] if picture else []
        lines += [f"[{plain(uri)}](<{url}>)", ""]
    return lines


def _public(uri: str) -> str:
    """A link the UI's viewer can open: presigned for S3, the URI itself otherwise."""
    objects = get_platform().objects
    try:
        return objects.public_url(objects.key_of(uri), expires_s=7 * 24 * 3600)
    except ValueError:
        return uri


def _picture(uri: str, url: str) -> str | None:
    """What the browser showing the UI can load as the picture of a contact sheet: its presigned URL; for a local
    store (file://, which a web page may not load) the sheet itself, shrunk, as a data: URL; None if unreadable
    (the link is still listed, and a report never fails a run that is done)."""
    if not url.startswith("file:"):
        return url
    return _embedded(uri, PICTURE_SIDE, "contact sheet %s is not shown in the run's artifact: %s")


def _thumbnail(uri: str) -> str | None:
    """A shot as the review form shows it: shrunk and embedded, so that the table stays small and fits the
    dialog whatever the store (a presigned link would load the full image at its full size)."""
    return _embedded(uri, THUMBNAIL_SIDE, "shot %s is not shown in the review form: %s")


def _embedded(uri: str, side: int, unreadable: str) -> str | None:
    """The picture at `uri`, at most `side` pixels a side, as a data: URL; None (with `unreadable` logged) when
    it cannot be read: a picture is never a reason to fail a run."""
    import base64
    import io

    from PIL import Image

    objects = get_platform().objects
    try:
        image = Image.open(io.BytesIO(objects.get(objects.key_of(uri))))
        image.thumbnail((side, side))
        data = io.BytesIO()
        image.convert("RGB").save(data, "JPEG", quality=80)
    except Exception as exc:
        logger.warning(unreadable, uri, exc)
        return None
    return "data:image/jpeg;base64," + base64.b64encode(data.getvalue()).decode()


# The platform's own loggers: their lines go to the console as ever and, when made inside a Prefect flow or task
# run, to that run's logs in the UI as well.
PLATFORM_LOGGERS = ("flows", "db", "dreamcache")
_RUN_LOGS = "dreamcache-run-logs"  # the handler's name: attached once, however often this file is loaded


def send_platform_logs_to_prefect() -> None:
    """Send the platform's log lines made inside a Prefect flow or task run to that run's logs, in whichever
    process runs it: a worker's flow run, a served deployment, `dreamcache run --prefect`, a task worker.

    Done here, on import, rather than with PREFECT_LOGGING_EXTRA_LOGGERS: that setting must reach every
    process's environment, and it attaches the handler without a level, so the loggers would keep the root's
    WARNING and drop the INFO lines (the run's summary; `log_platform_info` lets them through where a run
    starts). Lines made outside any run (embedded runs, a heartbeat thread) have no run to go to.
    """
    from prefect.logging.handlers import APILogHandler

    for name in PLATFORM_LOGGERS:
        platform_logger = logging.getLogger(name)
        if any(handler.get_name() == _RUN_LOGS for handler in platform_logger.handlers):
            continue
        handler = APILogHandler()
        handler.set_name(_RUN_LOGS)
        handler.addFilter(_in_a_prefect_run)
        platform_logger.addHandler(handler)


def log_platform_info() -> None:
    """Let the platform's INFO lines through, for a Prefect run's logs: called where a flow run or a task worker
    starts, not on import, so that an embedded run's console keeps to warnings (it prints its own progress)."""
    for name in PLATFORM_LOGGERS:
        platform_logger = logging.getLogger(name)
        if platform_logger.level == logging.NOTSET:  # a level the operator set stays
            platform_logger.setLevel(logging.INFO)


def _in_a_prefect_run(record: logging.LogRecord) -> bool:
    from prefect.context import FlowRunContext, TaskRunContext

    return FlowRunContext.get() is not None or TaskRunContext.get() is not None


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
                name: str | None = None, on_stage: Callable[[str], None] = lambda stage: None) -> dict:
    platform = get_platform()
    recommended = params.recommended(platform.settings.recommended)
    try:
        params = params.with_recommended(recommended)
    except ValueError as exc:  # an eta the preset's sampler does not take
        raise InvalidInputs(f"{exc}, or name the ddim sampler (the {params.preset} preset samples with "
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
        summary = run_record.summarise(platform, run_id, len(listing.items) + len(listing.rejected), subject_ids, cache_ids, len(todo), sheet_uris,
                                  params.output_prefix, caches_open)
        summary["run_id"], summary["shots_repaired"] = run_id, planned["repaired"]
        summary["images_already_made"] = made
        summary["assets"] = asset_uris
        summary["files_skipped"], summary["skipped"] = len(listing.skipped), listing.skipped[:20]
        with transaction(platform.sessions) as session:
            summary["products"] = queries.best_scores(session, run_id)
            summary["review"] = run_record.review_counts(session, run_id)
            summary["products_not_found"] = queries.shots_without_masked_scores(session, run_id)
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
    """Personalised product shots for a catalogue: ingest, segment, cache once, generate, score, write back."""
    from prefect import get_run_logger
    from prefect.runtime import flow_run
    from prefect.states import Failed

    log_platform_info()
    try:
        require_named_stores(get_platform().settings, f"flow run {flow_run.name}")
        summary = orchestrate(params, PrefectRunner(), flow_run_id=str(flow_run.id), name=flow_run.name)
        if summary.get("status") == "completed":
            summary = review_and_publish(params, summary, on_prefect=True)
    except Exception as exc:
        # The run's state says why in one line, the line `dreamcache run` prints after "error:"; calling the
        # flow raises `exc` itself. A failure named on purpose (a bad input, S3's NoSuchBucket) needs no
        # traceback; anything else (a bug) gets its traceback in the run's log.
        if not is_expected(exc):
            get_run_logger().error("the run failed: %s", one_line(exc), exc_info=exc)
        return Failed(message=one_line(exc), data=exc)
    if summary.get("status") == "incomplete":  # the flow run fails, so that schedulers and the UI see it
        incomplete = RunIncomplete(summary)
        return Failed(message=str(incomplete), data=incomplete)
    return summary


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
            description=review.review_markdown(rows, run_id, picture=_thumbnail)), timeout=timeout_minutes * 60,
            poll_interval=REVIEW_POLL_S)
    except FlowPauseTimeout:
        logger.warning("run %d: no review decision within %d minutes; the shots wait for `dreamcache review %d`",
                       run_id, timeout_minutes, run_id)
        return None


def review_and_publish(params: CatalogueRunParams, summary: dict, on_prefect: bool = False) -> dict:
    """After a completed run: the reviewer's decision (when the run pauses for one: Prefect only), then the
    approved shots published (when the run names a prefix). Both are added to the run's summary."""
    platform, run_id = get_platform(), summary["run_id"]
    facts = {}
    if params.review == "pause" and summary["review"]["pending"]:
        if not on_prefect:
            logger.warning("run %d: review=pause needs a Prefect run; the %d shots waiting for review wait for "
                           "`dreamcache review %d`", run_id, summary["review"]["pending"], run_id)
        else:
            decision = wait_for_review(run_id, summary["review"]["pending"], params.review_timeout_minutes)
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
    if facts:
        run_record.record(platform, run_id, **facts)
    return {**summary, **facts}


class RunIncomplete(RuntimeError):
    """A run that ended with planned work still open (held by other workers); carries its summary."""

    def __init__(self, summary: dict):
        super().__init__(f"incomplete: {summary['images_open']} images and {summary['caches_open']} product caches are "
                         "still open (held by other workers); run again once they are free")
        self.summary = summary


def run_embedded(params: CatalogueRunParams, progress: bool = True) -> dict:
    """The same run without Prefect: every step in this process (the embedded default)."""
    def stage(text: str) -> None:
        if progress:
            tqdm.write(text)

    summary = orchestrate(params, EmbeddedRunner(progress), name="embedded", on_stage=stage)
    if summary.get("status") == "completed":
        summary = review_and_publish(params, summary)
    return summary
