"""Shared benchmark plumbing: machine record, isolated runs with peak-RSS measurement, tables."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from faithlens.model import LoadedModel

ROOT = Path(__file__).resolve().parent.parent


def machine() -> dict[str, Any]:
    """What the figures were measured on."""
    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
        mem_kb = int(Path("/proc/meminfo").read_text().split()[1])
        info["memory_gib"] = round(mem_kb / 2**20, 1)
    except OSError:
        pass
    return info


def reset_peak_rss() -> float:
    """Reset this process's peak RSS (Linux VmHWM) and return the current RSS in MiB."""
    # Not Linux, or not allowed: the peak then includes model loading.
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")
    return current_rss_mib()


def peak_rss_mib() -> float:
    """Peak RSS since the last reset (VmHWM), in MiB."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def current_rss_mib() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def run_isolated(script: Path, *args: str, timeout: float = 1800) -> dict[str, Any]:
    """Run ``script --worker ARGS`` in a fresh process (so peak RSS is its own); it prints one JSON line."""
    out = subprocess.run(
        [sys.executable, str(script), "--worker", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
    )
    if out.returncode != 0:
        raise RuntimeError(f"{script.name} {' '.join(args)} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def on_cuda(device: torch.device | str | None) -> bool:
    """Whether a timer must synchronise: ``device`` is a CUDA device (None: whenever CUDA is present)."""
    if device is None:
        return torch.cuda.is_available()
    return torch.device(device).type == "cuda" and torch.cuda.is_available()


def timed(fn: Callable[[], Any], device: torch.device | str | None = None) -> tuple[Any, float]:
    """``fn()`` and its wall time; on a CUDA ``device`` the queued kernels are waited for either side."""
    cuda = on_cuda(device)
    if cuda:
        torch.cuda.synchronize(device)
    started = time.perf_counter()
    result = fn()
    if cuda:
        torch.cuda.synchronize(device)
    return result, time.perf_counter() - started


def reset_peak_memory(device: torch.device | str) -> float:
    """Reset the peak of the memory a model on ``device`` uses (CUDA: the caching allocator's allocated
    bytes; CPU: this process's RSS) and return the current figure in MiB."""
    if on_cuda(device):
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device) / 2**20
    return reset_peak_rss()


def peak_memory_mib(device: torch.device | str) -> float:
    """The peak since :func:`reset_peak_memory` on ``device``, in MiB."""
    if on_cuda(device):
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) / 2**20
    return peak_rss_mib()


def memory_kind(device: torch.device | str) -> str:
    """What :func:`peak_memory_mib` measures on ``device``, for table titles."""
    return "CUDA allocated" if on_cuda(device) else "RSS"


def print_table(title: str, header: list[str], rows: list[list[Any]]) -> None:
    print(f"\n## {title}\n")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(f"{v:.2f}" if isinstance(v, float) else str(v) for v in row) + " |")


# ---------------------------------------------------------------- the model under test


def add_model_args(parser: argparse.ArgumentParser, default: str | None = None) -> None:
    """``--model``, ``--device`` and ``--dtype``, the same in every benchmark."""
    parser.add_argument(
        "--model",
        default=default,
        help="'tiny' (a random tiny Llama), an HF directory or a .gguf path; default: the embedded SmolLM2",
    )
    parser.add_argument("--device", default="auto", help="auto (cuda when present), cpu or cuda")
    parser.add_argument(
        "--dtype", default="auto", help="auto (bfloat16 on cuda, float32 on cpu), float32, ..."
    )


def absolute_model(model: str | None) -> str | None:
    """``--model`` for a subprocess that runs from the repository root: an existing path made absolute;
    None, 'tiny' and other names unchanged."""
    if model is None or model == "tiny" or not Path(model).expanduser().exists():
        return model
    return str(Path(model).expanduser().resolve())


def load_bench_model(model: str | None, device: str = "auto", dtype: str = "auto") -> LoadedModel:
    """The model a benchmark measures: 'tiny' (always float32) or anything ``load_model`` reads."""
    from faithlens.model import load_model, pick_device
    from faithlens.settings import get_core_settings
    from faithlens.tiny import tiny_loaded_model

    if model == "tiny":
        return tiny_loaded_model("llama", device=pick_device(device))
    return load_model(model, device=device, dtype=dtype, cache_dir=get_core_settings().cache_dir)
