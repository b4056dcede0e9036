"""FP32LinearAttnProcessor: the same math as diffusers' SanaLinearAttnProcessor2_0, but its
matmuls stay fp32 under fp16 autocast, where diffusers' go NaN/inf."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from diffusers.models.attention_processor import SanaLinearAttnProcessor2_0

from tune_sana.training.attention import FP32LinearAttnProcessor, use_fp32_linear_attention
from tune_sana.training.models import TINY_CONFIG, tiny_model


def _attn() -> Any:
    """attn1 of a seeded tiny Sana (ReLU linear attention, no bias on q, no q/k norm)."""
    return tiny_model(seed=0).transformer_blocks[0].attn1


def _tokens(scale: float = 1.0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    width = TINY_CONFIG["num_attention_heads"] * TINY_CONFIG["attention_head_dim"]
    return scale * torch.randn(2, 64, width, generator=gen)


def _both(attn: Any, x: torch.Tensor, dtype: torch.dtype | None = None
          ) -> tuple[torch.Tensor, torch.Tensor]:
    ctx = torch.autocast("cpu", dtype=dtype) if dtype else torch.autocast("cpu", enabled=False)
    with torch.no_grad(), ctx:
        return SanaLinearAttnProcessor2_0()(attn, x), FP32LinearAttnProcessor()(attn, x)


def test_same_output_as_diffusers_in_fp32() -> None:
    theirs, ours = _both(_attn(), _tokens())
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)


def test_same_output_as_diffusers_with_fp16_weights() -> None:
    attn = _attn().half()
    theirs, ours = _both(attn, _tokens().half())
    assert ours.dtype == torch.float16
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


def test_zero_denominator_under_fp16_autocast() -> None:
    # A token whose query is 0 (zero input, no bias): its denominator sum_j k_j.q_i is exactly 0.
    # In fp16 the +1e-15 guard rounds to 0 and 0/0 = NaN; in fp32 the row is 0/1e-15 = 0.
    attn = _attn()
    assert attn.to_q.bias is None
    x = _tokens()
    assert torch.isfinite(_both(attn, x, torch.float16)[0]).all()  # fine without the zero token
    x[0, 5] = 0.0
    theirs, ours = _both(attn, x, torch.float16)
    assert torch.isnan(theirs[0, 5]).all() and torch.isfinite(theirs[1]).all()
    assert not torch.isfinite(theirs).all()
    assert torch.isfinite(ours).all()
    reference = _both(attn, x)[1]
    torch.testing.assert_close(ours.float(), reference, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("scale", [100.0, 1000.0])
def test_huge_scores_under_fp16_autocast(scale: float) -> None:
    # K^T V summed over all tokens overflows fp16's 65504; kept in fp32 it does not.
    attn = _attn()
    x = _tokens(scale)
    theirs, ours = _both(attn, x, torch.float16)
    assert not torch.isfinite(theirs).all()
    assert torch.isfinite(ours).all()
    reference = _both(attn, x)[1]
    torch.testing.assert_close(ours.float(), reference, rtol=2e-2, atol=2e-2 * scale)


def test_use_fp32_linear_attention_swaps_exactly_attn1() -> None:
    model: Any = tiny_model(seed=1)
    before = {name: type(m.processor) for name, m in model.named_modules()
              if hasattr(m, "processor")}
    gen = torch.Generator().manual_seed(0)
    inputs = {
        "hidden_states": torch.randn(2, 12, 8, 8, generator=gen),
        "encoder_hidden_states": torch.randn(2, 8, 32, generator=gen),
        "timestep": torch.tensor([10.0, 900.0]),
        "return_dict": False,
    }
    with torch.no_grad():
        expected = model(**inputs)[0]
        assert use_fp32_linear_attention(model) == TINY_CONFIG["num_layers"]
        got = model(**inputs)[0]
    after = {name: type(m.processor) for name, m in model.named_modules()
             if hasattr(m, "processor")}
    swapped = {name for name in after if after[name] is not before[name]}
    assert swapped == {f"transformer_blocks.{i}.attn1" for i in range(TINY_CONFIG["num_layers"])}
    assert all(after[name] is FP32LinearAttnProcessor for name in swapped)
    assert all(before[name] is SanaLinearAttnProcessor2_0 for name in swapped)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
