"""The OpenAPI document describes every response: each operation has a 2xx with a content schema, errors
are ``ErrorResponse``, and every reference resolves. Built from the app object (no model is loaded: that
happens at start-up); tests/test_fuzz.py checks real responses against the same document."""

from __future__ import annotations

from typing import Any

import pytest

from service.app import create_app

ERROR_REF = "#/components/schemas/ErrorResponse"
METHODS = {"get", "put", "post", "delete", "patch", "head", "options", "trace"}


@pytest.fixture(scope="module")
def document() -> dict[str, Any]:
    return create_app().openapi()


def _operations(document: dict[str, Any]):
    for path, item in document["paths"].items():
        for method, operation in item.items():
            if method in METHODS:
                yield f"{method.upper()} {path}", operation


def test_every_operation_documents_a_2xx_body(document):
    missing = []
    for name, operation in _operations(document):
        bodies = [
            media
            for status, response in operation["responses"].items()
            if status.startswith("2")
            for media in response.get("content", {}).values()
            if media.get("schema") or media.get("itemSchema")
        ]
        if not bodies:
            missing.append(name)
    assert not missing, f"no 2xx response with a content schema: {missing}"
    assert len(list(_operations(document))) >= 15


def test_errors_are_documented_as_error_responses(document):
    """4xx/5xx and ``default`` are ``ErrorResponse`` (``/readyz`` answers 503 with its checks), and the
    422 FastAPI adds to operations with input is not there: invalid input is a 400."""
    for name, operation in _operations(document):
        responses = operation["responses"]
        assert "422" not in responses, name
        for status, response in responses.items():
            if status[0] in "2":
                continue
            schema = response["content"]["application/json"]["schema"]
            if name == "GET /readyz":
                assert schema == {"$ref": "#/components/schemas/Readiness"}
            else:
                assert schema == {"$ref": ERROR_REF}, (name, status)
        if "requestBody" in operation or operation.get("parameters"):
            assert "400" in responses, f"{name} validates its input but documents no 400"


def test_streams_and_text_have_their_media_types(document):
    paths = document["paths"]
    for path, method in [
        ("/v1/chat/completions", "post"),
        ("/v1/completions", "post"),
        ("/v1/jobs/{job_id}/events", "get"),
    ]:
        content = paths[path][method]["responses"]["200"]["content"]
        assert {"application/json", "text/event-stream"} <= content.keys(), path
        data = content["text/event-stream"]["itemSchema"]["properties"]["data"]
        assert {"const": "[DONE]", "description": "The end of the stream."} in data["anyOf"]
    assert paths["/metrics"]["get"]["responses"]["200"]["content"] == {
        "text/plain": {"schema": {"type": "string"}}
    }
    chat = paths["/v1/chat/completions"]["post"]["responses"]["200"]["content"]
    assert chat["application/json"]["schema"] == {"$ref": "#/components/schemas/ChatCompletion"}
    models = paths["/v1/models"]["get"]["responses"]["200"]["content"]["application/json"]["schema"]
    assert models == {"$ref": "#/components/schemas/ModelList"}


def test_every_reference_resolves(document):
    """The event streams refer to components by name (``service.openai_schemas.event_stream``); a renamed
    or split model would leave a dangling ``$ref``."""
    refs: list[str] = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            if isinstance(node.get("$ref"), str):
                refs.append(node["$ref"])
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(document)
    components = document["components"]["schemas"]
    dangling = {ref for ref in refs if ref.removeprefix("#/components/schemas/") not in components}
    assert refs and not dangling, dangling
