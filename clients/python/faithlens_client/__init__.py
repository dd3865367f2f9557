"""faithlens-client: the Python SDK and CLI for a faithlens server (httpx + pydantic only)."""

from faithlens_client._client import (
    Adapters,
    AsyncAdapters,
    AsyncFaithlens,
    AsyncJobs,
    AsyncModels,
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
from faithlens_client.types import Capabilities, CreditStrategyInfo, SaliencyMethodInfo

__all__ = [
    "APIConnectionError",
    "APIStatusError",
    "Adapters",
    "AnalysisOptions",
    "AsyncAdapters",
    "AsyncFaithlens",
    "AsyncJobs",
    "AsyncModels",
    "AuditReport",
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
