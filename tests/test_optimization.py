"""AdamW with warm-up and cosine decay (distillens.optimization): the schedule's values against the formula written
out here, the absolute floor, which parameters decay, and a restored optimizer taking the run's own settings."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from helpers import llama_spec, without_tokenizer

from distillens.models import ModelSpec
from distillens.module import DistillationModule
from distillens.optimization import OptimizerConfig, apply_settings, warmup_cosine


@pytest.mark.parametrize(
    ("step", "multiplier"),
    [
        (0, 1 / 5),  # warm-up: (step + 1) / (warmup + 1), so the first step already learns
        (2, 3 / 5),
        (4, 1.0),  # the peak, where the cosine starts
        (9, 0.1 + 0.9 * 0.5),  # half-way through the cosine: between peak and floor
        (14, 0.1),  # the last step: min_ratio
        (20, 0.1),  # beyond the planned steps: stays at the floor
    ],
)
def test_warmup_then_cosine_schedule_values(step, multiplier):
    assert warmup_cosine(warmup=4, total=14, min_ratio=0.1)(step) == pytest.approx(multiplier)


def optimizer_of(module: DistillationModule, total_steps: int):
    module.trainer = SimpleNamespace(estimated_stepping_batches=total_steps)  # all configure_optimizers reads
    return module.configure_optimizers()


def test_first_step_learning_rate_follows_the_warmup_fraction(tiny_module):
    """warmup 0.05 of 100 steps = 5 warm-up steps: the first step runs at lr / 6, not 0."""
    module = tiny_module(optimizer=OptimizerConfig(lr=3e-4, warmup=0.05))
    optimizer = optimizer_of(module, 100)["optimizer"]
    assert [group["lr"] for group in optimizer.param_groups] == pytest.approx([3e-4 / 6] * 2)


GPT2 = dict(model_type="gpt2", vocab_size=101, n_embd=32, n_layer=2, n_head=4, n_positions=64)


def test_norms_and_biases_are_not_decayed(monkeypatch):
    """Checked by name on GPT-2 (biases and LayerNorms everywhere) and Llama (RMSNorms, no biases)."""
    without_tokenizer(monkeypatch)
    for student in (ModelSpec(config=GPT2, tokenizer="unused"), llama_spec(2, 32)):
        module = DistillationModule(
            student=student, teacher=student, optimizer=OptimizerConfig(weight_decay=0.3)
        )
        module.configure_model()
        optimizer = optimizer_of(module, 10)["optimizer"]
        decay = {id(p): group["weight_decay"] for group in optimizer.param_groups for p in group["params"]}
        names = dict(module.named_parameters())
        assert decay.keys() == {id(p) for p in names.values()}, "every trained parameter, each once"
        for name, param in names.items():
            norm_or_bias = name.endswith(".bias") or any(n in name for n in ("ln_", "norm"))
            assert decay[id(param)] == (0.0 if norm_or_bias else 0.3), name
        if student.config["model_type"] == "gpt2":  # the case biases are there to test
            assert any(name.endswith(".bias") for name in names)


def test_a_restored_optimizer_takes_the_runs_own_lr_weight_decay_and_betas(tiny_module):
    """Loading a checkpoint's optimizer state brings back its groups' settings; on resume the run's own replace
    them (weight decay for the decay group only), while the step count and moments are kept."""
    saved = optimizer_of(tiny_module(optimizer=OptimizerConfig(lr=1e-3, weight_decay=0.01, warmup=0)), 10)
    for param in (p for group in saved["optimizer"].param_groups for p in group["params"]):
        param.grad = torch.ones_like(param)
    saved["optimizer"].step()
    saved["lr_scheduler"]["scheduler"].step()
    config = OptimizerConfig(lr=2e-4, weight_decay=0.3, betas=(0.8, 0.95), warmup=0)
    resumed = optimizer_of(tiny_module(optimizer=config), 10)
    optimizer, schedule = resumed["optimizer"], resumed["lr_scheduler"]["scheduler"]
    optimizer.load_state_dict(saved["optimizer"].state_dict())
    schedule.load_state_dict(saved["lr_scheduler"]["scheduler"].state_dict())
    assert optimizer.param_groups[0]["weight_decay"] == 0.01  # what a restored state holds
    apply_settings(optimizer, schedule, config, 10)
    groups = {group["name"]: group for group in optimizer.param_groups}
    assert (groups["decay"]["weight_decay"], groups["no_decay"]["weight_decay"]) == (0.3, 0.0)
    lr = 2e-4 * warmup_cosine(0, 10, 0.1)(1)  # the restored step, under the new peak
    for group in groups.values():
        assert tuple(group["betas"]) == (0.8, 0.95) and group["lr"] == pytest.approx(lr)
    assert all(int(state["step"]) == 1 for state in optimizer.state.values())  # the moments stay


def test_absolute_cosine_floor_ends_the_schedule_at_min_lr():
    config = OptimizerConfig(lr=2e-4, warmup=0.0, min_lr=1e-7)
    total = 50
    schedule = warmup_cosine(0, total, config.floor_ratio)
    expected = [
        1e-7 + (2e-4 - 1e-7) * 0.5 * (1 + math.cos(math.pi * step / total)) for step in range(total + 1)
    ]
    assert [config.lr * schedule(step) for step in range(total + 1)] == pytest.approx(expected, rel=1e-9)
    assert config.lr * schedule(0) == pytest.approx(2e-4)  # no warm-up: the peak at once
    assert OptimizerConfig(lr=2e-4).floor_ratio == 0.1  # the ratio stays the default when min_lr is unset
    with pytest.raises(ValueError, match="optimizer.min_lr=0.001: must be between 0 and optimizer.lr=0.0002"):
        OptimizerConfig(lr=2e-4, min_lr=1e-3)
