"""Guards every request passes before FastAPI sees it: who may call a server without API keys (loopback
peers, loopback ``Host:`` names), the body size limit (Content-Length or streamed bytes), and JSON numbers
that are not finite (``NaN``, ``Infinity``, ``1e999``), which Python's parser accepts and JSON does not."""

from __future__ import annotations

import ipaddress
import json
import math
import re
from collections.abc import Iterable

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.errors import APIError, clip

LOOPBACK_NAMES = frozenset({"localhost", "localhost."})
_HOST = re.compile(r"(?:\[(?P<ipv6>[0-9A-Fa-f:.]+)\]|(?P<name>[^:\[\]/@\s]+))(?::[0-9]{1,5})?")


def is_loopback(host: str) -> bool:
    """``localhost`` or a loopback address (127.0.0.0/8, ::1, and ::ffff:127.x.y.z), with or without the
    brackets of an IPv6 literal."""
    host = host.lower()
    if host in LOOPBACK_NAMES:
        return True
    try:
        address = ipaddress.ip_address(host.removeprefix("[").removesuffix("]"))
    except ValueError:
        return False
    mapped = getattr(address, "ipv4_mapped", None)
    return (mapped or address).is_loopback


def host_name(header: str | None) -> str | None:
    """The host of a ``Host:`` header without its port (IPv6 literals keep their brackets), lower-case;
    None when the header is missing or malformed."""
    match = _HOST.fullmatch(header or "")
    if match is None:
        return None
    if match["ipv6"] is not None:
        try:
            ipaddress.IPv6Address(match["ipv6"])
        except ValueError:
            return None
        return f"[{match['ipv6'].lower()}]"
    return match["name"].lower().rstrip(".") or None


class CallerGuard:
    """Without API keys (``loopback_only``) only a loopback peer may call, and only with a loopback name in
    ``Host:`` (a web page whose domain an attacker re-points at 127.0.0.1, DNS rebinding, sends its own
    domain); ``allowed_hosts`` are accepted too (``*.example.com`` matches subdomains). With keys and
    ``allowed_hosts`` set, ``Host:`` must be loopback or one of them; with keys and none set, any host."""

    def __init__(self, app: ASGIApp, loopback_only: bool, allowed_hosts: Iterable[str] = ()) -> None:
        self.app, self.loopback_only = app, loopback_only
        self.allowed = [host.lower().rstrip(".") for host in allowed_hosts]
        self.check_host = loopback_only or bool(self.allowed)

    def _host_allowed(self, host: str) -> bool:
        if is_loopback(host):
            return True
        return any(
            host == pattern or (pattern.startswith("*.") and host.endswith(pattern[1:]))
            for pattern in self.allowed
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        error = None
        client = scope.get("client")
        if self.loopback_only and client is not None and not is_loopback(str(client[0])):
            error = APIError(
                403, "loopback_only", "without FAITHLENS_API_KEYS this server answers loopback clients only"
            )
        elif self.check_host:
            headers = dict(scope.get("headers") or [])
            raw = headers.get(b"host")
            host = host_name(raw.decode("latin-1") if raw is not None else None)
            if host is None or not self._host_allowed(host):
                shown = clip(raw.decode("latin-1")) if raw is not None else "none"
                error = APIError(
                    400,
                    "invalid_host",
                    f"Host {shown} is not served here (loopback names"
                    + (", FAITHLENS_ALLOWED_HOSTS" if self.allowed else "")
                    + " only)",
                    "Host",
                )
        if error is not None:
            if scope["type"] == "websocket":
                await send({"type": "websocket.close", "code": 1008})
                return
            await error.response()(scope, receive, send)
            return
        await self.app(scope, receive, send)


class BodyTooLarge(HTTPException):
    def __init__(self, limit: int) -> None:
        super().__init__(413, f"the request body exceeds {limit} bytes")


class BodySizeLimit:
    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.limit):
            error = APIError(413, "body_too_large", f"the request body exceeds {self.limit} bytes")
            await error.response()(scope, receive, send)
            return
        seen = 0

        async def limited() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise BodyTooLarge(self.limit)
            return message

        await self.app(scope, limited, send)


class NotFinite(ValueError):
    pass


def _reject_constant(name: str) -> float:
    raise NotFinite(f"{name} is not a JSON number; numbers must be finite")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise NotFinite(f"{clip(text)} is out of range; numbers must be finite")
    return value


def non_finite_number(body: bytes) -> str | None:
    """Why ``body`` holds a number that is not finite (``NaN``, ``Infinity``, or one that overflows to
    infinity), or None: also when it is not JSON at all, which FastAPI reports itself."""
    try:
        json.loads(body, parse_constant=_reject_constant, parse_float=_finite_float)
    except NotFinite as exc:
        return str(exc)
    except ValueError:  # not JSON (or not UTF-8): FastAPI's own 400
        return None
    return None


def _is_json(headers: dict[bytes, bytes]) -> bool:
    """What FastAPI parses as JSON: no content type, ``application/json`` or ``application/*+json``."""
    content_type = headers.get(b"content-type")
    if content_type is None:
        return True
    media = content_type.split(b";", 1)[0].strip().lower()
    return media == b"application/json" or (media.startswith(b"application/") and media.endswith(b"+json"))


class FiniteJSON:
    """A JSON body with a number that is not finite is a 400 ``invalid_request`` before any route runs:
    pydantic checks only the fields that declare it, and a NaN that reaches a response or a stream makes
    it invalid JSON. The body is read here (within the size limit, so this sits inside BodySizeLimit)
    and handed on unchanged."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers = dict(scope.get("headers") or []) if scope["type"] == "http" else {}
        if scope["type"] != "http" or not _is_json(headers):
            await self.app(scope, receive, send)
            return
        chunks: list[bytes] = []
        try:
            while True:
                message = await receive()
                if message["type"] != "http.request":  # the client went away before the body ended
                    await self.app(scope, _replay([message], receive), send)
                    return
                chunks.append(message.get("body", b""))
                if not message.get("more_body", False):
                    break
        except BodyTooLarge as exc:
            await APIError(413, "body_too_large", str(exc.detail)).response()(scope, receive, send)
            return
        body = b"".join(chunks)
        if body and (reason := non_finite_number(body)) is not None:
            await APIError(400, "invalid_request", reason).response()(scope, receive, send)
            return
        await self.app(
            scope, _replay([{"type": "http.request", "body": body, "more_body": False}], receive), send
        )


def _replay(messages: list[Message], receive: Receive) -> Receive:
    """``messages`` first, then the real ``receive`` (which reports the disconnect)."""
    pending = list(messages)

    async def replay() -> Message:
        if pending:
            return pending.pop(0)
        return await receive()

    return replay
