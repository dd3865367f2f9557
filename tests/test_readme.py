"""The README documents every setting (the settings object is the source of truth)."""

from __future__ import annotations

from faithlens.settings import Settings
from tests.servers import REPO


def test_every_setting_is_in_the_readme():
    readme = (REPO / "README.md").read_text()
    for name, field in Settings.model_fields.items():
        env = "REDIS_URL" if name == "redis_url" else f"FAITHLENS_{name.upper()}"
        assert f"`{env}`" in readme, f"{env} ({field.description}) is not documented in README.md"
