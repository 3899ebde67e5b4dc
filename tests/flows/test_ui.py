"""A user starts a custom catalogue run from the Prefect UI, in headless Chromium (Debian's), with Playwright."""

import asyncio
import re
import shutil

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
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

    from prefect import get_client

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=FLAGS)  # a fresh profile each time
        page = browser.new_page(viewport={"width": 1400, "height": 1400})
        page.goto(prefect_server.url.removesuffix("/api") + "/deployments")
        page.get_by_role("link", name="catalogue", exact=True).click()
        page.get_by_role("button", name="Run", exact=True).click()
        page.get_by_text("Custom run", exact=True).click()
        expect(page.get_by_text("Source", exact=True)).to_be_visible(timeout=30_000)

        field(page, "Source").fill(f"s3://{served['bucket']}/catalogue/")
        page.get_by_role("button", name="Add item").click()
        field(page, "Prompts (Optional)").fill("a {category} in a sunlit kitchen")
        field(page, "Images Per Prompt (Optional)").fill("1")
        field(page, "Steps (Optional)").fill("2")
        field(page, "Output Prefix (Optional)").fill("ui-run")
        page.get_by_role("button", name="Submit").click()
        page.wait_for_url(re.compile(r"/deployments/deployment/[^/]+\?tab=Runs"), timeout=30_000)
        browser.close()

    async def wait_for_final_state():
        async with get_client() as client:
            for _ in range(240):
                runs = [r for r in await client.read_flow_runs()  # the one the UI created
                        if r.parameters.get("params", {}).get("output_prefix") == "ui-run"]
                if runs and runs[0].state.is_final():
                    return runs[0]
                await asyncio.sleep(1)
        raise TimeoutError("the run started from the UI did not finish in 4 minutes")

    run = asyncio.run(wait_for_final_state())
    assert run.state.is_completed(), run.state
    assert run.parameters["params"]["output_prefix"] == "ui-run"
    assert run.parameters["params"]["prompts"] == ["a {category} in a sunlit kitchen"]
