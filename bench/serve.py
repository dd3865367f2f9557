"""Serving: eight concurrent clients against eight sequential requests, on one server in one run.

Reports wall time for each mode (and their ratio: the batching gain), p50/p95 request latency, generated
tokens/s, and the cost of annotation per request (the same requests with ``analysis: {}``).

    python bench/serve.py                      # tiny model (the acceptance target: ratio ≤ 0.6)
    python bench/serve.py --model smollm       # the embedded SmolLM2
    python bench/serve.py --smoke              # CI: tiny sizes, proves it runs
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import machine, print_table
from faithlens.tiny import save_tiny
from tests.servers import start_server


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


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", choices=["tiny", "smollm"], default="tiny")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3, help="alternating rounds of each mode")
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args()
    if args.smoke:
        args.new_tokens, args.repeats, args.clients = 8, 1, 4
    print("machine:", machine())
    work = Path(tempfile.mkdtemp(prefix="faithlens-bench-serve-"))
    model = save_tiny(work / "tiny-llama") if args.model == "tiny" else None
    server = start_server(
        work, model, FAITHLENS_MAX_BATCH_SIZE=str(max(8, args.clients)), FAITHLENS_LOG_LEVEL="WARNING"
    )
    try:
        plain = bodies(args.clients, args.new_tokens, analysis=False)
        annotated = bodies(args.clients, args.new_tokens, analysis=True)
        asyncio.run(sequential(server.url, plain[:2]))  # warm-up
        rows: dict[str, list[tuple[float, list[float], int]]] = {"seq": [], "conc": [], "seq+ann": []}
        for _ in range(args.repeats):  # interleaved, so drift hits every mode alike
            rows["seq"].append(asyncio.run(sequential(server.url, plain)))
            rows["conc"].append(asyncio.run(concurrent(server.url, plain)))
            rows["seq+ann"].append(asyncio.run(sequential(server.url, annotated)))
    finally:
        server.stop()

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
