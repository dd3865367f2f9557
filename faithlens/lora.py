"""LoRA adapters on a loaded model (peft): attach, detach, and pick which one a pass runs with.

Adapters are attached under opaque internal names (peft module keys cannot hold dots or slashes);
callers map their public names and versions onto them.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path

from faithlens.model import LoadedModel

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"


class AdapterFormatError(ValueError):
    """The directory is not a safetensors LoRA adapter this model can take."""


def check_adapter_dir(path: Path) -> dict:
    """Refuse anything but a peft LoRA adapter stored as safetensors (pickled .bin weights run code)."""
    if not path.is_dir():
        raise AdapterFormatError(f"{path} is not a directory")
    if not (path / ADAPTER_WEIGHTS).is_file():
        raise AdapterFormatError(f"{path} has no {ADAPTER_WEIGHTS} (only safetensors adapters load)")
    try:
        config = json.loads((path / ADAPTER_CONFIG).read_text())
    except (OSError, ValueError) as exc:
        raise AdapterFormatError(f"{path}/{ADAPTER_CONFIG} is missing or not JSON") from exc
    if config.get("peft_type") != "LORA":
        raise AdapterFormatError(f"{path} holds a {config.get('peft_type')!r} adapter; only LORA is served")
    return config


def has_adapters(lm: LoadedModel) -> bool:
    return hasattr(lm.model, "peft_config")


def attach(lm: LoadedModel, path: Path, internal_name: str) -> None:
    """Load the adapter at ``path`` next to any others; the first one wraps the model in peft."""
    from peft import PeftModel

    check_adapter_dir(path)
    try:
        if has_adapters(lm):
            lm.model.load_adapter(str(path), adapter_name=internal_name, is_trainable=False)
        else:
            lm.model = PeftModel.from_pretrained(lm.model, str(path), adapter_name=internal_name)
    except (RuntimeError, ValueError, KeyError) as exc:
        with contextlib.suppress(Exception):
            detach(lm, internal_name)
        raise AdapterFormatError(f"adapter at {path} does not fit this model: {exc}") from exc
    lm.model.eval()


def detach(lm: LoadedModel, internal_name: str) -> None:
    if not has_adapters(lm) or internal_name not in lm.model.peft_config:
        return
    if len(lm.model.peft_config) == 1:  # peft cannot run with zero adapters: take its layers out
        lm.model = lm.model.unload()
    else:
        lm.model.delete_adapter(internal_name)


@contextlib.contextmanager
def active(lm: LoadedModel, internal_name: str | None) -> Iterator[None]:
    """Run the block with exactly one adapter on (or none), for passes that take no ``adapter_names``
    (the analysis pass, AtMan)."""
    if not has_adapters(lm):
        if internal_name is not None:
            raise KeyError(internal_name)
        yield
        return
    if internal_name is None:
        with lm.model.disable_adapter():
            yield
        return
    lm.model.set_adapter(internal_name)
    yield
