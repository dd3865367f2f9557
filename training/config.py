"""Training configuration: one small dataclass, TRL's GRPOConfig names where TRL has the knob."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from training.credit import CREDIT_STRATEGIES

Method = Literal["grpo", "atmanrl"]
LossType = Literal["grpo", "dr_grpo", "dapo"]


@dataclass
class TrainConfig:
    method: Method = "grpo"
    # sampling (TRL: num_generations, max_completion_length, temperature, top_p)
    num_generations: int = 4
    prompts_per_step: int = 2
    max_new_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    # optimisation
    max_steps: int = 10
    learning_rate: float = 1e-4
    gradient_accumulation_steps: int = 1
    max_grad_norm: float = 1.0
    weight_decay: float = 0.0
    # the objective (TRL's definitions)
    loss_type: LossType = "dapo"
    epsilon: float = 0.2
    epsilon_high: float | None = None  # None: symmetric clipping
    beta: float = 0.0  # KL to the base model (adapter disabled); 0 skips the reference pass
    num_iterations: int = 1  # μ: optimisation passes per generation batch
    scale_rewards: bool = True  # divide group-centred rewards by the group std (GRPO); AtManRL never does
    # rewards
    rewards: list[str] = field(default_factory=lambda: ["gsm8k"])
    reward_weights: list[float] | None = None
    # credit assignment (spec §6)
    credit: str = "none"  # a registered credit strategy (training.credit.CREDIT_STRATEGIES)
    gamma_amp: float = 1.5
    alpha: float = 0.5
    q: float = 0.4
    credit_sign: Literal["both", "positive"] = "both"
    # AtManRL (spec §8)
    faith_lambda: float = 1.0
    mask_steps: int = 20
    # LoRA
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    # bookkeeping
    checkpoint_every: int = 5
    seed: int = 0
    chat: bool = True  # wrap questions in the chat template

    def __post_init__(self) -> None:
        CREDIT_STRATEGIES.get(self.credit)  # raises ValueError naming the registered strategies
        if self.num_generations < 2:
            raise ValueError("num_generations must be ≥ 2 (advantages are relative to the group)")
        positive = (
            "prompts_per_step",
            "max_new_tokens",
            "max_steps",
            "gradient_accumulation_steps",
            "num_iterations",
            "checkpoint_every",
            "mask_steps",
            "lora_r",
        )
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be ≥ 1")
        if self.reward_weights is not None and len(self.reward_weights) != len(self.rewards):
            raise ValueError("reward_weights needs one weight per reward")
        if self.method == "atmanrl":
            self.scale_rewards = False  # mean-centred advantages, without the std (spec §8)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)
