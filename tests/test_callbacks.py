"""The callbacks (distillens.callbacks), each alone on stand-ins for the trainer and the module: the step-0
validation, the end-of-fit export's early check, the token throughput, and sequences per step."""

from __future__ import annotations

from types import SimpleNamespace

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from distillens import callbacks
from distillens.callbacks import (
    ExportStudent,
    InitialValidation,
    SequencesPerStep,
    TokenThroughput,
    accumulation_for,
)

# ------------------------------------------------------------------------------------------------- InitialValidation


@pytest.mark.parametrize(("limit", "used"), [(1.0, 8), (0.5, 4), (0.3, 2), (3, 3)])
def test_initial_validation_uses_the_batches_later_validations_use(limit, used):
    """A fractional limit_val_batches keeps int(fraction x batches) of them, as Lightning's validations do, so the
    step-0 value is on the same batches as the rest of the curve."""
    from lightning.pytorch.plugins.precision import Precision

    from distillens.objective import Terms

    seen = []

    class Module(torch.nn.Module):
        device = torch.device("cpu")

        def forward(self, batch):
            seen.append(batch["index"])
            return Terms(
                tokens=torch.tensor(2.0), sums={"kd": torch.tensor(1.0)}, pair_means={}, weights={"kd": 1}
            )

        def evaluation_terms(self, batch):  # DistillationModule's validation path (no teacher cache here)
            return self(batch)

        def transfer_batch_to_device(self, batch, device, index):
            return batch

    trainer = SimpleNamespace(
        global_step=0, limit_val_batches=limit, loggers=[], precision_plugin=Precision(),
        datamodule=SimpleNamespace(val_dataloader=lambda: [{"index": i} for i in range(8)]),
    )  # fmt: skip
    InitialValidation().on_train_start(trainer, Module())
    assert seen == list(range(used))


@pytest.mark.parametrize(("precision", "autocast"), [("bf16-mixed", True), ("32-true", False)])
def test_initial_validation_runs_in_the_trainers_precision(precision, autocast, monkeypatch):
    """The step-0 validation (a callback, outside Lightning's own loops) must see the same precision as the later
    validations, or a bf16 run's curve would start from an fp32 value."""
    from lightning.pytorch.plugins.precision import MixedPrecision, Precision

    from distillens.objective import Terms

    seen = []

    class Module(nn.Module):
        device = torch.device("cpu")

        def forward(self, batch):
            seen.append(torch.is_autocast_enabled("cpu"))
            return Terms(
                tokens=torch.tensor(2.0), sums={"kd": torch.tensor(1.0)}, pair_means={}, weights={"kd": 1}
            )

        def evaluation_terms(self, batch):  # DistillationModule's validation path (no teacher cache here)
            return self(batch)

        def transfer_batch_to_device(self, batch, device, index):
            return batch

    plugin = MixedPrecision("bf16-mixed", "cpu") if precision == "bf16-mixed" else Precision()
    trainer = SimpleNamespace(
        global_step=0, limit_val_batches=1, loggers=[], precision_plugin=plugin,
        datamodule=SimpleNamespace(val_dataloader=lambda: [{}, {}]),
    )  # fmt: skip
    InitialValidation().on_train_start(trainer, Module())
    assert seen == [autocast]


# ------------------------------------------------------------------------------------------------- ExportStudent


def test_the_end_of_fit_export_told_not_to_overwrite_fails_when_fit_starts(tmp_path):
    """Not after the training: a folder it may not write is reported before the first step."""
    (tmp_path / "student").mkdir()
    (tmp_path / "student" / "config.json").write_text("{}")
    strategy = SimpleNamespace(broadcast=lambda value: value)  # one process
    trainer = SimpleNamespace(
        log_dir=str(tmp_path), default_root_dir=str(tmp_path), is_global_zero=True, strategy=strategy
    )
    ExportStudent(overwrite=True).on_fit_start(trainer, None)  # the default: a re-run replaces its own export
    with pytest.raises(FileExistsError, match="overwrite: true"):
        ExportStudent(overwrite=False).on_fit_start(trainer, None)


# ------------------------------------------------------------------------------------------------- TokenThroughput


class Clock:
    """A perf_counter that moves only when told."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_the_rate_is_the_windows_tokens_over_its_wall_time(monkeypatch):
    """Two micro-batches per optimizer step, a value every 2 steps: each logged value is the tokens of its 4
    micro-batches (2 ranks) over the seconds since the previous value, whatever the single batches took."""
    clock = Clock()
    monkeypatch.setattr(callbacks.time, "perf_counter", clock)
    logged = []
    module = SimpleNamespace(
        device=torch.device("cpu"), log=lambda name, value, **_: logged.append((name, value))
    )
    trainer = SimpleNamespace(global_step=0, log_every_n_steps=2, world_size=2)
    callback = TokenThroughput()
    callback.on_train_start(trainer, module)
    seconds = [1.0, 3.0, 0.5, 0.5, 2.0, 2.0, 1.0, 4.0]  # per micro-batch: very uneven
    tokens = [10, 30, 20, 20, 5, 7, 9, 11]  # non-padding tokens of each micro-batch on one rank
    for index, (took, count) in enumerate(zip(seconds, tokens, strict=True)):
        mask = torch.zeros(2, 40, dtype=torch.long)  # (B, T)
        mask.view(-1)[:count] = 1
        batch = {"attention_mask": mask, "input_ids": mask}
        callback.on_train_batch_start(trainer, module, batch, index)
        clock.now += took
        trainer.global_step += index % 2  # the optimizer steps after every second micro-batch
        callback.on_train_batch_end(trainer, module, None, batch, index)
    expected = [2 * sum(tokens[:4]) / sum(seconds[:4]), 2 * sum(tokens[4:]) / sum(seconds[4:])]
    assert [name for name, _ in logged] == ["train/tokens_per_sec"] * 2
    assert [value for _, value in logged] == pytest.approx(expected)


# ------------------------------------------------------------------------------------------------- SequencesPerStep


class _Rows(L.LightningDataModule):
    def __init__(self, rows: int, batch_size: int) -> None:
        super().__init__()
        self.rows, self.batch_size = rows, batch_size

    def train_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(torch.randn(self.rows, 3)), batch_size=self.batch_size)


class _Linear(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(3, 1)
        self.planned_steps: int | None = None

    def training_step(self, batch, batch_idx):
        return self.layer(batch[0]).square().mean()

    def configure_optimizers(self):
        self.planned_steps = self.trainer.estimated_stepping_batches  # what the schedule is built for
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_sequences_per_step_sets_the_accumulation_before_the_schedule_is_planned() -> None:
    module = _Linear()
    trainer = L.Trainer(
        accelerator="cpu", devices=1, max_epochs=1, callbacks=[SequencesPerStep(8)], logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    trainer.fit(module, datamodule=_Rows(rows=16, batch_size=2))  # 8 micro-batches of 2
    assert trainer.accumulate_grad_batches == 4
    assert trainer.global_step == module.planned_steps == 2


def test_sequences_per_step_that_cannot_divide_names_the_fix() -> None:
    assert [accumulation_for(16, 4, gpus) for gpus in (1, 2, 4)] == [4, 2, 1]
    with pytest.raises(ValueError, match="use a data.batch_size that divides 2"):
        accumulation_for(16, 4, 8)
    with pytest.raises(ValueError, match="cannot be split evenly over 8 devices"):
        accumulation_for(4, 1, 8)
    with pytest.raises(ValueError, match="sequences=0"):
        SequencesPerStep(0)
