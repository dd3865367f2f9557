"""The request options, mirrored from the server's parameter models (``faithlens.params`` there).

The SDK cannot import the server, so these are a copy; ``tests/test_contract.py`` checks it field for
field against the server's ``/openapi.json`` (names, types, defaults and bounds), so it cannot drift.
Invalid values fail here, before a request is sent, with the server's own bounds.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

NonEmpty = Annotated[str, Field(min_length=1)]
Metric = Literal["fai", "waad", "flags", "saliency"]


class _Options(BaseModel):
    model_config = ConfigDict(extra="forbid")

    def body(self) -> dict[str, Any]:
        """What goes on the wire: only the fields that were set, so the server applies its defaults."""
        return self.model_dump(exclude_unset=True)


class SamplingOptions(_Options):
    """How to decode. ``temperature`` 0 is greedy; a ``seed`` gives the request its own RNG."""

    max_new_tokens: int = Field(default=256, ge=1)
    min_new_tokens: int = Field(default=0, ge=0)
    temperature: float = Field(default=0.0, ge=0, le=2)
    top_p: float = Field(default=1.0, gt=0, le=1)
    seed: int | None = Field(default=None, ge=0, le=2**63 - 1)
    stop: list[NonEmpty] = Field(default=[], max_length=16)

    @field_validator("stop", mode="before")
    @classmethod
    def _one_or_many(cls, value: Any) -> Any:
        if value is None:
            return []
        return [value] if isinstance(value, str) else value


class SaliencyOptions(_Options):
    """The saliency method (``client.capabilities()`` lists them) and its options."""

    method: str = "atman"
    factor: float = Field(default=0.1, gt=0, allow_inf_nan=False)
    conceptual_threshold: float | None = Field(default=None, ge=-1, le=1)
    granularity: Literal["token", "word", "sentence"] = "token"
    postprocess: Literal["none", "absolute", "square"] = "none"
    normalize: bool = False
    target: Literal["answer", "response"] | list[Annotated[int, Field(ge=0)]] = "answer"
    rl_steps: int = Field(default=200, ge=1, le=2000)
    seed: int = Field(default=0, ge=0, le=2**63 - 1)
    counterfactual_k: int = Field(default=5, ge=1, le=256)


class AnalysisOptions(_Options):
    """What to annotate: the spec's parameters, which signals to return, and saliency."""

    W: int = Field(default=10, ge=1, le=4096)
    H_lo: int = Field(default=10, ge=0)
    H_hi: int | None = Field(default=100, ge=0)
    q: float = Field(default=0.4, gt=0, le=1)
    k: int = Field(default=3, ge=1, le=4096)
    tau_waad: float | None = Field(default=None, allow_inf_nan=False)
    tau_delta: float | None = Field(default=None, allow_inf_nan=False)
    layers: list[Annotated[int, Field(ge=0)]] | None = Field(default=None, min_length=1, max_length=256)
    head_fraction: float = Field(default=0.3, gt=0, le=0.5)
    metrics: list[Metric] = Field(default=["fai", "waad", "flags"], min_length=1)
    saliency: SaliencyOptions | None = None

    def body(self) -> dict[str, Any]:
        out = super().body()
        if self.saliency is not None:
            out["saliency"] = self.saliency.body()
        return out
