"""Developer CLI: ``python -m faithlens {analyze,generate,demo,study}``.

Not the product CLI (that is ``faithlens`` from the client package); this one runs the model in-process.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from rich.console import Console
from rich.table import Table
from rich.text import Text

from faithlens.analysis import analyze
from faithlens.cli_args import add_model_arguments, model_from_arguments
from faithlens.generation import generate
from faithlens.logs import configure_logging
from faithlens.model import LoadedModel, ModelNotFoundError, load_model
from faithlens.params import AnalysisParams, SaliencyParams, SamplingParams
from faithlens.saliency import SALIENCY_METHODS
from faithlens.schema import Analysis
from faithlens.settings import get_core_settings
from faithlens.study.cli import add_study_parser, run_study


def _add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model", help="HF model directory or .gguf file (default: FAITHLENS_MODEL or SmolLM2)"
    )
    parser.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template")
    parser.add_argument("--json", action="store_true", help="print the annotation JSON")


def _add_analysis_args(parser: argparse.ArgumentParser) -> None:
    """The analysis and saliency flags, derived from the parameter models (their defaults and bounds)."""
    add_model_arguments(
        parser.add_argument_group("analysis parameters (spec §2–5)"), AnalysisParams, prefix="analysis_"
    )
    methods = ", ".join(SALIENCY_METHODS.names())
    group = parser.add_argument_group(
        "saliency (spec §7–8)", f"--saliency METHOD turns saliency on; methods: {methods}"
    )
    add_model_arguments(
        group, SaliencyParams, prefix="saliency_", rename={"method": "saliency", "seed": "saliency-seed"}
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m faithlens", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p_an = sub.add_parser("analyze", help="annotate a completion you already have")
    p_an.add_argument("--prompt", required=True)
    p_an.add_argument("--completion", required=True)
    p_gen = sub.add_parser("generate", help="generate a response, then annotate it")
    p_gen.add_argument("--prompt", required=True)
    p_demo = sub.add_parser("demo", help="annotate the model's answer to a GSM8K dev question")
    p_demo.add_argument("--index", type=int, default=0, help="which dev question")
    for p in (p_gen, p_demo):
        add_model_arguments(p.add_argument_group("sampling"), SamplingParams, prefix="sampling_")
    for p in (p_an, p_gen, p_demo):
        _add_model_args(p)
        _add_analysis_args(p)
    add_study_parser(sub)
    return parser


def _params(args: argparse.Namespace) -> AnalysisParams:
    return model_from_arguments(args, AnalysisParams, prefix="analysis_")


def _saliency(args: argparse.Namespace) -> SaliencyParams | None:
    if args.saliency_method is None:
        return None
    return model_from_arguments(args, SaliencyParams, prefix="saliency_")


def _flags(tok) -> str:
    marks = [("anchor", "A"), ("preplan", "P"), ("dominated_anchor", "D"), ("intro", "I")]
    return "".join(letter for name, letter in marks if getattr(tok, name))


def render_table(analysis: Analysis, console: Console) -> None:
    """A readable table: one row per response token, anchors highlighted."""
    table = Table(title=f"{analysis.model}: {len(analysis.tokens)} response tokens", show_lines=False)
    with_saliency = analysis.summary.saliency_method is not None
    columns = ["index", "token", "logprob", "FAI", "WAAD", "flags"] + (["saliency"] if with_saliency else [])
    for column in columns:
        table.add_column(column, justify="right" if column not in {"token", "flags"} else "left")
    fais = [t.fai for t in analysis.tokens if t.fai is not None]
    top = max(fais) if fais else 1.0
    for tok in analysis.tokens:
        style = "bold black on yellow" if tok.anchor else ("cyan" if tok.preplan else "")
        fai = "null" if tok.fai is None else f"{tok.fai:.4f}"
        heat = "" if tok.fai is None else "█" * round(8 * tok.fai / top) if top > 0 else ""
        table.add_row(
            str(tok.index),
            Text(repr(tok.text)[1:-1], style=style),
            "" if tok.logprob is None else f"{tok.logprob:.2f}",
            Text(f"{fai} {heat}", style="yellow" if tok.anchor else ""),
            "" if tok.waad is None else f"{tok.waad:.2f}",
            Text(_flags(tok), style="magenta" if tok.dominated_anchor else ""),
            *([] if not with_saliency else ["" if tok.saliency is None else f"{tok.saliency:+.4f}"]),
        )
    console.print(table)
    s = analysis.summary
    answer = analysis.answer_span.text if analysis.answer_span else None
    console.print(
        f"anchors={s.num_anchors} preplan={s.num_preplan} dominated={s.num_dominated_anchors} "
        f"coupled_pairs={s.num_coupled_pairs} answer={answer!r}"
    )
    if with_saliency:
        console.print(
            f"saliency={s.saliency_method} reasoning_share={s.reasoning_saliency_share} "
            f"spearman(FAI, saliency)={s.spearman_fai_saliency} counterfactual={s.counterfactual}"
        )
    console.print("flags: A anchor, P preplan, D dominated anchor, I intro of a dominated anchor")


def _emit(analysis: Analysis, as_json: bool, extra: dict | None = None) -> None:
    if as_json:
        print(json.dumps({**(extra or {}), **analysis.to_json_dict()}, indent=2))
    else:
        console = Console()
        for key, value in (extra or {}).items():
            console.print(f"[bold]{key}[/bold]: {value}")
        render_table(analysis, console)


def _generate_and_annotate(lm: LoadedModel, args, prompt: str) -> None:
    prompt_ids = lm.prompt_ids(prompt, chat=args.chat)
    sampling = model_from_arguments(args, SamplingParams, prefix="sampling_")
    gen = generate(lm, prompt_ids, sampling)
    if not gen.token_ids:
        raise SystemExit("the model generated no tokens")
    analysis = analyze(lm, prompt_ids, gen.token_ids, _params(args), saliency=_saliency(args))
    _emit(analysis, args.json, {"prompt": prompt, "text": gen.text, "finish_reason": gen.finish_reason})


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    settings = get_core_settings()
    configure_logging(settings.log_level, settings.log_json)

    def load() -> LoadedModel:
        try:
            return load_model(
                args.model or settings.model, settings.device, settings.dtype, settings.cache_dir
            )
        except ModelNotFoundError as exc:
            print(f"error: {exc}", file=sys.stderr)
            raise SystemExit(2) from None

    if args.command == "study":
        return run_study(args, load)
    lm = load()
    if args.command == "analyze":
        prompt_ids = lm.prompt_ids(args.prompt, chat=args.chat)
        completion = lm.completion_ids(args.completion)
        analysis = analyze(lm, prompt_ids, completion, _params(args), saliency=_saliency(args))
        _emit(analysis, args.json)
    elif args.command == "generate":
        _generate_and_annotate(lm, args, args.prompt)
    else:
        from faithlens.data import load_gsm8k

        problem = load_gsm8k("dev")[args.index]
        args.chat = True
        _generate_and_annotate(lm, args, problem.question)
        if not args.json:
            Console().print(f"[bold]reference[/bold]: {problem.answer.rsplit('####', 1)[-1].strip()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
