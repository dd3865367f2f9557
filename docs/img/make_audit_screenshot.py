"""Regenerate docs/img/audit-report.png: the audit report page (service/report_html.render_report) over
24 synthetic rows (the hand-made analyses of tests/test_report.py, with GSM8K correctness and AtMan
saliency, so every section shows), in headless Chromium (Debian's /usr/bin/chromium, driven by
Playwright; no browser download).

    .venv/bin/python docs/img/make_audit_screenshot.py
"""

from __future__ import annotations

import random
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from faithlens.report import RowOutcome, summarize  # noqa: E402
from service.report_html import render_report  # noqa: E402
from tests.test_report import make_analysis  # noqa: E402

UI_DIR = REPO / "clients" / "python" / "faithlens_client" / "static"
CHROMIUM = Path("/usr/bin/chromium")
OUT = REPO / "docs" / "img" / "audit-report.png"
WIDTH, HEIGHT = 1200, 2400


def synthetic_rows(n: int = 24, seed: int = 0) -> tuple[list[RowOutcome], list[dict]]:
    rng = random.Random(seed)
    outcomes, lines = [], []
    for i in range(n):
        length = rng.randint(12, 60)
        anchors = sorted(rng.sample(range(length), rng.randint(1, 4)))
        correct = rng.random() < 0.6
        saliency = {
            "reasoning": (share := rng.uniform(0.5, 0.9) if correct else rng.uniform(0.2, 0.6)),
            "prompt": 1 - share,
            "spearman": rng.uniform(-0.2, 0.7),
            "top": rng.uniform(-6.0, -2.0) if correct else rng.uniform(-3.0, -1.0),
            "random": rng.uniform(-2.5, -1.0),
        }
        analysis = make_analysis(
            length,
            anchors,
            rng.randint(0, length // 3),
            rng.randint(0, 3),
            rng.uniform(0.05, 0.4),
            rng.uniform(1.0, 5.0),
            saliency,
            text=f"Row {i}:",
        )
        outcomes.append(RowOutcome(analysis, correct))
        lines.append(
            {
                "id": f"gsm8k-dev-{i}",
                "index": i,
                "text": " ".join(t.text for t in analysis.tokens),
                "annotations": analysis.to_json_dict(),
                "correct": correct,
                "error": None,
            }
        )
    return outcomes, lines


def main() -> None:
    from playwright.sync_api import sync_playwright

    outcomes, lines = synthetic_rows()
    page_html = render_report("audit_example", summarize(outcomes), lines, ui_dir=UI_DIR)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "report.html"
        path.write_text(page_html, encoding="utf-8")
        with sync_playwright() as pw:
            browser = pw.chromium.launch(
                executable_path=str(CHROMIUM), headless=True, args=["--no-sandbox", "--disable-gpu"]
            )
            page = browser.new_context(viewport={"width": WIDTH, "height": 900}, offline=True).new_page()
            page.goto(path.as_uri())
            page.wait_for_load_state("load")
            full = page.evaluate("document.documentElement.scrollHeight")
            page.screenshot(
                path=str(OUT),
                full_page=True,
                clip={"x": 0, "y": 0, "width": WIDTH, "height": min(full, HEIGHT)},
            )
            browser.close()
    print(f"{OUT} ({OUT.stat().st_size // 1024} KB)")


if __name__ == "__main__":
    main()
