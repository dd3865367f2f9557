"""API keys with scopes. ``admin`` implies ``infer``. With no keys configured every call is allowed (the
server then binds to loopback only; see ``service.__main__``).

Each call's caller is a :class:`Principal`: the scope of its key and an owner id for what it creates (a
SHA-256 prefix of the key, never the key). Jobs belong to their owner: ``infer`` keys see only their own,
``admin`` keys (and every caller when auth is off) see all."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from fastapi import Request

from jobs.models import owner_id
from service.errors import APIError

Scope = Literal["infer", "admin"]


@dataclass(frozen=True)
class Principal:
    """Who is calling. ``owner`` is None when auth is off (anonymous; sees everything)."""

    owner: str | None
    admin: bool

    def may_see(self, owner: str | None) -> bool:
        """Whether this caller may see (read, follow, cancel) an object owned by ``owner``."""
        return self.admin or (self.owner is not None and owner == self.owner)

    @property
    def visible_owner(self) -> str | None:
        """The owner whose jobs a listing shows: None (everyone's) for admins and anonymous callers."""
        return None if self.admin else self.owner


ANONYMOUS = Principal(owner=None, admin=True)


def presented_key(request: Request) -> str | None:
    """``Authorization: Bearer <key>`` (what the openai package sends) or ``X-API-Key``."""
    auth = request.headers.get("authorization", "")
    scheme, _, token = auth.partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    return request.headers.get("x-api-key") or None


def require(scope: Scope) -> Callable[[Request], Principal]:
    """A dependency that refuses callers without ``scope`` (401/403) and returns the caller."""

    def dependency(request: Request) -> Principal:
        keys: dict[str, str] = request.app.state.api_keys
        if not keys:
            return ANONYMOUS
        key = presented_key(request)
        if key is None or key not in keys:
            raise APIError(
                401, "invalid_api_key", "a valid API key is required", headers={"WWW-Authenticate": "Bearer"}
            )
        if scope == "admin" and keys[key] != "admin":
            raise APIError(403, "insufficient_scope", "this call needs a key with the `admin` scope")
        return Principal(owner=owner_id(key), admin=keys[key] == "admin")

    return dependency
