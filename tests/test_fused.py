"""Fused divergence kernels: the compiled kernels give the eager closed forms' values and weighted gradients, in the
dtype the backward takes, for any row count; a compiler failure falls back to the eager kernels with one warning."""

from __future__ import annotations

import logging
import sys
from unittest import mock

import pytest
import torch
from helpers import scalars, tiny_fit_config, write_config

from distillens import fused, losses
from distillens.lens import LogitLens, projected_divergence
from distillens.lightning_cli import run_cli

V = 300
CASES = [("forward_kl", {}), ("reverse_kl", {"temperature": 0.7}), ("jsd", {}), ("jsd", {"beta": 0.2})]


def test_every_closed_form_gradient_has_a_fused_kernel():
    assert {name for name, _ in CASES} == set(losses.closed_forms())
    assert all(losses.REGISTRY[name].kernel is not None for name in losses.closed_forms())
    assert all(fused.has_kernel(name) for name in losses.closed_forms())
    assert not fused.has_kernel("akl")  # no closed form: autograd through the per-token function


def logits(rows: int, dtype: torch.dtype, seed: int, with_inf: bool = False) -> torch.Tensor:
    values = torch.randn(rows, V, generator=torch.Generator().manual_seed(seed)) * 3  # (rows, V)
    if with_inf:
        values[:, :3] = float("-inf")  # masked vocabulary entries: 0 * log 0 must vanish
    return values.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("name", "params"), CASES)
def test_the_compiled_kernel_equals_the_eager_closed_form_for_any_row_count(name, params, dtype):
    weight = torch.tensor(0.25)
    for rows, with_inf in [(16, False), (5, True), (1, False)]:  # one kernel, several counts (dynamic rows)
        student, teacher = logits(rows, dtype, 1, with_inf), logits(rows, dtype, 2, with_inf)
        values, grad = fused.value_and_weighted_grad(name, student, teacher, weight, fused=True, **params)
        eager_values, eager_grad = losses.REGISTRY[name].gradient(
            student, teacher, **params
        )  # fp32 reference
        assert values.dtype == torch.float32 and grad.dtype == dtype and grad.shape == (rows, V)
        assert torch.isfinite(values).all() and torch.isfinite(grad).all()
        torch.testing.assert_close(values, eager_values, rtol=1e-5, atol=1e-6)
        tolerance = {"rtol": 1e-4, "atol": 3e-6} if dtype == torch.float32 else {"rtol": 8e-3, "atol": 3e-6}
        torch.testing.assert_close(grad.float(), (eager_grad * weight).to(dtype).float(), **tolerance)
        no_grad_values = fused.values(name, student, teacher, fused=True, **params)
        torch.testing.assert_close(no_grad_values, eager_values, rtol=1e-5, atol=1e-6)


def jsd_by_hand(student: torch.Tensor, teacher: torch.Tensor, beta: float = 0.5) -> torch.Tensor:
    """Per-row generalised JSD in float64 from its definition, 0 log 0 = 0 through xlogy (not distillens code)."""
    p_s, p_t = student.double().softmax(-1), teacher.double().softmax(-1)  # (n, V)
    m = beta * p_t + (1 - beta) * p_s  # (n, V)
    return (beta * torch.xlogy(p_t, p_t / m) + (1 - beta) * torch.xlogy(p_s, p_s / m)).sum(-1).float()  # (n,)


@pytest.mark.parametrize("masked", ["teacher", "student"])
@pytest.mark.parametrize("beta", [0.5, 0.2])
def test_entries_masked_in_one_model_only_give_the_jsd_of_its_definition(masked, beta):
    """-inf in one model's logits only: that model's 0 log 0 terms vanish, the other model's terms in the same
    columns count. (The test above masks the same columns in both, where either model's zero clears both terms.)"""
    student = logits(5, torch.float32, 1, with_inf=masked == "student")
    teacher = logits(5, torch.float32, 2, with_inf=masked == "teacher")
    want = jsd_by_hand(student, teacher, beta)
    values, grad = fused.value_and_weighted_grad(
        "jsd", student, teacher, torch.tensor(1.0), fused=True, beta=beta
    )
    eager_values, eager_grad = losses.REGISTRY["jsd"].gradient(student, teacher, beta=beta)
    for got in (values, fused.values("jsd", student, teacher, fused=True, beta=beta), eager_values):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert torch.isfinite(grad).all()
    torch.testing.assert_close(grad, eager_grad, rtol=1e-4, atol=3e-6)


def test_the_compiled_kernel_takes_a_new_weight_without_recompiling(monkeypatch):
    torch._dynamo.reset()  # no earlier test's entries for this code object: the first call below compiles afresh
    monkeypatch.setattr(fused, "_COMPILED", {})
    student, teacher = logits(8, torch.float32, 3), logits(8, torch.float32, 4)
    grads = []
    with torch._dynamo.config.patch(error_on_recompile=True):
        for weight in (0.5, 0.125):
            grads.append(
                fused.value_and_weighted_grad("jsd", student, teacher, torch.tensor(weight), fused=True)[1]
            )
    torch.testing.assert_close(grads[1], grads[0] / 4)


def test_a_compiler_failure_warns_once_and_runs_the_eager_kernel(monkeypatch, caplog):
    calls = []

    def failing_compile(fn, **_options):
        def compiled(*args, **kwargs):
            calls.append(fn)
            raise RuntimeError("InvalidCxxCompiler: No working C++ compiler found\nmore detail")

        return compiled

    monkeypatch.setattr(fused, "_COMPILED", {})
    monkeypatch.setattr(fused, "_UNAVAILABLE", {})
    monkeypatch.setattr(torch, "compile", failing_compile)
    student, teacher = logits(4, torch.float32, 5), logits(4, torch.float32, 6)
    with caplog.at_level(logging.WARNING, logger="distillens.fused"):
        first = fused.value_and_weighted_grad("reverse_kl", student, teacher, torch.tensor(1.0), fused=True)
        second = fused.values("jsd", student, teacher, fused=True)
    warnings = [record.getMessage() for record in caplog.records]
    assert len(warnings) == 1 and len(calls) == 1  # the second kernel does not try again on this device
    assert "No working C++ compiler found" in warnings[0] and "more detail" not in warnings[0]
    assert "model.loss.fused: false" in warnings[0]
    eager = losses.REGISTRY["reverse_kl"].gradient(student, teacher)
    torch.testing.assert_close(first[0], eager[0])
    torch.testing.assert_close(first[1], eager[1])
    torch.testing.assert_close(second, losses.REGISTRY["jsd"].gradient(student, teacher)[0])


def lens_pair(seed: int) -> LogitLens:
    torch.manual_seed(seed)
    return LogitLens.from_parts(torch.nn.RMSNorm(16), torch.nn.Linear(16, V, bias=False))


@pytest.mark.parametrize("divergence", ["jsd", "reverse_kl"])
def test_the_chunked_loss_with_fused_kernels_equals_the_eager_one_in_value_and_gradients(divergence):
    student_lens, teacher_lens = lens_pair(0), lens_pair(1)
    hidden = [torch.randn(2, 7, 16, generator=torch.Generator().manual_seed(s)) for s in range(4)]
    mask = torch.rand(2, 7, generator=torch.Generator().manual_seed(9)) > 0.3  # (2, 7)
    results = []

    def loss_of(student_hidden, use_fused):
        return projected_divergence(
            student_hidden,
            hidden[2:],
            student_lens,
            teacher_lens,
            mask,
            divergence,
            chunk_size=5,
            fused=use_fused,
        )

    for use_fused in (False, True):
        student_hidden = [h.clone().requires_grad_() for h in hidden[:2]]
        for param in student_lens.parameters():
            param.grad = None
        loss, per_pair = loss_of(student_hidden, use_fused)
        loss.backward()
        grads = [h.grad for h in student_hidden] + [p.grad for p in student_lens.parameters()]
        with torch.no_grad():  # validation's path: values only
            no_grad_loss, _ = loss_of(hidden[:2], use_fused)
        results.append((loss.detach(), per_pair, no_grad_loss, grads))
    (eager_loss, eager_pairs, eager_no_grad, eager_grads), (loss, pairs, no_grad_loss, grads) = results
    torch.testing.assert_close(loss, eager_loss)
    torch.testing.assert_close(pairs, eager_pairs)
    torch.testing.assert_close(no_grad_loss, eager_no_grad)
    for got, expected in zip(grads, eager_grads, strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-7)


def test_a_fit_with_fused_kernels_logs_the_curves_of_an_eager_fit(tmp_path):
    curves = {}
    for use_fused in (False, True):
        config = tiny_fit_config(
            tmp_path / str(use_fused),
            tmp_path / "cache",
            max_steps=3,
            val_check_interval=3,
            limit_val_batches=1,
        )
        config["model"]["loss"] = {"fused": use_fused}
        with mock.patch.object(sys, "argv", ["distillens"]):
            run_cli(["fit", "--config", str(write_config(config, tmp_path / f"{use_fused}.yaml"))])
        events = sorted((tmp_path / str(use_fused) / "tiny").glob("events.out.tfevents.*"))
        curves[use_fused] = scalars(events, ["train/loss", "val/loss", "val/kd", "val/lens"])
    assert set(curves[True]) == {"train/loss", "val/loss", "val/kd", "val/lens"}
    for name, eager in curves[False].items():
        assert curves[True][name].keys() == eager.keys()
        for step, value in eager.items():
            assert curves[True][name][step] == pytest.approx(value, rel=1e-4), (name, step)


def test_under_a_dispatch_mode_the_eager_kernel_runs_and_nothing_is_compiled(monkeypatch):
    """A kernel compiled under FLOP counting would be reused afterwards and run op by op: compile only outside."""
    from torch.utils.flop_counter import FlopCounterMode

    monkeypatch.setattr(fused, "_COMPILED", {})
    student, teacher = logits(4, torch.float32, 7), logits(4, torch.float32, 8)
    with FlopCounterMode(display=False):
        values, grad = fused.value_and_weighted_grad("jsd", student, teacher, torch.tensor(1.0), fused=True)
    assert fused._COMPILED == {}
    eager_values, eager_grad = losses.REGISTRY["jsd"].gradient(student, teacher)
    torch.testing.assert_close(values, eager_values)
    torch.testing.assert_close(grad, eager_grad)
    fused.value_and_weighted_grad("jsd", student, teacher, torch.tensor(1.0), fused=True)
    assert ("value_and_grad", "jsd") in fused._COMPILED
