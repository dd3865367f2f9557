"""Training configuration: one pydantic model, TRL's GRPOConfig names where TRL has the knob.

This is the one declaration of every hyperparameter's name, type, default and bounds. The trainer reads
it; the jobs API validates a job's ``method`` with it (``service.routes.jobs.JobMethod`` is
:class:`TrainHyperparameters` plus ``type``), so a bad value is a 400 naming the field before any worker
sees it. The upper bounds keep one job runnable on one machine (and one worker responsive): see
docs/api.md, "Fine-tuning jobs".
"""

from __future__ import annotations

import importlib.util
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

from training import rewards as reward_lib
from training.credit import CREDIT_STRATEGIES

Method = Literal["grpo", "atmanrl"]
LossType = Literal["grpo", "dr_grpo", "dapo"]
Backend = Literal["native", "trl"]

MAX_ROLLOUTS_PER_BATCH = 256  # prompts_per_step × num_generations: sequences decoded (and held) together


def _known_credit(name: str) -> str:
    CREDIT_STRATEGIES.get(name)  # raises ValueError naming the registered strategies
    return name


RewardName = Annotated[str, Field(min_length=1, max_length=64), AfterValidator(reward_lib.check)]
CreditName = Annotated[str, AfterValidator(_known_credit)]
ModuleName = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z_][A-Za-z0-9_.]*$")]


def backend_unavailable(backend: str) -> str | None:
    """Why ``backend`` cannot run in this environment, or None when it can. ``trl`` needs the optional
    extra; this is checked without importing it (the server asks before it queues a job)."""
    if backend != "trl":
        return None
    try:
        found = importlib.util.find_spec("trl") is not None
    except (ImportError, ValueError):  # a broken or blocked install
        found = False
    return (
        None if found else "the trl backend needs TRL, which is not installed: pip install 'faithlens[trl]'"
    )


def _finite(**bounds: Any) -> Any:
    return Field(allow_inf_nan=False, **bounds)


class TrainHyperparameters(BaseModel):
    """Every knob of a run except which method and which seed (a job gives those as ``method.type`` and
    ``seed``). Unknown names are errors."""

    model_config = ConfigDict(extra="forbid")

    # sampling (TRL: num_generations, max_completion_length, temperature, top_p)
    num_generations: int = Field(
        default=4,
        ge=2,
        le=64,
        description="Completions per prompt (G); advantages are relative to the group.",
    )
    prompts_per_step: int = Field(default=2, ge=1, le=64, description="Prompts per micro-batch.")
    max_new_tokens: int = Field(
        default=64,
        ge=1,
        le=4096,
        description="Tokens per completion; the API also holds it to the server's FAITHLENS_MAX_NEW_TOKENS.",
    )
    temperature: float = _finite(default=1.0, gt=0, le=2, description="Sampling temperature of rollouts.")
    top_p: float = _finite(default=1.0, gt=0, le=1, description="Nucleus sampling mass of rollouts.")
    # optimisation
    max_steps: int = Field(default=10, ge=1, le=100_000, description="Optimiser steps of the run.")
    learning_rate: float = _finite(default=1e-4, gt=0, le=1, description="AdamW learning rate.")
    gradient_accumulation_steps: int = Field(
        default=1, ge=1, le=64, description="Micro-batches (each freshly sampled) per optimiser step."
    )
    max_grad_norm: float = _finite(default=1.0, gt=0, le=1000, description="Gradient clipping norm.")
    weight_decay: float = _finite(default=0.0, ge=0, le=1, description="AdamW weight decay.")
    # the objective (TRL's definitions)
    loss_type: LossType = Field(default="dapo", description="The loss normaliser (training/loss.py).")
    epsilon: float = _finite(default=0.2, gt=0, le=1, description="Clipping range of the ratio: 1 ± ε.")
    epsilon_high: float | None = _finite(
        default=None, gt=0, le=10, description="Upper clipping range (DAPO's clip-higher); null: ε."
    )
    beta: float = _finite(
        default=0.0, ge=0, le=10, description="KL to the base model (adapter disabled); 0 skips that pass."
    )
    num_iterations: int = Field(
        default=1, ge=1, le=16, description="μ: optimisation passes per generation batch."
    )
    scale_rewards: bool = Field(
        default=True,
        description="Divide group-centred rewards by the group std (GRPO); AtManRL never does.",
    )
    # rewards
    rewards: list[RewardName] = Field(
        default_factory=lambda: ["gsm8k"],
        min_length=1,
        max_length=8,
        description="Reward names (training/rewards.py): `gsm8k`, `format`, `starts_with:<token id>` (a toy).",
    )
    reward_weights: list[Annotated[float, _finite(ge=-100, le=100)]] | None = Field(
        default=None, max_length=8, description="One weight per reward, each in [-100, 100]; null: all 1."
    )
    # credit assignment (spec §6)
    credit: CreditName = Field(
        default="none", description="A registered credit strategy (`GET /v1/capabilities` lists them)."
    )
    gamma_amp: float = _finite(default=1.5, ge=0, le=10, description="γ amplification (spec §6).")
    alpha: float = _finite(default=0.5, ge=0, le=1, description="Intro share of a dominated anchor's boost.")
    q: float = _finite(default=0.4, gt=0, le=1, description="Top-q share for the flags (spec §5).")
    credit_sign: Literal["both", "positive"] = Field(
        default="both", description="Shape advantages of both signs, or only non-negative ones."
    )
    # AtManRL (spec §8)
    faith_lambda: float = _finite(default=1.0, ge=0, le=100, description="λ of R_outcome + λ·R_faith.")
    mask_steps: int = Field(
        default=20,
        ge=1,
        le=1000,
        description="Optimiser steps of the AtManRL mask; its lr is 0.2 / steps (spec §8).",
    )
    # LoRA
    lora_r: int = Field(default=8, ge=1, le=256, description="LoRA rank.")
    lora_alpha: int = Field(default=16, ge=1, le=4096, description="LoRA alpha.")
    lora_dropout: float = _finite(default=0.0, ge=0, lt=1, description="LoRA dropout.")
    target_modules: list[ModuleName] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"],
        min_length=1,
        max_length=32,
        description="Module names LoRA wraps.",
    )
    # the trainer
    backend: Backend = Field(
        default="native",
        description="The trainer that runs the job: `native` (training/trainer.py) or `trl` (TRL's "
        "GRPOTrainer with the same credit, training/trl.py; needs the `trl` extra; method `grpo` only).",
    )
    # held-out evaluation (the job's validation_data)
    eval_steps: int | None = Field(
        default=None,
        ge=1,
        le=100_000,
        description="Evaluate greedy accuracy on the job's `validation_data` every this many steps and at "
        "the last step (TRL's `eval_steps`); null: never.",
    )
    eval_on_start: bool = Field(
        default=False, description="Also evaluate before the first step (TRL's `eval_on_start`)."
    )
    eval_limit: int | None = Field(
        default=None, ge=1, le=10_000, description="Evaluate on the first this many problems; null: all."
    )
    # bookkeeping
    checkpoint_every: int = Field(default=5, ge=1, le=100_000, description="Steps between checkpoints.")
    chat: bool = Field(default=True, description="Wrap questions in the chat template.")

    @model_validator(mode="after")
    def _consistent(self) -> TrainHyperparameters:
        if self.reward_weights is not None and len(self.reward_weights) != len(self.rewards):
            raise ValueError("reward_weights needs one weight per reward")
        if self.eval_steps is None and self.eval_on_start:
            raise ValueError("eval_on_start needs eval_steps")
        if self.eval_steps is not None and self.backend != "native":
            raise ValueError("held-out evaluation (eval_steps) runs on the native backend")
        rollouts = self.prompts_per_step * self.num_generations
        if rollouts > MAX_ROLLOUTS_PER_BATCH:
            raise ValueError(
                f"prompts_per_step × num_generations is {rollouts}; at most {MAX_ROLLOUTS_PER_BATCH} "
                "sequences are decoded together"
            )
        return self


class TrainConfig(TrainHyperparameters):
    """A whole run's configuration: the hyperparameters, the method and the seed."""

    method: Method = "grpo"
    seed: int = Field(default=0, ge=0, le=2**31 - 1)

    @model_validator(mode="after")
    def _method_defaults(self) -> TrainConfig:
        if self.method == "atmanrl":
            if self.backend == "trl":
                raise ValueError("the trl backend runs method grpo; atmanrl runs on the native backend")
            self.scale_rewards = False  # mean-centred advantages, without the std (spec §8)
        return self

    def as_dict(self) -> dict[str, Any]:
        return self.model_dump()
