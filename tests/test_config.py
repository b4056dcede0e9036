"""TrialConfig validation and --set parsing: every bad input is a UserError naming the key."""

from __future__ import annotations

import pytest

from tune_sana.config import (
    TRIAL_KEYS,
    OnNonfinite,
    Precision,
    TrialConfig,
    UserError,
    build_config,
    did_you_mean,
    parse_overrides,
    parse_value,
)


def test_defaults_validate_and_rows_are_plain() -> None:
    config = build_config({})
    assert config.precision is Precision.FP32
    assert config.on_nonfinite is OnNonfinite.STOP
    row = config.as_row()
    assert row["precision"] == "fp32" and row["lr_schedule"] == "constant"
    assert set(row) == set(TRIAL_KEYS)


def test_unknown_key_names_it_with_did_you_mean() -> None:
    with pytest.raises(UserError) as err:
        build_config({"lrr": 1e-3}, source="space.yaml")
    message = str(err.value)
    assert "space.yaml" in message and "'lrr'" in message
    assert "did you mean 'lr'?" in message
    assert "\n" not in message


def test_unknown_key_far_from_any_gives_the_valid_keys() -> None:
    with pytest.raises(UserError, match="unknown key 'zzz'; valid keys: model") as err:
        build_config({"zzz": 1})
    assert "did you mean" not in str(err.value)
    assert did_you_mean("precison", TRIAL_KEYS) == " (did you mean 'precision'?)"


@pytest.mark.parametrize(
    ("values", "key"),
    [
        ({"lr": -1e-4}, "lr"),
        ({"lr": 0}, "lr"),
        ({"lr": float("nan")}, "lr"),
        ({"precision": "fp8"}, "precision"),
        ({"steps": 0}, "steps"),
        ({"max_grad_norm": -1.0}, "max_grad_norm"),
        ({"adam_beta2": 1.0}, "adam_beta2"),
        ({"on_nonfinite": "ignore"}, "on_nonfinite"),
        ({"variant": "fp8"}, "variant"),
        ({"loss_spike_factor": 1.0}, "loss_spike_factor"),
    ],
)
def test_bad_values_name_the_key(values: dict[str, object], key: str) -> None:
    with pytest.raises(UserError, match=f"key '{key}' = ") as err:
        build_config(values, source="--set")
    assert str(err.value).startswith("--set: ")
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1e-4", 1e-4), ("3E5", 3e5), ("-2.5e-3", -2.5e-3), ("1.0e-4", 1e-4), ("0.5", 0.5),
        ("200", 200), ("null", None), ("true", True), ("false", False), ("fp16-amp", "fp16-amp"),
        ("[1, 2]", [1, 2]), ("builtin:shapes", "builtin:shapes"),
    ],
)
def test_parse_value_reads_yaml_scalars(text: str, expected: object) -> None:
    value = parse_value(text)
    assert value == expected and type(value) is type(expected)


def test_parse_overrides_and_build() -> None:
    values = parse_overrides(
        ["lr=1e-4", "max_grad_norm=null", "attention_fp32=true", " steps = 3", "precision=bf16-amp"]
    )
    assert values == {"lr": 1e-4, "max_grad_norm": None, "attention_fp32": True, "steps": 3,
                      "precision": "bf16-amp"}
    config = build_config(values)
    assert config.lr == 1e-4 and config.max_grad_norm is None and config.attention_fp32 is True
    assert config.precision is Precision.BF16_AMP
    assert parse_overrides(None) == {}


@pytest.mark.parametrize("pair", ["lr", "=1e-4", " =3"])
def test_malformed_set_is_a_user_error(pair: str) -> None:
    with pytest.raises(UserError, match="expected key=value"):
        parse_overrides([pair])


def test_config_is_frozen() -> None:
    config = build_config({"lr": 1e-3})
    with pytest.raises(ValueError):
        config.lr = 1.0  # type: ignore[misc]
    assert isinstance(config, TrialConfig)
