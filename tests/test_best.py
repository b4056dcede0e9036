"""tune-sana best: the best configuration's config, usable by `tune-sana trial --config`, under
a header that says how far to trust it (one seed, or mean +- SE over a confirm stage's seeds)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from tune_sana.analysis.best import best, best_config, best_trial
from tune_sana.cli import main
from tune_sana.config import UserError, build_config, read_yaml_mapping
from tune_sana.testing.sweeps import (
    SECOND,
    SMALL,
    replica,
    write_confirmed_sweep,
    write_small_sweep,
    write_sweep,
)

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


# --- with a confirm stage: the best mean over fresh seeds, and how far it can be trusted ------

def _header(text: str) -> list[str]:
    return [line[2:] for line in text.splitlines() if line.startswith("# ")]


def test_single_seed_best_says_its_noise_is_unknown(sweep: Path) -> None:
    header = _header(best(sweep))
    assert header[0].endswith("best val loss 0.2; improvement over the base 1: 80.0%")
    assert header[1].startswith("it rests on one seed: its noise is unknown; add 'search: "
                                "{confirm: {top_k: 3, seeds: 2}}'")
    assert header[-1] == "use: tune-sana trial --config <this file>"


def test_confirmed_best_is_the_lowest_mean_that_never_diverged(tmp_path: Path) -> None:
    run_dir = write_confirmed_sweep(tmp_path / "run")
    trial_id, config, header = best_config(run_dir)
    # t03's mean (0.205) is lower, but one of its seeds diverged; t01's search trial is printed
    assert trial_id == "t01" and config == EXPECTED
    assert best_trial(run_dir)[:2] == ("t01", 0.20)  # the single best trial, as before
    lines = header.splitlines()
    assert lines[0].startswith(f"best configuration of {run_dir}: t01 (config of trial t01)")
    assert lines[1] == ("mean best val loss 0.21 +- 0.002 over 2 seeds (mean +- standard error "
                        "over fresh seeds)")
    assert lines[2].startswith("its search trial's own value 0.2 is kept apart")
    assert lines[3] == ("improvement over the base 1: 79.0%, beyond the noise (base - mean = "
                        "0.79 > 2 SE = 0.004)")
    assert lines[4] == ("runner-up t06: 0.238 +- 0.002 over 2 seeds: worse beyond the noise "
                        "(difference 0.028 > 2 x combined SE 0.0057)")
    assert lines[5] == "left out, a seed diverged: t03 (1 of 2 seeds)"
    text = best(run_dir)
    path = tmp_path / "best.yaml"
    path.write_text(text)
    assert build_config(read_yaml_mapping(path)).lr == 3e-4
    assert json.loads(best(run_dir, "json")) == EXPECTED


def test_winner_that_cannot_be_told_apart_from_the_runner_up(tmp_path: Path) -> None:
    a, b = SMALL[1], SMALL[6]
    run_dir = write_sweep(tmp_path / "run", [
        a, b, replica(a, "r1", 1, 0.208), replica(a, "r2", 2, 0.212),   # 0.21 +- 0.002
        replica(b, "r3", 1, 0.209), replica(b, "r4", 2, 0.219)])        # 0.214 +- 0.005
    lines = _header(best(run_dir))
    assert lines[0].startswith(f"best configuration of {run_dir}: t01")
    assert lines[4] == ("the winner cannot be told apart from the runner-up t06: 0.214 +- "
                        "0.005 over 2 seeds (difference 0.004 <= 2 x combined SE 0.011)")


def test_winner_that_cannot_be_told_apart_from_the_base(tmp_path: Path) -> None:
    a = replace(SMALL[1], base=0.25)
    run_dir = write_sweep(tmp_path / "run", [
        a, replica(a, "r1", 1, 0.18), replica(a, "r2", 2, 0.24)])      # 0.21 +- 0.03
    lines = _header(best(run_dir))
    assert lines[1].startswith("mean best val loss 0.21 +- 0.03 over 2 seeds")
    assert lines[3] == ("the winner cannot be told apart from the base 0.25: its improvement "
                        "16.0% is within the noise (base - mean = 0.04 <= 2 SE = 0.06)")
    assert lines[4] == ("no runner-up: no other confirmed configuration completed without "
                        "divergence")


def test_no_qualifying_configuration_falls_back_to_one_trial(tmp_path: Path) -> None:
    a, b = SMALL[1], SMALL[6]
    spike = {"diverged_step": 30, "cause": "loss_spike"}
    run_dir = write_sweep(tmp_path / "run", [
        SMALL[0], a, b, replica(a, "r1", 1, None, "diverged", **spike),
        replica(a, "r2", 2, 0.2), replica(b, "r3", 1, None, "diverged", **spike)])
    trial_id, config, header = best_config(run_dir)
    # t01 and t06 each diverged in a confirm seed: the best trial of another configuration
    assert trial_id == "t00" and config["lr"] == 3e-5
    lines = header.splitlines()
    assert lines[1] == ("no confirmed configuration qualifies (a seed diverged: t01 (1 of 2 "
                        "seeds), t06 (1 of 1 seeds))")
    assert lines[2].startswith("it rests on one seed")


def test_a_run_of_schema_version_1_gets_the_single_trial_answer(tmp_path: Path) -> None:
    run_dir = write_confirmed_sweep(tmp_path / "v1")
    path = run_dir / "trials.parquet"
    pq.write_table(pq.read_table(path).drop_columns(
        ["base_val_loss", "improvement", "stage", "config_id"]), path)
    trial_id, config, header = best_config(run_dir)
    assert trial_id == "t01" and config == EXPECTED
    lines = header.splitlines()
    assert lines[0] == f"best completed trial t01 of {run_dir}: best val loss 0.2"
    assert lines[1].startswith("it rests on one seed: its noise is unknown")
