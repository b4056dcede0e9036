"""Space files: validation errors name the key and the file; conversion keeps bounds and scale."""

from __future__ import annotations

from pathlib import Path

import pytest

from tune_sana.config import UserError
from tune_sana.engine import space

SPACES_DIR = Path(__file__).resolve().parents[1] / "search_spaces"


def _raw(**overrides: object) -> dict[str, object]:
    raw: dict[str, object] = {
        "fixed": {"steps": 10},
        "space": {"lr": {"loguniform": [1e-5, 1e-2]}},
    }
    raw.update(overrides)
    return raw


@pytest.mark.parametrize("path", sorted(SPACES_DIR.rglob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_space_validates_and_opens_with_its_command(path: Path) -> None:
    spec = space.load(path)
    assert spec.space, "a shipped space searches something"
    assert path.read_text().startswith("# tune-sana sweep"), "first line is the command"


def test_default_is_quickstart() -> None:
    assert space.load(None) == space.load(SPACES_DIR / "quickstart.yaml")


@pytest.mark.parametrize(
    ("raw", "needle"),
    [
        (_raw(serach={}), "unknown key 'serach' (did you mean 'search'?)"),
        (_raw(fixed={"lrr": 1e-3}), "unknown key 'fixed.lrr' (did you mean 'lr'?)"),
        (_raw(space={"lr": {"loguniform": [1e-2, 1e-5]}}), "empty or inverted"),
        (_raw(space={"lr": {"loguniform": [0.0, 1e-2]}}), "needs low > 0"),
        (_raw(space={"lr": {"uniform": [1.0, 1.0]}}), "empty or inverted"),
        (_raw(space={"lr": {"choice": []}}), "at least one value"),
        (_raw(space={"lr": {"logunifrom": [1e-5, 1e-2]}}), "did you mean 'loguniform'"),
        (_raw(space={"precision": {"choice": ["fp32", "fp8"]}}), "space.precision"),
        (_raw(search={"algorithm": "hyperopt"}), "search.algorithm"),
        (_raw(search={"num_sample": 3}), "did you mean 'num_samples'"),
        (_raw(space={"lr": {"grid": [1e-3, 1e-2]}}), "'grid' needs search.algorithm grid"),
        (_raw(fixed={"lr": 1e-3}), "both fixed and searched"),
        (_raw(trial="sana_fintune"), "did you mean 'sana_finetune'"),
        (_raw(fixed={"steps": -1}), "fixed"),
    ],
)
def test_bad_spec_is_one_line_naming_key_and_file(raw: dict[str, object], needle: str) -> None:
    with pytest.raises(UserError) as err:
        space.parse_spec(raw, source="my.yaml")
    message = str(err.value)
    assert needle in message
    assert message.startswith("my.yaml")
    assert "\n" not in message


def test_null_in_choice_and_overrides() -> None:
    raw = _raw(space={"max_grad_norm": {"choice": [None, 1.0]}, "lr": {"loguniform": [1e-5, 1e-2]}})
    raw = space.apply_overrides(raw, {"lr": 3e-4, "search.num_samples": 5})
    spec = space.parse_spec(raw, "x.yaml")
    assert spec.fixed["lr"] == 3e-4 and "lr" not in spec.space
    assert spec.search.num_samples == 5
    assert spec.space["max_grad_norm"].values() == [None, 1.0]


def test_conversions_keep_bounds_scale_and_inclusivity() -> None:
    spec = space.parse_spec(
        _raw(space={
            "lr": {"loguniform": [1e-5, 1e-2]},
            "warmup_steps": {"int": [0, 10]},
            "max_grad_norm": {"choice": [None, 1.0]},
        }),
        "x.yaml",
    )
    ray_space = space.ray_space(spec)
    assert ray_space["lr"].lower == 1e-5 and ray_space["lr"].upper == 1e-2
    assert ray_space["warmup_steps"].upper == 11  # randint's upper is exclusive: 10 is included
    assert ray_space["max_grad_norm"].categories == [None, 1.0]
    dists = space.optuna_space(spec)
    assert dists["lr"].log and dists["lr"].low == 1e-5 and dists["lr"].high == 1e-2
    assert (dists["warmup_steps"].low, dists["warmup_steps"].high) == (0, 10)


def test_malformed_yaml_and_missing_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("space:\n  lr: {loguniform: [1e-5, 1e-2]\n")
    with pytest.raises(UserError, match=r"bad.yaml: malformed YAML at line \d+"):
        space.load(bad)
    with pytest.raises(UserError, match="no such space file"):
        space.load(tmp_path / "nope.yaml")
