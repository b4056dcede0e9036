"""LoRA fine-tuning: only the adapter trains, in the right dtype, and saves in diffusers' format."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from tests.conftest import fast_config, run_trial
from tune_sana.config import UserError
from tune_sana.data.encoded import load_data
from tune_sana.testing.tiny_sana import random_encoded
from tune_sana.training.lora import apply_finetune, load_lora, lora_parameters, save_trained
from tune_sana.training.models import load_transformer
from tune_sana.training.validation import FixedValidation

LORA: dict[str, Any] = {"finetune": "lora", "lora_rank": 2, "lr": 1e-2, "steps": 3,
                        "eval_every": 3}


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> str:
    return random_encoded(tmp_path_factory.mktemp("lora") / "encoded")


def test_full_finetune_leaves_the_model_alone() -> None:
    model = load_transformer("sana-tiny", variant=None, dtype=torch.float32)
    config = fast_config()
    assert apply_finetune(model, config, torch.float32) is model
    assert all(p.requires_grad for p in model.parameters()) and not lora_parameters(model)


def test_lora_freezes_the_base_and_wraps_the_targets() -> None:
    model = load_transformer("sana-tiny", variant=None, dtype=torch.float32)
    apply_finetune(model, fast_config(**LORA, lora_targets="to_q, to_v"), torch.float32)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_" in n for n in trainable)
    assert {n.split(".")[-4] for n in trainable} == {"to_q", "to_v"}
    # 2 blocks x 2 attentions x 2 targets x (A: r x in, B: out x r), width 32, rank 2
    assert sum(p.numel() for p in lora_parameters(model)) == 2 * 2 * 2 * (2 * 32 + 32 * 2)


@pytest.mark.parametrize(("weights", "lora"), [(torch.float16, torch.float32),
                                               (torch.bfloat16, torch.bfloat16),
                                               (torch.float32, torch.float32)])
def test_lora_parameters_are_fp32_over_an_fp16_base(weights: torch.dtype,
                                                    lora: torch.dtype) -> None:
    model = load_transformer("sana-tiny", variant=None, dtype=weights)
    apply_finetune(model, fast_config(**LORA), weights)
    assert {p.dtype for p in lora_parameters(model)} == {lora}
    assert {p.dtype for n, p in model.named_parameters() if ".lora_" not in n} == {weights}


def test_bad_targets_are_user_errors() -> None:
    model = load_transformer("sana-tiny", variant=None, dtype=torch.float32)
    with pytest.raises(UserError, match="lora_targets 'to_nowhere'"):
        apply_finetune(model, fast_config(**LORA, lora_targets="to_nowhere"), torch.float32)
    with pytest.raises(UserError, match="lora_targets"):
        fast_config(lora_targets="to q")


def _snapshot(into: dict[str, torch.Tensor]) -> Any:
    def keep(model: torch.nn.Module) -> None:
        into.update({n: p.detach().clone() for n, p in model.named_parameters()})
        into["__model__"] = model  # type: ignore[assignment]
    return keep


def test_a_lora_trial_changes_only_the_adapter(tmp_path: Path, data: str) -> None:
    before: dict[str, Any] = {}
    config = fast_config(**LORA, data=data)
    rows, summary = run_trial(config, on_model=_snapshot(before))
    assert summary["outcome"] == "completed", summary
    model = before.pop("__model__")
    after = dict(model.named_parameters())
    changed = {n for n, old in before.items() if not torch.equal(old, after[n])}
    assert changed and all(".lora_" in n for n in changed)
    assert summary["n_params"] == sum(p.numel() for p in lora_parameters(model))

    # the saved adapter, loaded by diffusers into a fresh base, gives the trial's val loss
    save_trained(model, config, tmp_path / "adapter")
    assert (tmp_path / "adapter" / "pytorch_lora_weights.safetensors").is_file()
    fresh = load_transformer("sana-tiny", variant=None, dtype=torch.float32, seed=config.seed)
    load_lora(fresh, tmp_path / "adapter")
    validate = FixedValidation(load_data(config.data).val, config.val_batch_size,
                               config.logit_mean, config.logit_std, config.flow_shift,
                               torch.device("cpu"), draws=config.val_draws)
    assert validate(fresh, torch.float32) == pytest.approx(summary["final_val_loss"], rel=1e-6)


def test_lora_alpha_sets_the_scale(tmp_path: Path) -> None:
    model = load_transformer("sana-tiny", variant=None, dtype=torch.float32)
    config = fast_config(**{**LORA, "lora_rank": 4, "lora_alpha": 2.0})
    apply_finetune(model, config, torch.float32)
    layer: Any = model.transformer_blocks[0].attn1.to_q  # type: ignore[index]
    assert layer.scaling["default"] == pytest.approx(0.5)
    save_trained(model, config, tmp_path)
    fresh = load_transformer("sana-tiny", variant=None, dtype=torch.float32)
    load_lora(fresh, tmp_path, adapter_name="loaded")
    again: Any = fresh.transformer_blocks[0].attn1.to_q  # type: ignore[index]
    assert again.scaling["loaded"] == pytest.approx(0.5)  # alpha survives via the metadata


def test_pure_fp16_lora_trial_runs_with_fp32_adapters(data: str) -> None:
    seen: dict[str, Any] = {}
    config = fast_config(**{**LORA, "steps": 2, "eval_every": 2, "lr": 1e-4}, data=data,
                         precision="fp16", val_batch_size=4, batch_size=2)
    _, summary = run_trial(config, on_model=_snapshot(seen))
    assert {p.dtype for p in lora_parameters(seen["__model__"])} == {torch.float32}
    # fp32 adapters keep AdamW's eps and grad^2 out of fp16, so pure fp16 no longer diverges
    assert summary["outcome"] == "completed", summary
