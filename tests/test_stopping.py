"""Engine-side divergence: rows are cleaned before Ray sees them; the stopper ends a trial."""

from __future__ import annotations

import math
import pickle

import numpy as np

from tune_sana.engine.stopping import DivergenceStopper, is_diverged, sanitize


def test_sanitize_drops_nan_and_marks_divergence() -> None:
    row = sanitize({"step": 7, "train_loss": math.nan, "grad_norm": np.float32(2.0), "lr": None})
    assert row == {"step": 7, "grad_norm": 2.0, "outcome": "diverged",
                   "divergence_cause": "nonfinite_metric", "nonfinite_at": "train_loss",
                   "diverged_step": 7}
    assert type(row["grad_norm"]) is float


def test_sanitize_keeps_the_trials_own_cause() -> None:
    row = sanitize({"step": 3, "outcome": "diverged", "divergence_cause": "nonfinite_params",
                    "val_loss": math.inf})
    assert row["divergence_cause"] == "nonfinite_params" and "val_loss" not in row


def test_sanitize_leaves_healthy_rows_alone() -> None:
    assert sanitize({"step": 1, "train_loss": 0.5}) == {"step": 1, "train_loss": 0.5}


def test_stopper_stops_on_nan_inf_or_diverged_and_survives_pickle() -> None:
    stopper = pickle.loads(pickle.dumps(DivergenceStopper()))
    assert not stopper("t", {"val_loss": 0.3, "training_iteration": 4})
    assert stopper("t", {"val_loss": math.nan})
    assert stopper("t", {"train_loss": -math.inf})
    assert stopper("t", {"outcome": "diverged"})
    assert not stopper.stop_all()
    assert not is_diverged({"outcome": "completed", "val_loss": 0.1})
