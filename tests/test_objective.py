"""The objective's configuration: typed divergence parameters, weights, and the Terms value a call returns."""

from __future__ import annotations

import inspect
import sys
from unittest import mock

import pytest
import torch
from helpers import without_tokenizer
from reference import divergence, tiny_llama

from distillens import losses
from distillens.cli import main
from distillens.models import ModelSpec
from distillens.module import DistillationModule
from distillens.objective import LayerPairs, LossConfig, Terms, token_means


def test_every_declared_parameter_is_a_keyword_of_its_divergence_with_the_same_default():
    """The registry is what configs are checked against; the functions are what runs: they must agree."""
    for name, registered in losses.REGISTRY.items():
        keywords = {
            p.name: p.default
            for p in inspect.signature(registered.value).parameters.values()
            if p.kind is p.KEYWORD_ONLY and p.name != "temperature"
        }
        declared = {param.name: param.default for param in registered.params}
        assert declared == keywords, name


@pytest.mark.parametrize(
    ("loss", "message"),
    [
        (
            {"kd_params": {"betta": 0.3}},
            "model.loss.kd_params.betta: unknown parameter of reverse_kl (it takes none)",
        ),
        (
            {"lens_params": {"alpha": 0.2}},
            "model.loss.lens_params.alpha: unknown parameter of jsd (it takes beta)",
        ),
        (
            {"lens_params": {"beta": 1.5}},
            "model.loss.lens_params.beta=1.5: out of range for jsd; use a value in [0.0, 1.0]",
        ),
        (
            {"kd_divergence": "akl", "kd_params": {"mu": -0.1}},
            "model.loss.kd_params.mu=-0.1: out of range for akl",
        ),
        ({"kd_weight": -1.0}, "model.loss.kd_weight=-1.0: loss weights must be >= 0"),
        ({"lens_weight": -0.5}, "model.loss.lens_weight=-0.5: loss weights must be >= 0"),
    ],
)
def test_a_bad_divergence_parameter_or_weight_is_one_line_naming_the_field(loss, message):
    with pytest.raises(ValueError) as error:
        LossConfig(**loss).check(has_teacher=True)
    assert str(error.value).startswith(message) and "\n" not in str(error.value)


@pytest.mark.parametrize("name, params", [("skew_reverse_kl", {"alpha": 0.0}), ("jsd", {"beta": 1.0})])
def test_declared_parameters_at_the_ends_of_their_range_are_accepted_and_used(name, params):
    """The closed ends of a parameter's range pass the check, and the divergence then computes the textbook
    formula at that value (tests/reference.py), not at its default."""
    LossConfig(kd_divergence=name, kd_params=params).check(has_teacher=True)
    student, teacher = torch.randn(
        2, 3, 11, generator=torch.Generator().manual_seed(0)
    ).unbind()  # (3, 11) each
    computed = losses.REGISTRY[name].value(student, teacher, **params)  # (3,)
    torch.testing.assert_close(computed, divergence(name, student, teacher, **params))
    assert not torch.allclose(computed, divergence(name, student, teacher))  # the default would differ


def test_the_module_refuses_a_typo_when_it_is_built(tiny_module):
    with pytest.raises(ValueError, match=r"kd_params\.betta: unknown parameter of reverse_kl"):
        tiny_module(loss=LossConfig(kd_params={"betta": 0.3}))


def test_loss_help_lists_every_divergence_and_its_parameters(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    with mock.patch.object(sys, "argv", ["distillens"]), pytest.raises(SystemExit) as stop:
        main(["fit", "--model.loss.help"])
    assert stop.value.code in (0, None)
    text = " ".join(capsys.readouterr().out.split())
    for name, registered in losses.REGISTRY.items():
        assert name in text, name
        for param in registered.params:
            assert f"{name} takes {param.name}" in text, (name, param)


# ----------------------------------------------------------------------------------------------------------------
# Terms


def terms() -> Terms:
    return Terms(
        tokens=torch.tensor(4),
        sums={"ce": torch.tensor(8.0), "kd": torch.tensor(2.0), "lens": torch.tensor(1.0)},
        pair_means={"s1_t2": torch.tensor(0.5), "s2_t4": torch.tensor(0.25)},
        weights={"ce": 0.5, "kd": 1.0, "lens": 2.0, "mse": 0.0},
    )


def test_terms_total_is_the_weighted_sum_and_means_divide_by_the_tokens():
    t = terms()
    assert float(t.total()) == 0.5 * 8 + 1.0 * 2 + 2.0 * 1
    means = {name: float(value) for name, value in t.means().items()}
    assert means == {"loss": 8 / 4, "ce": 2.0, "kd": 0.5, "lens": 0.25, "lens/s1_t2": 0.5, "lens/s2_t4": 0.25}
    assert dict(t) == {
        "tokens": t.tokens, "ce": t.sums["ce"], "kd": t.sums["kd"], "lens": t.sums["lens"],
        "lens/s1_t2": t.pair_means["s1_t2"], "lens/s2_t4": t.pair_means["s2_t4"],
    }  # fmt: skip


def test_token_sums_added_over_batches_give_the_token_means_of_the_whole_set():
    """Two batches of 4 and 1 tokens: a pair's set mean weighs each batch's mean by its tokens."""
    first, second = terms(), terms()
    second.tokens, second.pair_means = (
        torch.tensor(1),
        {"s1_t2": torch.tensor(1.0), "s2_t4": torch.tensor(0.0)},
    )
    total = {name: first.token_sums()[name] + second.token_sums()[name] for name in first.token_sums()}
    means = {name: float(value) for name, value in token_means(total).items()}
    assert means["lens/s1_t2"] == pytest.approx((0.5 * 4 + 1.0 * 1) / 5)
    assert means["ce"] == pytest.approx(16 / 5) and means["loss"] == pytest.approx(16 / 5)
    assert token_means({"tokens": 0, "ce": 0.0}) == {"ce": 0.0}  # an empty set: no division by zero


# ----------------------------------------------------------------------------------------------------------------
# Automatic layer pairs


def test_automatic_pairs_of_a_layer_subset_student_follow_the_copied_blocks():
    """Student blocks 0, 1, 2 are copies of teacher blocks 0, 15, 29: student hidden state 1 (after block 0) pairs
    with teacher hidden state 1, hidden state 2 (after a copy of block 15) with teacher hidden state 16."""
    assert LayerPairs(count=2).resolve(3, 30, copied_from=[0, 15, 29]) == ([1, 2], [1, 16])
    assert LayerPairs(count=3).resolve(3, 30, copied_from=[0, 15, 29]) == ([1, 2, 2], [1, 16, 16])
    assert LayerPairs(count=2).resolve(3, 30) == ([1, 2], [10, 20])  # a student not copied from the teacher
    explicit = LayerPairs(student=[1], teacher=[5])
    assert explicit.resolve(3, 30, copied_from=[0, 15, 29]) == ([1], [5])  # explicit lists always win


def test_the_module_pairs_a_layer_subset_student_with_its_source_blocks(monkeypatch):
    without_tokenizer(monkeypatch)
    teacher = tiny_llama(6, 48, 101)
    module = DistillationModule(
        student=ModelSpec(init_from_teacher_layers=[0, 4, 5]), teacher=teacher, layers=LayerPairs(count=2)
    )
    module.configure_model()
    assert (module.objective.student_layers, module.objective.teacher_layers) == ([1, 2], [1, 5])


def test_sft_with_a_teacher_never_runs_the_teacher_in_training(tiny_module):
    """The SFT row keeps the teacher for initialisation and validation only: no teacher forward while training."""
    from distillens.objective import LossConfig

    module = tiny_module(loss=LossConfig(ce_weight=1.0, kd_weight=0.0, lens_weight=0.0))
    calls = []
    module.teacher.register_forward_hook(lambda *args: calls.append(1))
    ids = torch.randint(0, 101, (2, 9))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    module.train()
    assert set(module(batch)) == {"tokens", "ce"} and not calls
    module.eval()
    assert {"kd", "ce"} <= set(module(batch)) and calls
