"""Adapters are data, not code: adapters built the way an attacker would are refused with a stable code,
before anything touches the model (the base model's logits stay bit-identical), in the core and over HTTP
on a real server."""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import load_file, save_file

from faithlens import adapter_check, lora
from faithlens.data import Problem
from faithlens.engine.errors import AdapterRefused
from faithlens.model import load_model
from faithlens.tiny import save_tiny
from service.errors import from_engine
from tests.servers import make_adapter, start_server
from training.config import TrainConfig
from training.trainer import Trainer

PROMPT_IDS = torch.tensor([[1, 40, 41, 42, 43, 44, 45, 46, 47, 48]])
EMBED_KEY = "base_model.model.model.embed_tokens.weight"
Q0 = "base_model.model.model.layers.0.self_attn.q_proj"


# -- building attack adapters from an honest one --------------------------------------------------------------
def _config(path: Path, **changes) -> Path:
    config_file = path / adapter_check.ADAPTER_CONFIG
    config = json.loads(config_file.read_text())
    config.update(changes)
    config_file.write_text(json.dumps(config))
    return path


def _weights(path: Path, change: Callable[[dict[str, torch.Tensor]], None]) -> Path:
    weights_file = path / adapter_check.ADAPTER_WEIGHTS
    tensors = load_file(weights_file)
    change(tensors)
    save_file(tensors, weights_file, metadata={"format": "pt"})
    return path


def _raw_weights(path: Path, data: bytes) -> Path:
    (path / adapter_check.ADAPTER_WEIGHTS).write_bytes(data)
    return path


def _symlinked_weights(path: Path) -> Path:
    weights = path / adapter_check.ADAPTER_WEIGHTS
    outside = path.parent / f"{path.name}-weights.safetensors"
    weights.replace(outside)
    weights.symlink_to(outside)
    return path


def _other_identity(path: Path, other_dir: Path) -> Path:
    adapter_check.write_base_identity(path, load_model(other_dir, device="cpu", dtype="float32"))
    return path


# id → (how the honest adapter is spoiled, the code it must be refused with)
ATTACKS: dict[str, tuple[Callable[[Path, Path], Path], str]] = {
    # the reported attacks
    "extra_embedding_key": (
        lambda p, o: _weights(p, lambda t: t.update({EMBED_KEY: torch.zeros(3 + 256, 64)})),
        "adapter_invalid_keys",
    ),
    "layer_replication": (
        lambda p, o: _config(p, layer_replication=[[0, 6], [0, 6]]),
        "adapter_config_refused",
    ),
    "rank_100000": (lambda p, o: _config(p, r=100000), "adapter_rank_too_large"),
    "other_base_model": (None, "adapter_base_mismatch"),  # built from the other base (below)
    # the config's allow-list
    "modules_to_save": (lambda p, o: _config(p, modules_to_save=["lm_head"]), "adapter_config_refused"),
    "use_dora": (lambda p, o: _config(p, use_dora=True), "adapter_config_refused"),
    "lora_bias": (lambda p, o: _config(p, lora_bias=True), "adapter_config_refused"),
    "bias_all": (lambda p, o: _config(p, bias="all"), "adapter_config_refused"),
    "fan_in_fan_out": (lambda p, o: _config(p, fan_in_fan_out=True), "adapter_config_refused"),
    "pissa_init": (lambda p, o: _config(p, init_lora_weights="pissa"), "adapter_config_refused"),
    "rank_pattern": (lambda p, o: _config(p, rank_pattern={"q_proj": 64}), "adapter_config_refused"),
    "trainable_tokens": (lambda p, o: _config(p, trainable_token_indices=[1, 2]), "adapter_config_refused"),
    "regex_targets": (lambda p, o: _config(p, target_modules=".*"), "adapter_config_refused"),
    "unknown_field": (lambda p, o: _config(p, run="import os"), "adapter_config_refused"),
    "not_lora": (lambda p, o: _config(p, peft_type="IA3"), "adapter_config_refused"),
    "non_linear_target": (
        lambda p, o: _config(p, target_modules=["q_proj", "v_proj", "o_proj", "mlp"]),
        "adapter_config_refused",
    ),
    # the weights
    "lora_bias_key": (
        lambda p, o: _weights(p, lambda t: t.update({f"{Q0}.lora_B.bias": torch.zeros(64)})),
        "adapter_invalid_keys",
    ),
    "missing_module": (
        lambda p, o: _weights(
            p,
            lambda t: t.update(
                {
                    Q0.replace("layers.0", "layers.99") + ".lora_A.weight": torch.zeros(4, 64),
                    Q0.replace("layers.0", "layers.99") + ".lora_B.weight": torch.zeros(64, 4),
                }
            ),
        ),
        "adapter_invalid_keys",
    ),
    "lora_B_missing": (
        lambda p, o: _weights(p, lambda t: t.pop(f"{Q0}.lora_B.weight")),
        "adapter_invalid_keys",
    ),
    "integer_weights": (
        lambda p, o: _weights(
            p, lambda t: t.update({f"{Q0}.lora_A.weight": torch.zeros(4, 64, dtype=torch.int32)})
        ),
        "adapter_invalid_keys",
    ),
    "wrong_in_features": (
        lambda p, o: _weights(p, lambda t: t.update({f"{Q0}.lora_A.weight": torch.zeros(4, 32)})),
        "adapter_shape_mismatch",
    ),
    "rank_not_declared": (lambda p, o: _config(p, r=8), "adapter_shape_mismatch"),
    # the base model
    "other_base_identity": (_other_identity, "adapter_base_mismatch"),
    "no_base_named": (lambda p, o: _config(p, base_model_name_or_path=None), "adapter_base_mismatch"),
    # the files
    "pickled_weights": (
        lambda p, o: (p / adapter_check.ADAPTER_WEIGHTS).rename(p / "adapter_model.bin") and p,
        "adapter_invalid",
    ),
    "garbage_weights": (lambda p, o: _raw_weights(p, b"\x00" * 64), "adapter_invalid"),
    "huge_header": (lambda p, o: _raw_weights(p, (1 << 40).to_bytes(8, "little") + b"{}"), "adapter_invalid"),
    "symlinked_weights": (lambda p, o: _symlinked_weights(p), "adapter_invalid"),
    "deep_config": (
        lambda p, o: (p / adapter_check.ADAPTER_CONFIG).write_text("[" * 100_000) and p,
        "adapter_invalid",
    ),
}


def build_attack(name: str, tiny_dir: Path, other_dir: Path, out: Path) -> Path:
    spoil, _ = ATTACKS[name]
    if spoil is None:  # trained on another base model of the same shapes (another seed)
        return make_adapter(other_dir, out, seed=5)
    make_adapter(tiny_dir, out, seed=5)
    return spoil(out, other_dir)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("tiny-atk") / "tiny-llama")


@pytest.fixture(scope="module")
def other_dir(tmp_path_factory):
    """Another base model: the same architecture, shapes and name, other weights."""
    return save_tiny(tmp_path_factory.mktemp("other-atk") / "tiny-llama", seed=1)


@pytest.fixture(scope="module")
def lm(tiny_dir):
    return load_model(tiny_dir, device="cpu", dtype="float32")


@torch.no_grad()
def base_logits(lm) -> torch.Tensor:
    with lora.active(lm, None):
        return lm.model(input_ids=PROMPT_IDS).logits.clone()


def refusal_code(exc: AdapterRefused) -> str:
    return from_engine(exc).code


# -- the core: refused before anything touches the model ------------------------------------------------------
@pytest.mark.parametrize("attack", sorted(ATTACKS))
def test_attack_is_refused_and_the_base_model_is_bit_identical(attack, lm, tiny_dir, other_dir, tmp_path):
    path = build_attack(attack, tiny_dir, other_dir, tmp_path / attack)
    before = base_logits(lm)
    layers = len(lm.model.model.layers)
    with pytest.raises(AdapterRefused) as refused:
        lora.attach(lm, path, "attack")
    assert refusal_code(refused.value) == ATTACKS[attack][1], refused.value.message
    assert str(tmp_path) not in refused.value.message  # no server path in what a client reads
    assert not lora.has_adapters(lm)
    assert len(lm.model.model.layers) == layers
    assert torch.equal(base_logits(lm), before)


def test_loaded_then_unloaded_adapter_leaves_the_base_bit_identical(lm, tiny_dir, other_dir, tmp_path):
    before = base_logits(lm)
    good = make_adapter(tiny_dir, tmp_path / "good", seed=7)
    lora.attach(lm, good, "good")
    with lora.active(lm, "good"), torch.no_grad():
        adapted = lm.model(input_ids=PROMPT_IDS).logits.clone()
    assert not torch.equal(adapted, before)
    assert torch.equal(base_logits(lm), before)  # the adapter switched off: the base itself
    # refused next to a loaded adapter: neither the base nor the adapter changes
    for attack in ("extra_embedding_key", "layer_replication", "other_base_model", "lora_B_missing"):
        path = build_attack(attack, tiny_dir, other_dir, tmp_path / attack)
        with pytest.raises(AdapterRefused):
            lora.attach(lm, path, "attack")
        assert set(lm.model.peft_config) == {"good"}
        assert torch.equal(base_logits(lm), before)
        with lora.active(lm, "good"), torch.no_grad():
            assert torch.equal(lm.model(input_ids=PROMPT_IDS).logits, adapted)
    lora.detach(lm, "good")
    assert not lora.has_adapters(lm)
    assert torch.equal(base_logits(lm), before)


def test_max_rank_is_a_setting(lm, tiny_dir, tmp_path):
    path = make_adapter(tiny_dir, tmp_path / "r8", seed=3, r=8)
    with pytest.raises(AdapterRefused) as refused:
        lora.attach(lm, path, "r8", max_rank=4)
    assert refusal_code(refused.value) == "adapter_rank_too_large"
    lora.attach(lm, path, "r8", max_rank=8)
    lora.detach(lm, "r8")


def test_the_trainers_adapters_record_their_base_and_pass_the_checks(tiny_dir, other_dir, tmp_path):
    """What save_pretrained writes for the trainer's LoRA is inside the allow-list, and the base model
    identity it records tells this base from another of the same shapes and name."""
    trainer_lm = load_model(tiny_dir, device="cpu", dtype="float32")
    trainer = Trainer(trainer_lm, TrainConfig(), [Problem("What is 1+1?", "#### 2")])
    with torch.no_grad():
        for name, param in trainer_lm.model.named_parameters():
            if "lora_" in name:
                param.normal_(0, 0.1)
    trainer.save_adapter(tmp_path / "trained")
    identity = json.loads((tmp_path / "trained" / adapter_check.BASE_IDENTITY).read_text())
    assert identity["name"] == "tiny-llama" and identity["probe"]
    # served elsewhere (another path, another dtype): still the same base
    moved = shutil.copytree(tiny_dir, tmp_path / "moved" / "tiny-llama")
    served = load_model(moved, device="cpu", dtype="bfloat16")
    lora.attach(served, tmp_path / "trained", "trained")
    lora.detach(served, "trained")
    with pytest.raises(AdapterRefused) as refused:
        lora.attach(load_model(other_dir, device="cpu", dtype="float32"), tmp_path / "trained", "trained")
    assert refusal_code(refused.value) == "adapter_base_mismatch"


# -- over HTTP, on a real server -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def server(tiny_dir, tmp_path_factory):
    srv = start_server(tmp_path_factory.mktemp("srv-atk"), tiny_dir)
    yield srv
    srv.stop()


def _completion(c, prompt: str = "hello", n: int = 12, model: str | None = None) -> dict:
    body = {"prompt": prompt, "max_tokens": n, "temperature": 0, "logprobs": 1}
    if model:
        body["model"] = model
    r = c.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]


def test_attacks_over_http_are_400_with_stable_codes(server, tiny_dir, other_dir):
    with server.client() as c:
        before = _completion(c)
        for attack, (_, code) in sorted(ATTACKS.items()):
            build_attack(attack, tiny_dir, other_dir, server.store / attack / "1")
            r = c.post("/v1/adapters/load", json={"name": attack.replace("_", "-"), "path": f"{attack}/1"})
            assert r.status_code == 400, (attack, r.text)
            error = r.json()["error"]
            assert (error["code"], error["param"]) == (code, "path"), (attack, error)
            assert str(server.store) not in r.text
        assert [m["id"] for m in c.get("/v1/models").json()["data"]] == ["tiny-llama"]
        assert _completion(c) == before  # the same text and the same log-probabilities
        assert c.get("/readyz").status_code == 200


def test_a_huge_declared_rank_takes_no_memory(server, tiny_dir):
    """38 KB on disk declaring r=100000 took RSS from 461 MB to 3.7 GB: now it is refused first."""
    path = _config(make_adapter(tiny_dir, server.store / "huge" / "1", seed=9), r=100000)
    assert sum(f.stat().st_size for f in path.iterdir()) < 64 << 10
    process = psutil.Process(server.proc.pid)
    with server.client() as c:
        _completion(c)  # warm: the first request's allocations are not the adapter's
        rss_before = process.memory_info().rss
        started = time.monotonic()
        r = c.post("/v1/adapters/load", json={"name": "huge", "path": "huge/1"})
        elapsed = time.monotonic() - started
        rss_after = process.memory_info().rss
    assert r.status_code == 400 and r.json()["error"]["code"] == "adapter_rank_too_large"
    assert rss_after - rss_before < 100 << 20, f"RSS grew by {(rss_after - rss_before) >> 20} MB"
    assert elapsed < 2.0


def test_names_may_not_shadow_the_base_and_control_characters_are_400(server, tiny_dir):
    make_adapter(tiny_dir, server.store / "named" / "1", seed=11)
    with server.client() as c:
        r = c.post("/v1/adapters/load", json={"name": "tiny-llama", "path": "named/1"})
        assert r.status_code == 400 and r.json()["error"]["code"] == "adapter_name_reserved"
        for path in ("named/1\x00", "named\x00/1", "\x00", "named/\x1b[2J", "named/1\n", "named/\x7f"):
            r = c.post("/v1/adapters/load", json={"name": "named", "path": path})
            assert r.status_code == 400, (path, r.text)
            assert r.json()["error"]["code"] == "adapter_path_invalid"
        for name in ("named\x00", "na\x00med", "named\n", "\x1bnamed"):
            r = c.post("/v1/adapters/load", json={"name": name, "path": "named/1"})
            assert r.status_code == 400, (name, r.text)
            assert r.json()["error"]["param"] == "name"
        r = c.post("/v1/adapters/unload", json={"name": "named\x00"})
        assert r.status_code == 400
        assert [m["id"] for m in c.get("/v1/models").json()["data"]] == ["tiny-llama"]
        # the honest adapter under an honest name loads, and shows only its store-relative path
        r = c.post("/v1/adapters/load", json={"name": "named", "path": "named/1"})
        assert r.status_code == 200 and r.json()["path"] == "named/1"
        models = c.get("/v1/models")
        roots = {m["id"]: m["root"] for m in models.json()["data"]}
        assert roots == {"tiny-llama": "tiny-llama", "named": "named/1"}
        assert str(server.store.parent) not in models.text and str(tiny_dir) not in models.text
        assert c.get("/v1/adapters").json()["data"][0]["path"] == "named/1"
        r = c.post("/v1/adapters/unload", json={"name": "named"})
        assert r.status_code == 200 and r.json()["path"] == "named/1"


def test_no_server_path_in_refusals(server, tiny_dir):
    """A refusal says what is wrong with the adapter, not where the server keeps it."""
    with server.client() as c:
        r = c.post("/v1/adapters/load", json={"name": "nowhere", "path": "nowhere/1"})
        assert r.status_code == 400 and r.json()["error"]["code"] == "adapter_invalid"
        assert str(server.store) not in r.text
