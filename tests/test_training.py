"""Training math and the trainer loop, in process: γ exactly as spec §6, TRL's loss normalisers, a learning
test on a toy reward, determinism for a seed, and exact resumption from a checkpoint."""

from __future__ import annotations

import math

import pytest
import torch

from faithlens.analysis import compute_metrics
from faithlens.data import Problem
from faithlens.metrics import Flags
from faithlens.params import AnalysisParams
from tests.devices import tiny
from training.config import TrainConfig
from training.credit import gamma, shape_advantages
from training.loss import Normaliser, clipped_surrogate, per_token_kl
from training.trainer import Trainer


def flags(preplan, anchor, dominated, intro) -> Flags:
    n = len(anchor)
    return Flags(
        preplan=preplan,
        anchor=anchor,
        dominated_anchor=dominated,
        intro=intro,
        coupled_pairs=[],
        delta=[0.0] * (n - 1),
        tau_waad=None,
        tau_delta=None,
    )


F, T = False, True
# token:        0  1  2  3  4  5
HAND = flags(
    preplan=[T, F, F, T, F, F],
    anchor=[F, T, F, T, T, F],
    dominated=[F, F, F, T, F, F],
    intro=[F, T, F, F, F, T],  # token 1 is both an anchor (outside D) and an intro: the terms add
)


def test_gamma_none_and_local_and_global():
    assert gamma(HAND, 6, "none").tolist() == [1.0] * 6
    assert gamma(HAND, 6, "local_chunk", gamma_amp=1.5).tolist() == [1.5, 1, 1, 1.5, 1, 1]
    assert gamma(HAND, 6, "global_anchor", gamma_amp=1.5).tolist() == [1, 1.5, 1, 1.5, 1.5, 1]


def test_gamma_coupled_matches_the_spec_formula():
    # γ = 1 + (γa−1)[t∈T_glob∖D] + (1−α)(γa−1)[t∈D] + α(γa−1)[t∈intro(D)], with γa = 2, α = 0.25
    got = gamma(HAND, 6, "coupled", gamma_amp=2.0, alpha=0.25).tolist()
    assert got == [1.0, 1 + 1 + 0.25, 1.0, 1 + 0.75, 2.0, 1.25]
    assert gamma(HAND, 6, "coupled").tolist() == [1.0, 1.75, 1.0, 1.25, 1.5, 1.25]  # the defaults 1.5, 0.5


def test_gamma_needs_flags_and_a_known_strategy():
    with pytest.raises(ValueError):
        gamma(None, 3, "coupled")
    with pytest.raises(ValueError):
        gamma(HAND, 6, "everything")  # type: ignore[arg-type]


def test_shaping_sign_option():
    g = torch.tensor([1.0, 1.5])
    assert shape_advantages(-2.0, g, "both").tolist() == [-2.0, -3.0]
    assert shape_advantages(-2.0, g, "positive").tolist() == [-2.0, -2.0]
    assert shape_advantages(2.0, g, "positive").tolist() == [2.0, 3.0]


def test_normalisers_are_trls():
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]], dtype=torch.float32)
    per_token = torch.tensor([[1.0, 2.0, 3.0, 9.0], [4.0, 9.0, 9.0, 9.0]])
    grpo = (per_token * Normaliser("grpo", 2, 4, 4).weights(mask)).sum()
    assert grpo == pytest.approx(((1 + 2 + 3) / 3 + 4 / 1) / 2)
    dr = (per_token * Normaliser("dr_grpo", 2, 4, 4).weights(mask)).sum()
    assert dr == pytest.approx((1 + 2 + 3 + 4) / (2 * 4))
    dapo = (per_token * Normaliser("dapo", 2, 4, 4).weights(mask)).sum()
    assert dapo == pytest.approx((1 + 2 + 3 + 4) / 4)


def test_surrogate_clips_and_its_gradient_is_minus_advantage_at_ratio_one():
    logp = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    adv = torch.tensor([[2.0, -1.0]])
    mask = torch.ones(1, 2)
    loss, _ = clipped_surrogate(logp, logp.detach(), adv, mask, Normaliser("dapo", 1, 2, 2))
    loss.backward()
    assert logp.grad.tolist() == [[-1.0, 0.5]]  # −A/N at ratio 1
    old = torch.tensor([[-1.5, -2.0]])  # ratio e^0.5 > 1 + ε with a positive advantage: clipped, no gradient
    logp2 = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    loss2, stats = clipped_surrogate(logp2, old, adv, mask, Normaliser("dapo", 1, 2, 2), epsilon=0.2)
    loss2.backward()
    assert logp2.grad[0, 0] == 0 and stats["clip_fraction"] == 1
    assert float(loss2.detach()) == pytest.approx(-(1.2 * 2.0) / 2 + 1.0 / 2)


def test_kl_estimator_is_zero_at_equal_policies_and_positive_otherwise():
    a = torch.tensor([-1.0, -2.0])
    assert per_token_kl(a, a).tolist() == [0.0, 0.0]
    assert (per_token_kl(a, a - 0.3) > 0).all()


# -- the loop ------------------------------------------------------------------------------------------------

PROBLEMS = [Problem(f"question {i}: what is {i}+{i}?", f"#### {2 * i}") for i in range(16)]


def peaky_tiny():
    """A tiny model whose next-token distributions are peaked (random init is nearly uniform)."""
    lm = tiny("llama")
    with torch.no_grad():
        lm.model.get_input_embeddings().weight.mul_(6.0)
    return lm


def first_token_probs(lm) -> torch.Tensor:
    with torch.no_grad():
        rows = [
            torch.softmax(
                lm.model(torch.tensor([lm.prompt_ids(p.question, chat=True)], device=lm.device)).logits[
                    0, -1
                ],
                -1,
            )
            for p in PROBLEMS
        ]
    return torch.stack(rows).mean(0)


def test_grpo_learns_a_toy_reward():
    """The completion should start with a token the untrained policy picks ~1% of the time."""
    lm = peaky_tiny()
    target = int(first_token_probs(lm).argsort(descending=True)[1])
    config = TrainConfig(
        num_generations=8,
        prompts_per_step=4,
        max_new_tokens=4,
        max_steps=25,
        learning_rate=2e-2,
        rewards=[f"starts_with:{target}"],
        seed=0,
    )
    trainer = Trainer(lm, config, PROBLEMS)
    history = []
    for _ in range(config.max_steps):
        history.append(trainer.train_step()["reward_mean"])
        if len(history) >= 2 and sum(history[-2:]) / 2 > 0.8:
            break
    assert history[0] < 0.2
    assert sum(history[-2:]) / 2 > 0.8, history


@pytest.mark.parametrize("credit", ["none", "coupled"])
def test_deterministic_for_a_seed(credit):
    def run() -> tuple[list[dict], dict]:
        # 30 tokens: FAI needs tokens at least H_lo = 10 positions later, so short answers have no anchors
        config = TrainConfig(
            num_generations=2,
            prompts_per_step=2,
            max_new_tokens=30,
            max_steps=2,
            seed=5,
            credit=credit,
            learning_rate=1e-2,
            rewards=["starts_with:100"],
        )
        trainer = Trainer(peaky_tiny(), config, PROBLEMS)
        metrics = [trainer.train_step() for _ in range(2)]
        weights = {k: v.clone() for k, v in trainer.lm.model.state_dict().items() if "lora_" in k}
        return metrics, weights

    (m1, w1), (m2, w2) = run(), run()
    strip = lambda ms: [{k: v for k, v in m.items() if not k.endswith("_seconds")} for m in ms]  # noqa: E731
    assert strip(m1) == strip(m2)
    assert all(torch.equal(w1[k], w2[k]) for k in w1)
    if credit == "coupled":
        assert m1[0]["gamma_mean"] > 1.0 and m1[0]["flagged_share"] > 0


@pytest.mark.parametrize("lora_dropout", [0.0, 0.1])
def test_gamma_from_the_training_forward_equals_a_scoring_pass(lora_dropout):
    """γ read off the loss's batched, padded forward (or, with dropout, a separate eval pass) must equal
    γ from the foundation's one-sequence scoring pass on the same policy."""
    config = TrainConfig(
        num_generations=2, prompts_per_step=2, max_new_tokens=40, seed=3, credit="coupled",
        lora_dropout=lora_dropout,
    )  # fmt: skip
    trainer = Trainer(peaky_tiny(), config, PROBLEMS)
    rollouts = trainer._rollouts(0)
    rollouts[1].completion_ids = rollouts[1].completion_ids[:25]  # rows of different lengths: padding
    assert all(r.gammas is None for r in rollouts)
    expected = []
    for r in rollouts:
        ids = r.prompt_ids + r.completion_ids
        flags = compute_metrics(trainer.lm, ids, len(r.prompt_ids), AnalysisParams(q=config.q)).flags
        expected.append(gamma(flags, len(r.completion_ids), "coupled", config.gamma_amp, config.alpha))
    normaliser = Normaliser("dapo", len(rollouts), sum(len(r.completion_ids) for r in rollouts), 40)
    loss, _ = trainer._loss(rollouts, normaliser)
    assert loss is not None and loss.requires_grad
    for r, want in zip(rollouts, expected, strict=True):
        assert torch.equal(r.gammas, want)
    assert any((r.gammas != 1).any() for r in rollouts)


def test_resume_from_checkpoint_equals_an_uninterrupted_run(tmp_path):
    config = TrainConfig(
        num_generations=2,
        prompts_per_step=2,
        max_new_tokens=6,
        max_steps=4,
        seed=2,
        learning_rate=1e-2,
        rewards=["starts_with:100"],
        checkpoint_every=2,
    )
    straight = Trainer(peaky_tiny(), config, PROBLEMS)
    straight.train(tmp_path / "a")
    interrupted = Trainer(peaky_tiny(), TrainConfig(**{**config.as_dict(), "max_steps": 2}), PROBLEMS)
    interrupted.save_checkpoint(tmp_path / "b0", {})  # a checkpoint at step 0 is loadable too
    interrupted.train()
    interrupted.save_checkpoint(tmp_path / "b", {})
    resumed = Trainer(peaky_tiny(), config, PROBLEMS)
    resumed.load_checkpoint(tmp_path / "b")
    assert resumed.step == 2
    resumed.train()
    want = {k: v for k, v in straight.lm.model.state_dict().items() if "lora_" in k}
    got = {k: v for k, v in resumed.lm.model.state_dict().items() if "lora_" in k}
    for key in want:
        assert torch.allclose(want[key], got[key], atol=1e-6), key


def test_atmanrl_faithfulness_term(tmp_path):
    """AtManRL's R_faith is computed on the CoT before the answer span, in [0, 1]; no answer gives 0."""
    from training.trainer import Rollout

    lm = peaky_tiny()
    trainer = Trainer(lm, TrainConfig(method="atmanrl", mask_steps=3, num_generations=2), PROBLEMS)
    assert trainer.config.scale_rewards is False  # mean-centred only (spec §8)
    prompt = lm.prompt_ids("What is 2+2?", chat=True)
    with_answer = Rollout(
        PROBLEMS[0], prompt, lm.completion_ids("2 plus 2 makes 4. #### 4"), "2 plus 2 makes 4. #### 4"
    )
    value = trainer._r_faith(with_answer)
    assert 0.0 <= value <= 1.0
    without = Rollout(PROBLEMS[0], prompt, lm.completion_ids("no idea"), "no idea")
    assert trainer._r_faith(without) == 0.0
    metrics = trainer.train_step()
    assert "r_faith_mean" in metrics and metrics["r_faith_group_spread"] >= 0.0


def test_r_faith_metrics_report_the_spread_within_groups():
    from training.trainer import Rollout, r_faith_metrics

    rollouts = [Rollout(PROBLEMS[0], [], [], "") for _ in range(6)]
    for r, value in zip(rollouts, [0.1, 0.4, 0.2, 0.5, 0.5, 0.5], strict=True):
        r.r_faith = value
    metrics = r_faith_metrics(rollouts, group_size=3)
    assert metrics["r_faith_mean"] == pytest.approx(2.2 / 6)
    assert metrics["r_faith_group_spread"] == pytest.approx((0.3 + 0.0) / 2)


def test_eval_cli_reports_base_and_adapter(tmp_path, monkeypatch, capsys):
    import json

    from faithlens.tiny import save_tiny
    from training import eval as eval_cli

    base = save_tiny(tmp_path / "tiny")
    store = tmp_path / "store"
    config = TrainConfig(num_generations=2, prompts_per_step=1, max_new_tokens=4, max_steps=1)
    from faithlens.model import load_model

    trainer = Trainer(load_model(base, device="cpu", dtype="float32"), config, PROBLEMS)
    trainer.train_step()
    trainer.save_adapter(store / "mine" / "1")
    monkeypatch.setenv("FAITHLENS_MODEL", str(base))
    monkeypatch.setenv("FAITHLENS_ADAPTER_STORE", str(store))
    from faithlens.settings import get_core_settings

    get_core_settings.cache_clear()
    try:
        assert (
            eval_cli.main(
                [
                    "--adapter",
                    "mine",
                    "--limit",
                    "2",
                    "--max-new-tokens",
                    "24",
                    "--saliency",
                    "atman_grad",
                    "--json",
                ]
            )
            == 0
        )
    finally:
        get_core_settings.cache_clear()
    reports = json.loads(capsys.readouterr().out)
    assert [r["problems"] for r in reports] == [2, 2]
    assert reports[1]["model"].startswith("mine")
    for r in reports:
        assert 0 <= r["accuracy"] <= 1 and r["mean_reasoning_tokens"] > 0


@pytest.mark.parametrize("loss_type", ["grpo", "dr_grpo", "dapo"])
def test_kl_to_the_base_and_every_loss_type_train(loss_type):
    """β > 0 runs a reference pass with the adapter disabled; KL starts at 0 (a fresh LoRA is the base)
    and grows once the adapter moves."""
    lm = peaky_tiny()
    top = int(first_token_probs(lm).argmax())  # a reward that varies within groups, so the adapter moves
    config = TrainConfig(
        num_generations=4,
        prompts_per_step=2,
        max_new_tokens=6,
        max_steps=3,
        beta=0.1,
        loss_type=loss_type,
        learning_rate=3e-2,
        rewards=[f"starts_with:{top}"],
        seed=1,
    )
    trainer = Trainer(lm, config, PROBLEMS)
    history = [trainer.train_step() for _ in range(3)]
    assert history[0]["kl"] == pytest.approx(0.0, abs=1e-6)
    assert all(m["kl"] >= 0 and math.isfinite(m["loss"]) for m in history)
    assert history[-1]["kl"] > 0


def moving_config(**overrides) -> TrainConfig:
    """A step where the policy moves a lot: a reward that varies within groups and a large learning rate."""
    lm_top = int(first_token_probs(peaky_tiny()).argmax())
    return TrainConfig(
        **{
            "num_generations": 4,
            "prompts_per_step": 2,
            "max_new_tokens": 6,
            "max_steps": 1,
            "learning_rate": 5e-2,
            "rewards": [f"starts_with:{lm_top}"],
            "seed": 1,
            **overrides,
        }
    )


def test_mu_above_one_ratios_are_against_the_sampling_policy():
    """μ = 2: the old log-probs are the sampling policy's, taken once before the first update and held.
    The first pass sees ratio 1 (nothing clipped even at ε = 1e-4); after one update the ratio moves and
    the second pass clips. (Taking ``old`` from each pass's own log-probs would make it 1 forever.)"""
    config = moving_config(num_iterations=2, epsilon=1e-4)
    trainer = Trainer(peaky_tiny(), config, PROBLEMS)
    rollouts = trainer._rollouts(0)
    assert len({r.reward for r in rollouts}) > 1  # non-zero advantages: the update moves the policy
    tokens = sum(len(r.completion_ids) for r in rollouts)
    normaliser = Normaliser(config.loss_type, len(rollouts), tokens, config.max_new_tokens)
    old = trainer._old_logprobs(rollouts)
    assert old is not None and not old.requires_grad
    held = old.clone()
    first, stats = trainer._loss(rollouts, normaliser, old)
    assert stats["clip_fraction"] == 0
    first.backward()
    trainer.optimizer.step()
    trainer.optimizer.zero_grad()
    _, stats = trainer._loss(rollouts, normaliser, old)
    assert stats["clip_fraction"] > 0.5 * tokens
    assert torch.equal(old, held)  # held fixed across the iterations


@pytest.mark.parametrize("mu", [1, 2])
def test_clip_fraction_reports_the_moved_policy_only_for_mu_above_one(mu):
    metrics = Trainer(peaky_tiny(), moving_config(num_iterations=mu, epsilon=0.01), PROBLEMS).train_step()
    assert metrics["reward_std"] > 0
    if mu == 1:
        assert metrics["clip_fraction"] == 0  # μ = 1: ratio 1, the policy has not moved when it is taken
    else:
        assert 0 < metrics["clip_fraction"] <= 0.5  # only the second of the two passes can clip


def test_train_config_is_typed_and_bounded():
    """The one configuration the API validates with and the trainer reads: bad types, out-of-bound values,
    unknown rewards, credit strategies and names are refused, naming the field."""
    from pydantic import ValidationError

    for bad, field in [
        ({"learning_rate": "abc"}, "learning_rate"),
        ({"lora_r": 1e8}, "lora_r"),
        ({"num_generations": 100000}, "num_generations"),
        ({"num_generations": 1}, "num_generations"),
        ({"rewards": ["nope"]}, "rewards"),
        ({"credit": "everything"}, "credit"),
        ({"learning_rat": 1e-3}, "learning_rat"),
        ({"beta": float("nan")}, "beta"),
    ]:
        with pytest.raises(ValidationError) as caught:
            TrainConfig(**bad)
        assert caught.value.errors()[0]["loc"][0] == field
    config = TrainConfig(method="atmanrl", learning_rate="2e-3")
    assert config.learning_rate == 2e-3 and config.scale_rewards is False
    assert TrainConfig(**config.as_dict()) == config  # what a job stores is what the worker trains with


def hyperparameter_rows() -> list[str]:
    """docs/api.md's hyperparameter table, as training/config.py declares it."""
    import json
    import typing

    import annotated_types as at

    from training.config import TrainHyperparameters

    def bounds(field) -> str:
        parts = []
        for m in field.metadata:
            for kind, attr, sign in (
                (at.Ge, "ge", "≥"),
                (at.Gt, "gt", ">"),
                (at.Le, "le", "≤"),
                (at.Lt, "lt", "<"),
            ):
                if isinstance(m, kind):
                    parts.append(f"{sign} {getattr(m, attr):,}".replace(",", " "))
            if isinstance(m, at.MinLen):
                parts.append(f"≥ {m.min_length} items")
            if isinstance(m, at.MaxLen):
                parts.append(f"≤ {m.max_length} items")
        if typing.get_origin(field.annotation) is typing.Literal:
            parts.append(" \\| ".join(f"`{a}`" for a in typing.get_args(field.annotation)))
        return ", ".join(parts)

    return [
        f"| `{name}` | `{json.dumps(field.get_default(call_default_factory=True))}` | {bounds(field)} "
        f"| {field.description} |"
        for name, field in TrainHyperparameters.model_fields.items()
    ]


def test_the_documented_hyperparameters_are_the_configs():
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "docs" / "api.md").read_text()
    block = text.split("<!-- hyperparameters:", 1)[1].split("<!-- /hyperparameters -->", 1)[0]
    documented = [line for line in block.splitlines() if line.startswith("| `")]
    assert documented == hyperparameter_rows()


def test_a_checkpoint_cut_off_mid_write_never_appears_complete(tmp_path, monkeypatch):
    """A worker killed while it writes a checkpoint must not leave a ``step-…`` directory that looks
    complete (a truncated trainer_state.pt made the resumed job fail with EOFError). The kill is simulated
    by a torch.save that writes half a file and dies."""
    import training.trainer as trainer_module
    from jobs.journal import STEP_DIR

    trainer = Trainer(
        peaky_tiny(), TrainConfig(num_generations=2, prompts_per_step=2, max_new_tokens=4), PROBLEMS
    )
    folder = tmp_path / "checkpoints"
    trainer.save_checkpoint(folder / "step-000002", {"loss": 1.0})
    real_save = torch.save

    def killed(obj, f, *args, **kwargs):
        with open(f, "wb") as fh:
            fh.write(b"\x80\x02half a pickle")
        raise KeyboardInterrupt("killed mid-write")

    monkeypatch.setattr(trainer_module.torch, "save", killed)
    with pytest.raises(KeyboardInterrupt):
        trainer.save_checkpoint(folder / "step-000004", {"loss": 0.5})
    complete = sorted(p.name for p in folder.iterdir() if STEP_DIR.match(p.name))
    assert complete == ["step-000002"]
    monkeypatch.setattr(trainer_module.torch, "save", real_save)
    trainer.save_checkpoint(folder / "step-000004", {"loss": 0.5})  # the next attempt writes it whole
    assert sorted(p.name for p in folder.iterdir()) == ["step-000002", "step-000004"]
    Trainer(peaky_tiny(), trainer.config, PROBLEMS).load_checkpoint(folder / "step-000004")


@pytest.mark.smollm
def test_the_mask_step_budget_leaves_the_initialisation_on_smollm(smollm):
    """Spec §8's step budget (lr = 0.2 / steps): at the jobs' default mask_steps the mask moves (some
    saliency ≥ 0.3); at the old fixed lr 1e-3 the same check fails (it stays near its initialisation)."""
    import json
    import re

    from faithlens.data import gsm8k_path
    from training.trainer import fit_faith_mask

    row = json.loads(gsm8k_path("dev").read_text().splitlines()[0])
    completion = re.sub(r"<<[^>]*>>", "", row["answer"])  # the reference solution, calculator notes dropped
    prompt, ids = smollm.prompt_ids(row["question"], chat=True), smollm.completion_ids(completion)
    steps = TrainConfig().mask_steps
    budget = fit_faith_mask(smollm, prompt, ids, completion, steps)
    fixed = fit_faith_mask(smollm, prompt, ids, completion, steps, lr=1e-3)
    assert budget is not None and fixed is not None
    assert float(budget.scores.max()) >= 0.3, budget.scores
    assert float(fixed.scores.max()) < 0.3, fixed.scores
