"""Command-line flags derived from the parameter models (:mod:`faithlens.params`), so that a CLI never
declares an option, a default or a bound of its own.

Every field becomes ``--field-name VALUE`` (a bool becomes ``--name/--no-name``). The value is read as
the first of these that the field accepts: the text itself, JSON (``null``, ``[1, 2]``; ``none`` is null too), a
comma-separated list (``10,12,15``); pydantic then validates the whole model exactly as it validates a
request, so the CLI's errors are the API's.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import typing
from typing import Any

from pydantic import BaseModel, TypeAdapter, ValidationError


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _dest(prefix: str, name: str) -> str:
    return f"{prefix}{name}"


def add_model_arguments(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup,
    model: type[BaseModel],
    *,
    prefix: str = "",
    rename: dict[str, str] | None = None,
    skip: tuple[str, ...] = (),
) -> None:
    """One flag per field of ``model``; values land in ``args.<prefix><field>`` (unset: not given).
    ``rename`` maps a field to another flag name where two models share one (``seed``)."""
    rename = rename or {}
    for name, info in model.model_fields.items():
        if name in skip:
            continue
        flag = _flag(rename.get(name, name))
        default = info.get_default(call_default_factory=True)
        help_text = f"{info.description or ''} (default: {json.dumps(default)})".strip()
        dest = _dest(prefix, name)
        if info.annotation is bool:
            parser.add_argument(
                flag, dest=dest, action=argparse.BooleanOptionalAction, default=None, help=help_text
            )
            continue
        literal = typing.get_origin(info.annotation) is typing.Literal
        parser.add_argument(
            flag,
            dest=dest,
            default=None,
            action="append",  # repeatable: several occurrences of a list flag are one list
            metavar=name.upper(),
            help=help_text + (f"; one of {', '.join(typing.get_args(info.annotation))}" if literal else ""),
        )


def _candidates(raw: list[str]) -> list[Any]:
    """What a flag's text may mean, most literal first: the text itself, JSON, a comma-separated list.
    Several occurrences of a list flag are one list."""
    if len(raw) > 1:
        return [raw]
    text = raw[0]
    found: list[Any] = [text]
    with contextlib.suppress(json.JSONDecodeError):
        found.append(json.loads(text))
    if text.lower() == "none":
        found.append(None)  # Python's spelling of null
    found.append([part.strip() for part in text.split(",")])
    return found


def _parse(name: str, annotation: Any, raw: list[str]) -> Any:
    adapter = TypeAdapter(annotation)
    for candidate in _candidates(raw):
        try:
            return adapter.validate_python(candidate)
        except ValidationError:
            continue
    return raw[0]  # let the model's validation say what is wrong with it


def model_from_arguments(
    args: argparse.Namespace, model: type[BaseModel], *, prefix: str = "", **overrides: Any
) -> BaseModel:
    """Build ``model`` from the flags that were given (the rest keep the model's defaults).
    Raises :class:`SystemExit` with pydantic's message when a value is invalid."""
    given: dict[str, Any] = {}
    for name, info in model.model_fields.items():
        raw = getattr(args, _dest(prefix, name), None)
        if raw is None:
            continue
        given[name] = raw if isinstance(raw, bool) else _parse(name, info.annotation, raw)
    given.update(overrides)
    try:
        return model.model_validate(given)
    except ValidationError as exc:
        raise SystemExit(f"error: {exc}") from None
