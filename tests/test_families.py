"""Sana's model families (sana, sana-1.5, sana-sprint): tiny configs built in code, saved with
save_pretrained and loaded back through load_transformer, the path a real checkpoint takes, then
trained in every precision mode."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.conftest import assert_plain, fast_config, run_trial
from tune_sana.testing.tiny_sana import random_encoded, save_tiny_transformer
from tune_sana.training.models import (
    FAMILIES,
    SANA,
    SANA_15,
    SPRINT,
    family_of,
    load_transformer,
    tiny_config,
    tiny_model,
)

QK_FAMILIES = (SANA_15, SPRINT)
MODES = (("fp32", None), ("fp16-amp", "fp16"), ("bf16-amp", "bf16"), ("fp16", "fp16"),
         ("bf16", "bf16"))

# The released checkpoints' transformer configs, as diffusers' convert_sana_to_diffusers.py
# writes them (the fields that differ between families; widths of the 1.6B and 4.8B models).
RELEASED: dict[str, dict[str, Any]] = {
    "Sana_1600M_1024px_BF16_diffusers": {"num_layers": 20, "qk_norm": None},
    "SANA1.5_4.8B_1024px_diffusers": {"num_layers": 60, "qk_norm": "rms_norm_across_heads"},
    "Sana_Sprint_0.6B_1024px_diffusers": {
        "num_layers": 28, "qk_norm": "rms_norm_across_heads", "guidance_embeds": True,
        "guidance_embeds_scale": 0.1, "timestep_scale": 1.0},
}


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Each family's tiny transformer, saved with fp16 and bf16 variants."""
    root = tmp_path_factory.mktemp("families")
    return {family: save_tiny_transformer(root / family, family, seed=2) for family in FAMILIES}


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> str:
    return random_encoded(tmp_path_factory.mktemp("data") / "encoded", n=24, n_val=8)


@pytest.mark.parametrize(("name", "family"), [(n, f) for n, f in zip(
    RELEASED, (SANA, SANA_15, SPRINT), strict=True)])
def test_family_of_a_released_config(name: str, family: str) -> None:
    assert family_of(RELEASED[name]) == family


@pytest.mark.parametrize("family", FAMILIES)
def test_family_config_survives_save_and_load(saved: dict[str, Path], family: str) -> None:
    written = json.loads((saved[family] / "config.json").read_text())
    assert family_of(written) == family
    assert {k: written[k] for k in tiny_config(family)} == tiny_config(family)
    model: Any = load_transformer(str(saved[family]), variant=None, dtype=torch.float32)
    assert family_of(model.config) == family
    attn1, attn2 = model.transformer_blocks[0].attn1, model.transformer_blocks[0].attn2
    has_qk = family in QK_FAMILIES
    for attn in (attn1, attn2):  # RMSNorm across all heads on q and k, in both attentions
        assert (attn.norm_q is not None) is has_qk and (attn.norm_k is not None) is has_qk
    if has_qk:
        assert attn1.norm_q.weight.shape == (attn1.inner_dim,)
    assert hasattr(model.time_embed, "guidance_embedder") is (family == SPRINT)
    expected = tiny_model(2, tiny_config(family)).state_dict()
    assert model.state_dict().keys() == expected.keys()
    assert all(torch.equal(v, expected[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize(("variant", "dtype"), [("fp16", torch.float16), ("bf16", torch.bfloat16)])
@pytest.mark.parametrize("family", QK_FAMILIES)
def test_family_weight_variants_load_in_their_dtype(saved: dict[str, Path], family: str,
                                                    variant: str, dtype: torch.dtype) -> None:
    model = load_transformer(str(saved[family]), variant=variant, dtype=dtype)
    expected = tiny_model(2, tiny_config(family)).state_dict()
    for name, tensor in model.state_dict().items():
        assert tensor.dtype == dtype, name
        assert torch.equal(tensor, expected[name].to(dtype)), name


def test_sprint_forward_needs_its_guidance_and_the_loss_gives_it(saved: dict[str, Path]
                                                                 ) -> None:
    """Sprint's time embedding also embeds a guidance scale: diffusers' forward fails without
    one, and flow_loss passes SanaSprintPipeline's (4.5 x guidance_embeds_scale)."""
    from tune_sana.training.flow import FlowBatch, flow_loss

    model: Any = load_transformer(str(saved[SPRINT]), variant=None, dtype=torch.float32)
    gen = torch.Generator().manual_seed(0)
    batch = FlowBatch(torch.randn(2, 12, 8, 8, generator=gen), torch.randn(2, 12, 8, 8,
                      generator=gen), torch.tensor([0.3, 0.7]), torch.randn(2, 10, 32,
                      generator=gen), torch.ones(2, 10, dtype=torch.int64))
    with pytest.raises(TypeError):
        model(hidden_states=batch.x0, encoder_hidden_states=batch.text,
              timestep=batch.sigmas, return_dict=False)
    loss = flow_loss(model, batch, torch.float32)
    assert torch.isfinite(loss)
    model.register_to_config(guidance_embeds_scale=0.2)  # a different guidance: another loss
    assert not torch.equal(flow_loss(model, batch, torch.float32), loss)


@pytest.mark.parametrize(("precision", "variant"), MODES)
@pytest.mark.parametrize("family", QK_FAMILIES)
def test_qk_norm_family_trains_in_every_precision(saved: dict[str, Path], data: str, family: str,
                                                  precision: str, variant: str | None) -> None:
    """Completed in every mode but pure fp16, where AdamW's eps (1e-8) is 0 in fp16 and the
    first update makes the weights non-finite, as on Sana 1.0: a diverged outcome with its
    cause, not an error."""
    config = fast_config(model=str(saved[family]), variant=variant, precision=precision,
                         data=data, steps=3, eval_every=3)
    rows, summary = run_trial(config)
    assert_plain(rows)
    if precision == "fp16":
        assert summary["outcome"] in ("completed", "diverged")
        if summary["outcome"] == "diverged":
            assert summary["divergence_cause"] == "nonfinite_params"
            assert summary["diverged_step"] == 1
    else:
        assert summary["outcome"] == "completed", summary
        assert summary["steps_run"] == 3 and summary["final_val_loss"] is not None


@pytest.mark.parametrize(("family", "overrides"), [
    (SANA_15, {"precision": "fp16-amp", "variant": "fp16", "attention_fp32": True}),
    (SPRINT, {"precision": "bf16", "variant": "bf16", "finetune": "lora"}),
])
def test_qk_norm_family_with_fp32_attention_and_lora(saved: dict[str, Path], data: str,
                                                     family: str, overrides: dict[str, Any]
                                                     ) -> None:
    """The fp32 linear-attention processor applies the q/k norms; LoRA wraps to_q/to_k/to_v
    beside them."""
    config = fast_config(model=str(saved[family]), data=data, steps=2, eval_every=2, **overrides)
    rows, summary = run_trial(config)
    assert_plain(rows)
    assert summary["outcome"] == "completed", summary


def test_every_shipped_space_says_which_family_it_targets() -> None:
    """A '# Family: <name>' line in each space's header: a family, or none for a trial without
    a Sana model."""
    import re

    from tune_sana.config import read_yaml_mapping

    root = Path(__file__).resolve().parents[1] / "search_spaces"
    spaces = sorted(root.rglob("*.yaml"))
    assert spaces
    for path in spaces:
        header = [line for line in path.read_text().splitlines() if line.startswith("#")]
        named = [m.group(1) for line in header if (m := re.match(r"# Family: ([\w.-]+)", line))]
        assert len(named) == 1, path.name
        trial = read_yaml_mapping(path).get("trial", "sana_finetune")
        assert named[0] in (FAMILIES if trial == "sana_finetune" else ("none",)), path.name
