"""Request and response models of the HTTP API. Annotations use faithlens.schema (docs/annotations.md)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from faithlens.params import AnalysisParams, SaliencyParams, SamplingParams
from faithlens.schema import Analysis

Metric = Literal["fai", "waad", "flags", "saliency"]


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


class AnalysisOptions(AnalysisParams):
    """What to annotate: the spec's parameters (:class:`faithlens.params.AnalysisParams`, §2–5), which
    signals to return, and saliency (:class:`faithlens.params.SaliencyParams`, §7–8)."""

    metrics: list[Metric] = Field(default=["fai", "waad", "flags"], min_length=1)
    saliency: SaliencyParams | None = Field(
        default=None, description="Saliency options; given alone, it also turns the `saliency` metric on."
    )

    @model_validator(mode="after")
    def _saliency_metric(self) -> AnalysisOptions:
        if self.saliency is not None and "saliency" not in self.metrics:
            self.metrics = [*self.metrics, "saliency"]
        return self

    def to_params(self) -> AnalysisParams:
        """The spec parameters: every field except what to return and how to score saliency."""
        return AnalysisParams.model_validate(self.model_dump(include=set(AnalysisParams.model_fields)))

    def saliency_params(self) -> SaliencyParams | None:
        if "saliency" not in self.metrics:
            return None
        return self.saliency or SaliencyParams()


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


class GenerateRequest(PromptInput, SamplingParams):
    """A prompt, how to decode it (:class:`faithlens.params.SamplingParams`) and what to annotate."""

    adapter: str | None = Field(default=None, description="A loaded adapter's name; null: the base model.")
    analysis: AnalysisOptions | None = Field(default=None, description="Null: no annotations.")

    def sampling(self) -> SamplingParams:
        return SamplingParams.model_validate(self.model_dump(include=set(SamplingParams.model_fields)))


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


# -- capabilities ------------------------------------------------------------------------------------------
class SaliencyMethodInfo(BaseModel):
    name: str
    description: str
    options: list[str] = Field(description="The saliency options this method reads, beyond the shared ones.")
    cost: str = Field(description="What the method's work is, as its cost estimate counts it.")


class CreditStrategyInfo(BaseModel):
    name: str
    description: str


class DatasetInfo(BaseModel):
    """A data set jobs (`training_data`, `validation_data`) and audits (`input`) name: a fixed one, or a
    family of synthetic tasks whose names carry the difficulty."""

    name: str = Field(description="`gsm8k-dev`; for a task family, the pattern of its names.")
    description: str
    example: str = Field(description="A name that works, such as `arith-add:1-15/train`.")
    splits: list[str] = Field(description="The splits a task family's names end in; [] for a fixed set.")


class Capabilities(BaseModel):
    """What this server can compute: read from the registries, so plugins appear here too."""

    object: Literal["capabilities"] = "capabilities"
    saliency_methods: list[SaliencyMethodInfo]
    credit_strategies: list[CreditStrategyInfo]
    datasets: list[DatasetInfo]
    granularities: list[str]
    metrics: list[str]
