"""``python -m training.eval --adapter NAME --dataset gsm8k-dev``: accuracy on a data set (a GSM8K split or
a synthetic task's), mean reasoning length, and mean anchor and saliency statistics, for the base model
and for the adapter, on the same problems. ``held_out_accuracy`` is the evaluation jobs run.

The adapter is a name in the adapter store (its latest version) or a directory. Answers are greedy and
generated with continuous batching; each answer is then analysed (FAI/WAAD/flags, plus saliency with
``--saliency``, default ``atman_grad`` because exact AtMan per answer is slow on a CPU).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from faithlens import lora
from faithlens.analysis import analyze
from faithlens.answer import gsm8k_correct
from faithlens.batching import BASE_ADAPTER, DecodeBatch, SequenceState
from faithlens.data import Problem, UnknownDataset, load_dataset
from faithlens.model import LoadedModel, load_model
from faithlens.params import AnalysisParams, SaliencyParams, SamplingParams
from faithlens.saliency import SALIENCY_METHODS
from faithlens.settings import get_core_settings


@dataclass
class EvalReport:
    model: str
    problems: int
    accuracy: float
    mean_reasoning_tokens: float
    mean_anchor_share: float
    mean_preplan_share: float
    mean_coupled_pairs: float
    mean_reasoning_saliency_share: float | None
    mean_spearman_fai_saliency: float | None


def resolve_adapter(name_or_path: str, store: Path) -> Path:
    """A directory, or the highest numbered version of ``name`` in the store."""
    path = Path(name_or_path)
    if path.is_dir():
        return path
    versions = sorted(
        (p for p in (store / name_or_path).glob("*") if p.name.isdigit()), key=lambda p: int(p.name)
    )
    if not versions:
        raise SystemExit(f"no adapter {name_or_path!r} in {store}")
    return versions[-1]


def answers(
    lm: LoadedModel,
    problems: list[Problem],
    adapter: str,
    max_new_tokens: int,
    params: SamplingParams | None = None,
    chat: bool = True,
    distinct_seeds: bool = False,
) -> list[SequenceState]:
    """Decode every problem's answer in one continuous batch (greedy unless ``params`` say otherwise).
    Each row decodes exactly as ``generate`` with ``params`` would; with ``distinct_seeds`` a seeded
    sampling gives problem ``i`` the seed ``seed + i`` instead, so that rows draw independent noise (an
    accuracy estimate over sampled answers)."""
    params = params or SamplingParams(max_new_tokens=max_new_tokens)

    def row_params(i: int) -> SamplingParams:
        if not distinct_seeds or params.seed is None or params.temperature == 0:
            return params
        return params.model_copy(update={"seed": params.seed + i})

    seqs = [
        SequenceState(lm.prompt_ids(p.question, chat=chat), row_params(i), adapter=adapter)
        for i, p in enumerate(problems)
    ]
    batch = DecodeBatch.for_work(lm, [(len(seq.prompt_ids), params.max_new_tokens) for seq in seqs])
    for seq in seqs:
        batch.add(seq)
    while len(batch):
        batch.step()
    return seqs


def held_out_accuracy(
    lm: LoadedModel, problems: list[Problem], adapter: str, max_new_tokens: int, chat: bool = True
) -> dict[str, Any]:
    """Greedy accuracy on ``problems`` (the §9 answer rule), as a job's evaluation reports it: the share
    correct, and which were (``eval_correct``, one ``0``/``1`` per problem in order, so that studies can
    pair runs problem by problem)."""
    started = time.perf_counter()
    seqs = answers(lm, problems, adapter, max_new_tokens, chat=chat)
    correct = [gsm8k_correct(seq.text, p.answer) for seq, p in zip(seqs, problems, strict=True)]
    return {
        "eval_accuracy": sum(correct) / len(problems),
        "eval_problems": len(problems),
        "eval_correct": "".join("1" if c else "0" for c in correct),
        "eval_completion_length": statistics.fmean(len(seq.token_ids) for seq in seqs),
        "eval_seconds": time.perf_counter() - started,
    }


def _mean(values: list[float]) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.fmean(values) if values else None


def evaluate(
    lm: LoadedModel,
    problems: list[Problem],
    label: str,
    internal: str | None,
    max_new_tokens: int,
    saliency: str | None,
    temperature: float = 0.0,
    seed: int = 0,
) -> EvalReport:
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, seed=seed)
    seqs = answers(lm, problems, internal or BASE_ADAPTER, max_new_tokens, params, distinct_seeds=True)
    anchor, preplan, pairs, shares, rhos = [], [], [], [], []
    for seq in seqs:
        if not seq.token_ids:
            continue
        with lora.active(lm, internal):
            a = analyze(
                lm,
                seq.prompt_ids,
                seq.token_ids,
                AnalysisParams(),
                saliency=SaliencyParams(method=saliency) if saliency else None,
            )
        n = len(a.tokens)
        anchor.append(a.summary.num_anchors / n)
        preplan.append(a.summary.num_preplan / n)
        pairs.append(a.summary.num_coupled_pairs)
        shares.append(a.summary.reasoning_saliency_share)
        rhos.append(a.summary.spearman_fai_saliency)
    correct = [gsm8k_correct(seq.text, p.answer) for seq, p in zip(seqs, problems, strict=True)]
    return EvalReport(
        model=label,
        problems=len(problems),
        accuracy=sum(correct) / len(problems),
        mean_reasoning_tokens=statistics.fmean(len(s.token_ids) for s in seqs),
        mean_anchor_share=_mean(anchor) or 0.0,
        mean_preplan_share=_mean(preplan) or 0.0,
        mean_coupled_pairs=_mean(pairs) or 0.0,
        mean_reasoning_saliency_share=_mean(shares),
        mean_spearman_fai_saliency=_mean(rhos),
    )


def main(argv: list[str] | None = None) -> int:
    settings = get_core_settings()
    parser = argparse.ArgumentParser(
        prog="python -m training.eval",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--adapter", help="adapter name in FAITHLENS_ADAPTER_STORE, or a directory")
    parser.add_argument(
        "--dataset",
        default="gsm8k-dev",
        help="a data set: gsm8k-dev, gsm8k-train, or a task's split such as arith-add:1-50/heldout",
    )
    parser.add_argument("--limit", type=int, default=None, help="first N problems (default: all)")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--saliency", choices=[*SALIENCY_METHODS.names(), "none"], default="atman_grad")
    parser.add_argument(
        "--temperature",
        type=float,
        default=0.0,
        help="0 (default): greedy; above 0, sampled (a credit study's task check uses the rollout temperature)",
    )
    parser.add_argument("--seed", type=int, default=0, help="sampling seed (problem i draws with seed + i)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    try:
        problems = load_dataset(args.dataset, limit=args.limit, data_dir=settings.data_dir)
    except (UnknownDataset, FileNotFoundError) as exc:
        parser.error(str(exc))
    lm = load_model(settings.model, settings.device, settings.dtype, settings.cache_dir)
    saliency = None if args.saliency == "none" else args.saliency
    sampling = {"temperature": args.temperature, "seed": args.seed}
    reports = [evaluate(lm, problems, lm.name, None, args.max_new_tokens, saliency, **sampling)]
    if args.adapter:
        path = resolve_adapter(args.adapter, settings.adapters)
        lora.attach(lm, path, "candidate")
        reports.append(
            evaluate(
                lm,
                problems,
                f"{args.adapter} ({path})",
                "candidate",
                args.max_new_tokens,
                saliency,
                **sampling,
            )
        )
    if args.json:
        print(json.dumps([asdict(r) for r in reports], indent=2))
    else:
        fields = list(asdict(reports[0]))
        print("| " + " | ".join(fields) + " |")
        print("|" + "---|" * len(fields))
        for r in reports:
            print(
                "| "
                + " | ".join(f"{v:.3f}" if isinstance(v, float) else str(v) for v in asdict(r).values())
                + " |"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
