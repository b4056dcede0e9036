"""A tiny Sana checkpoint that depends on fp16's attention clip, as Sana's FP16 release does.

diffusers' SanaLinearAttnProcessor2_0 clips the self-attention output to +-65504 when it runs in
fp16; the FP16 Sana checkpoints produce outputs far beyond that and rely on the clip (diffusers
#10336): run in fp32 or bf16 they give other outputs, without any NaN. This builds the same
dependence into a tiny Sana (e.g. the demo base: a trained model, whose loss shows the damage),
in block 0's self-attention (``attn1``), on one channel ``k``:

- ``to_v`` scaled by ``s`` and the other rows of ``to_out[0]`` by ``1 / s``: the other channels'
  outputs are unchanged;
- row ``k`` of ``to_out[0]`` set to ``ROW`` everywhere: its output, ``ROW x sum_j x_j``, is of
  order 1e8, beyond fp16's range, so fp16 clips it to +-65504;
- that channel's gate (block 0's ``scale_shift_table`` gate entry, with the shared timestep
  projection's row zeroed) set to ``GATE``, so the clipped value adds about +-0.01 to the
  residual stream, while the unclipped one adds tens: the model works in fp16 only.

Every weight stays inside fp16's range, so the fp16 variant holds no inf, and every precision
stays finite. Saved with ``save_pretrained`` (fp32 weights plus an ``fp16`` variant, rounded
once from fp32), loaded back through ``from_pretrained`` as any checkpoint folder.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch

CHANNEL = 5  # k: the channel that carries the dependence
SCALE = 1000.0  # s: to_v's scale (x ~ 1e3, well inside fp16)
ROW = 60000.0  # to_out[0] row k (fp16 holds it exactly; max 65504)
GATE = 1.2e-7  # the gate of channel k (an fp16 subnormal: 2 steps of 5.96e-8)


@torch.no_grad()
def make_clamp_dependent(model: Any, channel: int = CHANNEL) -> Any:
    """Rewrite ``model`` (a SanaTransformer2DModel, in place) as the module docstring says."""
    width = model.config.num_attention_heads * model.config.attention_head_dim
    attn = model.transformer_blocks[0].attn1
    attn.to_v.weight.mul_(SCALE)
    out = attn.to_out[0]
    out.weight.div_(SCALE)
    out.weight[channel].fill_(ROW)
    out.bias[channel] = 0.0
    # gate_msa of block b = scale_shift_table_b[2] + time_embed.linear(t)[2 * width:3 * width]
    model.time_embed.linear.weight[2 * width + channel].zero_()
    model.time_embed.linear.bias[2 * width + channel] = 0.0
    model.transformer_blocks[0].scale_shift_table[2, channel] = GATE
    return model


def build_clamp_checkpoint(folder: Path, source: Path) -> Path:
    """Load the tiny Sana checkpoint ``source`` (fp32), make it clamp-dependent and save it to
    ``folder``: fp32 weights plus an ``fp16`` variant. Returns the folder."""
    from diffusers import SanaTransformer2DModel

    loaded: Any = SanaTransformer2DModel.from_pretrained(source, torch_dtype=torch.float32)
    model = make_clamp_dependent(loaded)
    model.save_pretrained(folder)
    copy.deepcopy(model).to(torch.float16).save_pretrained(folder, variant="fp16")
    return folder
