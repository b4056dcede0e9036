"""What Optuna learns about diverged trials, with and without tune-sana's searcher."""

from __future__ import annotations

import math

import optuna
from optuna.samplers._tpe.sampler import _split_trials
from ray.tune.search.optuna import OptunaSearch

from tune_sana import space
from tune_sana.search import DivergenceAwareOptunaSearch, build_searcher

SPEC = space.parse_spec(
    {"trial": "synthetic", "fixed": {"steps": 5},
     "space": {"lr": {"loguniform": [1e-5, 1.0]}}, "search": {"num_samples": 6, "seed": 1}},
    "t.yaml",
)


def _run_three(searcher: OptunaSearch) -> list[optuna.trial.FrozenTrial]:
    for trial_id in ("a", "b", "c"):
        assert searcher.suggest(trial_id) is not None
    searcher.on_trial_complete("a", {"val_loss": 0.5, "training_iteration": 5})
    searcher.on_trial_complete("b", {"val_loss": math.nan, "training_iteration": 5})
    searcher.on_trial_complete("c", {"outcome": "diverged", "divergence_cause": "nonfinite_loss",
                                     "training_iteration": 2})
    return searcher._ot_study.trials


def test_stock_optuna_search_leaves_nan_trial_running() -> None:
    stock = OptunaSearch(space=space.optuna_space(SPEC), metric="val_loss", mode="min", seed=1)
    states = [t.state for t in _run_three(stock)]
    assert states[1] == optuna.trial.TrialState.RUNNING  # the bug this project works around


def test_diverged_trials_are_finished_infeasible_and_split_as_bad() -> None:
    searcher, param_space = build_searcher(SPEC)
    assert isinstance(searcher, DivergenceAwareOptunaSearch) and param_space == {}
    searcher.set_search_properties("val_loss", "min", {})
    trials = _run_three(searcher)
    assert [t.state for t in trials] == [optuna.trial.TrialState.COMPLETE] * 3
    assert trials[0].constraints == {}
    for bad in trials[1:]:
        assert bad.user_attrs["diverged"] is True
        assert bad.constraints == {"diverged": 1.0}
        assert bad.value is not None and math.isfinite(bad.value) and bad.value > 0.5
    below, above = _split_trials(searcher._ot_study, trials, n_below=1)
    assert [t.number for t in below] == [0]
    assert {t.number for t in above} == {1, 2}
