"""The optimizer of a distillation run: AdamW with linear warm-up and cosine decay, stepped every optimizer step.

Weight decay applies to weight matrices only: biases and norm weights (any parameter with fewer than two dimensions
or "norm" in its name) are left out, as is usual for transformers.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


@dataclass
class OptimizerConfig:
    """AdamW with linear warm-up and cosine decay, stepped every optimizer step."""

    lr: float = 5e-4
    """Peak learning rate."""
    weight_decay: float = 0.01
    """Decoupled weight decay (not applied to biases and norm weights)."""
    betas: tuple[float, float] = (0.9, 0.999)
    """Adam betas."""
    warmup: float = 0.05
    """Warm-up length: a fraction of the total steps if < 1, else a number of steps."""
    min_lr_ratio: float = 0.1
    """Final learning rate as a fraction of the peak (used when ``min_lr`` is unset)."""
    min_lr: float | None = None
    """Final learning rate as an absolute value (the paper: 1e-7); overrides ``min_lr_ratio`` when set."""

    def __post_init__(self) -> None:
        if self.min_lr is not None and not 0 <= self.min_lr <= self.lr:
            raise ValueError(f"optimizer.min_lr={self.min_lr}: must be between 0 and optimizer.lr={self.lr}")

    @property
    def floor_ratio(self) -> float:
        """The cosine schedule's final learning rate as a fraction of the peak."""
        return self.min_lr / self.lr if self.min_lr is not None else self.min_lr_ratio


def adamw_with_schedule(
    named_parameters: Iterable[tuple[str, nn.Parameter]], config: OptimizerConfig, total_steps: int
) -> dict[str, Any]:
    """AdamW over the trainable parameters and its per-step warm-up + cosine schedule, in Lightning's dict form."""
    decay, no_decay = [], []
    for name, param in named_parameters:
        if param.requires_grad:
            (no_decay if param.ndim < 2 or "norm" in name.lower() else decay).append(param)
    groups = [  # named: LearningRateMonitor logs lr-AdamW/decay and lr-AdamW/no_decay
        {"params": decay, "weight_decay": config.weight_decay, "name": "decay"},
        {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"},
    ]
    optimizer = torch.optim.AdamW(groups, lr=config.lr, betas=tuple(config.betas))
    warmup = int(config.warmup * total_steps) if config.warmup < 1 else int(config.warmup)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, warmup_cosine(warmup, total_steps, config.floor_ratio)
    )
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


def warmup_cosine(warmup: int, total: int, min_ratio: float) -> Callable[[int], float]:
    """Multiplier of the peak learning rate at a step: linear warm-up, then cosine decay to min_ratio."""

    def multiplier(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = min((step - warmup) / max(total - warmup, 1), 1.0)
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return multiplier
