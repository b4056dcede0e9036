"""Warm start (engine/warmstart.py): an earlier run's finished trials seed a new Optuna study,
each in its true state; runs that do not match the search are refused in one line."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from optuna.trial import TrialState

from tune_sana.config import UserError
from tune_sana.engine import space, study, warmstart
from tune_sana.engine.search import build_searcher
from tune_sana.engine.sweep import write_spec
from tune_sana.record.schema import SPEC_FILE
from tune_sana.record.writer import ResultsWriter

SPACE: dict[str, Any] = {
    "trial": "synthetic", "fixed": {"steps": 20},
    "space": {"lr": {"loguniform": [1e-5, 1.0]}, "nan_from": {"choice": [None, 3]}},
    "search": {"algorithm": "optuna", "num_samples": 3, "seed": 1},
    "scheduler": {"type": "fifo"},
}
SPEC = space.parse_spec(SPACE, "t.yaml")

# trial id -> (lr, nan_from, outcome, val_loss by step)
EARLIER: dict[str, tuple[float, int | None, str, list[tuple[int, float]]]] = {
    "a": (1e-3, None, "completed", [(0, 1.2), (10, 0.5), (20, 0.3)]),
    "b": (3e-4, None, "completed", [(10, 0.6), (20, 0.45)]),
    "c": (0.5, None, "diverged", [(5, float("nan"))]),
    "d": (1e-5, 3, "pruned", [(10, 0.9)]),
    "e": (1e-3, 3, "error", []),
    "f": (2.0, None, "completed", [(20, 0.8)]),  # lr 2.0: outside this space's [1e-5, 1]
}


def earlier_run(run_dir: Path, spec: space.SweepSpec = SPEC) -> Path:
    """A recorded run as a sweep leaves it: sweep.yaml, history and trials.parquet."""
    write_spec(run_dir, spec)
    writer = ResultsWriter(run_dir, spec.to_yaml())
    for trial_id, (lr, nan_from, outcome, values) in EARLIER.items():
        for step, value in values:
            writer.add_step(trial_id, {"step": step, "val_loss": value})
        writer.finish_trial(trial_id, {"lr": lr, "nan_from": nan_from, "steps": 20},
                            {"outcome": outcome, "stage": "search"})
    writer.flush()
    return run_dir


def test_each_finished_trial_is_told_in_its_true_state(tmp_path: Path) -> None:
    earlier = earlier_run(tmp_path / "first")
    warm = warmstart.load(SPEC, [earlier])
    assert sorted(t.trial_id for t in warm.trials) == ["a", "b", "c", "d"]
    assert warm.skipped == {"error": 1, "outside this space": 1}
    assert "4 trials from 1 run" in warm.describe()

    run_dir = tmp_path / "second"
    build_searcher(SPEC, str(run_dir), warm=warm)
    seeded = study.load(run_dir)
    assert seeded is not None
    trials = {t.user_attrs[warmstart.TRIAL_ATTR]: t for t in seeded.trials}
    assert set(trials) == {"a", "b", "c", "d"}
    assert all(t.user_attrs[warmstart.RUN_ATTR] == str(earlier) for t in trials.values())
    # completed: the metric's last value, step 0 (the base) left out
    assert (trials["a"].state, trials["a"].value) == (TrialState.COMPLETE, 0.3)
    assert trials["a"].params == {"lr": 1e-3, "nan_from": None}
    assert trials["b"].value == 0.45
    # diverged: complete, infeasible, a penalty past the worst finite value told (0.9, pruned)
    assert trials["c"].state == TrialState.COMPLETE
    assert trials["c"].constraints.get("diverged") == 1.0
    assert trials["c"].value == pytest.approx(0.9 + 1.9)
    # pruned: its history as intermediate values
    assert trials["d"].state == TrialState.PRUNED
    assert trials["d"].intermediate_values == {10: 0.9}
    assert trials["d"].params["nan_from"] == 3


def test_a_resumed_study_gets_no_warm_trial_twice(tmp_path: Path) -> None:
    warm = warmstart.load(SPEC, [earlier_run(tmp_path / "first")])
    run_dir = tmp_path / "second"
    build_searcher(SPEC, str(run_dir), warm=warm)
    build_searcher(SPEC, str(run_dir), warm=warm)  # a resume that starts Ray afresh
    seeded = study.load(run_dir)
    assert seeded is not None and len(seeded.trials) == 4


@pytest.mark.parametrize(("change", "message"), [
    ({"metric": "train_loss"}, "its metric is train_loss"),
    ({"space": {"lr": {"loguniform": [1e-5, 1.0]}}}, "searched other keys (differ: nan_from)"),
    ({"trial": "sana_finetune"}, "its trial is sana_finetune"),
])
def test_a_run_of_another_search_is_refused(tmp_path: Path, change: dict[str, Any],
                                            message: str) -> None:
    other = {**yaml.safe_load(SPEC.to_yaml()), **change}  # sweep.yaml as a sweep writes it
    earlier = tmp_path / "other"
    earlier.mkdir()
    (earlier / SPEC_FILE).write_text(yaml.safe_dump(other))
    with pytest.raises(UserError, match="--warm-start") as err:
        warmstart.load(SPEC, [earlier])
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_not_a_run_and_not_optuna_are_refused(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="not a tune-sana run"):
        warmstart.load(SPEC, [tmp_path])
    grid = space.parse_spec({**SPACE, "search": {"algorithm": "random", "num_samples": 2}},
                            "g.yaml")
    with pytest.raises(UserError, match="seed an Optuna search"):
        warmstart.load(grid, [tmp_path])


def test_a_starting_point_a_warm_trial_ran_is_not_queued_again(tmp_path: Path) -> None:
    warm = warmstart.load(SPEC, [earlier_run(tmp_path / "first")])
    spec = space.parse_spec({**SPACE, "search": {
        **SPACE["search"], "points_to_evaluate": [{"lr": 1e-3}, {"lr": 0.01}]}}, "p.yaml")
    run_dir = tmp_path / "second"
    build_searcher(spec, str(run_dir), warm=warm)
    seeded = study.load(run_dir)
    assert seeded is not None
    waiting = [t.system_attrs["fixed_params"] for t in seeded.trials
               if t.state == TrialState.WAITING]
    assert waiting == [{"lr": 0.01}]  # lr 1e-3 ran as warm trial a (nan_from None)
