"""Learning-rate schedules: linear warmup from 0, then constant, cosine or linear decay to 0."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from tune_sana.config import LrSchedule, TrialConfig


def lr_factor(schedule: LrSchedule, warmup_steps: int, total_steps: int) -> Callable[[int], float]:
    """Multiplier of the peak lr at optimizer step ``i`` (0-based), for torch's LambdaLR.

    Step 0 of a warmup runs at lr / warmup_steps, never at 0 (a step at lr 0 is wasted).
    """

    def factor(i: int) -> float:
        if i < warmup_steps:
            return (i + 1) / warmup_steps
        if schedule is LrSchedule.CONSTANT:
            return 1.0
        span = max(1, total_steps - warmup_steps)
        progress = min(1.0, (i - warmup_steps) / span)
        if schedule is LrSchedule.COSINE:
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        return 1.0 - progress

    return factor


def lr_scheduler(optimizer: torch.optim.Optimizer,
                 config: TrialConfig) -> torch.optim.lr_scheduler.LambdaLR:
    """The config's schedule over ``config.steps`` optimizer steps, stepped once per step."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_factor(config.lr_schedule, config.warmup_steps, config.steps))
