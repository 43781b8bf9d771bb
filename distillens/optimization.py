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
        {"params": decay, "name": "decay", **group_settings(config, "decay")},
        {"params": no_decay, "name": "no_decay", **group_settings(config, "no_decay")},
    ]
    optimizer = torch.optim.AdamW(groups, lr=config.lr, betas=tuple(config.betas))
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule_of(config, total_steps))
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


def group_settings(config: OptimizerConfig, group: str) -> dict[str, Any]:
    """A parameter group's AdamW settings: weight decay for weight matrices only."""
    decay = config.weight_decay if group == "decay" else 0.0
    return {"lr": config.lr, "betas": tuple(config.betas), "weight_decay": decay}


def schedule_of(config: OptimizerConfig, total_steps: int) -> Callable[[int], float]:
    """The learning-rate multiplier of every step of a run of ``total_steps`` optimizer steps."""
    warmup = int(config.warmup * total_steps) if config.warmup < 1 else int(config.warmup)
    return warmup_cosine(warmup, total_steps, config.floor_ratio)


def apply_settings(
    optimizer: torch.optim.Optimizer,
    schedule: torch.optim.lr_scheduler.LambdaLR,
    config: OptimizerConfig,
    total_steps: int,
) -> None:
    """Put the run's own settings back into a restored optimizer and schedule, keeping their step and moments.

    Loading a checkpoint's optimizer state restores its saved learning rate, betas and weight decay, and the
    schedule's saved peak: a run resumed with another ``model.optimizer`` or ``trainer.max_steps`` would go on
    with the old ones. The schedule continues from its restored step under the new settings.
    """
    multiplier = schedule_of(config, total_steps)
    schedule.lr_lambdas = [multiplier] * len(optimizer.param_groups)
    schedule.base_lrs = [config.lr] * len(optimizer.param_groups)
    for group in optimizer.param_groups:
        group.update(group_settings(config, group.get("name", "decay")))
        group["initial_lr"] = config.lr
        group["lr"] = config.lr * multiplier(schedule.last_epoch)
    schedule._last_lr = [group["lr"] for group in optimizer.param_groups]


def warmup_cosine(warmup: int, total: int, min_ratio: float) -> Callable[[int], float]:
    """Multiplier of the peak learning rate at a step: linear warm-up, then cosine decay to min_ratio."""

    def multiplier(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = min((step - warmup) / max(total - warmup, 1), 1.0)
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return multiplier
