"""LoRA adapters on a loaded model (peft): attach, detach, and pick which one a pass runs with.

Adapters are attached under opaque internal names (peft module keys cannot hold dots or slashes);
callers map their public names and versions onto them. An adapter is data: :mod:`faithlens.adapter_check`
checks it against the base model before peft sees it, and peft gets only the checked config fields and
the checked tensors (never the directory to read as it likes).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

from faithlens import adapter_check
from faithlens.engine.errors import AdapterInvalidKeys, AdapterRefused
from faithlens.model import LoadedModel


def has_adapters(lm: LoadedModel) -> bool:
    return hasattr(lm.model, "peft_config")


def attach(lm: LoadedModel, path: Path, internal_name: str, max_rank: int | None = None) -> None:
    """Check the adapter at ``path`` against this model, then load it next to any others (the first one
    wraps the model in peft). Raises an :class:`~faithlens.engine.errors.AdapterRefused` (the model
    untouched) when the adapter is not one this model takes. ``max_rank``: FAITHLENS_MAX_LORA_RANK."""
    from peft import LoraConfig, PeftModel, set_peft_model_state_dict
    from peft.auto import MODEL_TYPE_TO_PEFT_MODEL_MAPPING

    if max_rank is None:
        from faithlens.settings import get_core_settings

        max_rank = get_core_settings().max_lora_rank
    checked = adapter_check.check_adapter(path, adapter_check.BaseProfile(lm), max_rank)
    weights = checked.tensors()
    config = LoraConfig(**checked.config)
    config.inference_mode = True
    try:
        if has_adapters(lm):
            lm.model.add_adapter(internal_name, config)
        else:
            wrapper = MODEL_TYPE_TO_PEFT_MODEL_MAPPING.get(config.task_type, PeftModel)
            lm.model = wrapper(lm.model, config, internal_name)
        loaded = set_peft_model_state_dict(lm.model, weights, adapter_name=internal_name)
        if loaded.unexpected_keys:  # the checks make this unreachable; never leave such an adapter on
            raise AdapterInvalidKeys(f"peft did not place {loaded.unexpected_keys[0][:120]!r}")
    except Exception as exc:
        lm.revision += 1
        with contextlib.suppress(Exception):
            detach(lm, internal_name)
        if isinstance(exc, AdapterRefused):
            raise
        raise AdapterRefused(f"the adapter does not fit this model: {str(exc)[:300]}") from exc
    lm.revision += 1
    lm.model.eval()


def detach(lm: LoadedModel, internal_name: str) -> None:
    if not has_adapters(lm) or internal_name not in lm.model.peft_config:
        return
    lm.revision += 1
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
