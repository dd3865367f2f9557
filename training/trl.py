"""Attention credit assignment (spec §6) for TRL: :class:`CreditGRPOTrainer`, a drop-in ``trl.GRPOTrainer``.

A TRL script switches to credit assignment by changing two names: ``GRPOConfig`` becomes
:class:`CreditGRPOConfig` (plus ``credit="coupled"`` and, if wanted, its parameters) and ``GRPOTrainer``
becomes :class:`CreditGRPOTrainer`. Generation (vLLM included), rewards, group advantages, the loss and its
normalisers, distribution (accelerate, DeepSpeed) stay TRL's code; docs/training.md shows the switch.

**Where γ enters.** TRL 1.16 forms its per-token loss in ``GRPOTrainer._compute_loss``: one forward of the
policy (``_get_per_token_logps_and_entropies``), then ``ratio · advantages``, where ``advantages`` is the
micro-batch's ``(B,)`` tensor, unsqueezed to ``(B, 1)``, or used as is when a subclass hands it ``(B, T)``
(TRL's own comment there invites this). So the one thing we change is the tensor ``_compute_loss`` reads:
Ã_t = γ_t·A_t, ``(B, T)``. That is the narrowest point. Everything before it (sampling, rewards, group
normalisation, old and reference log-probs) and after it (clipping, KL, masks, the ``grpo`` / ``dr_grpo``
/ ``dapo`` normalisers, logging) stays TRL's, and so do its numbers. The alternatives are wider. Shaping
in ``_generate_and_score_completions`` would need a second forward pass just to read attention, because
TRL's generation pass has none to spare at μ = 1. Overriding ``compute_loss`` would copy TRL's 250-line loss.

**Where γ comes from.** It comes from the attention of the loss's own forward pass, as in faithlens's own
trainer (training/trainer.py). A forward pre-hook on the policy's backbone adds the ``faithlens_probe``
keyword, and transformers threads it down to every attention call (faithlens.attention). The probe reads
query and key, detached, for each row's own tokens: TRL left-pads prompts and right-pads completions, so a
row's tokens sit in one contiguous span. The flags, and so γ, are formed before ``_compute_loss`` reads the
advantages. γ must come from the policy that sampled the rollout (spec §6):

* The first loss pass over a micro-batch runs before any optimiser step since that micro-batch's
  generation, whenever ``steps_per_generation`` divides ``gradient_accumulation_steps`` (TRL's default
  makes them equal). γ is kept with the micro-batch in TRL's buffer (key ``credit_gammas``), and the μ − 1
  later passes reuse it. faithlens's trainer reads γ before its first update in the same way.
* Otherwise a generation batch spans optimiser steps. TRL then computes ``old_per_token_logps`` in a
  no-grad pass at generation time, and the probe rides on that pass instead.
* With dropout active in the policy, the flags would depend on dropout masks. A separate no-grad pass in
  eval mode reads γ instead, as faithlens's trainer does with LoRA dropout. TRL's ``disable_dropout=True``
  avoids that pass.

Attention runs through faithlens's attention function (SDPA plus the probe). The trainer installs it on
the policy; a model that asked for flash attention trains on SDPA.

This module overrides private methods of TRL 1.16. If a TRL version reads the advantages before the forward
pass, it refuses to train (:class:`_CreditInputs`) rather than silently dropping γ.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import trl
from pydantic import ValidationError
from trl import GRPOConfig, GRPOTrainer

from faithlens import attention
from faithlens.analysis import metrics_from_probe, new_probe
from faithlens.attention import AttentionProbe, BatchProbe
from faithlens.model import unwrap
from faithlens.params import AnalysisParams
from training.config import TrainHyperparameters
from training.credit import CREDIT_STRATEGIES, CreditStrategy, gamma

__all__ = ["CREDIT_LOSS_TYPES", "CreditGRPOConfig", "CreditGRPOTrainer"]

SUPPORTED_TRL = "1.16."
if not trl.__version__.startswith(SUPPORTED_TRL):
    warnings.warn(
        f"training.trl is written against TRL {SUPPORTED_TRL}x (pip install 'faithlens[trl]'); TRL "
        f"{trl.__version__} is installed. It refuses to train if that TRL reads the advantages before its "
        "forward pass, but other changes are not checked.",
        stacklevel=2,
    )

# The losses faithlens's own trainer implements too (training/loss.py), so both give the same numbers.
CREDIT_LOSS_TYPES = ("grpo", "dr_grpo", "dapo")
CREDIT_KEY = "credit_gammas"  # γ (B, T) of a micro-batch, kept in TRL's buffer for the μ − 1 later passes


@dataclass
class CreditGRPOConfig(GRPOConfig):
    """``GRPOConfig`` plus the credit-assignment fields of faithlens's ``TrainConfig`` (same names, same
    defaults, same bounds: ``training.config.TrainHyperparameters`` validates them)."""

    credit: str = field(
        default="none",
        metadata={
            "help": "Credit-assignment strategy (spec §6), a name from "
            "`training.credit.CREDIT_STRATEGIES`: `none` (γ = 1: plain GRPO), `local_chunk` (amplify preplan "
            "tokens), `global_anchor` (amplify anchor tokens) or `coupled` (amplify anchors, and share a "
            "locally dominated anchor's boost with its introductory token); plugins may register more. Each "
            "token's advantage becomes γ_t·A_t inside the clipped objective, with γ read from the attention "
            "of the loss's own forward pass."
        },
    )
    gamma_amp: float = field(
        default=1.5,
        metadata={"help": "γ_amp: how much a flagged token's advantage is amplified (spec §6). [0, 10]."},
    )
    alpha: float = field(
        default=0.5,
        metadata={
            "help": "α: the share of a locally dominated anchor's boost that moves to its introductory token "
            "(`coupled` only). [0, 1]."
        },
    )
    q: float = field(
        default=0.4,
        metadata={
            "help": "Top-q share of a response's tokens flagged as preplan (by WAAD change) and as anchors "
            "(by FAI), spec §5. (0, 1]."
        },
    )
    credit_sign: str = field(
        default="both",
        metadata={
            "help": "`both` shapes advantages of both signs ([PA] v2's best setting); `positive` shapes only "
            "non-negative advantages ([PA] v1)."
        },
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        names = ("credit", "gamma_amp", "alpha", "q", "credit_sign")
        try:
            TrainHyperparameters.model_validate({name: getattr(self, name) for name in names})
        except ValidationError as exc:
            error = exc.errors()[0]
            raise ValueError(f"CreditGRPOConfig.{error['loc'][0]}: {error['msg']}") from None
        if self.loss_type not in CREDIT_LOSS_TYPES:
            raise ValueError(
                f"CreditGRPOConfig: loss_type {self.loss_type!r} is not supported with credit assignment; use "
                f"one of {', '.join(CREDIT_LOSS_TYPES)} (the losses faithlens's own trainer implements too), "
                "or GRPOTrainer for the others"
            )


@dataclass(frozen=True)
class _Row:
    """Where one row's tokens sit in TRL's (left-padded prompt | right-padded completion) layout."""

    start: int
    prompt: int
    completion: int

    @property
    def length(self) -> int:
        return self.prompt + self.completion


def _rows(attention_mask: torch.Tensor, logits_to_keep: int) -> list[_Row]:
    """Each row's span: its prompt ends where the completion block begins, and its completion begins there."""
    width = attention_mask.shape[1]
    prompt_width = width - logits_to_keep
    prompts = attention_mask[:, :prompt_width].sum(1).tolist()
    completions = attention_mask[:, prompt_width:].sum(1).tolist()
    rows = [_Row(prompt_width - int(p), int(p), int(c)) for p, c in zip(prompts, completions, strict=True)]
    for b, row in enumerate(rows):
        if not bool(attention_mask[b, row.start : row.start + row.length].all()):
            raise ValueError(
                "CreditGRPOTrainer needs each row's tokens in one span (a left-padded prompt followed by a "
                f"right-padded completion, TRL's layout); row {b} has gaps"
            )
    return rows


@dataclass
class _OnePassProbe(BatchProbe):
    """A :class:`BatchProbe` that stops observing once γ is read: a checkpointed layer recomputes its
    attention during backward, with the same keyword arguments, and that pass has nothing new to say."""

    closed: bool = False

    def observe(self, *args: Any, **kwargs: Any) -> None:
        if not self.closed:
            super().observe(*args, **kwargs)


class _CreditInputs(dict):
    """A micro-batch as ``_compute_loss`` reads it, with ``advantages`` replaced by γ·A. Reading the
    advantages before they are shaped means this TRL reads them before its forward pass: refuse."""

    shaped = False

    def shape(self, advantages: torch.Tensor) -> None:
        self["advantages"] = advantages
        self.shaped = True

    def __getitem__(self, key: str) -> Any:
        if key == "advantages" and not self.shaped:
            raise RuntimeError(
                f"TRL {trl.__version__} read the advantages before the loss's forward pass; CreditGRPOTrainer "
                f"reads γ from that pass and supports TRL {SUPPORTED_TRL}x"
            )
        return super().__getitem__(key)


class CreditGRPOTrainer(GRPOTrainer):
    """``trl.GRPOTrainer`` whose per-token advantages carry faithlens's attention credit γ (spec §6).

    Takes exactly GRPOTrainer's arguments; ``args`` must be a :class:`CreditGRPOConfig`. See the module's
    docstring for where γ is read and applied, and why there."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        config = kwargs.get("args", args[2] if len(args) > 2 else None)
        if not isinstance(config, CreditGRPOConfig):
            raise TypeError("CreditGRPOTrainer needs args=CreditGRPOConfig(...) (GRPOConfig plus the credit)")
        self.strategy: CreditStrategy = CREDIT_STRATEGIES.get(config.credit)
        self.analysis_params = AnalysisParams(q=config.q)
        # set while γ is awaited: called with the probes, the rows, the completion width and the seconds spent
        self._pending_read: Callable[[list[AttentionProbe], list[_Row], int, float], None] | None = None
        super().__init__(*args, **kwargs)
        spg, accumulation = self.args.steps_per_generation, self.args.gradient_accumulation_steps
        # spg | accumulation: every micro-batch's first loss pass precedes any optimiser step since its
        # generation (see the module's docstring); else γ is read in TRL's generation-time pass
        self._gammas_at_generation = accumulation % spg != 0
        if self.strategy.needs_flags:
            attention.install(self._causal_lm(self.model))

    # -- the overrides: where γ is read and where it is applied ---------------------------------------------
    def _compute_loss(self, model: torch.nn.Module, inputs: dict[str, Any]) -> torch.Tensor:
        """TRL's loss with ``advantages`` = γ·A (B, T). γ comes from this call's forward pass, or from the
        micro-batch itself when an earlier pass (or the generation pass) read it."""
        if not self.strategy.needs_flags:
            return super()._compute_loss(model, inputs)  # γ = 1: TRL's loss, untouched
        view = _CreditInputs(inputs)
        known = inputs.get(CREDIT_KEY)
        if known is not None:
            view.shape(self._shaped(inputs["advantages"], known))
            return super()._compute_loss(model, view)

        def read(probes: list[AttentionProbe], rows: list[_Row], width: int, seconds: float) -> None:
            gammas = self._gammas(probes, rows, width, seconds, inputs["advantages"].device)
            inputs[CREDIT_KEY] = gammas  # TRL's buffered micro-batch: the μ − 1 later passes reuse it
            view.shape(self._shaped(inputs["advantages"], gammas))

        self._pending_read = read
        try:
            return super()._compute_loss(model, view)
        finally:
            self._pending_read = None

    def _get_per_token_logps_and_entropies(
        self,
        model: torch.nn.Module,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        logits_to_keep: int,
        *args: Any,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """TRL's forward; when γ is awaited, with the probe riding on it (or, with dropout active, after a
        separate eval-mode scoring pass)."""
        read, self._pending_read = self._pending_read, None
        if read is None:
            return super()._get_per_token_logps_and_entropies(
                model, input_ids, attention_mask, logits_to_keep, *args, **kwargs
            )
        rows = _rows(attention_mask, logits_to_keep)
        if self._dropout_active(model):
            probes, seconds = self._scoring_pass(model, input_ids, attention_mask, rows)
            result = super()._get_per_token_logps_and_entropies(
                model, input_ids, attention_mask, logits_to_keep, *args, **kwargs
            )
        else:
            with self._riding(model, rows) as (probes, batches):
                result = super()._get_per_token_logps_and_entropies(
                    model, input_ids, attention_mask, logits_to_keep, *args, **kwargs
                )
            seconds = sum(b.seconds for b in batches)
        read(probes, rows, logits_to_keep, seconds)
        return result

    def _generate_and_score_completions(self, inputs: list[dict[str, Any]]) -> dict[str, Any]:
        """When a generation batch spans optimiser steps, γ is read in TRL's no-grad pass for
        ``old_per_token_logps`` (the sampling policy's) and travels with the batch."""
        if not (self.strategy.needs_flags and self._gammas_at_generation and self.model.training):
            return super()._generate_and_score_completions(inputs)
        found: list[torch.Tensor] = []

        def read(probes: list[AttentionProbe], rows: list[_Row], width: int, seconds: float) -> None:
            found.append(self._gammas(probes, rows, width, seconds, self.accelerator.device))

        self._pending_read = read
        try:
            output = super()._generate_and_score_completions(inputs)
        finally:
            self._pending_read = None
        if not found:
            raise RuntimeError(
                "TRL computed no old log-probs at generation time, where CreditGRPOTrainer reads γ when "
                "steps_per_generation does not divide gradient_accumulation_steps"
            )
        output[CREDIT_KEY] = found[0]
        return output

    # -- γ ---------------------------------------------------------------------------------------------------
    def _causal_lm(self, model: torch.nn.Module) -> torch.nn.Module:
        """The transformers model under accelerate's and peft's wrappers."""
        return unwrap(self.accelerator.unwrap_model(model))

    def _dropout_active(self, model: torch.nn.Module) -> bool:
        wrapped = self.accelerator.unwrap_model(model)
        if not wrapped.training:
            return False
        if float(getattr(self._causal_lm(model).config, "attention_dropout", 0.0) or 0.0) > 0:
            return True
        return any(isinstance(m, torch.nn.Dropout) and m.p > 0 for m in wrapped.modules())

    @contextmanager
    def _riding(
        self, model: torch.nn.Module, rows: list[_Row]
    ) -> Iterator[tuple[list[AttentionProbe], list[_OnePassProbe]]]:
        """A probe per row on the backbone's next forward passes (TRL may chunk the rows into several)."""
        lm = self._causal_lm(model)
        probes = [new_probe(lm, row.prompt, self.analysis_params) for row in rows]
        batches: list[_OnePassProbe] = []
        seen = 0

        def add_probe(_module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
            nonlocal seen
            ids = kwargs.get("input_ids", args[0] if args else None)
            n = (ids if ids is not None else kwargs["inputs_embeds"]).shape[0]
            chunk = rows[seen : seen + n]
            batch = _OnePassProbe(
                probes=probes[seen : seen + n],
                lengths=[row.length for row in chunk],
                starts=[row.start for row in chunk],
            )
            seen += n
            batches.append(batch)
            return args, {**kwargs, "faithlens_probe": batch}

        handle = lm.base_model.register_forward_pre_hook(add_probe, with_kwargs=True)
        try:
            yield probes, batches
        finally:
            handle.remove()
            for batch in batches:
                batch.closed = True
        if seen != len(rows):
            raise RuntimeError(f"the credit probe saw {seen} of {len(rows)} rows")

    @torch.no_grad()
    def _scoring_pass(
        self, model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, rows: list[_Row]
    ) -> tuple[list[AttentionProbe], float]:
        """γ's metrics from a separate no-grad pass in eval mode, so that dropout masks do not move the
        flags; in the chunks TRL uses for its own passes."""
        started = time.perf_counter()
        wrapped = self.accelerator.unwrap_model(model)
        lm = self._causal_lm(model)
        chunk = self.args.per_device_train_batch_size
        wrapped.eval()
        try:
            with self._riding(model, rows) as (probes, _):
                for start in range(0, input_ids.shape[0], chunk):
                    lm.base_model(
                        input_ids=input_ids[start : start + chunk],
                        attention_mask=attention_mask[start : start + chunk],
                        use_cache=False,
                    )
        finally:
            wrapped.train()
        return probes, time.perf_counter() - started

    def _gammas(
        self,
        probes: list[AttentionProbe],
        rows: list[_Row],
        width: int,
        seconds: float,
        device: torch.device,
    ) -> torch.Tensor:
        """γ (B, width) for the rows' completion tokens (1 on padding), and its metrics in TRL's log."""
        started = time.perf_counter()
        config = self.args
        gammas = torch.ones(len(rows), width)
        mask = torch.zeros(len(rows), width, dtype=torch.bool)
        for b, (probe, row) in enumerate(zip(probes, rows, strict=True)):
            if row.completion == 0:
                continue
            flags = metrics_from_probe(probe, row.length, self.analysis_params).flags
            gammas[b, : row.completion] = gamma(
                flags, row.completion, config.credit, config.gamma_amp, config.alpha
            )
            mask[b, : row.completion] = True
        seconds += time.perf_counter() - started
        stats = torch.tensor(
            [float(gammas[mask].sum()), float(mask.sum()), float((gammas[mask] != 1).sum()), seconds],
            device=self.accelerator.device,
        )
        totals = self.accelerator.reduce(stats, reduction="sum")
        tokens = max(float(totals[1]), 1.0)
        mode = "train" if self.model.training else "eval"
        self._metrics[mode]["credit/gamma_mean"].append(float(totals[0]) / tokens)
        self._metrics[mode]["credit/flagged_share"].append(float(totals[2]) / tokens)
        self._metrics[mode]["credit/seconds"].append(float(totals[3]) / self.accelerator.num_processes)
        return gammas.to(device)

    def _shaped(self, advantages: torch.Tensor, gammas: torch.Tensor) -> torch.Tensor:
        """Ã = γ·A (B, T), with γ = 1 on the rows ``credit_sign="positive"`` leaves alone (A < 0)."""
        a = advantages if advantages.dim() == 2 else advantages[:, None]
        gammas = gammas.to(a.device, a.dtype)
        if self.args.credit_sign == "positive":
            gammas = torch.where(a < 0, torch.ones_like(gammas), gammas)
        return (a * gammas).detach()
