"""API keys with scopes. ``admin`` implies ``infer``. With no keys configured every call is allowed (the
server then binds to loopback only; see ``service.__main__``)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

from fastapi import Request

from service.errors import APIError

Scope = Literal["infer", "admin"]


def presented_key(request: Request) -> str | None:
    """``Authorization: Bearer <key>`` (what the openai package sends) or ``X-API-Key``."""
    auth = request.headers.get("authorization", "")
    scheme, _, token = auth.partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    return request.headers.get("x-api-key") or None


def require(scope: Scope) -> Callable[[Request], None]:
    def dependency(request: Request) -> None:
        keys: dict[str, str] = request.app.state.api_keys
        if not keys:
            return
        key = presented_key(request)
        if key is None or key not in keys:
            raise APIError(
                401, "invalid_api_key", "a valid API key is required", headers={"WWW-Authenticate": "Bearer"}
            )
        if scope == "admin" and keys[key] != "admin":
            raise APIError(403, "insufficient_scope", "this call needs a key with the `admin` scope")

    return dependency
