"""The GPU benchmark: every figure of the GPU issues, side by side in one run, on random-initialised
models of published shapes.

Rows, per shape (each a ratio of two things measured here, in this process):

* ``matmul``: the device's own bf16 (CPU: float32) matmul rate, the denominator of every utilisation;
* ``atman``: exact AtMan (512 context tokens, 8 target tokens) against the naive loop (one eager pass
  per context token, bench/atman.py's), both in the model's dtype; its model FLOPs utilisation (counted
  FLOPs of the passes it ran / time / the matmul rate); Spearman ρ of both against the naive loop in
  float32 on the same weights (over ``--reference-positions`` evenly spaced columns), so the share of the
  disagreement that is the model's own arithmetic in bf16 shows beside ours;
* ``atman_grad``: its time against exact AtMan's, and its ρ;
* ``scoring``: the scoring pass (FAI/WAAD/flags) at 2k and 8k tokens against a plain forward (time and
  peak memory above the model);
* ``annotate``: generation of N tokens, and the analysis on top of it;
* ``decode``: one stream at 256/1,024/4,096 tokens of context against HF ``generate`` with a static
  cache (no ``torch.compile``), and 32 streams × 128 new tokens against HF with a batch of 32.

The GRPO step against TRL and the engine's schedule under load are bench/grpo.py's and bench/serve.py's
own (``--device cuda``); docs/gpu.md says how to run all three in one call on the GPU machine.

    python bench/gpu.py out/                                   # GPU machine: every shape, bf16
    python bench/gpu.py out/ --shapes tiny --device cpu --smoke  # CI: proves it runs
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import ROOT, machine, peak_memory_mib, print_table, reset_peak_memory, timed

# The SmolLM2 tokenizer, saved once (``make gpu-bundle``) so that it travels with the working tree; the
# 98 MB GGUF it comes from does not fit in what can travel to the GPU machine.
TOKENIZER_DIR = ROOT / ".gpu" / "tokenizer"


# ---------------------------------------------------------------- shapes


@dataclass(frozen=True)
class Shape:
    """A published architecture's dimensions; the weights are random."""

    arch: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int | None = None  # the vocabulary is the tokenizer's: 49,152 for SmolLM2's


SHAPES = {
    "tiny": Shape("llama", 64, 128, 4, 4, 2),
    "smollm2-135m": Shape("llama", 576, 1536, 30, 9, 3),
    "llama-3.2-3b": Shape("llama", 3072, 8192, 28, 24, 8, 128),
    "qwen3-4b": Shape("qwen3", 2560, 9728, 36, 32, 8, 128),
}
ATMAN_SHAPES = ("tiny", "llama-3.2-3b", "qwen3-4b")  # the targets
DECODE_SHAPES = ("tiny", "smollm2-135m", "llama-3.2-3b")


def tokenizer():
    """SmolLM2's tokenizer from ``TOKENIZER_DIR``, else (CI, no bundle) the tiny models' byte tokenizer."""
    from transformers import AutoTokenizer

    from faithlens.tiny import byte_tokenizer

    if TOKENIZER_DIR.is_dir():
        return AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    return byte_tokenizer()


def save_tokenizer(path: Path) -> None:
    """SmolLM2's tokenizer, read from the embedded GGUF, as a small HF tokenizer directory."""
    from faithlens.model import load_model
    from faithlens.settings import get_core_settings

    lm = load_model(None, device="cpu", dtype="float32", cache_dir=get_core_settings().cache_dir)
    lm.tokenizer.save_pretrained(path)


def build(name: str, device: torch.device, dtype: torch.dtype, tok) -> Any:
    """A random model of ``name``'s shape, initialised on ``device`` directly, wrapped as faithlens
    loads models (the faithlens attention installed)."""
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen3Config

    from faithlens import attention
    from faithlens.model import LoadedModel, ModelSource

    shape = SHAPES[name]
    config_cls = {"llama": LlamaConfig, "qwen3": Qwen3Config}[shape.arch]
    extra = {"head_dim": shape.head_dim} if shape.head_dim else {}
    config = config_cls(
        vocab_size=len(tok),
        hidden_size=shape.hidden,
        intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads,
        max_position_embeddings=8192 + 512,
        tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        **extra,
    )
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.disable_compile = True  # HF would compile a static cache on CUDA: not ours
    attention.install(model)
    label = f"random-{name}"
    return LoadedModel(model, tok, label, ModelSource(label, Path(".")), device, dtype)


# ---------------------------------------------------------------- counting and timing


def forward_flops(config, rows: int, new: int, past: int, head_rows: int) -> float:
    """Multiply-adds × 2 of ``rows`` sequences of ``new`` tokens after ``past`` cached ones: the linear
    layers, the causal part of attention (what a causal kernel needs), and ``head_rows`` rows of the
    output projection."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    q_dim, kv_dim = config.num_attention_heads * head_dim, config.num_key_value_heads * head_dim
    per_layer = (
        config.hidden_size * (2 * q_dim + 2 * kv_dim) + 3 * config.hidden_size * config.intermediate_size
    )
    linear = 2 * rows * new * config.num_hidden_layers * per_layer
    keys = new * past + new * (new + 1) / 2
    attention = 4 * rows * config.num_hidden_layers * q_dim * keys
    return linear + attention + 2 * head_rows * config.hidden_size * config.vocab_size


@contextlib.contextmanager
def counting_flops(lm) -> Iterator[list[float]]:
    """FLOPs of every backbone pass run inside the block (read off its inputs and cache length); the
    output projection is the caller's to add, since exact AtMan projects only its target rows."""
    from faithlens.model import unwrap

    model = unwrap(lm.model)
    backbone = getattr(model, model.base_model_prefix)
    total = [0.0]

    def hook(module, args, kwargs) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        cache = kwargs.get("past_key_values", kwargs.get("cache"))
        past = cache.get_seq_length() if cache is not None else 0
        total[0] += forward_flops(model.config, ids.shape[0], ids.shape[1], past, 0)

    handle = backbone.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield total
    finally:
        handle.remove()


def matmul_rate(device: torch.device, dtype: torch.dtype, size: int) -> float:
    """The best of a few square matmuls, in FLOP/s: what "utilisation" is relative to."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    best = math.inf
    for _ in range(5):
        _, seconds = timed(lambda: a @ b, device)
        best = min(best, seconds)
    return 2 * size**3 / best


def peak_memory(device: torch.device, fn: Callable[[], Any]) -> tuple[float, float]:
    """Seconds, and the peak memory in MiB above what was in use before (CUDA: allocated; CPU: RSS)."""
    before = reset_peak_memory(device)
    _, seconds = timed(fn, device)
    return seconds, peak_memory_mib(device) - before


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    from scipy.stats import spearmanr

    return float(spearmanr(a.tolist(), b.tolist()).statistic)


def random_ids(lm, n: int, seed: int) -> list[int]:
    """``n`` ordinary token ids (no specials): a random model has no use for real text."""
    specials = set(lm.tokenizer.all_special_ids)
    g = torch.Generator().manual_seed(seed)
    ids = [
        i for i in torch.randint(0, len(lm.tokenizer), (2 * n,), generator=g).tolist() if i not in specials
    ]
    return ids[:n]


# ---------------------------------------------------------------- the rows


def atman_rows(lm, args) -> dict[str, Any]:
    """Exact AtMan vs the naive loop (speed, utilisation), their agreement with the float32 loop, and
    atman_grad; the float32 reference runs last, on the same weights cast up."""
    from bench.atman import naive_loop
    from faithlens.params import SaliencyParams
    from faithlens.saliency import compute_saliency

    ids = random_ids(lm, args.context + args.targets, seed=1)
    target = list(range(args.context, len(ids)))
    params = SaliencyParams(target=target)
    warm = ids[: min(64, args.context)]
    compute_saliency(lm, warm, 0, SaliencyParams(target=[len(warm) - 1]))  # warm-up: kernels, allocator
    with counting_flops(lm) as flops:
        ours, t_ours = timed(lambda: compute_saliency(lm, ids, 0, params), lm.device)
    positions = [g[0] for g in ours.groups]
    head = 2 * len(positions) * len(target) * lm.model.config.hidden_size * lm.model.config.vocab_size
    ours_flops = flops[0] + head
    with counting_flops(lm) as flops:
        naive, t_naive = timed(lambda: naive_loop(lm, ids, target, positions, 0.1), lm.device)
    naive_flops = (
        flops[0]
        + 2 * (1 + len(positions)) * len(ids) * lm.model.config.hidden_size * lm.model.config.vocab_size
    )
    grad_params = SaliencyParams(target=target, method="atman_grad")
    grad, t_grad = timed(lambda: compute_saliency(lm, ids, 0, grad_params), lm.device)
    scores = ours.scores[positions]
    row: dict[str, Any] = {
        "context_tokens": len(positions),
        "target_tokens": len(target),
        "ours_s": t_ours,
        "naive_s": t_naive,
        "naive_over_ours": t_naive / t_ours,
        "ours_tflop": ours_flops / 1e12,
        "naive_tflop": naive_flops / 1e12,
        "ours_utilisation": ours_flops / t_ours / args.rate,
        "naive_utilisation": naive_flops / t_naive / args.rate,
        "grad_s": t_grad,
        "exact_over_grad": t_ours / t_grad,
        "rho_grad_vs_exact": spearman(grad.scores[positions], scores),
    }
    if lm.dtype != torch.float32:
        every = max(1, len(positions) // args.reference_positions)
        chosen = list(range(0, len(positions), every))
        cast_parameters(lm.model, torch.float32)  # the same weights, exactly; buffers (RoPE) untouched
        lm32 = replace(lm, dtype=torch.float32)
        reference = naive_loop(lm32, ids, target, [positions[i] for i in chosen], 0.1)
        cast_parameters(lm.model, lm.dtype)
        ours_at, naive_at = scores[chosen], naive[chosen]
        row |= {
            "reference_positions": len(chosen),
            "rho_ours_vs_fp32": spearman(ours_at, reference),
            "rho_naive_vs_fp32": spearman(naive_at, reference),
            "max_abs_diff_ours_vs_fp32": float((ours_at - reference).abs().max()),
            "max_abs_diff_naive_vs_fp32": float((naive_at - reference).abs().max()),
            "max_abs_fp32_score": float(reference.abs().max()),
        }
    else:
        row["max_abs_diff_ours_vs_naive"] = float((scores - naive).abs().max())
    return row


def cast_parameters(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """Cast the weights in place and nothing else: ``model.to(dtype)`` would also round the float32
    rotary frequencies to bf16 on the way back, changing every later row of the run."""
    for parameter in model.parameters():
        parameter.data = parameter.data.to(dtype)


def scoring_rows(lm, args) -> list[dict[str, Any]]:
    """The scoring pass (FAI/WAAD/flags) against a plain forward, at each length."""
    from faithlens.analysis import compute_metrics
    from faithlens.model import unwrap

    rows = []
    for n in args.scoring_lengths:
        ids = random_ids(lm, n, seed=2)
        prompt = n // 8
        tensor = torch.tensor([ids], device=lm.device)

        def plain(tensor=tensor) -> None:
            with torch.inference_mode():
                unwrap(lm.model)(tensor, use_cache=False)

        plain()  # warm-up
        t_plain, m_plain = peak_memory(lm.device, plain)
        t_score, m_score = peak_memory(
            lm.device, lambda ids=ids, prompt=prompt: compute_metrics(lm, ids, prompt)
        )
        rows.append(
            {
                "tokens": n,
                "plain_s": t_plain,
                "scoring_s": t_score,
                "scoring_over_plain": t_score / t_plain,
                "plain_peak_mib": m_plain,
                "scoring_peak_mib": m_score,
            }
        )
    return rows


def annotate_row(lm, args) -> dict[str, Any]:
    """Generation of ``--annotate-tokens`` tokens, then the annotation (scoring pass + flags) on top."""
    from faithlens.analysis import analyze
    from faithlens.generation import generate
    from faithlens.params import SamplingParams

    prompt = random_ids(lm, 64, seed=3)
    n = args.annotate_tokens
    generate(lm, prompt, SamplingParams(max_new_tokens=4))
    forced = SamplingParams(max_new_tokens=n, min_new_tokens=n)
    gen, t_gen = timed(lambda: generate(lm, prompt, forced), lm.device)
    _, t_annotate = timed(lambda: analyze(lm, prompt, gen.token_ids), lm.device)
    return {"tokens": n, "generate_s": t_gen, "annotate_s": t_annotate, "overhead": t_annotate / t_gen}


def decode_rows(lm, args) -> dict[str, Any]:
    """One stream against HF's static-cache ``generate`` per context length, and many streams."""
    from bench.decode import hf_static_ms_per_token, ours_ms_per_token, prompt_of

    single = []
    for length in args.decode_lengths:
        prompt = prompt_of(lm, length)
        ours_ms_per_token(lm, prompt, 2)
        hf_static_ms_per_token(lm, prompt, 2)
        ours, ours_tokens = ours_ms_per_token(lm, prompt, args.decode_steps)
        hf, hf_tokens = hf_static_ms_per_token(lm, prompt, args.decode_steps)
        single.append(
            {
                "context": length,
                "ours_ms_per_token": ours,
                "hf_static_ms_per_token": hf,
                "hf_over_ours": hf / ours,
                "same_tokens": ours_tokens == hf_tokens,
            }
        )
    return {"single": single, "streams": streams_row(lm, args)}


def streams_row(lm, args) -> dict[str, Any]:
    """``--streams`` prompts of 128 tokens decoding ``--stream-tokens`` each: ours in one DecodeBatch
    (run once untimed, so its CUDA graphs are captured, then timed on the same batch), HF's ``generate``
    with a static cache over the same batch."""
    from bench.decode import prompt_of
    from faithlens.batching import DecodeBatch, SequenceState
    from faithlens.params import SamplingParams

    n, new = args.streams, args.stream_tokens
    prompts = [prompt_of(lm, 128, seed=s) for s in range(n)]
    params = SamplingParams(max_new_tokens=new, min_new_tokens=new)
    batch = DecodeBatch(lm, slots=n, max_context=128 + new)

    def ours() -> None:
        for p in prompts:
            batch.add(SequenceState(p, params))
        while len(batch):
            batch.step()

    ours()
    _, t_ours = timed(ours, lm.device)
    ids = torch.tensor(prompts, device=lm.device)

    def hf(new: int = new) -> None:
        with torch.inference_mode():
            lm.model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=new,
                min_new_tokens=new,
                do_sample=False,
                cache_implementation="static",
                pad_token_id=lm.tokenizer.pad_token_id,
            )

    hf(2)  # warm-up, as ours had: the static cache's first allocation and kernels
    _, t_hf = timed(hf, lm.device)
    return {
        "streams": n,
        "new_tokens": new,
        "ours_tokens_per_s": n * new / t_ours,
        "hf_static_tokens_per_s": n * new / t_hf,
        "ours_over_hf": t_hf / t_ours,
    }


# ---------------------------------------------------------------- the run


def run_shape(name: str, rows: set[str], args) -> dict[str, Any]:
    lm = build(name, args.device, args.dtype, args.tokenizer)
    params = sum(p.numel() for p in lm.model.parameters())
    print(f"\n# {lm.name}: {params / 1e9:.2f} B parameters, {lm.dtype}, {lm.device}", flush=True)
    out: dict[str, Any] = {"parameters": params}
    if "atman" in rows and name in args.atman_shapes:
        out["atman"] = atman_rows(lm, args)
    if "scoring" in rows and name in args.atman_shapes:
        out["scoring"] = scoring_rows(lm, args)
    if "annotate" in rows and name in args.decode_shapes:
        out["annotate"] = annotate_row(lm, args)
    if "decode" in rows and name in args.decode_shapes:
        out["decode"] = decode_rows(lm, args)
    del lm
    if args.device.type == "cuda":
        torch.cuda.empty_cache()
    return out


def report(results: dict[str, Any]) -> None:
    shapes = results["shapes"]
    atman = [(n, s["atman"]) for n, s in shapes.items() if "atman" in s]
    if atman:
        print_table(
            f"exact AtMan, {atman[0][1]['context_tokens']} context × {atman[0][1]['target_tokens']} target tokens "
            f"(matmul rate {results['matmul_tflops']:.0f} TFLOP/s)",
            ["shape", "ours s", "naive s", "naive/ours", "ours util", "naive util", "ρ ours/fp32",
             "ρ naive/fp32", "max|Δ| ours", "max|Δ| naive", "max|fp32|", "grad s", "exact/grad", "ρ grad"],
            [
                [n, a["ours_s"], a["naive_s"], a["naive_over_ours"], f"{a['ours_utilisation']:.0%}",
                 f"{a['naive_utilisation']:.0%}", a.get("rho_ours_vs_fp32", "-"), a.get("rho_naive_vs_fp32", "-"),
                 a.get("max_abs_diff_ours_vs_fp32", a.get("max_abs_diff_ours_vs_naive")),
                 a.get("max_abs_diff_naive_vs_fp32", "-"), a.get("max_abs_fp32_score", "-"), a["grad_s"],
                 a["exact_over_grad"], a["rho_grad_vs_exact"]]
                for n, a in atman
            ],
        )  # fmt: skip
    scoring = [(n, r) for n, s in shapes.items() for r in s.get("scoring", [])]
    if scoring:
        print_table(
            "scoring pass (FAI/WAAD/flags) vs a plain forward",
            ["shape", "tokens", "plain s", "scoring s", "scoring/plain", "plain peak MiB", "scoring peak MiB"],
            [[n, r["tokens"], r["plain_s"], r["scoring_s"], r["scoring_over_plain"], r["plain_peak_mib"],
              r["scoring_peak_mib"]] for n, r in scoring],
        )  # fmt: skip
    annotate = [(n, s["annotate"]) for n, s in shapes.items() if "annotate" in s]
    if annotate:
        print_table(
            "annotation on top of generation",
            ["shape", "tokens", "generate s", "annotate s", "annotate/generate"],
            [[n, a["tokens"], a["generate_s"], a["annotate_s"], a["overhead"]] for n, a in annotate],
        )
    decode = [(n, s["decode"]) for n, s in shapes.items() if "decode" in s]
    if decode:
        print_table(
            "decode, one stream: ms per token",
            ["shape", "context", "ours", "HF static", "HF/ours", "same tokens"],
            [[n, r["context"], r["ours_ms_per_token"], r["hf_static_ms_per_token"], r["hf_over_ours"],
              r["same_tokens"]] for n, d in decode for r in d["single"]],
        )  # fmt: skip
        print_table(
            "decode, many streams: tokens per second",
            ["shape", "streams × new tokens", "ours", "HF static", "ours/HF"],
            [[n, f"{d['streams']['streams']} × {d['streams']['new_tokens']}", d["streams"]["ours_tokens_per_s"],
              d["streams"]["hf_static_tokens_per_s"], d["streams"]["ours_over_hf"]] for n, d in decode],
        )  # fmt: skip


ROWS = ("atman", "scoring", "annotate", "decode")


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("out", type=Path, nargs="?", help="folder for results.json")
    parser.add_argument("--save-tokenizer", type=Path, help="write SmolLM2's tokenizer there, and stop")
    parser.add_argument(
        "--save-model",
        nargs=2,
        metavar=("SHAPE", "DIR"),
        help="write a random model of SHAPE there, and stop",
    )
    parser.add_argument("--device", default="auto", help="auto (cuda when present), cuda or cpu")
    parser.add_argument("--dtype", default="auto", help="auto: bfloat16 on cuda, float32 on cpu")
    parser.add_argument("--shapes", nargs="+", choices=list(SHAPES), default=None)
    parser.add_argument("--rows", nargs="+", choices=ROWS, default=list(ROWS))
    parser.add_argument("--context", type=int, default=512, help="AtMan: context tokens")
    parser.add_argument("--targets", type=int, default=8, help="AtMan: target tokens")
    parser.add_argument("--reference-positions", type=int, default=128, help="AtMan: float32 loop columns")
    parser.add_argument("--scoring-lengths", type=int, nargs="+", default=[2048, 8192])
    parser.add_argument("--annotate-tokens", type=int, default=256)
    parser.add_argument("--decode-lengths", type=int, nargs="+", default=[256, 1024, 4096])
    parser.add_argument("--decode-steps", type=int, default=32)
    parser.add_argument("--streams", type=int, default=32)
    parser.add_argument("--stream-tokens", type=int, default=128)
    parser.add_argument("--matmul-size", type=int, default=8192)
    parser.add_argument("--smoke", action="store_true", help="small sizes: proves it runs (CI)")
    args = parser.parse_args(argv)
    if args.out is None and args.save_tokenizer is None and args.save_model is None:
        parser.error("give a folder for results.json (or --save-tokenizer DIR, or --save-model SHAPE DIR)")
    if args.smoke:
        args.context, args.targets, args.reference_positions = 24, 3, 8
        args.scoring_lengths, args.annotate_tokens = [64, 128], 8
        args.decode_lengths, args.decode_steps, args.streams, args.stream_tokens = [16, 32], 4, 3, 4
        args.matmul_size = 256
    return args


def main(argv: list[str] | None = None) -> None:
    from faithlens.model import pick_device, pick_dtype

    args = parse(argv)
    if args.save_tokenizer:
        save_tokenizer(args.save_tokenizer)
        return
    if args.save_model:  # for the benchmarks that load a model by path (bench/serve.py, bench/grpo.py)
        name, path = args.save_model
        lm = build(
            name, pick_device(args.device), pick_dtype(args.dtype, pick_device(args.device)), tokenizer()
        )
        lm.model.save_pretrained(path)
        lm.tokenizer.save_pretrained(path)
        return
    args.device = pick_device(args.device)
    args.dtype = pick_dtype(args.dtype, args.device)
    on_gpu = args.device.type == "cuda"
    if args.shapes:  # named: every row on every named shape
        args.atman_shapes = args.decode_shapes = args.shapes
    else:  # the issues' choice: AtMan and scoring at 3B/4B, decode at 135M and 3B
        args.shapes = [s for s in SHAPES if s != "tiny"] if on_gpu else ["tiny"]
        args.atman_shapes, args.decode_shapes = ATMAN_SHAPES, DECODE_SHAPES
    args.tokenizer = tokenizer()
    started = time.perf_counter()
    args.rate = matmul_rate(args.device, args.dtype, args.matmul_size)
    results: dict[str, Any] = {
        "machine": machine(),
        "command": " ".join(sys.argv),
        "dtype": str(args.dtype).removeprefix("torch."),
        "tokenizer": "smollm2" if TOKENIZER_DIR.is_dir() else "byte (no .gpu/tokenizer)",
        "matmul_tflops": args.rate / 1e12,
        "shapes": {},
    }
    print("machine:", json.dumps(results["machine"]), f"\nmatmul: {args.rate / 1e12:.1f} TFLOP/s", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    for name in args.shapes:
        results["shapes"][name] = run_shape(name, set(args.rows), args)
        (args.out / "results.json").write_text(json.dumps(results, indent=1))  # what finished, if cut off
    results["seconds"] = time.perf_counter() - started
    (args.out / "results.json").write_text(json.dumps(results, indent=1))
    report(results)
    print(f"\n{results['seconds']:.0f} s; results in {args.out / 'results.json'}")


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
