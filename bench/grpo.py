"""GRPO step cost: one faithlens training step vs one TRL ``GRPOTrainer`` step, and the cost of
faithlens's credit assignment (``credit="coupled"`` vs ``credit="none"``), in one run on one device
(``--device``, ``--dtype`` and ``--model``, the same for both trainers; auto: CUDA when present).

Both trainers get the same model weights (separate copies of SmolLM2-135M-Instruct loaded by
faithlens, float32 on a CPU, SDPA attention), a fresh LoRA adapter each (r=8, alpha=16, dropout 0, q/k/v/o
projections), the same GSM8K train questions in the same order under the model's chat template (TRL
gets conversational prompts and applies the template itself; the prompt ids are checked to match), G=4
completions per question, P questions per step (TRL: per_device_train_batch_size = generation_batch_size
= P·G, so one step samples and trains on the same P×4 completions as ours), at most 64 new tokens,
temperature 1, top-p 1, the GSM8K correctness reward (``training.rewards.correctness``), group-scaled
advantages, beta=0 (no reference model), loss_type "dapo", epsilon 0.2, one optimisation pass per batch,
AdamW at lr 1e-4 with no weight decay, gradient clipping at 1.0.

Generation dominates the step and its cost grows with the number of tokens, so by default every
completion is exactly 64 tokens on both sides: TRL suppresses EOS with ``min_new_tokens=64`` (a logits
processor, EOS is never sampled), while faithlens's decoder has no min-length knob in the trainer path, so
this benchmark hands the trainer a model whose EOS does not stop decoding (EOS may be sampled and
decoding carries on past it). Same token counts, slightly different sampling distributions.
``--natural-eos`` lets both stop at EOS instead; tokens per step and tokens/s are reported either way.

Not equal, by design of the two trainers (what is being compared): faithlens decodes with its
continuous-batching engine (one prefill per completion, then batched decode steps), TRL with
``model.generate`` on a left-padded batch; TRL also computes per-token entropies for its logs. Made
equal by overriding TRL's defaults: gradient checkpointing off (TRL turns it on; faithlens does not
checkpoint) and bf16/fp16 autocast off (both train in the dtype the model was loaded in). Not equal: the random streams (faithlens
seeds each completion, TRL uses the global RNG), so completions and rewards differ. The AdamW
implementations differ (TRL's default fused AdamW, faithlens's torch.optim.AdamW; over LoRA parameters only).

A step is timed from TRL's ``on_step_begin`` to ``on_step_end`` (generation, reward, loss, backward,
optimiser step; not TRL's logging) and by faithlens's ``Trainer.train_step``. Variants are interleaved:
each round runs one TRL step, then one step of each faithlens variant (alternating their order) from a
TRL callback. Round 0 is a warm-up; the medians are over the remaining rounds.

    python bench/grpo.py                       # SmolLM2, P=2 questions per step, 1 warm-up + 3 timed
    python bench/grpo.py --steps 5 --prompts 4 # more rounds, bigger steps
    python bench/grpo.py --device cuda         # on a GPU, both trainers (bfloat16 unless --dtype says so)
    python bench/grpo.py --smoke               # tiny model, tiny sizes: CI's check that it runs
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import add_model_args, load_bench_model, machine, print_table
from faithlens.data import Problem
from faithlens.model import LoadedModel, unwrap
from training.rewards import Sample, correctness

TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj"]
TOY_PROBLEMS = [
    Problem("What is 2 + 2?", "#### 4"),
    Problem("What is 3 + 5?", "#### 8"),
    Problem("What is 10 - 7?", "#### 3"),
    Problem("What is 6 * 2?", "#### 12"),
]


@dataclass
class Setup:
    smoke: bool
    prompts_per_step: int
    max_new_tokens: int
    steps: int  # timed rounds, after one warm-up round
    fixed_length: bool
    model: str | None = None  # "tiny", an HF directory or a .gguf path; None: the embedded SmolLM2
    device: str = "auto"
    dtype: str = "auto"
    generations: int = 4
    toy_problems: bool = False  # the toy questions instead of GSM8K (a machine without the data)
    lora_r: int = 8
    lora_alpha: int = 16
    learning_rate: float = 1e-4
    seed: int = 0

    @property
    def rounds(self) -> int:
        return self.steps + 1


@dataclass
class Variant:
    name: str
    seconds: list[float] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    rewards: list[float] = field(default_factory=list)
    credit_seconds: list[float] = field(default_factory=list)  # faithlens: time on γ inside the step

    def timed(self) -> tuple[list[float], list[int]]:
        """The rounds after the warm-up."""
        return self.seconds[1:], self.tokens[1:]


class NoStopAtEos(LoadedModel):
    """A LoadedModel whose decoder never stops at EOS, so completions run to max_new_tokens."""

    @property
    def eos_token_ids(self) -> set[int]:
        return set()


# -- models and data -----------------------------------------------------------------------------------------
def load_lm(setup: Setup) -> LoadedModel:
    """A fresh model (the trainers wrap it with LoRA in place)."""
    return load_bench_model("tiny" if setup.smoke else setup.model, setup.device, setup.dtype)


def without_eos_stop(lm: LoadedModel) -> LoadedModel:
    return NoStopAtEos(**{f.name: getattr(lm, f.name) for f in fields(lm)})


def load_problems(setup: Setup) -> list[Problem]:
    from faithlens.data import load_gsm8k

    needed = setup.rounds * setup.prompts_per_step
    if setup.smoke or setup.toy_problems:
        return [TOY_PROBLEMS[i % len(TOY_PROBLEMS)] for i in range(needed)]
    return load_gsm8k("train", limit=needed)


# -- faithlens ---------------------------------------------------------------------------------------------------
def faithlens_trainer(setup: Setup, credit: str, problems: list[Problem]):
    from training.config import TrainConfig
    from training.trainer import Trainer

    lm = load_lm(setup)
    if setup.fixed_length:
        lm = without_eos_stop(lm)
    config = TrainConfig(
        num_generations=setup.generations,
        prompts_per_step=setup.prompts_per_step,
        max_new_tokens=setup.max_new_tokens,
        temperature=1.0,
        top_p=1.0,
        max_steps=setup.rounds,
        learning_rate=setup.learning_rate,
        loss_type="dapo",
        beta=0.0,
        lora_r=setup.lora_r,
        lora_alpha=setup.lora_alpha,
        target_modules=TARGET_MODULES,
        credit=credit,
        rewards=["gsm8k"],
        seed=setup.seed,
    )
    return Trainer(lm, config, problems)


def run_faithlens_step(trainer, variant: Variant, setup: Setup) -> None:
    metrics = trainer.train_step()
    completions = setup.prompts_per_step * setup.generations
    variant.seconds.append(metrics["step_seconds"])
    variant.tokens.append(round(metrics["completion_length"] * completions))
    variant.rewards.append(metrics["reward_mean"])
    variant.credit_seconds.append(metrics["credit_seconds"])


# -- TRL -----------------------------------------------------------------------------------------------------------
def gsm8k_reward(log: list[tuple[int, int, float]]) -> Callable[..., list[float]]:
    """``training.rewards.correctness`` as a TRL reward function; logs (completions, tokens, mean reward)
    per call (one call per step)."""

    def gsm8k_correctness(
        completions: list, answer: list[str], completion_ids: list, **_: Any
    ) -> list[float]:
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        rewards = [
            correctness(Sample([], ids, text, ref))
            for text, ids, ref in zip(texts, completion_ids, answer, strict=True)
        ]
        log.append((len(rewards), sum(len(ids) for ids in completion_ids), sum(rewards) / len(rewards)))
        return rewards

    return gsm8k_correctness


def trl_config(setup: Setup, output_dir: str, use_cpu: bool = True):
    """TRL's arguments. Mixed precision stays off: the model arrives in the dtype it trains in (as ours
    does), and ``use_cpu`` keeps the HF Trainer from moving a CPU model to a present GPU."""
    from trl import GRPOConfig

    batch = setup.prompts_per_step * setup.generations
    generation_kwargs = {"min_new_tokens": setup.max_new_tokens} if setup.fixed_length else None
    return GRPOConfig(
        output_dir=output_dir,
        use_cpu=use_cpu,
        bf16=False,
        fp16=False,
        activation_checkpointing=False,  # TRL's default turns it on (gradient_checkpointing=True)
        report_to="none",
        logging_steps=1,
        save_strategy="no",
        disable_tqdm=True,
        use_vllm=False,
        max_steps=setup.rounds,
        per_device_train_batch_size=batch,
        generation_batch_size=batch,
        gradient_accumulation_steps=1,
        num_generations=setup.generations,
        max_completion_length=setup.max_new_tokens,
        temperature=1.0,
        top_p=1.0,
        top_k=0,
        generation_kwargs=generation_kwargs,
        beta=0.0,
        loss_type="dapo",
        epsilon=0.2,
        num_iterations=1,
        scale_rewards="group",
        learning_rate=setup.learning_rate,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=1.0,
        shuffle_dataset=False,
        dataloader_num_workers=0,
        seed=setup.seed,
    )


def trl_trainer(
    setup: Setup, problems: list[Problem], callback, reward_log: list[tuple[int, int, float]], output_dir: str
):
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import PrinterCallback
    from trl import GRPOTrainer

    lm = load_lm(setup)
    rows = [{"prompt": [{"role": "user", "content": p.question}], "answer": p.answer} for p in problems]
    trainer = GRPOTrainer(
        model=lm.model,
        processing_class=lm.tokenizer,
        reward_funcs=gsm8k_reward(reward_log),
        args=trl_config(setup, output_dir, use_cpu=lm.device.type == "cpu"),
        train_dataset=Dataset.from_list(rows),
        peft_config=LoraConfig(
            r=setup.lora_r,
            lora_alpha=setup.lora_alpha,
            lora_dropout=0.0,
            target_modules=TARGET_MODULES,
            task_type="CAUSAL_LM",
        ),
        callbacks=[callback],
    )
    trainer.remove_callback(PrinterCallback)  # the log dicts; state.log_history keeps them
    return trainer


def step_timer(between: Callable[[int], None]):
    """A TrainerCallback that times each TRL step and runs ``between(round)`` after it (untimed)."""
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self) -> None:
            self.seconds: list[float] = []
            self._started = 0.0

        def on_step_begin(self, args, state, control, **kwargs):
            self._started = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.seconds.append(time.perf_counter() - self._started)
            between(len(self.seconds) - 1)

    return StepTimer()


def check_prompts(trainer, tokenizer, problems: list[Problem]) -> bool:
    """faithlens's prompt ids == the ids TRL renders from the conversational prompt (its own call)."""
    for problem in problems[:4]:
        ours = trainer.lm.prompt_ids(problem.question, chat=True)
        theirs = tokenizer.apply_chat_template(
            [[{"role": "user", "content": problem.question}]],
            add_generation_prompt=True,
            tokenize=True,
            return_dict=True,
        )["input_ids"][0]
        if list(ours) != list(theirs):
            return False
    return True


# -- the run --------------------------------------------------------------------------------------------------
def run(setup: Setup) -> tuple[dict[str, Variant], dict[str, Any]]:
    problems = load_problems(setup)
    ours = {credit: faithlens_trainer(setup, credit, problems) for credit in ("none", "coupled")}
    order = ours["none"].order
    same_order = ours["coupled"].order == order
    in_order = [problems[i] for i in order]  # the order our trainers draw questions in
    variants = {name: Variant(name) for name in ("faithlens none", "faithlens coupled", "TRL")}

    def faithlens_round(index: int) -> None:
        credits = ["none", "coupled"] if index % 2 == 0 else ["coupled", "none"]
        for credit in credits:
            run_faithlens_step(ours[credit], variants[f"faithlens {credit}"], setup)

    timer = step_timer(faithlens_round)
    reward_log: list[tuple[int, int, float]] = []
    output_dir = tempfile.TemporaryDirectory(prefix="bench-grpo-")
    trl = trl_trainer(setup, in_order, timer, reward_log, output_dir.name)
    checks = {
        "prompt ids identical": check_prompts(ours["none"], trl.processing_class, in_order),
        "question order identical (none/coupled)": same_order,
        "TRL activation checkpointing": trl.args.activation_checkpointing,
        "TRL optimizer": str(trl.args.optim),
        "model (faithlens / TRL)": [
            f"{ours['none'].lm.name}, {ours['none'].lm.dtype}, {ours['none'].lm.device}",
            f"{next(trl.model.parameters()).dtype}, {trl.args.device}",
        ],
        "attention (faithlens / TRL)": [
            unwrap(ours["none"].lm.model).config._attn_implementation,
            unwrap(trl.model).config._attn_implementation,
        ],
    }
    with output_dir:
        trl.train()
    variants["TRL"].seconds = timer.seconds
    variants["TRL"].tokens = [tokens for _, tokens, _ in reward_log]
    variants["TRL"].rewards = [reward for _, _, reward in reward_log]
    checks["completions per step (TRL)"] = [n for n, _, _ in reward_log]
    checks["TRL's own mean completion length per step"] = [
        e["completions/mean_length"] for e in trl.state.log_history if "completions/mean_length" in e
    ]
    return variants, checks


# -- report ---------------------------------------------------------------------------------------------------
def summary(variant: Variant) -> dict[str, float]:
    seconds, tokens = variant.timed()
    median_s = statistics.median(seconds)
    median_tokens = statistics.median(tokens)
    return {
        "median_s": median_s,
        "min_s": min(seconds),
        "max_s": max(seconds),
        "tokens": median_tokens,
        "tokens_per_s": sum(tokens) / sum(seconds),
    }


def paired_ratio(a: Variant, b: Variant) -> float:
    """Median over the timed rounds of a's step time / b's in the same round: robust to the machine's load
    changing between rounds (it is shared)."""
    return statistics.median(x / y for x, y in zip(a.timed()[0], b.timed()[0], strict=True))


def report(setup: Setup, variants: dict[str, Variant], checks: dict[str, Any]) -> None:
    stats = {name: summary(v) for name, v in variants.items()}
    completions = setup.prompts_per_step * setup.generations
    rows = [
        [
            name,
            s["median_s"],
            s["min_s"],
            s["max_s"],
            f"{s['tokens']:g}",
            s["tokens_per_s"],
            f"{statistics.mean(variants[name].rewards[1:]):.3f}",
        ]
        for name, s in stats.items()
    ]
    length = "exactly" if setup.fixed_length else "≤"
    print_table(
        f"one GRPO step: {setup.prompts_per_step} questions × {setup.generations} completions "
        f"({completions} completions, {length} {setup.max_new_tokens} new tokens each), "
        f"median over {setup.steps} steps after 1 warm-up",
        ["trainer", "median s", "min s", "max s", "tokens/step", "tokens/s", "mean reward"],
        rows,
    )
    ours, coupled, trl = stats["faithlens none"], stats["faithlens coupled"], stats["TRL"]
    none, coupled_v = variants["faithlens none"], variants["faithlens coupled"]
    speed = (trl["median_s"] / ours["median_s"], paired_ratio(variants["TRL"], none))
    overhead = (coupled["median_s"] / ours["median_s"], paired_ratio(variants["faithlens coupled"], none))
    print()
    print("ratios: of the medians | median of per-round ratios (same round, same load: the steadier one)")
    print(
        f"TRL / faithlens (none) step time:  {speed[0]:.2f}× | {speed[1]:.2f}×  "
        f"(target ≥ 1.00: {'met' if speed[1] >= 1 else 'NOT met'})"
    )
    print(f"faithlens / TRL tokens/s:          {ours['tokens_per_s'] / trl['tokens_per_s']:.2f}×")
    print(
        f"coupled / none step time:          {overhead[0]:.2f}× | {overhead[1]:.2f}×  "
        f"(credit overhead {100 * (overhead[1] - 1):+.1f}%, target ≤ +10%: "
        f"{'met' if overhead[1] <= 1.10 else 'NOT met'})"
    )
    shares = [c / s for c, s in zip(coupled_v.credit_seconds[1:], coupled_v.seconds[1:], strict=True)]
    print(
        f"credit work timed inside the coupled step: median {statistics.median(coupled_v.credit_seconds[1:]):.3f} s"
        f" = {100 * statistics.median(shares):.1f}% of its step (the probe on the loss's forward + metrics + γ)"
    )
    print()
    print("per-step seconds (round 0 = warm-up):", json.dumps({n: v.seconds for n, v in variants.items()}))
    print("per-step tokens:", json.dumps({n: v.tokens for n, v in variants.items()}))
    print("checks:", json.dumps(checks))


def not_equal_note(setup: Setup) -> str:
    if setup.fixed_length:
        eos = (
            f"every completion is {setup.max_new_tokens} tokens: TRL suppresses EOS (min_new_tokens), "
            "faithlens does not stop at EOS (it may sample EOS and continue)"
        )
    else:
        eos = "both stop at EOS: token counts differ per step (TRL counts the EOS token, faithlens does not)"
    return (
        f"not equal: {eos}; decoding engines differ (what is compared); TRL also computes entropies; "
        "random streams differ (different completions and rewards); AdamW fused (TRL) vs torch default "
        "(faithlens). Shared CPU: timings are noisy."
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--steps", type=int, default=3, help="timed rounds after one warm-up round")
    parser.add_argument("--prompts", type=int, default=2, help="questions per step (× --generations)")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--natural-eos", action="store_true", help="let completions stop at EOS")
    parser.add_argument("--generations", type=int, default=4, help="completions per question")
    parser.add_argument("--lora-r", type=int, default=8)
    parser.add_argument("--toy-problems", action="store_true", help="toy questions, not GSM8K train")
    add_model_args(parser)
    args = parser.parse_args()
    setup = Setup(
        smoke=args.smoke,
        prompts_per_step=1 if args.smoke else args.prompts,
        max_new_tokens=8 if args.smoke else args.max_new_tokens,
        steps=1 if args.smoke else args.steps,
        fixed_length=not args.natural_eos,
        model="tiny" if args.smoke else args.model,
        device=args.device,
        dtype=args.dtype,
        generations=args.generations,
        lora_r=args.lora_r,
        lora_alpha=2 * args.lora_r,
        toy_problems=args.toy_problems,
    )
    torch.manual_seed(setup.seed)
    print("machine:", json.dumps(machine()))
    print("setup:", json.dumps({f.name: getattr(setup, f.name) for f in fields(setup)}))
    started = time.perf_counter()
    variants, checks = run(setup)
    report(setup, variants, checks)
    print(not_equal_note(setup))
    print(f"total wall time: {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
