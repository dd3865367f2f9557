"""The device the model-level tests run on: ``FAITHLENS_TEST_DEVICE`` (default cpu; cuda on a GPU machine).

CI has no GPU and runs everything on the CPU. On a GPU machine, ``FAITHLENS_TEST_DEVICE=cuda pytest
tests/test_metrics_reference.py tests/test_atman.py ...`` runs the same tests with every tiny model and the
embedded SmolLM2 on CUDA (docs/gpu.md)."""

from __future__ import annotations

import os

import torch

from faithlens.model import LoadedModel
from faithlens.tiny import tiny_loaded_model

TEST_DEVICE = torch.device(os.environ.get("FAITHLENS_TEST_DEVICE", "cpu"))


def tiny(arch: str = "llama", seed: int = 0, **config_kwargs) -> LoadedModel:
    """A tiny float32 model on the test device."""
    return tiny_loaded_model(arch, seed, device=TEST_DEVICE, **config_kwargs)
