"""The README documents every setting of every layer (the settings objects are the source of truth), and
the docs list what the registries hold."""

from __future__ import annotations

from faithlens.saliency import SALIENCY_METHODS
from faithlens.settings import CoreSettings
from jobs.settings import QueueSettings
from service.settings import ServiceSettings
from tests.servers import REPO
from training.credit import CREDIT_STRATEGIES


def test_every_setting_is_in_the_readme():
    readme = (REPO / "README.md").read_text()
    fields = {**CoreSettings.model_fields, **ServiceSettings.model_fields, **QueueSettings.model_fields}
    for name, field in fields.items():
        env = "REDIS_URL" if name == "redis_url" else f"FAITHLENS_{name.upper()}"
        assert f"`{env}`" in readme, f"{env} ({field.description}) is not documented in README.md"


def _block(text: str, name: str) -> str:
    start = text.index(f"<!-- registry:{name} -->\n") + len(f"<!-- registry:{name} -->\n")
    return text[start : text.index("<!-- /registry -->", start)]


def test_docs_list_the_registered_methods_and_strategies():
    """docs/api.md's tables are the registries' entries: a method added or changed must be documented."""
    docs = (REPO / "docs" / "api.md").read_text()
    methods = "| method | options it reads | cost | what it computes |\n|---|---|---|---|\n" + "".join(
        f"| `{m.name}` | {', '.join(m.options)} | {m.cost_note} | {m.description} |\n"
        for m in SALIENCY_METHODS
    )
    credits = "| credit | γ |\n|---|---|\n" + "".join(
        f"| `{c.name}` | {c.description} |\n" for c in CREDIT_STRATEGIES
    )
    assert _block(docs, "saliency-methods") == methods, "paste this into docs/api.md:\n" + methods
    assert _block(docs, "credit-strategies") == credits, "paste this into docs/api.md:\n" + credits
