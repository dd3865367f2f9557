"""Audits at dataset scale, shaped like OpenAI's Batch API: create, list, get, cancel, events (with an SSE
follow mode), results (NDJSON, one line per row in input order) and the report (JSON or HTML).

Creation checks everything it can before anything is queued: the input (inline rows, an uploaded JSONL
file, or a dataset name), the row count (FAITHLENS_MAX_AUDIT_ROWS), the reports asked for, the sampling
limits, and every row's analysis cost, estimated as the engine estimates it (:mod:`faithlens.cost`;
generated rows at their longest, most costly form) against FAITHLENS_MAX_AUDIT_ROW_COST. The server then
stores the rows and sends one message per shard; it never runs audit work itself (workers/audits.py does).
What only running a row can find (a prompt too long for the model, options that do not fit it) is that
row's ``error`` in the results, and the audit goes on.

An audit belongs to the key that created it, exactly as a job does (service/routes/jobs.py): an ``infer``
key sees only its own audits (another's is a 404), ``admin`` keys see every one.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import HTMLResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from faithlens import cost
from faithlens.data import UnknownDataset, check_dataset, dataset_unavailable, load_dataset
from faithlens.engine import EngineError, Prompt
from faithlens.model import encode_completion, encode_prompt
from faithlens.params import SamplingParams
from faithlens.schema import Analysis
from faithlens.settings import get_core_settings
from jobs.audits import (
    REPORTS,
    RUN_AUDIT_SHARD_TASK,
    TERMINAL,
    Audit,
    AuditEvent,
    AuditStatus,
    AuditStore,
    RequestCounts,
    new_audit_id,
    shard_count,
)
from jobs.journal import inside
from jobs.models import IllegalTransition
from service.auth import Principal, require
from service.errors import APIError
from service.openai_schemas import _inline, event_stream
from service.routes.native import ERRORS
from service.schemas import AnalysisOptions, ErrorResponse, Message, PromptInput
from service.state import ServerState, get_state

router = APIRouter(prefix="/v1/audits", tags=["audits"], responses=ERRORS)


class AuditRow(PromptInput):
    """One input row: ``prompt`` (raw text; ``chat`` wraps it in the chat template) or ``messages``,
    exactly one; ``completion`` to analyse (absent: generated with the audit's ``sampling``);
    ``reference``, a GSM8K answer (``... #### 42``) or a bare number, to score correctness."""

    id: str | None = Field(default=None, max_length=256)
    completion: str | None = None
    reference: str | int | float | None = None


class AuditUpload(BaseModel):
    """A JSONL file's content: one row object per line."""

    model_config = ConfigDict(extra="forbid")
    jsonl: str = Field(min_length=1)


class CreateAuditRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    input: Annotated[list[dict[str, Any]], Field(min_length=1)] | AuditUpload | str = Field(
        description='Inline rows (each an `AuditRow`), `{"jsonl": ...}` (an uploaded file, one `AuditRow` '
        "per line), or a data set's name: `gsm8k-dev`, `gsm8k-train`, or a synthetic task's split such as "
        "`arith-add:1-50/heldout` (`GET /v1/capabilities` lists the tasks)."
    )
    limit: int | None = Field(default=None, ge=1, description="A dataset's first `limit` rows.")
    model: str | None = Field(default=None, description="The served base model (the default).")
    adapter: str | None = Field(default=None, description="A loaded adapter's name; null: the base model.")
    analysis: AnalysisOptions = Field(default_factory=AnalysisOptions)
    sampling: SamplingParams | None = Field(
        default=None, description="How rows without a completion are generated."
    )
    reports: list[str] = Field(
        default=["summary"],
        max_length=8,
        description="Reports to build: `summary` (aggregates with bootstrap intervals) and `rhythm` (the "
        "rhythm study of [PA]'s Tables 1–2 over the rows, docs/api.md).",
    )
    metadata: Annotated[dict[str, Annotated[str, Field(max_length=512)]], Field(max_length=16)] = Field(
        default_factory=dict
    )


class AuditList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Audit]
    has_more: bool


class AuditEventList(BaseModel):
    object: Literal["list"] = "list"
    data: list[AuditEvent]


class AuditStreamEnd(BaseModel):
    """The last JSON event of ``events?follow=true``: the audit's final status."""

    object: Literal["audit"] = "audit"
    status: AuditStatus | None = Field(description="null if the audit was deleted meanwhile.")


class RowErrorBody(BaseModel):
    code: str
    message: str


class AuditResultLine(BaseModel):
    """One line of ``/results``: one input row."""

    id: str
    index: int
    text: str | None = Field(description="The analysed response (generated or given); null on error.")
    annotations: Analysis | None
    correct: bool | None = Field(description="The answer matches `reference`; null without one.")
    error: RowErrorBody | None


class AuditReport(BaseModel):
    """The reports the audit asked for, by name (``summary``: faithlens.report.SummaryReport; ``rhythm``:
    faithlens.study's pooled rhythm study, with up to three example rows); null when not asked for."""

    model_config = ConfigDict(extra="allow")
    id: str
    object: Literal["audit.report"] = "audit.report"
    summary: dict[str, Any] | None = None
    rhythm: dict[str, Any] | None = Field(
        default=None,
        description="Statistics A, B and C with their bootstrap intervals, the B sensitivity grid, "
        "`per_problem` (each row's study) and `examples` (tokens and peaks of up to three rows).",
    )


_STORES: dict[int, AuditStore] = {}


def _store(state: ServerState) -> AuditStore:
    if state.jobs is None:
        raise APIError(503, "audits_unavailable", "audits need Redis: set REDIS_URL")
    store = _STORES.get(id(state.jobs))
    if store is None:
        store = _STORES[id(state.jobs)] = AuditStore.from_client(state.jobs.redis)
    return store


async def _audit(state: ServerState, audit_id: str, caller: Principal) -> Audit:
    """The audit, if it exists and ``caller`` may see it; else 404 (the same 404 either way)."""
    audit = await asyncio.to_thread(_store(state).get, audit_id)
    if audit is None or not caller.may_see(audit.owner):
        raise APIError(404, "not_found", f"no audit {audit_id!r}", "audit_id")
    return audit


def _bad_input(message: str, param: str = "input") -> APIError:
    return APIError(400, "invalid_audit_input", message, param)


def _row(data: Any, line: int) -> AuditRow:
    try:
        return AuditRow.model_validate(data)
    except ValidationError as exc:
        error = exc.errors()[0]
        where = ".".join(str(p) for p in error["loc"])[:100]
        raise _bad_input(f"row {line}: {where + ': ' if where else ''}{error['msg']}") from exc


def _rows(body: CreateAuditRequest, data_dir: Any, max_rows: int) -> tuple[str, list[AuditRow]]:
    """(``input`` as the audit records it, the rows); 400 for a bad file, an unknown data set, or one whose
    file this server does not have (``dataset_unavailable``: its message says where it was looked for)."""
    source = body.input
    if isinstance(source, str):
        try:
            check_dataset(source)
        except UnknownDataset as exc:
            raise APIError(400, "unknown_dataset", str(exc), "input") from None
        if (missing := dataset_unavailable(source, data_dir)) is not None:
            raise APIError(400, "dataset_unavailable", missing, "input")
        try:
            problems = load_dataset(source, limit=body.limit, data_dir=data_dir)
        except (OSError, ValueError) as exc:  # there, but unreadable or not GSM8K rows
            raise APIError(
                400,
                "dataset_unavailable",
                f"data set {source} cannot be read on this server: {type(exc).__name__}: {exc}",
                "input",
            ) from exc
        rows = [
            AuditRow(
                id=f"{source}-{i}", messages=[Message(role="user", content=p.question)], reference=p.answer
            )
            for i, p in enumerate(problems)
        ]
        return source, rows
    if body.limit is not None:
        raise APIError(400, "invalid_request", "`limit` applies to a dataset name only", "limit")
    if isinstance(source, AuditUpload):
        rows = []
        for number, line in enumerate(source.jsonl.splitlines(), start=1):
            if not line.strip():
                continue
            if len(rows) >= max_rows:
                raise _bad_input(
                    f"more than {max_rows} rows; the limit is {max_rows} (FAITHLENS_MAX_AUDIT_ROWS)"
                )
            try:
                data = json.loads(line)
            except ValueError as exc:
                raise _bad_input(f"line {number}: not JSON ({exc})") from exc
            rows.append(_row(data, number))
        if not rows:
            raise _bad_input("the file has no rows")
        return "upload", rows
    if len(source) > max_rows:
        raise _bad_input(f"{len(source)} rows; the limit is {max_rows} (FAITHLENS_MAX_AUDIT_ROWS)")
    return "inline", [_row(data, number) for number, data in enumerate(source, start=1)]


def _sampling(body: CreateAuditRequest, limit: int) -> SamplingParams:
    sampling = body.sampling or SamplingParams()
    if body.sampling is None or "max_new_tokens" not in body.sampling.model_fields_set:
        return sampling.model_copy(update={"max_new_tokens": min(sampling.max_new_tokens, limit)})
    if sampling.max_new_tokens > limit:
        raise APIError(
            400,
            "context_length_exceeded",
            f"max_new_tokens is {sampling.max_new_tokens}; the limit is {limit}",
            "sampling.max_new_tokens",
        )
    return sampling


def _adapter_path(state: ServerState, body: CreateAuditRequest) -> str | None:
    if body.model not in (None, state.model_name):
        raise APIError(
            404, "model_not_found", f"audits run the served base model {state.model_name!r}", "model"
        )
    if body.adapter is None:
        return None
    for version in state.adapters.list():
        if version.name == body.adapter:
            store = get_core_settings().adapters
            return str(inside(store, version.path).relative_to(store.resolve()))
    raise APIError(404, "model_not_found", f"no adapter named {body.adapter!r} is loaded", "adapter")


async def _check_costs(
    state: ServerState,
    rows: list[AuditRow],
    options: AnalysisOptions,
    sampling: SamplingParams,
    limit: float,
    rhythm: bool = False,
) -> None:
    """Every row's analysis (with the rhythm study, when the audit asks for it) estimated as the engine
    estimates it; 400 ``analysis_too_costly`` for the first over ``limit``. A row that cannot even be
    encoded is left to its worker (a per-row error)."""
    lm = getattr(state.engine, "lm", None)
    tokenizers = getattr(state.engine, "_tokenizers", None)
    if lm is None or tokenizers is None:  # another engine: the workers check every row
        return
    try:
        options.to_params().resolved_layers(lm.num_layers)
    except ValueError as exc:
        raise APIError(400, "invalid_request", str(exc), "analysis.layers") from exc
    saliency = options.saliency_params()

    def encode(tok: Any, row: AuditRow) -> tuple[int, list[str]] | None:
        try:
            prompt_ids = encode_prompt(tok, row.prompt, row.message_dicts(), row.chat)
        except Exception:
            return None
        if row.completion is None:
            return len(prompt_ids), [" x"] * (len(prompt_ids) + sampling.max_new_tokens)
        ids = encode_completion(tok, row.completion)
        return len(prompt_ids), [tok.decode([i]) for i in [*prompt_ids, *ids]]

    for number, row in enumerate(rows, start=1):
        if Prompt(row.prompt, row.message_dicts()).characters() > state.settings.max_prompt_chars:
            continue  # too long for any tokenisation here: the row's worker reports it
        encoded = await tokenizers.run(lambda tok, row=row: encode(tok, row))
        if encoded is None:
            continue
        prompt_len, texts = encoded
        salient = saliency
        if row.completion is None and salient is not None:  # at its longest, most costly
            salient = salient.model_copy(update={"target": [len(texts) - 1], "granularity": "token"})
        try:
            estimate = cost.analysis_cost(texts, prompt_len, salient, rhythm)
        except ValueError:
            continue  # options that do not fit this row: its error
        if estimate > limit:
            what = "at most " if row.completion is None else ""
            raise APIError(
                400,
                "analysis_too_costly",
                f"row {number}: the analysis would cost about {what}{estimate:,.0f} forward-token units; the "
                f"limit is {limit:,.0f} (FAITHLENS_MAX_AUDIT_ROW_COST)",
                "analysis",
            )


@router.post("")
async def create_audit(
    body: CreateAuditRequest, request: Request, caller: Annotated[Principal, Depends(require("infer"))]
) -> Audit:
    """Validate the input and options, store the rows and queue their shards; the audit belongs to the
    calling key."""
    state = get_state(request)
    store = _store(state)
    queue = state.queue
    unknown = [name for name in body.reports if name not in REPORTS]
    if unknown or not body.reports:
        raise APIError(
            400,
            "unknown_report",
            f"unknown report {unknown[0]!r}; known: {', '.join(REPORTS)}" if unknown else "ask for a report",
            "reports",
        )
    adapter_path = _adapter_path(state, body)
    sampling = _sampling(body, state.settings.max_new_tokens)
    kind, rows = await asyncio.to_thread(_rows, body, get_core_settings().data_dir, queue.max_audit_rows)
    if len(rows) > queue.max_audit_rows:
        raise _bad_input(f"{len(rows)} rows; the limit is {queue.max_audit_rows} (FAITHLENS_MAX_AUDIT_ROWS)")
    try:
        rhythm = "rhythm" in body.reports
        await _check_costs(state, rows, body.analysis, sampling, queue.max_audit_row_cost, rhythm)
    except EngineError as exc:  # the tokenizer pool is shutting down
        raise APIError(503, "not_ready", str(exc)) from exc
    stored = []
    for index, row in enumerate(rows):
        data = row.model_dump(exclude_none=True, exclude={"messages"})
        if row.messages is not None:
            data["messages"] = row.message_dicts()
        data["id"] = row.id if row.id is not None else f"row-{index}"
        if row.reference is not None:
            data["reference"] = str(row.reference)
        stored.append(data)
    size = queue.audit_shard_size
    audit = Audit(
        id=new_audit_id(),
        model=state.model_name,
        adapter=body.adapter,
        input=kind,
        analysis=body.analysis.model_dump(mode="json"),
        sampling=sampling.model_dump(mode="json"),
        reports=list(dict.fromkeys(body.reports)),
        metadata=body.metadata,
        owner=caller.owner,
        request_counts=RequestCounts(total=len(stored)),
        shards=shard_count(len(stored), size),
        created_at=int(time.time()),
    )
    spec = {
        "analysis": audit.analysis,
        "sampling": audit.sampling,
        "adapter_path": adapter_path,
        "shard_size": size,
    }
    await asyncio.to_thread(store.create, audit, stored, spec)
    for shard in range(audit.shards):
        await asyncio.to_thread(
            state.celery.send_task, RUN_AUDIT_SHARD_TASK, args=[audit.id, shard], queue=queue.audit_queue
        )
    try:
        audit = await asyncio.to_thread(store.set_status, audit.id, "in_progress")
    except IllegalTransition:  # a worker (or a cancel) moved it first
        audit = await asyncio.to_thread(store.get, audit.id) or audit
    return audit


@router.get("")
async def list_audits(
    request: Request,
    caller: Annotated[Principal, Depends(require("infer"))],
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    after: str | None = None,
) -> AuditList:
    """Newest first: the caller's own audits (every audit for an ``admin`` key)."""
    store = _store(get_state(request))
    audits = await asyncio.to_thread(store.list, limit + 1, after, caller.visible_owner)
    return AuditList(data=audits[:limit], has_more=len(audits) > limit)


@router.get("/{audit_id}")
async def get_audit(
    audit_id: str, request: Request, caller: Annotated[Principal, Depends(require("infer"))]
) -> Audit:
    return await _audit(get_state(request), audit_id, caller)


@router.post(
    "/{audit_id}/cancel",
    responses={409: {"model": ErrorResponse, "description": "The audit has already finished."}},
)
async def cancel_audit(
    audit_id: str, request: Request, caller: Annotated[Principal, Depends(require("infer"))]
) -> Audit:
    """The audit becomes ``cancelling``; its workers stop at their next row, and it reads ``cancelled``
    once none is running a shard. Rows finished before keep their results."""
    state = get_state(request)
    store = _store(state)
    await _audit(state, audit_id, caller)
    try:
        audit = await asyncio.to_thread(store.cancel, audit_id)
    except IllegalTransition as exc:
        raise APIError(409, "audit_finished", f"the audit is already {exc.current}", "audit_id") from exc
    await asyncio.to_thread(store.event, audit_id, "cancel requested")
    if not await asyncio.to_thread(store.leases_held, audit_id, audit.shards):
        try:  # no worker is running a shard: nobody else will say it is over
            audit = await asyncio.to_thread(store.set_status, audit_id, "cancelled")
            await asyncio.to_thread(store.event, audit_id, "cancelled")
        except IllegalTransition:
            audit = await asyncio.to_thread(store.get, audit_id) or audit
    return audit


@router.get(
    "/{audit_id}/events",
    response_model=AuditEventList,
    responses={
        200: event_stream(
            AuditEvent,
            AuditStreamEnd,
            documented=(AuditEventList,),
            description="The events; with `follow=true`, an event stream of `AuditEvent` objects, then one "
            "`AuditStreamEnd` when the audit has finished, then `data: [DONE]`.",
        )
    },
)
async def list_events(
    audit_id: str,
    request: Request,
    caller: Annotated[Principal, Depends(require("infer"))],
    follow: bool = False,
    after: Annotated[int, Query(ge=0, le=10**9)] = 0,
) -> AuditEventList | StreamingResponse:
    """All events from index ``after``; with ``follow=true`` an SSE stream that ends, with ``[DONE]``,
    when the audit finishes."""
    state = get_state(request)
    store = _store(state)
    await _audit(state, audit_id, caller)
    if not follow:
        return AuditEventList(data=await asyncio.to_thread(store.events, audit_id, after))

    async def stream() -> AsyncIterator[str]:
        seen = after
        while True:
            events = await asyncio.to_thread(store.events, audit_id, seen)
            for event in events:
                yield f"data: {event.model_dump_json()}\n\n"
            seen += len(events)
            audit = await asyncio.to_thread(store.get, audit_id)
            finished = audit is None or audit.status in TERMINAL
            if finished and not await asyncio.to_thread(store.events, audit_id, seen):
                end = AuditStreamEnd(status=audit.status if audit else None)
                yield f"data: {json.dumps(end.model_dump())}\n\n"
                yield "data: [DONE]\n\n"
                return
            await asyncio.sleep(0.5)

    return StreamingResponse(stream(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


@router.get(
    "/{audit_id}/results",
    response_class=StreamingResponse,
    responses={
        200: {
            "description": "One JSON object (`AuditResultLine`) per line, one line per input row, in input "
            "order. While the audit runs, only the rows of finished shards.",
            "content": {
                "application/x-ndjson": {
                    "itemSchema": _inline(AuditResultLine.model_json_schema(mode="serialization"), set())
                }
            },
        }
    },
)
async def get_results(
    audit_id: str, request: Request, caller: Annotated[Principal, Depends(require("infer"))]
) -> StreamingResponse:
    state = get_state(request)
    store = _store(state)
    audit = await _audit(state, audit_id, caller)

    async def stream() -> AsyncIterator[str]:
        total = await asyncio.to_thread(store.row_count, audit.id)
        for start in range(0, total, 200):
            rows = await asyncio.to_thread(_lines_between, store, audit, start, min(start + 200, total))
            for line in rows:
                yield json.dumps(line) + "\n"

    return StreamingResponse(stream(), media_type="application/x-ndjson")


def _lines_between(store: AuditStore, audit: Audit, start: int, end: int) -> list[dict]:
    rows = store.rows(audit.id, start, end)
    results = store.results(audit.id, list(range(start, start + len(rows))))
    lines = []
    for offset, (row, result) in enumerate(zip(rows, results, strict=True)):
        index = start + offset
        if result is None:
            if audit.status not in TERMINAL:
                continue
            message = f"the audit was {audit.status} before this row ran"
            result = {"error": {"code": "not_processed", "message": message}}
        lines.append(
            {
                "id": row.get("id", f"row-{index}"),
                "index": index,
                "text": result.get("text"),
                "annotations": result.get("annotations"),
                "correct": result.get("correct"),
                "error": result.get("error"),
            }
        )
    return lines


@router.get(
    "/{audit_id}/report",
    responses={
        200: {"content": {"text/html": {"schema": {"type": "string"}}}, "description": "JSON, or HTML."},
        409: {"model": ErrorResponse, "description": "The audit has not completed."},
        501: {
            "model": ErrorResponse,
            "description": "`format=html` on a server without the audit view's files (`ui_unavailable`).",
        },
    },
)
async def get_report(
    audit_id: str,
    request: Request,
    caller: Annotated[Principal, Depends(require("infer"))],
    format: Literal["json", "html"] = "json",
) -> AuditReport:
    """The reports of a completed audit (``summary``: aggregates with bootstrap intervals; ``rhythm``: the
    rhythm study); with ``format=html``, a self-contained page with their figures and a row table."""
    state = get_state(request)
    store = _store(state)
    audit = await _audit(state, audit_id, caller)
    report = await asyncio.to_thread(store.report, audit_id) if audit.status == "completed" else None
    if report is None:
        raise APIError(
            409, "audit_not_completed", f"the audit is {audit.status}; it has no report yet", "audit_id"
        )
    if format == "json":
        return AuditReport(id=audit_id, **report)
    from faithlens.report import SummaryReport
    from service.report_html import render_report

    summary = report.get("summary")
    summary = SummaryReport.model_validate(summary) if summary is not None else None
    total = await asyncio.to_thread(store.row_count, audit_id)
    lines = await asyncio.to_thread(_lines_between, store, audit, 0, total)
    page = await asyncio.to_thread(
        render_report, audit_id, summary, lines, request.app.state.ui_dir, report.get("rhythm")
    )
    return HTMLResponse(page)  # type: ignore[return-value]
