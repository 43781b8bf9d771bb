"""train/tokens_per_sec: tokens over wall time per logging window, not per micro-batch."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from distillens import callbacks
from distillens.callbacks import TokenThroughput


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
