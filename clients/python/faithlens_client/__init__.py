"""faithlens-client: the Python SDK and CLI for a faithlens server (httpx + pydantic only)."""

from faithlens_client._client import AsyncFaithlens, Faithlens
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
from faithlens_client.render import render_page

__all__ = [
    "APIConnectionError",
    "APIStatusError",
    "AsyncFaithlens",
    "AuditReport",
    "AuthenticationError",
    "BadRequestError",
    "Faithlens",
    "FaithlensError",
    "NotFoundError",
    "OverloadedError",
    "PermissionDeniedError",
    "render_page",
]
