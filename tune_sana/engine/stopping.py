"""Engine-side divergence handling: what reaches Ray, and the stopper that ends a diverged trial.

Ray Tune's schedulers keep a trial that reports NaN running (reference/hpo.md), so the engine
does two things for every trial program, also one that never checks its own loss:

1. ``sanitize``: before a row reaches Ray, every non-finite float becomes a recorded divergence
   (``outcome: diverged``, ``divergence_cause: nonfinite_metric``) and is dropped from the row,
   so NaN never reaches Ray's files, its sorting or the searcher.
2. ``DivergenceStopper``: stops a trial on the first result that says ``diverged`` or still
   holds a non-finite number (a trial run under Tune without our wrapper).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from ray.tune.stopper import Stopper

from tune_sana.outcomes import Cause, Outcome


def _nonfinite(value: Any) -> bool:
    return isinstance(value, float) and not math.isfinite(value)


def sanitize(row: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of ``row`` fit for Ray: numbers as plain Python values, None and NaN dropped.

    A non-finite float marks the row diverged (cause ``nonfinite_metric``, ``nonfinite_at`` the
    first such key) unless the trial already said why it diverged. numpy scalars become Python
    numbers (Ray's JSON writes np.float32 NaN as the string "null").
    """
    out: dict[str, Any] = {}
    first_bad: str | None = None
    for key, value in row.items():
        if hasattr(value, "item") and callable(value.item):
            value = value.item()
        if _nonfinite(value):
            first_bad = first_bad or key
            continue
        if value is not None:
            out[key] = value
    if first_bad is not None and out.get("outcome") != Outcome.DIVERGED:
        out.update(outcome=Outcome.DIVERGED.value, divergence_cause=Cause.NONFINITE_METRIC.value,
                   nonfinite_at=first_bad)
        if "step" in out:
            out.setdefault("diverged_step", out["step"])
    return out


def is_diverged(result: Mapping[str, Any]) -> bool:
    """True if the result says ``diverged`` or carries a non-finite number."""
    if result.get("outcome") == Outcome.DIVERGED:
        return True
    return any(_nonfinite(v) for v in result.values())


class DivergenceStopper(Stopper):
    """Stops a trial on its first diverged or non-finite result. Never stops the whole sweep.

    Picklable and stateless, so it survives Tuner.restore and can be combined with other
    stoppers (``ray.tune.stopper.CombinedStopper``).
    """

    def __call__(self, trial_id: str, result: dict[str, Any]) -> bool:
        return is_diverged(result)

    def stop_all(self) -> bool:
        return False
