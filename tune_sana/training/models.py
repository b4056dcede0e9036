"""Which Sana transformer a trial fine-tunes: presets, the demo base, or any diffusers checkpoint.

``model`` may be
- ``sana-tiny``: the tiny architecture, freshly initialised (seeded);
- ``demo-base``: the tiny model pretrained on part of the built-in data by ``tune-sana make-base``
  and saved with fp16 and bf16 weight variants, so the demo is a real fine-tune;
- a folder or hub id in diffusers format: a transformer folder (config.json + weights) or a
  pipeline folder/repo whose ``transformer/`` subfolder holds it (e.g.
  ``Efficient-Large-Model/Sana_1600M_1024px_BF16_diffusers``).
All but the fresh preset load through ``SanaTransformer2DModel.from_pretrained``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, cast

import torch
from diffusers import SanaTransformer2DModel
from torch import nn

from tune_sana.config import TINY, UserError
from tune_sana.data.checkpoints import (
    TRANSFORMER_WEIGHTS,
    has_weights,
    resolve_folder,
    weights_name,
)
from tune_sana.data.encoded import TEXT_DIM

TINY_CONFIG: dict[str, Any] = {
    "in_channels": 12,
    "out_channels": 12,
    "num_attention_heads": 2,
    "attention_head_dim": 16,
    "num_layers": 2,
    "num_cross_attention_heads": 2,
    "cross_attention_head_dim": 16,
    "cross_attention_dim": 32,
    "caption_channels": TEXT_DIM,
    "mlp_ratio": 2.5,
    "sample_size": 8,
    "patch_size": 1,
}
PRESETS: dict[str, dict[str, Any]] = {TINY: TINY_CONFIG}


def tiny_model(seed: int = 0, config: dict[str, Any] | None = None) -> nn.Module:
    """A freshly initialised tiny Sana transformer (the same weights for the same seed)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return cast(nn.Module, SanaTransformer2DModel(**(config or TINY_CONFIG)))


def load_transformer(
    model: str, *, variant: str | None, dtype: torch.dtype, seed: int = 0
) -> nn.Module:
    """Load the transformer in ``dtype``. ``variant`` picks fp16/bf16 weight files.

    A fresh preset ignores ``variant``. A local folder lacking the variant's weight file is a
    UserError naming the file, before diffusers' own (long) message.
    """
    if model in PRESETS:
        # nn.Module.to: diffusers' own .to warns on every dtype cast, even with no fp32-only modules
        return nn.Module.to(tiny_model(seed, PRESETS[model]), dtype)
    path, subfolder = resolve_folder(model)
    local = Path(path) / (subfolder or "")
    if local.is_dir() and not has_weights(local, variant):
        wanted = weights_name(TRANSFORMER_WEIGHTS, variant)
        raise UserError(f"model '{model}': no {wanted} in {local}; pick another variant or folder")
    kwargs: dict[str, Any] = {"torch_dtype": dtype, "variant": variant, "use_safetensors": True}
    if subfolder:
        kwargs["subfolder"] = subfolder
    try:
        loaded = SanaTransformer2DModel.from_pretrained(path, **kwargs)
    except OSError as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"model '{model}': cannot load ({first})") from None
    return cast(nn.Module, loaded)
