"""Search algorithms, and what Optuna is told about a diverged or collapsed trial.

Ray's stock OptunaSearch tells Optuna a NaN as COMPLETE; Optuna refuses it, Ray logs a warning
and the Optuna trial stays RUNNING forever, so TPE never learns that the region diverges
(reference/hpo.md). Here a diverged trial is told as COMPLETE with a penalty value *and* marked
infeasible with ``Trial.set_constraint("diverged", 1.0)``: TPE puts every infeasible trial on
the bad side of its split, so the sampler learns to stay away from unstable regions whatever the
penalty's size. A collapsed trial (finite, but far worse than its base) is told the same way,
under its own name (``set_constraint("collapsed", 1.0)``). TPE models a quarter of the finished
trials as good, not Optuna's tenth (``good_trials``), so its good density covers the stable
region rather than two or three points.
"""

from __future__ import annotations

import inspect
import math
import warnings
from typing import Any

import optuna
from ray.tune.search import BasicVariantGenerator, Searcher
from ray.tune.search.optuna import OptunaSearch

from tune_sana.engine.space import SweepSpec, optuna_space
from tune_sana.engine.stopping import is_diverged
from tune_sana.outcomes import Outcome

DIVERGED_ATTR = Outcome.DIVERGED.value  # the Optuna user attr and constraint of a diverged trial
COLLAPSED_ATTR = Outcome.COLLAPSED.value  # ... and of a collapsed one
GOOD_SHARE = 0.25  # of finished trials, modelled as good by TPE (see good_trials)


class DivergenceAwareOptunaSearch(OptunaSearch):
    """OptunaSearch that records diverged and collapsed trials as infeasible, finished trials
    (never RUNNING).

    The value told for a diverged trial is a penalty, one step of ``|worst| + 1`` past the worst
    finite value told so far: ``worst + (|worst| + 1)`` for mode min, ``worst - (|worst| + 1)``
    for mode max; before any finite value, 1e6 (min) or -1e6 (max). The trial's cause is kept in
    user attrs. A non-finite metric never reaches ``study.tell``.
    """

    def __init__(self, *args: Any, points: list[dict[str, Any]] | None = None,
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._worst: float | None = None
        # Starting points go into the study's queue: Optuna asks them first, in order, and draws
        # the keys a point leaves out (Ray's own points_to_evaluate insists on every key).
        study: Any = getattr(self, "_ot_study", None)
        for point in points or []:
            study.enqueue_trial(point)

    def _penalty(self) -> float:
        if self._worst is None:
            return 1e6 if self._mode != "max" else -1e6
        scale = abs(self._worst) + 1.0
        return self._worst + scale if self._mode != "max" else self._worst - scale

    def on_trial_result(self, trial_id: str, result: dict[str, Any]) -> None:
        """Intermediate values only when the metric was evaluated and is finite."""
        value = result.get(str(self._metric))
        if isinstance(value, (int, float)) and math.isfinite(value):
            super().on_trial_result(trial_id, result)

    def on_trial_complete(self, trial_id: str, result: dict[str, Any] | None = None,
                          error: bool = False) -> None:
        if trial_id in self._completed_trials or trial_id not in self._ot_trials:
            return
        bad = _infeasible(result)
        if result and bad is not None:
            ot_trial = self._ot_trials[trial_id]
            ot_trial.set_user_attr(bad, True)
            ot_trial.set_constraint(bad, 1.0)  # > 0: infeasible
            ot_trial.set_user_attr("divergence_cause", str(result.get("divergence_cause")))
            study: Any = self._ot_study
            study.tell(ot_trial, self._penalty(), state=optuna.trial.TrialState.COMPLETE)
            self._completed_trials.add(trial_id)
            return
        value = result.get(str(self._metric)) if result else None
        if isinstance(value, (int, float)) and math.isfinite(value):
            worse = self._worst is None or (value > self._worst if self._mode != "max"
                                             else value < self._worst)
            self._worst = float(value) if worse else self._worst
        super().on_trial_complete(trial_id, result, error)


def _infeasible(result: dict[str, Any] | None) -> str | None:
    """DIVERGED_ATTR for a diverged result (also one holding a non-finite number),
    COLLAPSED_ATTR for a collapsed one, else None."""
    if not result:
        return None
    if is_diverged(result):
        return DIVERGED_ATTR
    return COLLAPSED_ATTR if result.get("outcome") == Outcome.COLLAPSED else None


def good_trials(n_finished: int) -> int:
    """How many finished trials TPE models as good (its l(x)): a quarter, at most 25.

    Optuna's default is a tenth. Diverged trials are all on the bad side (infeasible), so with a
    tenth l(x) rests on two or three points and its prior, and TPE keeps sampling the diverging
    region wherever it has few points there; a quarter spreads l(x) over the stable region that
    works (bench/searcher_divergence.py measures the effect).
    """
    return min(math.ceil(GOOD_SHARE * n_finished), 25)


def tpe_sampler(seed: int | None, n_startup_trials: int) -> optuna.samplers.TPESampler:
    """TPE with ``good_trials`` as its gamma where this Optuna still takes one (Optuna 4.9
    deprecated the argument and plans to drop it in 6.0; without it, Optuna's default split)."""
    kwargs: dict[str, Any] = {"seed": seed, "n_startup_trials": n_startup_trials}
    if "gamma" not in inspect.signature(optuna.samplers.TPESampler).parameters:
        return optuna.samplers.TPESampler(**kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return optuna.samplers.TPESampler(**kwargs, gamma=good_trials)


def build_searcher(spec: SweepSpec, run_dir: str | None = None
                   ) -> tuple[Searcher, dict[str, Any]]:
    """(search_alg, param_space for the Tuner). Optuna and frontier hold their own space (the
    frontier searcher writes frontier.parquet into ``run_dir``); grid and random use Ray's
    variant generator over the param_space. All but frontier run search.points_to_evaluate
    first."""
    from tune_sana.engine.space import ray_space, starting_points

    if spec.search.algorithm == "frontier":
        from tune_sana.engine.frontier import FrontierSearcher

        return FrontierSearcher(spec, run_dir, metric=spec.metric, mode=spec.mode), {}
    if spec.search.algorithm == "optuna":
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        sampler = tpe_sampler(spec.search.seed,
                              n_startup_trials=min(8, max(2, spec.search.num_samples // 3)))
        searcher = DivergenceAwareOptunaSearch(
            space=optuna_space(spec), metric=spec.metric, mode=spec.mode, sampler=sampler,
            points=starting_points(spec),
        )
        return searcher, {}
    generator: Any = BasicVariantGenerator(random_state=spec.search.seed,
                                           max_concurrent=spec.search.max_concurrent,
                                           points_to_evaluate=starting_points(spec) or None)
    return generator, ray_space(spec)
