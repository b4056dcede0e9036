"""The noise rule (analysis.noise): confirmed configurations' mean and standard error over fresh
seeds, and which ones can be told apart, on synthetic confirm stages worked out by hand."""

from __future__ import annotations

import math
from pathlib import Path

import pyarrow as pa
import pytest

from tune_sana.analysis.noise import confirmed, has_confirm, told_apart
from tune_sana.analysis.runs import load_run
from tune_sana.testing.sweeps import SMALL, replica, write_confirmed_sweep, write_sweep


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_confirmed_sweep(tmp_path_factory.mktemp("noise") / "run")


def test_mean_se_and_marks_of_the_confirmed_sweep(run_dir: Path) -> None:
    trials = load_run(run_dir).trials
    assert has_confirm(trials)
    table = confirmed(trials, ["precision", "lr"])
    got = {r["config_id"]: r for r in table.to_pylist()}
    assert table["config_id"].to_pylist() == ["t03", "t01", "t06"]  # by mean
    t01, t06, t03 = got["t01"], got["t06"], got["t03"]
    assert (t01["seeds"], t01["n"], t01["diverged"]) == (2, 2, 0)
    assert t01["mean"] == pytest.approx(0.21) and t01["se"] == pytest.approx(0.002)
    assert t01["improvement"] == pytest.approx(0.79) and t01["base"] == 1.0
    assert (t01["search_trial"], t01["search_val"]) == ("t01", 0.20)  # kept apart
    assert (t01["precision"], t01["lr"]) == ("fp32", 3e-4)
    assert (t01["vs_best"], t01["vs_base"]) == ("best", "better")
    assert t06["mean"] == pytest.approx(0.238) and t06["vs_best"] == "worse"
    # a diverged seed disqualifies; its one completed seed has no SE: never told apart
    assert (t03["seeds"], t03["n"], t03["diverged"]) == (2, 1, 1)
    assert t03["mean"] == pytest.approx(0.205) and t03["se"] is None
    assert (t03["vs_best"], t03["vs_base"]) == ("~best", "~base")


def test_the_rule_itself() -> None:
    assert not told_apart(0.21, 0.002, 0.214, 0.005)  # 0.004 <= 2 * 0.00539
    assert told_apart(0.21, 0.002, 0.238, 0.002)      # 0.028 > 2 * 0.00283
    assert not told_apart(0.1, None, 0.9, 0.001)      # SE unknown: never told apart
    assert told_apart(0.5, 0.0, 0.5 + 1e-9, 0.0)


def test_close_means_are_marked_alike_and_a_lower_diverged_one_better(tmp_path: Path) -> None:
    a, b, c = SMALL[1], SMALL[6], SMALL[3]
    trials = [a, b, c,
              replica(a, "r1", 1, 0.208), replica(a, "r2", 2, 0.212),   # 0.21 +- 0.002
              replica(b, "r3", 1, 0.209), replica(b, "r4", 2, 0.219),   # 0.214 +- 0.005
              replica(c, "r5", 1, 0.100), replica(c, "r6", 2, 0.102),   # 0.101, but:
              replica(c, "r7", 3, None, "diverged", diverged_step=30, cause="loss_spike")]
    table = confirmed(load_run(write_sweep(tmp_path / "run", trials)).trials)
    marks = dict(zip(table["config_id"].to_pylist(), table["vs_best"].to_pylist(), strict=True))
    assert marks == {"t01": "best", "t06": "~best", "t03": "better"}
    se = dict(zip(table["config_id"].to_pylist(), table["se"].to_pylist(), strict=True))
    assert se["t06"] == pytest.approx(0.005) and se["t03"] == pytest.approx(0.001)
    assert math.isclose(table["mean"][0].as_py(), 0.101)


def test_no_confirm_stage_and_no_qualifying_configuration(tmp_path: Path) -> None:
    plain = load_run(write_sweep(tmp_path / "plain", SMALL)).trials
    assert not has_confirm(plain) and confirmed(plain).num_rows == 0
    a = SMALL[1]
    trials = [a, replica(a, "r1", 1, None, "diverged", diverged_step=30, cause="loss_spike"),
              replica(a, "r2", 2, 0.3)]
    table = confirmed(load_run(write_sweep(tmp_path / "bad", trials)).trials)
    assert table["vs_best"].to_pylist() == [None]  # nothing qualifies: no best to mark against
    assert table["vs_base"].to_pylist() == ["~base"]


def test_stage_and_config_id_of_runs_before_the_confirm_stage_read_as_search() -> None:
    trials = pa.table({"trial_id": ["a"], "outcome": ["completed"], "best_val_loss": [0.2],
                       "improvement": pa.nulls(1, pa.float64()),
                       "base_val_loss": pa.nulls(1, pa.float64()),
                       "stage": pa.nulls(1, pa.string()), "config_id": pa.nulls(1, pa.string())})
    assert not has_confirm(trials) and confirmed(trials).num_rows == 0
