"""Learning-rate schedule: per-iteration linear warm-up, then half-cosine to `min_lr` (MAE's
`util/lr_sched.py`, evaluated per step rather than per fractional epoch: the same curve)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


def scaled_lr(blr: float, global_batch: int) -> float:
    """The linear scaling rule of MAE/SupMAE: lr = blr x global batch / 256."""
    return blr * global_batch / 256


@dataclass(frozen=True)
class WarmupCosine:
    lr: float  # peak
    min_lr: float
    warmup_steps: int
    total_steps: int

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.lr * step / self.warmup_steps
        span = max(1, self.total_steps - self.warmup_steps)
        t = min(1.0, (step - self.warmup_steps) / span)
        return self.min_lr + (self.lr - self.min_lr) * 0.5 * (1.0 + math.cos(math.pi * t))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set every group's lr, scaled by its `lr_scale` (layer-wise decay) when it has one."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
