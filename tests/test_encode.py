"""The encoding cache on a tiny Sana pipeline built in code: the same tensors as diffusers computes,
pairs that survive shuffling, a second build that loads nothing, and a trial that trains on it."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.conftest import fast_config, run_trial
from tune_sana.cli import main
from tune_sana.config import UserError
from tune_sana.data import cache as encode
from tune_sana.data.encoded import load_encoded
from tune_sana.data.images import SizePolicy, load_image
from tune_sana.testing.tiny_sana import (
    LATENT_CHANNELS,
    LATENT_SIZE,
    TEXT_DIM,
    build_tiny_pipeline,
    write_images,
)
from tune_sana.training.runtime import Batches

N_IMAGES = 12
# batch_size >= N: the whole set is one encoder call, so a reference call can match it bit for bit
OPTIONS: dict[str, Any] = {"device": "cpu", "batch_size": 64, "val_fraction": 0.25}


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("encode")
    pipe = build_tiny_pipeline(root / "pipe")
    captions = write_images(root / "images", N_IMAGES)
    before = Counter(encode.LOADS)
    cache = encode.build_cache(str(root / "images"), str(pipe), cache_root=str(root / "cache"),
                               **OPTIONS)
    loads = Counter(encode.LOADS)
    loads.subtract(before)
    return {"root": root, "pipe": pipe, "images": root / "images", "captions": captions,
            "cache": cache, "cache_root": str(root / "cache"), "loads": +loads}


def test_cache_from_an_image_folder(world: dict[str, Any]) -> None:
    data = load_encoded(world["cache"])
    assert world["loads"] == {"vae": 1, "text_encoder": 1}
    assert (len(data.train), len(data.val)) == (9, 3)
    assert data.train.latents.shape[1:] == (LATENT_CHANNELS, LATENT_SIZE, LATENT_SIZE)
    assert data.train.text.shape[2] == TEXT_DIM and data.train.text.dtype == torch.float32
    assert data.train.mask.dtype == torch.int64
    meta = json.loads((world["cache"] / "meta.json").read_text())
    assert meta["resolution"] == 16  # transformer sample_size 8 x the VAE's 2x downsampling
    assert meta["names"] == [f"img{i:03d}.png" for i in range(N_IMAGES)]
    assert meta["options"]["complex_human_instruction"] is True and meta["skipped"] == []


def test_second_build_and_prepare_data_load_no_encoder(world: dict[str, Any]) -> None:
    before = Counter(encode.LOADS)
    again = encode.build_cache(str(world["images"]), str(world["pipe"]),
                               cache_root=world["cache_root"], **OPTIONS)
    prepared = encode.prepare_data(str(world["images"]), str(world["pipe"]),
                                   cache_root=world["cache_root"], **OPTIONS)
    assert again == world["cache"] and prepared == str(world["cache"])
    assert encode.LOADS == before
    # already-encoded data passes through untouched
    assert encode.prepare_data(str(world["cache"]), "anything") == str(world["cache"])
    assert encode.prepare_data("builtin:shapes", "demo-base") == "builtin:shapes"


def test_cache_command_finds_the_same_folder(world: dict[str, Any],
                                             capsys: pytest.CaptureFixture[str]) -> None:
    before = Counter(encode.LOADS)
    code = main(["cache", str(world["images"]), "--model", str(world["pipe"]), "--device", "cpu",
                 "--batch-size", "64", "--val-fraction", "0.25", "--cache-root",
                 world["cache_root"]])
    assert code == 0 and capsys.readouterr().out.strip() == str(world["cache"])
    assert encode.LOADS == before


def test_text_and_latents_match_diffusers(world: dict[str, Any]) -> None:
    from diffusers import AutoencoderDC, SanaPipeline

    # Gemma-2 loaded in bf16 (not cast after loading: its rotary buffers stay fp32 that way)
    pipe = SanaPipeline.from_pretrained(
        str(world["pipe"]), torch_dtype={"text_encoder": torch.bfloat16, "default": torch.float32})
    embeds, mask, _, _ = pipe.encode_prompt(
        world["captions"], do_classifier_free_guidance=False, device=torch.device("cpu"),
        complex_human_instruction=encode.complex_human_instruction())
    assert embeds.shape[1] == 300  # max_sequence_length
    tensors = _all_rows(world["cache"])
    length = tensors["text"].shape[1]
    assert not mask[:, length:].any()  # trimming dropped padding only
    assert torch.equal(tensors["text"], embeds[:, :length].float())
    assert torch.equal(tensors["mask"], mask[:, :length].long())

    vae = AutoencoderDC.from_pretrained(str(world["pipe"]), subfolder="vae")
    pixels = torch.stack([load_image(world["images"] / f"img{i:03d}.png", 16, SizePolicy.CROP)
                          for i in range(N_IMAGES)])
    with torch.no_grad():
        latents = vae.encode(pixels).latent * vae.config.scaling_factor
    torch.testing.assert_close(tensors["latents"], latents)


def _all_rows(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / "encoded.safetensors"))


def test_pairs_survive_shuffled_batches(world: dict[str, Any]) -> None:
    """Identify each batch row's image by its latent and its caption by its embedding
    (nearest reference encoded one at a time): they must be the same sample."""
    rows = _all_rows(world["cache"])
    meta = json.loads((world["cache"] / "meta.json").read_text())
    index = [int(name[3:6]) for name in meta["names"]]  # row -> image number
    ref_latents = rows["latents"][torch.argsort(torch.tensor(index))]

    pipe = encode.load_text_encoder(str(world["pipe"]), None, torch.bfloat16, torch.device("cpu"))
    single = [encode.encode_captions(pipe, [c], encode.cache_options(**OPTIONS),
                                     torch.device("cpu"))[0][0] for c in world["captions"]]
    length = rows["text"].shape[1]
    ref_text = torch.stack(single)[:, :length]

    data = load_encoded(world["cache"])
    batches = Batches(data.train, batch_size=4, seed=123)
    seen = set()
    for _ in range(6):
        batch = batches.next()
        image_of = torch.cdist(batch.latents.flatten(1), ref_latents.flatten(1)).argmin(1)
        caption_of = torch.cdist(batch.text.flatten(1), ref_text.flatten(1)).argmin(1)
        assert torch.equal(image_of, caption_of)
        seen.update(image_of.tolist())
    assert len(seen) == len(data.train)


def test_options_that_change_tensors_change_the_key(world: dict[str, Any]) -> None:
    plain = encode.build_cache(str(world["images"]), str(world["pipe"]),
                               cache_root=world["cache_root"],
                               **{**OPTIONS, "complex_human_instruction": False})
    assert plain != world["cache"]
    # without the instruction prefix, BOS + "item 11" is all there is
    assert load_encoded(plain).train.text.shape[1] == 1 + len("item 11")


def test_bad_files_fail_before_any_encoder_loads(world: dict[str, Any], tmp_path: Path) -> None:
    write_images(tmp_path, 4)
    (tmp_path / "img002.png").write_bytes(b"\x89PNG broken")
    (tmp_path / "img003.txt").unlink()
    before = Counter(encode.LOADS)
    with pytest.raises(UserError, match="missing caption x1: img003.png"):
        encode.build_cache(str(tmp_path), str(world["pipe"]), cache_root=str(tmp_path / "c"),
                           **OPTIONS)
    (tmp_path / "img003.txt").write_text("item 3")
    with pytest.raises(UserError, match="unreadable image x1: img002.png"):
        encode.build_cache(str(tmp_path), str(world["pipe"]), cache_root=str(tmp_path / "c"),
                           **OPTIONS)
    assert encode.LOADS == before
    kept = encode.build_cache(str(tmp_path), str(world["pipe"]), cache_root=str(tmp_path / "c"),
                              skip_bad=True, **OPTIONS)
    meta = json.loads((kept / "meta.json").read_text())
    assert meta["samples"] == 3 and meta["skipped"] == ["img002.png (unreadable image: "
                                                        "UnidentifiedImageError)"]


def test_models_without_encoders_are_user_errors(world: dict[str, Any]) -> None:
    with pytest.raises(UserError, match="has no image or text encoder"):
        encode.prepare_data(str(world["images"]), "sana-tiny")
    with pytest.raises(UserError, match="no vae/, text_encoder/, tokenizer/"):
        encode.prepare_data(str(world["images"]), str(world["pipe"] / "transformer"))
    with pytest.raises(UserError, match="no such folder or file"):
        encode.prepare_data(str(world["root"] / "nope"), str(world["pipe"]))
    with pytest.raises(UserError, match="did you mean 'resolution'"):
        encode.build_cache(str(world["images"]), str(world["pipe"]), resolutoin=16)


def test_trial_trains_on_the_cache_of_the_tiny_pipeline(world: dict[str, Any]) -> None:
    config = fast_config(model=str(world["pipe"]), data=str(world["cache"]), steps=3,
                         eval_every=3, batch_size=4, val_batch_size=3, variant="bf16",
                         precision="bf16-amp")
    rows, summary = run_trial(config)
    assert summary["outcome"] == "completed", summary
    assert summary["final_val_loss"] is not None and summary["pairing"] == "native"


def test_gpu_check_parses_its_arguments_and_plans(capsys: pytest.CaptureFixture[str]) -> None:
    import importlib.util

    path = Path(__file__).resolve().parent.parent / "bench" / "gpu_check.py"
    spec = importlib.util.spec_from_file_location("gpu_check", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    args = module.parse_args(["--model", "/ckpt", "--steps", "5", "--skip-sweep"])
    assert (args.model, args.steps, args.skip_sweep, args.device) == ("/ckpt", 5, True, "cuda")
    assert module.main(["--dry-run", "--images", "/imgs"]) == 0
    plan = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["plan"]
    assert plan["images"] == "/imgs" and len(plan["modes"]) == 21
    assert "bf16-amp came gc" in plan["modes"] and "fp32 adamw no-gc" in plan["modes"]
