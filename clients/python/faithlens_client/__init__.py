"""faithlens-client: the Python SDK and CLI for a faithlens server (httpx + pydantic only)."""

from faithlens_client._client import (
    Adapters,
    AsyncAdapters,
    AsyncAudits,
    AsyncFaithlens,
    AsyncJobs,
    AsyncModels,
    Audits,
    Faithlens,
    Jobs,
    Models,
)
from faithlens_client.audit import AuditReport
from faithlens_client.errors import (
    APIConnectionError,
    APIStatusError,
    AuthenticationError,
    BadRequestError,
    FaithlensError,
    NotFoundError,
    OverloadedError,
    PermissionDeniedError,
)
from faithlens_client.params import AnalysisOptions, SaliencyOptions, SamplingOptions
from faithlens_client.render import render_page
from faithlens_client.types import (
    Audit,
    AuditEvent,
    AuditReportSummary,
    AuditRequestCounts,
    AuditResult,
    Capabilities,
    CreditStrategyInfo,
    SaliencyMethodInfo,
)

__all__ = [
    "APIConnectionError",
    "APIStatusError",
    "Adapters",
    "AnalysisOptions",
    "AsyncAdapters",
    "AsyncAudits",
    "AsyncFaithlens",
    "AsyncJobs",
    "AsyncModels",
    "Audit",
    "AuditEvent",
    "AuditReport",
    "AuditReportSummary",
    "AuditRequestCounts",
    "AuditResult",
    "Audits",
    "AuthenticationError",
    "BadRequestError",
    "Capabilities",
    "CreditStrategyInfo",
    "Faithlens",
    "FaithlensError",
    "Jobs",
    "Models",
    "NotFoundError",
    "OverloadedError",
    "PermissionDeniedError",
    "SaliencyMethodInfo",
    "SaliencyOptions",
    "SamplingOptions",
    "render_page",
]
