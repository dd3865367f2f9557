"""Serving, on one server in one run.

Part ``batching``: eight concurrent clients against eight sequential requests. Reports wall time for each
mode (and their ratio: the batching gain), p50/p95 request latency, generated tokens/s, and the cost of
annotation per request (the same requests with ``analysis: {}``).

Part ``latency``: does a heavy analysis freeze the streams? Four streaming clients' inter-token latency
(p50, p95) idle and while one exact-AtMan analysis of about 512 tokens runs, and that analysis' own time
alone and under the streams' load. Targets: p95 under the analysis ≤ 4× idle; the analysis under load ≤ 2×
alone.

    python bench/serve.py --part batching                 # tiny model (target: ratio ≤ 0.6)
    python bench/serve.py --part latency --model smollm   # the engine issue's targets
    python bench/serve.py --model smollm --device cuda    # on a GPU (the server gets FAITHLENS_DEVICE)
    python bench/serve.py --smoke                         # CI: tiny sizes, proves both parts run

``--model`` is ``tiny`` (the default), ``smollm`` (the embedded SmolLM2), an HF directory or a .gguf
path; ``--device`` and ``--dtype`` reach the server as ``FAITHLENS_DEVICE`` and ``FAITHLENS_DTYPE`` (the
tiny model is float32 whatever ``--dtype`` says, in the server as in the engine part).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import ROOT, absolute_model, add_model_args, load_bench_model, machine, print_table
from faithlens.tiny import save_tiny
from tests.servers import start_server

DEV = ROOT.parent / "shared" / "data" / "gsm8k" / "dev.jsonl"


def model_arg(model: str | None) -> str | None:
    """``--model``: ``smollm`` (and nothing) mean the embedded SmolLM2 (None)."""
    return None if model in (None, "smollm") else absolute_model(model)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def bodies(n: int, new_tokens: int, analysis: bool) -> list[dict]:
    out = []
    for i in range(n):
        body = {
            "prompt": f"Request {i}: tell me about the number {i * 7}.",
            "max_new_tokens": new_tokens,
            "chat": True,
        }
        if analysis:
            body["analysis"] = {}
        out.append(body)
    return out


async def one(client: httpx.AsyncClient, body: dict) -> tuple[float, int]:
    started = time.perf_counter()
    r = await client.post("/v1/generate", json=body)
    r.raise_for_status()
    return time.perf_counter() - started, r.json()["usage"]["completion_tokens"]


async def sequential(url: str, requests: list[dict]) -> tuple[float, list[float], int]:
    async with httpx.AsyncClient(base_url=url, timeout=600) as c:
        started = time.perf_counter()
        results = [await one(c, body) for body in requests]
    return time.perf_counter() - started, [r[0] for r in results], sum(r[1] for r in results)


async def concurrent(url: str, requests: list[dict]) -> tuple[float, list[float], int]:
    async with httpx.AsyncClient(base_url=url, timeout=600) as c:
        started = time.perf_counter()
        results = await asyncio.gather(*(one(c, body) for body in requests))
    return time.perf_counter() - started, [r[0] for r in results], sum(r[1] for r in results)


def analysis_text(target_chars: int) -> tuple[str, str]:
    """A GSM8K dev question and worked answers run together to about ``target_chars`` characters, ending
    with the last answer's ``#### N`` line (so the saliency target is the answer)."""
    rows = [json.loads(line) for line in DEV.read_text().splitlines()[:40]]
    question, parts = rows[0]["question"], []
    for row in rows:
        parts.append(row["answer"].split("####")[0].strip())
        if sum(len(p) for p in parts) >= target_chars:
            break
    return question, "\n".join(parts) + "\n#### " + rows[0]["answer"].split("####")[1].strip()


async def stream_once(
    client: httpx.AsyncClient, prompt: str, max_tokens: int, gaps: list[tuple[float, float]]
):
    """One streamed completion; records (arrival time, gap since the previous token chunk)."""
    body = {"prompt": prompt, "max_tokens": max_tokens, "stream": True, "temperature": 0}
    previous = None
    async with client.stream("POST", "/v1/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            choices = json.loads(line[6:]).get("choices") or []
            if not choices or not choices[0].get("text"):
                continue
            now = time.perf_counter()
            if previous is not None:
                gaps.append((now, now - previous))
            previous = now


async def streamers(url: str, clients: int, max_tokens: int, stop: asyncio.Event, rounds: int | None):
    """``clients`` loops of streamed completions, until ``stop`` is set (or ``rounds`` each)."""
    gaps: list[tuple[float, float]] = []

    async def loop(i: int) -> None:
        async with httpx.AsyncClient(base_url=url, timeout=600) as c:
            done = 0
            while not stop.is_set() and (rounds is None or done < rounds):
                await stream_once(
                    c, f"Client {i}, round {done}: write a long story about numbers.", max_tokens, gaps
                )
                done += 1

    await asyncio.gather(*(loop(i) for i in range(clients)))
    return gaps


async def analyse(url: str, body: dict) -> tuple[float, int]:
    async with httpx.AsyncClient(base_url=url, timeout=3600) as c:
        started = time.perf_counter()
        r = await c.post("/v1/analyze", json=body)
        r.raise_for_status()
        return time.perf_counter() - started, r.json()["usage"]["total_tokens"]


async def under_load(url: str, clients: int, max_tokens: int, body: dict):
    stop = asyncio.Event()
    load = asyncio.create_task(streamers(url, clients, max_tokens, stop, None))
    await asyncio.sleep(1.0)  # the streams are flowing
    started = time.perf_counter()
    seconds, tokens = await analyse(url, body)
    ended = time.perf_counter()
    stop.set()
    gaps = await load
    return seconds, tokens, [gap for at, gap in gaps if started <= at <= ended]


def engine_part(args) -> None:
    """The same measurement without HTTP, in this process: four rows decode on the one decode path, and
    after each step the analysis gets its slice, exactly as the engine thread schedules them. It separates
    the engine's policy from the HTTP layer and the benchmark's own clients, which share the cores."""
    from faithlens.analysis import analyze
    from faithlens.batching import DecodeBatch, SequenceState
    from faithlens.params import SaliencyParams, SamplingParams
    from faithlens.slicing import SlicedRun, install_checkpoints

    lm = load_bench_model(model_arg(args.model), args.device, args.dtype)
    install_checkpoints(lm.model)
    question, completion = analysis_text(args.analysis_chars)
    prompt, response = lm.prompt_ids(question, chat=True), lm.completion_ids(completion)
    saliency = SaliencyParams(method="atman", granularity=args.granularity)
    share = args.analysis_share or 2.0

    def batch() -> DecodeBatch:
        b = DecodeBatch(lm, slots=args.streams, max_context=4096)  # rows run until the bench stops them
        for i in range(args.streams):
            ids = lm.prompt_ids(f"Client {i}: write a long story about numbers.", chat=True)
            b.add(
                SequenceState(ids, SamplingParams(max_new_tokens=100_000 if args.model != "tiny" else 3000))
            )
        return b

    idle_batch, steps = batch(), []
    for _ in range(64):
        started = time.perf_counter()
        idle_batch.step()
        steps.append(time.perf_counter() - started)
    started = time.perf_counter()
    analyze(lm, prompt, response, saliency=saliency)
    alone = time.perf_counter() - started
    loaded_batch, run, turns, overshoot = (
        batch(),
        SlicedRun(lambda: analyze(lm, prompt, response, saliency=saliency)),
        [],
        0.0,
    )
    started = time.perf_counter()
    while True:
        turn = time.perf_counter()
        loaded_batch.step()
        budget = max(share * (time.perf_counter() - turn) - overshoot, 0.0)
        sliced = time.perf_counter()
        done = run.run_slice(budget)
        overshoot = min(max(time.perf_counter() - sliced - budget, 0.0), 1.0)
        turns.append(time.perf_counter() - turn)
        if done:
            break
    loaded = time.perf_counter() - started
    print_table(
        f"The engine's schedule without HTTP: {args.streams} rows decoding, one exact-AtMan analysis of "
        f"{len(prompt) + len(response)} tokens (granularity {args.granularity}, share {share}, {args.model})",
        ["mode", "step p50 ms", "step p95 ms", "analysis s"],
        [
            ["decode steps idle", percentile(steps, 0.5) * 1e3, percentile(steps, 0.95) * 1e3, "-"],
            ["decode step + slice", percentile(turns, 0.5) * 1e3, percentile(turns, 0.95) * 1e3, "-"],
            ["analysis alone", "-", "-", alone],
            ["analysis between the steps", "-", "-", loaded],
        ],
    )
    print(
        f"\nengine: p95 token gap during the analysis / idle: {percentile(turns, 0.95) / percentile(steps, 0.95):.2f}"
    )
    print(f"engine: analysis between steps / alone: {loaded / alone:.2f}")


def latency_part(url: str, args) -> None:
    question, completion = analysis_text(args.analysis_chars)
    saliency = {"method": "atman", "granularity": args.granularity}
    body = {"prompt": question, "completion": completion, "chat": True, "analysis": {"saliency": saliency}}
    asyncio.run(streamers(url, 1, 4, asyncio.Event(), 1))  # warm-up
    idle: list[float] = []
    alone: list[float] = []
    loaded: list[float] = []
    during: list[float] = []
    tokens = 0
    for _ in range(args.repeats):  # interleaved, so drift hits every mode alike
        idle += [
            gap
            for _, gap in asyncio.run(streamers(url, args.streams, args.stream_tokens, asyncio.Event(), 2))
        ]
        seconds, tokens = asyncio.run(analyse(url, body))
        alone.append(seconds)
        seconds, tokens, gaps = asyncio.run(under_load(url, args.streams, args.stream_tokens, body))
        loaded.append(seconds)
        during += gaps
    rows = [
        ["streams idle", percentile(idle, 0.5) * 1e3, percentile(idle, 0.95) * 1e3, len(idle), "-"],
        [
            "streams during the analysis",
            percentile(during, 0.5) * 1e3,
            percentile(during, 0.95) * 1e3,
            len(during),
            "-",
        ],
        ["analysis alone", "-", "-", "-", statistics.median(alone)],
        ["analysis under the streams", "-", "-", "-", statistics.median(loaded)],
    ]
    print_table(
        f"Inter-token latency of {args.streams} streaming clients and one exact-AtMan analysis of {tokens} tokens "
        f"(granularity {args.granularity}, {args.model} model, {args.repeats} round(s))",
        ["mode", "ITL p50 ms", "ITL p95 ms", "gaps", "analysis s"],
        rows,
    )
    itl_ratio = percentile(during, 0.95) / percentile(idle, 0.95)
    analysis_ratio = statistics.median(loaded) / statistics.median(alone)
    print(f"\np95 ITL during the analysis / idle: {itl_ratio:.2f} (target ≤ 4)")
    # Tokens that reach the client together show as one long gap and one near zero: count the latter.
    coalesced = [100 * sum(g < 0.02 for g in gaps) / max(len(gaps), 1) for gaps in (idle, during)]
    print(f"gaps under 20 ms (coalesced tokens): idle {coalesced[0]:.1f}%, during {coalesced[1]:.1f}%")
    print(f"analysis under load / alone: {analysis_ratio:.2f} (target ≤ 2)")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_model_args(parser, default="tiny")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3, help="alternating rounds of each mode")
    parser.add_argument("--part", choices=["batching", "latency", "engine", "all"], default="all")
    parser.add_argument("--streams", type=int, default=4, help="latency: streaming clients")
    parser.add_argument("--stream-tokens", type=int, default=64, help="latency: tokens per streamed request")
    parser.add_argument("--analysis-chars", type=int, default=900, help="latency: ≈ 512 SmolLM2 tokens")
    parser.add_argument("--granularity", choices=["token", "word", "sentence"], default="sentence")
    parser.add_argument("--analysis-share", type=float, default=None, help="FAITHLENS_ANALYSIS_SHARE")
    parser.add_argument("--torch-threads", type=int, default=None, help="FAITHLENS_TORCH_THREADS")
    parser.add_argument("--omp-wait-policy", choices=["PASSIVE", "ACTIVE"], default=None)
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args()
    if args.smoke:
        args.model = "tiny"
        args.new_tokens, args.repeats, args.clients = 8, 1, 4
        args.stream_tokens, args.analysis_chars = 8, 200
    print("machine:", machine())
    print(f"model: {args.model}, device {args.device}, dtype {args.dtype}")
    if args.part in ("engine", "all"):
        engine_part(args)
    if args.part == "engine":
        return
    work = Path(tempfile.mkdtemp(prefix="faithlens-bench-serve-"))
    model = model_arg(args.model)
    server = start_server(
        work,
        save_tiny(work / "tiny-llama") if model == "tiny" else (Path(model) if model else None),
        FAITHLENS_DEVICE=args.device,
        # the tiny model is float32, as load_bench_model makes it for the engine part
        FAITHLENS_DTYPE="float32" if model == "tiny" else args.dtype,
        FAITHLENS_MAX_BATCH_SIZE=str(max(8, args.clients)),
        FAITHLENS_LOG_LEVEL="WARNING",
        FAITHLENS_MAX_ANALYSIS_COST="1e9",  # the benchmark chooses its analysis; the limit is not measured
        FAITHLENS_ANALYSIS_TIMEOUT_S="3600",
        **({"OMP_WAIT_POLICY": args.omp_wait_policy} if args.omp_wait_policy else {}),
        **({"FAITHLENS_ANALYSIS_SHARE": str(args.analysis_share)} if args.analysis_share else {}),
        **({"FAITHLENS_TORCH_THREADS": str(args.torch_threads)} if args.torch_threads else {}),
    )
    try:
        if args.part in ("latency", "all"):
            latency_part(server.url, args)
        if args.part == "latency":
            return
        batching_part(server.url, args)
    finally:
        server.stop()


def batching_part(url: str, args) -> None:
    plain = bodies(args.clients, args.new_tokens, analysis=False)
    annotated = bodies(args.clients, args.new_tokens, analysis=True)
    asyncio.run(sequential(url, plain[:2]))  # warm-up
    rows: dict[str, list[tuple[float, list[float], int]]] = {"seq": [], "conc": [], "seq+ann": []}
    for _ in range(args.repeats):  # interleaved, so drift hits every mode alike
        rows["seq"].append(asyncio.run(sequential(url, plain)))
        rows["conc"].append(asyncio.run(concurrent(url, plain)))
        rows["seq+ann"].append(asyncio.run(sequential(url, annotated)))

    def summary(name: str, label: str) -> list:
        runs = rows[name]
        wall = statistics.median(r[0] for r in runs)
        latencies = [lat for r in runs for lat in r[1]]
        tokens = statistics.median(r[2] for r in runs)
        return [label, wall, percentile(latencies, 0.5), percentile(latencies, 0.95), tokens / wall]

    table = [
        summary("seq", f"{args.clients} sequential"),
        summary("conc", f"{args.clients} concurrent"),
        summary("seq+ann", f"{args.clients} sequential, annotated"),
    ]
    print_table(
        f"Serving, {args.model} model, {args.clients} requests × {args.new_tokens} new tokens "
        f"(median of {args.repeats} rounds)",
        ["mode", "wall s", "p50 latency s", "p95 latency s", "tokens/s"],
        table,
    )
    ratio = table[1][1] / table[0][1]
    annotation = (table[2][1] - table[0][1]) / args.clients
    print(f"\nconcurrent / sequential wall time: {ratio:.2f} (target ≤ 0.6 on the tiny model)")
    print(
        f"annotation cost per request: {annotation:+.3f} s ({table[2][1] / table[0][1]:.2f}× the plain wall time)"
    )


if __name__ == "__main__":
    main()
