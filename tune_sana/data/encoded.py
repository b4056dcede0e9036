"""Training data as the trial sees it: encoded latents and caption embeddings, already split.

Every trial reads encoded tensors (never images or raw captions): the expensive encodings are done
once per dataset. Two sources exist:

- ``builtin:shapes``: a captioned image set generated deterministically in code (no download):
  16x16 RGB pictures of a coloured shape whose caption fixes its colour, shape, size and position.
  Its "autoencoder" is a fixed space-to-depth (pixel_unshuffle by 2: 3x16x16 -> 12x8x8) and its
  "text encoder" is a fixed seeded token-embedding table (dim 32): a small deterministic stand-in
  for DC-AE and Gemma-2, documented as such. The caption really determines the image, so text
  conditioning matters to the loss.
- a folder written by :func:`save_encoded` (``tune-sana cache`` builds one from real images with the
  checkpoint's AutoencoderDC and Gemma-2): ``encoded.safetensors`` + ``meta.json``.

``builtin:shapes`` has two worlds, so that the demo fine-tune has something to learn:

- pretraining ("a small red circle at the top left"): square, circle, triangle or cross in one of
  8 colours on a dark background. The demo base is pretrained on it (``part="pretrain"``).
- fine-tune ("a small black ring at the top left on paper"): the same kinds of pictures drawn on
  paper, which the base has never seen: a light beige background, captions ending in the new
  words "on paper", a new shape (ring) and a new colour (black).

``load_data("builtin:shapes")`` (the fine-tune part) gives ``train``: FINETUNE_SIZE paper
pictures plus PRIOR_SIZE fresh pretraining-world pictures mixed in, as DreamBooth's prior
preservation does (without them every fine-tune forgets the dark world wholesale); ``val``: held-out
paper pictures (the metric); ``retain``: held-out pretraining-world pictures the base never trained
on (what a fine-tune must not forget). Every part is drawn from its own seed, so the parts are
disjoint and the base's pretraining set does not depend on the fine-tune's.
"""

from __future__ import annotations

import itertools
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from tune_sana.config import UserError

BUILTIN_PREFIX = "builtin:"
CACHE_FORMAT = 1


@dataclass(frozen=True)
class Encoded:
    """Paired tensors, row i of each belonging to sample i.

    latents: float32 (N, C, H, W); text: float32 (N, L, D); mask: int64 (N, L), 1 = real token.
    """

    latents: torch.Tensor
    text: torch.Tensor
    mask: torch.Tensor

    def __len__(self) -> int:
        return int(self.latents.shape[0])

    def take(self, index: torch.Tensor) -> Encoded:
        return Encoded(self.latents[index], self.text[index], self.mask[index])

    def to(self, device: torch.device) -> Encoded:
        return Encoded(self.latents.to(device), self.text.to(device), self.mask.to(device))


@dataclass(frozen=True)
class DataSplit:
    """The fine-tuning set, the fixed held-out validation set (fine-tune distribution) and,
    where the data has one, the retain set (held out from the pretraining distribution: what a
    fine-tune must not forget)."""

    train: Encoded
    val: Encoded
    meta: dict[str, Any]
    retain: Encoded | None = None


# --- the built-in shapes dataset -----------------------------------------------------------

COLORS: dict[str, tuple[float, float, float]] = {
    "red": (1.0, -1.0, -1.0),
    "green": (-1.0, 1.0, -1.0),
    "blue": (-1.0, -1.0, 1.0),
    "yellow": (1.0, 1.0, -1.0),
    "cyan": (-1.0, 1.0, 1.0),
    "magenta": (1.0, -1.0, 1.0),
    "white": (1.0, 1.0, 1.0),
    "orange": (1.0, 0.0, -1.0),
}
SHAPES = ("square", "circle", "triangle", "cross")
SIZES = {"small": 3.0, "large": 5.5}
POSITIONS = {
    "top left": (4.5, 4.5),
    "top right": (4.5, 10.5),
    "bottom left": (10.5, 4.5),
    "bottom right": (10.5, 10.5),
    "center": (7.5, 7.5),
}
# What only the fine-tune shows: the same kinds of pictures drawn on paper, with a new colour and
# a new shape. The pretraining background is DARK (plus faint noise).
PAPER: tuple[float, float, float] = (0.4, 0.3, 0.0)  # a light beige background
PAPER_WORDS = "on paper"
PAPER_COLORS: dict[str, tuple[float, float, float]] = {**COLORS, "black": (-1.0, -1.0, -1.0)}
PAPER_SHAPES = (*SHAPES, "ring")
DARK = -0.8  # the pretraining background level

IMAGE_SIZE = 16
TEXT_DIM = 32
TEXT_LEN = 10
# The parts of builtin:shapes. Pretraining-world draws (PRETRAIN_SEED): the base trains on the
# first PRETRAIN_SIZE, the next RETAIN_SIZE are held out (retain). Paper draws (FINETUNE_SEED):
# the first FINETUNE_SIZE go into the fine-tuning set, the next VAL_SIZE are held out (val, the
# metric). PRIOR_SIZE more pretraining-world draws (PRIOR_SEED) complete the fine-tuning set.
PRETRAIN_SIZE = 1024
RETAIN_SIZE = 64
FINETUNE_SIZE = 320
PRIOR_SIZE = 320
VAL_SIZE = 64
PRETRAIN_SEED = 1234
FINETUNE_SEED = 5678
PRIOR_SEED = 9012
WORLDS = ("pretrain", "finetune")

_VOCAB = sorted(
    {"a", "at", "the", *PAPER_WORDS.split(), *COLORS, *PAPER_COLORS, *PAPER_SHAPES, *SIZES}
    | {w for p in POSITIONS for w in p.split()}
)


def _shape_mask(shape: str, size: float, cy: float, cx: float) -> torch.Tensor:
    y, x = torch.meshgrid(
        torch.arange(IMAGE_SIZE, dtype=torch.float32),
        torch.arange(IMAGE_SIZE, dtype=torch.float32),
        indexing="ij",
    )
    dy, dx = y - cy, x - cx
    if shape == "square":
        return (dy.abs() <= size / 1.4) & (dx.abs() <= size / 1.4)
    if shape == "circle":
        return dy**2 + dx**2 <= size**2
    if shape == "ring":
        return (dy**2 + dx**2 <= size**2) & (dy**2 + dx**2 > (size - 1.6) ** 2)
    if shape == "triangle":
        return (dy <= size / 1.4) & (dy >= -size) & (dx.abs() <= (dy + size) / 2)
    return ((dy.abs() <= size / 3.5) & (dx.abs() <= size)) | (
        (dx.abs() <= size / 3.5) & (dy.abs() <= size)
    )


def shapes_images(n: int = PRETRAIN_SIZE + RETAIN_SIZE, seed: int = PRETRAIN_SEED,
                  world: str = "pretrain") -> tuple[torch.Tensor, list[str]]:
    """``n`` RGB images in [-1, 1] (n, 3, 16, 16) and their captions; the same for a given seed.

    ``world`` "pretrain": a shape on a dark background; "finetune": on paper (see the module).
    """
    if world not in WORLDS:
        raise ValueError(f"world must be one of {WORLDS}, not {world!r}")
    paper = world == "finetune"
    colors = PAPER_COLORS if paper else COLORS
    shapes = PAPER_SHAPES if paper else SHAPES
    gen = torch.Generator().manual_seed(seed)
    combos = list(itertools.product(SIZES, colors, shapes, POSITIONS))
    picks = torch.randint(len(combos), (n,), generator=gen)
    images = torch.empty(n, 3, IMAGE_SIZE, IMAGE_SIZE)
    captions = []
    for i, pick in enumerate(picks.tolist()):
        size, color, shape, position = combos[pick]
        cy, cx = POSITIONS[position]
        jitter = (torch.rand(2, generator=gen) - 0.5).tolist()
        mask = _shape_mask(shape, SIZES[size], cy + jitter[0], cx + jitter[1])
        level = torch.tensor(PAPER).view(3, 1, 1) if paper else torch.full((3, 1, 1), DARK)
        background = level + 0.1 * torch.randn(3, 1, 1, generator=gen)
        rgb = torch.tensor(colors[color]).view(3, 1, 1)
        images[i] = torch.where(mask, rgb, background).clamp(-1, 1)
        caption = f"a {size} {color} {shape} at the {position}"
        captions.append(f"{caption} {PAPER_WORDS}" if paper else caption)
    return images, captions


def demo_encode_images(images: torch.Tensor) -> torch.Tensor:
    """The demo's fixed "autoencoder": space-to-depth, (N, 3, 16, 16) -> (N, 12, 8, 8)."""
    return F.pixel_unshuffle(images, 2)


def demo_decode_images(latents: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`demo_encode_images` (depth-to-space), exact: (N, 12, 8, 8) ->
    (N, 3, 16, 16). Values pass through unchanged (NaN stays NaN)."""
    return F.pixel_shuffle(latents, 2)


def demo_encode_text(captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """The demo's fixed text encoder: a seeded embedding per word plus a position code.

    Returns (N, TEXT_LEN, 32) float32 embeddings and an (N, TEXT_LEN) int64 mask. Deterministic:
    the table is drawn from a fixed CPU generator, the same on every machine. Its vocabulary
    covers both worlds' captions.
    """
    gen = torch.Generator().manual_seed(4321)
    table = torch.randn(len(_VOCAB), TEXT_DIM, generator=gen)
    positions = 0.3 * torch.randn(TEXT_LEN, TEXT_DIM, generator=gen)
    index = {word: i for i, word in enumerate(_VOCAB)}
    text = torch.zeros(len(captions), TEXT_LEN, TEXT_DIM)
    mask = torch.zeros(len(captions), TEXT_LEN, dtype=torch.int64)
    for row, caption in enumerate(captions):
        words = caption.split()[:TEXT_LEN]
        for col, word in enumerate(words):
            text[row, col] = table[index[word]] + positions[col]
            mask[row, col] = 1
    return text, mask


def _encode(world: str, n: int, seed: int) -> Encoded:
    images, captions = shapes_images(n, seed, world)
    text, mask = demo_encode_text(captions)
    return Encoded(demo_encode_images(images), text, mask)


def _concat(a: Encoded, b: Encoded) -> Encoded:
    return Encoded(torch.cat([a.latents, b.latents]), torch.cat([a.text, b.text]),
                   torch.cat([a.mask, b.mask]))


def _builtin(name: str, part: str) -> DataSplit:
    if name != "shapes":
        raise UserError(
            f"unknown built-in dataset 'builtin:{name}'; the built-in one is builtin:shapes"
        )
    if part not in WORLDS:
        raise UserError(f"builtin:shapes has parts {', '.join(WORLDS)}; not '{part}'")
    pretrain = _encode("pretrain", PRETRAIN_SIZE + RETAIN_SIZE, PRETRAIN_SEED)
    retain = pretrain.take(torch.arange(PRETRAIN_SIZE, PRETRAIN_SIZE + RETAIN_SIZE))
    meta: dict[str, Any] = {"source": f"builtin:{name}", "part": part}
    if part == "pretrain":
        train = pretrain.take(torch.arange(PRETRAIN_SIZE))
        meta.update(train=len(train), val=len(retain), world="shapes on a dark background")
        return DataSplit(train, retain, meta, retain=retain)
    finetune = _encode("finetune", FINETUNE_SIZE + VAL_SIZE, FINETUNE_SEED)
    train = finetune.take(torch.arange(FINETUNE_SIZE))
    prior = _encode("pretrain", PRIOR_SIZE, PRIOR_SEED) if PRIOR_SIZE else train.take(
        torch.arange(0))
    train = _concat(train, prior)
    val = finetune.take(torch.arange(FINETUNE_SIZE, FINETUNE_SIZE + VAL_SIZE))
    meta.update(train=len(train), prior=len(prior), val=len(val), retain=len(retain),
                world=f"shapes {PAPER_WORDS}: new to the base are the light background, the "
                "words 'on paper', the ring and the colour black; prior = pretraining-world "
                "pictures mixed into train")
    return DataSplit(train, val, meta, retain=retain)


# --- encoded folders -------------------------------------------------------------------------

ENCODED_FILE = "encoded.safetensors"
META_FILE = "meta.json"


def save_encoded(path: str | os.PathLike[str], data: Encoded, is_val: torch.Tensor,
                 meta: dict[str, Any]) -> Path:
    """Write an encoded dataset folder atomically (a temp folder renamed into place).

    ``is_val`` is a bool (N,) tensor marking the held-out validation rows.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    save_file(
        {
            "latents": data.latents.float().contiguous(),
            "text": data.text.float().contiguous(),
            "mask": data.mask.to(torch.int64).contiguous(),
            "is_val": is_val.to(torch.bool).contiguous(),
        },
        str(tmp / ENCODED_FILE),
    )
    (tmp / META_FILE).write_text(json.dumps({"format": CACHE_FORMAT, **meta}, indent=2))
    if target.exists():
        raise UserError(f"{target} already exists; remove it or choose another folder")
    os.replace(tmp, target)
    return target


def load_encoded(path: str | os.PathLike[str]) -> DataSplit:
    """Read a folder written by :func:`save_encoded`; UserError naming the file if it is bad."""
    folder = Path(path)
    tensors_file, meta_file = folder / ENCODED_FILE, folder / META_FILE
    if not folder.is_dir():
        raise UserError(
            f"data '{path}': no such folder; use builtin:shapes or a folder made by tune-sana cache"
        )
    if not tensors_file.is_file() or not meta_file.is_file():
        raise UserError(
            f"data '{path}': not an encoded dataset (needs {ENCODED_FILE} and {META_FILE}); "
            "build one with: tune-sana cache <images dir> --model <checkpoint>"
        )
    try:
        meta = json.loads(meta_file.read_text())
        tensors = load_file(str(tensors_file))
        is_val = tensors["is_val"].bool()
        every = Encoded(tensors["latents"], tensors["text"], tensors["mask"])
    # SafetensorError (a torn or foreign file) derives from Exception only
    except (OSError, ValueError, KeyError, RuntimeError, SafetensorError) as err:
        raise UserError(
            f"data '{path}': corrupt encoded dataset ({type(err).__name__}: {err}); "
            "delete the folder and rebuild it with tune-sana cache"
        ) from None
    train_idx = torch.nonzero(~is_val).flatten()
    val_idx = torch.nonzero(is_val).flatten()
    if len(train_idx) == 0 or len(val_idx) == 0:
        raise UserError(f"data '{path}': needs both training and validation rows")
    return DataSplit(every.take(train_idx), every.take(val_idx), meta)


def load_data(spec: str, part: str = "finetune") -> DataSplit:
    """Resolve a ``data`` setting: ``builtin:shapes`` or an encoded folder."""
    if spec.startswith(BUILTIN_PREFIX):
        return _builtin(spec[len(BUILTIN_PREFIX):], part)
    return load_encoded(spec)
