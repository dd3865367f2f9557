"""AtManRL's mask at the training step budget against a 200-step fit (spec §8, issue 34).

Jobs fit the mask for ``mask_steps`` (default 20) steps; the served ``atman_rl`` method and the spec's
reference fit 200. Both use the step budget lr = 0.2 / steps. For each completion of a GSM8K dev problem
(greedy and sampled, so the set holds both kinds), the mask is fit three ways side by side:

* **default**: ``mask_steps`` steps at the budget lr (what a job's reward uses now);
* **old**: ``mask_steps`` steps at the fixed lr 1e-3 (the baseline this replaces);
* **reference**: 200 steps at 1e-3 (= the budget at 200).

Reported: per completion, Spearman ρ of the per-token saliency and top-10 overlap against the reference,
the saliency range and R_faith; over the completions, the median ρ and the Spearman correlation of the
R_faith ranking against the reference's (what GRPO's advantages see). Targets: median ρ ≥ 0.85 and
R_faith ranking ≥ 0.8 for the default.

    python bench/atmanrl_steps.py                 # SmolLM2, 5 problems × (greedy + sampled)
    python bench/atmanrl_steps.py --smoke         # CI: the tiny model, 2 problems, few steps
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import add_model_args, load_bench_model, machine, print_table
from bench.gpu import spearman
from faithlens.generation import generate_batch
from faithlens.params import SamplingParams
from training.config import TrainConfig
from training.trainer import fit_faith_mask

OLD_LR = 1e-3
DEV = (
    Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "gsm8k" / "dev.jsonl"
)  # read in place


def completions(lm, problems: int, max_new_tokens: int) -> list[tuple[list[int], list[int], str]]:
    """A greedy and a sampled (T 0.7) completion of each of the first ``problems`` dev problems."""
    rows = [json.loads(line) for line in DEV.read_text().splitlines()[:problems]]
    prompts = [lm.prompt_ids(re.sub(r"\s+", " ", row["question"]), chat=True) for row in rows]
    requests = []
    for i, prompt in enumerate(prompts):
        requests.append((prompt, SamplingParams(max_new_tokens=max_new_tokens)))
        requests.append((prompt, SamplingParams(max_new_tokens=max_new_tokens, temperature=0.7, seed=i)))
    return [
        (prompt, gen.token_ids, gen.text)
        for (prompt, _), gen in zip(requests, generate_batch(lm, requests), strict=True)
    ]


def top_overlap(a: torch.Tensor, b: torch.Tensor, k: int = 10) -> float:
    k = min(k, len(a))
    return len(set(a.topk(k).indices.tolist()) & set(b.topk(k).indices.tolist())) / k


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--problems", type=int, default=5, help="dev problems (two completions each)")
    parser.add_argument("--max-new-tokens", type=int, default=160)
    parser.add_argument("--steps", type=int, default=TrainConfig().mask_steps, help="the training budget")
    parser.add_argument("--reference-steps", type=int, default=200)
    parser.add_argument("--smoke", action="store_true")
    add_model_args(parser)
    args = parser.parse_args()
    if args.smoke:
        args.problems, args.max_new_tokens, args.steps, args.reference_steps = 2, 24, 3, 6
    lm = load_bench_model("tiny" if args.smoke else args.model, args.device, args.dtype)
    print("machine:", machine())
    print(
        f"model: {lm.name} ({lm.dtype}, {lm.device}); default {args.steps} steps (lr {0.2 / args.steps:g}), "
        f"old {args.steps} steps (lr {OLD_LR:g}), reference {args.reference_steps} steps (lr {0.2 / args.reference_steps:g})"
    )

    rows, fits = [], {"default": [], "old": [], "reference": []}
    seconds = {"default": 0.0, "old": 0.0, "reference": 0.0}
    for n, (prompt, ids, text) in enumerate(completions(lm, args.problems, args.max_new_tokens)):
        runs = {
            "default": (args.steps, None),
            "old": (args.steps, OLD_LR),
            "reference": (args.reference_steps, None),
        }
        got = {}
        for name, (steps, lr) in runs.items():
            started = time.perf_counter()
            got[name] = fit_faith_mask(lm, prompt, ids, text, steps, lr=lr)
            seconds[name] += time.perf_counter() - started
        if any(fit is None for fit in got.values()) or len(got["reference"].scores) < 3:
            print(f"completion {n}: no answer span or too short a CoT, skipped")
            continue
        for name, fit in got.items():
            fits[name].append(fit)
        ref = got["reference"].scores
        row = [n, len(ref)]
        for name in ("default", "old"):
            s = got[name].scores
            row += [
                spearman(s, ref),
                top_overlap(s, ref),
                f"[{float(s.min()):.2f}, {float(s.max()):.2f}]",
                got[name].r_faith,
            ]
        rows.append([*row, f"[{float(ref.min()):.2f}, {float(ref.max()):.2f}]", got["reference"].r_faith])
        print("row (as in the table below):", rows[-1], flush=True)  # a long run shows its progress
    print_table(
        f"{len(rows)} completions: each mask fit against the {args.reference_steps}-step reference",
        [
            "#",
            "CoT tokens",
            "ρ default",
            "top-10 default",
            "range default",
            "R_faith default",
            "ρ old",
            "top-10 old",
            "range old",
            "R_faith old",
            "range ref",
            "R_faith ref",
        ],
        rows,
    )
    ref_faith = [f.r_faith for f in fits["reference"]]
    summary = {}
    for name in ("default", "old"):
        rhos = [spearman(f.scores, r.scores) for f, r in zip(fits[name], fits["reference"], strict=True)]
        summary[name] = {
            "median_rho": statistics.median(rhos) if rhos else float("nan"),
            "r_faith_ranking": spearman(
                torch.tensor([f.r_faith for f in fits[name]]), torch.tensor(ref_faith)
            )
            if len(rows) > 2
            else float("nan"),
            "seconds_per_fit": seconds[name] / max(len(rows), 1),
        }
    print_table(
        "Summary against the reference",
        ["fit", "median per-token ρ", "R_faith ranking ρ", "s per fit"],
        [[name, s["median_rho"], s["r_faith_ranking"], s["seconds_per_fit"]] for name, s in summary.items()]
        + [["reference", 1.0, 1.0, seconds["reference"] / max(len(rows), 1)]],
    )
    d = summary["default"]
    print(
        f"\ndefault: median ρ {d['median_rho']:.2f} (target ≥ 0.85), R_faith ranking {d['r_faith_ranking']:.2f} "
        f"(target ≥ 0.8); old: {summary['old']['median_rho']:.2f}, {summary['old']['r_faith_ranking']:.2f}"
    )
    if not args.smoke and not rows:
        raise SystemExit("no completion had an answer span")


if __name__ == "__main__":
    main()
