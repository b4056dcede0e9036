"""A tiny Sana pipeline checkpoint built in code (no hub), saved in SanaPipeline's layout.

    model_index.json  transformer/  vae/  text_encoder/  tokenizer/  scheduler/

and loaded back through the same ``from_pretrained`` calls a real checkpoint takes. The pieces
fit together as in the real 0.6B model: the transformer's ``in_channels`` is the VAE's latent
channels and its ``caption_channels`` is Gemma-2's hidden size. The VAE has two stages (2x
downsampling), so 16 px images give 8 x 8 latents and the transformer's ``sample_size`` is 8.
The tokenizer is a character-level GemmaTokenizer (BOS added, as Gemma's is).

Each Sana family (sana, sana-1.5, sana-sprint: training/models.py) has its tiny transformer:
``save_tiny_transformer`` writes one, shaped for the demo data, as a transformer folder with
fp16/bf16 weight variants, loaded back by ``load_transformer`` like a real checkpoint.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch

LATENT_CHANNELS = 4
TEXT_DIM = 32
RESOLUTION = 16
LATENT_SIZE = 8
_CHARS = ("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
          ".,:;'\"-()!?/\n▁")


def tiny_tokenizer() -> Any:
    from transformers import GemmaTokenizer

    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3, "<mask>": 4}
    for char in _CHARS:
        vocab.setdefault(char, len(vocab))
    return GemmaTokenizer(vocab=vocab, merges=[], add_bos_token=True)


def tiny_text_encoder(vocab_size: int, hidden: int = TEXT_DIM, layers: int = 1,
                      heads: int = 2) -> Any:
    from transformers import Gemma2Config, Gemma2Model

    config = Gemma2Config(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=1,
        head_dim=hidden // heads, max_position_embeddings=4096, pad_token_id=0, eos_token_id=1,
        bos_token_id=2,
    )
    return Gemma2Model(config)


def tiny_vae() -> Any:
    from diffusers import AutoencoderDC

    return AutoencoderDC(
        in_channels=3, latent_channels=LATENT_CHANNELS, attention_head_dim=8,
        encoder_block_types=("ResBlock", "EfficientViTBlock"),
        decoder_block_types=("ResBlock", "EfficientViTBlock"),
        encoder_block_out_channels=(8, 16), decoder_block_out_channels=(8, 16),
        encoder_layers_per_block=(1, 1), decoder_layers_per_block=(1, 1),
        encoder_qkv_multiscales=((), (5,)), decoder_qkv_multiscales=((), (5,)),
        upsample_block_type="interpolate", downsample_block_type="Conv",
        decoder_norm_types="rms_norm", decoder_act_fns="silu", scaling_factor=0.41,
    )


def tiny_transformer(family: str = "sana") -> Any:
    from diffusers import SanaTransformer2DModel

    from tune_sana.training.models import FAMILY_FIELDS

    return SanaTransformer2DModel(
        in_channels=LATENT_CHANNELS, out_channels=LATENT_CHANNELS, num_attention_heads=2,
        attention_head_dim=16, num_layers=2, num_cross_attention_heads=2,
        cross_attention_head_dim=16, cross_attention_dim=32, caption_channels=TEXT_DIM,
        mlp_ratio=2.5, sample_size=LATENT_SIZE, patch_size=1, **FAMILY_FIELDS[family],
    )


def _save_variants(model: Any, folder: Path, variants: tuple[str, ...]) -> None:
    """Each variant's weights rounded once from the fp32 ones, as diffusers' variant files."""
    for variant in variants:
        dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[variant]
        copy.deepcopy(model).to(dtype).save_pretrained(folder, variant=variant)


def build_tiny_pipeline(folder: Path, seed: int = 0,
                        variants: tuple[str, ...] = ("fp16", "bf16"),
                        family: str = "sana") -> Path:
    """Save a seeded tiny Sana pipeline to ``folder``; the transformer also as ``variants``."""
    from diffusers import DPMSolverMultistepScheduler, SanaPipeline

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        tokenizer = tiny_tokenizer()
        pipe: Any = SanaPipeline(
            tokenizer=tokenizer, text_encoder=tiny_text_encoder(len(tokenizer)),
            vae=tiny_vae(), transformer=tiny_transformer(family),
            scheduler=DPMSolverMultistepScheduler(),
        )
    pipe.save_pretrained(folder)
    _save_variants(pipe.transformer, folder / "transformer", variants)
    return folder


def save_tiny_transformer(folder: Path, family: str = "sana", seed: int = 0,
                          variants: tuple[str, ...] = ("fp16", "bf16")) -> Path:
    """A seeded tiny transformer of ``family`` (models.tiny_config: the ``sana-tiny`` widths,
    so builtin:shapes and ``random_encoded`` data fit it) saved with ``save_pretrained`` to
    ``folder`` (config.json + fp32 safetensors), plus each weight variant."""
    from tune_sana.training.models import tiny_config, tiny_model

    model: Any = tiny_model(seed, tiny_config(family))
    model.save_pretrained(folder)
    _save_variants(model, folder, variants)
    return folder


def write_images(folder: Path, n: int, size: int = RESOLUTION, ext: str = ".png") -> list[str]:
    """``n`` images whose pixels encode their index i, each with the caption ``item i``.

    Returns the captions in index order. Image i is a ramp whose colour and slope depend on i, so
    any two images (and their latents) differ.
    """
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    ramp = np.linspace(0.0, 1.0, size, dtype=np.float32)
    captions = []
    for i in range(n):
        phase = (i + 1) / (n + 1)
        red = np.outer(np.ones(size), ramp) * phase
        green = np.outer(ramp, np.ones(size)) * (1 - phase)
        blue = np.full((size, size), (i * 37 % 97) / 97, dtype=np.float32)
        pixels = (np.stack([red, green, blue], axis=-1) * 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"img{i:03d}{ext}")
        caption = f"item {i}"
        (folder / f"img{i:03d}.txt").write_text(caption)
        captions.append(caption)
    return captions


def random_encoded(folder: Path, n: int = 24, n_val: int = 8, seed: int = 0) -> str:
    """A random encoded dataset shaped for the ``sana-tiny`` preset (12 x 8 x 8 latents, 8 x 32
    text), written by save_encoded: instant, where builtin:shapes takes seconds to draw."""
    from tune_sana.data.encoded import TEXT_DIM as DEMO_TEXT_DIM
    from tune_sana.data.encoded import TEXT_LEN, Encoded, save_encoded

    gen = torch.Generator().manual_seed(seed)
    encoded = Encoded(torch.randn(n, 12, 8, 8, generator=gen),
                      torch.randn(n, TEXT_LEN, DEMO_TEXT_DIM, generator=gen),
                      torch.ones(n, TEXT_LEN, dtype=torch.int64))
    return str(save_encoded(folder, encoded, torch.arange(n) >= n - n_val, {"source": "random"}))
