"""One source of truth: the client's request types against the server's /openapi.json, and a saliency
method added by registering it in a plugin module, with no other file changed, reaching the HTTP API, the
SDK, the client CLI, the developer CLI and /v1/capabilities."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
from faithlens_client import Faithlens
from faithlens_client.params import AnalysisOptions, SaliencyOptions, SamplingOptions
from pydantic import BaseModel, Field, create_model

from faithlens.tiny import save_tiny
from tests.servers import REPO, start_server

# The toy method: every scored position gets its distance to the target, in tokens. It is a plugin module,
# found through FAITHLENS_PLUGINS like any third-party method.
TOY_PLUGIN = """
import math

import torch

from faithlens.atman import target_logprobs
from faithlens.saliency import SALIENCY_METHODS, Saliency, SaliencyMethod


def compute(x):
    scores = torch.full((len(x.input_ids),), math.nan)
    for p in x.positions:
        scores[p] = float(min(x.target) - p)
    _, base = target_logprobs(x.lm, x.input_ids, x.target, torch.zeros(0, len(x.input_ids)))
    return Saliency("toy_distance", scores, x.target, [[p] for p in x.positions], base)


SALIENCY_METHODS.register(
    SaliencyMethod(
        name="toy_distance",
        description="A test's toy: distance to the target.",
        compute=compute,
        cost=lambda x: float(len(x.texts)),
        cost_note="one pass",
    )
)
"""

# The client's types and the server's component they mirror.
MIRRORS: dict[type[BaseModel], str] = {AnalysisOptions: "AnalysisOptions", SaliencyOptions: "SaliencyParams"}
NAMES = {"AnalysisOptions": "AnalysisOptions", "SaliencyOptions": "SaliencyParams"}
# /v1/generate's body: the prompt, the adapter, the analysis, and the sampling options.
NOT_SAMPLING = {"prompt", "messages", "chat", "adapter", "analysis"}


@pytest.fixture(scope="module")
def plugin_env(tmp_path_factory) -> dict[str, str]:
    plugins = tmp_path_factory.mktemp("plugins")
    (plugins / "toy_saliency.py").write_text(textwrap.dedent(TOY_PLUGIN))
    path = os.pathsep.join([str(plugins), str(REPO)])
    return {"FAITHLENS_PLUGINS": "toy_saliency", "PYTHONPATH": path}


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return save_tiny(tmp_path_factory.mktemp("tiny-contract") / "tiny-llama")


@pytest.fixture(scope="module")
def server(tiny_dir, plugin_env, tmp_path_factory):
    srv = start_server(tmp_path_factory.mktemp("srv-contract"), tiny_dir, **plugin_env)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def openapi(server) -> dict[str, Any]:
    with server.client() as http:
        return http.get("/openapi.json").json()


# -- the contract ------------------------------------------------------------------------------------------
def _normalise(schema: Any, names: dict[str, str]) -> Any:
    """A property's schema without prose, with references named by the server's component names. FastAPI
    writes bounds as floats and leaves out null defaults (an optional field's default is null either way)."""
    if isinstance(schema, dict):
        out = {}
        for key, value in schema.items():
            if key in {"title", "description"} or (key == "default" and value is None):
                continue
            if key == "$ref":
                name = value.rsplit("/", 1)[-1]
                out[key] = names.get(name, name)
            else:
                out[key] = _normalise(value, names)
        return out
    if isinstance(schema, list):
        return [_normalise(item, names) for item in schema]
    if isinstance(schema, int | float) and not isinstance(schema, bool):
        return float(schema)
    return schema


def differences(client: dict[str, Any], server: dict[str, Any]) -> list[str]:
    """Field-for-field differences between two object schemas: names, types, defaults, bounds."""
    found = []
    ours, theirs = client.get("properties", {}), server.get("properties", {})
    for name in sorted(set(ours) | set(theirs)):
        if name not in theirs:
            found.append(f"{name}: only in the client")
        elif name not in ours:
            found.append(f"{name}: only in the server")
        else:
            a, b = _normalise(ours[name], NAMES), _normalise(theirs[name], NAMES)
            if a != b:
                found.append(f"{name}: client {a} != server {b}")
    if sorted(client.get("required", [])) != sorted(server.get("required", [])):
        found.append(f"required: client {client.get('required')} != server {server.get('required')}")
    return found


def _client_schema(model: type[BaseModel]) -> dict[str, Any]:
    return model.model_json_schema()


def _sampling_schema(openapi: dict[str, Any]) -> dict[str, Any]:
    body = copy.deepcopy(openapi["components"]["schemas"]["GenerateRequest"])
    body["properties"] = {k: v for k, v in body["properties"].items() if k not in NOT_SAMPLING}
    body["required"] = [k for k in body.get("required", []) if k not in NOT_SAMPLING]
    return body


@pytest.mark.parametrize("model", list(MIRRORS), ids=lambda m: m.__name__)
def test_client_options_mirror_the_server_schema(openapi, model):
    server = openapi["components"]["schemas"][MIRRORS[model]]
    assert differences(_client_schema(model), server) == []


def test_client_sampling_options_mirror_the_generate_body(openapi):
    assert differences(_client_schema(SamplingOptions), _sampling_schema(openapi)) == []


def test_contract_fails_when_a_field_is_added_on_one_side(openapi):
    server = openapi["components"]["schemas"]["SaliencyParams"]
    # the client grows a field the server does not have
    grown = create_model("SaliencyOptions", __base__=SaliencyOptions, window=(int, Field(default=3, ge=1)))
    assert differences(_client_schema(grown), server) == ["window: only in the client"]
    # the server grows one the client does not have
    server_grown = copy.deepcopy(server)
    server_grown["properties"]["window"] = {"type": "integer", "default": 3}
    assert differences(_client_schema(SaliencyOptions), server_grown) == ["window: only in the server"]
    # a changed default or bound is a difference too
    moved = create_model(
        "SaliencyOptions", __base__=SaliencyOptions, rl_steps=(int, Field(default=200, ge=1, le=500))
    )
    assert [d.split(":")[0] for d in differences(_client_schema(moved), server)] == ["rl_steps"]
    stale = create_model(
        "SaliencyOptions", __base__=SaliencyOptions, factor=(float, Field(default=0.2, gt=0))
    )
    assert [d.split(":")[0] for d in differences(_client_schema(stale), server)] == ["factor"]


# -- a method added by registering it ----------------------------------------------------------------------
def test_registered_method_is_listed_and_served_over_http(server):
    with server.client() as http:
        caps = http.get("/v1/capabilities").json()
        assert [m["name"] for m in caps["saliency_methods"]] == [
            "atman",
            "atman_grad",
            "atman_rl",
            "toy_distance",
        ]
        assert "coupled" in [c["name"] for c in caps["credit_strategies"]]
        body = {
            "prompt": "Q: 2+2?",
            "completion": " 2 plus 2 is 4. #### 4",
            "analysis": {"saliency": {"method": "toy_distance"}},
        }
        response = http.post("/v1/analyze", json=body)
        assert response.status_code == 200, response.text
        analysis = response.json()["annotations"]
        assert analysis["summary"]["saliency_method"] == "toy_distance"
        target = analysis["summary"]["saliency_target"]
        scored = [t for t in analysis["tokens"] if t["saliency"] is not None]
        assert scored and all(t["saliency"] == min(target) - t["index"] for t in scored)
        unknown = http.post("/v1/analyze", json={**body, "analysis": {"saliency": {"method": "nope"}}})
        assert unknown.status_code == 400
        assert "toy_distance" in unknown.json()["error"]["message"]  # the error lists what is registered


def test_registered_method_through_the_sdk(server):
    with Faithlens(server.url) as client:
        assert "toy_distance" in [m.name for m in client.capabilities().saliency_methods]
        result = client.analyze("Q: 2+2?", completion=" 2 plus 2 is 4. #### 4", saliency="toy_distance")
    assert result.annotations is not None and result.annotations.summary.saliency_method == "toy_distance"


def _client_cli(server, *args: str) -> subprocess.CompletedProcess:
    cli = Path(sys.executable).with_name("faithlens")
    env = {**os.environ, "FAITHLENS_BASE_URL": server.url}
    return subprocess.run([str(cli), *args], capture_output=True, text=True, env=env, timeout=120)


def test_registered_method_through_the_client_cli(server):
    done = _client_cli(
        server,
        "analyze",
        "Q: 2+2?",
        "--completion",
        " 2 plus 2 is 4. #### 4",
        "--saliency",
        "toy_distance",
        "--json",
    )
    assert done.returncode == 0, done.stderr
    assert '"saliency_method": "toy_distance"' in done.stdout
    refused = _client_cli(server, "analyze", "Q", "--completion", " x", "--saliency", "nope")
    assert refused.returncode == 2 and "toy_distance" in refused.stderr


def test_registered_method_through_the_developer_cli(tiny_dir, plugin_env):
    env = {**os.environ, **plugin_env}
    args = [
        "--prompt",
        "Q: 2+2?",
        "--completion",
        " 2 plus 2 is 4. #### 4",
        "--model",
        str(tiny_dir),
        "--json",
    ]
    done = subprocess.run(
        [sys.executable, "-m", "faithlens", "analyze", *args, "--saliency", "toy_distance"],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert '"saliency_method": "toy_distance"' in done.stdout
    helped = subprocess.run(
        [sys.executable, "-m", "faithlens", "analyze", "--help"],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
    )
    assert "toy_distance" in helped.stdout


def test_sdk_checks_options_before_sending(server):
    """The mirror is what the SDK sends: a bad option fails in the client, with the server's bound."""
    from pydantic import ValidationError

    with Faithlens(server.url) as client:
        with pytest.raises(ValidationError, match="rl_steps"):
            client.analyze("Q", completion=" x", saliency={"method": "atman_rl", "rl_steps": 5000})
        with pytest.raises(ValidationError, match="top_p"):
            client.generate("Q", top_p=0.0)
        typed = AnalysisOptions(W=4, saliency=SaliencyOptions(method="atman_grad", granularity="word"))
        result = client.analyze("Q: 2+2?", completion=" 4. #### 4", analysis=typed)
    assert result.annotations is not None
    assert result.annotations.params["W"] == 4 and result.annotations.summary.saliency_method == "atman_grad"
