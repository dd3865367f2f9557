"""Request and response models of the HTTP API. Annotations use faithlens.schema (docs/annotations.md)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from faithlens.analysis import AnalysisParams
from faithlens.atman import SaliencyParams
from faithlens.schema import Analysis

Metric = Literal["fai", "waad", "flags", "saliency"]
NonEmpty = Annotated[str, Field(min_length=1)]


class Strict(BaseModel):
    """Unknown fields are an error: a typo in an option must not be silently ignored."""

    model_config = ConfigDict(extra="forbid")


class Message(BaseModel):
    """A chat message. Extra OpenAI fields (name, ...) are accepted and ignored."""

    model_config = ConfigDict(extra="allow")

    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[dict[str, Any]]

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(part.get("text", "") for part in self.content if part.get("type") == "text")


class SaliencyOptions(Strict):
    """The saliency method and its options (docs/annotations.md, spec §7–8)."""

    method: Literal["atman", "atman_grad", "atman_rl"] = "atman"
    factor: float = Field(default=0.1, gt=0)
    conceptual_threshold: float | None = Field(default=None, ge=-1, le=1)
    granularity: Literal["token", "word", "sentence"] = "token"
    postprocess: Literal["none", "absolute", "square"] = "none"
    normalize: bool = False
    target: Literal["answer", "response"] | list[Annotated[int, Field(ge=0)]] = "answer"
    rl_steps: int = Field(default=200, ge=1, le=2000)
    seed: int = Field(default=0, ge=0, le=2**63 - 1)
    counterfactual_k: int = Field(default=5, ge=1, le=256)

    @field_validator("factor")
    @classmethod
    def _not_one(cls, value: float) -> float:
        if value == 1:
            raise ValueError("factor must be ≠ 1 (< 1 suppresses, > 1 amplifies)")
        return value

    def to_params(self) -> SaliencyParams:
        return SaliencyParams(**self.model_dump())


class AnalysisOptions(Strict):
    """What to annotate. Parameter names are the spec's (§2–5); unset means the spec's default."""

    metrics: list[Metric] = Field(default_factory=lambda: ["fai", "waad", "flags"], min_length=1)
    saliency: SaliencyOptions | None = Field(
        default=None, description="Saliency options; given alone, it also turns the `saliency` metric on."
    )
    layers: list[Annotated[int, Field(ge=0)]] | None = Field(default=None, min_length=1)
    W: int = Field(default=10, ge=1, le=4096)
    H_lo: int = Field(default=10, ge=0)
    H_hi: int | None = Field(default=100, ge=0)
    q: float = Field(default=0.4, gt=0, le=1)
    k: int = Field(default=3, ge=1, le=4096)
    tau_waad: float | None = None
    tau_delta: float | None = None
    head_fraction: float = Field(default=0.3, gt=0, le=0.5)

    @model_validator(mode="after")
    def _check(self) -> AnalysisOptions:
        if self.H_hi is not None and self.H_hi < self.H_lo:
            raise ValueError("H_hi must be ≥ H_lo (or null for 'to the end')")
        if self.saliency is not None and "saliency" not in self.metrics:
            self.metrics = [*self.metrics, "saliency"]
        return self

    def to_params(self) -> AnalysisParams:
        """The spec parameters are every field except what to return and how to score saliency."""
        return AnalysisParams(**self.model_dump(exclude={"metrics", "saliency"}))

    def saliency_params(self) -> SaliencyParams | None:
        if "saliency" not in self.metrics:
            return None
        return (self.saliency or SaliencyOptions()).to_params()


class PromptInput(Strict):
    """``prompt`` (raw text) or ``messages`` (chat template), exactly one."""

    prompt: str | None = Field(default=None, min_length=1)
    messages: list[Message] | None = Field(default=None, min_length=1)
    chat: bool = Field(default=False, description="Wrap a plain `prompt` in the chat template.")

    @model_validator(mode="after")
    def _one_input(self) -> PromptInput:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of `prompt` or `messages`")
        return self

    def message_dicts(self) -> list[dict[str, str]] | None:
        if self.messages is None:
            return None
        return [{"role": m.role, "content": m.text()} for m in self.messages]


class GenerateRequest(PromptInput):
    max_new_tokens: int = Field(default=256, ge=1)
    temperature: float = Field(default=0.0, ge=0, le=2)
    top_p: float = Field(default=1.0, gt=0, le=1)
    seed: int | None = None
    stop: list[NonEmpty] | NonEmpty | None = None
    adapter: str | None = Field(default=None, description="A loaded adapter's name; null: the base model.")
    analysis: AnalysisOptions | None = Field(default=None, description="Null: no annotations.")

    def stop_list(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


class AnalyzeRequest(PromptInput):
    completion: str = Field(min_length=1, description="The response to annotate, as the model would see it.")
    adapter: str | None = None
    analysis: AnalysisOptions = Field(default_factory=AnalysisOptions)


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class Timings(BaseModel):
    queue_s: float = Field(description="Waiting for a batch slot.")
    generate_s: float = Field(description="Prefill and decoding.")
    analysis_s: float = Field(description="Annotation (0 when none was asked for).")
    total_s: float


class GenerateResponse(BaseModel):
    id: str
    object: Literal["faithlens.generation", "faithlens.analysis"] = "faithlens.generation"
    model: str
    adapter: str | None
    text: str
    finish_reason: Literal["stop", "length"] | None
    usage: Usage
    timings: Timings
    annotations: Analysis | None


class ErrorBody(BaseModel):
    code: str
    message: str
    param: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody


# -- adapters ------------------------------------------------------------------------------------------
AdapterName = Annotated[str, Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")]


class LoadAdapterRequest(Strict):
    name: AdapterName
    path: str = Field(
        min_length=1, description="A directory inside the adapter store (absolute or relative)."
    )


class UnloadAdapterRequest(Strict):
    name: AdapterName


class AdapterInfo(BaseModel):
    name: str
    path: str
    version: str
    loaded_at: int


class AdapterList(BaseModel):
    object: Literal["list"] = "list"
    data: list[AdapterInfo]
