"""GPU checks (marker ``gpu``, skipped without CUDA; ``make gpu-check`` runs them): FSDP2 on one GPU with the
teacher offloaded to CPU and the student checkpointed, bf16 precisions, against a plain run of the same models.

They reuse the CPU sharding tests' models, batches and training loop (tests/test_fsdp.py).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_fsdp import check_bf16, fit, save_models, scratch_tokenizer

from distillens.distributed import FSDP2Strategy

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return save_models(tmp_path_factory.mktemp("gpu"), scratch_tokenizer())


@pytest.fixture(scope="module")
def plain(model_dir):
    """One fp32 step on the GPU without sharding: the reference."""
    return fit(model_dir, max_steps=1, export=model_dir / "export_plain", accelerator="gpu")[1]


def test_fsdp_with_offloaded_teacher_matches_plain(model_dir, plain):
    strategy = FSDP2Strategy(offload_teacher=True)
    options = dict(accelerator="gpu", strategy=strategy, checkpointing=True)
    trainer, sharded = fit(model_dir, max_steps=1, export=model_dir / "export_fsdp", **options)
    assert sharded.totals[1] == pytest.approx(plain.totals[1], rel=1e-4)
    for name, expected in plain.grads.items():
        scale = float(expected.abs().max())
        torch.testing.assert_close(sharded.grads[name], expected, rtol=1e-3, atol=1e-4 * scale, msg=name)
    module = trainer.lightning_module
    teacher_shard = next(module.teacher.parameters()).to_local()
    student_shard = next(module.student.parameters()).to_local()
    assert teacher_shard.device.type == "cpu" and student_shard.device.type == "cuda"


def test_fsdp_bf16_true_step_is_close_to_fp32(model_dir, plain):
    """bf16 weights under FSDP (converted before sharding), fp32 divergences: the same loss to bf16 accuracy."""
    options = dict(accelerator="gpu", strategy=FSDP2Strategy(), precision="bf16-true")
    trainer, sharded = fit(model_dir, max_steps=1, export=model_dir / "export_bf16", **options)
    assert sharded.totals[1] == pytest.approx(plain.totals[1], rel=5e-2)
    assert all(g.dtype == torch.bfloat16 and torch.isfinite(g).all() for g in sharded.grads.values())
    assert next(trainer.lightning_module.teacher.parameters()).dtype == torch.bfloat16


@pytest.mark.parametrize("precision", ["bf16-true", "bf16-mixed"])
def test_bf16_keeps_divergences_in_fp32_on_cuda(model_dir, precision):
    check_bf16(model_dir, precision, accelerator="gpu")
