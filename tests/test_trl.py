"""CreditGRPOTrainer (training/trl.py) against faithlens's own trainer: the same loss and LoRA gradients for
every credit strategy on every tiny model; the same γ with dropout and with generation batches that span
optimiser steps; two processes equal to one; the config's refusals; the docs' example, run as written.

Generation is out of every comparison: both trainers get the same fixed completions (tests/trl_runs.py)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from typing import Any

import pytest
import torch
from transformers import TrainerCallback

from faithlens.tiny import save_tiny
from tests.servers import REPO, free_port
from tests.trl_runs import (
    PROBLEMS,
    distributed_config,
    distributed_run,
    lora_grads,
    lora_state,
    lora_weights,
    native_trainer,
    train_config,
    trl_trainer,
)
from training.credit import CREDIT_STRATEGIES
from training.trl import CREDIT_KEY, CreditGRPOConfig, CreditGRPOTrainer

ARCHS = ("llama", "qwen2", "qwen3")
CREDITS = ("none", "local_chunk", "global_anchor", "coupled")
LOSS_ATOL = 1e-5
GRAD_RTOL = 1e-4


class Recording(CreditGRPOTrainer):
    """Keeps each micro-batch's loss, completions and γ, and whether γ was already known when its loss
    pass began (read at generation time, or by an earlier of the μ passes)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.losses: list[float] = []
        self.batches: list[dict[str, Any]] = []

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):  # type: ignore[no-untyped-def]
        known = CREDIT_KEY in inputs
        loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        self.losses.append(float(loss.detach()))
        self.batches.append(
            {
                "known": known,
                "completion_ids": inputs["completion_ids"].clone(),
                "completion_mask": inputs["completion_mask"].clone(),
                "gammas": inputs.get(CREDIT_KEY),
            }
        )
        return loss


class Gradients(TrainerCallback):
    """The LoRA gradients as the optimiser is about to see them, at each optimiser step."""

    def __init__(self) -> None:
        self.steps: list[dict[str, torch.Tensor]] = []
        self.model: torch.nn.Module | None = None

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):  # type: ignore[no-untyped-def]
        self.steps.append(lora_grads(model))


def assert_same_gradients(want: dict[str, torch.Tensor], got: dict[str, torch.Tensor]) -> None:
    assert want.keys() == got.keys() and want
    for name, grad in want.items():
        assert grad.norm() > 0, name  # a zero gradient would compare equal whatever the loss did
        error = float((got[name] - grad).norm() / grad.norm())
        assert error < GRAD_RTOL, (name, error)


def gammas_by_completion(batches: list[dict[str, Any]]) -> dict[tuple[int, ...], torch.Tensor]:
    """γ of each completion TRL trained on, keyed by its token ids."""
    out = {}
    for batch in batches:
        for ids, mask, gammas in zip(
            batch["completion_ids"], batch["completion_mask"], batch["gammas"], strict=True
        ):
            n = int(mask.sum())
            out[tuple(ids[:n].tolist())] = gammas[:n].cpu()
    return out


def native_gammas(trainer) -> dict[tuple[int, ...], torch.Tensor]:
    """γ of each rollout of the native trainer's step (``_rollouts`` after ``train_step`` re-samples them, so
    read them off a fresh step's micro-batches instead)."""
    out = {}
    for micro in range(trainer.config.gradient_accumulation_steps):
        rollouts = trainer._rollouts(micro)
        probe = trainer._gamma_probe(rollouts)
        if probe is not None:
            trainer._scoring_pass(rollouts, probe)
        for r in rollouts:
            out[tuple(r.completion_ids)] = r.gammas
    return out


# -- the same numbers ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("credit", CREDITS)
def test_one_step_equals_the_native_trainer(arch, credit, tmp_path):
    config = train_config(credit=credit)
    native = native_trainer(arch, config)
    metrics = native.train_step()
    grads = Gradients()
    trl = trl_trainer(arch, config, tmp_path, callbacks=[grads], trainer_class=Recording)
    trl.train()
    assert len(trl.losses) == 1 and len(grads.steps) == 1
    assert abs(trl.losses[0] - metrics["loss"]) < LOSS_ATOL, (trl.losses, metrics["loss"])
    assert_same_gradients(lora_grads(native.lm.model), grads.steps[0])
    logged = trl.state.log_history[0]
    if CREDIT_STRATEGIES.get(credit).needs_flags:
        assert metrics["flagged_share"] > 0  # γ ≠ 1 somewhere: the comparison covers the credit itself
        assert logged["credit/gamma_mean"] == pytest.approx(metrics["gamma_mean"], abs=1e-6)
        assert logged["credit/flagged_share"] == pytest.approx(metrics["flagged_share"], abs=1e-6)
        assert all(b["gammas"] is not None and not b["known"] for b in trl.batches)
    else:
        assert "credit/gamma_mean" not in logged  # credit "none" is TRL's loss, untouched


@pytest.mark.parametrize("loss_type", ["grpo", "dr_grpo"])
def test_the_other_loss_normalisers_equal_the_native_trainer(loss_type, tmp_path):
    config = train_config(credit="coupled", loss_type=loss_type)
    native = native_trainer("llama", config)
    metrics = native.train_step()
    grads = Gradients()
    trl = trl_trainer("llama", config, tmp_path, callbacks=[grads], trainer_class=Recording)
    trl.train()
    assert abs(trl.losses[0] - metrics["loss"]) < LOSS_ATOL
    assert_same_gradients(lora_grads(native.lm.model), grads.steps[0])


def test_mu_accumulation_kl_and_positive_shaping_equal_the_native_trainer(tmp_path):
    """μ = 2 passes over two accumulated micro-batches, KL to the base, shaping only A ≥ 0: one native step
    is two optimiser steps, as TRL counts them. γ is read on the first pass and reused on the second (the
    policy has moved by then), the old log-probs are the sampling policy's, the weights end equal."""
    config = train_config(
        credit="coupled", num_iterations=2, gradient_accumulation_steps=2, beta=0.1, credit_sign="positive"
    )
    native = native_trainer("llama", config)
    metrics = native.train_step()
    grads = Gradients()
    trl = trl_trainer("llama", config, tmp_path, callbacks=[grads], trainer_class=Recording, max_steps=2)
    trl.train()
    assert len(trl.losses) == 4 and len(grads.steps) == 2
    assert [b["known"] for b in trl.batches] == [False, False, True, True]  # read once, then reused
    assert abs(sum(trl.losses) / 2 - metrics["loss"]) < LOSS_ATOL
    assert metrics["kl"] > 0 and metrics["clip_fraction"] > 0  # the second pass saw a moved policy
    assert_same_gradients(lora_grads(native.lm.model), grads.steps[-1])
    want = lora_weights(native.lm.model)
    got = lora_weights(trl.accelerator.unwrap_model(trl.model))
    start = lora_state(native.lm.model)
    for key, value in want.items():
        assert not torch.equal(value, start[key])
        assert torch.allclose(got[key], value, rtol=1e-4, atol=1e-5), key  # lr 1e-2: 0.1% of a step


def test_gamma_with_dropout_comes_from_an_eval_pass_as_in_the_native_trainer(tmp_path):
    """LoRA dropout on: both trainers read γ in a separate eval-mode pass, so γ is the same, dropout or not."""
    config = train_config(credit="coupled", lora_dropout=0.3, gradient_accumulation_steps=2)
    want = native_gammas(native_trainer("llama", config))
    trl = trl_trainer("llama", config, tmp_path, trainer_class=Recording)
    trl.train()
    got = gammas_by_completion(trl.batches)
    assert got.keys() == want.keys()
    assert any((g != 1).any() for g in want.values())
    for ids, gammas in want.items():
        assert torch.equal(got[ids], gammas), ids


def test_generation_batches_spanning_optimiser_steps_read_gamma_at_generation(tmp_path):
    """steps_per_generation = 2 > gradient_accumulation_steps = 1: the second micro-batch is trained after
    an optimiser step, so its γ must come from TRL's generation-time pass (the sampling policy), not from
    its own loss pass. It equals the native trainer's γ at the initial weights."""
    config = train_config(credit="coupled", learning_rate=5e-2)
    want = native_gammas(
        native_trainer("llama", train_config(credit="coupled", gradient_accumulation_steps=2))
    )
    trl = trl_trainer("llama", config, tmp_path, trainer_class=Recording, max_steps=2, steps_per_generation=2)
    assert trl._gammas_at_generation
    trl.train()
    assert [b["known"] for b in trl.batches] == [True, True]
    got = gammas_by_completion(trl.batches)
    assert got.keys() == want.keys()
    for ids, gammas in want.items():
        assert torch.equal(got[ids], gammas), ids


# -- distributed ----------------------------------------------------------------------------------------------
def test_two_processes_end_with_the_weights_of_one(tmp_path):
    """``accelerate launch`` with two CPU processes (gloo): two steps, each rank holding half the global
    batch. Both ranks end with the same LoRA weights, equal to one process over the whole batch."""
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", "TRL_EXPERIMENTAL_SILENCE": "1"}
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_port", str(free_port()), str(REPO / "tests" / "trl_runs.py"), str(tmp_path),
    ]  # fmt: skip
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    ranks = [torch.load(tmp_path / f"rank{i}.pt", weights_only=True) for i in (0, 1)]
    assert [(r["world_size"], r["backend"]) for r in ranks] == [(2, "gloo"), (2, "gloo")]
    single = distributed_run(tmp_path / "single", world_size=1)
    start = lora_state(native_trainer("llama", distributed_config()).lm.model)
    assert ranks[0]["weights"].keys() == single.keys() == start.keys()
    for key, value in single.items():
        assert not torch.equal(value, start[key]), key  # two steps moved every LoRA weight
        assert torch.equal(ranks[0]["weights"][key], ranks[1]["weights"][key]), key
        assert torch.allclose(ranks[0]["weights"][key], value, rtol=1e-4, atol=1e-5), key


# -- the config ---------------------------------------------------------------------------------------------------
def test_config_refuses_what_it_does_not_support(tmp_path):
    base = {"output_dir": str(tmp_path), "use_cpu": True, "bf16": False, "report_to": "none"}
    for loss_type in ("bnpo", "cispo", "sapo", "luspo", "vespo"):
        with pytest.raises(ValueError, match=f"loss_type '{loss_type}' is not supported"):
            CreditGRPOConfig(**base, loss_type=loss_type, credit="coupled")
    with pytest.raises(ValueError, match=r"CreditGRPOConfig\.credit: .*unknown credit strategy 'everything'"):
        CreditGRPOConfig(**base, credit="everything")
    for bad in ({"gamma_amp": -1.0}, {"alpha": 2.0}, {"q": 0.0}, {"credit_sign": "negative"}):
        with pytest.raises(ValueError, match=f"CreditGRPOConfig.{next(iter(bad))}"):
            CreditGRPOConfig(**base, **bad)
    config = CreditGRPOConfig(**base, credit="coupled", loss_type="dr_grpo", gamma_amp=2.0)
    assert (config.credit, config.gamma_amp, config.alpha, config.q) == ("coupled", 2.0, 0.5, 0.4)
    help_text = CreditGRPOConfig.__dataclass_fields__["credit"].metadata["help"]
    assert "coupled" in help_text


def test_trainer_needs_the_credit_config(tmp_path):
    from trl import GRPOConfig

    args = GRPOConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, report_to="none")
    with pytest.raises(TypeError, match="CreditGRPOConfig"):
        CreditGRPOTrainer(model="unused", reward_funcs=[], args=args)


def test_nothing_but_the_trl_backend_imports_trl():
    """TRL is an optional extra: the server, the worker and the training package load without it."""
    code = (
        "import sys; import service.app, workers.runner, workers.tasks, training.trainer, training.config; "
        "bad = [m for m in sys.modules if m == 'trl' or m.startswith('trl.') or m.startswith('training.trl')]; "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr


# -- docs/training.md ----------------------------------------------------------------------------------------------
def training_doc_example() -> str:
    text = (REPO / "docs" / "training.md").read_text()
    section = text.split("## Attention credit in a TRL script", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert len(blocks) == 1, "the section holds one runnable example"
    return blocks[0]


def test_the_docs_trl_example_runs_as_written(tmp_path):
    """The example a TRL user copies: a GRPOTrainer script switched to credit assignment. It runs on the
    model ``$MODEL`` names (here a tiny one: the docs' default is a Hub id) and prints γ's mean."""
    code = training_doc_example()
    assert "CreditGRPOConfig(" in code and "CreditGRPOTrainer(" in code
    script = tmp_path / "example.py"
    script.write_text(code)
    env = {
        **os.environ,
        "MODEL": str(save_tiny(tmp_path / "tiny-llama")),
        "PYTHONPATH": str(REPO),
        "CUDA_VISIBLE_DEVICES": "",
    }
    done = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    gamma_mean = float(done.stdout.strip().splitlines()[-1].split()[-1])
    assert gamma_mean > 1.0, done.stdout  # coupled credit amplified some tokens


def test_fixed_completions_cover_every_problem():
    """The helpers' premise: every problem has its group, and each group's rewards vary (non-zero
    advantages), so the comparisons above are over a loss that moves the weights."""
    from tests.trl_runs import TARGET, completions

    fixed = completions(4)
    assert set(fixed) == {p.question for p in PROBLEMS}
    for group in fixed.values():
        starts = [ids[0] == TARGET for ids in group]
        assert any(starts) and not all(starts)


# -- the jobs' trl backend ------------------------------------------------------------------------------------------
def test_trl_backend_resumed_from_a_checkpoint_equals_an_uninterrupted_run(tmp_path):
    """A job resumed from its ``step-N`` checkpoint (TRL's own state plus the native files) continues
    exactly as an uninterrupted run: adapter, optimiser, RNG and data order all come back."""
    from faithlens.tiny import tiny_loaded_model
    from training.config import TrainConfig
    from training.trainer import Hooks
    from training.trl_backend import TrlTrainer

    def peaky():
        lm = tiny_loaded_model("llama")
        with torch.no_grad():
            lm.model.get_input_embeddings().weight.mul_(6.0)  # peaked first tokens: rewards vary in a group
        return lm

    lm = peaky()
    with torch.no_grad():
        rows = [
            lm.model(torch.tensor([lm.prompt_ids(p.question, chat=True)])).logits[0, -1] for p in PROBLEMS
        ]
    top = int(torch.softmax(torch.stack(rows), -1).mean(0).argmax())
    config = TrainConfig(
        num_generations=4, prompts_per_step=2, max_new_tokens=12, max_steps=2, learning_rate=1e-2,
        checkpoint_every=1, lora_r=2, backend="trl", credit="coupled", seed=3, rewards=[f"starts_with:{top}"],
    )  # fmt: skip
    straight_metrics: list[dict] = []
    straight = TrlTrainer(
        peaky(), config, PROBLEMS, Hooks(on_metrics=lambda s, m: straight_metrics.append(m))
    )
    straight.train(tmp_path / "a")
    assert (tmp_path / "a" / "step-000001").is_dir() and not (tmp_path / "a" / "step-000002").exists()
    resumed_metrics: list[dict] = []
    resumed = TrlTrainer(peaky(), config, PROBLEMS, Hooks(on_metrics=lambda s, m: resumed_metrics.append(m)))
    resumed.load_checkpoint(tmp_path / "a" / "step-000001")
    assert resumed.step == 1
    resumed.train(tmp_path / "b")
    assert [m["step"] for m in resumed_metrics] == [2]
    assert straight_metrics[0]["reward_std"] > 0  # the first step moved the adapter
    for key in ("reward_mean", "loss", "gamma_mean", "flagged_share"):
        assert resumed_metrics[0][key] == straight_metrics[1][key], key
    want = lora_weights(straight.trainer.model)
    got = lora_weights(resumed.trainer.model)
    for key in want:
        assert torch.equal(want[key], got[key]), key
