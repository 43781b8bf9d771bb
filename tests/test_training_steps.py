"""Several optimizer steps of a real Lightning fit against plain PyTorch written in tests/reference.py.

Gradient accumulation over micro-batches with different numbers of supervised tokens, gradient clipping that acts
on some steps only, AdamW with decoupled weight decay, warm-up and cosine decay: after every step, the gradient the
optimizer receives and the weights it leaves must be those of the reference, which computes the token mean of the
objective over the whole step from its definition. A token count carried over from one step to the next, a wrong
clipping scale, decay applied to norms, or a schedule off by one step, all change step 2 or 3.
"""

from __future__ import annotations

import copy

import lightning as L
import pytest
import torch
from helpers import without_tokenizer
from reference import (
    Objective,
    grad_norm,
    relative_difference,
    supervised_batch,
    tiny_llama,
    train_reference,
    warmup_cosine_lr,
)
from torch.utils.data import DataLoader

from distillens.module import DistillationModule
from distillens.objective import LayerPairs, LossConfig
from distillens.optimization import OptimizerConfig

STEPS, ACCUMULATE = 3, 2
CLIP = 0.8  # between the steps' gradient norms: clipping acts on some steps and not on others
LR, WARMUP, MIN_RATIO, DECAY = 2e-2, 1, 0.1, 0.1
# supervised tokens per micro-batch differ (9, 5, 13, 3, 8, 11 predicted tokens): the step's mean is not the mean
# of the micro-batches' means
MICRO_BATCHES = [
    supervised_batch(1, [2, 8]), supervised_batch(2, [7, 6]), supervised_batch(3, [1, 4]),
    supervised_batch(4, [8, 9]), supervised_batch(5, [3, 9]), supervised_batch(6, [5, 2]),
]  # fmt: skip
OBJECTIVE = Objective(ce_weight=0.4, kd_weight=0.6, lens_weight=0.8, student_layers=[1], teacher_layers=[2])


class StepRecorder(DistillationModule):
    """Records the gradient the optimizer receives (after token normalisation, before clipping) and the student's
    weights after each optimizer step."""

    def on_before_optimizer_step(self, optimizer) -> None:
        super().on_before_optimizer_step(optimizer)
        self.grads.append({n: p.grad.detach().clone() for n, p in self.student.named_parameters()})

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        if (batch_idx + 1) % ACCUMULATE == 0:
            self.weights.append({n: w.detach().clone() for n, w in self.student.state_dict().items()})


@pytest.fixture(scope="module")
def runs():
    """The Lightning fit and the plain-PyTorch reference from the same initial weights."""
    mp = pytest.MonkeyPatch()
    without_tokenizer(mp)
    try:
        torch.manual_seed(0)
        module = StepRecorder(
            student=tiny_llama(2, 32), teacher=tiny_llama(4, 48),
            loss=LossConfig(ce_weight=0.4, kd_weight=0.6, lens_weight=0.8, chunk_size=5),
            layers=LayerPairs(student=[1], teacher=[2]),
            optimizer=OptimizerConfig(lr=LR, weight_decay=DECAY, warmup=WARMUP, min_lr_ratio=MIN_RATIO),
        )  # fmt: skip
        module.configure_model()
    finally:
        mp.undo()
    module.grads, module.weights = [], []
    start = {n: w.detach().clone() for n, w in module.student.state_dict().items()}
    student = copy.deepcopy(module.student)
    trainer = L.Trainer(
        accelerator="cpu", devices=1, max_steps=STEPS, accumulate_grad_batches=ACCUMULATE, gradient_clip_val=CLIP,
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        limit_val_batches=0,
    )  # fmt: skip
    trainer.fit(module, DataLoader(MICRO_BATCHES, batch_size=None))
    steps = [MICRO_BATCHES[k * ACCUMULATE : (k + 1) * ACCUMULATE] for k in range(STEPS)]
    lrs = [warmup_cosine_lr(k, LR, WARMUP, STEPS, MIN_RATIO) for k in range(STEPS)]
    reference = train_reference(student, module.teacher, steps, OBJECTIVE, lrs, weight_decay=DECAY, clip=CLIP)
    return module, reference, start


def test_clipping_acts_on_some_steps_only(runs):
    """Guards the test itself: with every step clipped (or none), a wrong gradient scale could go unnoticed."""
    _, reference, _ = runs
    norms = [grad_norm(step.grads) for step in reference]
    assert min(norms) < CLIP < max(norms), norms


@pytest.mark.parametrize("step", range(STEPS))
def test_each_step_receives_the_token_mean_gradient(runs, step):
    module, reference, _ = runs
    expected, got = reference[step].grads, module.grads[step]
    assert got.keys() == expected.keys()
    for name, value in expected.items():
        scale = float(value.abs().max())
        torch.testing.assert_close(
            got[name], value.float(), rtol=1e-4, atol=1e-4 * scale, msg=lambda m, n=name: f"{n}: {m}"
        )


@pytest.mark.parametrize("step", range(STEPS))
def test_each_step_leaves_the_weights_of_clipped_adamw(runs, step):
    module, reference, start = runs
    difference = relative_difference(module.weights[step], reference[step].weights, start)
    assert difference < 1e-3, (
        f"weights after step {step + 1} off the reference by {difference:.3g} of the update"
    )
