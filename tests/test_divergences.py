"""Each registered closed form is tied to its divergence: its eager value equals the per-token function's, its
gradient equals autograd through that function, and its compiler-oriented kernel (run eagerly here; test_fused.py
compiles it) equals the eager closed form, on random logits with -inf entries in one model's logits only. All three
sit in the divergence's one record, ``losses.REGISTRY[name]``."""

from __future__ import annotations

import pytest
import torch

from distillens import fused, losses

V = 17
SIDES = ["none", "student", "teacher", "both"]
INFINITE = {("forward_kl", "student"), ("reverse_kl", "teacher")}
"""Where the divergence itself is infinite (mass of one model where the other has none): nothing to compare."""


def logits(seed: int, with_inf: bool) -> torch.Tensor:
    values = torch.randn(6, V, generator=torch.Generator().manual_seed(seed)) * 3  # (6, V)
    if with_inf:
        values[:, :3] = float("-inf")  # masked vocabulary entries in this model only
    return values


def declared_params(name: str) -> list[dict[str, float]]:
    """The defaults, a temperature, and every declared parameter at a non-default value and at both ends."""
    cases = [{}, {"temperature": 0.7}, {"temperature": 2.0}]
    for param in losses.REGISTRY[name].params:
        cases += [{param.name: 0.2, "temperature": 1.5}, {param.name: param.low}, {param.name: param.high}]
    return cases


CASES = [
    (name, params, side)
    for name in losses.closed_forms()
    for params in declared_params(name)
    for side in SIDES
    if (name, side) not in INFINITE
]


def test_every_divergence_with_a_closed_form_is_checked_with_minus_infinity_on_each_side_it_allows():
    assert {name for name, _, _ in CASES} == set(losses.closed_forms()) == {"forward_kl", "reverse_kl", "jsd"}
    assert all(fused.has_kernel(name) and losses.REGISTRY[name].kernel for name in losses.closed_forms())
    assert {(name, side) for name, _, side in CASES} >= {("forward_kl", "teacher"), ("reverse_kl", "student")}


@pytest.mark.parametrize(("name", "params", "inf_side"), CASES)
def test_the_closed_form_agrees_with_its_divergence_and_its_kernel(name, params, inf_side):
    student, teacher = logits(1, inf_side in ("student", "both")), logits(2, inf_side in ("teacher", "both"))
    closed_form = losses.REGISTRY[name]
    leaf = student.clone().requires_grad_()
    expected_values = closed_form.value(leaf, teacher, **params)  # (6,)
    (expected_grad,) = torch.autograd.grad(expected_values.sum(), leaf)  # (6, V)
    values, grad = closed_form.gradient(student, teacher, **params)
    kernel_values, kernel_grad = closed_form.kernel(student, teacher, **params)
    for got_values, got_grad in ((values, grad), (kernel_values, kernel_grad)):
        assert torch.isfinite(got_values).all() and torch.isfinite(got_grad).all()
        torch.testing.assert_close(got_values, expected_values.detach(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got_grad, expected_grad, rtol=1e-4, atol=1e-5)


def test_a_closed_form_needs_a_registered_divergence():
    with pytest.raises(ValueError, match="unknown divergence 'kll'"):
        losses.register_gradient("kll")(losses.REGISTRY["jsd"].gradient)
    assert "kll" not in losses.REGISTRY
