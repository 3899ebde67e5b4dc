"""What a catalogue run shows in the Prefect UI: its artifacts (a products table, a markdown summary with the
contact sheets) and the pictures in them, and the review form's thumbnails. Presentation only: nothing here
changes a run, and a picture that cannot be read never fails one."""

import logging

from db import queries
from db.session import transaction
from dreamcache.perception.metrics import METRICS
from flows.platform.markdown import md, plain
from flows.platform.resources import get_platform
from flows.steps.run_summary import RunSummary

logger = logging.getLogger("flows.runs.run_report")


def report_run(summary: RunSummary) -> None:
    """The run's artifacts in the Prefect UI: a products table, and a markdown summary with the contact sheets."""
    from prefect.artifacts import create_markdown_artifact, create_table_artifact

    sheets = summary.contact_sheets
    with transaction(get_platform().sessions) as session:
        failed = queries.failures_by_sku(session, summary.run_id)
    create_table_artifact(key="catalogue-run-products", table=product_rows(summary.products, failed, sheets) or [{}],
                          description="Products of this run: images made and failed, best scores, contact sheet")
    lines = [f"# Catalogue run {summary.run_id}: {summary.status}", "",
             f"{summary.images_generated} images generated, {summary.images_failed} failed"
             + (f" ({summary.images_already_made} already made)" if summary.images_already_made else "")
             + f", {summary.rejected} inputs rejected; output `{summary.output}`.", ""]
    if summary.products_not_found:
        lines += [not_found_line(summary), ""]
    if summary.status == "incomplete":
        lines += [f"**Incomplete**: {summary.images_open} images and {summary.caches_open} product caches "
                  "are still open; run again once they are free.", "", "| item | held by | its run | free at |",
                  "|---|---|---|---|"]
        lines += [f"| {md(h['item'])} | {h['held_by']} | {h['run'] or ''} | {h['free_at']} |"
                  for h in summary.held]
        lines += [""]
    if summary.review:
        lines += [f"Review: {summary.review['approved']} approved, {summary.review['rejected']} rejected, "
                  f"{summary.review['pending']} waiting (the ids are on the contact sheets).", ""]
    lines += ["## Contact sheets", ""]
    lines += sheet_lines(sheets) or ["(none)"]
    if summary.rejections:
        lines += ["", "## Rejected inputs", "", "| stage | item | reason |", "|---|---|---|"]
        lines += [f"| {r.stage} | {md(r.item)} | {md(r.reason)} |" for r in summary.rejections]
    create_markdown_artifact(key="catalogue-run-summary", markdown="\n".join(lines),
                             description="The run's outcome, each product's contact sheet, the rejected inputs")


# Contact sheets shown as pictures in a run's summary artifact; the others are listed as links.
MAX_PICTURES = 24
# A local store's sheet is embedded in the artifact, shrunk to this many pixels on its longer side.
PICTURE_SIDE = 1024
THUMBNAIL_SIDE = 72  # a shot's picture in the review form's table


def not_found_line(summary: RunSummary) -> str:
    """The one line a run's summary gives to shots in which the segmenter found no product."""
    return (f"product not found in {summary.products_not_found} of {summary.images_generated} shots: "
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
        row["contact_sheet"] = f"[contact sheet](<{public_link(sheets[sku])}>)" if sku in sheets else ""
        rows.append(row)
    return rows


def sheet_lines(sheets: dict[str, str]) -> list[str]:
    """Markdown of the contact sheets: a heading, the picture (the first MAX_PICTURES) and a link per product."""
    lines = []
    for index, (sku, uri) in enumerate(sorted(sheets.items())):
        url = public_link(uri)
        picture = _picture(uri, url) if index < MAX_PICTURES else None
        lines += [f"### {md(sku)}", ""]
        lines += [f"![contact sheet of {plain(sku)}](<{picture}>)", ""] if picture else []
        lines += [f"[{plain(uri)}](<{url}>)", ""]
    return lines


def public_link(uri: str) -> str:
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


def thumbnail(uri: str) -> str | None:
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
