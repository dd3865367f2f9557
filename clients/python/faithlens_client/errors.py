"""Typed exceptions carrying the server's stable error code (docs/api.md in the server repo)."""

from __future__ import annotations


class FaithlensError(Exception):
    """Any error from the SDK."""


class APIConnectionError(FaithlensError):
    """The server could not be reached (after retries)."""


class APIStatusError(FaithlensError):
    """The server answered with an error: ``status``, ``code``, ``message``, ``param``."""

    def __init__(self, status: int, code: str, message: str, param: str | None = None) -> None:
        super().__init__(f"{status} {code}: {message}" + (f" (param: {param})" if param else ""))
        self.status, self.code, self.message, self.param = status, code, message, param


class BadRequestError(APIStatusError): ...


class AuthenticationError(APIStatusError): ...


class PermissionDeniedError(APIStatusError): ...


class NotFoundError(APIStatusError): ...


class ConflictError(APIStatusError): ...


class OverloadedError(APIStatusError): ...


class InternalServerError(APIStatusError): ...


_BY_STATUS = {
    400: BadRequestError,
    401: AuthenticationError,
    403: PermissionDeniedError,
    404: NotFoundError,
    409: ConflictError,
    413: BadRequestError,
    503: OverloadedError,
}


def from_response(status: int, body: object) -> APIStatusError:
    error = body.get("error") if isinstance(body, dict) else None
    if not isinstance(error, dict):
        error = {"code": "http_error", "message": str(body)[:500]}
    cls = _BY_STATUS.get(status, InternalServerError if status >= 500 else APIStatusError)
    return cls(status, str(error.get("code")), str(error.get("message")), error.get("param"))
