"""The words a trial's result is told in: how it ended, why it diverged, and what a reported
number may be. Shared by the trial, the engine, the Parquet record and the analysis; imports
nothing heavier than the standard library.
"""

from __future__ import annotations

import enum
import math


class Outcome(str, enum.Enum):
    """How a trial ended (``running``: seen in history, not finished yet)."""

    RUNNING = "running"
    COMPLETED = "completed"
    DIVERGED = "diverged"
    COLLAPSED = "collapsed"  # finite, but far worse than its base and staying there
    PRUNED = "pruned"
    ERROR = "error"


# Outcomes a trial can end with, in report order.
FINISHED: tuple[str, ...] = tuple(o.value for o in Outcome if o is not Outcome.RUNNING)
# Outcomes whose best validation loss counts as a setting's result (a diverged trial's early
# values do not: the setting blew up).
FINITE: tuple[str, ...] = (Outcome.COMPLETED.value, Outcome.PRUNED.value)
# Outcomes the trial itself reports in its last row; any other finished trial was stopped by
# the scheduler while finite (pruned).
TRIAL_VERDICTS: tuple[str, ...] = (Outcome.COMPLETED.value, Outcome.DIVERGED.value,
                                   Outcome.COLLAPSED.value, Outcome.ERROR.value)
# Outcomes that say the setting is unstable: the searcher is told them as infeasible, and a
# confirmed configuration with such a seed is disqualified.
INFEASIBLE: tuple[str, ...] = (Outcome.DIVERGED.value, Outcome.COLLAPSED.value)


class Stage(str, enum.Enum):
    """Which part of a sweep ran a trial: the search, the confirm stage that re-runs the top
    configurations with fresh seeds, or a frontier search (a row without a stage was written
    before stages existed: a search trial)."""

    SEARCH = "search"
    CONFIRM = "confirm"
    FRONTIER = "frontier"  # a probe of the frontier search (engine/frontier.py)


class Verdict(str, enum.Enum):
    """Where a frontier search left one combination of categorical settings."""

    BRACKETED = "bracketed"  # stable_lr < boundary <= diverged_lr, within the tolerance
    STABLE_TO_UPPER = "stable_to_upper"  # finite in every seed at the space's upper lr bound
    UNSTABLE_AT_LOWER = "unstable_at_lower"  # diverges already at the space's lower lr bound
    SEARCHING = "searching"  # not settled yet (or the trial budget ran out first)
    ERROR = "error"  # a probe raised: no verdict (the message is kept)


class Cause(str, enum.Enum):
    """Why a trial diverged (or, for LOSS_COLLAPSE, collapsed)."""

    NONFINITE_LOSS = "nonfinite_loss"
    NONFINITE_GRAD = "nonfinite_grad"
    NONFINITE_PARAMS = "nonfinite_params"
    LOSS_SPIKE = "loss_spike"
    LOSS_SCALE_COLLAPSE = "loss_scale_collapse"
    # A non-finite number found outside the step's checks: by the engine's sanitizer or
    # stopper in any trial program's row, or by the trial in its validation loss.
    NONFINITE_METRIC = "nonfinite_metric"
    # Outcome collapsed: a finite validation loss above collapse_factor x the base's for
    # collapse_patience evaluations in a row (training/damage.py).
    LOSS_COLLAPSE = "loss_collapse"


def clean(value: float | None) -> float | None:
    """A plain Python float, or None for None/NaN/inf: what reaches reports and files."""
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


# Sample grids (training/sampling.py) travel as base64 PNG text in a trial's rows: a completed
# trial's summary row carries its own under SAMPLES_KEY, its step-0 row the base's under
# BASE_SAMPLES_KEY. The driver writes them to <run dir>/SAMPLES_DIR/<trial id>.png and
# <run dir>/SAMPLES_DIR/BASE_SAMPLES.png (engine/samples.py); the HTML report shows them.
SAMPLES_KEY = "samples_png"
BASE_SAMPLES_KEY = "base_samples_png"
SAMPLES_DIR = "samples"
BASE_SAMPLES = "base"
