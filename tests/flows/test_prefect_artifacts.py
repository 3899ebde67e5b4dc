"""What a catalogue run shows in the Prefect UI: its contact sheets as pictures, a products table with the same
columns on every row, and the platform's own log lines in the flow run's logs."""

import asyncio
import base64
import io
import logging
import re
import urllib.request

from PIL import Image

from flows.runs import catalogue, run_logs, run_report
from flows.platform.markdown import md
from tests.flows.test_prefect_run import trigger

PICTURE = re.compile(r"!\[contact sheet of ([^\]]+)\]\(<([^>]+)>\)")
LINK = re.compile(r"\[contact sheet\]\(<([^>]+)>\)")


def load_image(url: str) -> Image.Image:
    """The image at a URL, as the browser would fetch it (data: URLs decoded here)."""
    if url.startswith("data:"):
        return Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))
    with urllib.request.urlopen(url, timeout=30) as response:
        return Image.open(io.BytesIO(response.read()))


async def artifacts_and_logs(flow_run_id):
    from prefect import get_client
    from prefect.client.schemas.filters import (
        ArtifactFilter, ArtifactFilterFlowRunId, LogFilter, LogFilterFlowRunId,
    )

    async with get_client() as client:
        artifacts = await client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))
        for _ in range(30):  # the run's process sends its logs in batches; the last one may still be on its way
            logs = await client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))
            if any(log.name == "flows.runs.catalogue" and "images generated" in log.message for log in logs):
                break
            await asyncio.sleep(1)
    return {a.type: a for a in artifacts}, logs


def test_a_run_shows_pictures_a_products_table_and_its_own_log_lines(served):
    import json

    flow_run = trigger(served["bucket"])
    assert flow_run.state.is_completed(), flow_run.state
    artifacts, logs = asyncio.run(artifacts_and_logs(flow_run.id))

    # Each product's contact sheet is a picture in the summary, at a URL the browser can load (presigned S3).
    pictures = dict(PICTURE.findall(artifacts["markdown"].data))
    assert set(pictures) == {"MUG-1", "MUG-2", "LAMP-1"}
    for sku, url in pictures.items():
        assert url.startswith("http://127.0.0.1:") and "Signature" in url, url
        assert load_image(url).width > 96, sku  # the reference and the shots

    # The products table: one row per product, every row with the same real columns.
    rows = json.loads(artifacts["table"].data)
    assert [row["sku"] for row in rows] == ["LAMP-1", "MUG-1", "MUG-2"]
    assert all(list(row) == list(rows[0]) for row in rows)
    assert list(rows[0])[:3] == ["sku", "images", "failed"] and list(rows[0])[-1] == "contact_sheet"
    assert [(row["images"], row["failed"]) for row in rows] == [(2, 0)] * 3
    for row in rows:
        (url,) = LINK.findall(row["contact_sheet"])
        assert load_image(url).size == load_image(pictures[row["sku"]]).size

    # The platform's own lines, not only Prefect's: the rejected inputs and the run's summary.
    lines = [(log.name, log.message) for log in logs]
    rejected = [message for name, message in lines if name == "flows.steps.run_record" and "rejected at" in message]
    assert any("BROKEN.png" in m for m in rejected) and any("NOT-AN-IMAGE.jpg" in m for m in rejected), lines
    (summary,) = [message for name, message in lines if name == "flows.runs.catalogue" and "images generated" in message]
    assert "5 products listed, 3 ingested" in summary and "6 images generated, 0 failed" in summary, summary
    platform_lines = [message for name, message in lines if name.startswith("flows.")]
    assert any("3 products ingested" in m for m in platform_lines), platform_lines  # ingest counts as they happen
    assert any(m.startswith("batch of ") and " done, 0 failed" in m for m in platform_lines), platform_lines


def test_the_products_table_has_the_same_columns_on_every_row(platform_env):
    products = [dict(sku="A-1", images=2, best_clip_t=0.31, best_mdino=0.8), dict(sku="B_2", images=1, best_dino=0.5)]
    rows = run_report.product_rows(products, failed={"B_2": 1, "C-3": 4}, sheets={})
    assert [list(row) for row in rows] == [
        ["sku", "images", "failed", "best_mdino", "best_clip_t", "best_dino", "contact_sheet"]] * 3
    assert [(r["sku"], r["images"], r["failed"], r["best_mdino"], r["best_dino"]) for r in rows] == [
        ("A-1", 2, 0, 0.8, None), ("B\\_2", 1, 1, None, 0.5), ("C-3", 0, 4, None, None)]  # a product whose images all failed


def test_a_local_stores_sheets_are_embedded_as_pictures(platform_env):
    """A file:// URL is blocked from a web page: the sheet itself goes into the artifact, shrunk."""
    objects = catalogue.get_platform().objects
    sheet = io.BytesIO()
    Image.new("RGB", (2400, 600), (200, 30, 40)).save(sheet, "PNG")
    uri = objects.put("shots/MUG-1/contact_sheet.png", sheet.getvalue(), "image/png").uri
    broken = objects.put("shots/BAD/contact_sheet.png", b"not a png", "image/png").uri

    lines = "\n".join(run_report.sheet_lines({"MUG-1": uri, "BAD": broken}))
    pictures = dict(PICTURE.findall(lines))
    assert list(pictures) == ["MUG-1"] and pictures["MUG-1"].startswith("data:image/jpeg;base64,")
    assert load_image(pictures["MUG-1"]).size == (run_report.PICTURE_SIDE, run_report.PICTURE_SIDE // 4)
    assert "### BAD" in lines and f"(<{broken}>)" in lines  # unreadable: listed with its link, no picture


def test_skus_and_reasons_are_shown_as_text_not_markdown():
    assert md("a|b *c* [x](y) <img src=z>\nnext") == r"a\|b \*c\* \[x\]\(y\) \<img src=z\> next"


def test_platform_loggers_reach_the_run_logs_once_with_their_info_lines(monkeypatch):
    run_logs.send_platform_logs_to_prefect()  # a second load of the flow's file (a worker runs it as a script)
    for name in run_logs.PLATFORM_LOGGERS:  # as a fresh process has them (setLevel also clears the loggers' caches)
        platform_logger = logging.getLogger(name)
        monkeypatch.setattr(platform_logger, "level", platform_logger.level)  # restored after the test
        platform_logger.setLevel(logging.NOTSET)
    # Importing lets no INFO line through (an embedded run's console keeps to warnings); a run's start does.
    assert not logging.getLogger("flows").isEnabledFor(logging.INFO)
    run_logs.log_platform_info()
    for name in run_logs.PLATFORM_LOGGERS:
        platform_logger = logging.getLogger(name)
        handlers = [h for h in platform_logger.handlers if h.get_name() == "dreamcache-run-logs"]
        assert len(handlers) == 1 and platform_logger.isEnabledFor(logging.INFO)
    record = logging.LogRecord("flows.x", logging.INFO, __file__, 1, "outside any run", None, None)
    assert not handlers[0].filter(record)  # an embedded run's lines have no run to go to
