"""Tiny randomly initialised models built in code, for fast tests and benchmarks.

They use a byte-level tokenizer (256 byte tokens plus chat specials), so any text round-trips and no
file has to be downloaded. ``save_tiny`` writes an ordinary HF directory that ``load_model`` reads.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    PretrainedConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen3Config,
)

from faithlens import attention
from faithlens.model import LoadedModel, ModelSource

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
ARCHS = ("llama", "qwen2", "qwen3")


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level BPE with no merges: ids 0–2 are specials, then one token per byte."""
    vocab = {tok: i for i, tok in enumerate(SPECIALS)}
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[ch] = len(vocab)
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    core.add_special_tokens(SPECIALS)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok


def tiny_config(arch: str = "llama", layers: int = 6, heads: int = 4, kv_heads: int = 2) -> PretrainedConfig:
    common = {
        "vocab_size": 3 + 256,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "max_position_embeddings": 4096,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 0,
        "tie_word_embeddings": True,
    }
    if arch == "llama":
        return LlamaConfig(**common)
    if arch == "qwen2":
        return Qwen2Config(**common)
    if arch == "qwen3":
        return Qwen3Config(head_dim=16, **common)
    raise ValueError(f"unknown tiny architecture {arch!r}; expected one of {ARCHS}")


def build_tiny(
    arch: str = "llama", seed: int = 0, **config_kwargs
) -> tuple[torch.nn.Module, PreTrainedTokenizerFast]:
    """A randomly initialised causal LM (float32, eval mode) and the byte tokenizer."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, **config_kwargs), dtype=torch.float32)
    model.generation_config.eos_token_id = 2
    model.generation_config.pad_token_id = 0
    return model.eval(), byte_tokenizer()


def tiny_loaded_model(
    arch: str = "llama", seed: int = 0, device: str | torch.device = "cpu", **config_kwargs
) -> LoadedModel:
    """A tiny model wrapped like :func:`faithlens.model.load_model` returns it, in float32 on ``device``
    (the weights are drawn on the CPU first, so a seed gives the same model on every device)."""
    model, tokenizer = build_tiny(arch, seed, **config_kwargs)
    device = torch.device(device)
    model.to(device)
    attention.install(model)
    name = f"tiny-{arch}"
    return LoadedModel(model, tokenizer, name, ModelSource(name, Path(".")), device, torch.float32)


def save_tiny(path: Path, arch: str = "llama", seed: int = 0, **config_kwargs) -> Path:
    """Write a tiny model as an HF directory (safetensors + tokenizer)."""
    model, tokenizer = build_tiny(arch, seed, **config_kwargs)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return Path(path)
