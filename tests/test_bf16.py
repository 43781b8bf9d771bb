"""bf16 on the CPU: matrix products in bf16, divergences and gradient sums in fp32.

- The chunked lens accumulates bf16 parameter gradients over chunks in fp32: a gradient summed over many chunks is as
  accurate as one computed in a single chunk (bf16 running sums lose several percent).
- Under ``trainer.precision: bf16-mixed`` (autocast) every loss term comes out in fp32, within bf16 rounding of the
  fp32 objective, in value and gradient.
- ``distillens fit`` trains on the CPU in bf16-mixed and bf16-true.
"""

from __future__ import annotations

import math
import sys
from unittest import mock

import pytest
import torch
from helpers import REPO
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn

from distillens.lens import LogitLens, lens_loss, naive_lens_loss
from distillens.lightning_cli import run_cli
from distillens.objective import LayerPairs, LossConfig

DATA = REPO / "data" / "instructions"
VOCAB = 101


def unembedding_gradient(dtype: torch.dtype, rows: int, chunk_size: int, impl=lens_loss) -> torch.Tensor:
    """Gradient of the summed JSD lens loss of ``rows`` random rows with respect to a (V, d) student unembedding."""
    torch.manual_seed(1)
    student, teacher = nn.Linear(32, 64, bias=False).to(dtype), nn.Linear(32, 64, bias=False).to(dtype)
    hidden_s, hidden_t = torch.randn(1, rows, 32).to(dtype), torch.randn(1, rows, 32).to(dtype)  # (1, N, d)
    lenses = LogitLens.from_parts(None, student), LogitLens.from_parts(None, teacher)
    mask = torch.ones(1, rows, dtype=torch.bool)
    extra = {"chunk_size": chunk_size, "reduction": "sum"} if impl is lens_loss else {}
    loss, _ = impl([hidden_s], [hidden_t], *lenses, mask, "jsd", **extra)
    (loss * (rows if impl is naive_lens_loss else 1)).backward()
    assert student.weight.grad.dtype == dtype
    return student.weight.grad


def test_bf16_parameter_gradients_are_summed_over_chunks_in_fp32():
    """512 chunks of one row: with fp32 accumulators the error against an fp64 reference (the naive lens) stays at
    the single-chunk level, about 0.3%; summing in bf16 gave 2%."""
    reference = unembedding_gradient(torch.float64, 512, 512, impl=naive_lens_loss)
    error = {
        chunk: float(
            (unembedding_gradient(torch.bfloat16, 512, chunk).double() - reference).norm() / reference.norm()
        )
        for chunk in (1, 512)
    }
    assert error[512] < 5e-3
    assert error[1] < 1.5 * error[512] + 1e-3, error


def test_autocast_objective_is_fp32_and_within_bf16_rounding_of_fp32(tiny_module):
    module = tiny_module(
        student=(2, 64), teacher=(4, 96), loss=LossConfig(ce_weight=0.5, chunk_size=7),
        layers=LayerPairs(student=[1, 2], teacher=[2, 4]),
    )  # fmt: skip
    module.train()
    input_ids = torch.randint(0, VOCAB, (3, 12), generator=torch.Generator().manual_seed(2))
    labels = input_ids.clone()
    labels[:, :5] = -100
    batch = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": labels}

    def objective(autocast: bool):
        module.zero_grad(set_to_none=True)
        with torch.autocast("cpu", torch.bfloat16, enabled=autocast):
            terms = module(batch)
            total = terms.total()
        total.backward()
        return terms, [p.grad.clone() for p in module.student.parameters()]

    exact, exact_grads = objective(False)
    mixed, mixed_grads = objective(True)
    for name in ("ce", "kd", "lens", "lens/s1_t2", "lens/s2_t4"):
        assert mixed[name].dtype == torch.float32, name
        assert float(mixed[name]) == pytest.approx(float(exact[name]), rel=3e-2), name
    assert any(not torch.equal(a, b) for a, b in zip(mixed_grads, exact_grads, strict=True)), (
        "autocast was inert"
    )
    for got, want in zip(mixed_grads, exact_grads, strict=True):
        assert got.dtype == torch.float32
        assert float((got - want).norm()) <= 5e-2 * float(want.norm()) + 1e-6


@pytest.mark.parametrize("precision", ["bf16-mixed", "bf16-true"])
def test_fit_trains_in_bf16_on_cpu(precision, tmp_path):
    args = [
        "fit", "--config", str(REPO / "configs" / "tiny.yaml"),
        "--trainer.precision", precision, "--trainer.max_steps", "2", "--trainer.limit_val_batches", "1",
        "--trainer.val_check_interval", "2", "--trainer.enable_progress_bar", "false",
        "--trainer.logger.init_args.save_dir", str(tmp_path),
        "--data.train", str(DATA / "train.jsonl"), "--data.validation", str(DATA / "validation.jsonl"),
        "--data.test", str(DATA / "test.jsonl"), "--data.cache_dir", str(tmp_path / "cache"),
    ]  # fmt: skip
    with mock.patch.object(sys, "argv", ["distillens"]):
        cli = run_cli(args)
    assert cli.trainer.global_step == 2
    expected = torch.bfloat16 if precision == "bf16-true" else torch.float32
    assert next(cli.model.student.parameters()).dtype == expected
    assert next(cli.model.teacher.parameters()).dtype == expected
    events = EventAccumulator(str(next((tmp_path / "tiny").glob("events.out.tfevents.*"))))
    events.Reload()
    for name in ("train/loss", "val/loss", "val/lens"):
        values = [event.value for event in events.Scalars(name)]
        assert values and all(math.isfinite(v) and v > 0 for v in values), (name, values)


def test_under_autocast_each_unembedding_is_cast_once_per_call_with_the_per_chunk_casts_results(monkeypatch):
    """The chunked loss casts the (V, d) unembeddings once for all its chunks (autocast would cast the frozen
    teacher's at every chunk, and turn each chunk's student weight gradient back to fp32 on its own): the loss and
    every gradient are those of the per-chunk casts, bit for bit."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class WeightCasts(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten._to_copy.default and tuple(args[0].shape) == (VOCAB, 32):
                self.count += 1
            return func(*args, **(kwargs or {}))

    def run() -> tuple[torch.Tensor, list[torch.Tensor], int]:
        torch.manual_seed(3)
        student, teacher = (
            nn.Linear(32, VOCAB, bias=False),
            nn.Linear(32, VOCAB, bias=False).requires_grad_(False),
        )
        norm = nn.RMSNorm(32)
        hidden_s = torch.randn(2, 9, 32, requires_grad=True)  # (B, T, d)
        hidden_t = torch.randn(2, 9, 32)
        mask = torch.ones(2, 9, dtype=torch.bool)
        lenses = LogitLens.from_parts(norm, student), LogitLens.from_parts(None, teacher)
        with WeightCasts() as casts, torch.autocast("cpu", torch.bfloat16):
            loss, _ = lens_loss([hidden_s], [hidden_t], *lenses, mask, "jsd", chunk_size=4, reduction="sum")
            loss.backward()
        return loss.detach(), [hidden_s.grad, student.weight.grad, norm.weight.grad], casts.count

    loss, grads, casts = run()
    assert casts == 2, casts  # the teacher and the student weight, once each (18 rows: 5 chunks of 4)
    monkeypatch.setattr(
        LogitLens, "cast_unembedding", lambda self: None
    )  # autocast's own cast at every chunk
    per_chunk_loss, per_chunk_grads, per_chunk_casts = run()
    assert per_chunk_casts == 11, per_chunk_casts  # 5 teacher casts, 1 student cast, 5 gradients to fp32
    assert torch.equal(loss, per_chunk_loss)
    for got, expected in zip(grads, per_chunk_grads, strict=True):
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
