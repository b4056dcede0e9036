"""The optimizer a trial trains with: AdamW over the trainable parameters, set from the config."""

from __future__ import annotations

import torch

from tune_sana.config import TrialConfig


def adamw(params: list[torch.nn.Parameter], config: TrialConfig) -> torch.optim.AdamW:
    """AdamW at the peak lr (a scheduler scales it), with the config's decay, betas and eps.

    Its state has the parameters' dtype: fp32 under the amp modes, fp16/bf16 in pure fp16/bf16.
    """
    return torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay,
                             betas=(config.adam_beta1, config.adam_beta2), eps=config.adam_eps)
