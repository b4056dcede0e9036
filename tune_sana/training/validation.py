"""The fixed-seed validation loss: held-out samples with K fixed draws of noise and timesteps,
identical for every evaluation of every trial, so two trials' numbers compare.

One draw of noise and timesteps per sample makes the loss itself noisy: at a fixed model,
another draw moves it by more than the difference between two good configurations. Averaging K
draws divides that variance by about K (``bench/demo_finetune.py`` measures it); the draws stay
fixed, so the loss is a deterministic function of the model. The same class evaluates the
retain set (held-out pretraining data: forgetting).
"""

from __future__ import annotations

import math
from contextlib import AbstractContextManager, nullcontext

import torch
from torch import nn

from tune_sana.data.encoded import Encoded
from tune_sana.training.flow import FlowBatch, flow_loss, make_batch

VALIDATION_SEED = 20240101


class FixedValidation:
    """The flow loss on the first ``size`` samples of ``data``, averaged over ``draws`` fixed
    draws of noise and timesteps.

    The draws depend only on ``seed`` (VALIDATION_SEED) and the data, never on the trial's seed.
    The loss is fp32; it is NaN if the model's output is not finite in any draw.
    """

    def __init__(self, data: Encoded, size: int, mean: float, std: float, shift: float,
                 device: torch.device, draws: int = 1, seed: int = VALIDATION_SEED) -> None:
        subset = data.take(torch.arange(min(size, len(data))))
        gen = torch.Generator().manual_seed(seed)
        self.batches: list[FlowBatch] = [
            make_batch(subset, gen, mean, std, shift).to(device) for _ in range(max(1, draws))
        ]
        self._losses: list[float] = []

    @property
    def batch(self) -> FlowBatch:
        """The draw to replay when the last evaluation was not finite: the first non-finite
        one (the first draw before any evaluation)."""
        bad = [i for i, loss in enumerate(self._losses) if not math.isfinite(loss)]
        return self.batches[bad[0] if bad else 0]

    @torch.no_grad()
    def __call__(self, model: nn.Module, dtype: torch.dtype,
                 context: AbstractContextManager[None] | None = None) -> float:
        """The mean loss over the draws as a Python float (NaN when the model's output is not
        finite); one host sync."""
        was_training = model.training
        model.eval()
        try:
            with context or nullcontext():
                losses = torch.stack([flow_loss(model, b, dtype) for b in self.batches])
        finally:
            model.train(was_training)
        self._losses = losses.tolist()  # the one host sync
        return sum(self._losses) / len(self._losses)
