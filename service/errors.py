"""Every error leaves the server as ``{"error": {"code", "message", "param"}}``; codes are stable API.

| status | code | when |
|---|---|---|
| 400 | invalid_request | the body fails validation (``param`` names the field) |
| 400 | context_length_exceeded | prompt (characters or tokens) or max_new_tokens over the configured limits |
| 400 | analysis_too_costly | the analysis' cost estimate exceeds FAITHLENS_MAX_ANALYSIS_COST; the message says what fits |
| 400 | adapter_path_invalid | the path is outside the adapter store |
| 400 | adapter_invalid | not a safetensors LoRA adapter, or it does not fit the base model |
| 400 | adapter_invalid_keys | the weights hold something other than LoRA A/B matrices of the base model's linear modules, or lack one |
| 400 | adapter_shape_mismatch | a LoRA matrix does not fit its module's in/out features or the declared rank |
| 400 | adapter_rank_too_large | the declared rank is over FAITHLENS_MAX_LORA_RANK |
| 400 | adapter_config_refused | adapter_config.json sets a field outside the allow-list (layer_replication, modules_to_save, DoRA, ...) |
| 400 | adapter_base_mismatch | the adapter was trained on another base model |
| 400 | adapter_name_reserved | the adapter name is the base model's served name |
| 400 | unsupported | a valid OpenAI option we do not implement (e.g. n > 1) |
| 400 | invalid_host | the `Host:` header is not a loopback name (without API keys) nor in FAITHLENS_ALLOWED_HOSTS |
| 401 | invalid_api_key | missing or unknown API key |
| 403 | insufficient_scope | the key lacks the `admin` scope |
| 403 | loopback_only | without API keys, a caller that is not on loopback |
| 404 | model_not_found | unknown model or adapter name |
| 404 | not_found | unknown route or object |
| 405 | method_not_allowed | wrong HTTP method |
| 400 | dataset_unavailable | a job or audit names a data set whose file is not in FAITHLENS_DATA_DIR; the message says where it was looked for |
| 413 | body_too_large | request body over FAITHLENS_MAX_BODY_BYTES |
| 501 | ui_unavailable | /ui or an HTML report on a server without the audit view's files (service/view.py); the message says where they were looked for |
| 503 | overloaded | the queue is full; see Retry-After |
| 503 | redis_unavailable | a jobs route while Redis is unreachable; see Retry-After (inference goes on) |
| 499 | cancelled | the client went away (only in logs and metrics: nobody reads the response) |
| 503 | not_ready | the model is still loading or shutting down |
| 504 | analysis_timeout | the analysis passed FAITHLENS_ANALYSIS_TIMEOUT_S; its work was dropped |
| 500 | internal_error | a bug; the message never carries a traceback |

A message quotes at most ECHO_LIMIT characters of any one client value (a 1 MB field is not sent back).
"""

from __future__ import annotations

import logging

import redis.exceptions
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from kombu.exceptions import OperationalError as BrokerUnavailable
from starlette.exceptions import HTTPException as StarletteHTTPException

from faithlens import engine
from faithlens.engine.errors import (
    AdapterBaseMismatch,
    AdapterConfigRefused,
    AdapterInvalidKeys,
    AdapterRankTooLarge,
    AdapterRefused,
    AdapterShapeMismatch,
)

log = logging.getLogger("faithlens.service")

ECHO_LIMIT = 100  # characters of one client value a message may quote
MESSAGE_LIMIT = 1000  # characters of a whole message


def clip(text: str, limit: int = ECHO_LIMIT) -> str:
    """``text`` cut to ``limit`` characters, saying how long it was."""
    return text if len(text) <= limit else f"{text[:limit]}… ({len(text)} characters)"


def clip_quoted(message: str, limit: int = ECHO_LIMIT) -> str:
    """``message`` with every quoted span ('…' or "…", as ``repr`` writes values) cut to ``limit``
    characters, and the whole to MESSAGE_LIMIT. One pass: a span ends at its next unescaped quote."""
    out, i, length = [], 0, 0
    upcoming = {quote: message.find(quote) for quote in "'\""}
    while length <= MESSAGE_LIMIT:  # past it, the rest is cut anyway
        for quote, at in upcoming.items():
            if 0 <= at < i:
                upcoming[quote] = message.find(quote, i)
        if (start := min((at for at in upcoming.values() if at >= 0), default=-1)) < 0:
            break
        quote, end = message[start], start + 1
        while (end := message.find(quote, end)) >= 0 and _escaped(message, end):
            end += 1
        end = len(message) if end < 0 else end
        out += [message[i : start + 1], clip(message[start + 1 : end], limit), message[end : end + 1]]
        length += sum(len(part) for part in out[-3:])
        i = end + 1
    out.append(message[i:])
    return clip("".join(out), MESSAGE_LIMIT)


def _escaped(text: str, index: int) -> bool:
    """Whether the character at ``index`` follows an odd number of backslashes."""
    before = index
    while before > 0 and text[before - 1] == "\\":
        before -= 1
    return (index - before) % 2 == 1


class APIError(Exception):
    """An error with a stable code, raised anywhere in the service and rendered by the handler."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        message = clip_quoted(message)
        param = clip(param) if param is not None else None
        super().__init__(message)
        self.status, self.code, self.message, self.param = status, code, message, param
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"code": self.code, "message": self.message, "param": self.param}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def overloaded(retry_after: int) -> APIError:
    return APIError(
        503, "overloaded", "the server is at capacity; retry later", headers={"Retry-After": str(retry_after)}
    )


def redis_unavailable(retry_after: int) -> APIError:
    return APIError(
        503,
        "redis_unavailable",
        "Redis (the job store and queue) is unreachable; retry later",
        headers={"Retry-After": str(retry_after)},
    )


def model_not_found(name: str, param: str = "model") -> APIError:
    return APIError(404, "model_not_found", f"no model or adapter named {name!r} is loaded", param)


# The engine's errors, as (status, code). The one place they become HTTP.
_ENGINE_ERRORS: list[tuple[type[engine.EngineError], int, str]] = [
    (engine.AnalysisTooCostly, 400, "analysis_too_costly"),
    (engine.ContextLengthExceeded, 400, "context_length_exceeded"),
    (AdapterInvalidKeys, 400, "adapter_invalid_keys"),
    (AdapterShapeMismatch, 400, "adapter_shape_mismatch"),
    (AdapterRankTooLarge, 400, "adapter_rank_too_large"),
    (AdapterConfigRefused, 400, "adapter_config_refused"),
    (AdapterBaseMismatch, 400, "adapter_base_mismatch"),
    (AdapterRefused, 400, "adapter_invalid"),
    (engine.InvalidRequest, 400, "invalid_request"),
    (engine.AdapterNotFound, 404, "model_not_found"),
    (engine.Cancelled, 499, "cancelled"),
    (engine.Overloaded, 503, "overloaded"),
    (engine.NotReady, 503, "not_ready"),
    (engine.DeadlineExceeded, 504, "analysis_timeout"),
]


def from_engine(exc: engine.EngineError, field_names: dict[str, str] | None = None) -> APIError:
    """The HTTP form of an engine error; ``field_names`` renames engine fields to the client's."""
    if isinstance(exc, engine.Overloaded):
        return overloaded(exc.retry_after_s)
    param = (field_names or {}).get(exc.param or "", exc.param)
    for kind, status, code in _ENGINE_ERRORS:
        if isinstance(exc, kind):
            return APIError(status, code, exc.message, param)
    return APIError(500, "internal_error", "internal server error")


_HTTP_CODES = {404: "not_found", 405: "method_not_allowed", 413: "body_too_large", 401: "invalid_api_key"}


def _validation_error(exc: RequestValidationError) -> APIError:
    errors = exc.errors()
    first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
    loc = [clip(str(part)) for part in first.get("loc", ()) if part != "body"]
    message = first.get("msg", "invalid request")
    if len(errors) > 1:
        message += f" (and {len(errors) - 1} more)"
    return APIError(400, "invalid_request", message, ".".join(loc) or None)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(engine.EngineError)
    async def _engine_error(request: Request, exc: engine.EngineError) -> JSONResponse:
        return from_engine(exc).response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return _validation_error(exc).response()

    @app.exception_handler(redis.exceptions.ConnectionError)
    @app.exception_handler(redis.exceptions.TimeoutError)
    @app.exception_handler(BrokerUnavailable)
    async def _redis_down(request: Request, exc: Exception) -> JSONResponse:
        """Redis is down (or still loading its AOF): jobs routes answer 503; inference never needs it."""
        log.warning("Redis unreachable", extra={"path": request.url.path, "error": clip(str(exc), 200)})
        state = getattr(request.app.state, "faithlens", None)
        return redis_unavailable(state.settings.retry_after_s if state is not None else 1).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = _HTTP_CODES.get(
            exc.status_code, "invalid_request" if exc.status_code < 500 else "internal_error"
        )
        return APIError(exc.status_code, code, str(exc.detail)).response()

    @app.exception_handler(Exception)
    async def _crash(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error", extra={"path": request.url.path})
        return APIError(500, "internal_error", "internal server error").response()
