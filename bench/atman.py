"""AtMan cost: faithlens exact (batched, prefix reuse) vs the naive unbatched loop vs captum, plus
gradient mode against exact on GSM8K dev answers.

Part 1, on the same SmolLM2 input with 128 and 512 context tokens, one perturbation per context token:
  * faithlens exact;
  * the naive loop: one eager pass per token with a 4D float mask (the same definition: max |Δ| shown);
  * captum's LLMAttribution(FeatureAblation), which replaces each token by a baseline id: a different
    perturbation, at an equal number of forward passes (forward_in_tokens=False, see shared/README.md).
Part 2, on N GSM8K dev problems (the model's greedy answers): atman_grad vs atman time and Spearman ρ.

    python bench/atman.py                      # SmolLM2
    python bench/atman.py --device cuda        # the same on a GPU (bfloat16 unless --dtype says otherwise)
    python bench/atman.py --smoke              # tiny model, small sizes: CI's check that it runs
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import add_model_args, load_bench_model, machine, print_table, timed


def naive_loop(lm, ids: list[int], target: list[int], positions: list[int], factor: float) -> torch.Tensor:
    from faithlens.model import unwrap

    model = unwrap(lm.model)
    n = len(ids)
    # Everything on the model's device; the mask stays float32 (the eager scores are promoted to it), so
    # log(factor) is added exactly whatever the model's dtype.
    causal = torch.full((n, n), torch.finfo(torch.float32).min, device=lm.device).triu(1)
    tokens = torch.tensor([ids], device=lm.device)
    rows = torch.tensor([t - 1 for t in target], device=lm.device)
    cols = torch.tensor([ids[t] for t in target], device=lm.device)
    model.set_attn_implementation("eager")

    def target_logprob(mask: torch.Tensor) -> torch.Tensor:
        logits = model(tokens, attention_mask=mask[None, None], use_cache=False).logits[0]
        logp = torch.log_softmax(logits.float(), -1)
        return logp[rows, cols].sum()

    try:
        with torch.inference_mode():
            base = target_logprob(causal)
            out = []
            for i in positions:
                mask = causal.clone()
                mask[:, i] += math.log(factor)
                out.append(base - target_logprob(mask))
    finally:
        model.set_attn_implementation("faithlens")
    # on the CPU, as the scores of compute_saliency are (callers subtract one from the other)
    return torch.stack(out).cpu() if out else torch.zeros(0)


def captum_ablation(lm, ids: list[int], target: list[int]) -> int:
    """captum's FeatureAblation over the context tokens; returns its number of features."""
    from captum.attr import FeatureAblation, LLMAttribution, TextTokenInput

    from faithlens.model import unwrap

    model = unwrap(lm.model)
    context = lm.tokenizer.decode(ids[: target[0]])
    inp = TextTokenInput(context, lm.tokenizer, baselines=lm.tokenizer.pad_token_id)
    attribution = LLMAttribution(FeatureAblation(model), lm.tokenizer)
    target_ids = torch.tensor(ids[target[0] :], device=lm.device)
    with torch.inference_mode():
        attribution.attribute(inp, target=target_ids, forward_in_tokens=False, use_cached_outputs=False)
    return inp.n_itp_features


def context_ids(lm, n_context: int) -> tuple[list[int], list[int]]:
    from faithlens.data import load_gsm8k

    ids: list[int] = []
    for problem in load_gsm8k("dev"):
        ids += lm.completion_ids(problem.question + " " + problem.answer.replace("\n", " ") + " ")
        if len(ids) >= n_context:
            break
    ids = lm.tokenizer("")["input_ids"] + ids[:n_context]
    answer = lm.completion_ids(" The answer is 42")
    return ids + answer, list(range(len(ids), len(ids) + len(answer)))


def describe(lm) -> str:
    return f"{lm.name}, {str(lm.dtype).removeprefix('torch.')}, {lm.device}"


def part1(lm, sizes: list[int]) -> None:
    from faithlens.params import SaliencyParams
    from faithlens.saliency import compute_saliency

    rows = []
    for n_context in sizes:
        ids, target = context_ids(lm, n_context)
        params = SaliencyParams(target=target)
        ours, t_ours = timed(lambda ids=ids, params=params: compute_saliency(lm, ids, 0, params), lm.device)
        positions = [g[0] for g in ours.groups]
        naive, t_naive = timed(
            lambda ids=ids, target=target, p=positions: naive_loop(lm, ids, target, p, 0.1), lm.device
        )
        diff = float((ours.scores[positions] - naive).abs().max())
        features, t_captum = timed(lambda ids=ids, target=target: captum_ablation(lm, ids, target), lm.device)
        rows.append(
            [
                len(ids),
                len(positions),
                features,
                t_ours,
                t_naive,
                t_captum,
                t_naive / t_ours,
                t_captum / t_ours,
                f"{diff:.1e}",
            ]
        )
    print_table(
        f"exact AtMan: faithlens vs naive loop vs captum FeatureAblation ({describe(lm)})",
        [
            "tokens",
            "perturbations",
            "captum features",
            "faithlens s",
            "naive s",
            "captum s",
            "naive/faithlens",
            "captum/faithlens",
            "max |faithlens − naive|",
        ],
        rows,
    )


def part2(lm, problems: int, max_new_tokens: int) -> None:
    from scipy.stats import spearmanr

    from faithlens.data import load_gsm8k
    from faithlens.generation import generate
    from faithlens.params import SaliencyParams, SamplingParams
    from faithlens.saliency import compute_saliency

    speedups, rhos, exact_s, grad_s = [], [], [], []
    for problem in load_gsm8k("dev", limit=problems):
        prompt = lm.prompt_ids(problem.question, chat=True)
        gen = generate(lm, prompt, SamplingParams(max_new_tokens=max_new_tokens))
        if not gen.token_ids:
            continue
        ids = prompt + gen.token_ids
        exact, te = timed(
            lambda ids=ids, p=prompt: compute_saliency(lm, ids, len(p), SaliencyParams()), lm.device
        )
        grad, tg = timed(
            lambda ids=ids, p=prompt: compute_saliency(lm, ids, len(p), SaliencyParams(method="atman_grad")),
            lm.device,
        )
        scored = ~torch.isnan(exact.scores)
        rho = spearmanr(exact.scores[scored].tolist(), grad.scores[scored].tolist()).statistic
        speedups.append(te / tg)
        rhos.append(float(rho))
        exact_s.append(te)
        grad_s.append(tg)
    q = statistics.quantiles(rhos, n=4, method="inclusive") if len(rhos) > 1 else rhos * 3
    print_table(
        f"atman_grad vs exact atman on {len(rhos)} GSM8K dev answers (greedy, ≤ {max_new_tokens} new tokens, "
        f"{describe(lm)})",
        [
            "mean exact s",
            "mean grad s",
            "speed-up median",
            "speed-up min",
            "ρ min",
            "ρ q1",
            "ρ median",
            "ρ q3",
            "ρ max",
        ],
        [
            [
                statistics.mean(exact_s),
                statistics.mean(grad_s),
                statistics.median(speedups),
                min(speedups),
                min(rhos),
                q[0],
                q[1],
                q[2],
                max(rhos),
            ]
        ],
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--sizes", type=int, nargs="+", default=[128, 512])
    parser.add_argument("--problems", type=int, default=20)
    parser.add_argument("--max-new-tokens", type=int, default=160)
    parser.add_argument("--part", choices=["1", "2", "all"], default="all")
    add_model_args(parser)
    args = parser.parse_args()
    torch.manual_seed(0)
    lm = load_bench_model("tiny" if args.smoke else args.model, args.device, args.dtype)
    print("machine:", json.dumps(machine()))
    print("model:", describe(lm))
    if args.part in {"1", "all"}:
        part1(lm, [24] if args.smoke else args.sizes)
    if args.part in {"2", "all"}:
        part2(lm, 2 if args.smoke else args.problems, 8 if args.smoke else args.max_new_tokens)


if __name__ == "__main__":
    main()
