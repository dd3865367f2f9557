"""Peak memory of analysing one long sequence, against a plain forward pass of the same sequence.

Each measurement runs in a fresh process; the peak RSS (VmHWM) is reset after the model is loaded, so
figures are "peak above the loaded model".

    python bench/memory.py                  # SmolLM2, 8192 tokens (prompt 256, response 7936)
    python bench/memory.py --smoke          # tiny model, 512 tokens
    python bench/memory.py --device cuda    # on a GPU: peaks of the CUDA allocator instead of RSS
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

VARIANTS = ("forward_logits", "forward_hidden", "faithlens")


def _long_ids(lm, n: int) -> list[int]:
    from faithlens.data import load_gsm8k

    ids: list[int] = []
    for problem in load_gsm8k("train"):
        ids += lm.completion_ids(problem.question + "\n" + problem.answer + "\n\n")
        if len(ids) >= n:
            return ids[:n]
    raise RuntimeError("not enough text")


def worker(variant: str, n: int, model: str | None, device: str, dtype: str) -> dict:
    from faithlens.analysis import compute_metrics
    from faithlens.model import unwrap

    torch.set_grad_enabled(False)
    lm = load_bench_model(model, device, dtype)
    ids = _long_ids(lm, n)
    prompt_len = min(256, n // 4)
    tensor = torch.tensor([ids], device=lm.device)
    net = unwrap(lm.model)
    base = reset_peak_memory(lm.device)
    if variant == "forward_logits":  # what a user gets from model(ids)
        _, seconds = timed(lambda: net(input_ids=tensor, use_cache=False).logits.shape, lm.device)
    elif variant == "forward_hidden":  # the backbone alone: the strictest baseline
        backbone = getattr(net, net.base_model_prefix)
        _, seconds = timed(
            lambda: backbone(input_ids=tensor, use_cache=False).last_hidden_state.shape, lm.device
        )
    else:
        _, seconds = timed(lambda: compute_metrics(lm, ids, prompt_len), lm.device)
    return {
        "variant": variant,
        "model": f"{lm.name}, {str(lm.dtype).removeprefix('torch.')}, {lm.device}",
        "memory": memory_kind(lm.device),
        "tokens": n,
        "seconds": seconds,
        "peak_above_loaded_mib": peak_memory_mib(lm.device) - base,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--tokens", type=int, default=8192)
    add_model_args(parser)
    parser.add_argument("--worker", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        variant, n, model, device, dtype = args.worker
        print(json.dumps(worker(variant, int(n), None if model == "-" else model, device, dtype)))
        return
    n = 512 if args.smoke else args.tokens
    model = "tiny" if args.smoke else (absolute_model(args.model) or "-")
    print("machine:", json.dumps(machine()))
    got = {v: run_isolated(Path(__file__), v, str(n), model, args.device, args.dtype) for v in VARIANTS}
    rows = [[v, got[v]["seconds"], got[v]["peak_above_loaded_mib"]] for v in VARIANTS]
    print_table(
        f"peak memory at {n} tokens ({got['faithlens']['model']}; peaks: {got['faithlens']['memory']})",
        ["variant", "seconds", "peak above loaded model MiB"],
        rows,
    )
    over_logits = got["faithlens"]["peak_above_loaded_mib"] - got["forward_logits"]["peak_above_loaded_mib"]
    over_hidden = got["faithlens"]["peak_above_loaded_mib"] - got["forward_hidden"]["peak_above_loaded_mib"]
    print(f"\nfaithlens above plain forward (with logits): {over_logits:.0f} MiB")
    print(f"faithlens above backbone forward (no logits): {over_hidden:.0f} MiB (acceptance: ≤ 1536 MiB)")


if __name__ == "__main__":
    main()
