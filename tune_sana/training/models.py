"""Which Sana transformer a trial fine-tunes: presets, the demo base, or any diffusers checkpoint.

``model`` may be
- ``sana-tiny``: the tiny architecture, freshly initialised (seeded);
- ``demo-base``: the tiny model pretrained on part of the built-in data by ``tune-sana make-base``
  and saved with fp16 and bf16 weight variants, so the demo is a real fine-tune;
- a folder or hub id in diffusers format: a transformer folder (config.json + weights) or a
  pipeline folder/repo whose ``transformer/`` subfolder holds it (e.g.
  ``Efficient-Large-Model/Sana_1600M_1024px_BF16_diffusers``).
All but the fresh preset load through ``SanaTransformer2DModel.from_pretrained``.

Sana's families differ in a few config fields of that one class (``family_of`` names them), so
every family loads and trains through the same path:
- ``sana`` (Sana 1.0: 0.6B, 1.6B): no ``qk_norm``.
- ``sana-1.5`` (SANA1.5 1.6B, 4.8B): ``qk_norm: rms_norm_across_heads``, an RMSNorm over all
  heads on q and k of both attentions (NVlabs config ``qk_norm: true``, ``cross_norm: true``).
- ``sana-sprint`` (Sana Sprint 0.6B, 1.6B): the same ``qk_norm`` plus ``guidance_embeds: true``
  with ``guidance_embeds_scale: 0.1`` (NVlabs ``cfg_embed``, ``cfg_embed_scale``): its time
  embedding also embeds a guidance scale, so its forward needs ``guidance`` (training/flow.py).
Source: diffusers' scripts/convert_sana_to_diffusers.py, which sets exactly these fields for
SanaMS1.5_* and SanaSprint_*, and the Sprint 0.6B checkpoint's transformer/config.json.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
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

SANA, SANA_15, SPRINT = "sana", "sana-1.5", "sana-sprint"
FAMILY_FIELDS: dict[str, dict[str, Any]] = {
    SANA: {},
    SANA_15: {"qk_norm": "rms_norm_across_heads"},
    SPRINT: {"qk_norm": "rms_norm_across_heads", "guidance_embeds": True,
             "guidance_embeds_scale": 0.1},
}
FAMILIES: tuple[str, ...] = tuple(FAMILY_FIELDS)


def family_of(config: Mapping[str, Any]) -> str:
    """The family a SanaTransformer2DModel config belongs to: sana, sana-1.5 or sana-sprint."""
    if config.get("guidance_embeds"):
        return SPRINT
    return SANA_15 if config.get("qk_norm") else SANA


def tiny_config(family: str = SANA) -> dict[str, Any]:
    """The tiny architecture (TINY_CONFIG) with ``family``'s fields: same widths, so the demo
    data fits every family."""
    if family not in FAMILY_FIELDS:
        raise UserError(f"unknown Sana family '{family}'; known: {', '.join(FAMILIES)}")
    return {**TINY_CONFIG, **FAMILY_FIELDS[family]}


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


def read_config(model: str) -> dict[str, Any]:
    """The transformer's config without its weights: a preset's, a local folder's config.json,
    or a hub id's (diffusers fetches config.json alone, through its cache).

    UserError naming the model when it cannot be read (an unbuilt demo base, a missing or
    broken folder, a hub id that cannot be reached).
    """
    if model in PRESETS:
        return dict(PRESETS[model])
    path, subfolder = resolve_folder(model)
    local = Path(path) / (subfolder or "")
    if local.is_dir():
        try:
            loaded = json.loads((local / "config.json").read_text())
        except (OSError, ValueError) as err:
            raise UserError(f"model '{model}': {local / 'config.json'} is unreadable or not "
                            f"JSON ({type(err).__name__}); re-save the checkpoint") from None
        return dict(loaded)
    try:
        config = SanaTransformer2DModel.load_config(path, subfolder=subfolder)
    except (OSError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"model '{model}': cannot read its config ({first})") from None
    return dict(cast(Mapping[str, Any], config))
