"""``faithlens``: the command line for a faithlens server. Human-readable by default, ``--json`` for
scripts. Server and key come from ``--base-url``/``--api-key`` or ``$FAITHLENS_BASE_URL``/``$FAITHLENS_API_KEY``.

    faithlens generate "What is 17*3?" --saliency atman_grad
    faithlens analyze "Q: 2+2?" --completion " 4. #### 4"
    faithlens audit "What is 17*3?" --html audit.html
    faithlens jobs create --adapter-name mine --method grpo --set max_steps=20 --set credit=coupled
    faithlens jobs watch ftjob-...
    faithlens adapters load mine mine/3
    faithlens models
    faithlens capabilities                 # the saliency methods, credit strategies, ... the server offers
    faithlens jobs list --json             # --json, --base-url, --api-key go before or after the command
    faithlens audits create --dataset gsm8k-dev --limit 50 --saliency atman --watch
    faithlens audits results audit_... > results.jsonl
    faithlens audits report audit_... --html report.html
    faithlens study credit --task arith-add:1-50 --arms none,coupled --seeds 0,1,2 --out studies/credit
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from faithlens_client import Faithlens
from faithlens_client.audit import AuditReport
from faithlens_client.errors import FaithlensError, NotFoundError
from faithlens_client.study import (
    DEFAULT_HYPERPARAMETERS,
    SMOKE_HYPERPARAMETERS,
    CreditGrid,
    StudyFolder,
    render_report_html,
    report,
    run_grid,
)
from faithlens_client.types import Audit, AuditEvent, Generation, Job, JobEvent


def _dump(value: Any) -> str:
    if isinstance(value, list):
        return json.dumps(
            [v.model_dump(mode="json", by_alias=True) if hasattr(v, "model_dump") else v for v in value],
            indent=2,
        )
    if hasattr(value, "model_dump"):
        return value.model_dump_json(indent=2, by_alias=True)
    return json.dumps(value, indent=2)


def _value(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


def _print_generation(result: Generation) -> None:
    print(result.text)
    if result.annotations is None:
        return
    report = AuditReport.from_generation(result)
    s = report.summary
    print(
        f"\n{s.num_response_tokens} tokens · {s.num_anchors} anchors · {s.num_preplan} preplan · "
        f"{s.num_coupled_pairs} coupled pairs"
    )
    print("anchors (top FAI):", ", ".join(repr(t.text) for t in report.anchors(8)) or "–")
    if s.saliency_method:
        print(
            f"most salient ({s.saliency_method}):",
            ", ".join(repr(t.text) for t in report.most_salient(8)) or "–",
        )


def _print_jobs(jobs: list[Job]) -> None:
    for job in jobs:
        print(
            f"{job.id}  {job.status:<9}  {job.method.get('type', '?'):<8}  step {job.step:<5} "
            f"{job.adapter_name}  {job.result_adapter or ''}  {job.error.message if job.error else ''}"
        )


def _watch(client: Faithlens, job_id: str, as_json: bool) -> Job:
    """A live progress bar with reward and accuracy (rich when installed, else one line per step)."""
    job = client.jobs.get(job_id)
    total = int(job.hyperparameters.get("max_steps", 0)) or None
    try:
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
    except ImportError:
        Progress = None

    def describe(event: JobEvent) -> str:
        d = event.data or {}
        if "eval_accuracy" in d:  # a held-out evaluation (its message says it all)
            return f"held-out {d['eval_problems']} problems"
        return f"reward {d.get('reward_mean', 0):.3f} · acc {d.get('accuracy', 0):.2f} · loss {d.get('loss', 0):.4f}"

    if as_json or Progress is None:

        def on_progress(job: Job, events: list[JobEvent]) -> None:
            for event in events:
                print(
                    event.model_dump_json()
                    if as_json
                    else f"[{job.status}] {event.message}"
                    + (f"  {describe(event)}" if event.type == "metrics" else ""),
                    flush=True,
                )

        return client.wait(job_id, on_progress=on_progress)
    columns = [
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TextColumn("{task.fields[stats]}"),
        TimeElapsedColumn(),
    ]
    with Progress(*columns) as progress:
        task = progress.add_task(job_id, total=total, stats="queued")

        def on_progress(job: Job, events: list[JobEvent]) -> None:
            metrics = [e for e in events if e.type == "metrics"]
            stats = describe(metrics[-1]) if metrics else job.status
            progress.update(task, completed=job.step, stats=stats)

        return client.wait(job_id, on_progress=on_progress)


def _print_audits(audits: list[Audit]) -> None:
    for audit in audits:
        n = audit.request_counts
        failed = f" ({n.failed} failed)" if n.failed else ""
        print(
            f"{audit.id}  {audit.status:<11}  {n.completed + n.failed}/{n.total} rows{failed}  "
            f"{audit.input or ''}  {audit.adapter or ''}".rstrip()
        )


def _watch_audit(client: Faithlens, audit_id: str, as_json: bool) -> Audit:
    """Follow an audit until it finishes: a rich progress bar over its rows when rich is installed (else one
    line per change); with ``as_json``, its events as JSON lines."""
    try:
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
    except ImportError:
        Progress = None

    if as_json or Progress is None:

        def on_progress(audit: Audit, events: list[AuditEvent]) -> None:
            n = audit.request_counts
            if as_json:
                for event in events:
                    print(event.model_dump_json(), flush=True)
            else:
                print(f"[{audit.status}] {n.completed + n.failed}/{n.total} rows", flush=True)

        return client.audits.wait(audit_id, on_progress=on_progress)
    columns = [
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total} rows"),
        TextColumn("{task.fields[stats]}"),
        TimeElapsedColumn(),
    ]
    with Progress(*columns) as progress:
        task = progress.add_task(audit_id, total=None, stats="")

        def on_progress(audit: Audit, events: list[AuditEvent]) -> None:
            n = audit.request_counts
            stats = audit.status + (f" · {n.failed} failed" if n.failed else "")
            progress.update(task, total=n.total, completed=n.completed + n.failed, stats=stats)

        return client.audits.wait(audit_id, on_progress=on_progress)


def _estimate(value: Any) -> str:
    """``0.123 [0.101, 0.145]`` for a report's ``{mean, ci_low, ci_high}``."""
    if not isinstance(value, dict) or value.get("mean") is None:
        return "–"
    low, high = value.get("ci_low"), value.get("ci_high")
    interval = f" [{low:.3f}, {high:.3f}]" if low is not None and high is not None else ""
    return f"{value['mean']:.3f}{interval}"


def _print_report(report: dict[str, Any]) -> None:
    summary = report.get("summary") or {}
    print(f"{report.get('id')}: {summary.get('n_rows', '?')} rows (means with 95% intervals)")
    for name in ("mean_fai", "mean_waad", "anchor_rate", "preplan_rate", "coupled_pairs", "response_length"):
        if name in summary:
            print(f"  {name:<16} {_estimate(summary[name])}")
    references = summary.get("references")
    if isinstance(references, dict):
        print(
            f"  {'accuracy':<16} {_estimate(references.get('accuracy'))}  ({references.get('n_rows')} rows)"
        )
    if isinstance(report.get("rhythm"), dict):
        _print_rhythm(report["rhythm"])


def _figure(value: Any, interval: Any) -> str:
    """``0.123 [0.101, 0.145]``; ``–`` where undefined."""
    if value is None:
        return "–"
    if isinstance(interval, list) and len(interval) == 2 and None not in interval:
        return f"{value:.3f} [{interval[0]:.3f}, {interval[1]:.3f}]"
    return f"{value:.3f}"


def _print_rhythm(rhythm: dict[str, Any]) -> None:
    """The rhythm study's three statistics with their 95% intervals (the HTML page sets [PA]'s beside)."""
    print(f"rhythm study: {rhythm.get('n')} responses")
    for stat, names in (("A", ("observed", "baseline", "lift")), ("B", ("observed", "baseline", "lift"))):
        figures = rhythm.get(stat) or {}
        intervals = figures.get("ci95") or {}
        parts = [f"{name} {_figure(figures.get(name), intervals.get(name))}" for name in names]
        print(f"  {stat}  " + "  ".join(parts))
    c = rhythm.get("C") or {}
    intervals = c.get("ci95") or {}
    names = ("jaccard_high", "jaccard_low", "share_high_diverges_more")
    parts = [f"{name} {_figure(c.get(name), intervals.get(name))}" for name in names]
    print(f"  C  ({c.get('trials', 0)} trials)  " + "  ".join(parts))


class UsageError(Exception):
    """A request the CLI refuses before sending it (exit status 2)."""


def _messages(prompt: str) -> list[dict[str, Any]]:
    return [{"role": "user", "content": prompt}]


def _check_saliency(client: Faithlens, name: str | None) -> None:
    """``--saliency`` takes any name; the server's ``/v1/capabilities`` says which exist. (A server too old to
    list them judges the name itself.)"""
    if name is None:
        return
    try:
        offered = client.capabilities().saliency_method_names
    except NotFoundError:
        return
    if name not in offered:
        raise UsageError(f"unknown saliency method {name!r}; this server offers: {', '.join(offered)}")


# -- one function per command: (args, client) -> exit status ------------------------------------------------
def cmd_generate(args: argparse.Namespace, client: Faithlens) -> int:
    _check_saliency(client, args.saliency)
    result = client.generate(
        messages=_messages(args.prompt),
        adapter=args.adapter,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        seed=args.seed,
        analysis={},
        saliency=args.saliency,
    )
    print(_dump(result)) if args.json else _print_generation(result)
    return 0


def cmd_analyze(args: argparse.Namespace, client: Faithlens) -> int:
    _check_saliency(client, args.saliency)
    result = client.analyze(
        messages=_messages(args.prompt),
        completion=args.completion,
        adapter=args.adapter,
        saliency=args.saliency,
    )
    print(_dump(result)) if args.json else _print_generation(result)
    return 0


def cmd_audit(args: argparse.Namespace, client: Faithlens) -> int:
    _check_saliency(client, args.saliency)
    report = client.audit(
        messages=_messages(args.prompt),
        completion=args.completion,
        saliency=args.saliency,
        adapter=args.adapter,
        max_new_tokens=args.max_new_tokens,
    )
    report.to_html(args.html)
    print(_dump(report.summary) if args.json else f"wrote {args.html}: {report.summary.num_anchors} anchors")
    return 0


def cmd_models(args: argparse.Namespace, client: Faithlens) -> int:
    models = client.models.list()
    lines = [m.id + (f"  (adapter of {m.parent}, {m.root})" if m.parent else "  (base)") for m in models]
    print(_dump(models) if args.json else "\n".join(lines))
    return 0


def cmd_capabilities(args: argparse.Namespace, client: Faithlens) -> int:
    caps = client.capabilities()
    if args.json:
        print(_dump(caps))
        return 0
    print("saliency methods (--saliency):")
    width = max((len(m.name) for m in caps.saliency_methods), default=0)
    for m in caps.saliency_methods:
        notes = [f"options: {', '.join(m.options)}"] if m.options else []
        notes += [f"cost: {m.cost}"] if m.cost else []
        print(f"  {m.name:<{width}}  {m.description}" + (f"  [{'; '.join(notes)}]" if notes else ""))
    print("credit strategies (jobs create --set credit=...):")
    width = max((len(c.name) for c in caps.credit_strategies), default=0)
    for c in caps.credit_strategies:
        print(f"  {c.name:<{width}}  {c.description}")
    print("data sets (jobs' training_data and validation_data, audits' input):")
    width = max((len(d.name) for d in caps.datasets), default=0)
    for d in caps.datasets:
        print(f"  {d.name:<{width}}  {d.description}  e.g. {d.example}")
    print("granularities:", ", ".join(caps.granularities))
    print("metrics:", ", ".join(caps.metrics))
    return 0


def cmd_adapters_list(args: argparse.Namespace, client: Faithlens) -> int:
    adapters = client.adapters.list()
    print(_dump(adapters) if args.json else "\n".join(f"{a.name}  v{a.version}  {a.path}" for a in adapters))
    return 0


def cmd_adapters_load(args: argparse.Namespace, client: Faithlens) -> int:
    adapter = client.adapters.load(args.name, args.path)
    print(_dump(adapter) if args.json else f"loaded {adapter.name} (v{adapter.version})")
    return 0


def cmd_adapters_unload(args: argparse.Namespace, client: Faithlens) -> int:
    adapter = client.adapters.unload(args.name)
    print(_dump(adapter) if args.json else f"unloaded {adapter.name} (v{adapter.version})")
    return 0


def cmd_jobs_create(args: argparse.Namespace, client: Faithlens) -> int:
    method: dict[str, Any] = {"type": args.method}
    for item in args.set:
        key, _, value = item.partition("=")
        method[key] = _value(value)
    data: str | dict[str, Any] = args.training_data
    if args.training_file:
        with open(args.training_file, encoding="utf-8") as fh:
            data = {"jsonl": fh.read()}
    job = client.jobs.create(
        method=method,
        training_data=data,
        validation_data=args.validation_data,
        adapter_name=args.adapter_name,
        seed=args.seed,
    )
    print(_dump(job) if args.json else f"created {job.id} ({job.status})")
    if args.watch:
        job = _watch(client, job.id, args.json)
        return 0 if job.status == "succeeded" else 1
    return 0


def cmd_jobs_list(args: argparse.Namespace, client: Faithlens) -> int:
    jobs = client.jobs.list(limit=args.limit)
    print(_dump(jobs)) if args.json else _print_jobs(jobs)
    return 0


def cmd_jobs_get(args: argparse.Namespace, client: Faithlens) -> int:
    job = client.jobs.get(args.job_id)
    print(_dump(job)) if args.json else _print_jobs([job])
    return 0


def cmd_jobs_cancel(args: argparse.Namespace, client: Faithlens) -> int:
    job = client.jobs.cancel(args.job_id)
    print(_dump(job) if args.json else f"{job.id}: {job.status}")
    return 0


def cmd_jobs_watch(args: argparse.Namespace, client: Faithlens) -> int:
    job = _watch(client, args.job_id, args.json)
    if not args.json:
        _print_jobs([job])
    return 0 if job.status == "succeeded" else 1


def cmd_audits_create(args: argparse.Namespace, client: Faithlens) -> int:
    _check_saliency(client, args.saliency)
    source: str | dict[str, Any]
    if args.file:
        with open(args.file, encoding="utf-8") as fh:
            source = {"jsonl": fh.read()}
    else:
        source = args.dataset
    metadata = dict(item.partition("=")[::2] for item in args.metadata) or None
    audit = client.audits.create(
        source,
        limit=args.limit,
        adapter=args.adapter,
        saliency=args.saliency,
        sampling={"max_new_tokens": args.max_new_tokens} if args.max_new_tokens else None,
        metadata=metadata,
        reports=args.report or None,
    )
    print(_dump(audit) if args.json else audit.id, flush=True)
    if args.watch:
        audit = _watch_audit(client, audit.id, args.json)
        if not args.json:
            _print_audits([audit])
        return 0 if audit.status == "completed" else 1
    return 0


def cmd_audits_list(args: argparse.Namespace, client: Faithlens) -> int:
    audits = client.audits.list(limit=args.limit)
    print(_dump(audits)) if args.json else _print_audits(audits)
    return 0


def cmd_audits_get(args: argparse.Namespace, client: Faithlens) -> int:
    audit = client.audits.get(args.audit_id)
    print(_dump(audit)) if args.json else _print_audits([audit])
    return 0


def cmd_audits_cancel(args: argparse.Namespace, client: Faithlens) -> int:
    audit = client.audits.cancel(args.audit_id)
    print(_dump(audit) if args.json else f"{audit.id}: {audit.status}")
    return 0


def cmd_audits_watch(args: argparse.Namespace, client: Faithlens) -> int:
    audit = _watch_audit(client, args.audit_id, args.json)
    if not args.json:
        _print_audits([audit])
    return 0 if audit.status == "completed" else 1


def cmd_audits_results(args: argparse.Namespace, client: Faithlens) -> int:
    """One JSON line per row, in input order, written as the server streams them (always JSON)."""
    for row in client.audits.results(args.audit_id):
        sys.stdout.write(row.model_dump_json(by_alias=True, exclude_unset=True) + "\n")
    sys.stdout.flush()
    return 0


def cmd_audits_report(args: argparse.Namespace, client: Faithlens) -> int:
    if args.html:
        page = client.audits.report_html(args.audit_id)
        with open(args.html, "w", encoding="utf-8") as fh:
            fh.write(page)
    report = client.audits.report(args.audit_id)
    if args.json:
        print(_dump(report))
    else:
        _print_report(report.model_dump(mode="json"))
        if args.html:
            print(f"wrote {args.html}")
    return 0


# -- the parser ----------------------------------------------------------------------------------------------
def _global_options(parser: argparse.ArgumentParser, suppress: bool) -> None:
    """``--base-url``, ``--api-key`` and ``--json``, accepted before or after any subcommand. Subcommands
    declare them with ``default=SUPPRESS``, so a value given before the subcommand is not overwritten by the
    subcommand's default."""
    none: Any = argparse.SUPPRESS if suppress else None
    parser.add_argument("--base-url", default=none, help="server URL (default: $FAITHLENS_BASE_URL)")
    parser.add_argument("--api-key", default=none, help="API key (default: $FAITHLENS_API_KEY)")
    parser.add_argument(
        "--json",
        action="store_true",
        default=argparse.SUPPRESS if suppress else False,
        help="machine-readable output",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="faithlens", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    _global_options(parser, suppress=False)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(group: Any, name: str, handler: Any = None, **kwargs: Any) -> argparse.ArgumentParser:
        p = group.add_parser(name, **kwargs)
        _global_options(p, suppress=True)
        if handler is not None:
            p.set_defaults(handler=handler)
        return p

    def prompt_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("prompt", help="the user message (chat template applied)")
        p.add_argument("--adapter")
        p.add_argument("--saliency", metavar="METHOD", help="see `faithlens capabilities`")

    gen = command(sub, "generate", cmd_generate, help="generate an annotated answer")
    prompt_args(gen)
    gen.add_argument("--max-new-tokens", type=int, default=256)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--seed", type=int)
    ana = command(sub, "analyze", cmd_analyze, help="annotate a completion you have")
    prompt_args(ana)
    ana.add_argument("--completion", required=True)
    aud = command(
        sub, "audit", cmd_audit, help="generate (or take --completion) and write the HTML audit view"
    )
    prompt_args(aud)
    aud.add_argument("--completion")
    aud.add_argument("--max-new-tokens", type=int, default=256)
    aud.add_argument("--html", required=True, help="output file")

    jobs = command(sub, "jobs", help="fine-tuning jobs").add_subparsers(
        dest="action", required=True, metavar="ACTION"
    )
    create = command(jobs, "create", cmd_jobs_create, help="start a job")
    create.add_argument("--adapter-name", required=True)
    create.add_argument("--method", choices=["grpo", "atmanrl"], default="grpo")
    create.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a hyperparameter")
    create.add_argument("--training-file", help="a JSONL file of {question, answer}")
    create.add_argument(
        "--training-data", default="gsm8k-train", help="a data set's name (see `faithlens capabilities`)"
    )
    create.add_argument(
        "--validation-data",
        help="a data set evaluated every eval_steps (--set eval_steps=N), e.g. a heldout split",
    )
    create.add_argument("--seed", type=int, default=0)
    create.add_argument("--watch", action="store_true")
    command(jobs, "list", cmd_jobs_list, help="recent jobs").add_argument("--limit", type=int, default=20)
    for name, handler, text in (
        ("get", cmd_jobs_get, "one job"),
        ("watch", cmd_jobs_watch, "follow a job until it finishes"),
        ("cancel", cmd_jobs_cancel, "stop a job"),
    ):
        command(jobs, name, handler, help=text).add_argument("job_id")

    audits = command(sub, "audits", help="audits of whole datasets").add_subparsers(
        dest="action", required=True, metavar="ACTION"
    )
    acreate = command(audits, "create", cmd_audits_create, help="audit a dataset (prints the audit id)")
    source = acreate.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--file", help="a JSONL file, one row per line: {id?, prompt | messages, completion?, reference?}"
    )
    source.add_argument("--dataset", help="a server dataset: gsm8k-dev or gsm8k-train")
    acreate.add_argument("--limit", type=int, help="the dataset's first N rows")
    acreate.add_argument("--saliency", metavar="METHOD", help="see `faithlens capabilities`")
    acreate.add_argument("--adapter")
    acreate.add_argument("--max-new-tokens", type=int, help="for rows without a completion")
    acreate.add_argument("--metadata", action="append", default=[], metavar="KEY=VALUE")
    acreate.add_argument(
        "--report",
        action="append",
        metavar="NAME",
        help="a report to build: summary (the default), rhythm (the preplan-and-anchor study); repeatable",
    )
    acreate.add_argument("--watch", action="store_true", help="follow it with a progress bar until it ends")
    command(audits, "list", cmd_audits_list, help="recent audits").add_argument(
        "--limit", type=int, default=20
    )
    for name, handler, text in (
        ("get", cmd_audits_get, "one audit"),
        ("watch", cmd_audits_watch, "follow an audit until it finishes"),
        ("cancel", cmd_audits_cancel, "stop an audit (finished rows keep their results)"),
        ("results", cmd_audits_results, "one JSON line per row, in input order (> out.jsonl)"),
    ):
        command(audits, name, handler, help=text).add_argument("audit_id")
    areport = command(audits, "report", cmd_audits_report, help="the report of a completed audit")
    areport.add_argument("audit_id")
    areport.add_argument("--html", metavar="FILE", help="also write the HTML report page to FILE")

    adapters = command(sub, "adapters", help="served adapters").add_subparsers(
        dest="action", required=True, metavar="ACTION"
    )
    command(adapters, "list", cmd_adapters_list, help="loaded adapters")
    load = command(adapters, "load", cmd_adapters_load, help="load (or reload) an adapter")
    load.add_argument("name")
    load.add_argument("path", help="inside the server's adapter store")
    command(adapters, "unload", cmd_adapters_unload, help="unload an adapter").add_argument("name")
    command(sub, "models", cmd_models, help="the base model and adapters")
    command(
        sub,
        "capabilities",
        cmd_capabilities,
        help="the saliency methods, credit strategies, ... the server offers",
    )
    study = command(sub, "study", help="studies run as jobs on the server's workers").add_subparsers(
        dest="action", required=True, metavar="STUDY"
    )
    credit = command(study, "credit", cmd_study_credit, help="credit strategies arm against arm (spec §12)")
    credit.add_argument("--out", required=True, type=Path, help="the study's folder (resumable; commit it)")
    credit.add_argument("--task", default="arith-add:1-50", help="a synthetic task (its /train and /heldout)")
    credit.add_argument(
        "--arms", default="none,coupled", help="credit strategies, comma-separated; with none"
    )
    credit.add_argument("--seeds", default="0,1,2", help="comma-separated")
    credit.add_argument("--max-steps", type=int, default=50)
    credit.add_argument(
        "--eval-steps", type=int, default=25, help="evaluate every this many steps (and at 0)"
    )
    credit.add_argument("--method", choices=["grpo", "atmanrl"], default="grpo")
    credit.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="a shared hyperparameter"
    )
    credit.add_argument("--smoke", action="store_true", help="2 arms × 1 seed × 2 steps, tiny settings (CI)")
    credit.add_argument("--report-only", action="store_true", help="rewrite the report from the runs held")
    credit.add_argument("--retry-failed", action="store_true", help="resubmit runs whose job did not succeed")
    return parser


def _credit_grid(args: argparse.Namespace) -> CreditGrid:
    hyper = dict(DEFAULT_HYPERPARAMETERS)
    if args.smoke:
        args.task, args.arms, args.seeds, args.max_steps, args.eval_steps = (
            "arith-add:1-15",
            "none,coupled",
            "0",
            2,
            1,
        )
        hyper.update(SMOKE_HYPERPARAMETERS)
    for item in args.set:
        key, _, value = item.partition("=")
        hyper[key] = _value(value)
    try:
        return CreditGrid(
            task=args.task,
            arms=[a.strip() for a in args.arms.split(",") if a.strip()],
            seeds=[int(s) for s in args.seeds.split(",") if s.strip()],
            max_steps=args.max_steps,
            eval_steps=args.eval_steps,
            hyperparameters=hyper,
            method=args.method,
        )
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def cmd_study_credit(args: argparse.Namespace, client: Faithlens) -> int:
    folder = StudyFolder(args.out)
    if args.report_only:
        grid = folder.grid()
    else:
        grid = _credit_grid(args)
        try:
            run_grid(
                client,
                folder,
                grid,
                log=lambda line: print(line, file=sys.stderr, flush=True),
                retry_failed=args.retry_failed,
            )
        except ValueError as exc:  # another grid in that folder
            raise UsageError(str(exc)) from None
    rep = report(grid, folder.results())
    (folder.root / "report.json").write_text(json.dumps(rep, indent=1))
    (folder.root / "report.html").write_text(render_report_html(rep), encoding="utf-8")
    if args.json:
        print(json.dumps(rep, indent=2))
    else:
        print(f"study {rep['study_id']}: {rep['runs']['succeeded']}/{rep['runs']['planned']} runs succeeded")
        print(f"{'arm':<16}{'step':>6}{'seeds':>7}{'accuracy':>10}{'− none':>9}  95% CI")
        for r in rep["accuracy"]:
            ci = "" if r.get("diff_low") is None else f"[{r['diff_low']:+.3f}, {r['diff_high']:+.3f}]"
            diff = "" if r.get("diff") is None else f"{r['diff']:+.3f}"
            acc = "–" if r["accuracy"] is None else f"{r['accuracy']:.3f}"
            print(f"{r['arm']:<16}{r['step']:>6}{r['seeds']:>7}{acc:>10}{diff:>9}  {ci}")
        print(f"report: {folder.root / 'report.json'}, {folder.root / 'report.html'}")
    return 0 if rep["runs"]["succeeded"] == rep["runs"]["planned"] else 1


def run(args: argparse.Namespace, client: Faithlens) -> int:
    return args.handler(args, client)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        with Faithlens(base_url=args.base_url, api_key=args.api_key) as client:
            return run(args, client)
    except (FaithlensError, UsageError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
