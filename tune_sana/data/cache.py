"""The encoding cache: a captioned image set -> DC-AE latents + Gemma-2 caption embeddings, once.

    tune-sana cache <images dir | manifest> --model <Sana pipeline folder or hub id>

Images are encoded by the checkpoint's AutoencoderDC in fp32 at ``resolution`` (default: the
transformer's ``sample_size`` times the VAE's downsampling), ``latent * scaling_factor`` as
diffusers' Sana trainer does. Captions are encoded by its Gemma-2 in bf16 through diffusers' own
``SanaPipeline.encode_prompt`` (no classifier-free-guidance half): lower-cased, the complex human
instruction prepended (the pipeline's default list; ``complex_human_instruction=False`` turns it
off), ``max_sequence_length`` 300, then the BOS position plus the last 299 positions kept
(``select_index``) with their attention mask. With ``trim_text`` (default) the trailing positions
that are padding in every row are dropped: cross-attention gives masked keys zero weight, so the
loss is unchanged and the cache is ~10x smaller.

The result is a folder in :func:`tune_sana.data.save_encoded`'s format (what a trial reads via
``data: <folder>``) under ``<cache root>/<name>-<resolution>px-<key>``, keyed by the dataset's
content hash, the checkpoint, the resolution and every option that changes the tensors: a second
call with the same inputs finds it and loads no encoder. A fixed held-out validation split is
chosen by hashing each sample's name and caption, so it does not depend on listing order.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import re
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from tune_sana.config import DEMO_BASE, PRESETS, UserError, did_you_mean, home
from tune_sana.data.checkpoints import has_weights, is_local
from tune_sana.data.encoded import BUILTIN_PREFIX, ENCODED_FILE, META_FILE, Encoded, save_encoded
from tune_sana.data.images import Sample, Scan, SizePolicy, check_images, load_image, scan
from tune_sana.device import pick_device

CACHE_VERSION = 1
COMPONENTS = ("vae", "text_encoder", "tokenizer")
# Encoder loads in this process, by component: a cache hit adds none (the tests read this).
LOADS: Counter[str] = Counter()


class CacheOptions(BaseModel):
    """How a dataset is encoded. Fields marked (keyed) are part of the cache key."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    resolution: int | None = Field(
        None, ge=8, description="square image side in pixels (keyed); null = from the checkpoint")
    size_policy: SizePolicy = Field(SizePolicy.CROP, description="crop | stretch | exact (keyed)")
    allow_upscale: bool = Field(False, description="accept images smaller than the resolution")
    max_sequence_length: int = Field(300, ge=2, description="caption tokens kept (keyed)")
    complex_human_instruction: bool = Field(
        True, description="prepend SanaPipeline's default instruction, as Sana trains (keyed)")
    text_dtype: Literal["bf16", "fp32"] = Field("bf16", description="Gemma-2 dtype (keyed)")
    trim_text: bool = Field(True, description="drop positions padded in every row (keyed)")
    val_fraction: float = Field(0.1, gt=0, lt=1, description="held-out share (keyed)")
    val_max: int = Field(32, ge=1, description="at most this many held-out samples (keyed)")
    variant: str | None = Field(
        None, description="encoder weight variant; null = default weights, else bf16, else fp16")
    skip_bad: bool = Field(False, description="leave bad files out (listed in meta.json)")
    batch_size: int = Field(4, ge=1, description="images / captions per encoder call")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    cache_root: str | None = Field(None, description="default: $TUNE_SANA_HOME/cache")

    KEYED: ClassVar[tuple[str, ...]] = ("size_policy", "allow_upscale", "max_sequence_length",
                              "complex_human_instruction", "text_dtype", "trim_text",
                              "val_fraction", "val_max")


def cache_options(**values: Any) -> CacheOptions:
    """Validate keyword options; UserError naming an unknown or bad key."""
    for key in values:
        if key not in CacheOptions.model_fields:
            raise UserError(f"cache option '{key}' is unknown"
                            f"{did_you_mean(key, CacheOptions.model_fields)}; valid: "
                            f"{', '.join(CacheOptions.model_fields)}")
    try:
        return CacheOptions(**values)
    except ValidationError as err:
        first = err.errors()[0]
        key = ".".join(str(p) for p in first["loc"])
        raise UserError(f"cache option '{key}' = {values.get(key)!r}: {first['msg']}") from None


# --- what to load ------------------------------------------------------------------------------

def encoder_source(model: str) -> str:
    """The pipeline folder (absolute) or hub id holding vae/, text_encoder/ and tokenizer/."""
    if model in PRESETS or model == DEMO_BASE:
        raise UserError(f"model '{model}' has no image or text encoder; encoding images needs a "
                        "Sana pipeline checkpoint (vae/, text_encoder/, tokenizer/): pass "
                        "--model <folder or hub id>, or use data: builtin:shapes")
    if not is_local(model):
        return model
    path = Path(model).expanduser().resolve()
    missing = [c for c in COMPONENTS if not (path / c).is_dir()]
    if missing:
        raise UserError(f"model '{model}': no {', '.join(m + '/' for m in missing)} in it; "
                        "encoding needs a Sana pipeline folder (SanaPipeline.save_pretrained "
                        "layout), not a transformer-only folder")
    return str(path)


def pick_variant(source: str, wanted: str | None) -> str | None:
    """The weight variant to load the encoders with: ``wanted`` (for a local folder, a
    UserError before anything is encoded where the VAE or Gemma-2 lack it), or for a local
    folder the default files, else bf16, else fp16 (whichever both have)."""
    if not is_local(source):
        return wanted
    root = Path(source)
    if wanted is not None:
        if not (has_weights(root / "vae", wanted)
                and has_weights(root / "text_encoder", wanted, stem="model")):
            raise UserError(f"model '{source}': no variant '{wanted}' weights in vae/ and "
                            "text_encoder/; pass a variant the folder has (or none)")
        return wanted
    for variant in (None, "bf16", "fp16"):
        if (has_weights(root / "vae", variant)
                and has_weights(root / "text_encoder", variant, stem="model")):
            return variant
    raise UserError(f"model '{source}': no safetensors weights in vae/ and text_encoder/ "
                    "(looked for the default, bf16 and fp16 variants)")


def fingerprint(source: str, variant: str | None) -> str:
    """Identity of the encoders: for a folder, its configs and weight-file sizes (not GBs of
    hashing); for a hub id, the id."""
    digest = hashlib.sha256(json.dumps([source, variant]).encode())
    if is_local(source):
        for component in COMPONENTS:
            for file in sorted((Path(source) / component).glob("*")):
                if not file.is_file():
                    continue
                digest.update(f"{component}/{file.name}:{file.stat().st_size}".encode())
                if file.suffix == ".json" and file.stat().st_size < 1 << 20:
                    digest.update(file.read_bytes())
    return digest.hexdigest()


def default_resolution(source: str) -> int:
    """transformer ``sample_size`` x the VAE's downsampling (2 ** (blocks - 1)), e.g. 32 x 32."""
    from diffusers import AutoencoderDC, SanaTransformer2DModel

    try:
        vae: Any = AutoencoderDC.load_config(source, subfolder="vae")
        transformer: Any = SanaTransformer2DModel.load_config(source, subfolder="transformer")
    except (OSError, ValueError) as err:
        raise UserError(f"model '{source}': cannot read vae/ and transformer/ configs to pick "
                        f"the resolution ({type(err).__name__}); pass --resolution") from None
    factor: int = 2 ** (len(vae["encoder_block_out_channels"]) - 1)
    return int(transformer["sample_size"]) * factor


def complex_human_instruction() -> list[str]:
    """SanaPipeline's default instruction list (read from diffusers, so it stays in step)."""
    from diffusers import SanaPipeline

    default = inspect.signature(SanaPipeline.__call__).parameters["complex_human_instruction"]
    return list(default.default)


# --- keys and splits -------------------------------------------------------------------------

def cache_key(content_hash: str, encoders: str, resolution: int, opts: CacheOptions) -> str:
    """sha256 of everything that changes the cached tensors."""
    keyed = {k: getattr(opts, k) for k in CacheOptions.KEYED}
    keyed["size_policy"] = opts.size_policy.value
    if opts.complex_human_instruction:
        keyed["chi_sha256"] = hashlib.sha256("\n".join(complex_human_instruction()).encode()
                                             ).hexdigest()
    blob = json.dumps({"version": CACHE_VERSION, "data": content_hash, "encoders": encoders,
                       "resolution": resolution, "options": keyed}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def val_split(samples: tuple[Sample, ...], fraction: float, most: int) -> torch.Tensor:
    """Bool (N,) mask of held-out rows: the ``clamp(round(fraction N), 1, most)`` samples with the
    smallest sha256(name, caption): fixed for a dataset, independent of listing order."""
    n = len(samples)
    if n < 2:
        raise UserError(f"{n} usable sample(s): a cache needs at least 2 (training + validation)")
    n_val = min(max(1, round(fraction * n)), most, n - 1)
    ranks = sorted(range(n), key=lambda i: hashlib.sha256(
        json.dumps([samples[i].name, samples[i].caption]).encode()).hexdigest())
    is_val = torch.zeros(n, dtype=torch.bool)
    is_val[ranks[:n_val]] = True
    return is_val


def cache_root(opts: CacheOptions) -> Path:
    return Path(opts.cache_root).expanduser() if opts.cache_root else home() / "cache"


def _complete(folder: Path) -> bool:
    return (folder / ENCODED_FILE).is_file() and (folder / META_FILE).is_file()


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-.")[:40] or "data"


# --- the encoders ----------------------------------------------------------------------------

def _dtype_kwarg(dtype: torch.dtype) -> dict[str, torch.dtype]:
    import transformers

    major = int(transformers.__version__.split(".")[0])
    return {"dtype": dtype} if major >= 5 else {"torch_dtype": dtype}


def load_text_encoder(source: str, variant: str | None, dtype: torch.dtype,
                      device: torch.device) -> Any:
    """A text-only SanaPipeline (tokenizer + Gemma-2) whose ``encode_prompt`` we call."""
    from diffusers import SanaPipeline
    from transformers import AutoModel, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(source, subfolder="tokenizer")
        text_encoder = AutoModel.from_pretrained(source, subfolder="text_encoder",
                                                 variant=variant, **_dtype_kwarg(dtype))
    except (OSError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"model '{source}': cannot load the tokenizer / text encoder "
                        f"({first})") from None
    LOADS["text_encoder"] += 1
    text_encoder.to(device).eval()
    return SanaPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=None,
                        transformer=None, scheduler=None)


def load_vae(source: str, variant: str | None, device: torch.device) -> Any:
    """The checkpoint's AutoencoderDC in fp32."""
    from diffusers import AutoencoderDC

    try:
        vae = AutoencoderDC.from_pretrained(source, subfolder="vae", variant=variant,
                                            torch_dtype=torch.float32)
    except (OSError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"model '{source}': cannot load the VAE ({first})") from None
    LOADS["vae"] += 1
    return vae.to(device).eval()


@torch.inference_mode()
def encode_captions(pipe: Any, captions: list[str], opts: CacheOptions,
                    device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, L, D) float32 embeddings and (N, L) int64 mask, exactly SanaPipeline.encode_prompt's
    (L = max_sequence_length), computed in the text encoder's dtype and then widened."""
    chi = complex_human_instruction() if opts.complex_human_instruction else None
    texts, masks = [], []
    for start in range(0, len(captions), opts.batch_size):
        embeds, mask, _, _ = pipe.encode_prompt(
            captions[start:start + opts.batch_size], do_classifier_free_guidance=False,
            device=device, max_sequence_length=opts.max_sequence_length,
            complex_human_instruction=chi)
        texts.append(embeds.float().cpu())
        masks.append(mask.to(torch.int64).cpu())
    return torch.cat(texts), torch.cat(masks)


def trim_padding(text: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Drop trailing positions masked out in every row (keys with zero attention weight)."""
    used = torch.nonzero(mask.any(dim=0)).flatten()
    length = int(used.max()) + 1 if len(used) else 1
    return text[:, :length].contiguous(), mask[:, :length].contiguous()


@torch.inference_mode()
def encode_images(vae: Any, samples: tuple[Sample, ...], resolution: int, policy: SizePolicy,
                  batch_size: int, device: torch.device) -> torch.Tensor:
    """(N, C, H, W) float32 latents: ``vae.encode(x).latent * scaling_factor``, x in [-1, 1]."""
    scale = float(vae.config.scaling_factor)
    out = []
    for start in range(0, len(samples), batch_size):
        chunk = samples[start:start + batch_size]
        pixels = torch.stack([load_image(s.path, resolution, policy) for s in chunk])
        out.append((vae.encode(pixels.to(device)).latent * scale).float().cpu())
    return torch.cat(out)


# --- the cache -------------------------------------------------------------------------------

def _log(message: str) -> None:
    print(f"tune-sana: {message}", file=sys.stderr, flush=True)


def build_cache(data: str, model: str, **options: Any) -> Path:
    """Build the encoded folder for an image folder or manifest, or find the one already built.

    Returns its path. Bad files are a UserError listing them unless ``skip_bad=True``. On a
    cache hit no encoder is loaded (``LOADS`` is unchanged).
    """
    opts = cache_options(**options)
    found = scan(data)
    found.require_clean(opts.skip_bad)
    source = encoder_source(model)
    variant = pick_variant(source, opts.variant)
    resolution = opts.resolution or default_resolution(source)
    key = cache_key(found.content_hash(), fingerprint(source, variant), resolution, opts)
    target = cache_root(opts) / f"{_slug(found.source.stem)}-{resolution}px-{key[:16]}"
    if _complete(target):
        _note_hit(target)
        return target

    started = time.perf_counter()
    checked = check_images(found, resolution, opts.size_policy, opts.allow_upscale)
    checked.require_clean(opts.skip_bad)
    if checked.problems:
        _log(f"{data}: leaving out {len(checked.problems)} bad files ({checked.summary()})")
    samples = checked.samples
    is_val = val_split(samples, opts.val_fraction, opts.val_max)
    device = pick_device(opts.device)
    dtype = torch.bfloat16 if opts.text_dtype == "bf16" else torch.float32

    _log(f"encoding {len(samples)} captions with {source} text_encoder ({opts.text_dtype}, "
         f"{device})")
    pipe = load_text_encoder(source, variant, dtype, device)
    text, mask = encode_captions(pipe, [s.caption for s in samples], opts, device)
    del pipe
    if opts.trim_text:
        text, mask = trim_padding(text, mask)
    _log(f"encoding {len(samples)} images at {resolution}px with {source} vae (fp32, {device})")
    vae = load_vae(source, variant, device)
    latents = encode_images(vae, samples, resolution, opts.size_policy, opts.batch_size, device)
    del vae
    if device.type == "cuda":
        torch.cuda.empty_cache()

    meta = _meta(checked, source, variant, resolution, key, opts, is_val, latents, text, device,
                 time.perf_counter() - started)
    try:
        save_encoded(target, Encoded(latents, text, mask), is_val, meta)
    except UserError:
        if not _complete(target):  # not a concurrent build of the same key that finished first
            raise
    _log(f"cache written: {target} ({len(samples) - int(is_val.sum())} train, "
         f"{int(is_val.sum())} val, {time.perf_counter() - started:.0f}s)")
    return target


def _meta(found: Scan, source: str, variant: str | None, resolution: int, key: str,
          opts: CacheOptions, is_val: torch.Tensor, latents: torch.Tensor, text: torch.Tensor,
          device: torch.device, seconds: float) -> dict[str, Any]:
    import diffusers
    import transformers

    return {
        "source": str(found.source),
        "kind": found.kind,
        "model": source,
        "variant": variant,
        "resolution": resolution,
        "key": key,
        "dataset_sha256": found.content_hash(),
        "options": {k: getattr(opts, k) for k in CacheOptions.KEYED} | {
            "size_policy": opts.size_policy.value},
        "samples": len(found.samples),
        "train": int((~is_val).sum()),
        "val": int(is_val.sum()),
        "latent_shape": list(latents.shape[1:]),
        "text_shape": list(text.shape[1:]),
        "names": [s.name for s in found.samples],
        "skipped": [str(p) for p in found.problems],
        "ignored": list(found.ignored),
        "encoded_on": str(device),
        "seconds": round(seconds, 3),
        "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__,
                     "transformers": transformers.__version__},
    }


def _note_hit(target: Path) -> None:
    try:
        meta = json.loads((target / META_FILE).read_text())
    except (OSError, ValueError):
        meta = {}
    skipped = meta.get("skipped") or []
    note = f"; {len(skipped)} bad files were left out (see meta.json)" if skipped else ""
    _log(f"using cached encodings {target}{note}")


def is_encoded(data: str) -> bool:
    """True for ``builtin:*`` or a folder holding (or meant to hold) save_encoded's files."""
    if data.startswith(BUILTIN_PREFIX):
        return True
    path = Path(data).expanduser()
    return path.is_dir() and ((path / ENCODED_FILE).exists() or (path / META_FILE).exists())


def prepare_data(data: str, model: str, **options: Any) -> str:
    """What a trial's ``data`` should be: ``data`` itself for ``builtin:*`` and encoded folders;
    for an image folder or manifest, the encoded folder (built here once, found afterwards).

    Call it once on the driver before any trial starts, so trials never encode. ``options`` are
    :class:`CacheOptions` fields. UserError for a path that does not exist.
    """
    if is_encoded(data):
        return data
    if not Path(data).expanduser().exists():
        raise UserError(f"data '{data}': no such folder or file; give builtin:shapes, an image "
                        "folder, a .jsonl/.parquet manifest or a folder made by tune-sana cache")
    return str(build_cache(data, model, **options))
