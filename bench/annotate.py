"""Annotation cost: plain generation vs generation + faithlens vs generation + naive output_attentions.

Each (variant, length) runs in its own process so its peak RSS is its own. Responses are forced to the
exact length (EOS suppressed) on a GSM8K dev question, greedy.

    python bench/annotate.py                 # SmolLM2, 128/256/512/2048 tokens
    python bench/annotate.py --smoke         # tiny model, a few tokens: CI's check that it runs
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import machine, peak_rss_mib, print_table, reset_peak_rss, run_isolated, timed

VARIANTS = ("plain", "faithlens", "naive")


def naive_metrics(lm, ids: list[int], prompt_len: int, layers: list[int]) -> None:
    """The output_attentions approach: materialise eager attention of every layer, then the spec's formulas."""
    from faithlens.metrics import compute_flags, fai_counts, split_heads
    from faithlens.model import unwrap

    model = unwrap(lm.model)
    model.set_attn_implementation("eager")
    with torch.inference_mode():
        attn = model(
            torch.tensor([ids], device=lm.device), output_attentions=True, use_cache=False
        ).attentions
    model.set_attn_implementation("faithlens")
    a = torch.cat([attn[layer][0] for layer in layers]).float()  # (heads, N, N)
    n = len(ids)
    lag = (torch.arange(n)[:, None] - torch.arange(n)[None, :]).clamp(min=0).float().to(a.device)
    rows = a[:, prompt_len:]
    distance = (rows * lag[prompt_len:]).sum((-1, -2)) / (n - prompt_len)
    split = split_heads(distance.cpu())
    waad = (rows[split.local].mean(0) * lag[prompt_len:].clamp(max=10)).sum(-1)
    band = (lag[prompt_len:] >= 10) & (lag[prompt_len:] <= 100)
    fai = (rows[split.global_].mean(0) * band).sum(0).cpu() / fai_counts(n, prompt_len, 10, 100).clamp(min=1)
    compute_flags(waad.cpu(), fai[prompt_len:])


def worker(variant: str, length: int, model: str | None) -> dict:
    from faithlens.analysis import analyze
    from faithlens.data import load_gsm8k
    from faithlens.generation import generate
    from faithlens.metrics import default_layers
    from faithlens.model import load_model
    from faithlens.params import SamplingParams
    from faithlens.settings import get_core_settings
    from faithlens.tiny import tiny_loaded_model

    settings = get_core_settings()
    lm = tiny_loaded_model("llama") if model == "tiny" else load_model(model, cache_dir=settings.cache_dir)
    prompt = lm.prompt_ids(load_gsm8k("dev", limit=1)[0].question, chat=True)
    sampling = SamplingParams(max_new_tokens=length, min_new_tokens=length)
    generate(lm, prompt, SamplingParams(max_new_tokens=4))  # warm-up
    base_rss = reset_peak_rss()
    gen, gen_s = timed(lambda: generate(lm, prompt, sampling))
    extra_s = 0.0
    if variant == "faithlens":
        _, extra_s = timed(lambda: analyze(lm, prompt, gen.token_ids))
    elif variant == "naive":
        layers = default_layers(lm.num_layers)
        _, extra_s = timed(lambda: naive_metrics(lm, prompt + gen.token_ids, len(prompt), layers))
    return {
        "variant": variant,
        "tokens": len(gen.token_ids),
        "generate_s": gen_s,
        "extra_s": extra_s,
        "total_s": gen_s + extra_s,
        "peak_above_loaded_mib": peak_rss_mib() - base_rss,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--smoke", action="store_true", help="tiny model, tiny lengths")
    parser.add_argument("--lengths", type=int, nargs="+", default=[128, 256, 512, 2048])
    parser.add_argument("--model", default=None, help="model path (default: the embedded SmolLM2)")
    parser.add_argument("--worker", nargs=3, metavar=("VARIANT", "LENGTH", "MODEL"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        variant, length, model = args.worker
        print(json.dumps(worker(variant, int(length), None if model == "-" else model)))
        return
    lengths = [8, 16] if args.smoke else args.lengths
    model = "tiny" if args.smoke else (args.model or "-")
    print("machine:", json.dumps(machine()))
    rows = []
    for length in lengths:
        got = {v: run_isolated(Path(__file__), v, str(length), model) for v in VARIANTS}
        plain = got["plain"]["total_s"]
        rows.append(
            [
                length,
                plain,
                got["faithlens"]["total_s"],
                got["naive"]["total_s"],
                got["faithlens"]["total_s"] / plain,
                got["naive"]["total_s"] / plain,
                got["plain"]["peak_above_loaded_mib"],
                got["faithlens"]["peak_above_loaded_mib"],
                got["naive"]["peak_above_loaded_mib"],
            ]
        )
    print_table(
        f"annotation cost ({'tiny model, smoke' if args.smoke else 'SmolLM2-135M'})",
        [
            "new tokens",
            "plain s",
            "+faithlens s",
            "+naive s",
            "faithlens ×",
            "naive ×",
            "plain peak MiB",
            "faithlens peak MiB",
            "naive peak MiB",
        ],
        rows,
    )


if __name__ == "__main__":
    main()
