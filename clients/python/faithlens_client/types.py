"""Typed mirrors of the server's objects: annotations (docs/annotations.md), generations, models, adapters
and fine-tuning jobs. Unknown fields are kept (``extra="allow"``), so a newer server does not break an
older SDK."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class _Model(BaseModel):
    model_config = ConfigDict(extra="allow", populate_by_name=True)


class TokenAnnotation(_Model):
    index: int
    id: int
    text: str
    logprob: float | None = None
    fai: float | None = None
    waad: float | None = None
    preplan: bool = False
    anchor: bool = False
    dominated_anchor: bool = False
    intro: bool = False
    saliency: float | None = None


class AnswerSpan(_Model):
    start: int
    end: int
    text: str


class HeadGroups(_Model):
    local: list[tuple[int, int]]
    global_: list[tuple[int, int]] = Field(alias="global")


class Counterfactual(_Model):
    k: int
    base_logprob: float
    top_k_logprob: float
    random_k_logprob: float
    top_k_positions: list[int]
    random_k_positions: list[int]


class Summary(_Model):
    num_prompt_tokens: int
    num_response_tokens: int
    num_anchors: int
    num_preplan: int
    num_dominated_anchors: int
    num_coupled_pairs: int
    coupled_pairs: list[tuple[int, int]] = Field(default_factory=list)
    mean_fai: float | None = None
    mean_waad: float | None = None
    tau_waad: float | None = None
    tau_delta: float | None = None
    saliency_method: str | None = None
    saliency_target: list[int] | None = None
    target_logprob: float | None = None
    reasoning_saliency_share: float | None = None
    prompt_saliency_share: float | None = None
    spearman_fai_saliency: float | None = None
    counterfactual: Counterfactual | None = None
    r_faith: float | None = None


class Analysis(_Model):
    model: str
    adapter: str | None = None
    prompt_token_ids: list[int]
    prompt_tokens: list[str]
    prompt_fai: list[float | None]
    prompt_saliency: list[float | None] | None = None
    tokens: list[TokenAnnotation]
    layers: list[int]
    heads: HeadGroups
    params: dict[str, Any]
    answer_span: AnswerSpan | None = None
    summary: Summary
    timings: dict[str, float] = Field(default_factory=dict)


class Usage(_Model):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class Generation(_Model):
    """The answer of ``/v1/generate`` and ``/v1/analyze``."""

    id: str
    object: str
    model: str
    adapter: str | None = None
    text: str
    finish_reason: str | None = None
    usage: Usage
    timings: dict[str, float]
    annotations: Analysis | None = None


class ModelCard(_Model):
    id: str
    object: str = "model"
    created: int | None = None
    owned_by: str | None = None
    root: str | None = None
    parent: str | None = None


class Adapter(_Model):
    name: str
    path: str
    version: str
    loaded_at: int


class JobError(_Model):
    code: str
    message: str


class Job(_Model):
    id: str
    object: str = "fine_tuning.job"
    status: Literal["queued", "running", "succeeded", "failed", "cancelled"]
    created_at: int
    started_at: int | None = None
    finished_at: int | None = None
    error: JobError | None = None
    model: str
    method: dict[str, Any]
    hyperparameters: dict[str, Any]
    adapter_name: str
    training_data: str | None = None
    validation_data: str | None = None
    result_adapter: str | None = None
    seed: int = 0
    metadata: dict[str, str] = Field(default_factory=dict)
    step: int = 0

    @property
    def finished(self) -> bool:
        return self.status in ("succeeded", "failed", "cancelled")


class JobEvent(_Model):
    created_at: float
    level: str
    message: str
    type: Literal["message", "metrics"]
    data: dict[str, Any] | None = None


class Checkpoint(_Model):
    step_number: int
    path: str
    metrics: dict[str, Any]
    created_at: int


class SaliencyMethodInfo(_Model):
    """A saliency method the server runs (``analysis.saliency.method``)."""

    name: str
    description: str = ""
    options: list[str] = Field(default_factory=list)  # the saliency options it reads beyond the shared ones
    cost: str | None = None


class CreditStrategyInfo(_Model):
    """A credit-assignment strategy fine-tuning jobs accept (``method.credit``)."""

    name: str
    description: str = ""


class DatasetInfo(_Model):
    """A data set jobs and audits name, or a family of synthetic tasks (``name`` is then its pattern)."""

    name: str
    description: str = ""
    example: str = ""
    splits: list[str] = Field(default_factory=list)


class Capabilities(_Model):
    """The answer of ``GET /v1/capabilities``: what this server offers, by name."""

    object: str = "capabilities"
    saliency_methods: list[SaliencyMethodInfo]
    credit_strategies: list[CreditStrategyInfo]
    datasets: list[DatasetInfo] = Field(default_factory=list)  # empty from a server older than the field
    granularities: list[str]
    metrics: list[str]

    @property
    def saliency_method_names(self) -> list[str]:
        return [m.name for m in self.saliency_methods]


# -- audits at dataset scale (``/v1/audits``, shaped like OpenAI's Batch API) ------------------------------------
AuditStatus = Literal[
    "validating", "in_progress", "finalizing", "completed", "failed", "cancelling", "cancelled"
]


class AuditRequestCounts(_Model):
    total: int
    completed: int = 0  # rows analysed
    failed: int = 0  # rows that could not be analysed (each result says why)


class AuditError(_Model):
    """Why a row (or the audit) failed; ``line`` is the 1-based input row when one is to blame."""

    code: str
    message: str
    line: int | None = None


class AuditErrors(_Model):
    object: str = "list"
    data: list[AuditError] = Field(default_factory=list)


class Audit(_Model):
    id: str
    object: str = "audit"
    status: AuditStatus
    model: str
    adapter: str | None = None
    input: str | None = None  # inline, upload, gsm8k-dev or gsm8k-train
    analysis: dict[str, Any] = Field(default_factory=dict)
    sampling: dict[str, Any] = Field(default_factory=dict)
    reports: list[str] = Field(default_factory=list)
    metadata: dict[str, str] = Field(default_factory=dict)
    owner: str | None = None
    request_counts: AuditRequestCounts
    shards: int | None = None
    created_at: int
    in_progress_at: int | None = None
    finalizing_at: int | None = None
    completed_at: int | None = None
    failed_at: int | None = None
    cancelling_at: int | None = None
    cancelled_at: int | None = None
    errors: AuditErrors | None = None

    @property
    def finished(self) -> bool:
        return self.status in ("completed", "failed", "cancelled")


class AuditEvent(_Model):
    object: str = "audit.event"
    created_at: float
    level: str = "info"
    message: str
    data: dict[str, Any] | None = None


class AuditResult(_Model):
    """One line of ``/v1/audits/{id}/results``: one input row, in input order."""

    id: str
    index: int
    text: str | None = None  # the analysed response (generated or given); None on error
    annotations: Analysis | None = None
    correct: bool | None = None  # the answer matches the row's reference; None without one
    error: AuditError | None = None


class AuditReportSummary(_Model):
    """``/v1/audits/{id}/report``: the reports the audit asked for, by name (``summary``: aggregates with
    bootstrap intervals, docs/annotations.md; ``rhythm``: the rhythm study, statistics A, B and C with
    intervals, the B grid, ``per_problem`` and ``examples``, docs/api.md); None when not asked for. Their
    fields are kept as the server sends them."""

    id: str
    object: str = "audit.report"
    summary: dict[str, Any] | None = None
    rhythm: dict[str, Any] | None = None
