"""Sana's linear self-attention with its matmuls forced to fp32 (the ``attention_fp32`` switch).

diffusers' SanaLinearAttnProcessor2_0 casts q, k, v to float32, but under torch.autocast
``torch.matmul`` is on the fp16 cast list, so the two attention matmuls still run in fp16: the
``+ 1e-15`` guard of the denominator rounds to 0 (0/0 = NaN) and large scores overflow 65504.
This processor does the same math with autocast disabled around it, as Sana's own LiteLA does
with ``fp32_attention``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tune_sana.training.precision import no_autocast


class FP32LinearAttnProcessor:
    """ReLU linear attention: out_i = sum_j v_j (k_j . q_i) / sum_j (k_j . q_i), in fp32."""

    def __call__(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        original_dtype = hidden_states.dtype
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states

        query = attn.to_q(hidden_states)
        key = attn.to_k(context)
        value = attn.to_v(context)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        # (B, N, H*D) -> (B, H, D, N); key -> (B, H, N, D)
        query = query.transpose(1, 2).unflatten(1, (attn.heads, -1))
        key = key.transpose(1, 2).unflatten(1, (attn.heads, -1)).transpose(2, 3)
        value = value.transpose(1, 2).unflatten(1, (attn.heads, -1))

        with no_autocast(hidden_states.device.type):
            query = F.relu(query).float()
            key = F.relu(key).float()
            # A row of ones appended to V makes the last output row the denominator sum_j k_j.q_i.
            value = F.pad(value.float(), (0, 0, 0, 1), mode="constant", value=1.0)
            scores = torch.matmul(value, key)
            out = torch.matmul(scores, query)
            out = out[:, :, :-1] / (out[:, :, -1:] + 1e-15)

        out = out.flatten(1, 2).transpose(1, 2).to(original_dtype)
        out = attn.to_out[0](out)
        out = attn.to_out[1](out)
        if original_dtype == torch.float16:
            out = out.clip(-65504, 65504)
        result: torch.Tensor = out
        return result


def use_fp32_linear_attention(model: nn.Module) -> int:
    """Give every linear self-attention (``attn1``) the fp32 processor; returns how many."""
    swapped = 0
    for name, module in model.named_modules():
        if name.endswith(".attn1") and hasattr(module, "set_processor"):
            module.set_processor(FP32LinearAttnProcessor())
            swapped += 1
    return swapped
