"""What a request may ask for, defined once: sampling, analysis (spec §2–5) and saliency (spec §7–8).

These pydantic models are the single declaration of every option's name, default, bounds and meaning.
The service's request models embed them, the developer CLI derives its flags from them
(:mod:`faithlens.cli_args`), the client SDK mirrors them and a contract test keeps the mirror exact.
Implementation knobs that a client must not set (memory budgets, prefix reuse) are not here: they are
:class:`ComputeOptions`, which the caller that owns the machine passes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

Granularity = Literal["token", "word", "sentence"]
Postprocess = Literal["none", "absolute", "square"]
SaliencyTarget = Literal["answer", "response"] | list[Annotated[int, Field(ge=0)]]
NonEmpty = Annotated[str, Field(min_length=1)]


class Params(BaseModel):
    """Unknown fields are an error: a typo in an option must not be silently ignored."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    def as_dict(self) -> dict[str, Any]:
        return self.model_dump()


class SamplingParams(Params):
    """How to decode. ``temperature`` 0 is greedy; a ``seed`` gives the request its own RNG."""

    max_new_tokens: int = Field(default=256, ge=1, description="Upper bound on generated tokens.")
    min_new_tokens: int = Field(default=0, ge=0, description="No end-of-sequence before this many tokens.")
    temperature: float = Field(default=0.0, ge=0, le=2, description="0 is greedy.")
    top_p: float = Field(default=1.0, gt=0, le=1, description="Nucleus sampling mass.")
    seed: int | None = Field(default=None, ge=0, le=2**63 - 1, description="The request's own RNG seed.")
    stop: list[NonEmpty] = Field(
        default=[], max_length=16, description="Stop strings; the text ends before the first."
    )

    @field_validator("stop", mode="before")
    @classmethod
    def _one_or_many(cls, value: Any) -> Any:
        if value is None:
            return []
        return [value] if isinstance(value, str) else value


class AnalysisParams(Params):
    """The spec's parameters (§2–5) with its defaults. Field names are the spec's names."""

    W: int = Field(default=10, ge=1, le=4096, description="WAAD window (§3).")
    H_lo: int = Field(default=10, ge=0, description="FAI horizon start (§2).")
    H_hi: int | None = Field(default=100, ge=0, description="FAI horizon end; null: to the end (§2).")
    q: float = Field(default=0.4, gt=0, le=1, description="Top-q share for the flags (§4).")
    k: int = Field(default=3, ge=1, le=4096, description="Look-back for dominated anchors (§5).")
    tau_waad: float | None = Field(
        default=None, allow_inf_nan=False, description="WAAD threshold; null: the response's median."
    )
    tau_delta: float | None = Field(
        default=None, allow_inf_nan=False, description="Δ threshold; null: the response's median."
    )
    layers: list[Annotated[int, Field(ge=0)]] | None = Field(
        default=None, min_length=1, max_length=256, description="Probed layers; null: five from L/3 to 2L/3."
    )
    head_fraction: float = Field(default=0.3, gt=0, le=0.5, description="Share of heads called local/global.")

    @model_validator(mode="after")
    def _horizon(self) -> AnalysisParams:
        if self.H_hi is not None and self.H_hi < self.H_lo:
            raise ValueError("H_hi must be ≥ H_lo (or null for 'to the end')")
        return self

    def resolved_layers(self, num_layers: int) -> list[int]:
        from faithlens.metrics import default_layers

        layers = self.layers if self.layers is not None else default_layers(num_layers)
        bad = [layer for layer in layers if not 0 <= layer < num_layers]
        if bad or not layers:
            raise ValueError(f"layers {bad or layers} out of range for a {num_layers}-layer model")
        return sorted(set(layers))


class SaliencyParams(Params):
    """The saliency method and its options. ``method`` names an entry of
    :data:`faithlens.saliency.SALIENCY_METHODS`; each method reads the options it lists there."""

    method: str = Field(default="atman", description="A saliency method; see /v1/capabilities.")
    factor: float = Field(
        default=0.1,
        gt=0,
        allow_inf_nan=False,
        description="Suppression factor f (< 1 suppresses, > 1 amplifies).",
    )
    conceptual_threshold: float | None = Field(
        default=None, ge=-1, le=1, description="Conceptual suppression threshold κ; null: off."
    )
    granularity: Granularity = Field(default="token", description="What one suppression removes.")
    postprocess: Postprocess = "none"
    normalize: bool = Field(default=False, description="Min-max normalise the scores.")
    target: SaliencyTarget = Field(
        default="answer", description="The answer span, the whole response, or explicit positions."
    )
    rl_steps: int = Field(
        default=200,
        ge=1,
        le=2000,
        description="atman_rl mask optimisation steps; the mask's lr is 0.2 / steps (spec §8).",
    )
    seed: int = Field(
        default=0, ge=0, le=2**63 - 1, description="Seed of random choices (mask init, random-k)."
    )
    counterfactual_k: int = Field(default=5, ge=1, le=256, description="k of the top-k/random-k check.")

    @field_validator("method")
    @classmethod
    def _registered(cls, value: str) -> str:
        from faithlens.saliency import SALIENCY_METHODS

        SALIENCY_METHODS.get(value)  # raises ValueError naming the registered methods
        return value

    @field_validator("factor")
    @classmethod
    def _not_one(cls, value: float) -> float:
        if value == 1:
            raise ValueError("factor must be ≠ 1 (< 1 suppresses, > 1 amplifies)")
        return value


@dataclass(frozen=True)
class ComputeOptions:
    """How the machine runs an analysis: memory budgets and reuse. Same results, different cost; set by
    whoever owns the machine (the engine, a benchmark, a test), never by a request."""

    probe_memory_mb: int = 256  # bound on the attention probe's row-chunk temporaries
    # bound on one exact-AtMan batch; None: the device's (atman.batch_plan)
    atman_memory_mb: int | None = None
    prefix_reuse: bool = True  # exact AtMan starts each batch from the cached unperturbed prefix
    recompute_slack: float | None = None  # None: the device's (atman.CPU_/GPU_RECOMPUTE_SLACK)
