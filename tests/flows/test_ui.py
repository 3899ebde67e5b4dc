"""A user starts a custom catalogue run from the Prefect UI, in headless Chromium (Debian's), with Playwright, and
sees its work there: the contact sheets as pictures and the platform's own log lines."""

import re
import shutil

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
# What, how many, how, where: the parameter form's fields from the top.
FORM_ORDER = ["Source", "Prompts", "Prompt File", "Images Per Prompt", "Seed", "Seed Policy", "Preset", "Sampler", "Eta",
              "Negative Prompt", "Guidance", "Text Scale", "Image Scale", "Steps", "Resolution", "Output Prefix",
              "Execution"]
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def field(page, label: str):
    """The input of a parameter form field, found by its visible label.

    Form fields nest (the `params` object holds them all), so the innermost labelled container,
    the last match in document order, is the field itself.
    """
    container = page.locator(".p-label", has=page.get_by_text(label, exact=True)).last
    return container.locator("input:not([type=checkbox]), textarea").first


def test_custom_run_from_the_ui(served, prefect_server, catalogue, tmp_path):
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
        page.get_by_role("button", name="Add item").click()
        field(page, "Prompts (Optional)").fill("a {category} in a sunlit kitchen")
        field(page, "Images Per Prompt (Optional)").fill("1")
        field(page, "Steps (Optional)").fill("2")
        field(page, "Output Prefix (Optional)").fill("ui-run")
        page.get_by_role("button", name="Submit").click()
        page.wait_for_url(re.compile(r"/deployments/deployment/[^/]+\?tab=Runs"), timeout=30_000)

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
