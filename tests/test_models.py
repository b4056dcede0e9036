"""Loading Sana transformers: presets, saved folders with weight variants, pipeline layouts."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from tune_sana.config import UserError
from tune_sana.data.checkpoints import resolve_folder
from tune_sana.training.models import TINY_CONFIG, load_transformer, tiny_model


def _assert_weights(model: torch.nn.Module, expected: dict[str, torch.Tensor],
                    dtype: torch.dtype) -> None:
    state = model.state_dict()
    assert state.keys() == expected.keys()
    for name, tensor in state.items():
        assert tensor.dtype == dtype, name
        assert torch.equal(tensor, expected[name].to(dtype)), name


@pytest.mark.parametrize(
    ("variant", "dtype"),
    [(None, torch.float32), ("fp16", torch.float16), ("bf16", torch.bfloat16),
     ("fp16", torch.float32)],
)
def test_load_saved_folder_with_variant(tiny_checkpoint: Path, variant: str | None,
                                        dtype: torch.dtype) -> None:
    model = load_transformer(str(tiny_checkpoint), variant=variant, dtype=dtype)
    stored = {None: torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[variant]
    # the variant's file holds rounded weights; they come back exactly, in the asked dtype
    expected = {k: v.to(stored) for k, v in tiny_model(seed=3).state_dict().items()}
    _assert_weights(model, expected, dtype)


def test_load_pipeline_style_folder(tiny_checkpoint: Path, tmp_path: Path) -> None:
    pipeline = tmp_path / "pipe"
    shutil.copytree(tiny_checkpoint, pipeline / "transformer")
    assert resolve_folder(str(pipeline)) == (str(pipeline), "transformer")
    model = load_transformer(str(pipeline), variant="bf16", dtype=torch.bfloat16)
    _assert_weights(model, tiny_model(seed=3).state_dict(), torch.bfloat16)


def test_preset_is_seeded_and_in_the_asked_dtype() -> None:
    one = load_transformer("sana-tiny", variant="fp16", dtype=torch.bfloat16, seed=5)
    _assert_weights(one, tiny_model(seed=5).state_dict(), torch.bfloat16)
    model: Any = tiny_model(seed=5)
    assert model.config.num_layers == TINY_CONFIG["num_layers"]
    assert not torch.equal(tiny_model(seed=6).state_dict()["proj_out.weight"],
                           model.state_dict()["proj_out.weight"])


def test_missing_folder_is_a_user_error_naming_it(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-model"
    with pytest.raises(UserError, match=f"model '{missing}': no such folder"):
        load_transformer(str(missing), variant=None, dtype=torch.float32)


def test_folder_without_config_is_a_user_error(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no config.json in it or in transformer/"):
        load_transformer(str(tmp_path / "empty"), variant=None, dtype=torch.float32)


def test_missing_variant_is_a_user_error_naming_the_file(tiny_checkpoint: Path,
                                                         tmp_path: Path) -> None:
    only_fp32 = tmp_path / "fp32-only"
    only_fp32.mkdir()
    for name in ("config.json", "diffusion_pytorch_model.safetensors"):
        shutil.copy(tiny_checkpoint / name, only_fp32 / name)
    with pytest.raises(UserError) as err:
        load_transformer(str(only_fp32), variant="bf16", dtype=torch.bfloat16)
    assert "diffusion_pytorch_model.bf16.safetensors" in str(err.value)
    assert str(only_fp32) in str(err.value) and "\n" not in str(err.value)


def test_demo_base_not_built_says_how_to_build_it(empty_home: Path) -> None:
    with pytest.raises(UserError, match="run: tune-sana make-base") as err:
        load_transformer("demo-base", variant=None, dtype=torch.float32)
    assert str(empty_home) in str(err.value)


def test_make_base_rounds_each_variant_from_fp32_once(tmp_path: Path) -> None:
    from tune_sana.training.demo_base import make_base

    folder = make_base(tmp_path / "base", steps=2)
    full = load_transformer(str(folder), variant=None, dtype=torch.float32).state_dict()
    for variant, dtype in (("fp16", torch.float16), ("bf16", torch.bfloat16)):
        model = load_transformer(str(folder), variant=variant, dtype=dtype)
        _assert_weights(model, full, dtype)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base"]
