"""Runs of :class:`training.trl.CreditGRPOTrainer` and of faithlens's own ``Trainer`` on the same tiny model,
LoRA weights and fixed rollouts, for tests/test_trl.py. Generation is out of the comparison: the native
trainer's ``_sample`` and TRL's ``rollout_func`` hand out the same completions.

Run as a script, under ``accelerate launch``, for the two-process test: each rank trains two steps on its
share of the global batch and saves its LoRA weights to ``<out>/rank<i>.pt``.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script by accelerate

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # rollout_func is "experimental" in TRL 1.16

from faithlens.data import Problem
from faithlens.model import LoadedModel
from faithlens.tiny import tiny_loaded_model
from training.config import TrainConfig
from training.trainer import Rollout, Trainer

# prompts of different lengths: TRL left-pads them, so γ is read off rows that do not start at 0
PROBLEMS = [
    Problem("What is 2 + 2?", "#### 4"),
    Problem("A longer question, so that the prompts differ in length: what is 13 * 7 - 5?", "#### 86"),
    Problem("What is 10 - 7?", "#### 3"),
    Problem("Sam has 3 apples and buys 4 more. How many apples does Sam have now?", "#### 7"),
]
TARGET = 70  # the reward: 1 when a completion starts with this token (the second of each group does)


def completions(generations: int, seed: int = 0) -> dict[str, list[list[int]]]:
    """``generations`` fixed completions per problem, 30–45 tokens (FAI needs tokens ≥ 10 positions later,
    so short ones have no anchors), of different lengths (right padding), no EOS."""
    rng = torch.Generator().manual_seed(seed)
    out: dict[str, list[list[int]]] = {}
    for problem in PROBLEMS:
        group = []
        for g in range(generations):
            n = int(torch.randint(30, 46, (1,), generator=rng))
            ids = torch.randint(3, 259, (n,), generator=rng).tolist()
            ids[0] = TARGET if g == 1 else (TARGET + 1 + ids[0] % 100)
            group.append(ids)
        out[problem.question] = group
    return out


def train_config(**overrides: Any) -> TrainConfig:
    values: dict[str, Any] = {
        "num_generations": 4,
        "prompts_per_step": 2,
        "max_new_tokens": 48,
        "max_steps": 1,
        "learning_rate": 1e-2,
        "rewards": [f"starts_with:{TARGET}"],
        "max_grad_norm": 1000.0,  # no clipping: the gradients are compared as computed
        "lora_r": 4,
        "lora_alpha": 8,
        "seed": 0,
        **overrides,
    }
    return TrainConfig(**values)


def lora_state(model: torch.nn.Module, seed: int = 1) -> dict[str, torch.Tensor]:
    """Seeded non-zero LoRA weights (a fresh adapter's B is zero, which would leave A without gradient)."""
    rng = torch.Generator().manual_seed(seed)
    keys = sorted(k for k in model.state_dict() if "lora_" in k)
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    return {k: torch.randn(shapes[k], generator=rng) * 0.05 for k in keys}


def lora_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items() if "lora_" in k}


def lora_grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


class FixedTrainer(Trainer):
    """faithlens's trainer with given completions instead of sampled ones, problems in the given order."""

    def __init__(
        self, lm: LoadedModel, config: TrainConfig, fixed: dict[str, list[list[int]]], problems: list[Problem]
    ) -> None:
        super().__init__(lm, config, problems)
        self.fixed = fixed
        self.order = list(range(len(problems)))
        self.lm.model.load_state_dict(lora_state(self.lm.model), strict=False)

    def _sample(self, problems: list[Problem], micro: int) -> list[Rollout]:
        tokenizer = self.lm.tokenizer
        return [
            Rollout(p, self._prompt_ids(p), list(ids), tokenizer.decode(ids))
            for p in problems
            for ids in self.fixed[p.question]
        ]


def native_trainer(arch: str, config: TrainConfig, problems: list[Problem] = PROBLEMS) -> FixedTrainer:
    return FixedTrainer(tiny_loaded_model(arch), config, completions(config.num_generations), problems)


def rollout_func(lm: LoadedModel, fixed: dict[str, list[list[int]]]) -> Callable[[list, Any], dict]:
    """TRL's ``rollout_func``: the prompt ids faithlens encodes, and the fixed completions in group order."""

    def rollouts(prompts: list, trainer: Any) -> dict[str, Any]:
        seen: dict[str, int] = {}
        prompt_ids, completion_ids = [], []
        for prompt in prompts:
            question = prompt[-1]["content"]
            g = seen.get(question, 0)
            seen[question] = g + 1
            prompt_ids.append(lm.prompt_ids(question, chat=True))
            completion_ids.append(list(fixed[question][g]))
        return {"prompt_ids": prompt_ids, "completion_ids": completion_ids, "logprobs": None}

    return rollouts


def trl_trainer(
    arch: str,
    config: TrainConfig,
    output_dir: Path,
    callbacks: list | None = None,
    trainer_class: type | None = None,
    problems: list[Problem] = PROBLEMS,
    **overrides: Any,
):
    """A CreditGRPOTrainer on ``config`` as the jobs' trl backend maps it (training/trl_backend.py), with the
    fixed completions, the same LoRA weights as :func:`native_trainer`, and ``overrides`` of GRPOConfig."""
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import PrinterCallback

    from training.trl import CreditGRPOTrainer
    from training.trl_backend import RewardFunction, grpo_config

    lm = tiny_loaded_model(arch)
    args = grpo_config(config, output_dir, use_cpu=True, **overrides)
    rows = [{"prompt": [{"role": "user", "content": p.question}], "answer": p.answer} for p in problems]
    trainer = (trainer_class or CreditGRPOTrainer)(
        model=lm.model,
        processing_class=lm.tokenizer,
        reward_funcs=[RewardFunction(spec) for spec in config.rewards],
        args=args,
        train_dataset=Dataset.from_list(rows),
        peft_config=LoraConfig(
            r=config.lora_r,
            lora_alpha=config.lora_alpha,
            lora_dropout=config.lora_dropout,
            target_modules=config.target_modules,
            task_type="CAUSAL_LM",
        ),
        rollout_func=rollout_func(lm, completions(config.num_generations)),
        callbacks=callbacks or [],
    )
    trainer.remove_callback(PrinterCallback)
    trainer.model.load_state_dict(lora_state(trainer.model), strict=False)
    return trainer


def distributed_config() -> TrainConfig:
    """The two-process test's run: two steps of two problems × four completions (one problem per rank)."""
    return train_config(credit="coupled", max_steps=2, learning_rate=1e-2)


def distributed_run(output_dir: Path, world_size: int) -> dict[str, torch.Tensor]:
    """Two steps over the global batch, each process holding 1 / ``world_size`` of it."""
    config = distributed_config()
    per_device = config.prompts_per_step * config.num_generations // world_size
    trainer = trl_trainer("llama", config, output_dir, per_device_train_batch_size=per_device)
    trainer.train()
    return lora_weights(trainer.accelerator.unwrap_model(trainer.model))


if __name__ == "__main__":
    out = Path(sys.argv[1])
    from accelerate import PartialState

    state = PartialState(cpu=True)
    weights = distributed_run(out / "trainer", state.num_processes)
    torch.save(
        {"weights": weights, "world_size": state.num_processes, "backend": str(state.backend)},
        out / f"rank{state.process_index}.pt",
    )
