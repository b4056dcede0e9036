"""Sana's training objective: rectified flow matching.

x_t = (1 - s) x0 + s eps, the model predicts the velocity eps - x0, loss = mean squared error in
fp32. s comes from a logit-normal distribution, then ``flow_shift`` moves it towards noise:
s' = shift * s / (1 + (shift - 1) * s). The transformer takes the timestep as s' * 1000, as
SanaPipeline passes the scheduler's timesteps.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from tune_sana.data.encoded import Encoded

NUM_TRAIN_TIMESTEPS = 1000


@dataclass(frozen=True)
class FlowBatch:
    """Everything one loss evaluation needs; built on the CPU generator, then moved."""

    x0: torch.Tensor
    noise: torch.Tensor
    sigmas: torch.Tensor
    text: torch.Tensor
    mask: torch.Tensor

    def to(self, device: torch.device) -> FlowBatch:
        return FlowBatch(*(t.to(device, non_blocking=True) for t in
                           (self.x0, self.noise, self.sigmas, self.text, self.mask)))


def sample_sigmas(
    n: int, gen: torch.Generator, mean: float, std: float, shift: float
) -> torch.Tensor:
    """n noise levels in (0, 1): sigmoid(N(mean, std)), then shifted. float32, CPU."""
    s = torch.sigmoid(mean + std * torch.randn(n, generator=gen))
    return shift * s / (1 + (shift - 1) * s)


def make_batch(data: Encoded, gen: torch.Generator, mean: float, std: float,
               shift: float) -> FlowBatch:
    """Draw noise and noise levels for ``data`` from ``gen`` (CPU), so runs repeat exactly."""
    noise = torch.randn(data.latents.shape, generator=gen)
    sigmas = sample_sigmas(len(data), gen, mean, std, shift)
    return FlowBatch(data.latents, noise, sigmas, data.text, data.mask)


def flow_loss(model: nn.Module, batch: FlowBatch, dtype: torch.dtype) -> torch.Tensor:
    """Mean squared velocity error in fp32. ``dtype`` is the dtype inputs are fed in."""
    s = batch.sigmas.view(-1, 1, 1, 1)
    x_t = (1 - s) * batch.x0 + s * batch.noise
    target = batch.noise - batch.x0
    pred = model(
        hidden_states=x_t.to(dtype),
        encoder_hidden_states=batch.text.to(dtype),
        encoder_attention_mask=batch.mask,
        timestep=(batch.sigmas * NUM_TRAIN_TIMESTEPS).to(dtype),
        return_dict=False,
    )[0]
    return torch.mean((pred.float() - target) ** 2)
