"""OpenAI-compatible request bodies and the pieces of responses the routes build.

Unknown fields are refused; fields OpenAI defines but we do not implement are accepted only at their
neutral value (``n=1``, zero penalties), otherwise 400 ``unsupported``.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, StrictBool, model_validator

from service.errors import APIError
from service.schemas import AnalysisOptions, Message, NonEmpty


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

    def new_tokens(self, default: int) -> int:
        return self.max_completion_tokens or self.max_tokens or default


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


def token_bytes(text: str) -> list[int]:
    return list(text.encode("utf-8"))


def chat_logprobs(
    texts: list[str], logprobs: list[float], tops: list[list[tuple[str, float]]]
) -> dict[str, Any]:
    """OpenAI's chat ``logprobs`` object: one entry per token, each with its top alternatives."""
    content = []
    for i, (text, lp) in enumerate(zip(texts, logprobs, strict=True)):
        top = tops[i] if i < len(tops) else []
        content.append(
            {
                "token": text,
                "logprob": lp,
                "bytes": token_bytes(text),
                "top_logprobs": [{"token": t, "logprob": v, "bytes": token_bytes(t)} for t, v in top],
            }
        )
    return {"content": content, "refusal": None}


def completion_logprobs(
    texts: list[str], logprobs: list[float], tops: list[list[tuple[str, float]]], offset: int
) -> dict[str, Any]:
    """The legacy completions ``logprobs`` object (tokens, token_logprobs, top_logprobs, text_offset)."""
    offsets, at = [], offset
    for text in texts:
        offsets.append(at)
        at += len(text)
    return {
        "tokens": texts,
        "token_logprobs": logprobs,
        "top_logprobs": [dict(top) for top in tops] if tops else None,
        "text_offset": offsets,
    }
