"""What a trial learned, as pictures: a fixed grid of samples, decoded by the data's decoder.

Sampling inverts the training path of flow.py. Training mixes x_s = (1 - s) x0 + s eps and
teaches the model the velocity v = eps - x0 = dx_s/ds, so the sampler starts from pure noise at
s = 1 and takes Euler steps towards s = 0: x_{s'} = x_s + (s' - s) v(x_s, s), with s' < s. The
noise levels are ``steps`` equal steps from 1 to 0, moved by ``flow_shift`` as training moves
its levels (s' = shift s / (1 + (shift - 1) s)); the transformer gets each level as training
gives it (flow.velocity: s x 1000 for Sana, s for Sprint). A model that predicts the exact
velocity of a straight path lands exactly on its x0 (tests/test_samples.py).

The grid is fixed so that trials compare: the first GRID_PROMPTS validation rows' caption
embeddings (the same for every trial of a dataset), noise drawn from a generator seeded with
NOISE_SEED (never the trial's seed), and the trial's precision policy. Decoders: the demo's
space-to-depth is inverted exactly (data.encoded.demo_decode_images); a cache built by
``tune-sana cache`` is decoded by its checkpoint's AutoencoderDC (latents / scaling_factor, as
the cache multiplied them); data with no known decoder gets no grid.
"""

from __future__ import annotations

import base64
import contextlib
import io
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

import torch
from torch import nn

from tune_sana.config import UserError
from tune_sana.data.encoded import BUILTIN_PREFIX, Encoded, demo_decode_images
from tune_sana.training.flow import velocity

GRID_PROMPTS = 4  # one sample per prompt, in one row
NOISE_SEED = 20240  # the grid's noise: the same for every trial
TILE_MIN = 64  # small images (the demo's 16 px) are enlarged to at least this many pixels
TILE_MAX = 256  # large ones (real data) are shrunk to at most this, to keep the PNG small
GAP = 2  # pixels between tiles

Decoder = Callable[[torch.Tensor], torch.Tensor]


def shifted_levels(steps: int, shift: float) -> torch.Tensor:
    """``steps + 1`` noise levels from 1 down to 0 (float32), equally spaced, then shifted as
    training shifts its levels: s' = shift s / (1 + (shift - 1) s)."""
    s = torch.linspace(1.0, 0.0, steps + 1)
    return shift * s / (1 + (shift - 1) * s)


@torch.no_grad()
def euler_sample(model: nn.Module, noise: torch.Tensor, text: torch.Tensor, mask: torch.Tensor,
                 steps: int, shift: float, dtype: torch.dtype) -> torch.Tensor:
    """Integrate dx/ds = v from s = 1 (``noise``) to s = 0 in ``steps`` Euler steps; returns
    the clean latents (float32, on noise's device). The state is kept in fp32 between steps
    and fed in ``dtype`` (the caller's autocast, if any, applies); a non-finite prediction
    makes the result non-finite (not hidden)."""
    if steps < 1:
        raise ValueError(f"steps must be at least 1, not {steps}")
    levels = shifted_levels(steps, shift).to(noise.device)
    x = noise.float()
    for s, s_next in zip(levels[:-1], levels[1:], strict=True):
        sigmas = s.expand(len(x))
        v = velocity(model, x, sigmas, text, mask, dtype)
        x = x + (s_next - s) * v.float()  # s_next < s: a step towards the data
    return x


def grid_noise(shape: torch.Size | tuple[int, ...]) -> torch.Tensor:
    """The grid's fixed noise (float32, CPU): drawn from NOISE_SEED, whatever the trial's."""
    return torch.randn(shape, generator=torch.Generator().manual_seed(NOISE_SEED))


def prompts(val: Encoded) -> Encoded:
    """The grid's prompts: the first GRID_PROMPTS validation rows (their latents unused)."""
    return val.take(torch.arange(min(GRID_PROMPTS, len(val))))


def decoder_for(meta: dict[str, Any], device: torch.device) -> Decoder | None:
    """The data's decoder, latents -> RGB in about [-1, 1]: the demo's depth-to-space for
    ``builtin:`` data, the checkpoint's AutoencoderDC for a ``tune-sana cache`` folder (its
    meta.json names the model and variant), None for data that names no decoder. UserError
    when the named VAE cannot be loaded."""
    if str(meta.get("source", "")).startswith(BUILTIN_PREFIX):
        return demo_decode_images
    model = meta.get("model")
    if not model:
        return None
    from tune_sana.data.cache import load_vae  # diffusers: only for real data

    vae = load_vae(str(model), meta.get("variant"), device)
    scale = float(vae.config.scaling_factor)

    def decode(latents: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            out: torch.Tensor = vae.decode(latents.float() / scale).sample
        return out
    return decode


def grid_png(images: torch.Tensor) -> bytes:
    """(N, 3, H, W) images in [-1, 1] as one PNG row of tiles on a grey ground, each tile
    resized (nearest: the demo's pixels stay sharp) to between TILE_MIN and TILE_MAX pixels.
    Non-finite pixels are drawn black."""
    from PIL import Image

    pixels = images.detach().float().cpu().nan_to_num(nan=-1.0, posinf=1.0, neginf=-1.0)
    pixels = ((pixels.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    n, _, h, w = pixels.shape
    side = max(h, w)
    scale = TILE_MIN / side if side < TILE_MIN else min(1.0, TILE_MAX / side)
    tw, th = max(1, round(w * scale)), max(1, round(h * scale))
    sheet = Image.new("RGB", (n * tw + (n + 1) * GAP, th + 2 * GAP), (128, 128, 128))
    for i in range(n):
        tile = Image.fromarray(pixels[i].permute(1, 2, 0).contiguous().numpy(), "RGB")
        tile = tile.resize((tw, th), Image.Resampling.NEAREST if scale >= 1
                           else Image.Resampling.BILINEAR)
        sheet.paste(tile, (GAP + i * (tw + GAP), GAP))
    buf = io.BytesIO()
    sheet.save(buf, format="PNG")
    return buf.getvalue()


class SampleGrid:
    """The fixed grid of one dataset, ready to draw from any model: ``grid(model, ...)``
    returns the PNG as base64 text (what a report row carries), or None when the data has no
    decoder or ``steps`` is 0. The decoder is loaded at the first draw."""

    def __init__(self, val: Encoded, meta: dict[str, Any], steps: int, shift: float,
                 device: torch.device) -> None:
        self.steps, self.shift, self.device, self.meta = steps, shift, device, meta
        chosen = prompts(val)
        self.text, self.mask = chosen.text.to(device), chosen.mask.to(device)
        self.noise = grid_noise(tuple(chosen.latents.shape)).to(device)
        self._decoder: Decoder | None = None
        self._looked = False

    def decoder(self) -> Decoder | None:
        if not self._looked:
            self._looked = True
            try:
                self._decoder = decoder_for(self.meta, self.device)
            except UserError as err:  # the trial's result stands; only its pictures are lost
                print(f"tune-sana: no sample grid: {err}", flush=True)
        return self._decoder

    def grid(self, model: nn.Module, dtype: torch.dtype,
             autocast: AbstractContextManager[Any] | None = None) -> str | None:
        if self.steps == 0 or len(self.noise) == 0:
            return None
        decode = self.decoder()
        if decode is None:
            return None
        was_training = model.training
        model.eval()
        try:
            with autocast or contextlib.nullcontext():
                latents = euler_sample(model, self.noise, self.text, self.mask, self.steps,
                                       self.shift, dtype)
            images = decode(latents)
        finally:
            model.train(was_training)
        return base64.b64encode(grid_png(images)).decode("ascii")
