"""Precision modes are data: each policy matches the table in DESIGN.md."""

from __future__ import annotations

import pytest
import torch

from tune_sana.config import Precision, UserError
from tune_sana.training import precision as prec

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16

# DESIGN.md: mode -> (trainable weights, autocast dtype or None, GradScaler)
TABLE = {
    "fp32": (F32, None, False),
    "fp16-amp": (F32, F16, True),
    "bf16-amp": (F32, BF16, False),
    "fp16": (F16, None, False),
    "bf16": (BF16, None, False),
}


def test_every_mode_has_a_policy() -> None:
    assert {p.value for p in Precision} == set(TABLE) == {m.value for m in prec.POLICIES}


@pytest.mark.parametrize("mode", list(TABLE))
def test_policy_matches_design_table(mode: str) -> None:
    weights, autocast_dtype, scaler = TABLE[mode]
    policy = prec.policy_for(mode)
    assert policy.mode is Precision(mode)
    assert (policy.weight_dtype, policy.autocast_dtype, policy.loss_scaling) == (
        weights, autocast_dtype, scaler)
    assert policy.compute_dtype == (autocast_dtype or weights)


@pytest.mark.parametrize("mode", list(TABLE))
def test_grad_scaler_only_for_fp16_amp(mode: str) -> None:
    scaler = prec.grad_scaler(prec.policy_for(mode), torch.device("cpu"))
    assert scaler.is_enabled() is (mode == "fp16-amp")


@pytest.mark.parametrize("mode", list(TABLE))
def test_autocast_context_is_real(mode: str) -> None:
    policy = prec.policy_for(mode)
    layer = torch.nn.Linear(4, 4)
    with prec.autocast(policy, torch.device("cpu")):
        enabled = torch.is_autocast_enabled("cpu")
        out = layer(torch.randn(2, 4))
        with prec.no_autocast("cpu"):
            assert not torch.is_autocast_enabled("cpu")
            assert layer(torch.randn(2, 4)).dtype == F32
    assert enabled is (policy.autocast_dtype is not None)
    assert out.dtype == (policy.autocast_dtype or F32)


def test_unknown_mode_is_a_user_error_listing_valid_modes() -> None:
    with pytest.raises(UserError,
                       match="unknown precision mode 'fp8'; valid modes: fp32, fp16-amp"):
        prec.policy_for("fp8")


@pytest.mark.parametrize(
    ("mode", "variant", "expected"),
    [
        (Precision.FP16_AMP, "fp16", "native"),
        (Precision.FP16, "fp16", "native"),
        (Precision.BF16_AMP, "bf16", "native"),
        (Precision.BF16, "bf16", "native"),
        (Precision.FP16_AMP, "bf16", "crossed"),
        (Precision.BF16, "fp16", "crossed"),
        (Precision.FP32, "fp16", "n/a"),
        (Precision.BF16_AMP, None, "n/a"),
    ],
)
def test_pairing(mode: Precision, variant: str | None, expected: str) -> None:
    assert prec.pairing(mode, variant) == expected


@pytest.mark.parametrize("mode", list(Precision))
def test_every_mode_is_supported_on_cpu(mode: Precision) -> None:
    prec.check_supported(mode, torch.device("cpu"))


def test_unsupported_device_is_a_user_error() -> None:
    with pytest.raises(UserError, match="device 'meta' is not supported"):
        prec.check_supported(Precision.FP32, torch.device("meta"))
