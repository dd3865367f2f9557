"""Audit throughput: rows per second for the same GSM8K dev rows (generate up to N tokens, then FAI, WAAD
and flags), side by side in one run:

* a client looping over ``/v1/generate`` with ``analysis`` on one server (the peer: what a user does
  without audits);
* an audit on one worker with one torch thread;
* the same audit on two workers with one thread each.

Each mode runs against the same server and a private Redis; workers start before the audit is created
(their first shard loads the model, about 0.5 s from the cache). Target: two workers ≥ 1.7× the rows per
second of one.

    python bench/audit.py                  # SmolLM2, 64 dev rows, up to 128 new tokens
    python bench/audit.py --rows 32        # half the rows
    python bench/audit.py --device cuda    # server and workers on a GPU (FAITHLENS_DEVICE/_DTYPE)
    python bench/audit.py --smoke          # tiny model, 4 rows, 8 tokens (CI)

``--model`` (``tiny``, an HF directory or a .gguf path; default: the embedded SmolLM2), ``--device`` and
``--dtype`` reach the server and the workers as ``FAITHLENS_MODEL``, ``FAITHLENS_DEVICE`` and
``FAITHLENS_DTYPE`` (the tiny model is float32 whatever ``--dtype`` says, as in the other benchmarks).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import uuid
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import absolute_model, add_model_args, machine, print_table
from faithlens.data import load_gsm8k
from faithlens.tiny import save_tiny
from tests.servers import start_server
from tests.test_audits import start_workers
from tests.test_job_store import private_redis

ANALYSIS = {"metrics": ["fai", "waad", "flags"]}


def client_loop(url: str, rows: int, new_tokens: int) -> float:
    """Seconds for one client to generate and annotate every row, one request at a time."""
    problems = load_gsm8k("dev", limit=rows)
    started = time.perf_counter()
    with httpx.Client(base_url=url, timeout=3600) as c:
        for problem in problems:
            body = {
                "messages": [{"role": "user", "content": problem.question}],
                "max_new_tokens": new_tokens,
                "analysis": ANALYSIS,
            }
            r = c.post("/v1/generate", json=body)
            r.raise_for_status()
    return time.perf_counter() - started


def audit_run(
    url: str, env: dict, work: Path, workers: int, rows: int, new_tokens: int
) -> tuple[float, dict]:
    """Seconds from creating the audit to its completion, with ``workers`` worker processes."""
    running = start_workers(env, work, workers)
    try:
        with httpx.Client(base_url=url, timeout=60) as c:
            body = {
                "input": "gsm8k-dev",
                "limit": rows,
                "sampling": {"max_new_tokens": new_tokens},
                "analysis": ANALYSIS,
            }
            started = time.perf_counter()
            r = c.post("/v1/audits", json=body)
            r.raise_for_status()
            audit_id = r.json()["id"]
            while True:
                audit = c.get(f"/v1/audits/{audit_id}").json()
                if audit["status"] in {"completed", "failed", "cancelled"}:
                    break
                time.sleep(0.2)
            seconds = time.perf_counter() - started
    finally:
        for worker in running:
            worker.stop()
    if audit["status"] != "completed" or audit["request_counts"]["failed"]:
        raise SystemExit(f"the audit did not complete cleanly: {json.dumps(audit)[:2000]}")
    return seconds, audit


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--shard-size", type=int, default=4)
    parser.add_argument("--smoke", action="store_true")
    add_model_args(parser)
    args = parser.parse_args()
    if args.smoke:
        args.model = "tiny"
        args.rows, args.new_tokens, args.shard_size = 4, 8, 1
    print("machine:", json.dumps(machine()))
    print(f"model: {args.model or 'embedded SmolLM2'}, device {args.device}, dtype {args.dtype}")
    work = Path(tempfile.mkdtemp(prefix="faithlens-bench-audit-"))
    tiny = args.model == "tiny"
    model = (
        save_tiny(work / "tiny-llama") if tiny else (Path(absolute_model(args.model)) if args.model else None)
    )
    suffix = uuid.uuid4().hex[:8]
    with private_redis(work / "redis") as url:
        server = start_server(
            work,
            model,  # FAITHLENS_MODEL (unset: the embedded SmolLM2)
            REDIS_URL=url,
            # server.env carries these to the workers too
            FAITHLENS_DEVICE=args.device,
            FAITHLENS_DTYPE="float32" if tiny else args.dtype,
            FAITHLENS_LOG_LEVEL="WARNING",
            FAITHLENS_AUDIT_QUEUE=f"faithlens-audits-bench-{suffix}",
            FAITHLENS_JOB_QUEUE=f"faithlens-jobs-bench-{suffix}",
            FAITHLENS_AUDIT_SHARD_SIZE=str(args.shard_size),
            FAITHLENS_MAX_AUDIT_ROW_COST="1e9",
        )
        # the workers: one torch thread each, so that two of them use the machine's two cores
        env = {
            **server.env,
            "FAITHLENS_TORCH_THREADS": "1",
            "FAITHLENS_WORKER_CONCURRENCY": "1",
            "FAITHLENS_LOG_LEVEL": "INFO",  # start_workers waits for the worker's "ready" line
        }
        try:
            loop_s = client_loop(server.url, args.rows, args.new_tokens)
            print(f"client loop: {loop_s:.1f} s", flush=True)
            one_s, _ = audit_run(server.url, env, work, 1, args.rows, args.new_tokens)
            print(f"one worker: {one_s:.1f} s", flush=True)
            two_s, _ = audit_run(server.url, env, work, 2, args.rows, args.new_tokens)
            print(f"two workers: {two_s:.1f} s", flush=True)
        finally:
            server.stop()
    model_name = "tiny-llama" if tiny else (model.name if model else "SmolLM2-135M-Instruct")
    model_name += f" ({args.device}, {'float32' if tiny else args.dtype})"
    rate = {name: args.rows / s for name, s in (("loop", loop_s), ("one", one_s), ("two", two_s))}
    print_table(
        f"Audit throughput, {model_name}: {args.rows} GSM8K dev rows, up to {args.new_tokens} new tokens, "
        f"then FAI/WAAD/flags (shards of {args.shard_size})",
        ["mode", "seconds", "rows/s"],
        [
            ["client loop over /v1/generate + analysis, one server", loop_s, rate["loop"]],
            ["audit, one worker × 1 thread", one_s, rate["one"]],
            ["audit, two workers × 1 thread", two_s, rate["two"]],
        ],
    )
    print(f"\ntwo workers / one worker (rows/s): {rate['two'] / rate['one']:.2f} (target ≥ 1.7)")
    print(f"one worker / client loop (rows/s): {rate['one'] / rate['loop']:.2f}")


if __name__ == "__main__":
    main()
