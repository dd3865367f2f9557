"""The jobs' ``backend: "trl"``: a job's :class:`TrainConfig` trained by :class:`CreditGRPOTrainer`.

:class:`TrlTrainer` has the interface of ``training.trainer.Trainer`` that workers/runner.py drives
(``train``, ``load_checkpoint``, ``save_adapter``, ``step``, :class:`Hooks`). The worker therefore
publishes, checkpoints, resumes, cancels and reports a TRL job exactly as it does a native one:

* **Configuration.** Each ``TrainConfig`` field maps to the ``GRPOConfig`` field of the same meaning
  (:func:`grpo_config`). One optimiser step holds ``gradient_accumulation_steps`` micro-batches of
  ``prompts_per_step × num_generations`` rollouts. The optimiser is AdamW at a constant learning rate.
  The problems come in the native trainer's seeded order (wrapped around to whole generation batches),
  and the LoRA adapter is seeded as the native trainer seeds it.
* **Rewards** are faithlens's (training/rewards.py), as TRL reward functions (:class:`RewardFunction`).
* **Events.** Each step's TRL log becomes the native metrics (:func:`job_metrics`).
* **Checkpoints.** A checkpoint is TRL's own (HF Trainer's ``checkpoint-N``: adapter, optimiser,
  scheduler, RNG and trainer state), so a resume is HF's ``resume_from_checkpoint``. The directory gains
  what the native checkpoint holds (``adapter/``, ``trainer_state.pt``, ``metrics.json``). It is then
  renamed to ``step-NNNNNN``, so it appears whole or not at all (jobs/journal.py).
* **Cancel.** A forward pre-hook on the policy asks ``should_cancel`` at most every ``CANCEL_POLL_S``
  seconds. Generation, scoring and loss passes are all forward passes, so a cancel is honoured within a
  step.

Differences from the native backend come from TRL and are expected. Generation is TRL's
(``model.generate``, from the global RNG), and completions include their EOS token. The loss's
log-probabilities are taken at the sampling temperature. Only ``method: grpo`` is supported (AtManRL's
faithfulness reward is native only).
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from transformers import PrinterCallback, TrainerCallback

from faithlens.data import Problem
from faithlens.model import LoadedModel
from training import rewards as reward_lib
from training.config import TrainConfig
from training.trainer import ADAPTER, CANCEL_POLL_S, Cancelled, Hooks, save_adapter
from training.trl import CreditGRPOConfig, CreditGRPOTrainer

STATE_FILE = "trainer_state.pt"  # what jobs/journal.py looks for in a complete checkpoint


class RewardFunction:
    """One of faithlens's rewards (``training.rewards.build(spec)``) as a TRL reward function. The
    reference answer is the dataset's ``answer`` column. With ``log_accuracy`` it also logs the share of
    correct answers (``accuracy``, the native trainer's metric) through TRL's ``log_metric``."""

    def __init__(self, spec: str, log_accuracy: bool = False) -> None:
        self.fn = reward_lib.build(spec)
        self.__name__ = spec.replace(":", "_")  # TRL names the reward's metrics after it
        self.log_accuracy = log_accuracy

    def __call__(
        self, completions: list[Any], completion_ids: list[list[int]], answer: list[str], **kwargs: Any
    ) -> list[float]:
        samples = [
            reward_lib.Sample([], list(ids), _text(completion), reference)
            for completion, ids, reference in zip(completions, completion_ids, answer, strict=True)
        ]
        if self.log_accuracy and "log_metric" in kwargs:
            correct = [reward_lib.correctness(s) for s in samples]
            kwargs["log_metric"]("accuracy", sum(correct) / max(len(correct), 1))
        return [self.fn(s) for s in samples]


def _text(completion: Any) -> str:
    """A conversational completion is a list of messages; a plain one is text."""
    return completion[-1]["content"] if isinstance(completion, list) else completion


def grpo_config(config: TrainConfig, output_dir: Path, use_cpu: bool, **overrides: Any) -> CreditGRPOConfig:
    """``config`` in TRL's names (``overrides``: GRPOConfig fields to set otherwise). Where TRL's defaults
    differ from the native trainer they are pinned to the native choice: a constant learning rate, plain
    AdamW, no gradient checkpointing, no mixed precision, data in the given order, and a KL term that is
    not weighted by the ratio."""
    fields: dict[str, Any] = dict(
        output_dir=str(output_dir),
        use_cpu=use_cpu,
        bf16=False,
        fp16=False,
        activation_checkpointing=False,
        report_to="none",
        logging_steps=1,
        save_strategy="no",  # the job decides when (checkpoint_every, never at the last step): _JobCallback
        disable_tqdm=True,
        dataloader_num_workers=0,
        seed=config.seed,
        max_steps=config.max_steps,
        per_device_train_batch_size=config.prompts_per_step * config.num_generations,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        num_generations=config.num_generations,
        max_completion_length=config.max_new_tokens,
        temperature=config.temperature,
        top_p=config.top_p,
        top_k=0,
        shuffle_dataset=False,  # TrlTrainer orders the problems as the native trainer does
        learning_rate=config.learning_rate,
        lr_scheduler_type="constant",
        warmup_steps=0,
        optim="adamw_torch",
        weight_decay=config.weight_decay,
        max_grad_norm=config.max_grad_norm,
        loss_type=config.loss_type,
        epsilon=config.epsilon,
        epsilon_high=config.epsilon_high,
        beta=config.beta,
        use_bias_correction_kl=False,  # TRL 1.16 weights the KL by the ratio by default; the native loss does not
        num_iterations=config.num_iterations,
        scale_rewards="group" if config.scale_rewards else "none",
        reward_weights=config.reward_weights,
        credit=config.credit,
        gamma_amp=config.gamma_amp,
        alpha=config.alpha,
        q=config.q,
        credit_sign=config.credit_sign,
    )
    return CreditGRPOConfig(**{**fields, **overrides})


def job_metrics(logs: dict[str, float], step: int, step_seconds: float) -> dict[str, Any]:
    """One step's TRL log as the native trainer's metrics (the keys jobs report in their events)."""
    return {
        "step": step,
        "reward_mean": logs.get("reward", 0.0),
        "reward_std": logs.get("reward_std", 0.0),
        "accuracy": logs.get("accuracy", 0.0),
        "loss": logs.get("loss", 0.0),
        "kl": logs.get("kl", 0.0),
        "clip_fraction": logs.get("clip_ratio/region_mean", 0.0),
        "gamma_mean": logs.get("credit/gamma_mean", 1.0),
        "flagged_share": logs.get("credit/flagged_share", 0.0),
        "completion_length": logs.get("completions/mean_length", 0.0),
        "step_seconds": step_seconds,
        "credit_seconds": logs.get("credit/seconds", 0.0),
    }


class TrlTrainer:
    """A job's run on :class:`CreditGRPOTrainer`, driven like ``training.trainer.Trainer``."""

    def __init__(
        self,
        lm: LoadedModel,
        config: TrainConfig,
        problems: list[Problem],
        hooks: Hooks | None = None,
        eval_problems: list[Problem] | None = None,
    ) -> None:
        if not problems:
            raise ValueError("no training problems")
        if eval_problems:  # TrainConfig refuses eval_steps with this backend; this says so again
            raise ValueError("held-out evaluation runs on the native backend")
        if config.method != "grpo":
            raise ValueError(f"the trl backend runs method grpo, not {config.method!r}")
        self.lm, self.config, self.hooks = lm, config, hooks or Hooks()
        order = torch.randperm(len(problems), generator=torch.Generator().manual_seed(config.seed)).tolist()
        # the native trainer's order, wrapped around to whole generation batches: TRL's sampler drops a
        # partial one, so a data set smaller than one step would train no step at all
        per_generation = config.prompts_per_step * config.gradient_accumulation_steps
        size = -(-len(order) // per_generation) * per_generation
        self.rows = [self._row(problems[order[i % len(order)]]) for i in range(size)]
        self.step = 0  # steps completed
        self.metrics: dict[str, Any] = {}
        self.trainer: CreditGRPOTrainer | None = None
        self._resume: Path | None = None
        self._cancel_polled = float("-inf")

    def _row(self, problem: Problem) -> dict[str, Any]:
        prompt: Any = (
            [{"role": "user", "content": problem.question}] if self.config.chat else problem.question
        )
        return {"prompt": prompt, "answer": problem.answer}

    # -- the interface workers/runner.py drives --------------------------------------------------------------
    def load_checkpoint(self, path: Path) -> None:
        """Resume from ``path`` (a ``step-N`` directory this backend wrote) when :meth:`train` runs."""
        state = torch.load(path / STATE_FILE, map_location="cpu", weights_only=True)
        if state.get("backend") != "trl":
            raise ValueError(f"{path} is not a checkpoint of the trl backend")
        self.step = int(state["step"])
        self._resume = path

    def train(self, checkpoint_dir: Path | None = None) -> dict[str, Any]:
        with _output_dir(checkpoint_dir) as output_dir:
            self.trainer = self._trainer(output_dir)
            with self._cancel_on_forward():
                self.trainer.train(resume_from_checkpoint=str(self._resume) if self._resume else None)
        if self.trainer.state.global_step != self.config.max_steps:  # never publish a run cut short
            raise RuntimeError(
                f"TRL stopped at step {self.trainer.state.global_step} of {self.config.max_steps}"
            )
        return self.metrics

    def save_adapter(self, path: Path) -> None:
        if self.trainer is None:
            raise RuntimeError("train first")
        save_adapter(self.trainer.accelerator.unwrap_model(self.trainer.model), self.lm, path)

    # -- wiring --------------------------------------------------------------------------------------------------
    def _trainer(self, output_dir: Path) -> CreditGRPOTrainer:
        from datasets import Dataset
        from peft import LoraConfig

        config = self.config
        rewards = [RewardFunction(spec, log_accuracy=i == 0) for i, spec in enumerate(config.rewards)]
        lora = LoraConfig(
            r=config.lora_r,
            lora_alpha=config.lora_alpha,
            lora_dropout=config.lora_dropout,
            target_modules=config.target_modules,
            task_type="CAUSAL_LM",
        )
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)  # TRL wraps the model in LoRA here: seeded as the native trainer's
            trainer = CreditGRPOTrainer(
                model=self.lm.model,
                processing_class=self.lm.tokenizer,
                reward_funcs=rewards,
                args=grpo_config(config, output_dir, use_cpu=self.lm.device.type == "cpu"),
                train_dataset=Dataset.from_list(self.rows),
                peft_config=lora,
                callbacks=[_JobCallback(self)],
            )
        trainer.remove_callback(PrinterCallback)  # the worker's events carry the metrics
        if ADAPTER not in trainer.model.peft_config:
            raise RuntimeError(f"TRL named the adapter {list(trainer.model.peft_config)}, not {ADAPTER!r}")
        return trainer

    def check_cancel(self, rate_limited: bool = True) -> None:
        now = time.monotonic()
        if rate_limited and now - self._cancel_polled < CANCEL_POLL_S:
            return
        self._cancel_polled = now
        if self.hooks.should_cancel():
            raise Cancelled()

    @contextmanager
    def _cancel_on_forward(self) -> Iterator[None]:
        """Every forward pass of the policy (each decode step, each scoring and loss pass) may end a
        cancelled job."""

        def check(_module: torch.nn.Module, _args: tuple) -> None:
            self.check_cancel()

        # the backbone: every path calls it as a module (peft calls the causal LM's ``forward`` directly)
        handle = self.lm.model.base_model.register_forward_pre_hook(check)
        try:
            yield
        finally:
            handle.remove()

    def finish_checkpoint(self, folder: Path, step: int) -> Path:
        """Complete HF's ``checkpoint-N`` with the native checkpoint's files and rename it into place."""
        assert self.trainer is not None
        save_adapter(self.trainer.accelerator.unwrap_model(self.trainer.model), self.lm, folder / "adapter")
        torch.save({"step": step, "backend": "trl"}, folder / STATE_FILE)
        (folder / "metrics.json").write_text(json.dumps(self.metrics))
        target = folder.with_name(f"step-{step:06d}")
        if target.exists():  # the same step written again (a resumed run): the new one replaces it
            shutil.rmtree(target)
        folder.rename(target)
        return target


@contextmanager
def _output_dir(checkpoint_dir: Path | None) -> Iterator[Path]:
    if checkpoint_dir is not None:
        checkpoint_dir.mkdir(parents=True, exist_ok=True)
        yield checkpoint_dir
        return
    with tempfile.TemporaryDirectory(prefix="faithlens-trl-") as scratch:
        yield Path(scratch)


class _JobCallback(TrainerCallback):
    """The native trainer's bookkeeping, on HF Trainer's events: a cancel check before each step, the
    metrics after it, a checkpoint every ``checkpoint_every`` steps but the last."""

    def __init__(self, owner: TrlTrainer) -> None:
        self.owner = owner
        self.started = 0.0
        self.seconds = 0.0

    def on_step_begin(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
        self.owner.check_cancel(rate_limited=False)
        self.started = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
        self.seconds = time.perf_counter() - self.started
        step, config = state.global_step, self.owner.config
        if step % config.checkpoint_every == 0 and step < config.max_steps:
            control.should_save = True
        return control

    def on_log(self, args, state, control, logs=None, **kwargs):  # type: ignore[no-untyped-def]
        if not logs or "reward" not in logs:  # the run's closing summary, not a step
            return
        self.owner.step = state.global_step
        self.owner.metrics = job_metrics(logs, state.global_step, self.seconds)
        self.owner.hooks.on_metrics(state.global_step, self.owner.metrics)

    def on_save(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
        step = state.global_step
        folder = Path(args.output_dir) / f"checkpoint-{step}"
        path = self.owner.finish_checkpoint(folder, step)
        self.owner.hooks.on_checkpoint(step, path, self.owner.metrics)
