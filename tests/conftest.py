"""Shared fixtures: tiny models built in code, the embedded SmolLM2, and GSM8K from ../shared. The models
sit on ``FAITHLENS_TEST_DEVICE`` (tests/devices.py)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from faithlens.model import LoadedModel, load_model
from faithlens.settings import get_core_settings
from tests.devices import TEST_DEVICE, tiny

# GSM8K lives in ../shared/data beside the checkout; set before any settings object is read, and inherited
# by the servers and workers the tests start.
os.environ.setdefault("FAITHLENS_DATA_DIR", str(Path(__file__).resolve().parents[2] / "shared" / "data"))


@pytest.fixture(scope="session")
def smollm() -> LoadedModel:
    """The embedded default, loaded once per session (the GGUF conversion is cached on disk)."""
    settings = get_core_settings()
    return load_model(None, device=str(TEST_DEVICE), dtype="float32", cache_dir=settings.cache_dir)


@pytest.fixture(scope="session", params=["llama", "qwen2", "qwen3"])
def tiny_lm(request) -> LoadedModel:
    return tiny(request.param)


@pytest.fixture(scope="session")
def tiny_llama() -> LoadedModel:
    return tiny("llama")
