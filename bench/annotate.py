"""Annotation cost: plain generation vs generation + faithlens vs generation + naive output_attentions.

Each (variant, length) runs in its own process so its peak RSS is its own. Responses are forced to the
exact length (EOS suppressed) on a GSM8K dev question, greedy.

    python bench/annotate.py                 # SmolLM2, 128/256/512/2048 tokens
    python bench/annotate.py --device cuda   # the same on a GPU (peaks: the CUDA allocator's, not RSS)
    python bench/annotate.py --smoke         # tiny model, a few tokens: CI's check that it runs
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (
    absolute_model,
    add_model_args,
    load_bench_model,
    machine,
    memory_kind,
    peak_memory_mib,
    print_table,
    reset_peak_memory,
    run_isolated,
    timed,
)

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
    pos = torch.arange(n, device=a.device)
    lag = (pos[:, None] - pos[None, :]).clamp(min=0).float()
    rows = a[:, prompt_len:]
    distance = (rows * lag[prompt_len:]).sum((-1, -2)) / (n - prompt_len)
    split = split_heads(distance.cpu())
    waad = (rows[split.local].mean(0) * lag[prompt_len:].clamp(max=10)).sum(-1)
    band = (lag[prompt_len:] >= 10) & (lag[prompt_len:] <= 100)
    counts = fai_counts(n, prompt_len, 10, 100).to(a.device).clamp(min=1)
    fai = ((rows[split.global_].mean(0) * band).sum(0) / counts).cpu()
    compute_flags(waad.cpu(), fai[prompt_len:])


def worker(variant: str, length: int, model: str | None, device: str, dtype: str) -> dict:
    from faithlens.analysis import analyze
    from faithlens.data import load_gsm8k
    from faithlens.generation import generate
    from faithlens.metrics import default_layers
    from faithlens.params import SamplingParams

    lm = load_bench_model(model, device, dtype)
    prompt = lm.prompt_ids(load_gsm8k("dev", limit=1)[0].question, chat=True)
    sampling = SamplingParams(max_new_tokens=length, min_new_tokens=length)
    generate(lm, prompt, SamplingParams(max_new_tokens=4))  # warm-up
    base = reset_peak_memory(lm.device)
    gen, gen_s = timed(lambda: generate(lm, prompt, sampling), lm.device)
    extra_s = 0.0
    if variant == "faithlens":
        _, extra_s = timed(lambda: analyze(lm, prompt, gen.token_ids), lm.device)
    elif variant == "naive":
        layers = default_layers(lm.num_layers)
        _, extra_s = timed(lambda: naive_metrics(lm, prompt + gen.token_ids, len(prompt), layers), lm.device)
    return {
        "variant": variant,
        "model": f"{lm.name}, {str(lm.dtype).removeprefix('torch.')}, {lm.device}",
        "memory": memory_kind(lm.device),
        "tokens": len(gen.token_ids),
        "generate_s": gen_s,
        "extra_s": extra_s,
        "total_s": gen_s + extra_s,
        "peak_above_loaded_mib": peak_memory_mib(lm.device) - base,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--smoke", action="store_true", help="tiny model, tiny lengths")
    parser.add_argument("--lengths", type=int, nargs="+", default=[128, 256, 512, 2048])
    add_model_args(parser)
    parser.add_argument(
        "--worker",
        nargs=5,
        metavar=("VARIANT", "LENGTH", "MODEL", "DEVICE", "DTYPE"),
        help=argparse.SUPPRESS,
    )
    args = parser.parse_args()
    if args.worker:
        variant, length, model, device, dtype = args.worker
        print(json.dumps(worker(variant, int(length), None if model == "-" else model, device, dtype)))
        return
    lengths = [8, 16] if args.smoke else args.lengths
    model = "tiny" if args.smoke else (absolute_model(args.model) or "-")
    print("machine:", json.dumps(machine()))
    rows = []
    for length in lengths:
        got = {
            v: run_isolated(Path(__file__), v, str(length), model, args.device, args.dtype) for v in VARIANTS
        }
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
    smoke = ", smoke" if args.smoke else ""
    print_table(
        f"annotation cost ({got['plain']['model']}{smoke}; peaks: {got['plain']['memory']})",
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
