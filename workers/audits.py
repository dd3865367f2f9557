"""Run one audit shard: its rows, in order, each generated (when it has no completion), analysed and
checked against its reference, then written in one step with the shard's ``done`` marker
(:meth:`jobs.audits.AuditStore.finish_shard`). Knows nothing of Celery.

A row runs exactly as ``/v1/analyze`` (a completion given) or ``/v1/generate`` with ``analysis`` (none
given) run it: the prompt encoded by :func:`faithlens.model.encode_prompt` (the chat template for
``messages``), the response by :func:`faithlens.model.encode_completion` or decoded by
:func:`faithlens.generation.generate` (the one decode path), the annotations by
:func:`faithlens.analysis.analyze`, presented as the server presents them. What one row gets wrong (too
long, too costly, empty, options that do not fit it) is that row's ``error``; the audit goes on.

An audit that asks for the ``rhythm`` report also runs the rhythm study (spec §11,
:mod:`faithlens.study`) on each analysed row, with the row's adapter, and keeps it with the row's result.

The worker process keeps its model (and the adapters it attached) between shards. The last shard to
finish moves the audit to ``finalizing``, builds the reports asked for (``summary``:
:func:`faithlens.report.summarize`; ``rhythm``: :func:`faithlens.study.pool_rhythm`) and completes it; a
redelivered finished shard only re-checks that, so an audit whose finaliser died is finalised by the next
delivery.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from functools import partial
from typing import Any

import torch

from faithlens import cost, lora
from faithlens.analysis import analyze
from faithlens.answer import gsm8k_correct
from faithlens.generation import generate
from faithlens.model import LoadedModel, encode_completion, encode_prompt, load_model, unwrap
from faithlens.params import AnalysisParams, SaliencyParams, SamplingParams
from faithlens.schema import Analysis
from faithlens.settings import CoreSettings
from jobs.audits import (
    TERMINAL,
    Audit,
    AuditErrors,
    AuditRowError,
    AuditStore,
    ShardAlreadyDone,
    shard_bounds,
)
from jobs.journal import inside
from jobs.models import IllegalTransition
from jobs.store import PREFIX
from workers.runner import Heartbeat, WorkerSettings

log = logging.getLogger("faithlens.worker")

_MODELS: dict[str, LoadedModel] = {}
_ATTACHED: dict[str, set[str]] = {}
_THREADS_SET = False
RHYTHM_EXAMPLES = 3  # example rows (tokens and peaks) the rhythm report keeps for its HTML page
_LOCK = threading.Lock()


class ShardBusy(Exception):
    """Another live worker holds this shard's lease: come back later."""

    def __init__(self, retry_in: int) -> None:
        super().__init__(f"shard leased by another worker; retry in {retry_in}s")
        self.retry_in = retry_in


class RowError(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message


def set_threads(core: CoreSettings, concurrency: int) -> None:
    """One torch thread per concurrent slot on this machine's cores, unless FAITHLENS_TORCH_THREADS says."""
    global _THREADS_SET
    if _THREADS_SET:
        return
    if core.torch_threads is not None:
        torch.set_num_threads(core.torch_threads)
    else:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, concurrency)))
    _THREADS_SET = True


def cached_model(core: CoreSettings) -> LoadedModel:
    """This process's model, loaded once and kept between shards (keyed by the model's path)."""
    key = str(core.model or "<embedded>")
    with _LOCK:
        lm = _MODELS.get(key)
        if lm is None:
            lm = _MODELS[key] = load_model(core.model, core.device, core.dtype, core.cache_dir)
        return lm


def _adapter(lm: LoadedModel, core: CoreSettings, path: str | None) -> str | None:
    """The internal name of the adapter at ``path`` (inside the store), attached once per process."""
    if path is None:
        return None
    full = inside(core.adapters, path)  # read from Redis: re-checked before it names a path
    internal = "audit-" + hashlib.sha256(str(full).encode()).hexdigest()[:16]
    attached = _ATTACHED.setdefault(lm.name, set())
    if internal not in attached:
        lora.attach(lm, full, internal, max_rank=core.max_lora_rank)
        attached.add(internal)
    return internal


def _row_prompt_ids(lm: LoadedModel, row: dict, limit: int) -> list[int]:
    messages = row.get("messages")
    if messages is not None:
        messages = [{"role": m["role"], "content": _content(m["content"])} for m in messages]
    try:
        ids = encode_prompt(lm.tokenizer, row.get("prompt"), messages, bool(row.get("chat", False)))
    except Exception as exc:  # a template that refuses these messages
        raise RowError("invalid_row", f"the prompt could not be encoded: {exc}"[:500]) from exc
    if not ids:
        raise RowError("invalid_row", "the prompt is empty after tokenisation")
    if len(ids) >= limit:
        raise RowError("context_length_exceeded", f"the prompt has {len(ids)} tokens; the limit is {limit}")
    return ids


def _content(content: Any) -> str:
    if isinstance(content, str):
        return content
    return "".join(part.get("text", "") for part in content if part.get("type") == "text")


def run_row(
    lm: LoadedModel,
    row: dict,
    spec: dict[str, Any],
    audit: Audit,
    adapter: str | None,
    max_cost: float,
    index: int = 0,
) -> dict[str, Any]:
    """One row's result: ``{text, annotations, correct, error, rhythm}`` (``error`` set, the rest null,
    when the row could not be analysed). ``rhythm`` is the row's rhythm study (spec §11,
    :func:`faithlens.study.study_response`) when the audit asks for that report, else null; ``index`` is the
    row's place in the audit, which seeds the study's permutations (whichever shard runs the row)."""
    context = int(getattr(unwrap(lm.model).config, "max_position_embeddings", 0) or 1 << 30)
    options = spec["analysis"]
    params = AnalysisParams.model_validate(
        {k: options[k] for k in AnalysisParams.model_fields if k in options}
    )
    saliency = None
    if "saliency" in options["metrics"]:
        saliency = SaliencyParams.model_validate(options.get("saliency") or {})
    try:
        params.resolved_layers(lm.num_layers)
    except ValueError as exc:
        raise RowError("invalid_request", str(exc)) from exc
    prompt_ids = _row_prompt_ids(lm, row, context)
    rhythm = "rhythm" in audit.reports
    response_ids, text = _response(
        lm, row, spec, prompt_ids, context, saliency, adapter, max_cost, rhythm=rhythm
    )
    try:
        with lora.active(lm, adapter):  # as the engine runs an analysis: exactly this adapter on
            analysis = analyze(lm, prompt_ids, response_ids, params, saliency=saliency)
    except ValueError as exc:  # options that do not fit this sequence
        raise RowError("invalid_request", str(exc)[:1000]) from exc
    analysis = analysis.presented(options["metrics"], audit.model, audit.adapter)  # as the server does
    correct = None
    reference = row.get("reference")
    if reference is not None:
        correct = gsm8k_correct(text, str(reference))
    study = _rhythm(lm, prompt_ids, response_ids, index, adapter, correct) if rhythm else None
    return {
        "text": text,
        "annotations": analysis.to_json_dict(),
        "correct": correct,
        "error": None,
        "rhythm": study,
    }


def _rhythm(
    lm: LoadedModel,
    prompt_ids: list[int],
    response_ids: list[int],
    index: int,
    adapter: str | None,
    correct: bool | None,
) -> dict[str, Any]:
    """The row's rhythm study (with the row's correctness), run as its analysis ran: exactly the audit's
    adapter on."""
    from faithlens.study import RhythmConfig, study_response

    try:
        with lora.active(lm, adapter):
            study = study_response(
                lm, prompt_ids, response_ids, index=index, config=RhythmConfig(), adapter=adapter
            )
    except ValueError as exc:  # a sequence the study cannot take, as analyze() refuses one
        raise RowError("invalid_request", f"rhythm study: {exc}"[:1000]) from exc
    study.correct = correct
    return study.to_json()


def _response(
    lm: LoadedModel,
    row: dict,
    spec: dict[str, Any],
    prompt_ids: list[int],
    context: int,
    saliency: SaliencyParams | None,
    adapter: str | None,
    max_cost: float,
    rhythm: bool = False,
) -> tuple[list[int], str]:
    """The response's ids and text: generated (the one decode path; adapters by name, as the engine's
    batch runs them) when the row has no completion, else the row's completion, encoded."""
    completion = row.get("completion")
    if completion is None:
        sampling = SamplingParams.model_validate(spec["sampling"])
        if len(prompt_ids) + sampling.max_new_tokens > context:
            raise RowError(
                "context_length_exceeded",
                f"prompt ({len(prompt_ids)}) + max_new_tokens ({sampling.max_new_tokens}) exceeds the "
                f"model's context of {context} tokens",
            )
        bound = [" x"] * (len(prompt_ids) + sampling.max_new_tokens)
        _check_cost(bound, len(prompt_ids), saliency, max_cost, bound=True, rhythm=rhythm)
        generation = generate(lm, prompt_ids, sampling, adapter)
        if not generation.token_ids:
            raise RowError("empty_response", "the model generated no tokens to analyse")
        return generation.token_ids, generation.text
    response_ids = encode_completion(lm.tokenizer, completion)
    if not response_ids:
        raise RowError("invalid_row", "the completion is empty after tokenisation")
    total = len(prompt_ids) + len(response_ids)
    if total > context:
        raise RowError(
            "context_length_exceeded", f"prompt + completion is {total} tokens; the limit is {context}"
        )
    texts = [lm.tokenizer.decode([i]) for i in [*prompt_ids, *response_ids]]
    _check_cost(texts, len(prompt_ids), saliency, max_cost, bound=False, rhythm=rhythm)
    return response_ids, lm.tokenizer.decode(response_ids)


def _check_cost(
    texts: list[str],
    prompt_len: int,
    saliency: SaliencyParams | None,
    limit: float,
    bound: bool,
    rhythm: bool = False,
) -> None:
    """As the engine's ``_check_analysis`` (plus the rhythm study, if asked), against
    FAITHLENS_MAX_AUDIT_ROW_COST."""
    if bound and saliency is not None:
        saliency = saliency.model_copy(update={"target": [len(texts) - 1], "granularity": "token"})
    try:
        estimate = cost.analysis_cost(texts, prompt_len, saliency, rhythm)
    except ValueError as exc:
        raise RowError("invalid_request", str(exc)[:1000]) from exc
    if estimate > limit:
        raise RowError(
            "analysis_too_costly",
            f"the analysis would cost about {estimate:,.0f} forward-token units; the limit is {limit:,.0f} "
            "(FAITHLENS_MAX_AUDIT_ROW_COST)",
        )


def run_shard(
    audit_id: str,
    shard: int,
    worker: str,
    lease_id: str | None = None,
    concurrency: int = 1,
    settings: WorkerSettings | None = None,
) -> str:
    """Run shard ``shard`` of the audit on ``worker`` (its hostname, recorded with the shard's runs and
    its ``done`` marker); ``lease_id`` tells this delivery apart (default: ``worker``)."""
    settings = settings or WorkerSettings.from_env()
    store = AuditStore(settings.queue.redis, patient=True)
    audit = store.get(audit_id)
    if audit is None:
        log.warning("unknown audit", extra={"audit": str(audit_id)[:64]})
        return "missing"
    if not 0 <= shard < audit.shards:
        log.error("refused a shard number", extra={"audit": audit_id, "shard": shard})
        return "refused"
    if store.shard_done(audit_id, shard) is not None:  # a redelivered finished shard
        maybe_finalize(store, audit_id)
        return "done"
    if audit.status in TERMINAL:
        return audit.status
    ttl, lease_id = settings.queue.job_lease_ttl_s, lease_id or worker
    if not store.take_lease(audit_id, shard, lease_id, ttl):
        raise ShardBusy(ttl)
    if store.shard_done(audit_id, shard) is not None:  # finished by its lease holder meanwhile
        store.release_lease(audit_id, shard, lease_id)
        maybe_finalize(store, audit_id)
        return "done"
    try:
        renew, take = (
            partial(f, audit_id, shard, lease_id, ttl) for f in (store.renew_lease, store.take_lease)
        )
        with Heartbeat(renew, take, ttl, {"audit": audit_id, "shard": shard}) as heartbeat:
            return _run_leased(store, audit, shard, worker, concurrency, settings, heartbeat)
    finally:
        store.release_lease(audit_id, shard, lease_id)
        if store.cancel_requested(audit_id):
            finish_cancel(store, audit_id)


def _run_leased(
    store: AuditStore,
    audit: Audit,
    shard: int,
    worker: str,
    concurrency: int,
    settings: WorkerSettings,
    heartbeat: Heartbeat,
) -> str:
    if store.cancel_requested(audit.id):
        return "cancelled"
    if audit.status == "validating":
        with contextlib.suppress(IllegalTransition):
            store.set_status(audit.id, "in_progress")
    runs = store.record_run(audit.id, shard, worker)
    store.event(
        audit.id,
        f"shard {shard} started on {worker}" + (f" (run {runs})" if runs > 1 else ""),
        data={"shard": shard, "worker": worker, "run": runs},
    )
    spec = store.spec(audit.id)
    total = store.row_count(audit.id)
    start, end = shard_bounds(total, spec["shard_size"], shard)
    rows = store.rows(audit.id, start, end)
    core = settings.core
    set_threads(core, concurrency)
    try:
        lm = cached_model(core)
        adapter = _adapter(lm, core, spec.get("adapter_path"))
    except Exception as exc:  # no model (or adapter) to run with: no row can run
        message = f"{type(exc).__name__}: {exc}"[:2000]
        log.exception("audit model load failed", extra={"audit": audit.id})
        _fail(store, audit.id, "model_load_failed", message)
        return "failed"
    results: dict[int, dict] = {}
    for offset, row in enumerate(rows):
        if heartbeat.lost:
            return "lease_lost"
        if store.cancel_requested(audit.id):
            store.event(audit.id, f"shard {shard} stopped: the audit was cancelled", data={"shard": shard})
            return "cancelled"
        index = start + offset
        started = time.perf_counter()
        try:
            result = run_row(lm, row, spec, audit, adapter, settings.queue.max_audit_row_cost, index)
        except RowError as exc:
            result = _failed_row(exc.code, exc.message)
        except Exception as exc:  # one row's crash is that row's error; the audit goes on
            log.exception("audit row crashed", extra={"audit": audit.id, "row": index})
            result = _failed_row("row_error", f"{type(exc).__name__}: {exc}"[:1000])
        result["seconds"] = round(time.perf_counter() - started, 4)
        results[index] = result
    try:
        store.finish_shard(audit.id, shard, worker, results)
    except ShardAlreadyDone:
        store.event(audit.id, f"shard {shard} was already finished; this run's results dropped", level="warn")
        return "done"
    maybe_finalize(store, audit.id)
    return "finished"


def _failed_row(code: str, message: str) -> dict[str, Any]:
    return {"text": None, "annotations": None, "correct": None, "error": {"code": code, "message": message}}


def _fail(store: AuditStore, audit_id: str, code: str, message: str) -> None:
    try:
        store.set_status(
            audit_id, "failed", errors=AuditErrors(data=[AuditRowError(code=code, message=message)])
        )
        store.event(audit_id, f"failed: {message}", level="error")
    except IllegalTransition:
        pass


def finish_cancel(store: AuditStore, audit_id: str) -> None:
    """A cancelling audit whose shards no worker holds any more is cancelled."""
    audit = store.get(audit_id)
    if audit is None or audit.status != "cancelling" or store.leases_held(audit_id, audit.shards):
        return
    try:
        store.set_status(audit_id, "cancelled")
        store.event(audit_id, "cancelled")
    except IllegalTransition:
        pass


def maybe_finalize(store: AuditStore, audit_id: str) -> None:
    """When every shard is done: ``finalizing``, the reports, ``completed``. Safe to call twice."""
    audit = store.get(audit_id)
    if audit is None or audit.status in TERMINAL or audit.status == "cancelling":
        return
    if store.done_shards(audit_id, audit.shards) < audit.shards:
        return
    if audit.status != "finalizing":
        try:
            store.set_status(audit_id, "finalizing")
        except IllegalTransition:
            return
    try:
        report = build_report(store, audit)
    except Exception as exc:
        log.exception("audit report failed", extra={"audit": audit_id})
        _fail(store, audit_id, "report_failed", f"{type(exc).__name__}: {exc}"[:2000])
        return
    store.set_report(audit_id, report)
    try:
        store.set_status(audit_id, "completed")
        store.event(audit_id, "completed")
    except IllegalTransition:
        pass


def build_report(store: AuditStore, audit: Audit) -> dict[str, Any]:
    """The reports the audit asked for, from its results read in chunks: ``summary``
    (:func:`faithlens.report.summarize`) and ``rhythm`` (:func:`faithlens.study.pool_rhythm` over the rows'
    studies, plus up to :data:`RHYTHM_EXAMPLES` example rows for the HTML page)."""
    from faithlens.report import RowOutcome, summarize

    summary, rhythm = "summary" in audit.reports, "rhythm" in audit.reports
    outcomes, studies, examples = [], [], []
    for index, result in _analysed(store, audit.id):
        if summary:
            analysis = Analysis.model_validate(result["annotations"])
            outcomes.append(RowOutcome(analysis=analysis, correct=result.get("correct")))
        if rhythm and result.get("rhythm") is not None:
            studies.append(result["rhythm"])
            if len(examples) < RHYTHM_EXAMPLES:
                examples.append(_rhythm_example(index, result))
    report: dict[str, Any] = {}
    if summary:
        report["summary"] = summarize(outcomes).model_dump(mode="json")
    if rhythm:
        report["rhythm"] = _rhythm_report(studies, examples)
    return report


def _analysed(store: AuditStore, audit_id: str, chunk: int = 500) -> Iterator[tuple[int, dict]]:
    """(row index, result) of every analysed row, in input order, read ``chunk`` rows at a time."""
    total = store.row_count(audit_id)
    for start in range(0, total, chunk):
        indices = list(range(start, min(start + chunk, total)))
        for index, result in zip(indices, store.results(audit_id, indices), strict=True):
            if result is not None and result.get("annotations") is not None:
                yield index, result


def _rhythm_example(index: int, result: dict) -> dict[str, Any]:
    study = result["rhythm"]
    return {
        "index": index,
        "tokens": [token["text"] for token in result["annotations"]["tokens"]],
        "waad_peaks": list(study.get("waad_peaks") or []),
        "fai_peaks": list(study.get("fai_peaks") or []),
    }


def _rhythm_report(studies: list[dict], examples: list[dict]) -> dict[str, Any]:
    from faithlens.study import ResponseRhythm, RhythmConfig, pool_rhythm

    rows = [ResponseRhythm.from_json(s) for s in studies]
    return {**pool_rhythm(rows, RhythmConfig()).to_json(), "examples": examples}


def reap_audits(
    store: AuditStore, send: Callable[[str, int], None], queue: str, grace_s: float = 10.0
) -> list[tuple[str, int]]:
    """The reaper's audit pass (each worker runs it with the jobs' one, workers/app.py): every unfinished
    shard of a running audit that no worker holds and no message carries (waiting in ``queue`` or
    reserved by a worker) gets a fresh message; an audit whose shards are all done is finalised, and a
    cancelling one that no worker holds any more is cancelled. Returns the shards re-sent. Re-sending is
    safe: a shard runs under its lease, and a finished one's message is a no-op."""
    from jobs.reaper import UNACKED_KEY

    resent: list[tuple[str, int]] = []
    pending: list[str] | None = None
    now = time.time()
    for audit_id in store.redis.zrange(f"{PREFIX}audits", 0, -1):
        audit = store.get(audit_id)
        if audit is None or audit.status in TERMINAL or now - audit.created_at < grace_s:
            continue
        if audit.status == "cancelling":
            finish_cancel(store, audit_id)
            continue
        if store.done_shards(audit_id, audit.shards) == audit.shards:
            maybe_finalize(store, audit_id)
            continue
        if pending is None:
            raw = [*store.redis.lrange(queue, 0, -1), *store.redis.hvals(UNACKED_KEY)]
            pending = [m if isinstance(m, str) else m.decode(errors="replace") for m in raw]
        for shard in range(audit.shards):
            if store.shard_done(audit_id, shard) is not None or store.lease_holder(audit_id, shard):
                continue
            marker = f"'{audit_id}', {shard}]"  # the message's argsrepr: ['<id>', <shard>]
            if any(marker in message for message in pending):
                continue
            store.event(audit_id, f"shard {shard} re-sent: its message was lost", level="warn")
            send(audit_id, shard)
            resent.append((audit_id, shard))
    if resent:
        log.warning("audit shards re-sent", extra={"shards": resent})
    return resent
