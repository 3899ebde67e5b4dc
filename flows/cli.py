"""The full `dreamcache` command: the library's commands plus the platform's (runs, history, database)."""

from __future__ import annotations

import enum
import inspect
import os
import signal
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal, NamedTuple, Optional, get_args, get_origin

import typer
from pydantic.fields import FieldInfo
from sqlalchemy import make_url

from dreamcache.app import cli as library_cli
from dreamcache.app.config import Settings
from flows.platform.params import PUBLISH_PREFIX, CatalogueRunParams
from flows.steps.run_summary import DryRunSummary, RunSummary, read_summary

app = library_cli.app
db_app = typer.Typer(help="The platform database (SQLite embedded, PostgreSQL in production).", no_args_is_help=True)
app.add_typer(db_app, name="db")

stack_app = typer.Typer(help="PostgreSQL, an S3 endpoint and a Prefect server on this host, without Docker: for "
                        "trying the full path (throwaway: their data goes when they stop).", no_args_is_help=True)
app.add_typer(stack_app, name="stack")

EXAMPLES = Path(__file__).resolve().parent / "examples"
_FIELD_DEFAULT = object()  # RunOption's default: the field's


def _safe(url: str) -> str:
    return make_url(url).render_as_string(hide_password=True)


@db_app.command("upgrade")
def db_upgrade(revision: str = typer.Argument("head", help="Target revision.")) -> None:
    """Apply the migrations (creates the schema on an empty database)."""
    from db import migrate

    url = library_cli.settings_or_fail().resolved_database_url
    try:
        migrate.upgrade(url, revision)
    except Exception as exc:  # connection refused, permissions, ...: say which database and why
        from flows.platform.failures import database_problem

        library_cli.fail("could not migrate " + database_problem(url, exc).removeprefix("database "))
    typer.echo(f"{_safe(url)} is at revision {migrate.current_revision(url)}")


@db_app.command("current")
def db_current() -> None:
    """Show the database's revision and the code's head revision."""
    from db import migrate

    from flows.platform.failures import database_problem

    url = library_cli.settings_or_fail().resolved_database_url
    try:
        current = migrate.current_revision(url)
    except Exception as exc:  # not a database, refused, unknown: one line naming it, no traceback
        library_cli.fail(database_problem(url, exc))
    typer.echo(f"{_safe(url)}: revision {current} (head: {migrate.head_revision(url)})")


def _stack_state():
    from flows.stack import StackState

    return StackState(library_cli.settings_or_fail().home / "stack")


@stack_app.command("up")
def stack_up() -> None:
    """Start PostgreSQL (Debian's binaries), an S3 endpoint (moto) and a Prefect server whose database is on that
    PostgreSQL; print the settings to export; stop them all on Ctrl-C or `dreamcache stack down`."""
    import importlib.util

    from flows.stack import Stack, export_lines

    state = _stack_state()
    running = state.running_pid()
    if running:
        library_cli.fail(f"a stack is already running (process {running}): its settings are in {state.env_file}; "
                         "stop it with `dreamcache stack down`")
    if importlib.util.find_spec("moto") is None:
        library_cli.fail("the stack's S3 endpoint is moto's, which is not installed: pip install 'moto[server]' "
                         "(`make install` installs it with the test tools)")

    def stop(signum, frame):  # SIGTERM (`dreamcache stack down`, systemd) stops the stack as Ctrl-C does
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even when started with SIGINT ignored (`&`)
    typer.echo("starting PostgreSQL, S3 (moto) and the Prefect server ...")
    stack = Stack()
    try:
        stack.start()
    except KeyboardInterrupt:
        typer.secho("interrupted while starting: what had started is stopped", err=True, fg=typer.colors.YELLOW)
        raise typer.Exit(EXIT_INTERRUPTED) from None
    except Exception as exc:  # binaries missing, a server that would not start: one line, nothing left running
        from flows.platform.failures import one_line

        library_cli.fail(f"the stack did not start: {one_line(exc)}")
    try:
        environment = stack.environment()
        state.write(os.getpid(), environment)
        typer.echo("\n".join(stack.describe()))
        typer.echo(f"\nIn the shells that use it (or `source {state.env_file}`):\n")
        typer.echo("\n".join(export_lines(environment)))
        typer.echo("\nCtrl-C or `dreamcache stack down` stops them; their data goes with them.")
        while (stopped := stack.alive()) is None:
            time.sleep(1)
        typer.secho(f"{stopped}: stopping the others", err=True, fg=typer.colors.YELLOW)
    except KeyboardInterrupt:
        stopped = None
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second signal must not cut the stopping short
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        stack.stop()
        state.clear()
    typer.echo("stack stopped: PostgreSQL, S3 and the Prefect server are down, their data removed")
    if stopped:
        raise typer.Exit(1)


# How long `dreamcache stack down` waits: the Prefect server is given 20 s, PostgreSQL's fast stop a few.
STACK_STOP_S = 120


@stack_app.command("down")
def stack_down() -> None:
    """Stop the stack that `dreamcache stack up` runs (in another shell, or in the background)."""
    state = _stack_state()
    pid = state.running_pid()
    if pid is None:
        state.clear()
        typer.echo("no stack is running")
        return
    from flows.stack import is_stack_process

    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + STACK_STOP_S
    while is_stack_process(pid) and time.monotonic() < deadline:  # until the process itself is gone
        time.sleep(0.5)
    if is_stack_process(pid):
        library_cli.fail(f"the stack (process {pid}) did not stop within {STACK_STOP_S} s: see its shell, or "
                         f"`kill -INT {pid}`")
    typer.echo(f"stack stopped (process {pid})")


# `dreamcache run`'s options are CatalogueRunParams' fields, made here from the model (names, help, defaults, bounds
# and choices), so that a new run parameter is one field there. Validation stays the model's: the command passes
# what it is given to CatalogueRunParams and prints its messages, the same as the Prefect form's.


class RunOption(NamedTuple):
    """Where a field is spelled otherwise on the command line (the names and flags scripts already use)."""

    decls: tuple[str, ...] = ()  # the option's names; none: --field-name
    help: str = ""  # the help; empty: the field's description
    default: Any = _FIELD_DEFAULT  # the option's default, where the command fills it in itself


def _after_first_sentence(name: str) -> str:
    return CatalogueRunParams.model_fields[name].description.split(". ", 1)[1]


RUN_OPTIONS = {
    # None: the bundled example catalogue, with its prompts unless some are given (filled in by `run`).
    "source": RunOption(help="S3 prefix, local folder or manifest; default: the bundled example catalogue.",
                        default=None),
    # A list is given one item per option, repeated.
    "prompts": RunOption(("--prompt", "-p"), "A prompt template (repeatable)."),
    "formats": RunOption(("--format", "-f"), "A format, W:H or W:H@long side, e.g. 4:5@1080 (repeatable). "
                         + _after_first_sentence("formats")),
    "approve_if": RunOption(("--approve-if",), "A review rule, metric>=value, e.g. mdino>=0.5 (repeatable). "
                            + _after_first_sentence("approve_if")),
    "negative_prompt": RunOption(("--negative-prompt", "-n")),
    "compare_text_only": RunOption(("--compare-text-only/--no-compare-text-only",)),
    "publish_prefix": RunOption(("--publish-to",)),
}


def _bounds(field: FieldInfo) -> str:
    """A number field's bounds as click writes a range: `0<=x<=500`; empty for none."""
    low = high = ""
    for rule in field.metadata:
        for bound, written in (("ge", "{}<="), ("gt", "{}<")):
            if getattr(rule, bound, None) is not None:
                low = written.format(getattr(rule, bound))
        for bound, written in (("le", "<={}"), ("lt", "<{}")):
            if getattr(rule, bound, None) is not None:
                high = written.format(getattr(rule, bound))
    return f"{low}x{high}" if low or high else ""


def _run_option(name: str, field: FieldInfo) -> inspect.Parameter:
    spelling = RUN_OPTIONS.get(name, RunOption())
    default = field.get_default(call_default_factory=True) if spelling.default is _FIELD_DEFAULT else spelling.default
    help_text = spelling.help or field.description
    decls = spelling.decls
    kind, metavar = field.annotation, None
    if get_origin(kind) is Literal:
        choices = get_args(kind)
        if choices == tuple(library_cli.GuidanceChoice.__members__):  # typer's choices, as `generate --guidance`
            kind = library_cli.GuidanceChoice
        else:
            kind, metavar = str, "<" + "|".join(choices) + ">"  # as typer writes the choices of `--guidance`
    elif get_origin(kind) is list:
        kind, default = Optional[kind], None  # None: not given (typer's empty list), the field's empty default
    elif kind is bool:
        decls = decls or (f"--{name.replace('_', '-')}",)  # a flag: given, it is on
    elif kind in (int, float) and _bounds(field):
        metavar = f"<{kind.__name__} {_bounds(field)}>"
    option = typer.Option(default, *decls, help=help_text, metavar=metavar)
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=option,
                             annotation=Optional[kind] if default is None else kind)


def _run_signature() -> inspect.Signature:
    options = [_run_option(name, field) for name, field in CatalogueRunParams.model_fields.items()]
    options.append(inspect.Parameter(
        "use_prefect", inspect.Parameter.KEYWORD_ONLY, annotation=Optional[bool], default=typer.Option(
            None, "--prefect/--embedded", help="Run as a Prefect flow (default when PREFECT_API_URL is set) or "
            "in-process.")))
    return inspect.Signature(options, return_annotation=None)


def _run_params(options: dict) -> CatalogueRunParams:
    """The run's parameters from the command's options; bad ones end the command with the model's messages."""
    from pydantic import ValidationError

    values = {name: value for name, value in options.items() if name in CatalogueRunParams.model_fields}
    if values["source"] is None:
        values["source"] = str(EXAMPLES / "catalogue")
        if not values["prompts"] and not values["prompt_file"]:
            values["prompt_file"] = str(EXAMPLES / "prompts.txt")
    for name, value in values.items():
        if value is None:  # a list option not given
            values[name] = []
        elif isinstance(value, enum.Enum):
            values[name] = value.value
    try:
        return CatalogueRunParams(**values)
    except ValidationError as exc:
        library_cli.fail("invalid run parameters:\n" + "\n".join(
            f"  {'.'.join(map(str, e['loc'])) or 'parameters'}: {e['msg']}" for e in exc.errors()))


def run(**options: Any) -> None:
    """A catalogue run: ingest, segment, cache once, generate, score, write images, sheets and history."""
    params = _run_params(options)
    use_prefect = options["use_prefect"]
    settings = library_cli.settings_or_fail()
    if use_prefect is None:
        use_prefect = bool(os.environ.get("PREFECT_API_URL"))
    typer.echo(f"model {settings.base_model} on {settings.torch_device}; database {_safe(settings.resolved_database_url)}; "
               f"objects {settings.resolved_objects_url}; {'Prefect' if use_prefect else 'embedded'} run")
    from flows.runs.catalogue import RunIncomplete
    from flows.platform.liveness import Cancelled

    def stop(signum, frame):  # SIGTERM (Kubernetes, systemd, kill): stop as cleanly as on Ctrl-C
        # Once: a second signal would cut short the giving back of claims and the run's record (SIGKILL still works).
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        raise Cancelled(signal.Signals(signum).name)

    signal.signal(signal.SIGTERM, stop)
    # SIGINT cancels too, even when this process was started with it ignored (a background job of a shell
    # script, a test runner's child): Python then leaves it ignored, and an operator's SIGINT would do nothing.
    signal.signal(signal.SIGINT, stop)
    if use_prefect:
        _check_prefect_server()
    try:
        if use_prefect:
            from flows.runs.catalogue import catalogue_run

            summary = read_summary(catalogue_run(params))
        else:
            from flows.runs.catalogue import run_embedded

            summary = read_summary(run_embedded(params))
    except KeyboardInterrupt:
        typer.secho("\ninterrupted: the run is cancelled and what it held is free for the next run", err=True,
                    fg=typer.colors.YELLOW)
        raise typer.Exit(EXIT_INTERRUPTED) from None
    except Cancelled as exc:
        typer.secho(f"\nstopped by {exc}: the run is cancelled and what it held is free for the next run", err=True,
                    fg=typer.colors.YELLOW)
        raise typer.Exit(EXIT_TERMINATED) from None
    except RunIncomplete as exc:  # on Prefect, the flow run fails; the summary says what is open
        summary = exc.summary
    except Exception as exc:  # the same one line as the Prefect run's state message (flows/platform/failures.py)
        from flows.platform.failures import one_line

        library_cli.fail(one_line(exc))
    _print_summary(summary, settings)
    if getattr(summary, "status", None) == "incomplete":  # a dry run has no status
        raise typer.Exit(EXIT_INCOMPLETE)


run.__signature__ = _run_signature()  # what typer reads: the options made from CatalogueRunParams
app.command()(run)


def _check_prefect_server() -> None:
    """A Prefect server that does not answer: one line naming its URL and what to do, before any work."""
    import httpx

    url = os.environ.get("PREFECT_API_URL")
    if not url:  # no server named: Prefect starts a temporary one
        return
    try:
        httpx.get(url.rstrip("/") + "/health", timeout=10).raise_for_status()
    except httpx.HTTPError as exc:
        library_cli.fail(f"the Prefect server at PREFECT_API_URL={url} does not answer ({type(exc).__name__}): start "
                         "it (`prefect server start`), or unset PREFECT_API_URL (or pass --embedded) for an embedded run")


# Exit codes of `dreamcache run` (documented in docs/catalogue-runs.md, for schedulers): 0 completed, 1 failed
# (or bad input before any work), 3 incomplete (work still held by other workers: run again later),
# 130 interrupted (SIGINT), 143 stopped (SIGTERM).
EXIT_INCOMPLETE, EXIT_INTERRUPTED, EXIT_TERMINATED = 3, 130, 143


def _print_summary(summary: RunSummary | DryRunSummary, settings: Settings) -> None:
    if isinstance(summary, DryRunSummary):
        typer.echo(f"\ndry run: {summary.products_listed} products listed, {summary.products_valid} valid, "
                   f"{summary.rejected} rejected; {summary.prompts} prompts; "
                   f"{summary.images_planned} images would be generated")
        for r in summary.rejections:
            typer.echo(f"  rejected {r.item}: {r.reason}")
        _print_skipped(summary)
        return
    typer.echo(
        f"\nrun {summary.run_id}: {summary.products_listed} products listed, {summary.products_ingested} ingested, "
        f"{summary.rejected} rejected, {summary.products_cached} cached; "
        f"{summary.images_generated} images generated, {summary.images_failed} failed "
        f"({_already_made(summary)}{summary.images_planned} to do this run"
        + (f", {summary.shots_repaired} of them found missing or damaged" if summary.shots_repaired else "")
        + ")")
    for r in summary.rejections:
        typer.secho(f"  rejected at {r.stage}: {r.item}: {r.reason}", fg=typer.colors.YELLOW)
    _print_skipped(summary)
    if summary.status == "incomplete":
        from flows.platform.liveness import held_line

        typer.secho(f"incomplete: {summary.images_open} images and {summary.caches_open} product caches are still "
                    "open", fg=typer.colors.YELLOW)
        for held in summary.held:
            typer.secho(f"  {held_line(held)}", fg=typer.colors.YELLOW)
        typer.secho("  run again once they are free (a live worker finishes them; a dead one's are taken over at once)",
                    fg=typer.colors.YELLOW)
    if summary.products_not_found:
        from flows.runs.run_report import not_found_line

        typer.echo(not_found_line(summary))
    typer.echo(f"images and sidecars: {summary.output}")
    for sku, uri in summary.contact_sheets.items():
        typer.echo(f"contact sheet {sku}: {uri}")
    for sku, uris in summary.assets.items():
        typer.echo(f"cut-out and packshots {sku}: {', '.join(uris)}")
    review = summary.review
    if review:
        typer.echo(f"review: {review['approved']} approved, {review['rejected']} rejected, {review['pending']} waiting"
                   + (f" (see them: dreamcache review {summary.run_id})" if review["pending"] else ""))
    published = summary.published
    if published:
        typer.echo(f"published: {published.get('added', 0)} added, {published.get('withdrawn', 0)} withdrawn, "
                   f"{published.get('total', 0)} in all; manifest {published.get('manifest_csv', '')}")
    url = settings.resolved_database_url
    typer.echo(f"database: {_safe(url)}")
    typer.echo("try: dreamcache history   (or in SQL: SELECT sku, prompt, seed, mdino, output_uri FROM generation_history "
               "ORDER BY generation_id DESC LIMIT 10;)")


def _already_made(summary: RunSummary) -> str:
    """'18 already made, ' where earlier runs made shots of this plan: a re-run that does nothing says why."""
    made = summary.images_already_made
    return f"{made} already made, " if made else ""


def _print_skipped(summary: RunSummary | DryRunSummary) -> None:
    if summary.files_skipped:
        shown = ", ".join(summary.skipped) + (", ..." if summary.files_skipped > len(summary.skipped) else "")
        typer.secho(f"  skipped {summary.files_skipped} files that are not product images: {shown}",
                    fg=typer.colors.YELLOW)


@app.command()
def verify(
    repair: bool = typer.Option(False, "--repair", help="Make damaged objects whole: sidecars written again from the "
                                "database, damaged shots, caches and cut-outs made pending so the next run makes them."),
) -> None:
    """Check every recorded shot, sidecar, cache, mask and reference by sha256 (exit 1 when something is wrong
    and not repaired)."""
    from flows.platform.resources import get_platform
    from flows.runs.verify import verify as run_verify

    settings = library_cli.settings_or_fail()
    platform = get_platform(settings)
    platform.migrate()
    report = run_verify(platform, repair=repair)
    checked = ", ".join(f"{n} {kind}s" for kind, n in sorted(report.checked.items()))
    typer.echo(f"checked {checked or 'nothing'} in {settings.resolved_objects_url}")
    for p in report.problems:
        typer.secho(f"  {p['kind']} {p['item']}: {p['uri']} is {p['problem']}", fg=typer.colors.YELLOW)
    if not report.problems:
        typer.echo(f"no damage found; {report.waiting} shots found damaged before wait to be made again by the next "
                   "run over their catalogue" if report.waiting else "all whole")
    elif repair:
        repaired = ", ".join(f"{n} {kind}s" for kind, n in sorted(report.repaired.items()))
        typer.echo(f"repaired: {repaired}; shots, caches and cut-outs made pending are made again by the next run "
                   "over their catalogue")
    else:
        typer.echo(f"{len(report.problems)} problems: run `dreamcache verify --repair`")
        raise typer.Exit(1)


@app.command()
def history(
    limit: int = typer.Option(20, min=1, max=10_000, help="How many generations."),
    sku: Optional[str] = typer.Option(None, help="Only this SKU."),
    run_id: Optional[int] = typer.Option(None, "--run", help="Only this run."),
) -> None:
    """Recent generations: product, prompt, seed, status, scores and where the image is."""
    from sqlalchemy import text

    from db import migrate
    from db.session import make_engine

    from flows.platform.failures import database_problem

    url = library_cli.settings_or_fail().resolved_database_url
    # Typed NULL checks: PostgreSQL cannot infer a bare parameter's type in `:x IS NULL`.
    query = "SELECT generation_id, run_id, sku, prompt, seed, status, mdino, clip_t, output_uri, error " \
            "FROM generation_history WHERE (CAST(:sku AS VARCHAR) IS NULL OR sku = :sku) " \
            "AND (CAST(:run AS INTEGER) IS NULL OR run_id = :run) ORDER BY generation_id DESC LIMIT :limit"
    try:
        migrate.upgrade(url)
        engine = make_engine(url)
        try:
            with engine.connect() as connection:
                rows = connection.execute(text(query), dict(sku=sku, run=run_id, limit=limit)).all()
        finally:
            engine.dispose()
    except Exception as exc:  # not a database, damaged, refused: one line naming it, no traceback
        library_cli.fail(database_problem(url, exc))
    if not rows:
        typer.echo("no generations yet: try `dreamcache run`")
        return
    typer.echo(f"{'id':>6} {'run':>4} {'sku':<16} {'seed':>5} {'status':<8} {'mdino':>6} {'clip_t':>6}  prompt / output")
    for r in rows:
        scores = " ".join(f"{v:6.3f}" if v is not None else "     -" for v in (r.mdino, r.clip_t))
        typer.echo(f"{r.generation_id:>6} {r.run_id or '-':>4} {r.sku[:16]:<16} {r.seed:>5} {r.status:<8} {scores}  "
                   f"{r.prompt}\n{'':>57}{r.output_uri or r.error or ''}")


@app.command()
def train(
    config: Path = typer.Argument(..., exists=True, dir_okay=False, help="TOML training config (docs/training.md)."),
    resume: Optional[str] = typer.Option(None, help="'latest' or a checkpoint directory."),
) -> None:
    """Train DreamCache adapters in this process (for several GPUs: accelerate launch -m flows.runs.training)."""
    from pydantic import ValidationError

    from dreamcache.training.trainer import TrainConfig
    from flows.runs.training import trainer_for

    try:
        settings = TrainConfig.from_file(config)
        trainer = trainer_for(settings)
    except (ValidationError, ValueError) as exc:
        library_cli.fail(f"{config}: {exc}")
    final = trainer.train(resume=resume)
    typer.echo(f"adapters written to {final}; load them with DREAMCACHE_ADAPTER={final}")


@app.command()
def synthesize(
    output: Path = typer.Option(..., help="Folder for targets/, masks/, references/ and triplets.jsonl."),
    count: int = typer.Option(1000, min=1, help="Captions to draw before the diversity filter."),
    text_to_image: Optional[str] = typer.Option(None, help="Diffusers text-to-image model (SDXL in the paper); "
                                                "default: the configured base model."),
    captioner: Optional[str] = typer.Option(None, help="Text-generation model for captions; default: the grammar."),
    steps: int = typer.Option(30, min=1, help="Denoising steps per target image."),
    seed: int = typer.Option(0, min=0, help="Seed of the captions and images."),
    shard_size: int = typer.Option(256, min=1, help="Items per shard (a child run on Prefect)."),
) -> None:
    """Synthetic training triplets: captions, target images, masks and references, and the manifest."""
    from flows.runs.synthetic import SyntheticParams, run_embedded, synthesize_triplets

    params = SyntheticParams(output=str(output), count=count, text_to_image=text_to_image, captioner=captioner,
                             steps=steps, seed=seed, shard_size=shard_size)
    summary = synthesize_triplets(params) if os.environ.get("PREFECT_API_URL") else run_embedded(params)
    typer.echo(f"{summary['items']} items after filtering, {summary['triplets']} triplets, "
               f"{len(summary['rejected'])} rejected; manifest: {summary['manifest']}")
    for item, reason in summary["rejected"][:20]:
        typer.echo(f"  rejected {item}: {reason}")


@app.command()
def worker(limit: int = typer.Option(1, min=1, help="Batches at a time (1 per GPU).")) -> None:
    """A long-lived GPU worker for `execution=task-workers` runs: loads the model once, serves batches.

    Start one per GPU, e.g. `CUDA_VISIBLE_DEVICES=0 dreamcache worker`, with PREFECT_API_URL set. SIGTERM
    (Kubernetes, systemd) or Ctrl-C: it takes no more work, finishes the batches it holds, and exits 143 or 130.
    """
    from flows.platform.liveness import Cancelled

    def stop(signum, frame):  # while starting and loading the model: nothing is held yet, stop at once
        raise Cancelled(signal.Signals(signum).name)

    signal.signal(signal.SIGTERM, stop)
    try:
        from flows.platform.resources import get_platform

        platform = get_platform(library_cli.settings_or_fail())
        # Before the model loads and the worker subscribes, and before the run's stack (torch, diffusers, Prefect)
        # is imported: a worker that cannot record its work says so in a second, not after ten.
        _check_stores(platform, "dreamcache worker")

        from flows.runs.catalogue import generate_task
        from flows.runs.run_logs import log_platform_info
        from flows.worker import serve_until_stopped

        log_platform_info()  # its batches' lines go to their task runs' logs
        platform.pipeline  # load the model before taking work
        stopped_by = serve_until_stopped(generate_task, limit=limit)
    except (Cancelled, KeyboardInterrupt) as exc:
        stopped_by, held = str(exc) or "SIGINT", " before taking any work"
    else:
        held = ": took no more work and finished the batches it held"
    if stopped_by:
        typer.secho(f"worker stopped by {stopped_by}{held}", err=True, fg=typer.colors.YELLOW)
        raise typer.Exit(EXIT_TERMINATED if stopped_by == "SIGTERM" else EXIT_INTERRUPTED)


def _check_stores(platform, who: str) -> None:
    """The worker's database and object store named (not the embedded defaults) and reachable, or one line naming
    what is wrong: a worker that cannot record its work must not wait for work."""
    from sqlalchemy import text

    from flows.platform.failures import database_problem, is_expected, one_line
    from flows.platform.resources import require_named_stores

    settings = platform.settings
    try:
        require_named_stores(settings, who)
    except ValueError as exc:
        library_cli.fail(str(exc))
    try:
        with platform.sessions() as session:
            session.execute(text("SELECT 1"))
    except Exception as exc:
        library_cli.fail(database_problem(settings.resolved_database_url, exc))
    try:
        platform.objects.sizes("products/.worker-check")  # a listing that finds nothing: bucket, endpoint, rights
    except Exception as exc:
        library_cli.fail(f"object store {settings.resolved_objects_url}: {one_line(exc)}" if not is_expected(exc)
                         else one_line(exc))


def _migrated_platform():
    """The configured platform, its database at the code's revision."""
    from flows.platform.resources import get_platform

    platform = get_platform(library_cli.settings_or_fail())
    platform.migrate()
    return platform


@contextmanager
def _expected_errors_in_one_line():
    """A failure named on purpose (a bad id, an unknown run) ends the command with its one line; a bug raises."""
    from flows.platform.failures import is_expected, one_line

    try:
        yield
    except Exception as exc:
        if not is_expected(exc):
            raise
        library_cli.fail(one_line(exc))


def _ids(values: Optional[list[str]], option: str) -> list[int]:
    """Generation ids given as `1,2,3`, or the option repeated."""
    ids = []
    for part in (p for value in values or [] for p in value.replace(",", " ").split()):
        if not part.isdigit():
            library_cli.fail(f"{option}: {part!r} is not a shot id (the id column of `dreamcache review RUN`)")
        ids.append(int(part))
    return ids


@app.command()
def review(
    run_id: int = typer.Argument(..., help="The run whose shots to review."),
    approve: Optional[list[str]] = typer.Option(None, "--approve", help="Ids of shots to approve: 1,2,3 (repeatable)."),
    reject: Optional[list[str]] = typer.Option(None, "--reject", help="Ids of shots to reject: 4,5 (repeatable)."),
    rest: Optional[str] = typer.Option(None, "--rest", help="The run's other shots awaiting review: pending (they "
                                       "wait), approve or reject."),
    by: str = typer.Option("", "--by", help="Your name, recorded with the decision (default: reviewer)."),
    note: str = typer.Option("", "--note", help="Why, recorded with the shots listed by id (with those --rest "
                             "decides only when none is listed)."),
) -> None:
    """The run's shots awaiting review; with --approve, --reject or --rest, a decision on them. Only approved
    shots are published (`dreamcache publish`)."""
    from db.models import Run
    from db.session import transaction
    from flows.steps.review import decide, pending_shots

    platform = _migrated_platform()
    approve_ids, reject_ids = _ids(approve, "--approve"), _ids(reject, "--reject")
    if approve_ids or reject_ids or rest:
        with _expected_errors_in_one_line():
            done = decide(platform, run_id, approve_ids, reject_ids, rest or "pending", by, note)
        typer.echo(f"run {run_id}: {done['approved']} approved, {done['rejected']} rejected "
                   f"({done['changed']} changed); {done['pending']} still await review")
        if done["ignored"]:
            typer.secho(f"ignored (not done shots of run {run_id}): {', '.join(map(str, done['ignored']))}",
                        fg=typer.colors.YELLOW)
        return
    with transaction(platform.sessions) as session:
        if session.get(Run, run_id) is None:
            library_cli.fail(f"run {run_id} does not exist: `dreamcache history` shows the runs' ids")
        rows = pending_shots(session, run_id)
    if not rows:
        typer.echo(f"run {run_id} has no shots awaiting review")
        return
    typer.echo(f"{'id':>6} {'sku':<16} {'seed':>5} {'mdino':>6} {'clip_t':>6}  prompt / shot")
    for r in rows:
        scores = " ".join(f"{r['scores'][m]:6.3f}" if m in r["scores"] else "     -" for m in ("mdino", "clip_t"))
        typer.echo(f"{r['id']:>6} {r['sku'][:16]:<16} {r['seed']:>5} {scores}  {r['prompt']}\n"
                   f"{'':>45}{r['output_uri']}")
    ids = [str(r["id"]) for r in rows]  # the hint names this run's own ids: two approved, the next rejected
    approve_ids = ids[:max(1, min(2, len(ids) - 1))]
    example = f"--approve {','.join(approve_ids)}" + (f" --reject {ids[len(approve_ids)]}" if len(ids) > 1 else "")
    typer.echo(f"{len(rows)} shots await review: decide with `dreamcache review {run_id} {example}` "
               "(--rest approve or --rest reject for all the others)")


@app.command()
def publish(
    run_id: int = typer.Argument(..., help="The run whose approved shots to publish."),
    to: str = typer.Option(PUBLISH_PREFIX, "--to", help="The shop's key prefix in the object store: the shots, "
                           "manifest.csv and manifest.json go there."),
) -> None:
    """Copy the run's approved shots to a prefix of their own with a CSV and JSON manifest of everything
    published there; withdraw shots published there that are no longer approved."""
    from flows.steps.publish import publish as run_publish

    platform = _migrated_platform()
    with _expected_errors_in_one_line():
        done = run_publish(platform, run_id, to)
    typer.echo(f"run {run_id}: {done['added']} added, {done['withdrawn']} withdrawn; {done['total']} shots published "
               f"under {done['prefix']}")
    typer.echo(f"manifest: {done['manifest_csv']}\n          {done['manifest_json']}")
    if done["publication_csv"]:
        typer.echo(f"this publication: {done['publication_csv']}")
    for shot in done["failed"]:
        typer.secho(f"  shot {shot['id']} of {shot['sku']} not published: {shot['problem']}", fg=typer.colors.YELLOW)
    if done["failed"]:
        raise typer.Exit(1)


def main() -> None:
    library_cli.main()


if __name__ == "__main__":
    main()
