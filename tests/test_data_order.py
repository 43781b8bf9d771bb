"""The training order: reshuffled every epoch, fixed by the seed, and resumed at the exact next batch.

A resumed fit gets its data position back by two paths, each tested here on its own:

- the loader's own state (``ResumableDataLoader.load_state_dict``), which Lightning hands back when it builds the
  loader after restoring the checkpoint: fits bounded by ``max_steps`` (configs/tiny.yaml, the default run);
- the data module's state (``InstructionDataModule.state_dict``), restored before any loader exists. Fits bounded
  by ``max_epochs`` (the paper's setups) need it: ``DistillationModule.configure_optimizers`` asks for
  ``estimated_stepping_batches``, which then makes Lightning build the training loader before the checkpoint's loop
  state is restored, and the loader's own state never reaches it.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from test_data import numbered_rows, ready, write_jsonl

from distillens.data import EpochShuffleSampler, ResumableDataLoader

ROWS, BATCH = 10, 2  # 5 batches per epoch
MAX_STEPS, MAX_EPOCHS, RESUME_STEP = 8, 2, 6  # the resume point is inside the second epoch


def epoch_orders(sampler: EpochShuffleSampler, epochs: int) -> list[list[int]]:
    orders = []
    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        orders.append(list(sampler))
    return orders


def test_every_epoch_has_its_own_order_and_the_seed_fixes_them():
    orders = epoch_orders(EpochShuffleSampler(ROWS, seed=3), 3)
    assert all(sorted(order) == list(range(ROWS)) for order in orders)
    assert len({tuple(order) for order in orders}) == 3, f"epochs repeat an order: {orders}"
    torch.manual_seed(1234)  # another process: another global random state
    assert epoch_orders(EpochShuffleSampler(ROWS, seed=3), 3) == orders
    assert epoch_orders(EpochShuffleSampler(ROWS, seed=4), 3) != orders


def responses(batch: dict[str, torch.Tensor], tokenizer) -> list[str]:
    """The response of each row of a training batch (numbered_rows answers with the row's number)."""
    return [
        tokenizer.decode(labels[labels != -100]).removesuffix(tokenizer.eos_token)
        for labels in batch["labels"]
    ]


@pytest.fixture
def data(gpt2_tokenizer, tmp_path) -> Path:
    return write_jsonl(tmp_path / "train.jsonl", numbered_rows(ROWS))


def module_order(datamodule, tokenizer, epoch: int) -> list[list[str]]:
    loader = datamodule.train_dataloader()
    loader.sampler.set_epoch(epoch)  # what Lightning does before each epoch
    return [responses(batch, tokenizer) for batch in loader]


def test_data_module_reshuffles_each_epoch_in_an_order_fixed_by_its_seed(data, gpt2_tokenizer, tmp_path):
    datamodule = ready(gpt2_tokenizer, tmp_path, train=str(data), batch_size=BATCH, seed=5)
    first, second = (module_order(datamodule, gpt2_tokenizer, epoch) for epoch in (0, 1))
    assert sorted(sum(first, [])) == sorted(sum(second, [])) == sorted(str(i) for i in range(ROWS))
    assert first != second
    again = ready(gpt2_tokenizer, tmp_path, train=str(data), batch_size=BATCH, seed=5)
    assert [module_order(again, gpt2_tokenizer, epoch) for epoch in (0, 1)] == [first, second]


def test_data_module_state_resumes_its_loader_at_the_next_batch(data, gpt2_tokenizer, tmp_path):
    """state_dict reads the position of the trainer's loader; load_state_dict makes the next loader skip to it."""
    datamodule = ready(gpt2_tokenizer, tmp_path, train=str(data), batch_size=BATCH)
    reference = module_order(datamodule, gpt2_tokenizer, 1)
    loader = datamodule.train_dataloader()
    loader.sampler.set_epoch(1)
    batches = iter(loader)
    next(batches), next(batches)
    datamodule.trainer = SimpleNamespace(train_dataloader=loader)
    state = datamodule.state_dict()
    assert state == {"train_position": {"epoch": 1, "batches": 2}}

    restarted = ready(gpt2_tokenizer, tmp_path, train=str(data), batch_size=BATCH)
    restarted.load_state_dict(state)
    assert module_order(restarted, gpt2_tokenizer, 1) == reference[2:]


# ------------------------------------------------------------------------------------------------ real fits


class OrderRecorder(L.LightningModule):
    """One parameter; writes down what each training batch holds. Its ``configure_optimizers`` asks for
    ``estimated_stepping_batches``, as DistillationModule's does."""

    def __init__(self, tokenizer=None) -> None:
        super().__init__()
        self.tokenizer, self.seen = tokenizer, []
        self.weight = torch.nn.Parameter(torch.zeros(1))

    def training_step(self, batch, batch_idx):
        self.seen.append(responses(batch, self.tokenizer) if isinstance(batch, dict) else batch.tolist())
        return self.weight.sum() * 0.0

    def configure_optimizers(self):
        assert self.trainer.estimated_stepping_batches > 0
        return torch.optim.SGD(self.parameters(), lr=0.1)


def fit(
    module: OrderRecorder, folder: Path, ckpt_path: Path | None = None, limit: dict | None = None, **data
):
    """A fit keeping a checkpoint at every step under folder, MAX_STEPS steps unless ``limit`` says otherwise;
    returns the batches the module saw."""
    every_step = ModelCheckpoint(
        dirpath=folder,
        every_n_train_steps=1,
        save_top_k=-1,
        filename="step{step}",
        auto_insert_metric_name=False,
    )
    trainer = L.Trainer(
        accelerator="cpu", devices=1, **(limit or {"max_steps": MAX_STEPS}), callbacks=[every_step], logger=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
    )  # fmt: skip
    trainer.fit(module, ckpt_path=ckpt_path, **data)
    return module.seen


def test_epoch_bounded_fit_resumes_the_order_through_the_data_modules_state(data, gpt2_tokenizer, tmp_path):
    """max_epochs: the loader is built before the checkpoint is restored, only the data module's state places it."""
    datamodule = lambda: ready(gpt2_tokenizer, tmp_path, train=str(data), batch_size=BATCH)  # noqa: E731
    epochs = {"max_epochs": MAX_EPOCHS}
    full = fit(OrderRecorder(gpt2_tokenizer), tmp_path / "full", limit=epochs, datamodule=datamodule())
    assert len(full) == MAX_EPOCHS * ROWS // BATCH and full[5:] != full[:5]  # epoch 1 is not epoch 0 again
    checkpoint = tmp_path / "full" / f"step{RESUME_STEP}.ckpt"
    resumed = fit(
        OrderRecorder(gpt2_tokenizer), tmp_path / "resumed", checkpoint, epochs, datamodule=datamodule()
    )
    assert resumed == full[RESUME_STEP:]


def test_step_bounded_fit_resumes_the_order_through_the_loaders_own_state(tmp_path):
    """max_steps: the loader is built after the checkpoint is restored, and its own state places it (a loader given
    to fit directly, so that no data module can help)."""
    loader = lambda: ResumableDataLoader(  # noqa: E731
        torch.arange(ROWS), batch_size=BATCH, sampler=EpochShuffleSampler(ROWS, seed=9)
    )
    full = fit(OrderRecorder(), tmp_path / "full", train_dataloaders=loader())
    assert len(full) == MAX_STEPS
    checkpoint = tmp_path / "full" / f"step{RESUME_STEP}.ckpt"
    resumed = fit(OrderRecorder(), tmp_path / "resumed", checkpoint, train_dataloaders=loader())
    assert resumed == full[RESUME_STEP:]
