"""Sana's training objective: rectified flow matching.

x_t = (1 - s) x0 + s eps, the model predicts the velocity eps - x0, loss = mean squared error in
fp32. s comes from a logit-normal distribution, then ``flow_shift`` moves it towards noise:
s' = shift * s / (1 + (shift - 1) * s). The transformer takes the timestep as s' * 1000, as
SanaPipeline passes the scheduler's timesteps (times the config's ``timestep_scale``, 1.0 in
every release). A Sprint transformer (``guidance_embeds``) is fed as SanaSprintPipeline feeds
it: its timestep is s' itself, in [0, 1] (the pipeline's ``scm_timestep`` is the flow sigma of
its TrigFlow time, and its input the flow x_t), and a guidance embedding of
SPRINT_GUIDANCE x ``guidance_embeds_scale``. The loss stays flow matching for every family:
Sprint's own recipe (sCM + LADD distillation) is not what a trial runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from tune_sana.data.encoded import Encoded

NUM_TRAIN_TIMESTEPS = 1000
SPRINT_GUIDANCE = 4.5  # SanaSprintPipeline's default guidance_scale (NVlabs trains with 4-5)


@dataclass(frozen=True)
class FlowBatch:
    """Everything one loss evaluation needs; built on the CPU generator, then moved."""

    x0: torch.Tensor
    noise: torch.Tensor
    sigmas: torch.Tensor
    text: torch.Tensor
    mask: torch.Tensor

    def __len__(self) -> int:
        return len(self.sigmas)

    def to(self, device: torch.device) -> FlowBatch:
        return FlowBatch(*(t.to(device, non_blocking=True) for t in
                           (self.x0, self.noise, self.sigmas, self.text, self.mask)))

    def slice(self, start: int, stop: int) -> FlowBatch:
        """Samples [start, stop) (views, no copy): one rank's shard of a global batch."""
        return FlowBatch(*(t[start:stop] for t in
                           (self.x0, self.noise, self.sigmas, self.text, self.mask)))

    def split(self, size: int) -> list[FlowBatch]:
        """Micro-batches of ``size`` samples in order (the last may be smaller); views, no copy."""
        parts = [t.split(size) for t in (self.x0, self.noise, self.sigmas, self.text, self.mask)]
        return [FlowBatch(*chunk) for chunk in zip(*parts, strict=True)]


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
    pred = velocity(model, x_t, batch.sigmas, batch.text, batch.mask, dtype)
    return torch.mean((pred.float() - target) ** 2)


def velocity(model: nn.Module, x_t: torch.Tensor, sigmas: torch.Tensor, text: torch.Tensor,
             mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The model's predicted velocity eps - x0 at noise levels ``sigmas`` (one per sample), fed
    as training feeds it (inputs in ``dtype``; output in the model's dtype, NaN passed on)."""
    out: torch.Tensor = model(
        hidden_states=x_t.to(dtype),
        encoder_hidden_states=text.to(dtype),
        encoder_attention_mask=mask,
        return_dict=False,
        **_conditioning(model, sigmas, dtype),
    )[0]
    return out


def _conditioning(model: nn.Module, sigmas: torch.Tensor, dtype: torch.dtype
                  ) -> dict[str, torch.Tensor]:
    """The timestep (and, for Sprint, the guidance) the family's pipeline passes."""
    config: Any = getattr(model, "config", None)
    if getattr(config, "guidance_embeds", False):
        guidance = torch.full_like(sigmas, SPRINT_GUIDANCE * config.guidance_embeds_scale)
        return {"timestep": sigmas.to(dtype), "guidance": guidance.to(dtype)}
    scale = float(getattr(config, "timestep_scale", 1.0))
    return {"timestep": (sigmas * (NUM_TRAIN_TIMESTEPS * scale)).to(dtype)}
