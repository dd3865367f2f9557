"""The one renderer of the audit view. ``audit.js`` and ``audit.css`` (in ``static/``) draw an annotation
object into the page; ``render_page`` inlines them with the data into a self-contained file, and the
server's ``GET /ui`` serves the same two files."""

from __future__ import annotations

import html
import json
from importlib import resources

STATIC = resources.files("faithlens_client") / "static"


def asset(name: str) -> str:
    return (STATIC / name).read_text(encoding="utf-8")


def render_page(analysis: dict, title: str = "faithlens audit") -> str:
    data = json.dumps(analysis).replace("</", "<\\/")
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>{asset("audit.css")}</style></head>
<body><main class="fl-page"><h1>{html.escape(title)}</h1><div id="fl-audit"></div></main>
<script>{asset("audit.js")}</script>
<script>FaithlensAudit.render(document.getElementById("fl-audit"), {data});</script>
</body></html>
"""
