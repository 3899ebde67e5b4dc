"""A user starts a custom catalogue run from the Prefect UI, in headless Chromium (Debian's), with Playwright, and
sees its work there: the contact sheets as pictures and the platform's own log lines."""

import re
import shutil

import pytest

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
# What, how many, how, where: the parameter form's fields from the top.
FORM_ORDER = ["Source", "Prompts", "Prompt File", "Images Per Prompt", "Seed", "Seed Policy", "Mode", "Placement X",
              "Placement Y", "Placement Scale", "Shadow", "Formats", "Cutout", "Packshot", "Preset", "Sampler", "Eta",
              "Negative Prompt", "Guidance", "Text Scale", "Image Scale", "Steps", "Deep Reuse Interval", "Resolution",
              "Output Prefix", "Execution"]
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def prefect_server(request):
    """The UI on both databases a Prefect server keeps: on PostgreSQL the schema is JSONB, whose key order is not
    the schema's."""
    return request.getfixturevalue(f"prefect_server_on_{request.param}")


def field(page, label: str):
    """The input of a parameter form field, found by its visible label.

    Form fields nest (the `params` object holds them all), so the innermost labelled container,
    the last match in document order, is the field itself.
    """
    container = page.locator(".p-label", has=page.get_by_text(label, exact=True)).last
    return container.locator("input:not([type=checkbox]), textarea").first


def test_custom_run_from_the_ui(served, prefect_server, catalogue, tmp_path):
    from playwright.sync_api import TimeoutError as PlaywrightTimeout
    from playwright.sync_api import expect, sync_playwright

    ui = prefect_server.url.removesuffix("/api")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=FLAGS)  # a fresh profile each time
        page = browser.new_page(viewport={"width": 1400, "height": 1400})
        page.goto(f"{ui}/deployments")
        page.get_by_role("link", name="catalogue", exact=True).click()
        page.get_by_role("button", name="Run", exact=True).click()
        page.get_by_text("Custom run", exact=True).click()
        expect(page.get_by_text("Source", exact=True)).to_be_visible(timeout=30_000)

        # The form reads top to bottom as a person fills it, with nothing to clear first and no odd widget.
        labels = page.locator(".schema-form-property__label").all_inner_texts()
        assert [label.removesuffix(" (Optional)") for label in labels[1:1 + len(FORM_ORDER)]] == FORM_ORDER, labels
        assert page.get_by_text('Property is type "None"').count() == 0
        assert field(page, "Source").input_value() == "" and field(page, "Prompt File (Optional)").input_value() == ""

        field(page, "Source").fill(f"s3://{served['bucket']}/catalogue/")
        page.get_by_role("button", name="Add item").first.click()  # the first list of the form: Prompts
        field(page, "Prompts (Optional)").fill("a {category} in a sunlit kitchen")
        field(page, "Images Per Prompt (Optional)").fill("1")
        field(page, "Steps (Optional)").fill("2")
        field(page, "Output Prefix (Optional)").fill("ui-run")
        created = []  # what the server answered the form: named in the failure should the page stay on it
        page.on("response", lambda r: created.append(f"{r.request.method} {r.url} -> {r.status}")
                if "create_flow_run" in r.url else None)
        page.get_by_role("button", name="Submit").click()
        try:  # a minute: once, on the loaded 2-core machine, the page had not left the form after 30 s
            page.wait_for_url(re.compile(r"/deployments/deployment/[^/]+\?tab=Runs"), timeout=60_000)
        except PlaywrightTimeout:
            page.screenshot(path=tmp_path / "form.png")
            pytest.fail(f"Submit did not open the deployment's runs; the server answered {created or 'nothing'}; "
                        f"the page ({tmp_path / 'form.png'}) says: {page.inner_text('body')[:2000]}")

        run = wait_for_final_state()
        assert run.state.is_completed(), run.state
        # The run's page: the platform's summary line among its logs, then its summary artifact, whose
        # contact sheets the browser loads (presigned from the S3 server).
        page.goto(f"{ui}/runs/flow-run/{run.id}")  # opens on its logs
        expect(page.get_by_text(re.compile(r"3 images generated, 0 failed")).first).to_be_visible(timeout=30_000)
        page.locator(".p-tab", has_text="Artifacts").click()
        page.get_by_text("catalogue-run-summary").first.click()
        pictures = page.locator(".artifact-data-markdown img")
        expect(pictures).to_have_count(3, timeout=30_000)
        page.wait_for_function("() => [...document.querySelectorAll('.artifact-data-markdown img')]"
                               ".every(img => img.complete && img.naturalWidth > 0)", timeout=30_000)
        assert sorted(pictures.evaluate_all("imgs => imgs.map(img => img.alt)")) == [
            f"contact sheet of {sku}" for sku in ("LAMP-1", "MUG-1", "MUG-2")]
        # The products table: a row per product, its contact sheet a link.
        page.goto(f"{ui}/runs/flow-run/{run.id}")
        page.locator(".p-tab", has_text="Artifacts").click()
        page.get_by_text("catalogue-run-products").first.click()
        links = page.locator(".artifact-data-table a", has_text="contact sheet")
        expect(links).to_have_count(3, timeout=30_000)
        assert all(href.startswith("http://127.0.0.1:") for href in links.evaluate_all("a => a.map(x => x.href)"))
        browser.close()

    assert run.parameters["params"]["output_prefix"] == "ui-run"
    assert run.parameters["params"]["prompts"] == ["a {category} in a sunlit kitchen"]


def wait_for_final_state():
    """The run the UI created, once final (the sync client: Playwright's sync API holds this thread's loop)."""
    import time

    from prefect import get_client

    with get_client(sync_client=True) as client:
        for _ in range(240):
            runs = [r for r in client.read_flow_runs()
                    if r.parameters.get("params", {}).get("output_prefix") == "ui-run"]
            if runs and runs[0].state.is_final():
                return runs[0]
            time.sleep(1)
    raise TimeoutError("the run started from the UI did not finish in 4 minutes")


def test_a_reviewer_decides_in_the_paused_runs_form(served, prefect_server):
    """A run with review=pause waits in the UI; the reviewer reads the shots in the form, approves one, rejects
    another, and resumes it; the decision lands in the database and only the approved shot is published."""
    from playwright.sync_api import expect, sync_playwright
    from prefect.deployments import run_deployment
    from sqlalchemy import create_engine, text

    from tests.flows.test_review_pause import wait_for

    params = dict(source=f"s3://{served['bucket']}/catalogue/", prompts=["a {category} on a beach"],
                  images_per_prompt=1, steps=2, output_prefix="review-ui", review="pause", review_timeout_minutes=5,
                  publish_prefix="shop-ui")
    flow_run = run_deployment("catalogue-run/catalogue", parameters={"params": params}, timeout=0)
    wait_for(flow_run.id, lambda state: state.is_paused(), "paused for review")
    engine = create_engine(served["database"])
    with engine.connect() as db:
        ids = list(db.scalars(text("SELECT id FROM generations ORDER BY id")))
    assert len(ids) == 3

    ui = prefect_server.url.removesuffix("/api")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1400})
        resumes = []  # what the server answered the form: named in the failure should the run stay paused
        page.on("response", lambda r: resumes.append(f"{r.request.method} {r.url} -> {r.status}")
                if "/resume" in r.url else None)
        page.goto(f"{ui}/runs/flow-run/{flow_run.id}")
        page.get_by_role("button", name="Resume", exact=True).first.click()
        dialog = page.get_by_role("dialog")
        # The form's description lists the shots waiting, by the ids the contact sheets show.
        expect(dialog.get_by_text(f"Review of run")).to_be_visible(timeout=30_000)
        for generation_id in ids:
            expect(dialog.get_by_role("cell", name=str(generation_id), exact=True)).to_be_visible()
        # A thumbnail of each shot, loaded; the table fits the dialog: nothing in it scrolls sideways.
        pictures = dialog.locator("table img")
        expect(pictures).to_have_count(len(ids), timeout=30_000)
        page.wait_for_function("() => [...document.querySelectorAll('[role=dialog] table img')]"
                               ".every(img => img.complete && img.naturalWidth > 0)", timeout=30_000)
        assert sorted(pictures.evaluate_all("imgs => imgs.map(img => img.alt)")) == [f"shot {i}" for i in ids]
        overflow = dialog.evaluate("""d => {
            const table = d.querySelector('table'), box = d.getBoundingClientRect();
            const scrolling = [...d.querySelectorAll('*')].filter(e => e.scrollWidth > e.clientWidth + 1
                && ['auto', 'scroll'].includes(getComputedStyle(e).overflowX)).map(e => e.className);
            return {scrolling, table_right: table.getBoundingClientRect().right, dialog_right: box.right};
        }""")
        assert not overflow["scrolling"] and overflow["table_right"] <= overflow["dialog_right"], overflow
        dialog.get_by_role("button", name="Add item").nth(0).click()
        field(page, "Approve (Optional)").fill(str(ids[0]))  # the form's labels are the dialog's alone
        dialog.get_by_role("button", name="Add item").nth(1).click()
        field(page, "Reject (Optional)").fill(str(ids[1]))
        field(page, "Reviewer (Optional)").fill("ana")
        dialog.get_by_role("button", name="Submit").click()
        # The browser stays open until the server has the decision: closed at once, it can drop the form's request.
        try:
            wait_for(flow_run.id, lambda state: not state.is_paused(), "resumed by the form")
        except TimeoutError as e:
            shown = dialog.first.inner_text(timeout=5_000) if dialog.count() else "(the dialog is closed)"
            raise AssertionError(f"{e}; the server's answers to the form: {resumes or 'none'}; the dialog: {shown}")
        browser.close()

    final = wait_for(flow_run.id, lambda state: state.is_final(), "finished after the review")
    assert final.state.is_completed(), final.state
    with engine.connect() as db:
        decided = db.execute(text("SELECT id, review, reviewed_by, published_uri FROM generations ORDER BY id")).all()
    engine.dispose()
    assert [(d.review, d.reviewed_by) for d in decided] == [("approved", "ana"), ("rejected", "ana"), ("pending", None)]
    assert decided[0].published_uri.startswith(f"s3://{served['bucket']}/platform/shop-ui/")
    assert decided[1].published_uri is None and decided[2].published_uri is None
