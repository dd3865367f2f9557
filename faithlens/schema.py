"""The one annotation schema (docs/annotations.md), shared by the CLI, the HTTP API and the SDK."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class TokenAnnotation(BaseModel):
    """One response token and its signals. ``null`` means undefined or not requested, never 0."""

    index: int = Field(description="Position in the full sequence (prompt + response), 0-based.")
    id: int = Field(description="Token id.")
    text: str = Field(description="The token decoded on its own.")
    logprob: float | None = Field(description="log p(token | everything before it) under the model.")
    fai: float | None = Field(description="Future Attention Influence (spec §4); null where T(s) is empty.")
    waad: float | None = Field(description="Windowed Average Attention Distance (spec §3), in [0, W].")
    preplan: bool = Field(description="Δ_t is in the top q of the response (spec §5).")
    anchor: bool = Field(description="FAI_t is in the top q of the response (spec §5).")
    dominated_anchor: bool = Field(description="An anchor dominated by a local preplan shift (set D).")
    intro: bool = Field(description="The introductory token of some dominated anchor (intro(D)).")
    saliency: float | None = Field(default=None, description="AtMan saliency; positive supported the target.")


class AnswerSpan(BaseModel):
    """The final answer's tokens: ``[start, end)`` in full-sequence positions, and its text (spec §9)."""

    start: int
    end: int
    text: str


class HeadGroups(BaseModel):
    """The (layer, head) pairs of each group, from the per-sequence split (spec §2)."""

    model_config = ConfigDict(populate_by_name=True)

    local: list[tuple[int, int]]
    global_: list[tuple[int, int]] = Field(alias="global")


class Counterfactual(BaseModel):
    """Σ log p(target) with the top-k salient reasoning tokens suppressed together, versus k random ones."""

    k: int
    base_logprob: float
    top_k_logprob: float
    random_k_logprob: float
    top_k_positions: list[int]
    random_k_positions: list[int]


class Summary(BaseModel):
    """Per-response aggregates. Saliency fields stay null until saliency is requested (spec §10)."""

    num_prompt_tokens: int
    num_response_tokens: int
    num_anchors: int
    num_preplan: int
    num_dominated_anchors: int
    num_coupled_pairs: int
    coupled_pairs: list[tuple[int, int]] = Field(
        description="(intro index, dominated anchor index) pairs, in full-sequence positions."
    )
    mean_fai: float | None
    mean_waad: float | None
    tau_waad: float | None = Field(description="The WAAD threshold used for D (median by default).")
    tau_delta: float | None = Field(description="The Δ threshold used for D (median by default).")
    saliency_method: str | None = None
    saliency_target: list[int] | None = Field(
        default=None, description="Positions whose log-prob is explained."
    )
    target_logprob: float | None = Field(default=None, description="Σ log p(target), unperturbed.")
    reasoning_saliency_share: float | None = Field(
        default=None, description="Σ|saliency| on reasoning tokens / Σ|saliency| on all scored tokens."
    )
    prompt_saliency_share: float | None = Field(
        default=None, description="Σ|saliency| on prompt tokens / Σ|saliency| on all scored tokens."
    )
    spearman_fai_saliency: float | None = Field(
        default=None, description="Spearman correlation of FAI and saliency over reasoning tokens."
    )
    counterfactual: Counterfactual | None = None
    r_faith: float | None = Field(default=None, description="AtManRL's mean mask saliency (atman_rl only).")


class Analysis(BaseModel):
    """A whole annotated response."""

    model_config = ConfigDict(populate_by_name=True)

    model: str
    adapter: str | None = None
    prompt_token_ids: list[int]
    prompt_tokens: list[str]
    prompt_fai: list[float | None] = Field(description="FAI of the prompt positions (spec §4).")
    prompt_saliency: list[float | None] | None = Field(default=None, description="Saliency of prompt tokens.")
    tokens: list[TokenAnnotation]
    layers: list[int]
    heads: HeadGroups
    params: dict[str, Any]
    answer_span: AnswerSpan | None
    summary: Summary
    timings: dict[str, float] = Field(default_factory=dict, description="Seconds spent per stage.")

    def to_json_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json", by_alias=True)

    def presented(self, metrics: Iterable[str], model: str, adapter: str | None) -> Analysis:
        """The annotations as a client asked for them, under the served names: the signals not among
        ``metrics`` are nulled (they come from the same pass, so they are free, but a response holds what
        was requested). Changes this object and returns it."""
        self.model, self.adapter = model, adapter
        wanted = set(metrics)
        for token in self.tokens:
            if "fai" not in wanted:
                token.fai = None
            if "waad" not in wanted:
                token.waad = None
            if "flags" not in wanted:
                token.preplan = token.anchor = token.dominated_anchor = token.intro = False
        if "fai" not in wanted:
            self.prompt_fai = [None] * len(self.prompt_fai)
        return self
