"""Training callbacks: token throughput, and export of the trained student as a Hugging Face folder."""

from __future__ import annotations

import time
from pathlib import Path

import lightning as L


class TokenThroughput(L.Callback):
    """Log ``train/tokens_per_sec``: non-padding tokens of the micro-batch over its wall time, all ranks summed."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        seconds = time.perf_counter() - self._start
        tokens = batch["attention_mask"].sum().float() * trainer.world_size
        pl_module.log(
            "train/tokens_per_sec", tokens / max(seconds, 1e-9), batch_size=batch["input_ids"].shape[0]
        )


class ExportStudent(L.Callback):
    """At the end of fit, save the student (safetensors + config + tokenizer) where ``from_pretrained`` loads it.

    Args:
        dirpath: target folder; default ``<run folder>/student``.
    """

    def __init__(self, dirpath: str | None = None) -> None:
        self.dirpath = dirpath

    def on_fit_end(self, trainer, pl_module) -> None:
        from distillens.models import export_student

        folder = Path(self.dirpath or Path(trainer.log_dir or trainer.default_root_dir) / "student")
        if trainer.is_global_zero:
            export_student(pl_module.student, pl_module.tokenizer, folder)
            print(f"student exported to {folder}")
