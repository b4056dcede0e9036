"""The fixed-seed validation loss: one held-out batch, one noise draw, one set of timesteps,
identical for every evaluation of every trial, so two trials' numbers compare."""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext

import torch
from torch import nn

from tune_sana.data.encoded import Encoded
from tune_sana.training.flow import FlowBatch, flow_loss, make_batch

VALIDATION_SEED = 20240101


class FixedValidation:
    """Evaluates the flow loss on the first ``size`` validation samples with frozen noise.

    The noise and timesteps depend only on VALIDATION_SEED and the data, never on the trial's
    seed. The loss is fp32; it is NaN if the model's output is not finite.
    """

    def __init__(self, val: Encoded, size: int, mean: float, std: float, shift: float,
                 device: torch.device) -> None:
        subset = val.take(torch.arange(min(size, len(val))))
        gen = torch.Generator().manual_seed(VALIDATION_SEED)
        self.batch: FlowBatch = make_batch(subset, gen, mean, std, shift).to(device)

    @torch.no_grad()
    def __call__(self, model: nn.Module, dtype: torch.dtype,
                 context: AbstractContextManager[None] | None = None) -> float:
        """The loss as a Python float (NaN when the model's output is not finite)."""
        was_training = model.training
        model.eval()
        try:
            with context or nullcontext():
                loss = flow_loss(model, self.batch, dtype)
        finally:
            model.train(was_training)
        return float(loss)
