"""tune-sana best: the best completed trial's config, usable by `tune-sana trial --config`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from tune_sana.analysis.best import best, best_trial
from tune_sana.cli import main
from tune_sana.config import UserError, build_config, read_yaml_mapping
from tune_sana.testing.sweeps import SECOND, SMALL, write_small_sweep, write_sweep

EXPECTED = {"model": "demo-base", "variant": "bf16", "data": "builtin:shapes", "steps": 100,
            "batch_size": 8, "lr": 3e-4, "warmup_steps": 20, "max_grad_norm": 1.0,
            "precision": "fp32", "eval_every": 10, "device": "cpu"}


@pytest.fixture(scope="module")
def sweep(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_small_sweep(tmp_path_factory.mktemp("best") / "run", with_running=True)


def test_best_is_the_lowest_completed_trial_with_fixed_settings(sweep: Path) -> None:
    trial_id, val, config = best_trial(sweep)
    assert (trial_id, val) == ("t01", 0.20)
    assert config == EXPECTED
    assert list(config) == [k for k in EXPECTED]  # TrialConfig's order, plain types
    assert all(type(v) in (str, int, float, bool) for v in config.values())


def test_yaml_round_trips_through_trial_config(sweep: Path, tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["best", str(sweep)]) == 0
    path = tmp_path / "best.yaml"
    path.write_text(capsys.readouterr().out)
    values = read_yaml_mapping(path)  # what `tune-sana trial --config` reads
    config = build_config(values, source=str(path))
    assert config.lr == 3e-4 and config.precision.value == "fp32" and config.steps == 100
    assert config.max_grad_norm == 1.0 and config.variant == "bf16"


def test_json_format(sweep: Path) -> None:
    assert json.loads(best(sweep, "json")) == EXPECTED


def test_searched_null_is_kept(tmp_path: Path) -> None:
    run_dir = write_sweep(tmp_path / "run", SECOND)
    _, val, config = best_trial(run_dir)
    assert val == 0.18 and config["max_grad_norm"] is None and config["lr"] == 2e-4
    assert build_config(yaml.safe_load(best(run_dir))).max_grad_norm is None


def test_no_completed_trial_is_a_user_error(tmp_path: Path) -> None:
    run_dir = write_sweep(tmp_path / "bad", [t for t in SMALL if t.outcome != "completed"])
    with pytest.raises(UserError, match="no completed trial yet .*5 diverged"):
        best_trial(run_dir)
    live = write_sweep(tmp_path / "live", SMALL[:2], finish=False)
    with pytest.raises(UserError, match="no completed trial yet"):
        best_trial(live)
    with pytest.raises(UserError, match="not a tune-sana run directory"):
        best_trial(tmp_path / "nowhere")
