"""``AuditReport``: one annotated response, with the questions an auditor asks of it."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from faithlens_client.render import render_page
from faithlens_client.types import Analysis, Generation, Summary, TokenAnnotation

if TYPE_CHECKING:  # pandas is optional (the `pandas` extra)
    import pandas


class AuditReport:
    def __init__(
        self, analysis: Analysis, text: str | None = None, generation: Generation | None = None
    ) -> None:
        self.analysis = analysis
        self.text = text if text is not None else "".join(t.text for t in analysis.tokens)
        self.generation = generation

    @classmethod
    def from_generation(cls, generation: Generation) -> AuditReport:
        if generation.annotations is None:
            raise ValueError("the generation carries no annotations (ask for analysis)")
        return cls(generation.annotations, generation.text, generation)

    @property
    def summary(self) -> Summary:
        return self.analysis.summary

    @property
    def tokens(self) -> list[TokenAnnotation]:
        return self.analysis.tokens

    def _top(self, key: str, k: int, only: str | None = None) -> list[TokenAnnotation]:
        pool = [t for t in self.tokens if getattr(t, key) is not None and (only is None or getattr(t, only))]
        return sorted(pool, key=lambda t: getattr(t, key), reverse=True)[:k]

    def anchors(self, k: int = 10) -> list[TokenAnnotation]:
        """Anchor tokens, highest FAI first."""
        return self._top("fai", k, only="anchor")

    def preplan(self, k: int = 10) -> list[TokenAnnotation]:
        """Preplan tokens (large WAAD shifts), in order of appearance."""
        return [t for t in self.tokens if t.preplan][:k]

    def most_salient(self, k: int = 10) -> list[TokenAnnotation]:
        """Response tokens whose suppression hurt the answer most (highest saliency)."""
        return self._top("saliency", k)

    def to_records(self) -> list[dict[str, Any]]:
        return [t.model_dump() for t in self.tokens]

    def to_dataframe(self) -> pandas.DataFrame:
        """One row per response token, indexed by position (needs pandas)."""
        try:
            import pandas as pd
        except ImportError as exc:  # pragma: no cover - depends on the environment
            raise ImportError("to_dataframe needs pandas: pip install 'faithlens-client[pandas]'") from exc
        return pd.DataFrame.from_records(self.to_records()).set_index("index")

    def to_html(self, path: str | Path | None = None, title: str = "faithlens audit") -> str:
        """A self-contained page (no network): heatmap, markers, hover cards, curves, summary."""
        page = render_page(self.analysis.model_dump(mode="json", by_alias=True), title=title)
        if path is not None:
            Path(path).write_text(page, encoding="utf-8")
        return page
