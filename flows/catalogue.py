"""The catalogue run: ingest, segment, cache once, generate in batches, score, write back.

One orchestration, two ways to run it. On Prefect (`catalogue_run`, a deployment, the UI) every
step is a task, the unit of retry; generation goes out in batches, in-process or to long-lived GPU
task workers, and large plans are sharded into child flow runs. Embedded (`run_embedded`, the
CLI without a Prefect server) the same steps run directly in this process with a progress bar.
Tasks take and return keys (ids, URIs), never images or tensors.

(No `from __future__ import annotations` here: Prefect reads the flow's parameter types at run time.)
"""


import logging
import time
from typing import Callable, Sequence
from uuid import UUID

from prefect import flow, task
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel
from tqdm.auto import tqdm

from db import queries
from db.session import transaction
from flows.sources import SourceItem, list_source
from flows.steps import caches, generate, ingest, plan, runs, segment, sheets
from flows.steps.shared import chunks
from flows import liveness
from flows.params import CatalogueRunParams
from flows.platform import get_platform

logger = logging.getLogger(__name__)

# Products per ingest/segment/cache/contact-sheet task: 10,000 products make ~630 task runs.
INGEST_BATCH = 64


# Tasks: each reads its inputs from the database and object store by key, so a retry is safe.
# NO_CACHE: whether work is done is the database's answer, never a cached task result.

@task(retries=2, retry_delay_seconds=5, cache_policy=NO_CACHE)
def ingest_task(run_id: int, items: list[SourceItem]) -> list[int]:
    return ingest.ingest(get_platform(), run_id, items)


@task(retries=2, retry_delay_seconds=5, cache_policy=NO_CACHE)
def segment_task(run_id: int, subject_ids: list[int]) -> list[int]:
    return segment.segment(get_platform(), run_id, subject_ids)


@task(retries=2, retry_delay_seconds=5, cache_policy=NO_CACHE)
def cache_task(run_id: int, subject_ids: list[int]) -> list[int]:
    return caches.cache(get_platform(), run_id, subject_ids)


@task(retries=2, retry_delay_seconds=5, cache_policy=NO_CACHE)
def plan_task(run_id: int, cache_ids: list[int], params: CatalogueRunParams) -> dict:
    return plan.plan(get_platform(), run_id, cache_ids, params)


@task(retries=2, retry_delay_seconds=10, cache_policy=NO_CACHE)
def generate_task(generation_ids: list[int], output_prefix: str, batch_size: int,
                  compare_text_only: bool) -> dict:
    result = generate.generate(get_platform(), generation_ids, output_prefix, batch_size, compare_text_only)
    return dict(done=len(result.done), failed=len(result.failed), skipped=len(result.skipped))


@task(retries=2, retry_delay_seconds=5, cache_policy=NO_CACHE)
def contact_sheets_task(subject_ids: list[int], output_prefix: str) -> dict[str, str]:
    return sheets.contact_sheets(get_platform(), subject_ids, output_prefix)


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
        with tqdm(total=len(todo), desc="generating", unit="image", disable=not self.progress) as bar:
            for batch in chunks(todo, params.batch_size):
                generate_task.fn(batch, params.output_prefix, params.batch_size, params.compare_text_only)
                bar.update(len(batch))


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

        create_table_artifact(key="catalogue-run-products", table=summary.get("products", []) or [{}],
                              description="Products of this run with their best scores")
        sheets = summary.get("contact_sheets", {})
        lines = [f"# Catalogue run {summary.get('run_id')}: {summary.get('status')}", "",
                 f"{summary['images_generated']} images generated, {summary['images_failed']} failed, "
                 f"{summary['rejected']} inputs rejected; output `{summary['output']}`.", ""]
        if summary.get("status") == "incomplete":
            lines += [f"**Incomplete**: {summary['images_open']} images and {summary['caches_open']} product caches "
                      "are still open; run again once they are free.", "", "| generation | held by | free at |",
                      "|---|---|---|"]
            lines += [f"| {h['generation_id']} | {h['held_by']} | {h['free_at']} |" for h in summary["held"]]
            lines += [""]
        lines += ["## Contact sheets", ""]
        lines += [f"- **{sku}**: [{uri}]({_public(uri)})" for sku, uri in sheets.items()] or ["(none)"]
        if summary.get("rejections"):
            lines += ["", "## Rejected inputs", "", "| stage | item | reason |", "|---|---|---|"]
            lines += [f"| {r['stage']} | {r['item']} | {r['reason']} |" for r in summary["rejections"]]
        create_markdown_artifact(key="catalogue-run-summary", markdown="\n".join(lines))


def _public(uri: str) -> str:
    """A link the UI's viewer can open: presigned for S3, the URI itself otherwise."""
    objects = get_platform().objects
    try:
        return objects.public_url(objects.key_of(uri), expires_s=7 * 24 * 3600)
    except ValueError:
        return uri


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
    batches = chunks(todo, params.batch_size)
    if params.execution == "task-workers":
        # Long-lived GPU workers (`dreamcache worker`) run these; the results are in the database.
        futures = [generate_task.delay(batch, params.output_prefix, params.batch_size,
                                         params.compare_text_only) for batch in batches]
        for batch, future in zip(batches, futures):
            wait_for_deferred(future)
            progress.advance(len(batch))
    else:
        for batch in batches:  # one at a time: one job per GPU
            generate_task(batch, params.output_prefix, params.batch_size, params.compare_text_only)
            progress.advance(len(batch))


@flow(name="catalogue-shard", persist_result=False)
def generate_shard(generation_ids: list[int], params: CatalogueRunParams, progress: Progress) -> None:
    """A child run generating one shard of a large plan (keeps each flow run small)."""
    generate_batches(generation_ids, params, progress)


def orchestrate(params: CatalogueRunParams, runner: Runner, flow_run_id: str | None = None,
                name: str | None = None, on_stage: Callable[[str], None] = lambda stage: None) -> dict:
    platform = get_platform()
    if params.dry_run:
        return runs.dry_run(platform, params)
    platform.migrate()
    run_id = runs.start_run(platform, params, flow_run_id, name)
    removed = platform.objects.remove_stale_temporaries()
    if removed:
        logger.info("removed %d temporary objects left by writers that died", removed)
    try:
        on_stage("listing products")
        listing = list_source(params.source)
        runs.reject(platform, run_id, "ingest", listing.rejected)
        batches = chunks(listing.items, INGEST_BATCH)
        on_stage(f"ingesting {len(listing.items)} products")
        subject_ids = sorted({i for ids in runner.map(ingest_task, [(run_id, b) for b in batches]) for i in ids})
        on_stage("segmenting")
        groups = chunks(subject_ids, INGEST_BATCH)
        usable = [i for ids in runner.map(segment_task, [(run_id, g) for g in groups]) for i in ids]
        on_stage("caching")
        cache_ids = [i for ids in runner.map(cache_task, [(run_id, g) for g in chunks(usable, INGEST_BATCH)])
                     for i in ids]
        planned = runner.map(plan_task, [(run_id, cache_ids, params)])[0]
        todo = planned["todo"]
        if todo:
            platform.load("scorer")
        on_stage(f"generating {len(todo)} images")
        runner.generate(run_id, todo, params)
        on_stage("contact sheets")
        sheet_uris = {}
        for part in runner.map(contact_sheets_task,
                               [(g, params.output_prefix) for g in chunks(usable, INGEST_BATCH)]):
            sheet_uris.update(part)
        with transaction(platform.sessions) as session:
            caches_open = caches.open_caches(session, platform, usable)
        summary = runs.summarise(platform, run_id, len(listing.items), subject_ids, cache_ids, len(todo), sheet_uris,
                                  params.output_prefix, caches_open)
        summary["run_id"], summary["shots_repaired"] = run_id, planned["repaired"]
        with transaction(platform.sessions) as session:
            summary["products"] = queries.best_scores(session, run_id)
    except KeyboardInterrupt:
        runs.cancel_run(platform, run_id, "interrupted (SIGINT)")
        raise
    except liveness.Cancelled as exc:
        runs.cancel_run(platform, run_id, f"stopped ({exc})")
        raise
    except Exception as exc:
        runs.finish_run(platform, run_id, {}, error=f"{type(exc).__name__}: {exc}")
        raise
    runs.finish_run(platform, run_id, summary)
    runner.report(summary)
    return summary


@flow(name="catalogue-run", flow_run_name="catalogue-{params.output_prefix}", persist_result=False)
def catalogue_run(params: CatalogueRunParams) -> dict:
    """Personalised product shots for a catalogue: ingest, segment, cache once, generate, score, write back."""
    from prefect.runtime import flow_run

    summary = orchestrate(params, PrefectRunner(), flow_run_id=str(flow_run.id), name=flow_run.name)
    if summary.get("status") == "incomplete":  # the flow run fails, so that schedulers and the UI see it
        raise RunIncomplete(summary)
    return summary


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

    return orchestrate(params, EmbeddedRunner(progress), name="embedded", on_stage=stage)
