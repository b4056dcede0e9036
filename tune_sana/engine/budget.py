"""The failure budget: a search that diverges nearly everywhere stops early, its record kept.

``search.max_diverged`` (off when absent) is reached when

- a count ``N`` (a whole number >= 1): ``N`` trials of the search have diverged;
- a fraction ``f`` in (0, 1): at least ``MIN_FINISHED`` trials have finished and a share ``f``
  or more of them diverged (``diverged / finished >= f``).

Finished means recorded with any outcome (completed, diverged, collapsed, pruned, error);
diverged means the outcome ``diverged`` (a collapse is finite and does not count). Only the
search (or frontier) stage counts and is stopped; the confirm stage does not run after a stop.

When the budget is reached the sweep stops starting trials and ends the running ones (Ray's
``stop_all``); finished trials stay in trials.parquet and history/, trials cut off in flight
leave their history rows but no trials row. One line says why, the note is kept in
``<run dir>/budget_stop.txt``, and ``tune-sana sweep`` closes with "stopped by its failure
budget" and exit status ``EXIT_STATUS`` (3), distinct from done (0), a user error (2) and
Ctrl-C (130). A resumed run recounts its record, so it stops again at once.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any, TextIO

from ray.tune import Callback
from ray.tune.stopper import Stopper

from tune_sana.engine.confirm import stage_of, trial_rows
from tune_sana.engine.relay import unpack
from tune_sana.engine.space import SweepSpec
from tune_sana.outcomes import TRIAL_VERDICTS, Outcome, Stage
from tune_sana.record.storage import Location

MIN_FINISHED = 5  # finished trials before a fractional budget applies
STOP_FILE = "budget_stop.txt"  # the note of a sweep the budget stopped, in the run directory
EXIT_STATUS = 3  # tune-sana sweep's exit status when the budget stopped the search
KEY = "search.max_diverged"


def reached(limit: float, diverged: int, finished: int) -> bool:
    """Whether ``diverged`` of ``finished`` trials reach the budget ``limit`` (a count >= 1 or
    a fraction in (0, 1); module docstring)."""
    if limit >= 1:
        return diverged >= limit
    return finished >= MIN_FINISHED and diverged >= limit * finished


def describe(limit: float, diverged: int, finished: int) -> str:
    """The one line that says the budget stopped the search."""
    budget = f"{int(limit)}" if limit >= 1 else f"{limit:g} of finished trials"
    return (f"failure budget reached: {diverged} of {finished} finished trials diverged "
            f"({KEY}: {budget}); the sweep stops, finished trials are kept. Most of the space "
            "is unstable: check its bounds (e.g. lr typed 1000x too large)")


def stop_note(run_dir: str | os.PathLike[str]) -> str | None:
    """The note of a sweep stopped by its budget, or None."""
    note = Location.of(run_dir) / STOP_FILE
    return note.read_text().strip() if note.is_file() else None


class FailureBudget(Callback, Stopper):
    """Counts the stage's finished and diverged trials (a Tune callback) and stops the whole
    sweep once they reach the budget (a Tune stopper whose ``stop_all`` says so; it never stops
    one trial). Pass the same object as a stopper and as a callback.

    Picklable (Ray keeps it in tuner.pkl): the counts are not pickled but re-read from the
    record at ``setup``, so a resumed sweep counts the trials finished before it.
    """

    def __init__(self, run_dir: str, limit: float, stage: str,
                 stream: TextIO | None = None) -> None:
        if isinstance(limit, bool) or not (limit >= 1 and float(limit).is_integer()
                                           or 0 < limit < 1):
            raise ValueError(f"{KEY}: {limit!r} is neither a count >= 1 nor a fraction in (0, 1)")
        self.run_dir = run_dir
        self.limit = limit
        self.stage = stage
        self._stream = stream
        self._reset()

    def _reset(self) -> None:
        self._seen: set[str] = set()
        self.finished = 0
        self.diverged = 0
        self._told = False

    def __getstate__(self) -> dict[str, Any]:
        return {"run_dir": self.run_dir, "limit": self.limit, "stage": self.stage}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._stream = None
        self._reset()

    # --- counting (Tune callback hooks) -------------------------------------------------------

    def setup(self, *args: Any, **info: Any) -> None:
        self._reset()
        for row in trial_rows(self.run_dir):
            if stage_of(row) == self.stage:
                self._count(str(row["trial_id"]), str(row.get("outcome")))

    def _count(self, trial_id: str, outcome: str) -> None:
        if trial_id in self._seen:
            return  # recorded before a resume, and reported again by the restored Ray
        self._seen.add(trial_id)
        self.finished += 1
        self.diverged += outcome == Outcome.DIVERGED

    def on_trial_complete(self, iteration: int, trials: list[Any], trial: Any,
                          **info: Any) -> None:
        last = unpack(trial.last_result or {})[-1]
        outcome = last.get("outcome")
        self._count(trial.trial_id, str(outcome) if outcome in TRIAL_VERDICTS
                    else Outcome.PRUNED.value)

    def on_trial_error(self, iteration: int, trials: list[Any], trial: Any,
                       **info: Any) -> None:
        self._count(trial.trial_id, Outcome.ERROR.value)

    # --- stopping (Tune stopper) --------------------------------------------------------------

    def __call__(self, trial_id: str, result: dict[str, Any]) -> bool:
        return False  # the budget ends the sweep, never one trial

    def stop_all(self) -> bool:
        if not reached(self.limit, self.diverged, self.finished):
            return False
        if not self._told:
            self._told = True
            line = describe(self.limit, self.diverged, self.finished)
            (Location.of(self.run_dir) / STOP_FILE).write_text_atomic(line + "\n")
            print(f"tune-sana: {line}", file=self._stream or sys.stderr, flush=True)
            logging.getLogger(_RAY_ANALYSIS_LOGGER).addFilter(_drop_no_metrics)
        return True


# Trials the stop cut off before their first result have no result file, and Ray's result grid
# warns about each when fit ends; the record already tells what happened (their history rows,
# no trials row), so that warning is dropped once the budget has stopped the sweep.
_RAY_ANALYSIS_LOGGER = "ray.tune.analysis.experiment_analysis"


def _drop_no_metrics(record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith("Failed to fetch metrics for")


def failure_budget(spec: SweepSpec, run_dir: str | os.PathLike[str]) -> FailureBudget | None:
    """The budget of the sweep's search (or frontier) stage, or None when the space sets no
    ``search.max_diverged``."""
    limit = spec.search.max_diverged
    if limit is None:
        return None
    stage = Stage.FRONTIER if spec.search.algorithm == "frontier" else Stage.SEARCH
    return FailureBudget(str(run_dir), limit, stage.value)
