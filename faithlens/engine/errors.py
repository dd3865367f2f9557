"""The engine's own errors. They say what went wrong in the core's terms; ``service/errors.py`` alone turns
them into HTTP responses, so another front end (a CLI, a gRPC server) can map them its own way."""

from __future__ import annotations


class EngineError(Exception):
    """Base of every error an engine raises to its callers. ``param`` names the request field at fault."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.message, self.param = message, param


class InvalidRequest(EngineError):
    """The request cannot be served as given (empty prompt, options that do not fit the sequence)."""


class ContextLengthExceeded(InvalidRequest):
    """The prompt or the tokens asked for exceed a configured limit or the model's context."""


class AnalysisTooCostly(InvalidRequest):
    """The analysis' cost estimate exceeds the limit; refused before any work."""

    def __init__(self, message: str, estimate: float, limit: float, param: str | None = "analysis") -> None:
        super().__init__(message, param)
        self.estimate, self.limit = estimate, limit


class AdapterNotFound(EngineError):
    """No adapter of that name is attached."""


class AdapterRefused(InvalidRequest):
    """The adapter directory is not one this model takes (not a directory, no safetensors weights, files
    that do not parse). Raised before anything touches the model; subclasses say which check failed."""

    def __init__(self, message: str, param: str | None = "path") -> None:
        super().__init__(message, param)


class AdapterInvalidKeys(AdapterRefused):
    """The weights hold a tensor that is not a LoRA A/B matrix of a module the base model has (an embedding
    matrix, a bias, a module that does not exist), or a targeted module lacks its A or B."""


class AdapterShapeMismatch(AdapterRefused):
    """A LoRA matrix's shape does not fit its base module's in/out features and the declared rank."""


class AdapterRankTooLarge(AdapterRefused):
    """The declared rank exceeds FAITHLENS_MAX_LORA_RANK."""

    def __init__(self, message: str, rank: int, limit: int) -> None:
        super().__init__(message)
        self.rank, self.limit = rank, limit


class AdapterConfigRefused(AdapterRefused):
    """``adapter_config.json`` holds a field outside the allow-list, or a value that would change the base
    model (layer replication, modules to save, DoRA, biases, ...)."""


class AdapterBaseMismatch(AdapterRefused):
    """The adapter was trained on another base model than the one served."""


class Overloaded(EngineError):
    """The waiting line is full; retry after ``retry_after_s``."""

    def __init__(self, retry_after_s: int) -> None:
        super().__init__("the server is at capacity; retry later")
        self.retry_after_s = retry_after_s


class NotReady(EngineError):
    """The engine is not running (starting, stopping, or stopped)."""


class DeadlineExceeded(EngineError):
    """The analysis did not finish within its deadline; its work was dropped."""


class Cancelled(EngineError):
    """The request was aborted (its client went away)."""


class InternalError(EngineError):
    """A bug; the message never carries a traceback (the log does)."""
