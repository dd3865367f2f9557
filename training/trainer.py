"""The GRPO / AtManRL trainer loop on a LoRA adapter (peft).

One step: take ``prompts_per_step`` problems (a seeded order), sample G completions each from the current
policy (continuous batching, a seeded RNG per completion), score rewards, form group advantages, shape them
per token with γ (spec §6), then take ``num_iterations`` (μ) optimiser steps on the clipped surrogate.
γ's metrics are read off the loss's own forward pass (a detached probe on the probed layers' query and
key): that pass runs the current policy, adapter active, before any update, so it is the spec's scoring
pass without paying for a second forward. With LoRA dropout on, a separate no-grad pass in eval mode reads
them instead. Everything random derives from (seed, step), so a run resumed from a checkpoint continues
exactly as an uninterrupted one.

The ratio's old log-probs are the sampling policy's. With μ = 1 the policy has not moved when the loss is
taken, so they are the loss pass's own, detached (ratio 1), as TRL does. With μ > 1 they are computed
once per generation batch, in a no-grad pass before the first update (which also reads γ's metrics), and
held fixed across the μ iterations, like TRL's ``old_per_token_logps``: from the second iteration on the
ratio measures how far the policy moved and clipping acts.

A cancel (``Hooks.should_cancel``) is honoured within a step too: sampling checks it between decode steps,
scoring between rollouts, the optimisation between micro-batches and iterations, each at most every
``CANCEL_POLL_S`` seconds, so a large step cannot hold a cancelled job (and its worker).
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from faithlens.adapter_check import write_base_identity
from faithlens.analysis import metrics_from_probe, new_probe
from faithlens.answer import char_span_to_tokens, find_answer_span
from faithlens.atman import MaskSaliency, atman_rl_saliency
from faithlens.attention import BatchProbe
from faithlens.batching import DecodeBatch, SequenceState
from faithlens.data import Problem
from faithlens.model import LoadedModel, unwrap
from faithlens.params import AnalysisParams, SamplingParams
from training import rewards as reward_lib
from training.config import TrainConfig
from training.credit import CREDIT_STRATEGIES, gamma, shape_advantages
from training.eval import held_out_accuracy
from training.loss import Normaliser, clipped_surrogate

log = logging.getLogger("faithlens.training")
ADAPTER = "default"
CANCEL_POLL_S = 0.2  # within a step, ask should_cancel at most this often (it may be a Redis round trip)


class Cancelled(Exception):
    """Raised when the job was cancelled: between steps, or within one (see the module's docstring)."""


@dataclass
class Hooks:
    on_metrics: Callable[[int, dict], None] = lambda step, metrics: None
    should_cancel: Callable[[], bool] = lambda: False
    on_checkpoint: Callable[[int, Path, dict], None] = lambda step, path, metrics: None
    on_eval: Callable[[int, dict], None] = lambda step, results: None


@dataclass
class Rollout:
    problem: Problem
    prompt_ids: list[int]
    completion_ids: list[int]
    text: str
    reward: float = 0.0
    correct: bool = False
    r_faith: float | None = None
    advantage: float = 0.0
    gammas: torch.Tensor | None = None  # None until the loss's forward pass has read the metrics


def attach_lora(lm: LoadedModel, config: TrainConfig) -> None:
    """Wrap the model in a fresh, seeded LoRA adapter (trainable)."""
    from peft import LoraConfig, get_peft_model

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        lm.model = get_peft_model(
            lm.model,
            LoraConfig(
                r=config.lora_r,
                lora_alpha=config.lora_alpha,
                lora_dropout=config.lora_dropout,
                target_modules=config.target_modules,
                task_type="CAUSAL_LM",
            ),
            adapter_name=ADAPTER,
        )


class Trainer:
    def __init__(
        self,
        lm: LoadedModel,
        config: TrainConfig,
        problems: list[Problem],
        hooks: Hooks | None = None,
        eval_problems: list[Problem] | None = None,
    ):
        if not problems:
            raise ValueError("no training problems")
        if (config.eval_steps is None) != (not eval_problems):
            raise ValueError("eval_steps and evaluation problems come together")
        self.lm, self.config, self.problems = lm, config, problems
        self.eval_problems = eval_problems or []
        self.hooks = hooks or Hooks()
        attach_lora(lm, config)
        self.params = [p for p in lm.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(
            self.params, lr=config.learning_rate, weight_decay=config.weight_decay
        )
        self.reward_fns = [reward_lib.build(spec) for spec in config.rewards]
        self.reward_weights = config.reward_weights or [1.0] * len(self.reward_fns)
        order = torch.randperm(len(problems), generator=torch.Generator().manual_seed(config.seed))
        self.order = order.tolist()
        self.step = 0  # steps completed
        self._cancel_polled = float("-inf")  # when should_cancel was last asked within a step
        self._credit_seconds = 0.0  # this step's time spent on γ: probing, metrics, flags
        self._prompt_cache: dict[int, list[int]] = {}
        self._decoder: DecodeBatch | None = None  # kept across steps (its cache, and on CUDA its graphs)

    # -- the loop ----------------------------------------------------------------------------------------
    def train(self, checkpoint_dir: Path | None = None) -> dict:
        metrics: dict = {}
        if self.step == 0 and self.config.eval_on_start:
            self.hooks.on_eval(0, self.evaluate())
        while self.step < self.config.max_steps:
            if self.hooks.should_cancel():
                raise Cancelled()
            metrics = self.train_step()
            self.hooks.on_metrics(self.step, metrics)
            last = self.step == self.config.max_steps
            every = self.config.eval_steps
            if every is not None and (self.step % every == 0 or last):  # before the checkpoint: a
                self.hooks.on_eval(self.step, self.evaluate())  # resumed run never skips one
            if checkpoint_dir is not None and (self.step % self.config.checkpoint_every == 0 and not last):
                path = checkpoint_dir / f"step-{self.step:06d}"
                self.save_checkpoint(path, metrics)
                self.hooks.on_checkpoint(self.step, path, metrics)
        return metrics

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Greedy accuracy of the current policy on the held-out problems (``eval_limit`` of them)."""
        self.lm.model.eval()
        problems = self.eval_problems[: self.config.eval_limit]
        results = held_out_accuracy(self.lm, problems, ADAPTER, self.config.max_new_tokens, self.config.chat)
        return {"step": self.step, **results}

    def _check_cancel(self) -> None:
        """Within a step: raise :class:`Cancelled` if the job was cancelled (asked at most every
        ``CANCEL_POLL_S``)."""
        now = time.monotonic()
        if now - self._cancel_polled < CANCEL_POLL_S:
            return
        self._cancel_polled = now
        if self.hooks.should_cancel():
            raise Cancelled()

    def train_step(self) -> dict:
        started = time.perf_counter()
        self._credit_seconds = 0.0
        config = self.config
        micro_batches = [self._rollouts(micro) for micro in range(config.gradient_accumulation_steps)]
        rollouts = [r for batch in micro_batches for r in batch]
        normaliser = Normaliser(
            config.loss_type,
            len(rollouts),
            sum(len(r.completion_ids) for r in rollouts),
            config.max_new_tokens,
        )
        # μ > 1: the sampling policy's log-probs, taken before the first update and held for all μ passes
        olds: list[torch.Tensor | None] = [None] * len(micro_batches)
        if config.num_iterations > 1:
            olds = [self._old_logprobs(batch) for batch in micro_batches]
        loss_total, kl_sum, clipped = 0.0, 0.0, 0.0
        for _ in range(config.num_iterations):
            self.optimizer.zero_grad(set_to_none=True)
            for batch, old in zip(micro_batches, olds, strict=True):
                self._check_cancel()
                loss, stats = self._loss(batch, normaliser, old)
                if loss is not None:
                    loss.backward()
                    loss_total += float(loss.detach())
                    kl_sum += stats["kl_sum"]
                    clipped += stats["clip_fraction"]
            torch.nn.utils.clip_grad_norm_(self.params, config.max_grad_norm)
            self.optimizer.step()
        self.step += 1
        tokens = max(normaliser.tokens, 1)
        all_gammas = torch.cat([r.gammas for r in rollouts if r.gammas is not None] or [torch.ones(0)])
        rewards = torch.tensor([r.reward for r in rollouts])
        metrics = {
            "step": self.step,
            "reward_mean": float(rewards.mean()),
            "reward_std": float(rewards.std()) if len(rewards) > 1 else 0.0,
            "accuracy": sum(r.correct for r in rollouts) / len(rollouts),
            "loss": loss_total / config.num_iterations,
            "kl": kl_sum / tokens / config.num_iterations,
            "clip_fraction": clipped / tokens / config.num_iterations,
            "gamma_mean": float(all_gammas.mean()) if all_gammas.numel() else 1.0,
            "flagged_share": int((all_gammas != 1).sum()) / tokens,
            "completion_length": normaliser.tokens / len(rollouts),
            "step_seconds": time.perf_counter() - started,
            "credit_seconds": self._credit_seconds,
        }
        if config.method == "atmanrl":
            metrics.update(r_faith_metrics(rollouts, config.num_generations))
        return metrics

    # -- rollouts --------------------------------------------------------------------------------------------
    def _problems_for(self, micro: int) -> list[Problem]:
        per = self.config.prompts_per_step
        start = (self.step * self.config.gradient_accumulation_steps + micro) * per
        return [self.problems[self.order[(start + i) % len(self.order)]] for i in range(per)]

    def _prompt_ids(self, problem: Problem) -> list[int]:
        key = id(problem)
        if key not in self._prompt_cache:
            self._prompt_cache[key] = self.lm.prompt_ids(problem.question, chat=self.config.chat)
        return self._prompt_cache[key]

    @torch.no_grad()
    def _sample(self, problems: list[Problem], micro: int) -> list[Rollout]:
        """G completions per problem from the current policy, each with its own seeded RNG."""
        config = self.config
        self.lm.model.eval()
        seqs: list[tuple[Problem, SequenceState]] = []
        for p_index, problem in enumerate(problems):
            prompt = self._prompt_ids(problem)
            for g in range(config.num_generations):
                seed = hash((config.seed, self.step, micro, p_index, g)) & 0x7FFFFFFF
                params = SamplingParams(
                    max_new_tokens=config.max_new_tokens,
                    temperature=config.temperature,
                    top_p=config.top_p,
                    seed=seed,
                )
                seqs.append((problem, SequenceState(prompt, params, adapter=ADAPTER)))
        batch = self._decode_batch([seq for _, seq in seqs])
        for _, seq in seqs:
            self._check_cancel()
            batch.add(seq)
        while len(batch):
            self._check_cancel()
            batch.step()
        return [Rollout(problem, seq.prompt_ids, seq.token_ids, seq.text) for problem, seq in seqs]

    def _decode_batch(self, seqs: list[SequenceState]) -> DecodeBatch:
        """The trainer's decode batch, made again only when a step needs more slots or context."""
        context = max(len(seq.prompt_ids) + seq.params.max_new_tokens for seq in seqs)
        if self._decoder is None or not self._decoder.fits(len(seqs), context):
            if self._decoder is not None:
                context = max(context, self._decoder.max_context)
            self._decoder = DecodeBatch(self.lm, slots=len(seqs), max_context=context)
        return self._decoder

    def _rollouts(self, micro: int) -> list[Rollout]:
        config = self.config
        rollouts = self._sample(self._problems_for(micro), micro)
        for r in rollouts:
            self._check_cancel()
            sample = reward_lib.Sample(r.prompt_ids, r.completion_ids, r.text, r.problem.answer)
            r.correct = reward_lib.correctness(sample) == 1.0
            r.reward = sum(w * fn(sample) for w, fn in zip(self.reward_weights, self.reward_fns, strict=True))
            if config.method == "atmanrl":
                r.r_faith = self._r_faith(r)
                r.reward = reward_lib.outcome_atmanrl(sample) + config.faith_lambda * r.r_faith
        g = config.num_generations
        for start in range(0, len(rollouts), g):
            group = rollouts[start : start + g]
            rewards = torch.tensor([r.reward for r in group])
            centred = rewards - rewards.mean()
            if config.scale_rewards:
                centred = centred / (rewards.std() + 1e-4)
            for r, a in zip(group, centred.tolist(), strict=True):
                r.advantage = a
        for r in rollouts:
            if not CREDIT_STRATEGIES.get(config.credit).needs_flags or not r.completion_ids:
                r.gammas = torch.ones(len(r.completion_ids))
        return rollouts

    # -- credit (spec §6) -----------------------------------------------------------------------------------
    def _gamma_probe(self, rollouts: list[Rollout]) -> BatchProbe | None:
        """A probe for every rollout of the batch, or None when γ is known already."""
        if all(r.gammas is not None for r in rollouts):
            return None
        params = self._analysis_params()
        return BatchProbe(
            probes=[new_probe(self.lm, len(r.prompt_ids), params) for r in rollouts],
            lengths=[len(r.prompt_ids) + len(r.completion_ids) for r in rollouts],
        )

    def _analysis_params(self) -> AnalysisParams:
        return AnalysisParams(q=self.config.q)

    def _set_gammas(self, rollouts: list[Rollout], probe: BatchProbe) -> None:
        started = time.perf_counter()
        params, c = self._analysis_params(), self.config
        for r, one, n in zip(rollouts, probe.probes, probe.lengths, strict=True):
            if r.gammas is not None:
                continue
            flags = metrics_from_probe(one, n, params).flags
            r.gammas = gamma(flags, len(r.completion_ids), c.credit, c.gamma_amp, c.alpha)
        self._credit_seconds += probe.seconds + time.perf_counter() - started

    @torch.no_grad()
    def _scoring_pass(self, rollouts: list[Rollout], probe: BatchProbe) -> None:
        """A separate no-grad pass in eval mode, for when dropout would perturb the training forward."""
        started = time.perf_counter()
        self.lm.model.eval()
        ids, attention = self._padded(rollouts)
        model = unwrap(self.lm.model)
        backbone = getattr(model, model.base_model_prefix)
        backbone(input_ids=ids, attention_mask=attention, use_cache=False, faithlens_probe=probe)
        probe.seconds = time.perf_counter() - started  # the whole pass is credit's cost here
        self._set_gammas(rollouts, probe)

    def _r_faith(self, r: Rollout) -> float:
        """R_faith = mean_v s_v over the CoT (spec §8); 0 when there is no answer span or no CoT."""
        fit = fit_faith_mask(
            self.lm, r.prompt_ids, r.completion_ids, r.text, self.config.mask_steps, self.config.seed
        )
        return 0.0 if fit is None else float(fit.r_faith)

    # -- the objective -----------------------------------------------------------------------------------------
    def _padded(self, rollouts: list[Rollout]) -> tuple[torch.Tensor, torch.Tensor]:
        """prompt+completion ids, right-padded, and their attention mask."""
        device = self.lm.device
        width = max(len(r.prompt_ids) + len(r.completion_ids) for r in rollouts)
        pad = self.lm.tokenizer.pad_token_id or 0
        ids = torch.full((len(rollouts), width), pad, device=device)
        attention = torch.zeros_like(ids)
        for i, r in enumerate(rollouts):
            seq = r.prompt_ids + r.completion_ids
            ids[i, : len(seq)] = torch.tensor(seq, device=device)
            attention[i, : len(seq)] = 1
        return ids, attention

    def _token_logprobs(
        self, rollouts: list[Rollout], probe: BatchProbe | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """log π(completion token) for a right-padded batch: (B, T) log-probs and mask."""
        device = self.lm.device
        lengths = [len(r.completion_ids) for r in rollouts]
        ids, attention = self._padded(rollouts)
        extra = {} if probe is None else {"faithlens_probe": probe}
        logits = self.lm.model(
            input_ids=ids, attention_mask=attention, use_cache=False, **extra
        ).logits.float()
        t_max = max(lengths)
        logp = torch.zeros(len(rollouts), t_max, device=device)
        mask = torch.zeros(len(rollouts), t_max, device=device)
        for i, r in enumerate(rollouts):
            n, p = lengths[i], len(r.prompt_ids)
            if n == 0:
                continue
            rows = torch.log_softmax(logits[i, p - 1 : p - 1 + n], dim=-1)
            logp[i, :n] = rows.gather(-1, torch.tensor(r.completion_ids, device=device)[:, None])[:, 0]
            mask[i, :n] = 1
        return logp, mask

    @torch.no_grad()
    def _old_logprobs(self, rollouts: list[Rollout]) -> torch.Tensor | None:
        """The sampling policy's log-probs of the completions, (B, T) as :meth:`_token_logprobs`: the
        current weights, before any update of this step, in eval mode (as the rollouts were sampled). The
        pass also reads γ's metrics, so the loss passes need no probe."""
        self._check_cancel()
        if not any(r.completion_ids for r in rollouts):
            return None
        self.lm.model.eval()
        probe = self._gamma_probe(rollouts)
        logp, _ = self._token_logprobs(rollouts, probe)
        if probe is not None:
            self._set_gammas(rollouts, probe)
        return logp

    def _loss(
        self, rollouts: list[Rollout], normaliser: Normaliser, old: torch.Tensor | None = None
    ) -> tuple[torch.Tensor | None, dict]:
        """The micro-batch's loss. ``old``: the sampling policy's log-probs (μ > 1); None means the
        policy has not moved since sampling (μ = 1), so this pass's own log-probs, detached, are."""
        if not any(r.completion_ids for r in rollouts):
            return None, {"kl_sum": 0.0, "clip_fraction": 0.0}
        config = self.config
        probe = self._gamma_probe(rollouts)
        if probe is not None and config.lora_dropout > 0:
            self._scoring_pass(rollouts, probe)
            probe = None
        self.lm.model.train()
        logp, mask = self._token_logprobs(rollouts, probe)
        if probe is not None:
            self._set_gammas(rollouts, probe)
        advantages = torch.zeros_like(logp)
        for i, r in enumerate(rollouts):
            n = len(r.completion_ids)
            if n:
                advantages[i, :n] = shape_advantages(r.advantage, r.gammas, config.credit_sign).to(
                    logp.device
                )
        ref = None
        if config.beta:
            with torch.no_grad(), self.lm.model.disable_adapter():
                ref, _ = self._token_logprobs(rollouts)
        if old is None:
            old = logp.detach()  # μ = 1: the sampling policy is the current one (ratio 1)
        return clipped_surrogate(
            logp,
            old,
            advantages.detach(),
            mask,
            normaliser,
            config.epsilon,
            config.epsilon_high,
            config.beta,
            ref,
        )

    # -- persistence -------------------------------------------------------------------------------------------
    def save_adapter(self, path: Path) -> None:
        save_adapter(self.lm.model, self.lm, path)

    def save_checkpoint(self, path: Path, metrics: dict) -> None:
        """Write the checkpoint beside ``path`` and rename it into place: a worker killed mid-write leaves
        only a ``.partial`` directory (cleared by the next attempt), never a ``path`` that looks complete
        with a truncated file in it."""
        partial = path.with_name(path.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        self.save_adapter(partial / "adapter")
        state = {"optimizer": self.optimizer.state_dict(), "step": self.step}
        torch.save(state, partial / "trainer_state.pt")
        (partial / "metrics.json").write_text(json.dumps(metrics))
        if path.exists():  # the same step written again (a resumed run): the new one replaces it
            shutil.rmtree(path)
        partial.rename(path)

    def load_checkpoint(self, path: Path) -> None:
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        weights = load_file(path / "adapter" / "adapter_model.safetensors", device=str(self.lm.device))
        set_peft_model_state_dict(self.lm.model, weights, adapter_name=ADAPTER)
        state = torch.load(path / "trainer_state.pt", map_location=self.lm.device, weights_only=True)
        self.optimizer.load_state_dict(state["optimizer"])
        self.step = int(state["step"])


def save_adapter(model: torch.nn.Module, lm: LoadedModel, path: Path) -> None:
    """Write the LoRA adapter ``ADAPTER`` of the peft ``model`` (trained on ``lm``'s base) as the adapter
    store holds it: a flat directory the server loads, with the base model it fits. Both backends publish
    through this one function, so their adapters are interchangeable."""
    model.save_pretrained(path, selected_adapters=[ADAPTER], safe_serialization=True)
    _flatten_adapter_dir(path)
    write_base_identity(path, lm)  # which base model it fits (faithlens.adapter_check)


def _flatten_adapter_dir(path: Path) -> None:
    """peft writes a non-default adapter into a subfolder; keep ``path`` itself loadable."""
    nested = path / ADAPTER
    if nested.is_dir():
        for item in nested.iterdir():
            item.replace(path / item.name)
        nested.rmdir()


def r_faith_metrics(rollouts: list[Rollout], group_size: int) -> dict[str, float]:
    """R_faith's mean over the step's completions, and its spread within a GRPO group (the mean over
    groups of max − min): the part of the reward the advantage can see. A spread far below an outcome flip
    (1) means AtManRL trains on its outcome reward alone (issue 34's measurement)."""
    faith = [r.r_faith if r.r_faith is not None else 0.0 for r in rollouts]
    groups = [faith[i : i + group_size] for i in range(0, len(faith), group_size)]
    spreads = [max(g) - min(g) for g in groups if g]
    return {
        "r_faith_mean": sum(faith) / len(faith) if faith else 0.0,
        "r_faith_group_spread": sum(spreads) / len(spreads) if spreads else 0.0,
    }


def fit_faith_mask(
    lm: LoadedModel,
    prompt_ids: list[int],
    completion_ids: list[int],
    text: str,
    steps: int,
    seed: int = 0,
    lr: float | None = None,
) -> MaskSaliency | None:
    """AtManRL's mask on one completion (spec §8): the CoT is the completion before its answer span (§9),
    the answer what the mask must restore. None when there is no answer span or no CoT before it. ``lr``
    defaults to the step budget (0.2 / steps)."""
    span = find_answer_span(text)
    if span is None or not completion_ids:
        return None
    tokens = char_span_to_tokens(lm.token_texts(completion_ids), span)
    if tokens is None or tokens[0] == 0:
        return None
    offset = len(prompt_ids)
    cot = list(range(offset, offset + tokens[0]))
    answer = list(range(offset + tokens[0], offset + tokens[1]))
    return atman_rl_saliency(lm, prompt_ids + completion_ids, cot, answer, steps=steps, lr=lr, seed=seed)
