"""Warm start: an Optuna search seeded with the finished trials of earlier runs.

    tune-sana sweep space.yaml --warm-start runs/first-sweep [--warm-start runs/other]

Each earlier run must have run the same trial program on the same metric and mode, and searched
the same keys (its spec in sweep.yaml). Every trial it finished in its search or confirm stage
whose values lie inside this space becomes a trial of the new study before the first new trial
is asked, told exactly as a live trial is (engine/search.py):

- completed: COMPLETE with the metric's last value in its history, the value Optuna was told;
- diverged or collapsed: COMPLETE with the penalty value (one step past the worst finite value,
  warm or not) and infeasible under its own constraint name, so TPE keeps away from it;
- pruned: PRUNED with its history of the metric as intermediate values;
- error, or a trial with no finite metric: left out (it says nothing about its configuration).

Warm trials carry the user attrs ``warm_start_run`` and ``warm_start_trial`` (the earlier
trial's id), so optuna-dashboard tells them apart; they count toward TPE's startup trials, so a
warm-started search models the space from its first new trial; a starting point
(search.points_to_evaluate) that a warm trial already ran is not queued again. A resumed sweep
keeps the warm trials its study already holds and adds none.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import optuna
from optuna.trial import TrialState

from tune_sana.config import UserError
from tune_sana.engine.confirm import STAGE_CONFIRM, STAGE_SEARCH, searched_values
from tune_sana.engine.space import SweepSpec, optuna_space
from tune_sana.outcomes import Outcome
from tune_sana.record.readers import read_history, read_spec, read_trials
from tune_sana.record.schema import SPEC_FILE
from tune_sana.record.storage import Location

RUN_ATTR = "warm_start_run"  # Optuna user attr: the run a warm trial came from
TRIAL_ATTR = "warm_start_trial"  # ... and its trial id there
_INFEASIBLE = (Outcome.DIVERGED.value, Outcome.COLLAPSED.value)
_USED = (Outcome.COMPLETED.value, Outcome.PRUNED.value, *_INFEASIBLE)


@dataclass(frozen=True)
class WarmTrial:
    """One finished trial of an earlier run, as the new study is told it."""

    run: str
    trial_id: str
    params: dict[str, Any]
    outcome: str
    values: tuple[tuple[int, float], ...]  # (step, metric value): its finite metric history

    @property
    def last(self) -> float | None:
        return self.values[-1][1] if self.values else None


@dataclass
class WarmStart:
    """The warm trials of every ``--warm-start`` run, and what was left out and why."""

    trials: list[WarmTrial] = field(default_factory=list)
    skipped: dict[str, int] = field(default_factory=dict)  # why -> how many
    runs: list[str] = field(default_factory=list)

    def describe(self) -> str:
        counts: dict[str, int] = {}
        for trial in self.trials:
            counts[trial.outcome] = counts.get(trial.outcome, 0) + 1
        told = ", ".join(f"{n} {k}" for k, n in sorted(counts.items())) or "none"
        left = "; left out: " + ", ".join(f"{n} {why}" for why, n in self.skipped.items()) \
            if self.skipped else ""
        plural = "" if len(self.runs) == 1 else "s"
        return (f"warm start: {len(self.trials)} trials from {len(self.runs)} run{plural} "
                f"({told}){left}")


def load(spec: SweepSpec, run_dirs: Sequence[str | os.PathLike[str]]) -> WarmStart:
    """The warm trials of ``run_dirs`` for ``spec``; a UserError (one line) for a run that is
    not a tune-sana run or does not match this search."""
    if run_dirs and spec.search.algorithm != "optuna":
        raise UserError(f"--warm-start: search.algorithm is {spec.search.algorithm}; warm "
                        "starts seed an Optuna search: set search.algorithm: optuna or drop "
                        "--warm-start")
    warm = WarmStart()
    distributions = optuna_space(spec)
    for run_dir in run_dirs:
        name = str(run_dir)
        _check_same_search(spec, name)
        warm.runs.append(name)
        rows = read_trials(run_dir).to_pylist()
        used = [r for r in rows if r.get("stage") in (None, STAGE_SEARCH, STAGE_CONFIRM)
                and r.get("outcome") in _USED]
        errors = sum(1 for r in rows if r.get("outcome") == Outcome.ERROR.value)
        if errors:
            warm.skipped[Outcome.ERROR.value] = warm.skipped.get(Outcome.ERROR.value, 0) + errors
        history = _metric_history(run_dir, spec.metric, [str(r["trial_id"]) for r in used])
        for row in used:
            params = searched_values(spec, row)
            if not _inside(params, distributions):
                warm.skipped["outside this space"] = warm.skipped.get("outside this space", 0) + 1
                continue
            values = history.get(str(row["trial_id"]), ())
            outcome = str(row["outcome"])
            if outcome not in _INFEASIBLE and not values:
                warm.skipped[f"without a finite {spec.metric}"] = \
                    warm.skipped.get(f"without a finite {spec.metric}", 0) + 1
                continue
            warm.trials.append(WarmTrial(name, str(row["trial_id"]), params, outcome,
                                         tuple(values)))
    return warm


def _check_same_search(spec: SweepSpec, run_dir: str) -> None:
    """The earlier run searched the same keys of the same trial program for the same metric."""
    if not (Location.of(run_dir) / SPEC_FILE).is_file():
        raise UserError(f"--warm-start {run_dir}: not a tune-sana run (no {SPEC_FILE}); give "
                        "the folder of an earlier sweep")
    before = read_spec(run_dir)
    now = {"trial": spec.trial, "metric": spec.metric, "mode": spec.mode}
    for key, value in now.items():
        was = before.get(key, SweepSpec.model_fields[key].default)
        if was != value:
            raise UserError(f"--warm-start {run_dir}: its {key} is {was}, this sweep's is "
                            f"{value}; warm-start only from runs of the same {key}")
    keys = set((before.get("space") or {}).keys())
    if keys != set(spec.space):
        diff = sorted(keys ^ set(spec.space))
        raise UserError(f"--warm-start {run_dir}: it searched other keys (differ: "
                        f"{', '.join(diff)}); warm-start only from runs of the same space keys")


def _metric_history(run_dir: str | os.PathLike[str], metric: str,
                    trial_ids: list[str]) -> dict[str, list[tuple[int, float]]]:
    """Each trial's finite values of ``metric`` by step, after step 0 (a base evaluation made
    before any update says nothing about the configuration)."""
    if not trial_ids:
        return {}
    table = read_history(run_dir, ["trial_id", "step", metric], trial_ids=trial_ids)
    out: dict[str, list[tuple[int, float]]] = {}
    for row in sorted(table.to_pylist(), key=lambda r: (r["trial_id"], r["step"])):
        value = row.get(metric)
        if row["step"] > 0 and isinstance(value, (int, float)) and math.isfinite(value):
            out.setdefault(row["trial_id"], []).append((int(row["step"]), float(value)))
    return out


def _inside(params: dict[str, Any], distributions: dict[str, Any]) -> bool:
    """Every value is one the distribution can take (a value read back as a float where the
    choice was an int counts as that int)."""
    for key, dist in distributions.items():
        value = params.get(key)
        if isinstance(dist, optuna.distributions.CategoricalDistribution):
            if not any(_same(value, choice) for choice in dist.choices):
                return False
        elif not isinstance(value, (int, float)) or not dist.low <= value <= dist.high:
            return False
    return True


def _same(value: Any, choice: Any) -> bool:
    if isinstance(value, (int, float)) and isinstance(choice, (int, float)) \
            and not isinstance(value, bool) and not isinstance(choice, bool):
        return float(value) == float(choice)
    return bool(value == choice)


def covers(warm: WarmStart | None, point: dict[str, Any]) -> bool:
    """Some warm trial ran ``point`` (every key the point names has the warm trial's value): a
    starting point already told, not worth queueing again."""
    if warm is None:
        return False
    return any(all(k in t.params and _same(t.params[k], v) for k, v in point.items())
               for t in warm.trials)


def _as_choice(value: Any, dist: Any) -> Any:
    """The distribution's own choice equal to ``value`` (1.0 read back -> the choice 1)."""
    if isinstance(dist, optuna.distributions.CategoricalDistribution):
        return next(c for c in dist.choices if _same(value, c))
    if isinstance(dist, optuna.distributions.IntDistribution):
        return int(value)
    return float(value)


def tell(study: optuna.Study, spec: SweepSpec, warm: WarmStart,
         penalty: Any) -> None:
    """Add the warm trials to ``study`` through Optuna's ask-and-tell, as live trials are told.
    ``penalty``: a callable giving the value told for an infeasible trial (the searcher's)."""
    distributions = optuna_space(spec)
    for trial in warm.trials:
        params = {k: _as_choice(v, distributions[k]) for k, v in trial.params.items()}
        study.enqueue_trial(params, skip_if_exists=False)
        live = study.ask(distributions)
        live.set_user_attr(RUN_ATTR, trial.run)
        live.set_user_attr(TRIAL_ATTR, trial.trial_id)
        live.set_user_attr("outcome", trial.outcome)
        if trial.outcome in _INFEASIBLE:
            live.set_user_attr(trial.outcome, True)
            live.set_constraint(trial.outcome, 1.0)
            study.tell(live, penalty(), state=TrialState.COMPLETE)
        elif trial.outcome == Outcome.PRUNED.value:
            for step, value in trial.values:
                live.report(value, step)
            study.tell(live, state=TrialState.PRUNED)
        else:
            study.tell(live, trial.last, state=TrialState.COMPLETE)
