"""Callbacks that record what a real `distillens fit` process did, for tests to recompute it independently.

A test adds them to a run through a config overlay (``class_path: probes.RecordRun``) and puts tests/ on the run's
PYTHONPATH. They only read: the run trains exactly as it would without them.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import lightning as L
import torch


class RecordRun(L.Callback):
    """Saves the initial weights and configs of student and teacher (``start.pt``) and every batch each rank trains
    on (``batch-step<global step>-rank<rank>-<batch index>.pt``) under ``folder``."""

    def __init__(self, folder: str) -> None:
        self.folder = Path(folder)

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Before the module's own on_fit_start, which frees the teacher's blocks when a teacher cache is read."""
        self.folder.mkdir(parents=True, exist_ok=True)
        if trainer.global_rank != 0 or (self.folder / "start.pt").exists():
            return  # a resumed run does not start from the initial weights
        record = {
            name: {
                "config": model.config.to_dict(),
                "state": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
            }
            for name, model in (("student", pl_module.student), ("teacher", pl_module.teacher))
        }
        torch.save(record, self.folder / "start.pt")

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx: int
    ) -> None:
        tensors = {k: v.detach().cpu() for k, v in batch.items() if isinstance(v, torch.Tensor)}
        name = f"batch-step{trainer.global_step}-rank{trainer.global_rank}-{batch_idx}.pt"
        torch.save(tensors, self.folder / name)


class StopAt(L.Callback):
    """Before the training batch of global step ``step``, sends this process SIGINT (``how="sigint"``, what Ctrl-C
    sends) or raises RuntimeError (``how="error"``: a bug, an out-of-memory)."""

    def __init__(self, step: int, how: str = "sigint") -> None:
        self.step, self.how = step, how

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx: int
    ) -> None:
        if trainer.global_step != self.step:
            return
        if self.how == "error":
            raise RuntimeError(f"StopAt: step {self.step}")
        os.kill(os.getpid(), signal.SIGINT)


class RecordSources(L.Callback):
    """Writes, per rank, who wrote the responses of each optimizer step's micro-batches (``model.on_policy``):
    ``sources-rank<rank>.json``, a list per step of "reference" / "student" / "teacher"."""

    def __init__(self, folder: str) -> None:
        self.folder = Path(folder)
        self.steps: list[list[str]] = []

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer) -> None:
        self.steps.append(
            list(pl_module.rollouts.sources)
        )  # callbacks run before the module resets its window

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        (self.folder / f"sources-rank{trainer.global_rank}.json").write_text(json.dumps(self.steps))
