"""Generation on the fast kernels: greedy or seeded sampling, stop strings, per-token log-probs."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Literal

import torch

from faithlens.model import LoadedModel

FinishReason = Literal["stop", "length"]


@dataclass
class SamplingParams:
    """What a request may set. ``temperature == 0`` means greedy."""

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    min_new_tokens: int = 0
    top_logprobs: int = 0

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError("max_new_tokens must be ≥ 1")
        if self.temperature < 0 or not 0 < self.top_p <= 1:
            raise ValueError("temperature must be ≥ 0 and top_p in (0, 1]")


@dataclass
class Generation:
    """A finished generation. Token ids exclude the EOS token and anything from a stop string on."""

    prompt_ids: list[int]
    token_ids: list[int]
    text: str
    logprobs: list[float]
    top_logprobs: list[list[tuple[int, float]]]
    finish_reason: FinishReason
    seconds: float


def _truncate_at_stop(lm: LoadedModel, ids: list[int], stops: list[str]) -> tuple[list[int], str, bool]:
    """Cut at the earliest stop string: keep the tokens that end before it (OpenAI excludes the stop)."""
    text = lm.tokenizer.decode(ids, skip_special_tokens=True)
    hits = [at for at in (text.find(s) for s in stops if s) if at >= 0]
    if not hits:
        return ids, text, False
    cut = min(hits)
    keep = 0
    while keep < len(ids) and len(lm.tokenizer.decode(ids[: keep + 1], skip_special_tokens=True)) <= cut:
        keep += 1
    return ids[:keep], text[:cut], True


def _sampling_kwargs(params: SamplingParams) -> dict:
    if params.temperature == 0:
        return {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
    return {"do_sample": True, "temperature": params.temperature, "top_p": params.top_p, "top_k": None}


@torch.inference_mode()
def generate(lm: LoadedModel, prompt_ids: list[int], params: SamplingParams | None = None) -> Generation:
    """Generate one continuation of ``prompt_ids``. Log-probs are the model's raw ones (before sampling
    transforms), as vLLM reports them."""
    params = params or SamplingParams()
    started = time.perf_counter()
    ids = torch.tensor([prompt_ids], device=lm.device)
    stop_kwargs = {"stop_strings": params.stop, "tokenizer": lm.tokenizer} if params.stop else {}
    with torch.random.fork_rng(devices=[lm.device] if lm.device.type == "cuda" else []):
        if params.seed is not None:
            torch.manual_seed(params.seed)
        out = lm.model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=params.max_new_tokens,
            min_new_tokens=params.min_new_tokens,
            pad_token_id=lm.tokenizer.pad_token_id,
            eos_token_id=sorted(lm.eos_token_ids),
            return_dict_in_generate=True,
            output_logits=True,
            **_sampling_kwargs(params),
            **stop_kwargs,
        )
    new = out.sequences[0, len(prompt_ids) :].tolist()
    logp = torch.log_softmax(torch.stack(out.logits, dim=1)[0].float(), dim=-1)
    eos = lm.eos_token_ids
    hit_eos = bool(new) and new[-1] in eos
    if hit_eos:
        new = new[:-1]
    new, text, hit_stop = _truncate_at_stop(lm, new, params.stop)
    chosen = [float(logp[i, t]) for i, t in enumerate(new)]
    top: list[list[tuple[int, float]]] = []
    if params.top_logprobs:
        values, indices = logp[: len(new)].topk(params.top_logprobs, dim=-1)
        top = [list(zip(i.tolist(), v.tolist(), strict=True)) for i, v in zip(indices, values, strict=True)]
    return Generation(
        prompt_ids=list(prompt_ids),
        token_ids=new,
        text=text,
        logprobs=chosen,
        top_logprobs=top,
        finish_reason="stop" if hit_eos or hit_stop else "length",
        seconds=time.perf_counter() - started,
    )
