"""Decode cost against context length: our DecodeBatch beside HF ``generate`` with a static cache.

For each context length L, a prompt of L token ids is prefilled (not timed) and then K tokens are
decoded greedily, one row:

* ours: ``DecodeBatch.add`` (prefill + first token), one untimed ``step()`` (on CUDA it captures the
  step's graph), then K timed ``step()`` calls (the row is not finished by them, so freeing its slot is
  not timed);
* HF: ``model.generate(..., cache_implementation="static", max_new_tokens=1+K)`` on the same model
  object, with a streamer that timestamps every token; the time from the first new token to the last,
  divided by K, is K pure decode steps (the prefill, which precedes the first token, is excluded).

Both sides run on the same weights, attention implementation and threads, interleaved per repeat (in
alternating order); the figures are medians over the repeats. EOS is masked (``min_new_tokens``) so both decode exactly 1+K.
On a CPU, HF does not compile the static-cache forward (it auto-compiles only on accelerators), so both
run eager.

    python bench/decode.py                  # SmolLM2 at 256, 1024 and 4096 tokens of context
    python bench/decode.py --device cuda    # the same on a GPU (HF compiles its static-cache forward there)
    python bench/decode.py --smoke          # CI: tiny model, small lengths, proves it runs
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers.generation.streamers import BaseStreamer

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import add_model_args, load_bench_model, machine, on_cuda, print_table
from faithlens.batching import DecodeBatch, SequenceState
from faithlens.model import LoadedModel
from faithlens.params import SamplingParams


class Stamps(BaseStreamer):
    """Records when ``generate`` hands out each chunk (the prompt first, then one token per step)."""

    def __init__(self, device: torch.device | str | None = None) -> None:
        self.times: list[float] = []
        self.device = device

    def put(self, value) -> None:
        sync(self.device)
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def sync(device: torch.device | str | None = None) -> None:
    """Wait for the queued kernels when ``device`` is a CUDA device (None: whenever CUDA is present)."""
    if on_cuda(device):
        torch.cuda.synchronize(device)


def prompt_of(lm: LoadedModel, length: int, seed: int = 0) -> list[int]:
    """``length`` token ids drawn from the vocabulary, no special tokens."""
    rng = random.Random(seed)
    specials = set(lm.tokenizer.all_special_ids)
    vocab = lm.model.config.vocab_size
    ids: list[int] = []
    while len(ids) < length:
        token = rng.randrange(vocab)
        if token not in specials:
            ids.append(token)
    return ids


def ours_ms_per_token(lm: LoadedModel, prompt: list[int], steps: int) -> tuple[float, list[int]]:
    """One untimed step first: on CUDA a step shape is captured as a graph the first time it runs (once
    per bucket in a server's life), and the timed steps replay it."""
    batch = DecodeBatch(lm, slots=1, max_context=len(prompt) + steps + 3)
    # One token more than is timed, so the timed steps end before the row finishes and its slot is
    # freed (HF's timed window likewise ends at its last token, before its clean-up).
    params = SamplingParams(max_new_tokens=3 + steps, min_new_tokens=3 + steps)
    seq = SequenceState(prompt, params)
    batch.add(seq)
    batch.step()
    sync(lm.device)
    started = time.perf_counter()
    for _ in range(steps):
        batch.step()
    sync(lm.device)
    elapsed = time.perf_counter() - started
    assert len(seq.token_ids) == 2 + steps and len(batch) == 1
    batch.step()
    return 1000 * elapsed / steps, seq.token_ids[: 2 + steps]


@torch.inference_mode()
def hf_static_ms_per_token(lm: LoadedModel, prompt: list[int], steps: int) -> tuple[float, list[int]]:
    ids = torch.tensor([prompt], device=lm.device)
    stamps = Stamps(lm.device)
    out = lm.model.generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=2 + steps,
        min_new_tokens=2 + steps,
        do_sample=False,
        cache_implementation="static",
        pad_token_id=lm.tokenizer.pad_token_id,
        eos_token_id=sorted(lm.eos_token_ids),
        streamer=stamps,
    )
    assert len(stamps.times) == 3 + steps  # the prompt, the first token, then one per decode step
    return 1000 * (stamps.times[-1] - stamps.times[2]) / steps, out[0, len(prompt) :].tolist()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--lengths", type=int, nargs="+", default=[256, 1024, 4096])
    parser.add_argument("--steps", type=int, default=32, help="timed decode steps after the prefill")
    parser.add_argument("--repeats", type=int, default=4, help="interleaved rounds; medians reported")
    parser.add_argument("--smoke", action="store_true")
    add_model_args(parser)
    args = parser.parse_args()
    if args.smoke:
        args.lengths, args.steps, args.repeats = [32, 64, 128], 8, 1
    lm = load_bench_model("tiny" if args.smoke else args.model, args.device, args.dtype)
    print("machine:", machine())
    print(f"model: {lm.name} ({lm.dtype}, {lm.device}), {args.steps} decode steps, {args.repeats} repeats")

    prompts = {n: prompt_of(lm, n) for n in args.lengths}
    ours_ms_per_token(lm, prompts[args.lengths[0]], 2)  # warm-up
    hf_static_ms_per_token(lm, prompts[args.lengths[0]], 2)
    ours: dict[int, list[float]] = {n: [] for n in args.lengths}
    hf: dict[int, list[float]] = {n: [] for n in args.lengths}
    for r in range(args.repeats):
        # Interleaved, so drift hits both alike, and in alternating order: a run can slow the next one
        # down (the allocator returning or re-faulting the previous run's memory).
        for n in args.lengths:
            ms_ours = ms_hf = 0.0
            our_tokens: list[int] = []
            hf_tokens: list[int] = []
            for side in ("ours", "hf") if r % 2 == 0 else ("hf", "ours"):
                if side == "ours":
                    ms_ours, our_tokens = ours_ms_per_token(lm, prompts[n], args.steps)
                else:
                    ms_hf, hf_tokens = hf_static_ms_per_token(lm, prompts[n], args.steps)
            ours[n].append(ms_ours)
            hf[n].append(ms_hf)
            agree = sum(a == b for a, b in zip(our_tokens, hf_tokens, strict=True))
            print(
                f"  round {r + 1}, L={n}: ours {ms_ours:.2f} ms/token, HF static {ms_hf:.2f}; "
                f"{agree}/{len(hf_tokens)} same tokens"
            )

    med = {n: (statistics.median(ours[n]), statistics.median(hf[n])) for n in args.lengths}
    print_table(
        f"Decode cost vs context length, {lm.name}, one row, greedy (median of {args.repeats})",
        ["context tokens", "ours ms/token", "HF static ms/token", "ours / HF static"],
        [[n, o, h, o / h] for n, (o, h) in med.items()],
    )
    first, last = args.lengths[0], args.lengths[-1]
    print(f"\nours@{last} / ours@{first}: {med[last][0] / med[first][0]:.2f} (target ≤ 2)")
    print(f"HF static@{last} / HF static@{first}: {med[last][1] / med[first][1]:.2f}")
    for n, (o, h) in med.items():
        print(f"ours / HF static @ {n}: {o / h:.2f} (target ≤ 1)")


if __name__ == "__main__":
    main()
