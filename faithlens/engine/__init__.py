"""The engine: what the API routes talk to (:class:`EngineClient`) and the in-process implementation."""

from faithlens.engine.errors import (
    AdapterNotFound,
    AnalysisTooCostly,
    Cancelled,
    ContextLengthExceeded,
    DeadlineExceeded,
    EngineError,
    InternalError,
    InvalidRequest,
    NotReady,
    Overloaded,
)
from faithlens.engine.local import EngineConfig, EngineObserver, LocalEngine
from faithlens.engine.protocol import (
    AnalysisRequest,
    AnalysisSpec,
    EngineClient,
    EngineHealth,
    GenerationRequest,
    Prompt,
    RequestOutput,
    Timings,
    TokenOutput,
    new_request_id,
)

__all__ = [
    "AdapterNotFound",
    "AnalysisRequest",
    "AnalysisSpec",
    "AnalysisTooCostly",
    "Cancelled",
    "ContextLengthExceeded",
    "DeadlineExceeded",
    "EngineClient",
    "EngineConfig",
    "EngineError",
    "EngineHealth",
    "EngineObserver",
    "GenerationRequest",
    "InternalError",
    "InvalidRequest",
    "LocalEngine",
    "NotReady",
    "Overloaded",
    "Prompt",
    "RequestOutput",
    "Timings",
    "TokenOutput",
    "new_request_id",
]
