"""OpenAI-compatible request bodies, and the response objects and stream chunks the routes send.

Unknown request fields are refused; fields OpenAI defines but we do not implement are accepted only at
their neutral value (``n=1``, zero penalties), otherwise 400 ``unsupported``.
"""

from __future__ import annotations

import functools
import operator
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, TypeAdapter, model_validator

from faithlens.params import NonEmpty
from faithlens.schema import Analysis
from service.errors import APIError
from service.schemas import AnalysisOptions, Message, Usage


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: StrictBool = False


class _Common(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str | None = Field(default=None, description="The base model's name or an adapter's name.")
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    temperature: float = Field(default=1.0, ge=0, le=2)
    top_p: float = Field(default=1.0, gt=0, le=1)
    n: int = Field(default=1, ge=1)
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    stop: NonEmpty | list[NonEmpty] | None = None
    seed: int | None = None
    presence_penalty: float = Field(default=0.0, ge=-2, le=2)
    frequency_penalty: float = Field(default=0.0, ge=-2, le=2)
    user: str | None = None
    faithlens: AnalysisOptions | None = Field(default=None, description="Annotations to attach (faithlens).")

    @model_validator(mode="after")
    def _check_common(self) -> _Common:
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed with stream: true")
        return self

    def check_supported(self) -> None:
        if self.n != 1:
            raise APIError(400, "unsupported", "only n=1 is supported", "n")
        if self.presence_penalty or self.frequency_penalty:
            raise APIError(
                400,
                "unsupported",
                "presence and frequency penalties are not supported",
                "presence_penalty" if self.presence_penalty else "frequency_penalty",
            )

    def stop_list(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class ChatCompletionRequest(_Common):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    logprobs: StrictBool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)

    @model_validator(mode="after")
    def _check_chat(self) -> ChatCompletionRequest:
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs requires logprobs: true")
        return self


class CompletionRequest(_Common):
    prompt: NonEmpty | Annotated[list[NonEmpty], Field(min_length=1, max_length=1)]
    max_tokens: Annotated[int, Field(ge=1)] | None = 16  # OpenAI's default for completions
    logprobs: int | None = Field(default=None, ge=0, le=5)
    echo: StrictBool = False
    suffix: str | None = None
    best_of: int | None = Field(default=None, ge=1)

    def check_supported(self) -> None:
        super().check_supported()
        if self.echo:
            raise APIError(400, "unsupported", "echo is not supported", "echo")
        if self.suffix:
            raise APIError(400, "unsupported", "suffix is not supported", "suffix")
        if self.best_of not in (None, 1):
            raise APIError(400, "unsupported", "only best_of=1 is supported", "best_of")

    def prompt_text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]


# -- responses --------------------------------------------------------------------------------------------
# The objects the OpenAI-compatible routes send, field for field as OpenAI names them. Fields that
# OpenAI's objects carry as ``null`` are always sent; the few that are left out when empty (a chunk's
# ``usage``, a delta's ``role``, the ``faithlens`` annotations, ...) say so with ``exclude_if``, so a
# plain ``model_dump()`` is the wire format, in a route's ``response_model`` and in the event stream alike.
def _is_none(value: object) -> bool:
    return value is None


def _omitted_when_none(description: str | None = None) -> Any:
    return Field(default=None, exclude_if=_is_none, description=description)


FinishReason = Literal["stop", "length"]


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] = Field(description="The token's UTF-8 bytes.")


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob]
    refusal: list[ChatTokenLogprob] | None = None


class CompletionLogprobs(BaseModel):
    """The legacy completions ``logprobs`` object."""

    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]] | None
    text_offset: list[int]


class ChatMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str
    refusal: str | None = None


class ChatChoice(BaseModel):
    index: int = 0
    message: ChatMessage
    logprobs: ChatLogprobs | None
    finish_reason: FinishReason | None


class ChatDelta(BaseModel):
    """What a chunk adds to the message: the role once, in the first chunk, then content."""

    role: Literal["assistant"] | None = _omitted_when_none()
    content: str | None = _omitted_when_none()


class ChatChunkChoice(BaseModel):
    index: int = 0
    delta: ChatDelta
    logprobs: ChatLogprobs | None = None
    finish_reason: FinishReason | None = None


class CompletionChoice(BaseModel):
    """A completion's choice; in a stream, each chunk's ``text`` is the new text only."""

    index: int = 0
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: FinishReason | None = None


class _OpenAIObject(BaseModel):
    """What every completion object and stream chunk has around its ``choices``."""

    id: str
    object: str
    created: int = Field(description="Unix seconds.")
    model: str
    system_fingerprint: str | None = None


_ANNOTATIONS = "The annotations asked for with `faithlens` in the request (docs/annotations.md)."


class ChatCompletion(_OpenAIObject):
    object: Literal["chat.completion"] = "chat.completion"
    choices: list[ChatChoice]
    usage: Usage
    faithlens: Analysis | None = _omitted_when_none(_ANNOTATIONS)


class Completion(_OpenAIObject):
    object: Literal["text_completion"] = "text_completion"
    choices: list[CompletionChoice]
    usage: Usage
    faithlens: Analysis | None = _omitted_when_none(_ANNOTATIONS)


class ChatCompletionChunk(_OpenAIObject):
    """One ``data:`` event of a chat stream. The last ones have ``choices: []``: one with ``faithlens``
    when annotations were asked for, then one with ``usage`` when ``stream_options.include_usage``."""

    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    choices: list[ChatChunkChoice]
    usage: Usage | None = _omitted_when_none()
    faithlens: Analysis | None = _omitted_when_none(_ANNOTATIONS)


class CompletionChunk(_OpenAIObject):
    """One ``data:`` event of a completions stream (OpenAI streams ``text_completion`` objects)."""

    object: Literal["text_completion"] = "text_completion"
    choices: list[CompletionChoice]
    usage: Usage | None = _omitted_when_none()
    faithlens: Analysis | None = _omitted_when_none(_ANNOTATIONS)


class Model(BaseModel):
    """The base model (``parent: null``) or a loaded adapter (``parent``: the base model's name)."""

    id: str
    object: Literal["model"] = "model"
    created: int = Field(description="Unix seconds: the server's start, or the adapter's load.")
    owned_by: str = "faithlens"
    root: str = Field(description="Where the weights were read from.")
    parent: str | None
    version: str | None = _omitted_when_none("The adapter's loaded version (adapters only).")
    max_model_len: int


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Model]


def token_bytes(text: str) -> list[int]:
    return list(text.encode("utf-8"))


def chat_logprobs(
    texts: list[str], logprobs: list[float], tops: list[list[tuple[str, float]]]
) -> ChatLogprobs:
    """OpenAI's chat ``logprobs`` object: one entry per token, each with its top alternatives."""
    content = []
    for i, (text, lp) in enumerate(zip(texts, logprobs, strict=True)):
        top = tops[i] if i < len(tops) else []
        content.append(
            ChatTokenLogprob(
                token=text,
                logprob=lp,
                bytes=token_bytes(text),
                top_logprobs=[TopLogprob(token=t, logprob=v, bytes=token_bytes(t)) for t, v in top],
            )
        )
    return ChatLogprobs(content=content)


def completion_logprobs(
    texts: list[str], logprobs: list[float], tops: list[list[tuple[str, float]]], offset: int
) -> CompletionLogprobs:
    """The legacy completions ``logprobs`` object (tokens, token_logprobs, top_logprobs, text_offset)."""
    offsets, at = [], offset
    for text in texts:
        offsets.append(at)
        at += len(text)
    return CompletionLogprobs(
        tokens=texts,
        token_logprobs=logprobs,
        top_logprobs=[dict(top) for top in tops] if tops else None,
        text_offset=offsets,
    )


# -- event streams in the OpenAPI document ------------------------------------------------------------
def event_stream(
    *payloads: type[BaseModel], documented: tuple[type[BaseModel], ...], description: str
) -> dict[str, Any]:
    """A ``responses`` entry's ``text/event-stream`` content: each event is ``data: <JSON>`` (one of
    ``payloads``) and the stream ends with ``data: [DONE]``. The event is described as FastAPI describes
    its own event streams (``itemSchema``, with the JSON in ``contentSchema``).

    ``documented`` are the models the route documents otherwise (its JSON response, its errors), so they
    and every model they contain are in the document's ``components``: the payload refers to those there,
    and holds the others (the chunk types, which appear nowhere else) inline."""
    in_components: set[str] = set()
    for model in documented:
        in_components |= {model.__name__, *model.model_json_schema(mode="serialization").get("$defs", {})}
    adapter = TypeAdapter(functools.reduce(operator.or_, payloads))
    payload = _inline(adapter.json_schema(mode="serialization", by_alias=True), in_components)
    data = {
        "anyOf": [
            {"const": "[DONE]", "description": "The end of the stream."},
            {"type": "string", "contentMediaType": "application/json", "contentSchema": payload},
        ]
    }
    item = {"type": "object", "required": ["data"], "properties": {"data": data}}
    return {"description": description, "content": {"text/event-stream": {"itemSchema": item}}}


def _inline(schema: dict[str, Any], in_components: set[str]) -> dict[str, Any]:
    """``schema`` with its ``#/$defs/<name>`` references pointed at ``#/components/schemas/<name>`` for
    the names in ``in_components``, and replaced by their definition for the others (none is
    recursive)."""
    defs = schema.pop("$defs", {})

    def resolve(node: Any) -> Any:
        if isinstance(node, list):
            return [resolve(item) for item in node]
        if not isinstance(node, dict):
            return node
        rest = {k: resolve(v) for k, v in node.items() if k != "$ref"}
        if "$ref" not in node:
            return rest
        name = node["$ref"].removeprefix("#/$defs/")
        if name in in_components:
            return {"$ref": f"#/components/schemas/{name}", **rest}
        return {**resolve(defs[name]), **rest}

    return resolve(schema)
