"""Which weights a trial trains (``finetune: full | lora``), and saving what it trained.

``lora`` freezes the transformer and wraps the modules named by ``lora_targets`` (default
``to_q,to_k,to_v``, as diffusers' train_dreambooth_lora_sana.py) with a peft LoRA adapter of rank
``lora_rank``: W x + (alpha / r) B A x, B initialised to 0 so step 0 is the base model.

Dtypes: the frozen base keeps the precision policy's weight dtype. The LoRA parameters take it
too, except fp16: they are fp32 when the weights are fp16 (as diffusers' ``cast_training_params``
does), because AdamW state in fp16 underflows (reference/sana.md). So under ``precision: fp16``
a LoRA trial trains fp32 adapters on an fp16 base; ``bf16`` trains bf16 adapters.

A trained adapter is saved in the format diffusers reads (``pytorch_lora_weights.safetensors``,
keys prefixed ``transformer.``, rank and alpha in its metadata): load it with
``SanaPipeline.load_lora_weights(folder)`` or
``SanaTransformer2DModel.load_lora_adapter(folder, prefix="transformer", use_safetensors=True)``.
A full fine-tune is saved with ``save_pretrained`` (config.json + safetensors).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tune_sana.config import Finetune, TrialConfig, UserError

ADAPTER_NAME = "default"
LORA_WEIGHTS = "pytorch_lora_weights.safetensors"


def lora_dtype(weight_dtype: torch.dtype) -> torch.dtype:
    """The dtype LoRA parameters train in: fp32 over an fp16 base, else the base's dtype."""
    return torch.float32 if weight_dtype == torch.float16 else weight_dtype


def apply_finetune(model: nn.Module, config: TrialConfig, weight_dtype: torch.dtype) -> nn.Module:
    """Make ``model`` train what ``config.finetune`` says; returns the same module.

    full: unchanged (every parameter trains). lora: base frozen, a LoRA adapter added on
    ``config.lora_targets``; a target list that matches no module is a UserError naming it.
    """
    if Finetune(config.finetune) is Finetune.FULL:
        return model
    from peft import LoraConfig

    targets = config.lora_targets.split(",")
    alpha: Any = config.lora_alpha if config.lora_alpha is not None else config.lora_rank
    lora = LoraConfig(
        r=config.lora_rank,
        lora_alpha=alpha,  # peft annotates int; it computes scale = alpha / r in float
        target_modules=targets,
        init_lora_weights=True,  # A kaiming-uniform, B = 0: the adapter starts as a no-op
    )
    model.requires_grad_(False)
    adapted: Any = model  # a diffusers ModelMixin with PeftAdapterMixin
    try:
        adapted.add_adapter(lora, adapter_name=ADAPTER_NAME)
    except ValueError as err:
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise UserError(f"lora_targets '{config.lora_targets}': {first}; Sana's attention "
                        "modules are to_q, to_k, to_v, to_out.0") from None
    dtype = lora_dtype(weight_dtype)
    for param in lora_parameters(model):
        param.data = param.data.to(dtype)
    return model


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The adapter's parameters (empty for a model without one)."""
    return [p for name, p in model.named_parameters() if ".lora_" in name]


def save_trained(model: nn.Module, config: TrialConfig, folder: str | os.PathLike[str]) -> Path:
    """Save what the trial trained into ``folder`` (created): the adapter or the transformer.

    full: ``save_pretrained`` in the weights' own dtype (fp32 for fp32 and the amp modes).
    lora: the adapter only, in diffusers' LoRA format, with rank and alpha in its metadata.
    """
    target = Path(folder)
    target.mkdir(parents=True, exist_ok=True)
    saver: Any = model
    if Finetune(config.finetune) is Finetune.FULL:
        saver.save_pretrained(target)
        return target
    from diffusers import SanaPipeline
    from peft.utils import get_peft_model_state_dict

    state = get_peft_model_state_dict(model, adapter_name=ADAPTER_NAME)
    metadata = saver.peft_config[ADAPTER_NAME].to_dict()
    SanaPipeline.save_lora_weights(target, transformer_lora_layers=state,
                                   transformer_lora_adapter_metadata=metadata)
    return target


def load_lora(model: nn.Module, folder: str | os.PathLike[str],
              adapter_name: str = ADAPTER_NAME) -> nn.Module:
    """Load an adapter saved by :func:`save_trained` into a transformer (diffusers' loader)."""
    loader: Any = model
    loader.load_lora_adapter(str(folder), prefix="transformer", adapter_name=adapter_name,
                             use_safetensors=True)
    return model
