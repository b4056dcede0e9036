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

Every trial ends in its true state, the one trials.parquet records: completed -> COMPLETE
(its last metric), diverged or collapsed -> COMPLETE and infeasible, pruned by the scheduler
(no verdict in its last row) -> PRUNED (Optuna keeps its last intermediate value), error ->
FAIL; each with its ``outcome`` and Ray ``trial_id`` as user attrs. TPE still ranks a pruned
trial by that value among the completed ones (``PrunedByValueTPE``), as it did when Ray told it
as COMPLETE. With a run directory the study is stored there (engine/study.py) and
optuna-dashboard opens it.
"""

from __future__ import annotations

import copy
import inspect
import math
import warnings
from collections.abc import Mapping
from typing import Any

import optuna
from optuna.trial import TrialState
from ray.tune.search import BasicVariantGenerator, Searcher
from ray.tune.search.optuna import OptunaSearch

from tune_sana.engine import study as stored
from tune_sana.engine.space import SweepSpec, optuna_space
from tune_sana.engine.stopping import is_diverged
from tune_sana.outcomes import TRIAL_VERDICTS, Outcome

DIVERGED_ATTR = Outcome.DIVERGED.value  # the Optuna user attr and constraint of a diverged trial
COLLAPSED_ATTR = Outcome.COLLAPSED.value  # ... and of a collapsed one
GOOD_SHARE = 0.25  # of finished trials, modelled as good by TPE (see good_trials)


class DivergenceAwareOptunaSearch(OptunaSearch):
    """OptunaSearch that records diverged and collapsed trials as infeasible, finished trials
    (never RUNNING), and every other trial in its true state (module docstring).

    The value told for a diverged trial is a penalty, one step of ``|worst| + 1`` past the worst
    finite value told so far: ``worst + (|worst| + 1)`` for mode min, ``worst - (|worst| + 1)``
    for mode max; before any finite value, 1e6 (min) or -1e6 (max). The trial's cause is kept in
    user attrs. A non-finite metric never reaches ``study.tell``.

    Given a ``storage`` that already holds the study (a resume that starts Ray afresh), the
    study is loaded, not duplicated: its starting points are not queued again, and its RUNNING
    trials, which no Ray trial will finish now, are told FAIL. ``warm``: the finished trials of
    earlier runs (engine/warmstart.py), told to a fresh study before its starting points.
    """

    def __init__(self, *args: Any, points: list[dict[str, Any]] | None = None,
                 warm: Any = None, spec: SweepSpec | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._worst: float | None = None
        study: Any = getattr(self, "_ot_study", None)
        earlier = study.get_trials(deepcopy=False) if study is not None else []
        if earlier:
            stored.fail_running(study, "its sweep stopped before it finished; the resumed "
                                "sweep runs new trials")
            for trial in earlier:
                if trial.value is not None and _infeasible(trial.user_attrs) is None:
                    self._note_finite(float(trial.value))  # completed or pruned
            return
        from tune_sana.engine import warmstart

        if warm is not None and warm.trials and spec is not None:
            for trial in warm.trials:
                if trial.outcome not in (DIVERGED_ATTR, COLLAPSED_ATTR) and trial.last is not None:
                    self._note_finite(trial.last)
            warmstart.tell(study, spec, warm, self._penalty)
        # Starting points go into the study's queue: Optuna asks them first, in order, and draws
        # the keys a point leaves out (Ray's own points_to_evaluate insists on every key).
        for point in points or []:
            if not warmstart.covers(warm, point):  # a point some warm trial ran is told already
                study.enqueue_trial(point)

    def _penalty(self) -> float:
        if self._worst is None:
            return 1e6 if self._mode != "max" else -1e6
        scale = abs(self._worst) + 1.0
        return self._worst + scale if self._mode != "max" else self._worst - scale

    def _note_finite(self, value: float) -> None:
        worse = self._worst is None or (value > self._worst if self._mode != "max"
                                         else value < self._worst)
        self._worst = value if worse else self._worst

    def suggest(self, trial_id: str) -> dict[str, Any] | None:
        new = trial_id not in self._ot_trials
        params: dict[str, Any] | None = super().suggest(trial_id)
        if new and trial_id in self._ot_trials:
            self._ot_trials[trial_id].set_user_attr(stored.TRIAL_ID_ATTR, trial_id)
        return params

    def on_trial_result(self, trial_id: str, result: dict[str, Any]) -> None:
        """Intermediate values only when the metric was evaluated and is finite, at the trial's
        own ``step`` (Ray's training_iteration counts results, and a result may carry many
        steps: relay.py)."""
        if trial_id in self._completed_trials or trial_id not in self._ot_trials:
            return  # a trial Ray re-runs after a restore, already told before the crash
        value = result.get(str(self._metric))
        if isinstance(value, (int, float)) and math.isfinite(value):
            step = result.get("step", result.get("training_iteration", 0))
            self._ot_trials[trial_id].report(float(value), int(step))

    def on_trial_complete(self, trial_id: str, result: dict[str, Any] | None = None,
                          error: bool = False) -> None:
        if trial_id in self._completed_trials or trial_id not in self._ot_trials:
            return
        ot_trial = self._ot_trials[trial_id]
        if _finished(self._ot_study, ot_trial):  # told before a crash; Ray re-ran it
            self._completed_trials.add(trial_id)
            return
        outcome = _outcome(result, error)
        ot_trial.set_user_attr(stored.OUTCOME_ATTR, outcome)
        value = result.get(str(self._metric)) if result else None
        finite = isinstance(value, (int, float)) and math.isfinite(value)
        if finite and outcome in (Outcome.COMPLETED, Outcome.PRUNED):
            self._note_finite(float(value))  # type: ignore[arg-type]
        if outcome in (DIVERGED_ATTR, COLLAPSED_ATTR):
            ot_trial.set_user_attr(outcome, True)
            ot_trial.set_constraint(outcome, 1.0)  # > 0: infeasible
            ot_trial.set_user_attr("divergence_cause", str((result or {}).get(
                "divergence_cause")))
            self._tell(trial_id, self._penalty(), TrialState.COMPLETE)
        elif outcome == Outcome.COMPLETED and finite:
            self._tell(trial_id, float(value), TrialState.COMPLETE)  # type: ignore[arg-type]
        elif outcome == Outcome.PRUNED:
            # Ray skips the searcher's on_trial_result for the result the scheduler stops a
            # trial on: that value is the trial's last one, and Optuna keeps the last reported.
            self.on_trial_result(trial_id, result or {})
            self._tell(trial_id, None, TrialState.PRUNED)
        else:  # error, or a trial that completed without its metric: nothing to rank
            self._tell(trial_id, None, TrialState.FAIL)

    def _tell(self, trial_id: str, value: float | None, state: TrialState) -> None:
        study: Any = self._ot_study
        study.tell(self._ot_trials[trial_id], value, state=state, skip_if_finished=True)
        self._completed_trials.add(trial_id)

    def restore(self, checkpoint_path: str) -> None:
        """Ray's restore (``--resume``), then: a RUNNING trial in the storage that the saved
        searcher never heard of was asked after Ray's last checkpoint, and no Ray trial will
        finish it: told FAIL. Trials told after that checkpoint stay as told."""
        super().restore(checkpoint_path)
        study: Any = self._ot_study
        if study is None:
            return
        known = {t.number for tid, t in self._ot_trials.items()
                 if tid not in self._completed_trials}
        stored.fail_running(study, "asked after the last experiment checkpoint before the "
                            "sweep stopped; no trial ran it", keep=known)


def _finished(study: Any, ot_trial: Any) -> bool:
    """Whether the storage already holds ``ot_trial`` as finished."""
    state: TrialState = study._storage.get_trial(ot_trial._trial_id).state
    return state.is_finished()


def _outcome(result: dict[str, Any] | None, error: bool) -> str:
    """The trial's outcome as the recorder writes it: its verdict, or pruned (a finite trial the
    scheduler stopped), or error (Ray reports the trial failed)."""
    if error:
        return Outcome.ERROR.value
    bad = _infeasible(result)
    if bad is not None:
        return bad
    verdict = (result or {}).get("outcome")
    return str(verdict) if verdict in TRIAL_VERDICTS else Outcome.PRUNED.value


def _infeasible(result: Mapping[str, Any] | None) -> str | None:
    """DIVERGED_ATTR for a diverged result (also one holding a non-finite number),
    COLLAPSED_ATTR for a collapsed one, else None. Also reads a stored trial's user attrs."""
    if not result:
        return None
    if is_diverged(result) or result.get(DIVERGED_ATTR) is True:
        return DIVERGED_ATTR
    collapsed = result.get("outcome") == Outcome.COLLAPSED or result.get(COLLAPSED_ATTR) is True
    return COLLAPSED_ATTR if collapsed else None


def good_trials(n_finished: int) -> int:
    """How many finished trials TPE models as good (its l(x)): a quarter, at most 25.

    Optuna's default is a tenth. Diverged trials are all on the bad side (infeasible), so with a
    tenth l(x) rests on two or three points and its prior, and TPE keeps sampling the diverging
    region wherever it has few points there; a quarter spreads l(x) over the stable region that
    works (bench/searcher_divergence.py measures the effect).
    """
    return min(math.ceil(GOOD_SHARE * n_finished), 25)


class PrunedByValueTPE(optuna.samplers.TPESampler):
    """TPE that ranks a pruned trial by its last value, among the completed ones.

    Optuna's TPE puts every COMPLETE trial before every PRUNED one when it picks its good
    trials, whatever their values: right for Optuna's pruners, wrong under Ray's ASHA, which
    never prunes the first trials to reach a rung. There the early random trials complete at
    mediocre lrs, fill the good side, and better trials pruned later are left out: on
    bench/searcher_divergence.py the diverged share of the second half rose from 7% to 22%.
    This sampler samples from a view of the study in which a pruned trial that has a value is
    complete (as Ray's stock OptunaSearch tells it); the stored study keeps it PRUNED.
    """

    def _sample(self, study: optuna.Study, trial: optuna.trial.FrozenTrial,
                search_space: dict[str, Any]) -> dict[str, Any]:
        view: Any = _PrunedAsComplete(study)
        sampled: dict[str, Any] = super()._sample(view, trial, search_space)
        return sampled


class _PrunedAsComplete:
    """A read-only view of a study whose pruned trials with a value read as complete."""

    def __init__(self, study: optuna.Study) -> None:
        self._study = study

    def __getattr__(self, name: str) -> Any:
        return getattr(self._study, name)

    def _get_trials(self, *args: Any, **kwargs: Any) -> list[optuna.trial.FrozenTrial]:
        trials: list[optuna.trial.FrozenTrial] = self._study._get_trials(*args, **kwargs)
        return [_complete_copy(t) if t.state == TrialState.PRUNED and t.value is not None
                else t for t in trials]


def _complete_copy(trial: optuna.trial.FrozenTrial) -> optuna.trial.FrozenTrial:
    seen = copy.copy(trial)
    seen.state = TrialState.COMPLETE
    return seen


def tpe_sampler(seed: int | None, n_startup_trials: int) -> optuna.samplers.TPESampler:
    """PrunedByValueTPE with ``good_trials`` as its gamma where this Optuna still takes one
    (Optuna 4.9 deprecated the argument and plans to drop it in 6.0; without it, Optuna's
    default split)."""
    kwargs: dict[str, Any] = {"seed": seed, "n_startup_trials": n_startup_trials}
    if "gamma" not in inspect.signature(optuna.samplers.TPESampler).parameters:
        return PrunedByValueTPE(**kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return PrunedByValueTPE(**kwargs, gamma=good_trials)


def build_searcher(spec: SweepSpec, run_dir: str | None = None, warm: Any = None
                   ) -> tuple[Searcher, dict[str, Any]]:
    """(search_alg, param_space for the Tuner). Optuna and frontier hold their own space (the
    frontier searcher writes frontier.parquet into ``run_dir``; Optuna's study is stored there,
    in memory without a ``run_dir``); grid and random use Ray's variant generator over the
    param_space. All but frontier run search.points_to_evaluate
    first. ``warm``: an Optuna search's warm start (engine/warmstart.py)."""
    from tune_sana.engine.space import ray_space, starting_points

    if spec.search.algorithm == "frontier":
        from tune_sana.engine.frontier import FrontierSearcher

        return FrontierSearcher(spec, run_dir, metric=spec.metric, mode=spec.mode), {}
    if spec.search.algorithm == "optuna":
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        sampler = tpe_sampler(spec.search.seed,
                              n_startup_trials=min(8, max(2, spec.search.num_samples // 3)))
        where: dict[str, Any] = {}
        if run_dir is not None:  # the study on disk, for optuna-dashboard and --resume
            where = {"storage": stored.storage(run_dir), "study_name": stored.study_name(run_dir)}
        searcher = DivergenceAwareOptunaSearch(
            space=optuna_space(spec), metric=spec.metric, mode=spec.mode, sampler=sampler,
            points=starting_points(spec), warm=warm, spec=spec, **where,
        )
        return searcher, {}
    generator: Any = BasicVariantGenerator(random_state=spec.search.seed,
                                           max_concurrent=spec.search.max_concurrent,
                                           points_to_evaluate=starting_points(spec) or None)
    return generator, ray_space(spec)
