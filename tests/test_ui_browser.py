"""The /ui page in headless Chromium (Debian's /usr/bin/chromium, driven by Playwright; no browser download):
submit a prompt, see the heatmap, switch metrics, hover a token. A screenshot is kept as an artifact."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from faithlens.tiny import save_tiny
from tests.servers import REPO, start_server

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = Path(os.environ.get("FAITHLENS_TEST_ARTIFACTS", REPO / "test-artifacts"))

pytestmark = pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium (.ci/run installs it)")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tiny = save_tiny(tmp_path_factory.mktemp("tiny-ui") / "tiny-llama")
    srv = start_server(tmp_path_factory.mktemp("srv-ui"), tiny)
    yield srv
    srv.stop()


def test_ui_renders_switches_and_hovers(server):
    from playwright.sync_api import sync_playwright

    problems: list[str] = []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(
            executable_path=str(CHROMIUM), headless=True, args=["--no-sandbox", "--disable-gpu"]
        )
        page = browser.new_page(viewport={"width": 1100, "height": 900})
        page.on("console", lambda msg: problems.append(msg.text) if msg.type == "error" else None)
        page.on("pageerror", lambda exc: problems.append(str(exc)))
        page.goto(f"{server.url}/ui")
        page.wait_for_selector("#fl-adapter option", state="attached")
        page.fill("textarea[name=prompt]", "What is 6 times 7?")
        page.fill("input[name=max_new_tokens]", "40")
        page.click("button[type=submit]")
        page.wait_for_selector(".fl-heatmap .fl-token", timeout=60_000)
        tokens = page.locator(".fl-heatmap .fl-token")
        assert tokens.count() == 40

        def colours() -> list[str]:
            return page.eval_on_selector_all(
                ".fl-heatmap .fl-token", "els => els.map(e => e.style.backgroundColor)"
            )

        fai = colours()
        assert len(set(fai)) > 3, "FAI should shade tokens differently"
        page.click(".fl-switcher button[data-metric=waad]")
        assert page.get_attribute(".fl-heatmap", "data-metric") == "waad"
        waad = colours()
        assert waad != fai
        assert page.locator(".fl-switcher button[data-metric=saliency]").is_disabled()  # none was asked for
        assert page.locator(".fl-anchor").count() > 0 and page.locator(".fl-preplan").count() > 0
        assert page.locator("svg.fl-curves path.fl-curve-fai").get_attribute("d").startswith("M")
        tokens.nth(5).hover()
        card = page.locator(".fl-card")
        card.wait_for(state="visible")
        waad_cell = card.locator("tr[data-field=WAAD] td").inner_text()
        assert float(waad_cell) >= 0
        assert card.locator("tr[data-field=index] td").inner_text() == page.get_attribute(
            ".fl-heatmap .fl-token:nth-child(6)", "data-index"
        )
        assert page.locator(".fl-summary tr").count() > 5
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "ui.png"), full_page=True)
        browser.close()
    assert not problems, problems
    assert (ARTIFACTS / "ui.png").stat().st_size > 10_000


def test_to_html_page_renders_offline(server, tmp_path):
    """AuditReport.to_html: a file:// page with no network, drawn by the same renderer."""
    from faithlens_client import Faithlens
    from playwright.sync_api import sync_playwright

    with Faithlens(server.url) as client:
        path = tmp_path / "audit.html"
        report = client.audit("What is 6 times 7?", completion=" 6 times 7 is 42. #### 42", saliency="atman")
        report.to_html(path)
    problems: list[str] = []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=["--no-sandbox"])
        context = browser.new_context(offline=True)
        page = context.new_page()
        page.on("console", lambda msg: problems.append(msg.text) if msg.type == "error" else None)
        page.on("pageerror", lambda exc: problems.append(str(exc)))
        page.goto(path.as_uri())
        assert page.locator(".fl-heatmap .fl-token").count() == len(report.tokens)
        page.click(".fl-switcher button[data-metric=saliency]")
        assert page.get_attribute(".fl-heatmap", "data-metric") == "saliency"
        browser.close()
    assert not problems, problems
